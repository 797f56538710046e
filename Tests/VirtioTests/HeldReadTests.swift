import NIOCore
import TestSupport
import Virtio
import VirtioDisk
import XCTest

@testable import VirtioBlock
@testable import VirtioEmulator

/// The lane page pool and READs answered from the device's pages (no copy).
final class HeldReadTests: XCTestCase {
    // MARK: PagePool

    func testPoolHandsOutRunsAndFallsBackWhenFragmented() {
        var p = PagePool(first: 100, capacity: 130)
        XCTAssertEqual(p.count, 130)
        XCTAssertEqual(p.take(1), [100], "a single page comes from the bottom")
        XCTAssertEqual(p.take(4), [101, 102, 103, 104], "a run, ascending")
        XCTAssertEqual(p.take(70), (105..<175).map { Int32($0) }, "a run across a word boundary")
        XCTAssertEqual(p.count, 55)
        // Free every other page of the first run: 2 free pages, none adjacent.
        p.give([101, 103])
        XCTAssertEqual(p.take(60), nil, "more than are free")
        let rest = p.take(55)!
        XCTAssertEqual(Set(rest).count, 55)
        XCTAssertEqual(p.count, 2)
        let scattered = p.take(2)!
        XCTAssertEqual(Set(scattered), [101, 103], "fragmented: the free pages, not a run")
        XCTAssertEqual(p.count, 0)
        XCTAssertNil(p.take(1))
    }

    /// Random takes and gives against a model of which pages are free: no page is handed out
    /// twice, the count is right, and a request gets consecutive pages whenever the model has a
    /// free run that long.
    func testPoolAgainstModel() {
        var rng = TestSeed.generator("HeldReadTests.testPoolAgainstModel")
        let capacity = 300
        var pool = PagePool(first: 7, capacity: capacity)
        var free = [Bool](repeating: true, count: capacity)
        var taken: [[Int32]] = []
        func hasRun(_ n: Int) -> Bool {
            var len = 0
            for f in free {
                len = f ? len + 1 : 0
                if len >= n { return true }
            }
            return false
        }
        for step in 0..<20_000 {
            if taken.isEmpty || rng.next() % 3 != 0 {
                let n = rng.next() % 4 == 0 ? 1 : Int(1 + rng.next() % 40)
                let run = hasRun(n)
                guard let pages = pool.take(n) else {
                    XCTAssertLessThan(free.filter { $0 }.count, n, "step \(step): nil with \(n) free")
                    continue
                }
                XCTAssertEqual(pages.count, n)
                for pg in pages {
                    let i = Int(pg) - 7
                    XCTAssertTrue(free[i], "step \(step): page \(pg) handed out twice")
                    free[i] = false
                }
                if run {
                    XCTAssertEqual(pages, (0..<n).map { pages[0] + Int32($0) }, "step \(step): a run was free")
                }
                taken.append(pages)
            } else {
                let pages = taken.remove(at: Int(rng.next() % UInt64(taken.count)))
                pool.give(pages)
                for pg in pages { free[Int(pg) - 7] = true }
            }
            XCTAssertEqual(pool.count, free.filter { $0 }.count, "step \(step)")
        }
    }

    // MARK: held reads through the driver

    func rig(ioPages: Int = 256) throws -> EmulatedDisk {
        var o = DriverOptions()
        o.queueSize = 64
        o.queues = 1
        o.ioPages = ioPages
        var cfg = EmulatorConfiguration()
        cfg.completionOrder = .reversed
        return try EmulatedDisk(backend: try RAMBackend(size: 4 << 20), configuration: cfg, options: o)
    }

    func freePages(_ d: VirtioBlkDriver) -> Int { d.lanes.reduce(0) { $0 + $1.state.withLock { $0.pool.count } } }

    func readHeld(_ dev: BlockDevice, _ off: UInt64, _ len: Int) throws -> BlockDevice.ReadReply {
        let e = expectation(description: "read")
        nonisolated(unsafe) var out: Result<BlockDevice.ReadReply, BlkError>!
        dev.readHeld(offset: off, length: len, sparse: false, allocator: .init()) {
            out = $0
            e.fulfill()
        }
        wait(for: [e], timeout: 30)
        return try out.get()
    }

