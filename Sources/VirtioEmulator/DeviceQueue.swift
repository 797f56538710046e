// The device side of a split virtqueue, with rust-vmm virtio-queue's discipline: every field the
// driver wrote is hostile input. Each fault is a typed error; nothing here can trap on bad input.
import Virtio

/// A range of shared memory that a descriptor names, already translated and bounds-checked.
struct MemorySegment {
    var offset: Int
    var length: Int
}

/// Why a chain cannot be used (VIRTIO 1.2 §2.7.5.1, §2.7.5.3.1 device requirements).
public enum ChainFault: Error, Equatable, CustomStringConvertible {
    case indexOutOfRange(UInt16)
    case loop(head: UInt16)
    case addressOutOfRange(address: UInt64, length: UInt32)
    case readableAfterWritable(index: UInt16)
    case indirectNotNegotiated(index: UInt16)
    case tooLong(bytes: UInt64)

    public var description: String {
        switch self {
        case .indexOutOfRange(let i): return "descriptor index \(i) is outside the table"
        case .loop(let h): return "chain from \(h) is longer than the queue (a loop)"
        case .addressOutOfRange(let a, let l): return "buffer 0x\(String(a, radix: 16))+\(l) lies outside driver memory"
        case .readableAfterWritable(let i): return "descriptor \(i) is device-readable but follows a device-writable one"
        case .indirectNotNegotiated(let i): return "descriptor \(i) is INDIRECT, which was not negotiated"
        case .tooLong(let b): return "chain totals \(b) bytes, more than 2^32"
        }
    }
}

/// Faults that make the whole queue unusable until reset (the device sets DEVICE_NEEDS_RESET).
public enum QueueFault: Error, Equatable, CustomStringConvertible {
    case availIndexRunaway(avail: UInt16, lastSeen: UInt16, size: Int)
    case headOutOfRange(UInt16)
    public var description: String {
        switch self {
        case .availIndexRunaway(let a, let l, let n): return "avail.idx jumped from \(l) to \(a), more than the queue size \(n)"
        case .headOutOfRange(let h): return "avail ring names head \(h), outside the table"
        }
    }
}

/// A walked chain: device-readable then device-writable buffers.
struct DescriptorChain {
    var head: UInt16 = 0
    var readable: [MemorySegment] = []
    var writable: [MemorySegment] = []
    var readableBytes = 0
    var writableBytes = 0
    mutating func reset(head: UInt16) {
        self.head = head
        readable.removeAll(keepingCapacity: true); writable.removeAll(keepingCapacity: true)
        readableBytes = 0; writableBytes = 0
    }
}

final class DeviceSplitQueue {
    let mem: SharedMemory
    let size: Int
    private let desc: Int, avail: Int, used: Int
    private var lastAvail: UInt16 = 0
    private var usedIdx: UInt16 = 0
    private var lastSignalledUsed: UInt16 = 0
    var eventIndex = false

    /// Validates the queue's placement (§2.7: alignment, and all three areas inside memory).
    init?(mem: SharedMemory, size: Int, descAddr: UInt64, driverAddr: UInt64, deviceAddr: UInt64) {
        guard SplitRingLayout.isValidSize(size) else { return nil }
        let l = SplitRingLayout(size: size)
        guard descAddr % 16 == 0, driverAddr % 2 == 0, deviceAddr % 4 == 0,
              let d = mem.offset(ofDeviceAddress: descAddr, length: l.descriptorTableBytes),
              let a = mem.offset(ofDeviceAddress: driverAddr, length: l.availBytes),
              let u = mem.offset(ofDeviceAddress: deviceAddr, length: l.usedBytes) else { return nil }
        self.mem = mem; self.size = size; desc = d; avail = a; used = u
    }

    /// The next available head, nil when the ring is empty.
    func pop() throws(QueueFault) -> UInt16? {
        let idx = mem.load16Acquire(avail + 2)
        if idx == lastAvail { return nil }
        guard Int(idx &- lastAvail) <= size else { throw .availIndexRunaway(avail: idx, lastSeen: lastAvail, size: size) }
        let head = mem.load16(avail + 4 + 2 * (Int(lastAvail) & (size - 1)))
        lastAvail &+= 1
        if eventIndex { mem.store16(used + 4 + 8 * size, lastAvail) }   // avail_event
        guard Int(head) < size else { throw .headOutOfRange(head) }
        return head
    }

    /// Walks and validates the chain at `head` into `chain`. On a fault, `chain` holds the
    /// writable buffers seen so far (so the caller can still try to report IOERR).
    func walk(_ head: UInt16, into chain: inout DescriptorChain) throws(ChainFault) {
        chain.reset(head: head)
        var i = head
        var ttl = size
        var total: UInt64 = 0
        while true {
            guard Int(i) < size else { throw .indexOutOfRange(i) }
            guard ttl > 0 else { throw .loop(head: head) }
            ttl -= 1
            let o = desc + 16 * Int(i)
            let addr = mem.load64(o), len = mem.load32(o + 8), flags = mem.load16(o + 12), next = mem.load16(o + 14)
            if flags & DescriptorFlags.indirect != 0 { throw .indirectNotNegotiated(index: i) }
            guard let off = mem.offset(ofDeviceAddress: addr, length: Int(len)) else { throw .addressOutOfRange(address: addr, length: len) }
            total += UInt64(len)
            guard total <= UInt64(UInt32.max) else { throw .tooLong(bytes: total) }
            if flags & DescriptorFlags.write != 0 {
                chain.writable.append(MemorySegment(offset: off, length: Int(len)))
                chain.writableBytes += Int(len)
            } else {
                guard chain.writable.isEmpty else { throw .readableAfterWritable(index: i) }
                chain.readable.append(MemorySegment(offset: off, length: Int(len)))
                chain.readableBytes += Int(len)
            }
            if flags & DescriptorFlags.next == 0 { return }
            i = next
        }
    }

    /// Puts one used element (not yet visible to the driver).
    func pushUsed(head: UInt16, length: UInt32) {
        let e = used + 4 + 8 * (Int(usedIdx) & (size - 1))
        mem.store32(e, UInt32(head))
        mem.store32(e + 4, length)
        usedIdx &+= 1
    }

    /// Publishes used entries; returns whether the driver wants an interrupt (§2.7.10).
    func publishUsed() -> Bool {
        Fence.release()
        mem.store16Release(used + 2, usedIdx)
        Fence.full()
        let old = lastSignalledUsed
        lastSignalledUsed = usedIdx
        if old == usedIdx { return false }
        if eventIndex {
            let usedEvent = mem.load16(avail + 4 + 2 * size)
            return SplitVirtqueue.needEvent(event: usedEvent, new: usedIdx, old: old)
        }
        return mem.load16(avail) & 1 == 0   // VIRTQ_AVAIL_F_NO_INTERRUPT
    }

    /// Without EVENT_IDX: VIRTQ_USED_F_NO_NOTIFY while the device is busy anyway.
    func setNotifications(enabled: Bool) {
        if eventIndex { return }
        mem.store16(used, enabled ? 0 : 1)
        Fence.full()
    }

    var hasAvailable: Bool { mem.load16Acquire(avail + 2) != lastAvail }
}
