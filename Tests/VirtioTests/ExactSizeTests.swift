import Foundation
import NIOCore
import TestSupport
import Virtio
import VirtioBlock
import VirtioDisk
import XCTest

@testable import VirtioEmulator

#if canImport(Glibc)
    import Glibc
#endif

/// Exports whose size is not a multiple of 4 KiB (or of a sector) are served to the byte: the
/// partial last block is read and read-modify-written like any edge block, block status ends at
/// the exact size, and no device request goes past the device's capacity.
///
/// The random workloads print their seed; set EXACT_SIZE_SEED=<n> to replay one.
final class ExactSizeTests: XCTestCase {
    static let sizes: [UInt64] = [1, 511, 1000, 4095, 4097, 5000, 10000, 10240, 12288]

    /// The device shapes the workloads run over: multi-page requests with WRITE_ZEROES/DISCARD,
    /// and one-page requests (segMax 1) with neither (zeroing by writing, trim a no-op).
    struct Cell: CustomStringConvertible {
        var segMax: UInt32
        var sectorCommands: Bool
        var description: String { "segMax \(segMax)\(sectorCommands ? "" : ", no discard/write-zeroes")" }
    }
    static let cells = [Cell(segMax: 254, sectorCommands: true), Cell(segMax: 1, sectorCommands: false)]

    struct Rig {
        let disk: EmulatedDisk
        var emu: VirtioBlkEmulator { disk.emulator }
        var driver: VirtioBlkDriver { disk.driver }
        var dev: BlockDevice { disk.device }
        func stop() { disk.shutdown() }
    }

    /// An `EmulatedDisk` on `backend` (the exact size unless `exactSize` is false: then the
    /// export is the device capacity).
    func rig(_ backend: BlockBackend, cell: Cell = cells[0], holes: [Range<UInt64>], exactSize: Bool = true) throws
        -> Rig
    {
        var cfg = EmulatorConfiguration()
        cfg.segMax = cell.segMax
        cfg.queues = 1
        if !cell.sectorCommands {
            cfg.features.remove(.blkDiscard)
            cfg.features.remove(.blkWriteZeroes)
        }
        var o = DriverOptions()
        o.queueSize = 64
        o.ioPages = 256
        return Rig(
            disk: try EmulatedDisk(
                backend: backend, configuration: cfg, options: o, holes: holes, discardReadsZero: true,
                exactSize: exactSize))
    }

    static var baseSeed: UInt64 {
        if let s = ProcessInfo.processInfo.environment["EXACT_SIZE_SEED"], let v = UInt64(s) { return v }
        return 0x5EED_0E5A_C751_2E00
    }

    // MARK: synchronous wrappers

    func wait<T>(_ body: (@escaping @Sendable (Result<T, BlkError>) -> Void) -> Void) -> Result<T, BlkError> {
        let sem = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var out: Result<T, BlkError>?
        body {
            out = $0
            sem.signal()
        }
        XCTAssertEqual(sem.wait(timeout: .now() + 30), .success, "a block request did not complete")
        return out ?? .failure(.shutdown) // the assertion above has failed
    }
    func read(_ d: BlockDevice, _ off: UInt64, _ len: Int) -> Result<[UInt8], BlkError> {
        wait { d.read(offset: off, length: len, $0) }.map { b in
            var b = b
            return b.readBytes(length: b.readableBytes)!
        }
    }
    func write(_ d: BlockDevice, _ off: UInt64, _ bytes: [UInt8]) -> Result<Void, BlkError> {
        wait { d.write(offset: off, data: ByteBuffer(bytes: bytes), fua: false, $0) }
    }
    /// A sparse read flattened to bytes.
    func readExtents(_ d: BlockDevice, _ off: UInt64, _ len: Int) -> Result<[UInt8], BlkError> {
        wait { d.readExtents(offset: off, length: len, $0) }.map { extents in
            var out: [UInt8] = []
            for e in extents {
                switch e {
                case .data(let o, var b):
                    XCTAssertEqual(o, off + UInt64(out.count))
                    out += b.readBytes(length: b.readableBytes)!
                case .zero(let o, let n):
                    XCTAssertEqual(o, off + UInt64(out.count))
                    out += [UInt8](repeating: 0, count: Int(n))
                }
            }
            return out
        }
    }

