import TestSupport
import Virtio
import XCTest

@testable import VirtioEmulator

/// A bare driver for hostile tests: sets the emulator up through its registers, then writes raw
/// descriptors and avail entries by hand, bypassing every check the real driver makes.
final class RawDriver {
    let emu: VirtioBlkEmulator
    let arena: DMAArena
    let size: Int
    let desc: DMARegion, avail: DMARegion, used: DMARegion
    let data: DMARegion
    var availIdx: UInt16 = 0
    var usedSeen: UInt16 = 0
    var mem: SharedMemory { arena.memory }

    init(
        backend: BlockBackend, size: Int = 64,
        features: VirtioFeatures = [.version1, .blkFlush, .blkDiscard, .blkWriteZeroes]
    ) throws {
        emu = try VirtioBlkEmulator(backend: backend)
        arena = try DMAArena(structureBytes: 256 << 10, ioPages: 0)
        self.size = size
        let l = SplitRingLayout(size: size)
        desc = try arena.allocate(l.descriptorTableBytes, alignment: 16)
        avail = try arena.allocate(l.availBytes, alignment: 2)
        used = try arena.allocate(l.usedBytes, alignment: 4)
        data = try arena.allocate(128 << 10, alignment: 4096)
        try emu.attachMemory(arena.memory)
        emu.write32(MMIORegister.status, 0)
        emu.write32(MMIORegister.status, 3)
        emu.write32(MMIORegister.driverFeaturesSel, 0)
        emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue))
        emu.write32(MMIORegister.driverFeaturesSel, 1)
        emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue >> 32))
        emu.write32(MMIORegister.status, 11)
        precondition(emu.read32(MMIORegister.status) & 8 != 0)
        emu.write32(MMIORegister.queueSel, 0)
        emu.write32(MMIORegister.queueNum, UInt32(size))
        for (r, a) in [
            (MMIORegister.queueDescLow, desc.deviceAddress), (MMIORegister.queueDriverLow, avail.deviceAddress),
            (MMIORegister.queueDeviceLow, used.deviceAddress),
        ] {
            emu.write32(r, UInt32(truncatingIfNeeded: a))
            emu.write32(r + 4, UInt32(truncatingIfNeeded: a >> 32))
        }
        emu.write32(MMIORegister.queueReady, 1)
        precondition(emu.read32(MMIORegister.queueReady) == 1)
        emu.write32(MMIORegister.status, 15)
    }

    func setDesc(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let o = desc.offset + 16 * i
        mem.store64(o, addr)
        mem.store32(o + 8, len)
        mem.store16(o + 12, flags)
        mem.store16(o + 14, next)
    }
    /// Address of byte `o` in the data area.
    func addr(_ o: Int) -> UInt64 { data.deviceAddress + UInt64(o) }
    func dataOffset(_ o: Int) -> Int { data.offset + o }

    func submit(_ heads: [UInt16]) {
        for h in heads {
            mem.store16(avail.offset + 4 + 2 * (Int(availIdx) % size), h)
            availIdx &+= 1
        }
        Fence.release()
        mem.store16Release(avail.offset + 2, availIdx)
        emu.write32(MMIORegister.queueNotify, 0)
    }

    /// Waits for `n` used elements (interrupt eventfd, bounded), returns (id, len) in order.
    func waitUsed(_ n: Int, file: StaticString = #filePath, line: UInt = #line) -> [(UInt32, UInt32)] {
        var out: [(UInt32, UInt32)] = []
        let stop = try! EventFD()
        var spins = 0
        while out.count < n && spins < 2000 {
            _ = emu.interrupt.wait(orUntil: stop, timeoutMilliseconds: 10)
            emu.interrupt.drain()
            let idx = mem.load16Acquire(used.offset + 2)
            while usedSeen != idx {
                let e = used.offset + 4 + 8 * (Int(usedSeen) % size)
                out.append((mem.load32(e), mem.load32(e + 4)))
                usedSeen &+= 1
            }
            spins += 1
        }
        XCTAssertEqual(out.count, n, "device answered \(out.count) of \(n) chains", file: file, line: line)
        return out
    }

    /// A well-formed 4 KiB read of `sector` using descriptors base..base+2; returns (status, data).
    func goodRead(base: Int = 0, sector: UInt64) -> (UInt8, [UInt8]) {
        mem.store32(dataOffset(0), 0)
        mem.store32(dataOffset(4), 0)
        mem.store64(dataOffset(8), sector)
        mem.store8(dataOffset(32), 0xFF)
        setDesc(base, addr: addr(0), len: 16, flags: 1, next: UInt16(base + 1))
        setDesc(base + 1, addr: addr(4096), len: 4096, flags: 3, next: UInt16(base + 2))
        setDesc(base + 2, addr: addr(32), len: 1, flags: 2, next: 0)
        submit([UInt16(base)])
        _ = waitUsed(1)
        return (mem.load8(dataOffset(32)), mem.bytes(at: dataOffset(4096), count: 4096))
    }
}

