import BlockLayer
import Dispatch
import Logging
import NIOCore
import TestSupport
import VirtioBlock
import VirtioDisk
import VirtioEmulator
import XCTest

/// The overlay over a real emulated RAM disk: random writes, trims and zeroes at unaligned
/// offsets read back as a model says, block status agrees with the reads, and the device
/// below is never written.
final class SnapshotOverlayTests: XCTestCase {
    private func wait<T: Sendable>(_ body: (@escaping @Sendable (T) -> Void) -> Void) -> T {
        let s = DispatchSemaphore(value: 0)
        let box = Box<T?>(nil)
        body { v in
            box.withLock { $0 = v }
            s.signal()
        }
        s.wait()
        return box.withLock { $0! }
    }

    func testOverlayMatchesAModelAndLeavesTheDeviceAlone() throws {
        try modelRun(.ram, "SnapshotOverlayTests.model")
    }

    /// The same over a temporary overlay file, which is unlinked at once: nothing stays behind.
    func testFileOverlayMatchesAModelAndLeavesNoFile() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("overlay-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try modelRun(.file(directory: dir), "SnapshotOverlayTests.fileModel")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "the overlay file is unlinked")
    }

    func testAnUnwritableOverlayDirectoryIsATypedError() throws {
        let device = try EmulatedDisk(
            backend: try RAMBackend(size: 1 << 20), holes: [], discardReadsZero: true, options: DriverOptions(),
            logger: Logger(label: "test"))
        defer { device.shutdown() }
        XCTAssertThrowsError(try SnapshotOverlay(over: device.device, storage: .file(directory: "/nonexistent/dir"))) {
            XCTAssertTrue("\($0)".contains("--snapshot-overlay ram"), "\($0)")
        }
    }

