import TestSupport
import XCTest

@testable import Virtio
@testable import VirtioEmulator

/// The packed ring (VIRTIO 1.2 §2.8): the driver's `PackedVirtqueue` against the emulator's
/// `DevicePackedQueue`, each against hand-written hostile rings, and the device against random rings.
final class PackedVirtqueueTests: XCTestCase {
    let avail = PackedRingLayout.availBits(wrap: true) // first lap: AVAIL=1, USED=0

    struct Pair {
        let arena: DMAArena
        let q: PackedVirtqueue
        let dev: DevicePackedQueue
        var mem: SharedMemory { arena.memory }
    }

    func makePair(size: Int, eventIdx: Bool = false, indirect: Bool = false) throws -> Pair {
        let arena = try DMAArena(structureBytes: 1 << 20, ioPages: 4)
        let q = try PackedVirtqueue(arena: arena, size: size)
        q.eventIndex = eventIdx
        let a = q.addresses
        let dev = try XCTUnwrap(
            DevicePackedQueue(
                mem: arena.memory, size: size, descAddr: a.descriptors, driverAddr: a.driverArea,
                deviceAddr: a.deviceArea))
        dev.eventIndex = eventIdx
        dev.indirect = indirect
        return Pair(arena: arena, q: q, dev: dev)
    }

    /// Writes a raw descriptor into ring slot `pos`, as a (possibly hostile) driver would.
    func putDesc(_ p: Pair, _ pos: Int, addr: UInt64, len: UInt32, id: UInt16, flags: UInt16) {
        let o = p.q.descriptors.offset + 16 * pos
        p.mem.store64(o, addr)
        p.mem.store32(o + 8, len)
        p.mem.store16(o + 12, id)
        p.mem.store16(o + 14, flags)
    }

    /// Writes a raw used descriptor into slot `pos`, as a (possibly hostile) device would.
    func putUsed(_ p: Pair, _ pos: Int, wrap: Bool = true, id: UInt16, len: UInt32, write: Bool = true) {
        let o = p.q.descriptors.offset + 16 * pos
        p.mem.store32(o + 8, len)
        p.mem.store16(o + 12, id)
        p.mem.store16Release(o + 14, PackedRingLayout.usedBits(wrap: wrap) | (write ? DescriptorFlags.write : 0))
    }

    func pop(_ p: Pair) throws -> DescriptorChain? {
        var c = DescriptorChain()
        return try p.dev.pop(into: &c) ? c : nil
    }

    // MARK: layout and placement

    func testLayoutAndFlags() {
        XCTAssertEqual(DescriptorFlags.avail, 0x80)
        XCTAssertEqual(DescriptorFlags.used, 0x8000)
        XCTAssertTrue(PackedRingLayout.isValidSize(13), "§2.8.10: sizes need not be powers of two")
        XCTAssertTrue(PackedRingLayout.isValidSize(32768))
        XCTAssertFalse(PackedRingLayout.isValidSize(0))
        XCTAssertFalse(PackedRingLayout.isValidSize(32769))
        XCTAssertTrue(PackedRingLayout.isAvailable(PackedRingLayout.availBits(wrap: false), wrap: false))
        XCTAssertFalse(PackedRingLayout.isAvailable(0, wrap: true), "a zeroed ring holds nothing available")
        XCTAssertFalse(PackedRingLayout.isUsed(0, wrap: true))
        XCTAssertFalse(
            PackedRingLayout.isUsed(PackedRingLayout.availBits(wrap: true), wrap: true), "an available slot is not used"
        )
        XCTAssertTrue(PackedRingLayout.isUsed(PackedRingLayout.usedBits(wrap: false), wrap: false))
        XCTAssertEqual(PackedRingLayout.offWrap(position: 12, wrap: true), 0x800C)
    }

