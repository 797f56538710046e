import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Virtio
import VirtioBlock
import VirtioDisk
import XCTest

@testable import VirtioEmulator

/// The real driver and block layer against the emulator on its own thread.
final class DriverTests: XCTestCase {
    struct Rig {
        let disk: EmulatedDisk
        var emu: VirtioBlkEmulator { disk.emulator }
        var driver: VirtioBlkDriver { disk.driver }
        var dev: BlockDevice { disk.device }
        func stop() { disk.shutdown() }
    }
    func rig(
        size: UInt64 = 4 << 20, order: EmulatorConfiguration.CompletionOrder = .reversed, queueSize: Int = 64,
        features: VirtioFeatures? = nil, readOnly: Bool = false
    ) throws -> Rig {
        var cfg = EmulatorConfiguration()
        cfg.completionOrder = order
        if let f = features { cfg.features = f }
        var o = DriverOptions()
        o.queueSize = queueSize
        o.ioPages = 512
        return Rig(
            disk: try EmulatedDisk(
                backend: try RAMBackend(size: size, readOnly: readOnly), configuration: cfg, options: o))
    }

    func read(_ d: BlockDevice, _ off: UInt64, _ len: Int) throws -> [UInt8] {
        let e = expectation(description: "read")
        nonisolated(unsafe) var out: Result<ByteBuffer, BlkError>!
        d.read(offset: off, length: len) {
            out = $0
            e.fulfill()
        }
        wait(for: [e], timeout: 30)
        var b = try out.get()
        return b.readBytes(length: b.readableBytes)!
    }
    func write(_ d: BlockDevice, _ off: UInt64, _ bytes: [UInt8], fua: Bool = false) throws {
        let e = expectation(description: "write")
        nonisolated(unsafe) var out: Result<Void, BlkError>!
        d.write(offset: off, data: ByteBuffer(bytes: bytes), fua: fua) {
            out = $0
            e.fulfill()
        }
        wait(for: [e], timeout: 30)
        try out.get()
    }

    func testNegotiatedGeometry() throws {
        let r = try rig()
        XCTAssertEqual(r.driver.geometry.capacityBytes, 4 << 20)
        XCTAssertEqual(r.driver.geometry.blockSize, 4096)
        XCTAssertTrue(r.driver.geometry.canFlush && r.driver.geometry.canDiscard && r.driver.geometry.canWriteZeroes)
        XCTAssertTrue(r.driver.negotiated.contains(.version1))
        r.stop()
    }

    /// Many requests in flight at once, completed by the device in reverse order, checked against a model.
    func testConcurrentRandomIOAgainstModel() throws {
        let r = try rig()
        var model = [UInt8](repeating: 0, count: 4 << 20)
        var rng = TestSeed.generator("DriverTests.testConcurrentRandomIOAgainstModel")
        for round in 0..<6 {
            // Disjoint random writes in flight together (distinct 64 KiB windows).
            let windows = Array((0..<64).shuffled(using: &rng).prefix(16))
            let g = DispatchGroup()
            let errors = NIOLockedValueBox(0)
            for w in windows {
                let off = w * 65536 + Int.random(in: 0..<4096, using: &rng)
                let len = Int.random(in: 1...(60000), using: &rng)
                let bytes = rng.bytes(len)
                model.replaceSubrange(off..<off + len, with: bytes)
                g.enter()
                r.dev.write(offset: UInt64(off), data: ByteBuffer(bytes: bytes), fua: round % 5 == 0) { res in
                    if case .failure = res { errors.withLockedValue { $0 += 1 } }
                    g.leave()
                }
            }
            XCTAssertEqual(g.wait(timeout: .now() + 30), .success)
            XCTAssertEqual(errors.withLockedValue { $0 }, 0)
        }
        XCTAssertTrue(sameBytes(try read(r.dev, 0, 4 << 20), model), "read-back differs from the model")
        r.stop()
    }