    private func modelRun(_ storage: SnapshotOverlay.Storage, _ seedName: String) throws {
        var rng = TestSeed.generator(seedName)
        let size: UInt64 = 1 << 20 + 1234 // a partial last block
        var log = Logger(label: "test")
        log.logLevel = .warning
        var o = DriverOptions()
        o.queues = 1
        o.completions = .threads
        let disk = try EmulatedDisk(
            backend: try RAMBackend(size: size), holes: [], discardReadsZero: true, options: o, logger: log)
        defer { disk.shutdown() }
        let device = disk.device
        // A base image with a pattern, written through the device before the overlay exists.
        var base = [UInt8](repeating: 0, count: Int(size))
        for i in base.indices { base[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        let wrote: Result<Void, BlkError> = wait { done in
            device.write(offset: 0, data: ByteBuffer(bytes: base), fua: false, done)
        }
        XCTAssertNoThrow(try wrote.get())

        let overlay = try SnapshotOverlay(over: device, storage: storage)
        XCTAssertEqual(overlay.storage, storage == .ram ? "ram" : "file")
        var model = base
        for step in 0..<300 {
            let off = UInt64.random(in: 0..<size, using: &rng)
            let len = UInt64.random(in: 1...min(size - off, 20000), using: &rng)
            let kind = Int.random(in: 0..<10, using: &rng)
            let r: Result<Void, BlkError>
            if kind < 6 {
                let bytes = rng.bytes(Int(len))
                r = wait { overlay.write(offset: off, data: ByteBuffer(bytes: bytes), fua: false, $0) }
                model.replaceSubrange(Int(off)..<Int(off + len), with: bytes)
            } else if kind < 8 {
                r = wait { overlay.writeZeroes(offset: off, length: len, mayUnmap: true, fua: false, $0) }
                model.replaceSubrange(Int(off)..<Int(off + len), with: [UInt8](repeating: 0, count: Int(len)))
            } else {
                // Trim zeroes whole blocks only (and the partial last one when it reaches the end).
                r = wait { overlay.trim(offset: off, length: len, $0) }
                let a = (off + 4095) / 4096 * 4096
                let b = off + len >= size ? size : (off + len) / 4096 * 4096
                if a < b { model.replaceSubrange(Int(a)..<Int(b), with: [UInt8](repeating: 0, count: Int(b - a))) }
            }
            XCTAssertNoThrow(try r.get(), "step \(step)")
            let qa = UInt64.random(in: 0..<size, using: &rng)
            let qn = Int.random(in: 1...Int(min(size - qa, 70000)), using: &rng)
            let read: Result<ByteBuffer, BlkError> = wait {
                overlay.read(offset: qa, length: qn, allocator: .init(), $0)
            }
            XCTAssertEqual(
                try read.get().getBytes(at: 0, length: qn), Array(model[Int(qa)..<Int(qa) + qn]), "step \(step)")
        }
        // Block status: every range said to read as zero does.
        for run in overlay.allocationRuns(0, size) where run.state.readsAsZero {
            XCTAssertTrue(model[Int(run.start)..<Int(run.end)].allSatisfy { $0 == 0 }, "\(run)")
        }
        // Sparse reads assemble to the same bytes.
        let extents: Result<[BlockDevice.Extent], BlkError> = wait {
            overlay.readExtents(offset: 0, length: Int(size), allocator: .init(), $0)
        }
        var assembled = [UInt8]()
        for e in try extents.get() {
            switch e {
            case .data(_, let b): assembled += b.getBytes(at: b.readerIndex, length: b.readableBytes)!
            case .zero(_, let n): assembled += [UInt8](repeating: 0, count: Int(n))
            }
        }
        XCTAssertEqual(assembled, model)
        // The device below still holds the base image.
        let below: Result<ByteBuffer, BlkError> = wait {
            device.read(offset: 0, length: Int(size), allocator: .init(), $0)
        }
        XCTAssertEqual(try below.get().getBytes(at: 0, length: Int(size)), base, "the device is never written")
        XCTAssertGreaterThan(overlay.overlayBytes, 0)
    }

    /// A read the overlay covers in full is answered from the overlay alone: the device sees no
    /// read (so a RAM device's untouched pages stay untouched); one block past it does.
    func testAFullyOverlaidReadDoesNotReadTheDevice() throws {
        var o = DriverOptions()
        o.queues = 1
        o.completions = .threads
        var log = Logger(label: "test")
        log.logLevel = .warning
        let disk = try EmulatedDisk(
            backend: try RAMBackend(size: 1 << 20), holes: [], discardReadsZero: true, options: o, logger: log)
        defer { disk.shutdown() }
        let overlay = try SnapshotOverlay(over: disk.device)
        let bytes = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        let wrote: Result<Void, BlkError> = wait {
            overlay.write(offset: 0, data: ByteBuffer(bytes: bytes), fua: false, $0)
        }
        XCTAssertNoThrow(try wrote.get())
        let devReads = { disk.emulator.stats.reads.load(ordering: .relaxed) }
        let before = devReads()
        for (off, len) in [(0, 65536), (100, 5000), (65535, 1), (8192, 4096)] {
            let r: Result<ByteBuffer, BlkError> = wait {
                overlay.read(offset: UInt64(off), length: len, allocator: .init(), $0)
            }
            XCTAssertEqual(try r.get().getBytes(at: 0, length: len), Array(bytes[off..<off + len]), "\(off)+\(len)")
        }
        XCTAssertEqual(devReads(), before, "reads inside the overlay went to the device")
        let past: Result<ByteBuffer, BlkError> = wait {
            overlay.read(offset: 65000, length: 1000, allocator: .init(), $0)
        }
        XCTAssertEqual(
            try past.get().getBytes(at: 0, length: 1000), Array(bytes[65000..<65536]) + Array(repeating: 0, count: 464))
        XCTAssertEqual(devReads(), before + 1, "a read past the overlay reads the device once")
    }

    func testPaintKeepsRunsConsecutive() {
        let base = [AllocationMap.Run(start: 0, end: 100, state: .data), .init(start: 100, end: 300, state: .holeZero)]
        let top = [AllocationMap.Run(start: 50, end: 150, state: .holeZero), .init(start: 200, end: 250, state: .data)]
        XCTAssertEqual(
            SnapshotOverlay.paint(top, over: base),
            [
                .init(start: 0, end: 50, state: .data), .init(start: 50, end: 200, state: .holeZero),
                .init(start: 200, end: 250, state: .data), .init(start: 250, end: 300, state: .holeZero),
            ])
    }
}