final class EmulatorTests: XCTestCase {
    func testValidReadWriteThroughRawChains() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20))
        // OUT: header, 4 KiB of 0x5A, status.
        d.mem.store32(d.dataOffset(0), 1)
        d.mem.store64(d.dataOffset(8), 8)
        d.mem.write([UInt8](repeating: 0x5A, count: 4096), at: d.dataOffset(8192))
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: d.addr(8192), len: 4096, flags: 1, next: 2)
        d.setDesc(2, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.submit([0])
        let u = d.waitUsed(1)
        XCTAssertEqual(u.first?.0, 0)
        XCTAssertEqual(d.mem.load8(d.dataOffset(32)), BlkStatus.ok)
        let (st, bytes) = d.goodRead(base: 3, sector: 8)
        XCTAssertEqual(st, BlkStatus.ok)
        XCTAssertEqual(bytes, [UInt8](repeating: 0x5A, count: 4096))
        d.emu.shutdown()
    }

    func testSpecificHostileChainsGetIOERR() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20))
        func status() -> UInt8 { d.mem.load8(d.dataOffset(32)) }
        func header(type: UInt32, sector: UInt64) {
            d.mem.store32(d.dataOffset(0), type)
            d.mem.store64(d.dataOffset(8), sector)
            d.mem.store8(d.dataOffset(32), 0xFF)
        }

        // Loop: 0 -> 1 -> 2 -> 1 ... with a writable status in the loop.
        header(type: 0, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: d.addr(32), len: 1, flags: 3, next: 2)
        d.setDesc(2, addr: d.addr(64), len: 8, flags: 3, next: 1)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.ioErr, "a looping chain is IOERR")

        // Buffer outside memory.
        header(type: 0, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: 0xFFFF_FFFF_FFFF_F000, len: 4096, flags: 3, next: 2)
        d.setDesc(2, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(d.mem.load8(d.dataOffset(32)), 0xFF, "status not written when the walk fails before it")

        // Readable after writable.
        header(type: 1, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: d.addr(32), len: 1, flags: 3, next: 2)
        d.setDesc(2, addr: d.addr(4096), len: 512, flags: 0, next: 0)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.ioErr)

        // Read past capacity.
        header(type: 0, sector: 2048)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: d.addr(4096), len: 4096, flags: 3, next: 2)
        d.setDesc(2, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.submit([0])
        let u = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.ioErr)
        XCTAssertEqual(u.first?.1, 1)

        // Sector overflow: sector * 512 wraps.
        header(type: 0, sector: UInt64.max / 256)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.ioErr)

        // Data not a multiple of 512.
        header(type: 0, sector: 0)
        d.setDesc(1, addr: d.addr(4096), len: 100, flags: 3, next: 2)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.ioErr)

        // Unknown type → UNSUPP; DISCARD with unmap set → UNSUPP.
        header(type: 77, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 2)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.unsupp)
        header(type: 11, sector: 0)
        d.mem.store64(d.dataOffset(16), 0)
        d.mem.store32(d.dataOffset(24), 8)
        d.mem.store32(d.dataOffset(28), 1)
        d.setDesc(0, addr: d.addr(0), len: 32, flags: 1, next: 2)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(), BlkStatus.unsupp)

        // Indirect (not negotiated).
        header(type: 0, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        d.setDesc(1, addr: d.addr(8192), len: 48, flags: 4, next: 0)
        d.submit([0])
        let u2 = d.waitUsed(1)
        XCTAssertEqual(u2.first?.1, 0, "no writable byte seen: nothing written")

        // No status byte at all.
        header(type: 0, sector: 0)
        d.setDesc(0, addr: d.addr(0), len: 16, flags: 0, next: 0)
        d.submit([0])
        let u3 = d.waitUsed(1)
        XCTAssertEqual(u3.first?.1, 0)

        XCTAssertGreaterThan(d.emu.stats.badChains.load(ordering: .relaxed), 3)
        let (st, _) = d.goodRead(base: 10, sector: 0)
        XCTAssertEqual(st, BlkStatus.ok, "the device lives on after hostile chains")
        d.emu.shutdown()
    }

    /// Thousands of random chains: every one is answered, none crashes the device, and a good request still works.
    func testThousandsOfRandomHostileChains() throws {
        var rng = TestSeed.generator("EmulatorTests.testThousandsOfRandomHostileChains")
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20), size: 64)
        let base = d.mem.deviceBase
        var answered = 0
        for _ in 0..<200 {
            // Random table (descriptors 0..<60); heads only from valid indices so the queue stays usable.
            for i in 0..<60 {
                let choice = Int.random(in: 0..<5, using: &rng)
                let addr: UInt64 =
                    choice == 0
                    ? UInt64.random(in: 0...UInt64.max, using: &rng)
                    : choice == 1
                        ? base + UInt64(d.mem.size) - UInt64.random(in: 0...64, using: &rng)
                        : d.addr(Int.random(in: 0..<(120 << 10), using: &rng))
                let len: UInt32 =
                    Bool.random(using: &rng)
                    ? UInt32.random(in: 0...8192, using: &rng) : UInt32.random(in: 0...UInt32.max, using: &rng)
                d.setDesc(
                    i, addr: addr, len: len, flags: UInt16.random(in: 0...7, using: &rng),
                    next: UInt16.random(in: 0...70, using: &rng))
            }
            // Random headers in the data area so some chains parse as real requests.
            for k in 0..<16 { d.mem.store32(d.dataOffset(k * 4), UInt32.random(in: 0...14, using: &rng)) }
            let heads = (0..<Int.random(in: 1...32, using: &rng)).map { _ in UInt16.random(in: 0..<60, using: &rng) }
            d.submit(heads)
            let u = d.waitUsed(heads.count)
            answered += u.count
            XCTAssertTrue(u.allSatisfy { Int($0.0) < 60 })
        }
        XCTAssertGreaterThan(answered, 1000)
        XCTAssertEqual(d.emu.read32(MMIORegister.status) & UInt32(VirtioStatus.deviceNeedsReset.rawValue), 0)
        let (st, _) = d.goodRead(base: 60, sector: 0)
        XCTAssertEqual(st, BlkStatus.ok)
        d.emu.shutdown()
    }

    func testAvailIndexRunawaySetsNeedsResetAndDeviceRecovers() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20), size: 16)
        d.mem.store16Release(d.avail.offset + 2, 1000)
        d.emu.write32(MMIORegister.queueNotify, 0)
        var waited = 0
        while d.emu.read32(MMIORegister.status) & 64 == 0 && waited < 500 {
            usleep(2000)
            waited += 1
        }
        XCTAssertNotEqual(d.emu.read32(MMIORegister.status) & 64, 0, "DEVICE_NEEDS_RESET set")
        XCTAssertNotEqual(d.emu.read32(MMIORegister.interruptStatus) & 2, 0, "config interrupt raised")
        // Reset and bring up again: the same device works.
        let d2mem = d.mem
        d2mem.zero(d.avail.offset, count: d.avail.length)
        d2mem.zero(d.used.offset, count: d.used.length)
        d.emu.write32(MMIORegister.status, 0)
        XCTAssertEqual(d.emu.read32(MMIORegister.status), 0)
        d.emu.shutdown()
    }

    /// A queue whose device-written area overlaps a driver-written ring area stays disabled: the
    /// device's own stores would otherwise make new buffers appear forever (the device fuzz target
    /// found a split ring with avail at 0x6 and used at 0x8 that kept its thread busy).
    func testOverlappingRingAreasAreRefused() throws {
        let emu = try VirtioBlkEmulator(backend: try RAMBackend(size: 1 << 20))
        defer { emu.shutdown() }
        let arena = try DMAArena(structureBytes: 256 << 10, ioPages: 0)
        try emu.attachMemory(arena.memory)
        let base = arena.memory.deviceBase
        func ready(packed: Bool, size: Int, desc: UInt64, driver: UInt64, device: UInt64) -> Bool {
            var f: VirtioFeatures = [.version1]
            if packed { f.insert(.ringPacked) }
            emu.write32(MMIORegister.status, 0)
            emu.write32(MMIORegister.status, 3)
            emu.write32(MMIORegister.driverFeaturesSel, 0)
            emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: f.rawValue))
            emu.write32(MMIORegister.driverFeaturesSel, 1)
            emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: f.rawValue >> 32))
            emu.write32(MMIORegister.status, 11)
            emu.write32(MMIORegister.queueSel, 0)
            emu.write32(MMIORegister.queueNum, UInt32(size))
            for (r, a) in [
                (MMIORegister.queueDescLow, base + desc), (MMIORegister.queueDriverLow, base + driver),
                (MMIORegister.queueDeviceLow, base + device),
            ] {
                emu.write32(r, UInt32(truncatingIfNeeded: a))
                emu.write32(r + 4, UInt32(truncatingIfNeeded: a >> 32))
            }
            emu.write32(MMIORegister.queueReady, 1)
            return emu.read32(MMIORegister.queueReady) == 1
        }
        // Split, size 16: desc 256 bytes, avail 38, used 134.
        XCTAssertTrue(ready(packed: false, size: 16, desc: 0, driver: 256, device: 296), "disjoint areas are accepted")
        XCTAssertTrue(
            ready(packed: false, size: 16, desc: 0, driver: 256, device: 256 + 40), "used right after avail is accepted"
        )
        XCTAssertFalse(
            ready(packed: false, size: 16, desc: 0, driver: 256, device: 292), "used ring over avail's used_event")
        XCTAssertFalse(
            ready(packed: false, size: 16, desc: 0x1000, driver: 6, device: 8),
            "the fuzzer's placement: used over avail.idx")
        XCTAssertFalse(
            ready(packed: false, size: 16, desc: 0, driver: 256, device: 252), "used ring over the descriptor table")
        XCTAssertTrue(
            ready(packed: false, size: 16, desc: 0, driver: 0, device: 512),
            "desc and avail may share (the device only reads both)")
        // Packed, size 16: descriptor ring 256 bytes, event areas 4 bytes each.
        XCTAssertTrue(
            ready(packed: true, size: 16, desc: 0, driver: 256, device: 260), "disjoint packed areas are accepted")
        XCTAssertFalse(
            ready(packed: true, size: 16, desc: 0, driver: 256, device: 252),
            "device event area inside the descriptor ring")
        XCTAssertTrue(
            ready(packed: true, size: 16, desc: 0, driver: 128, device: 256),
            "the driver event area is only read by the device")
    }

    func testFeatureNegotiationRefusesUnofferedFeatures() throws {
        let emu = try VirtioBlkEmulator(backend: try RAMBackend(size: 1 << 20, readOnly: true))
        emu.write32(MMIORegister.status, 3)
        emu.write32(MMIORegister.deviceFeaturesSel, 0)
        let lo = emu.read32(MMIORegister.deviceFeatures)
        XCTAssertNotEqual(lo & (1 << 5), 0, "RO offered for a read-only backend")
        XCTAssertEqual(lo & (1 << 13), 0, "no DISCARD on a read-only backend")
        emu.write32(MMIORegister.driverFeaturesSel, 0)
        emu.write32(MMIORegister.driverFeatures, 1 << 13)
        emu.write32(MMIORegister.driverFeaturesSel, 1)
        emu.write32(MMIORegister.driverFeatures, 1)
        emu.write32(MMIORegister.status, 11)
        XCTAssertEqual(emu.read32(MMIORegister.status) & 8, 0, "FEATURES_OK refused")
        emu.shutdown()
    }
}