    /// Unaligned held READs over several device requests return the bytes written, as buffers
    /// whose storage is the arena; the pages go back to the pool only when the buffers are gone.
    func testHeldReadReturnsTheBytesAndItsPagesAfterTheBuffers() throws {
        let disk = try rig()
        defer { disk.shutdown() }
        let dev = disk.device
        let all = freePages(disk.driver)
        var rng = TestSeed.generator("HeldReadTests.testHeldRead")
        let data = rng.bytes(1 << 20)
        let w = expectation(description: "write")
        nonisolated(unsafe) var wrote: Result<Void, BlkError>!
        dev.write(offset: 0, data: ByteBuffer(bytes: data), fua: false) { r in
            wrote = r
            w.fulfill()
        }
        wait(for: [w], timeout: 30)
        try wrote.get()
        for (off, len) in [(0, 4096), (100, 300_000), (4095, 128 * 1024 + 2), (12_288, 1 << 19)] {
            guard case .held(let h) = try readHeld(dev, UInt64(off), len) else {
                return XCTFail("an all-data read of \(len) bytes is held")
            }
            XCTAssertEqual(h.length, len)
            XCTAssertLessThan(freePages(disk.driver), all, "pages are held while the buffers live")
            var got: [UInt8] = []
            for var b in h.buffers { got += b.readBytes(length: b.readableBytes)! }
            XCTAssertEqual(got, Array(data[off..<(off + len)]), "bytes at \(off)+\(len)")
            // Nothing but `h` references the buffers; the pages return when it goes.
        }
        XCTAssertEqual(freePages(disk.driver), all, "every page is back once the buffers are freed")
    }

    /// A held READ that needs pages others hold waits for them, and completes once they are freed.
    func testHeldReadWaitsForPagesHeldByOthers() throws {
        let disk = try rig(ioPages: 64) // 256 KiB of pages
        defer { disk.shutdown() }
        let dev = disk.device
        var first: BlockDevice.ReadReply? = try readHeld(dev, 0, 192 * 1024)
        guard case .held? = first else { return XCTFail("held") }
        XCTAssertEqual(freePages(disk.driver), 16)
        let e = expectation(description: "second read")
        nonisolated(unsafe) var second: Result<BlockDevice.ReadReply, BlkError>?
        dev.readHeld(offset: 1 << 20, length: 192 * 1024, sparse: false, allocator: .init()) {
            second = $0
            e.fulfill()
        }
        // It cannot launch while the first holds 48 of the 64 pages; dropping that one lets it.
        XCTAssertEqual(freePages(disk.driver), 16, "the second read waits: its first request needs 32 pages")
        first = nil
        wait(for: [e], timeout: 30)
        guard case .held(let h)? = try second?.get() else { return XCTFail("the waiting read completes, held") }
        XCTAssertEqual(h.length, 192 * 1024)
    }

    /// A lent buffer that is grown while it is the only reference moves to the heap through the
    /// allocator's reallocate: the pages return at once and the bytes are kept.
    func testWritingALentBufferCopiesItOffTheArena() throws {
        let disk = try rig()
        defer { disk.shutdown() }
        let all = freePages(disk.driver)
        guard case .held(let h) = try readHeld(disk.device, 0, 64 * 1024) else { return XCTFail("held") }
        var b = h.buffers[0]
        let head = b.getBytes(at: 0, length: 16)
        _ = consume h // b is now the storage's only reference, so growing it reallocates
        XCTAssertLessThan(freePages(disk.driver), all, "the lent buffer still holds its pages")
        b.writeBytes([1, 2, 3]) // past the lent capacity: reallocated off the arena
        XCTAssertEqual(b.readableBytes, 64 * 1024 + 3)
        XCTAssertEqual(b.getBytes(at: 0, length: 16), head, "the bytes moved with it")
        XCTAssertEqual(freePages(disk.driver), all, "the moved buffer no longer holds pages")
        XCTAssertEqual(b.getBytes(at: b.writerIndex - 3, length: 3), [1, 2, 3])
    }
}