    /// Block status over the whole export: contiguous from 0, ending exactly at the size, and
    /// every range it calls zero reads as zero in the model.
    func checkBlockStatus(_ d: BlockDevice, model: [UInt8], _ what: String) {
        let runs = d.allocation.extents(0, d.size)
        XCTAssertEqual(runs.first?.start ?? 0, 0, "\(what): block status starts at 0")
        XCTAssertEqual(runs.last?.end ?? 0, UInt64(model.count), "\(what): block status ends at the exact size")
        for (a, b) in zip(runs, runs.dropFirst()) {
            XCTAssertEqual(a.end, b.start, "\(what): block status is contiguous")
        }
        for r in runs where r.state.readsAsZero {
            XCTAssertTrue(
                model[Int(r.start)..<Int(r.end)].allSatisfy { $0 == 0 },
                "\(what): [\(r.start), \(r.end)) is reported zero but holds data")
        }
    }

    /// Random unaligned reads, writes, zeroing and trims against a byte model, biased towards
    /// the export's end. Trim is advisory, so the model treats the whole blocks it may discard
    /// (and the partial last block when the range reaches the end) as either old bytes or zero:
    /// it only has to read back as one of them, and the model takes what was read.
    func workload(_ r: Rig, size: UInt64, seed: UInt64, ops: Int, what: String) -> [UInt8] {
        var rng = SplitMix(seed: seed)
        var model = [UInt8](repeating: 0, count: Int(size))
        let dev = r.dev
        XCTAssertEqual(dev.size, size, "\(what): export size")
        func pick() -> (UInt64, Int) {
            let maxLen = UInt64(3 * 4096 + 100)
            let off: UInt64
            let len: UInt64
            switch rng.next() % 4 {
            case 0: // ends exactly at the end
                len = min(size, 1 + rng.next() % maxLen)
                off = size - len
            case 1: // starts inside the last 4 KiB block or sector
                off = BlockDevice.down(size - 1) + rng.next() % (size - BlockDevice.down(size - 1))
                len = 1 + rng.next() % (size - off)
            default:
                off = rng.next() % size
                len = 1 + rng.next() % min(maxLen, size - off)
            }
            return (off, Int(len))
        }
        for step in 0..<ops {
            let (off, len) = pick()
            let at = "\(what), step \(step): [\(off), \(off + UInt64(len)))"
            switch rng.next() % 10 {
            case 0...2:
                let bytes = rng.bytes(len)
                guard case .success = write(dev, off, bytes) else {
                    XCTFail("\(at): write failed")
                    return model
                }
                model.replaceSubrange(Int(off)..<Int(off) + len, with: bytes)
            case 3:
                let unmap = rng.next() % 2 == 0
                guard
                    case .success = wait({
                        dev.writeZeroes(offset: off, length: UInt64(len), mayUnmap: unmap, fua: false, $0)
                    })
                else {
                    XCTFail("\(at): write-zeroes failed")
                    return model
                }
                model.replaceSubrange(Int(off)..<Int(off) + len, with: [UInt8](repeating: 0, count: len))
            case 4:
                guard case .success = wait({ dev.trim(offset: off, length: UInt64(len), $0) }) else {
                    XCTFail("\(at): trim failed")
                    return model
                }
                let lo = Int(BlockDevice.up(off))
                let end = Int(off) + len
                let hi = min(
                    Int(size), end == Int(size) ? Int(BlockDevice.up(UInt64(end))) : Int(BlockDevice.down(UInt64(end))))
                if lo < hi {
                    guard case .success(let got) = read(dev, UInt64(lo), hi - lo) else {
                        XCTFail("\(at): read after trim failed")
                        return model
                    }
                    for i in 0..<got.count where got[i] != 0 && got[i] != model[lo + i] {
                        XCTFail(
                            "\(at): byte \(lo + i) after trim is \(got[i]), neither zero nor the old \(model[lo + i])")
                        return model
                    }
                    model.replaceSubrange(lo..<hi, with: got)
                }
            case 5...7:
                guard case .success(let got) = read(dev, off, len) else {
                    XCTFail("\(at): read failed")
                    return model
                }
                if got != Array(model[Int(off)..<Int(off) + len]) {
                    let i =
                        zip(got, model[Int(off)...]).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? 0
                    XCTFail("\(at): read differs from the model at byte \(off + UInt64(i))")
                    return model
                }
            default:
                guard case .success(let got) = readExtents(dev, off, len) else {
                    XCTFail("\(at): sparse read failed")
                    return model
                }
                XCTAssertEqual(
                    got, Array(model[Int(off)..<Int(off) + len]), "\(at): sparse read differs from the model")
            }
            if step % 50 == 0 { checkBlockStatus(dev, model: model, at) }
        }
        // The whole export, then the bounds: the last byte is reachable, one past it is not.
        XCTAssertEqual(try? read(dev, 0, Int(size)).get(), model, "\(what): full read")
        checkBlockStatus(dev, model: model, "\(what): at the end")
        if case .success = read(dev, size - 1, 2) { XCTFail("\(what): a read past the end succeeded") }
        if case .success = write(dev, size, [1]) { XCTFail("\(what): a write at the end succeeded") }
        XCTAssertEqual(try? read(dev, size, 0).get(), [], "\(what): an empty read at the end")
        XCTAssertEqual(
            r.emu.stats.ioErrors.load(ordering: .relaxed), 0, "\(what): the device saw a request past its capacity")
        return model
    }