    /// Unaligned writes that share a 4 KiB block, in flight together: the read-modify-write of one
    /// must never undo the other.
    func testOverlappingReadModifyWritesNeverTear() throws {
        let r = try rig()
        for _ in 0..<8 {
            let g = DispatchGroup()
            // 256 writes of 64 bytes each, all inside blocks 0..3, all at once.
            for i in 0..<256 {
                g.enter()
                r.dev.write(
                    offset: UInt64(i * 64), data: ByteBuffer(bytes: [UInt8](repeating: UInt8(i & 0xFF) | 1, count: 64)),
                    fua: false
                ) { _ in g.leave() }
            }
            XCTAssertEqual(g.wait(timeout: .now() + 30), .success)
            let got = try read(r.dev, 0, 256 * 64)
            for i in 0..<256 {
                XCTAssertEqual(
                    got[(i * 64)..<(i * 64 + 64)].allSatisfy { $0 == UInt8(i & 0xFF) | 1 }, true, "chunk \(i) torn")
            }
            try write(r.dev, 0, [UInt8](repeating: 0, count: 256 * 64))
        }
        XCTAssertEqual(r.dev.locks.heldCount, 0)
        r.stop()
    }

    func testUnalignedEdgesAndNeighbours() throws {
        let r = try rig()
        try write(r.dev, 0, [UInt8](repeating: 0xEE, count: 3 * 4096))
        for (off, len) in [(1, 1), (511, 2), (4095, 2), (4097, 4095), (100, 8000), (8191, 1)] {
            try write(r.dev, UInt64(off), [UInt8](repeating: 0x11, count: len))
            let got = try read(r.dev, 0, 3 * 4096)
            for i in 0..<(3 * 4096) {
                let want: UInt8 = (off..<off + len).contains(i) ? 0x11 : 0xEE
                if got[i] != want {
                    XCTFail("byte \(i) after write \(off)+\(len): \(got[i]) != \(want)")
                    break
                }
            }
            try write(r.dev, 0, [UInt8](repeating: 0xEE, count: 3 * 4096))
        }
        r.stop()
    }

    func testTrimAndWriteZeroes() throws {
        let r = try rig()
        try write(r.dev, 0, [UInt8](repeating: 0x77, count: 64 << 10))
        let e = expectation(description: "zero")
        r.dev.writeZeroes(offset: 100, length: 20000, mayUnmap: true, fua: true) {
            if case .failure(let err) = $0 { XCTFail("\(err)") }
            e.fulfill()
        }
        wait(for: [e], timeout: 10)
        let got = try read(r.dev, 0, 64 << 10)
        XCTAssertTrue(got[0..<100].allSatisfy { $0 == 0x77 })
        XCTAssertTrue(got[100..<20100].allSatisfy { $0 == 0 })
        XCTAssertTrue(got[20100...].allSatisfy { $0 == 0x77 })
        XCTAssertTrue(sameBytes(try deviceRead(r, sector: 0, pages: 16), got), "the device holds the zeroes")
        let t = expectation(description: "trim")
        r.dev.trim(offset: 0, length: 64 << 10) {
            if case .failure(let err) = $0 { XCTFail("\(err)") }
            t.fulfill()
        }
        wait(for: [t], timeout: 10)
        XCTAssertEqual(r.emu.stats.discards.load(ordering: .relaxed), 1)
        XCTAssertEqual(
            try read(r.dev, 0, 64 << 10), [UInt8](repeating: 0, count: 64 << 10), "RAM backend reads zero after discard"
        )
        XCTAssertTrue(
            sameBytes(try deviceRead(r, sector: 0, pages: 16), [UInt8](repeating: 0, count: 64 << 10)),
            "the device reads zero after discard")
        r.stop()
    }

    /// `pages` pages from `sector` as the device holds them: a driver READ, past the block
    /// layer's allocation map (which may answer a range it knows is zero without the device).
    func deviceRead(_ r: Rig, sector: UInt64, pages: Int) throws -> [UInt8] {
        let e = expectation(description: "device read")
        nonisolated(unsafe) var out: Result<[UInt8], BlkError>!
        r.driver.submit(.read(sector: sector, pages: pages)) { res in
            out = res.map { io in (0..<pages).flatMap { io.memory.bytes(at: io.offset(ofPage: $0), count: 4096) } }
            e.fulfill()
        }
        wait(for: [e], timeout: 30)
        return try out.get()
    }

