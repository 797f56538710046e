import XCTest

@testable import Virtio
@testable import VirtioEmulator

/// The driver's split ring, checked against a hand-driven device and against the emulator's device side.
final class SplitVirtqueueTests: XCTestCase {
    func makeQueue(size: Int) throws -> (DMAArena, SplitVirtqueue) {
        let arena = try DMAArena(structureBytes: 64 << 10, ioPages: 16)
        return (arena, try SplitVirtqueue(arena: arena, size: size))
    }

    func seg(_ len: UInt32 = 16, w: Bool = false) -> VirtqueueSegment {
        VirtqueueSegment(address: 0x1_0000_0000, length: len, deviceWritable: w)
    }

    /// Writes a used element the way a device would.
    func deviceComplete(_ arena: DMAArena, _ q: SplitVirtqueue, id: UInt32, len: UInt32, usedIdx: inout UInt16) {
        let m = arena.memory
        let e = q.usedRing.offset + 4 + 8 * (Int(usedIdx) % q.size)
        m.store32(e, id)
        m.store32(e + 4, len)
        usedIdx &+= 1
        m.store16Release(q.usedRing.offset + 2, usedIdx)
    }

    func testFreeListExhaustionAndRecovery() throws {
        let (arena, q) = try makeQueue(size: 8)
        var heads: [UInt16] = []
        for _ in 0..<4 { heads.append(try XCTUnwrap(q.add(count: 2) { _ in self.seg() })) }
        XCTAssertEqual(q.freeCount, 0)
        XCTAssertNil(q.add(count: 1) { _ in self.seg() }, "a full table must refuse new chains")
        XCTAssertTrue(q.publish())
        var used: UInt16 = 0
        deviceComplete(arena, q, id: UInt32(heads[2]), len: 0, usedIdx: &used)
        let r = try XCTUnwrap(try q.nextUsed())
        XCTAssertEqual(r.id, heads[2])
        XCTAssertEqual(q.freeCount, 2)
        XCTAssertNil(q.add(count: 3) { _ in self.seg() }, "3 descriptors do not fit in 2")
        XCTAssertNotNil(q.add(count: 2) { _ in self.seg() })
    }

    func testOutOfOrderCompletion() throws {
        let (arena, q) = try makeQueue(size: 16)
        let heads = (0..<5).map { _ in q.add(count: 3) { k in self.seg(16, w: k == 2) }! }
        _ = q.publish()
        var used: UInt16 = 0
        for h in heads.reversed() { deviceComplete(arena, q, id: UInt32(h), len: 16, usedIdx: &used) }
        var got: [UInt16] = []
        while let u = try q.nextUsed() {
            got.append(u.id)
            XCTAssertEqual(u.length, 16)
        }
        XCTAssertEqual(got, heads.reversed())
        XCTAssertEqual(q.freeCount, 16)
    }

    func testUsedIDOutOfRangeIsAnError() throws {
        let (arena, q) = try makeQueue(size: 8)
        _ = q.add(count: 1) { _ in self.seg() }
        var used: UInt16 = 0
        deviceComplete(arena, q, id: 4711, len: 0, usedIdx: &used)
        XCTAssertThrowsError(try q.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedIDOutOfRange(id: 4711, queueSize: 8))
        }
    }

    func testUsedIDNotInFlightIsAnError() throws {
        let (arena, q) = try makeQueue(size: 8)
        let h = q.add(count: 2) { _ in self.seg() }!
        var used: UInt16 = 0
        // The second descriptor of the chain is not a head.
        deviceComplete(arena, q, id: UInt32(h + 1), len: 0, usedIdx: &used)
        XCTAssertThrowsError(try q.nextUsed()) { XCTAssertEqual($0 as? VirtqueueError, .usedIDNotInFlight(id: h + 1)) }
    }

    func testDoubleCompletionIsAnError() throws {
        let (arena, q) = try makeQueue(size: 8)
        let h = q.add(count: 1) { _ in self.seg(8, w: true) }!
        var used: UInt16 = 0
        deviceComplete(arena, q, id: UInt32(h), len: 1, usedIdx: &used)
        deviceComplete(arena, q, id: UInt32(h), len: 1, usedIdx: &used)
        XCTAssertNotNil(try q.nextUsed())
        XCTAssertThrowsError(try q.nextUsed())
    }

    func testUsedIndexRunawayAndOversizedLength() throws {
        let (arena, q) = try makeQueue(size: 8)
        let h = q.add(count: 1) { _ in self.seg(8, w: true) }!
        arena.memory.store16(q.usedRing.offset + 2, 100)
        XCTAssertThrowsError(try q.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedIndexRunaway(used: 100, lastSeen: 0, queueSize: 8))
        }
        let (arena2, q2) = try makeQueue(size: 8)
        let h2 = q2.add(count: 1) { _ in self.seg(8, w: true) }!
        var used: UInt16 = 0
        deviceComplete(arena2, q2, id: UInt32(h2), len: 9, usedIdx: &used)
        XCTAssertThrowsError(try q2.nextUsed()) {
            XCTAssertEqual($0 as? VirtqueueError, .usedLengthTooLarge(id: h2, length: 9, writable: 8))
        }
        _ = h
    }

    func testNeedEvent() {
        XCTAssertTrue(SplitVirtqueue.needEvent(event: 5, new: 6, old: 5))
        XCTAssertFalse(SplitVirtqueue.needEvent(event: 6, new: 6, old: 5))
        XCTAssertTrue(SplitVirtqueue.needEvent(event: 65535, new: 1, old: 65534), "wraps")
    }

    /// Driver ring against the emulator's device ring, no threads: indices wrap past 65535 several
    /// times, batches vary, and the device completes each batch in reverse.
    func testWraparoundAgainstDeviceRing() throws {
        for eventIdx in [false, true] {
            let (arena, q) = try makeQueue(size: 32)
            q.eventIndex = eventIdx
            let dev = try XCTUnwrap(
                DeviceSplitQueue(
                    mem: arena.memory, size: 32, descAddr: q.descriptors.deviceAddress,
                    driverAddr: q.availRing.deviceAddress, deviceAddr: q.usedRing.deviceAddress))
            dev.eventIndex = eventIdx
            var chain = DescriptorChain()
            var completed = 0
            var batch = 1
            while completed < 3 * 65536 + 123 {
                var heads: Set<UInt16> = []
                for _ in 0..<batch {
                    let h = try XCTUnwrap(
                        q.add(count: 3) { k in
                            VirtqueueSegment(
                                address: arena.memory.deviceBase + UInt64(k * 64), length: 16, deviceWritable: k == 2)
                        })
                    heads.insert(h)
                }
                _ = q.publish()
                var popped: [UInt16] = []
                while let h = try dev.popHead() {
                    try dev.walk(h, into: &chain)
                    XCTAssertEqual(chain.readable.count, 2)
                    XCTAssertEqual(chain.writable.count, 1)
                    popped.append(h)
                }
                XCTAssertEqual(Set(popped), heads)
                for h in popped.reversed() { dev.pushUsed(id: h, length: 16) }
                _ = dev.publishUsed()
                var got: Set<UInt16> = []
                while let u = try q.nextUsed() { got.insert(u.id) }
                XCTAssertEqual(got, heads)
                completed += batch
                batch = batch % 10 + 1
            }
            XCTAssertEqual(q.freeCount, 32)
        }
    }
}