    func testRAMExportsOfUnalignedSizesMatchAByteModel() throws {
        for (ci, cell) in Self.cells.enumerated() {
            for (si, size) in Self.sizes.enumerated() {
                let seed = Self.baseSeed &+ UInt64(ci * 100 + si)
                let what = "RAM \(size) bytes, \(cell), seed \(seed) (EXACT_SIZE_SEED=\(Self.baseSeed))"
                print("ExactSizeTests: \(what)")
                let ram = try RAMBackend(size: size)
                let r = try rig(ram, cell: cell, holes: [0..<size])
                XCTAssertEqual(r.driver.capacityBytes, (size + 511) & ~511, "\(what): capacity in whole sectors")
                let model = workload(r, size: size, seed: seed, ops: 400, what: what)
                r.stop()
                XCTAssertEqual(
                    ram.store.bytes(at: 0, count: Int(size)), model, "\(what): the RAM backend holds the model")
            }
        }
    }

    /// A 10,000-byte file: served to its last byte, never grown, left holding what was written.
    func testFileOfUnalignedSizeIsServedExactlyAndNeverGrows() throws {
        for (ci, cell) in Self.cells.enumerated() {
            for size: UInt64 in [1, 1000, 10000] {
                let seed = Self.baseSeed &+ UInt64(1000 + ci * 100 + Int(size % 97))
                let what = "file \(size) bytes, \(cell), seed \(seed) (EXACT_SIZE_SEED=\(Self.baseSeed))"
                print("ExactSizeTests: \(what)")
                let path = NSTemporaryDirectory() + "virtnbd-exact-\(getpid())-\(ci)-\(size).img"
                defer { unlink(path) }
                XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
                XCTAssertEqual(truncate(path, off_t(size)), 0)
                let f = try FileBackend(path: path, readOnly: false)
                XCTAssertEqual(f.size, size, "\(what): backend size")
                let r = try rig(f, cell: cell, holes: f.holes())
                let model = workload(r, size: size, seed: seed, ops: 300, what: what)
                r.stop()
                let contents = try Data(contentsOf: URL(fileURLWithPath: path))
                XCTAssertEqual(UInt64(contents.count), size, "\(what): the file kept its size")
                XCTAssertEqual([UInt8](contents), model, "\(what): the file holds the model")
            }
        }
    }