    func testDevicePlacementIsValidated() throws {
        let arena = try DMAArena(structureBytes: 64 << 10, ioPages: 0)
        let m = arena.memory
        let b = m.deviceBase
        XCTAssertNotNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b, driverAddr: b + 16 * 13, deviceAddr: b + 16 * 13 + 4))
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b + 8, driverAddr: b + 4096, deviceAddr: b + 4100),
            "ring aligned 16 (§2.8.10.1)")
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b, driverAddr: b + 4098, deviceAddr: b + 4104),
            "driver area aligned 4")
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b, driverAddr: b + 4096, deviceAddr: b + 4102),
            "device area aligned 4")
        XCTAssertNil(
            DevicePackedQueue(
                mem: m, size: 13, descAddr: b + UInt64(m.size) - 16 * 12, driverAddr: b, deviceAddr: b + 4),
            "ring runs past memory")
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b, driverAddr: b + UInt64(m.size), deviceAddr: b + 4096),
            "driver area outside memory")
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: b, driverAddr: b + 4096, deviceAddr: b - 4),
            "device area below memory")
        XCTAssertNil(
            DevicePackedQueue(mem: m, size: 13, descAddr: UInt64.max - 15, driverAddr: b, deviceAddr: b + 4),
            "address overflow")
        XCTAssertNil(DevicePackedQueue(mem: m, size: 0, descAddr: b, driverAddr: b + 4096, deviceAddr: b + 4100))
        XCTAssertNil(DevicePackedQueue(mem: m, size: 32769, descAddr: b, driverAddr: b, deviceAddr: b))
    }

    // MARK: driver basics

    func testSlotExhaustionAndIDs() throws {
        let p = try makePair(size: 8)
        let a = try XCTUnwrap(
            p.q.add(count: 3) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 4, deviceWritable: false) })
        let b = try XCTUnwrap(
            p.q.add(count: 5) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 4, deviceWritable: false) })
        XCTAssertNotEqual(a, b)
        XCTAssertEqual(p.q.freeCount, 0)
        XCTAssertEqual(p.q.inFlightCount, 2)
        XCTAssertNil(
            p.q.add(count: 1) { _ in VirtqueueSegment(address: 0, length: 0, deviceWritable: false) },
            "a full ring refuses new chains")
        XCTAssertFalse(p.dev.hasAvailable, "nothing is visible before publish")
        XCTAssertNil(try pop(p))
        XCTAssertTrue(p.q.publish())
        XCTAssertFalse(p.q.publish(), "nothing new to publish")
        let c1 = try XCTUnwrap(try pop(p))
        let c2 = try XCTUnwrap(try pop(p))
        XCTAssertEqual([c1.head, c2.head], [a, b])
        XCTAssertEqual([c1.ringSlots, c2.ringSlots], [3, 5])
        // The 5-slot chain completes first: its used descriptor lands in slot 0, the 3-slot one in slot 5.
        p.dev.pushUsed(id: b, ringSlots: 5, length: 0)
        XCTAssertTrue(p.dev.publishUsed())
        XCTAssertEqual(try p.q.nextUsed()?.id, b)
        XCTAssertNil(try p.q.nextUsed())
        XCTAssertEqual(p.q.freeCount, 5)
        p.dev.pushUsed(id: a, ringSlots: 3, length: 0)
        _ = p.dev.publishUsed()
        XCTAssertEqual(try p.q.nextUsed()?.id, a)
        XCTAssertEqual(p.q.freeCount, 8)
        XCTAssertEqual(p.q.nextFreeID, a, "ids are reused LIFO")
    }

    // MARK: 1 + 2: driver against device, wrap counters, notification decisions

    /// Many chains of varying lengths, in varying batches, completed in reverse; each batch is
    /// published in two halves and completed in two halves so that the notification decisions of
    /// both sides are checked: with ENABLE every publication notifies; with EVENT_IDX (DESC at the
    /// peer's next position) exactly the first half does; with DISABLE none does.
    func runAgainstDevice(size: Int, eventIdx: Bool, indirect: Bool = false, buffers target: Int, seed: UInt64) throws {
        let p = try makePair(size: size, eventIdx: eventIdx, indirect: indirect)
        let base = p.mem.deviceBase
        let maxIndirect = 8
        let tables = try indirect ? (0..<size).map { _ in try p.arena.allocate(16 * maxIndirect, alignment: 16) } : []
        var rng = SplitMix(seed: seed)
        var chain = DescriptorChain()
        var expected = [[VirtqueueSegment]](repeating: [], count: size)
        var slotsOf = [Int](repeating: 0, count: size)
        var lengthOf = [UInt32](repeating: 0, count: size)
        var completed = 0
        var totalSlots = 0
        var round = 0
        var indirectChains = 0
        let ctx = "size \(size) eventIdx \(eventIdx) indirect \(indirect)"

        func addOne() -> UInt16? {
            let useIndirect = indirect && rng.next() % 2 == 0
            let n = Int.random(in: 1...(useIndirect ? maxIndirect : min(size, 6)), using: &rng)
            let nw = Int.random(in: 0...n, using: &rng)
            let salt = Int(rng.next() % 512)
            let segs = (0..<n).map { k in
                VirtqueueSegment(
                    address: base + UInt64(8192 + 64 * salt + 16 * k), length: UInt32(1 + (salt + 7 * k) % 60),
                    deviceWritable: k >= n - nw)
            }
            let want = p.q.nextFreeID
            guard let id = p.q.add(count: n, indirect: useIndirect ? tables[Int(want)] : nil, segment: { segs[$0] })
            else { return nil }
            if id != want { XCTFail("\(ctx): add returned \(id), nextFreeID said \(want)") }
            expected[Int(id)] = segs
            slotsOf[Int(id)] = useIndirect ? 1 : n
            if useIndirect { indirectChains += 1 }
            return id
        }

        while completed < target {
            round += 1
            let quietDevice = round % 5 == 4 // device area says DISABLE while the driver publishes
            let quietDriver = round % 7 == 6 // driver area says DISABLE while the device publishes
            if quietDevice { p.dev.setNotifications(enabled: false) }
            let batch = Int.random(in: 1...min(size, 12), using: &rng)
            var added: [UInt16] = []
            var decisions: [Bool] = []
            let firstHalf = max(1, batch / 2)
            for _ in 0..<firstHalf { if let id = addOne() { added.append(id) } }
            decisions.append(p.q.publish())
            let before = added.count
            for _ in firstHalf..<batch { if let id = addOne() { added.append(id) } }
            if added.count > before { decisions.append(p.q.publish()) }
            let wantDecisions =
                quietDevice ? decisions.map { _ in false } : decisions.indices.map { !eventIdx || $0 == 0 }
            if decisions != wantDecisions {
                XCTFail("\(ctx) round \(round): publish() said \(decisions), expected \(wantDecisions)")
                return
            }

            // The device pops in ring order, i.e. in add order.
            p.dev.setNotifications(enabled: false)
            var popped: [UInt16] = []
            while try p.dev.pop(into: &chain) {
                let id = chain.head
                guard chain.fault == nil, Int(id) < size else {
                    XCTFail("\(ctx): chain \(id) faulted: \(String(describing: chain.fault))")
                    return
                }
                let segs = expected[Int(id)]
                let r = segs.filter { !$0.deviceWritable }
                let w = segs.filter { $0.deviceWritable }
                guard chain.ringSlots == slotsOf[Int(id)],
                    chain.readable.map({ $0.offset }) == r.map({ Int($0.address - base) }),
                    chain.readable.map({ $0.length }) == r.map({ Int($0.length) }),
                    chain.writable.map({ $0.offset }) == w.map({ Int($0.address - base) }),
                    chain.writable.map({ $0.length }) == w.map({ Int($0.length) })
                else {
                    XCTFail(
                        "\(ctx) round \(round): chain \(id) walked as \(chain.readable) / \(chain.writable) in \(chain.ringSlots) slots, added as \(segs)"
                    )
                    return
                }
                lengthOf[Int(id)] = UInt32(max(0, chain.writableBytes - Int(id % 3)))
                popped.append(id)
            }
            p.dev.setNotifications(enabled: true)
            if popped != added {
                XCTFail("\(ctx) round \(round): popped \(popped), added \(added)")
                return
            }
            if p.dev.hasAvailable {
                XCTFail("\(ctx): device still sees available descriptors")
                return
            }

            // Complete in reverse, in two publications.
            if quietDriver { p.q.disableInterrupts() }
            let reversed = Array(popped.reversed())
            let half = max(1, reversed.count / 2)
            var irq: [Bool] = []
            for id in reversed[..<half] {
                p.dev.pushUsed(id: id, ringSlots: slotsOf[Int(id)], length: lengthOf[Int(id)])
            }
            irq.append(p.dev.publishUsed())
            if half < reversed.count {
                for id in reversed[half...] {
                    p.dev.pushUsed(id: id, ringSlots: slotsOf[Int(id)], length: lengthOf[Int(id)])
                }
                irq.append(p.dev.publishUsed())
            }
            let wantIRQ = quietDriver ? irq.map { _ in false } : irq.indices.map { !eventIdx || $0 == 0 }
            if irq != wantIRQ {
                XCTFail("\(ctx) round \(round): publishUsed() said \(irq), expected \(wantIRQ)")
                return
            }
            if quietDriver && !p.q.enableInterrupts() {
                XCTFail("\(ctx): enableInterrupts must report pending used buffers")
                return
            }

            var got: [UInt16] = []
            while let u = try p.q.nextUsed() {
                if u.length != lengthOf[Int(u.id)] {
                    XCTFail("\(ctx): id \(u.id) length \(u.length), device wrote \(lengthOf[Int(u.id)])")
                    return
                }
                got.append(u.id)
            }
            if got != reversed {
                XCTFail("\(ctx) round \(round): reaped \(got), device completed \(reversed)")
                return
            }
            if p.q.enableInterrupts() {
                XCTFail("\(ctx): nothing should be pending")
                return
            }
            if p.q.freeCount != size || p.q.inFlightCount != 0 {
                XCTFail("\(ctx): \(p.q.freeCount) free, \(p.q.inFlightCount) in flight")
                return
            }
            completed += added.count
            totalSlots += added.reduce(0) { $0 + slotsOf[Int($1)] }
        }
        XCTAssertGreaterThanOrEqual(completed, target)
        // Each lap flips both wrap counters.
        XCTAssertGreaterThan(totalSlots / size, 20, "\(ctx): only \(totalSlots / size) laps")
        if indirect { XCTAssertGreaterThan(indirectChains, 100) }
    }

    func testAgainstDeviceSize8() throws {
        for e in [false, true] { try runAgainstDevice(size: 8, eventIdx: e, buffers: 3 * 65536, seed: 8) }
    }

    func testAgainstDeviceSize13NotPowerOfTwo() throws {
        for e in [false, true] { try runAgainstDevice(size: 13, eventIdx: e, buffers: 3 * 65536, seed: 13) }
    }

    func testAgainstDeviceSize256() throws {
        for e in [false, true] { try runAgainstDevice(size: 256, eventIdx: e, buffers: 3 * 65536, seed: 256) }
    }

    // MARK: 3: indirect

    func testIndirectChains() throws {
        for size in [8, 13, 256] {
            for e in [false, true] {
                try runAgainstDevice(size: size, eventIdx: e, indirect: true, buffers: 20000, seed: UInt64(size) << 8)
            }
        }
    }

    func testIndirectTableLayout() throws {
        let p = try makePair(size: 4, indirect: true)
        let table = try p.arena.allocate(16 * 3, alignment: 16)
        let base = p.mem.deviceBase
        let id = try XCTUnwrap(
            p.q.add(count: 3, indirect: table) { k in
                VirtqueueSegment(
                    address: base + 0x2000 + UInt64(k) * 0x100, length: 10 + UInt32(k), deviceWritable: k == 2)
            })
        XCTAssertEqual(p.q.freeCount, 3, "an indirect chain takes one ring slot")
        // §2.8.19: the table is sequential packed descriptors; only WRITE is set.
        XCTAssertEqual((0..<3).map { p.mem.load16(table.offset + 16 * $0 + 14) }, [0, 0, DescriptorFlags.write])
        _ = p.q.publish()
        let c = try XCTUnwrap(try pop(p))
        XCTAssertNil(c.fault)
        XCTAssertEqual(c.head, id)
        XCTAssertEqual(c.ringSlots, 1)
        XCTAssertEqual(c.readable.map(\.length), [10, 11])
        XCTAssertEqual(c.writable.map(\.offset), [0x2200])
        p.dev.pushUsed(id: id, ringSlots: 1, length: 12)
        _ = p.dev.publishUsed()
        let u = try XCTUnwrap(try p.q.nextUsed())
        XCTAssertEqual(u.id, id)
        XCTAssertEqual(u.length, 12)
    }

    // MARK: 2: notification at exactly the named descriptor

    /// With EVENT_IDX the device names one descriptor (offset and wrap); the driver must notify on
    /// the publication that makes exactly that descriptor available, and on no other.
    func testDriverNotifiesExactlyWhenCrossingTheEventDescriptor() throws {
        let size = 13
        let p = try makePair(size: size) // the device side only consumes; it does not touch the device area
        p.q.eventIndex = true
        var rng = SplitMix(seed: 99)
        var pos = 0
        var wrap = true // mirror of the driver's next available slot
        var hits = 0
        for _ in 0..<300 {
            // Name a descriptor 0..<6 slots ahead, possibly in the next lap.
            let ahead = Int.random(in: 0..<6, using: &rng)
            var t = pos + ahead
            var tw = wrap
            if t >= size {
                t -= size
                tw.toggle()
            }
            p.mem.store16(p.q.deviceEvent.offset, PackedRingLayout.offWrap(position: t, wrap: tw))
            p.mem.store16(p.q.deviceEvent.offset + 2, RingEventFlags.desc)
            var covered = false
            while !covered {
                let n = Int.random(in: 1...3, using: &rng)
                _ = try XCTUnwrap(
                    p.q.add(count: n) { _ in
                        VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: false)
                    })
                // Does this chain's slot range [pos, pos+n) contain (t, tw)?
                var crossing = false
                for k in 0..<n {
                    var s = pos + k
                    var sw = wrap
                    if s >= size {
                        s -= size
                        sw.toggle()
                    }
                    if s == t && sw == tw { crossing = true }
                }
                pos += n
                if pos >= size {
                    pos -= size
                    wrap.toggle()
                }
                XCTAssertEqual(p.q.publish(), crossing, "target \(t)/\(tw), chain of \(n) ending before \(pos)/\(wrap)")
                if crossing {
                    covered = true
                    hits += 1
                }
                let c = try XCTUnwrap(try pop(p))
                p.dev.pushUsed(id: c.head, ringSlots: c.ringSlots, length: 0)
                _ = p.dev.publishUsed()
                XCTAssertNotNil(try p.q.nextUsed())
            }
        }
        XCTAssertEqual(hits, 300)
        // A stale target (a lap behind) never fires; DISABLE never fires.
        p.mem.store16(p.q.deviceEvent.offset, PackedRingLayout.offWrap(position: pos, wrap: !wrap))
        _ = p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: false) }
        XCTAssertFalse(p.q.publish())
        p.mem.store16(p.q.deviceEvent.offset + 2, RingEventFlags.disable)
        _ = p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: false) }
        XCTAssertFalse(p.q.publish())
        p.mem.store16(p.q.deviceEvent.offset + 2, RingEventFlags.enable)
        _ = p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: false) }
        XCTAssertTrue(p.q.publish())
    }

    /// The same for the device: it interrupts on the publication that uses the descriptor named in
    /// the driver area, and on no other.
    func testDeviceInterruptsExactlyWhenCrossingTheEventDescriptor() throws {
        let size = 13
        let p = try makePair(size: size) // the driver does not touch the driver area (no EVENT_IDX there)
        p.dev.eventIndex = true
        var rng = SplitMix(seed: 7)
        var pos = 0
        var wrap = true // mirror of the device's next used slot
        var hits = 0
        for _ in 0..<300 {
            let ahead = Int.random(in: 0..<6, using: &rng)
            var t = pos + ahead
            var tw = wrap
            if t >= size {
                t -= size
                tw.toggle()
            }
            p.mem.store16(p.q.driverEvent.offset, PackedRingLayout.offWrap(position: t, wrap: tw))
            p.mem.store16(p.q.driverEvent.offset + 2, RingEventFlags.desc)
            var covered = false
            while !covered {
                let n = Int.random(in: 1...3, using: &rng)
                _ = try XCTUnwrap(
                    p.q.add(count: n) { _ in
                        VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: true)
                    })
                _ = p.q.publish()
                let c = try XCTUnwrap(try pop(p))
                var crossing = false
                for k in 0..<n {
                    var s = pos + k
                    var sw = wrap
                    if s >= size {
                        s -= size
                        sw.toggle()
                    }
                    if s == t && sw == tw { crossing = true }
                }
                pos += n
                if pos >= size {
                    pos -= size
                    wrap.toggle()
                }
                p.dev.pushUsed(id: c.head, ringSlots: c.ringSlots, length: 1)
                XCTAssertEqual(p.dev.publishUsed(), crossing, "target \(t)/\(tw)")
                if crossing {
                    covered = true
                    hits += 1
                }
                XCTAssertEqual(try p.q.nextUsed()?.length, 1)
            }
        }
        XCTAssertEqual(hits, 300)
    }

    /// The driver's own DESC requests: after reaping it names its next used slot, so one
    /// interrupt covers a batch; disableInterrupts writes DISABLE even with EVENT_IDX.
    func testDriverAreaWithEventIndex() throws {
        let p = try makePair(size: 8, eventIdx: true)
        XCTAssertEqual(p.mem.load16(p.q.driverEvent.offset + 2), RingEventFlags.desc)
        XCTAssertEqual(p.mem.load16(p.q.driverEvent.offset), PackedRingLayout.offWrap(position: 0, wrap: true))
        let ids = (0..<3).map { _ in
            p.q.add(count: 2) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: true) }!
        }
        _ = p.q.publish()
        var cs: [DescriptorChain] = []
        while let c = try pop(p) { cs.append(c) }
        XCTAssertEqual(cs.map(\.head), ids)
        XCTAssertEqual(
            p.mem.load16(p.q.deviceEvent.offset), PackedRingLayout.offWrap(position: 6, wrap: true),
            "the device names its next slot to poll")
        p.dev.pushUsed(id: ids[2], ringSlots: 2, length: 1)
        XCTAssertTrue(p.dev.publishUsed())
        XCTAssertEqual(try p.q.nextUsed()?.id, ids[2])
        XCTAssertEqual(p.mem.load16(p.q.driverEvent.offset), PackedRingLayout.offWrap(position: 2, wrap: true))
        p.q.disableInterrupts()
        XCTAssertEqual(p.mem.load16(p.q.driverEvent.offset + 2), RingEventFlags.disable)
        p.dev.pushUsed(id: ids[1], ringSlots: 2, length: 1)
        XCTAssertFalse(p.dev.publishUsed())
        XCTAssertTrue(p.q.enableInterrupts(), "a used buffer is waiting")
        XCTAssertEqual(p.mem.load16(p.q.driverEvent.offset + 2), RingEventFlags.desc)
        XCTAssertEqual(try p.q.nextUsed()?.id, ids[1])
        XCTAssertFalse(p.q.enableInterrupts())
    }

    // MARK: 4: hostile rings, device side

    func testDeviceRejectsAddressesOutsideMemory() throws {
        let p = try makePair(size: 8)
        let m = p.mem
        putDesc(p, 0, addr: m.deviceBase + UInt64(m.size), len: 1, id: 0, flags: avail)
        putDesc(p, 1, addr: m.deviceBase - 16, len: 16, id: 1, flags: avail)
        putDesc(p, 2, addr: m.deviceBase + UInt64(m.size) - 8, len: 9, id: 2, flags: avail)
        putDesc(p, 3, addr: UInt64.max - 3, len: 8, id: 3, flags: avail)
        putDesc(p, 4, addr: m.deviceBase + UInt64(m.size) - 8, len: 8, id: 4, flags: avail) // the last 8 bytes: fine
        let faults = try (0..<5).map { _ in try XCTUnwrap(try pop(p)).fault }
        XCTAssertEqual(
            faults,
            [
                .addressOutOfRange(address: m.deviceBase + UInt64(m.size), length: 1),
                .addressOutOfRange(address: m.deviceBase - 16, length: 16),
                .addressOutOfRange(address: m.deviceBase + UInt64(m.size) - 8, length: 9),
                .addressOutOfRange(address: UInt64.max - 3, length: 8),
                nil,
            ])
        XCTAssertNil(try pop(p))
    }

    func testDeviceRejectsReadableAfterWritable() throws {
        let p = try makePair(size: 8)
        let a = p.mem.deviceBase
        putDesc(p, 0, addr: a, len: 4, id: 0, flags: avail | DescriptorFlags.write | DescriptorFlags.next)
        putDesc(p, 1, addr: a, len: 4, id: 0, flags: avail | DescriptorFlags.next)
        putDesc(p, 2, addr: a, len: 4, id: 5, flags: avail | DescriptorFlags.write)
        putDesc(p, 3, addr: a, len: 4, id: 6, flags: avail)
        let c = try XCTUnwrap(try pop(p))
        XCTAssertEqual(c.fault, .readableAfterWritable(index: 1))
        XCTAssertEqual(c.head, 5, "the id comes from the chain's last descriptor (§2.8.6)")
        XCTAssertEqual(c.ringSlots, 3)
        XCTAssertEqual(c.writable.count, 1, "buffers seen before the fault are kept for an IOERR reply")
        let next = try XCTUnwrap(try pop(p))
        XCTAssertNil(next.fault)
        XCTAssertEqual(next.head, 6, "a faulty chain is skipped as a whole")
    }

    func testDeviceIndirectFaults() throws {
        let p = try makePair(size: 8)
        let m = p.mem
        let table = try p.arena.allocate(64, alignment: 16)
        // Not negotiated.
        putDesc(p, 0, addr: table.deviceAddress, len: 32, id: 0, flags: avail | DescriptorFlags.indirect)
        XCTAssertEqual(try pop(p)?.fault, .indirectNotNegotiated(index: 0))
        p.dev.indirect = true
        // An INDIRECT entry inside the table.
        m.store64(table.offset, m.deviceBase)
        m.store32(table.offset + 8, 4)
        m.store16(table.offset + 14, 0)
        m.store64(table.offset + 16, table.deviceAddress)
        m.store32(table.offset + 24, 16)
        m.store16(table.offset + 30, DescriptorFlags.indirect)
        putDesc(p, 1, addr: table.deviceAddress, len: 32, id: 1, flags: avail | DescriptorFlags.indirect)
        XCTAssertEqual(try pop(p)?.fault, .badIndirect(index: 1, reason: "entry 1 is itself INDIRECT"))
        // A table length that is not a multiple of 16, and an empty one.
        putDesc(p, 2, addr: table.deviceAddress, len: 24, id: 2, flags: avail | DescriptorFlags.indirect)
        guard case .badIndirect(2, _)? = try pop(p)?.fault else { return XCTFail("length 24 must be rejected") }
        putDesc(p, 3, addr: table.deviceAddress, len: 0, id: 3, flags: avail | DescriptorFlags.indirect)
        guard case .badIndirect(3, _)? = try pop(p)?.fault else { return XCTFail("an empty table must be rejected") }
        // A table outside memory.
        putDesc(p, 4, addr: m.deviceBase + UInt64(m.size) - 16, len: 32, id: 4, flags: avail | DescriptorFlags.indirect)
        XCTAssertEqual(try pop(p)?.fault, .addressOutOfRange(address: m.deviceBase + UInt64(m.size) - 16, length: 32))
        // INDIRECT inside a NEXT-linked list (§2.8.19.1).
        putDesc(p, 5, addr: m.deviceBase, len: 4, id: 5, flags: avail | DescriptorFlags.next)
        putDesc(p, 6, addr: table.deviceAddress, len: 16, id: 5, flags: avail | DescriptorFlags.indirect)
        guard case .badIndirect(6, _)? = try pop(p)?.fault else {
            return XCTFail("INDIRECT in a chain must be rejected")
        }
        // A good one: NEXT and other flags inside the table are reserved and ignored (§2.8.19).
        m.store16(table.offset + 14, DescriptorFlags.next)
        m.store64(table.offset + 16, m.deviceBase + 64)
        m.store32(table.offset + 24, 8)
        m.store16(table.offset + 30, DescriptorFlags.write)
        putDesc(
            p, 7, addr: table.deviceAddress, len: 32, id: 7,
            flags: avail | DescriptorFlags.indirect | DescriptorFlags.write)
        let c = try XCTUnwrap(try pop(p))
        XCTAssertNil(c.fault)
        XCTAssertEqual(c.readable.map(\.length), [4])
        XCTAssertEqual(c.writable.map(\.offset), [64])
    }

    func testDeviceRejectsUnterminatedChain() throws {
        for size in [1, 8, 13] {
            let p = try makePair(size: size)
            for i in 0..<size {
                putDesc(p, i, addr: p.mem.deviceBase, len: 1, id: 0, flags: avail | DescriptorFlags.next)
            }
            let c = try XCTUnwrap(try pop(p))
            XCTAssertEqual(c.fault, .unterminated(head: 0))
            XCTAssertEqual(c.ringSlots, size, "the whole ring is consumed, no further")
            XCTAssertEqual(c.readable.count, size)
            XCTAssertNil(try pop(p), "the next lap needs the other wrap value")
            // It can still be completed, and the queue goes on in the next lap.
            p.dev.pushUsed(id: c.head, ringSlots: c.ringSlots, length: 0)
            _ = p.dev.publishUsed()
            putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 0, flags: PackedRingLayout.availBits(wrap: false))
            let d = try XCTUnwrap(try pop(p))
            XCTAssertNil(d.fault)
        }
    }

    func testDeviceRejectsChainRunningIntoUnavailableSlot() throws {
        let p = try makePair(size: 8)
        putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 4, flags: avail | DescriptorFlags.next)
        putDesc(p, 1, addr: p.mem.deviceBase, len: 1, id: 4, flags: avail | DescriptorFlags.next)
        // Slot 2 is still zero: not available.
        let c = try XCTUnwrap(try pop(p))
        XCTAssertEqual(c.fault, .notAvailable(head: 0, index: 2))
        XCTAssertEqual(c.ringSlots, 2)
        XCTAssertEqual(c.head, 4)
    }

    func testDeviceRejectsBadBufferIDs() throws {
        let p = try makePair(size: 8)
        putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 8, flags: avail)
        XCTAssertThrowsError(try pop(p)) { XCTAssertEqual($0 as? QueueFault, .badBufferID(8)) }
        XCTAssertThrowsError(try pop(p), "the queue stays broken; the device asks for a reset") {
            XCTAssertEqual($0 as? QueueFault, .badBufferID(8))
        }

        let q = try makePair(size: 8)
        putDesc(q, 0, addr: q.mem.deviceBase, len: 1, id: 0xFFFF, flags: avail)
        XCTAssertThrowsError(try pop(q)) { XCTAssertEqual($0 as? QueueFault, .badBufferID(0xFFFF)) }

        // An id reused while in flight.
        let r = try makePair(size: 8)
        putDesc(r, 0, addr: r.mem.deviceBase, len: 1, id: 3, flags: avail)
        putDesc(r, 1, addr: r.mem.deviceBase, len: 1, id: 3, flags: avail)
        XCTAssertEqual(try pop(r)?.head, 3)
        XCTAssertTrue(r.dev.isInFlight(3))
        XCTAssertThrowsError(try pop(r)) { XCTAssertEqual($0 as? QueueFault, .badBufferID(3)) }
        // Once completed, the id may be used again.
        r.dev.pushUsed(id: 3, ringSlots: 1, length: 0)
        XCTAssertFalse(r.dev.isInFlight(3))
        XCTAssertEqual(try pop(r)?.head, 3)
    }

    func testDeviceAcceptsZeroLengthDescriptors() throws {
        let p = try makePair(size: 8)
        let end = p.mem.deviceBase + UInt64(p.mem.size)
        putDesc(p, 0, addr: p.mem.deviceBase, len: 0, id: 0, flags: avail | DescriptorFlags.next)
        putDesc(p, 1, addr: end, len: 0, id: 0, flags: avail | DescriptorFlags.write) // empty, just past the end
        let c = try XCTUnwrap(try pop(p))
        XCTAssertNil(c.fault)
        XCTAssertEqual(c.readableBytes + c.writableBytes, 0)
        XCTAssertTrue((c.readable + c.writable).allSatisfy { $0.offset + $0.length <= p.mem.size })
        p.dev.pushUsed(id: 0, ringSlots: c.ringSlots, length: 0)
        XCTAssertTrue(p.dev.publishUsed())
        putDesc(p, 2, addr: end + 1, len: 0, id: 1, flags: avail)
        XCTAssertEqual(try pop(p)?.fault, .addressOutOfRange(address: end + 1, length: 0))
    }

    func testDeviceSkipsDescriptorsNotYetAvailable() throws {
        let p = try makePair(size: 4)
        // USED == AVAIL (a used-looking slot) and the other lap's marking are not available now.
        putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 0, flags: PackedRingLayout.usedBits(wrap: true))
        XCTAssertFalse(p.dev.hasAvailable)
        putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 0, flags: PackedRingLayout.availBits(wrap: false))
        XCTAssertNil(try pop(p))
        putDesc(p, 0, addr: p.mem.deviceBase, len: 1, id: 0, flags: avail)
        XCTAssertTrue(p.dev.hasAvailable)
        XCTAssertNotNil(try pop(p))
    }

    // MARK: 4: hostile device, driver side

    func testUsedIDOutOfRangeIsAnError() throws {
        let p = try makePair(size: 8)
        _ = p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: true) }
        _ = p.q.publish()
        putUsed(p, 0, id: 4711, len: 0)
        XCTAssertThrowsError(try p.q.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedIDOutOfRange(id: 4711, queueSize: 8))
        }
    }

    func testUsedIDNotInFlightIsAnError() throws {
        let p = try makePair(size: 8)
        let id = try XCTUnwrap(
            p.q.add(count: 2) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 1, deviceWritable: true) })
        _ = p.q.publish()
        putUsed(p, 0, id: id + 1, len: 0)
        XCTAssertThrowsError(try p.q.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedIDNotInFlight(id: id + 1))
        }
        XCTAssertEqual(p.q.freeCount, 6, "nothing was freed")
    }

    func testDoubleCompletionIsAnError() throws {
        let p = try makePair(size: 8)
        let a = try XCTUnwrap(
            p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 8, deviceWritable: true) })
        _ = try XCTUnwrap(
            p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 8, deviceWritable: true) })
        _ = p.q.publish()
        putUsed(p, 0, id: a, len: 1)
        putUsed(p, 1, id: a, len: 1)
        XCTAssertEqual(try p.q.nextUsed()?.id, a)
        XCTAssertThrowsError(try p.q.nextUsed()) { XCTAssertEqual($0 as? VirtqueueError, .usedIDNotInFlight(id: a)) }
    }

    func testOversizedUsedLengthIsAnError() throws {
        let p = try makePair(size: 8)
        let a = try XCTUnwrap(
            p.q.add(count: 2) { k in VirtqueueSegment(address: p.mem.deviceBase, length: 8, deviceWritable: k == 1) })
        _ = p.q.publish()
        putUsed(p, 0, id: a, len: 9)
        XCTAssertThrowsError(try p.q.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedLengthTooLarge(id: a, length: 9, writable: 8))
        }
        // Without WRITE the length is reserved and ignored (§2.8.4).
        let b = try XCTUnwrap(
            p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 8, deviceWritable: false) })
        _ = p.q.publish()
        putUsed(p, 2, id: b, len: 0xFFFF_FFFF, write: false)
        let u = try XCTUnwrap(try p.q.nextUsed())
        XCTAssertEqual(u.id, b)
        XCTAssertEqual(u.length, 0)
    }

    func testDriverIgnoresSlotsNotMarkedUsed() throws {
        let p = try makePair(size: 4)
        let a = try XCTUnwrap(
            p.q.add(count: 1) { _ in VirtqueueSegment(address: p.mem.deviceBase, length: 8, deviceWritable: true) })
        _ = p.q.publish()
        XCTAssertNil(try p.q.nextUsed(), "an available slot is not used")
        putUsed(p, 0, wrap: false, id: a, len: 1)
        XCTAssertNil(try p.q.nextUsed(), "the other lap's marking is not used now")
        putUsed(p, 0, wrap: true, id: a, len: 1)
        XCTAssertEqual(try p.q.nextUsed()?.id, a)
    }

    /// An honest device interleaved with one scribbling on the ring: the driver throws or returns,
    /// never traps, and its accounting stays within the ring.
    func testRandomHostileDeviceNeverTrapsTheDriver() throws {
        var rng = SplitMix(seed: 0xD41)
        var errors = 0
        var reaped = 0
        var chain = DescriptorChain()
        for iteration in 0..<300 {
            let size = [1, 2, 5, 8, 13][iteration % 5]
            let p = try makePair(size: size, eventIdx: iteration % 2 == 0)
            for _ in 0..<40 {
                switch rng.next() % 6 {
                case 0, 1:
                    let n = Int.random(in: 1...size, using: &rng)
                    _ = p.q.add(count: n) { k in
                        VirtqueueSegment(address: p.mem.deviceBase, length: UInt32(k + 1), deviceWritable: k % 2 == 1)
                    }
                    _ = p.q.publish()
                case 2:
                    // The honest device (its own state may be confused by the scribbles: it may throw).
                    do {
                        var done: [(UInt16, Int, UInt32)] = []
                        while try p.dev.pop(into: &chain) {
                            done.append((chain.head, chain.ringSlots, UInt32(chain.writableBytes)))
                        }
                        for d in done.reversed() { p.dev.pushUsed(id: d.0, ringSlots: d.1, length: d.2) }
                        _ = p.dev.publishUsed()
                    } catch {}
                case 3:
                    let pos = Int.random(in: 0..<size, using: &rng)
                    let o = p.q.descriptors.offset + 16 * pos
                    p.mem.store32(o + 8, UInt32(truncatingIfNeeded: rng.next() % 3 == 0 ? rng.next() : rng.next() % 8))
                    p.mem.store16(
                        o + 12,
                        UInt16(truncatingIfNeeded: rng.next() % 2 == 0 ? rng.next() : rng.next() % UInt64(size + 1)))
                    p.mem.store16(
                        o + 14,
                        rng.next() % 2 == 0
                            ? UInt16(truncatingIfNeeded: rng.next())
                            : PackedRingLayout.usedBits(wrap: rng.next() % 2 == 0) | DescriptorFlags.write)
                case 4:
                    p.mem.store32(p.q.deviceEvent.offset, UInt32(truncatingIfNeeded: rng.next()))
                    _ = p.q.enableInterrupts()
                default:
                    do {
                        while try p.q.nextUsed() != nil { reaped += 1 }
                    } catch { errors += 1 }
                }
                XCTAssert((0...size).contains(p.q.freeCount) && (0...size).contains(p.q.inFlightCount))
            }
        }
        XCTAssertGreaterThan(errors, 100)
        XCTAssertGreaterThan(reaped, 300)
    }

    // MARK: 5: random hostile rings fed to the device

    /// The case name of an enum value with a payload (every ChainFault and QueueFault case has one).
    func caseName(_ value: Any) -> String { Mirror(reflecting: value).children.first?.label ?? "\(value)" }

    func testRandomHostileRingsNeverTrapTheDevice() throws {
        var rng = SplitMix(seed: 0x5EED)
        let arena = try DMAArena(structureBytes: 64 << 10, ioPages: 2)
        let m = arena.memory
        let base = m.deviceBase
        let ring = try arena.allocate(16 * 64, alignment: 16)
        let drvArea = try arena.allocate(4, alignment: 4)
        let devArea = try arena.allocate(4, alignment: 4)
        let scratch = try arena.allocate(1024, alignment: 16)
        var faults: [String: Int] = [:]
        var clean = 0
        var popped = 0

        func randomAddress() -> UInt64 {
            switch rng.next() % 6 {
            case 0: return base + rng.next() % UInt64(m.size)
            case 1: return scratch.deviceAddress + 16 * (rng.next() % 8)
            case 2: return rng.next()
            case 3: return base + UInt64(m.size) - rng.next() % 64
            case 4: return base &- rng.next() % 64
            default: return base + 4096 * (rng.next() % 3)
            }
        }
        func randomLength() -> UInt32 {
            switch rng.next() % 5 {
            case 0: return 0
            case 1: return UInt32(rng.next() % 64)
            case 2: return UInt32(16 * (rng.next() % 9))
            case 3: return UInt32(truncatingIfNeeded: rng.next())
            default: return UInt32.max - UInt32(rng.next() % 16)
            }
        }
        func randomDescriptor(at o: Int, size: Int) {
            m.store64(o, randomAddress())
            m.store32(o + 8, randomLength())
            m.store16(
                o + 12, rng.next() % 4 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % UInt64(size))
            )
            var f: UInt16
            switch rng.next() % 6 {
            case 0: f = UInt16(truncatingIfNeeded: rng.next())
            case 1: f = PackedRingLayout.availBits(wrap: false)
            case 2: f = PackedRingLayout.usedBits(wrap: true)
            default: f = PackedRingLayout.availBits(wrap: true)
            }
            if rng.next() % 3 == 0 { f |= DescriptorFlags.next }
            if rng.next() % 3 == 0 { f |= DescriptorFlags.write }
            if rng.next() % 5 == 0 { f |= DescriptorFlags.indirect }
            m.store16(o + 14, f)
        }

        for iteration in 0..<6000 {
            let size = [1, 2, 3, 5, 8, 13, 16, 64][iteration % 8]
            let dev = try XCTUnwrap(
                DevicePackedQueue(
                    mem: m, size: size, descAddr: ring.deviceAddress, driverAddr: drvArea.deviceAddress,
                    deviceAddr: devArea.deviceAddress))
            dev.eventIndex = rng.next() % 2 == 0
            dev.indirect = rng.next() % 4 != 0
            for i in 0..<size { randomDescriptor(at: ring.offset + 16 * i, size: size) }
            for i in 0..<(scratch.length / 16) { randomDescriptor(at: scratch.offset + 16 * i, size: size) }
            m.store32(drvArea.offset, UInt32(truncatingIfNeeded: rng.next()))
            var chain = DescriptorChain()
            var pops = 0
            do {
                while pops < 3 * size, try dev.pop(into: &chain) {
                    pops += 1
                    popped += 1
                    XCTAssert((1...size).contains(chain.ringSlots), "ring slots \(chain.ringSlots) of \(size)")
                    XCTAssert(Int(chain.head) < size)
                    for s in chain.readable + chain.writable
                    where s.offset < 0 || s.length < 0 || s.offset + s.length > m.size {
                        XCTFail("segment \(s) lies outside memory of \(m.size) bytes")
                    }
                    XCTAssertEqual(chain.readableBytes, chain.readable.reduce(0) { $0 + $1.length })
                    XCTAssertEqual(chain.writableBytes, chain.writable.reduce(0) { $0 + $1.length })
                    if let f = chain.fault { faults[caseName(f), default: 0] += 1 } else { clean += 1 }
                    if rng.next() % 3 != 0 {
                        dev.pushUsed(id: chain.head, ringSlots: chain.ringSlots, length: UInt32(chain.writableBytes))
                    }
                    if rng.next() % 3 == 0 { _ = dev.publishUsed() }
                    if rng.next() % 4 == 0 { dev.setNotifications(enabled: rng.next() % 2 == 0) }
                    // The hostile driver keeps scribbling.
                    if rng.next() % 2 == 0 {
                        randomDescriptor(at: ring.offset + 16 * Int(rng.next() % UInt64(size)), size: size)
                    }
                }
            } catch {
                faults["queue " + caseName(error), default: 0] += 1
            }
            _ = dev.publishUsed()
            _ = dev.hasAvailable
        }
        print(
            "random hostile rings: \(popped) chains popped, \(clean) clean, faults \(faults.sorted { $0.key < $1.key })"
        )
        // The walk must have met every kind of fault, and good chains too.
        XCTAssertGreaterThan(clean, 300)
        XCTAssertGreaterThan(popped, 3000)
        for kind in [
            "addressOutOfRange", "readableAfterWritable", "indirectNotNegotiated", "badIndirect", "unterminated",
            "notAvailable", "queue badBufferID",
        ] {
            XCTAssertGreaterThan(faults[kind] ?? 0, 0, "no \(kind) fault seen in \(faults)")
        }
    }
}