    func testWriteZeroesFallsBackWithoutDeviceSupport() throws {
        let r = try rig(features: [.version1, .blkSizeMax, .blkSegMax, .blkBlkSize, .blkFlush])
        XCTAssertFalse(r.driver.geometry.canWriteZeroes)
        try write(r.dev, 0, [UInt8](repeating: 0x55, count: 3 << 20))
        let e = expectation(description: "zero")
        r.dev.writeZeroes(offset: 4096, length: 2 << 20, mayUnmap: true, fua: false) {
            if case .failure(let err) = $0 { XCTFail("\(err)") }
            e.fulfill()
        }
        wait(for: [e], timeout: 10)
        let got = try read(r.dev, 0, 3 << 20)
        XCTAssertTrue(got[0..<4096].allSatisfy { $0 == 0x55 })
        XCTAssertTrue(got[4096..<(4096 + (2 << 20))].allSatisfy { $0 == 0 })
        XCTAssertTrue(got[(4096 + (2 << 20))...].allSatisfy { $0 == 0x55 })
        XCTAssertEqual(r.emu.stats.writeZeroes.load(ordering: .relaxed), 0)
        r.stop()
    }

    func testTypedErrors() throws {
        let r = try rig(size: 1 << 20)
        // Past the end, caught before the device.
        let e1 = expectation(description: "range")
        r.dev.read(offset: (1 << 20) - 10, length: 20) { res in
            if case .failure(.outOfRange) = res {} else { XCTFail("expected .outOfRange, got \(res)") }
            e1.fulfill()
        }
        // Past the end at the device: IOERR.
        let e2 = expectation(description: "ioerr")
        r.driver.submit(.read(sector: 4096, pages: 1)) { res in
            if case .failure(.ioError) = res {} else { XCTFail("expected .ioError") }
            e2.fulfill()
        }
        wait(for: [e1, e2], timeout: 10)
        r.stop()
        // Read-only device.
        let ro = try rig(readOnly: true)
        XCTAssertTrue(ro.driver.geometry.readOnly)
        let e3 = expectation(description: "ro")
        ro.dev.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false) { res in
            if case .failure(.readOnly) = res {} else { XCTFail("expected .readOnly") }
            e3.fulfill()
        }
        let e4 = expectation(description: "ro-device")
        ro.driver.submit(.write(sector: 0, pages: 1)) { res in
            if case .failure(.ioError) = res {} else { XCTFail("device must refuse writes") }
            e4.fulfill()
        }
        wait(for: [e3, e4], timeout: 10)
        ro.stop()
    }

    func testGetID() throws {
        let r = try rig()
        let e = expectation(description: "id")
        r.driver.submit(.getID) { res in
            guard case .success(let io) = res else { return XCTFail("GET_ID failed") }
            let bytes = io.memory.bytes(at: io.offset(ofPage: 0), count: 20)
            XCTAssertEqual(String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self), "virtnbd-emulator")
            e.fulfill()
        }
        wait(for: [e], timeout: 10)
        r.stop()
    }

    /// 70 000 requests through a small queue: avail and used indices wrap past 65535.
    func testIndexWraparoundThroughTheDriver() throws {
        let r = try rig(size: 1 << 20, order: .inOrder, queueSize: 16)
        let total = 70_000
        let sem = DispatchSemaphore(value: 12)
        let g = DispatchGroup()
        let failures = NIOLockedValueBox(0)
        for i in 0..<total {
            sem.wait()
            g.enter()
            r.driver.submit(.read(sector: UInt64(i % 256) * 8, pages: 1)) { res in
                if case .failure = res { failures.withLockedValue { $0 += 1 } }
                sem.signal()
                g.leave()
            }
        }
        XCTAssertEqual(g.wait(timeout: .now() + 120), .success)
        XCTAssertEqual(failures.withLockedValue { $0 }, 0)
        XCTAssertEqual(r.emu.stats.reads.load(ordering: .relaxed), total)
        r.stop()
    }

    func testShutdownFlushesAndRefusesNewWork() throws {
        let r = try rig()
        try write(r.dev, 0, [1, 2, 3])
        r.driver.shutdown()
        XCTAssertGreaterThanOrEqual(r.emu.stats.flushes.load(ordering: .relaxed), 1)
        let e = expectation(description: "refused")
        r.driver.submit(.flush) { res in
            if case .failure(.shutdown) = res {} else { XCTFail("expected .shutdown") }
            e.fulfill()
        }
        wait(for: [e], timeout: 5)
        r.emu.shutdown()
    }
}