    /// A device whose capacity is whole sectors but not whole 4 KiB blocks (a 10240-byte
    /// vhost-user image; here the emulator's capacity with no separate size): the export is the
    /// capacity, and requests for the last block stop at it.
    func testCapacityOfWholeSectorsIsExportedWholly() throws {
        for size: UInt64 in [512, 10240, 4096 + 3584] {
            let seed = Self.baseSeed &+ 2000 &+ size
            let what = "capacity \(size) bytes, seed \(seed) (EXACT_SIZE_SEED=\(Self.baseSeed))"
            print("ExactSizeTests: \(what)")
            let r = try rig(try RAMBackend(size: size), holes: [], exactSize: false)
            XCTAssertEqual(r.dev.size, size)
            _ = workload(r, size: size, seed: seed, ops: 300, what: what)
            r.stop()
        }
    }

    /// Without the separate size the emulator's export would be the capacity rounded up to a sector.
    func testEmulatorCapacityRoundsUpAndPadsWithZeroes() throws {
        let ram = try RAMBackend(size: 1000)
        let r = try rig(ram, holes: [], exactSize: false)
        XCTAssertEqual(r.dev.size, 1024)
        XCTAssertNoThrow(try write(r.dev, 0, [UInt8](repeating: 0xAB, count: 1024)).get())
        // Bytes 1000..<1024 are past the backend's end: dropped on write, zero on read.
        XCTAssertEqual(
            try read(r.dev, 990, 34).get(), [UInt8](repeating: 0xAB, count: 10) + [UInt8](repeating: 0, count: 24))
        XCTAssertEqual(ram.store.bytes(at: 0, count: 1000), [UInt8](repeating: 0xAB, count: 1000))
        r.stop()
    }

    /// A device that shrinks to a size that is not whole blocks: the export follows it exactly.
    func testShrinkToAnUnalignedCapacity() throws {
        let r = try rig(try RAMBackend(size: 10000), holes: [0..<10000])
        XCTAssertEqual(r.dev.size, 10000)
        r.emu.setCapacity(bytes: 5000) // whole sectors: 4608
        let deadline = Date() + 10
        while r.dev.size != 4608 && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertEqual(r.dev.size, 4608)
        XCTAssertNoThrow(try write(r.dev, 4600, [1, 2, 3, 4, 5, 6, 7, 8]).get())
        XCTAssertEqual(try read(r.dev, 4096, 512).get(), [UInt8](repeating: 0, count: 504) + [1, 2, 3, 4, 5, 6, 7, 8])
        if case .success = read(r.dev, 4608, 1) { XCTFail("a read past the shrunk end succeeded") }
        XCTAssertNoThrow(
            try wait({ r.dev.writeZeroes(offset: 4096, length: 512, mayUnmap: true, fua: false, $0) }).get())
        XCTAssertEqual(try read(r.dev, 4096, 512).get(), [UInt8](repeating: 0, count: 512))
        XCTAssertEqual(r.dev.allocation.extents(0, r.dev.size).last?.end, 4608)
        XCTAssertEqual(r.emu.stats.ioErrors.load(ordering: .relaxed), 0)
        r.stop()
    }

    /// A one-byte export works; empty ones are refused with a message that says so.
    func testOneByteAndEmptyExports() throws {
        let r = try rig(try RAMBackend(size: 1), holes: [0..<1])
        XCTAssertEqual(r.dev.size, 1)
        XCTAssertEqual(try read(r.dev, 0, 1).get(), [0])
        XCTAssertNoThrow(try write(r.dev, 0, [0x5A]).get())
        XCTAssertEqual(try read(r.dev, 0, 1).get(), [0x5A])
        XCTAssertEqual(r.dev.allocation.extents(0, 1).map(\.end), [1])
        r.stop()

        XCTAssertThrowsError(try RAMBackend(size: 0)) { e in
            XCTAssertTrue("\(e)".contains("at least 1 byte"), "\(e)")
        }
        let path = NSTemporaryDirectory() + "virtnbd-empty-\(getpid()).img"
        defer { unlink(path) }
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
        XCTAssertThrowsError(try FileBackend(path: path, readOnly: false)) { e in
            XCTAssertTrue("\(e)".contains("is empty; an export needs at least 1 byte"), "\(e)")
        }
    }
}
