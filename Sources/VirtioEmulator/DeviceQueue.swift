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
    /// §2.7.5.3.1 / §2.8.19: an indirect descriptor with NEXT, a table length not a multiple of 16
    /// or empty, an INDIRECT entry inside a table, or a NEXT leaving the table.
    case badIndirect(index: UInt16, reason: String)
    /// Packed ring: a chain that does not end within the ring (§2.8.6).
    case unterminated(head: UInt16)
    /// Packed ring: a chain whose NEXT leads to a slot the driver has not made available, i.e. the
    /// head was exposed before the rest of the chain (§2.8.17.1).
    case notAvailable(head: UInt16, index: UInt16)

    public var description: String {
        switch self {
        case .indexOutOfRange(let i): return "descriptor index \(i) is outside the table"
        case .loop(let h): return "chain from \(h) is longer than the queue (a loop)"
        case .addressOutOfRange(let a, let l): return "buffer 0x\(String(a, radix: 16))+\(l) lies outside driver memory"
        case .readableAfterWritable(let i):
            return "descriptor \(i) is device-readable but follows a device-writable one"
        case .indirectNotNegotiated(let i): return "descriptor \(i) is INDIRECT, which was not negotiated"
        case .tooLong(let b): return "chain totals \(b) bytes, more than 2^32"
        case .badIndirect(let i, let why): return "indirect descriptor \(i): \(why)"
        case .unterminated(let h): return "chain from \(h) never clears NEXT within the ring"
        case .notAvailable(let h, let i):
            return "chain from \(h) continues into descriptor \(i), which the driver has not made available"
        }
    }
}

/// Faults that make the whole queue unusable until reset (the device sets DEVICE_NEEDS_RESET).
public enum QueueFault: Error, Equatable, CustomStringConvertible {
    case availIndexRunaway(avail: UInt16, lastSeen: UInt16, size: Int)
    case headOutOfRange(UInt16)
    /// Packed ring: a buffer id outside 0..<size, or one already in flight (§2.8.6).
    case badBufferID(UInt16)
    public var description: String {
        switch self {
        case .availIndexRunaway(let a, let l, let n):
            return "avail.idx jumped from \(l) to \(a), more than the queue size \(n)"
        case .headOutOfRange(let h): return "avail ring names head \(h), outside the table"
        case .badBufferID(let id):
            return "packed ring names buffer id \(id), which is out of range or already in flight"
        }
    }
}

/// A walked chain: device-readable then device-writable buffers.
struct DescriptorChain {
    /// The id the chain is completed with (split: head index; packed: buffer id).
    var head: UInt16 = 0
    /// Ring descriptors the chain occupies (packed rings skip this many used slots; split: unused).
    var ringSlots = 1
    /// Why the chain is unusable; it is still completed (with IOERR if it has a writable byte).
    var fault: ChainFault?
    var readable: [MemorySegment] = []
    var writable: [MemorySegment] = []
    var readableBytes = 0
    var writableBytes = 0
    mutating func reset(head: UInt16) {
        self.head = head
        ringSlots = 1
        fault = nil
        readable.removeAll(keepingCapacity: true)
        writable.removeAll(keepingCapacity: true)
        readableBytes = 0
        writableBytes = 0
    }

    /// Adds one buffer after checking it lies in memory and keeps readable-before-writable order.
    mutating func append(mem: SharedMemory, address: UInt64, length: UInt32, writable w: Bool, index: UInt16)
        throws(ChainFault)
    {
        guard let off = mem.offset(ofDeviceAddress: address, length: Int(length)) else {
            throw .addressOutOfRange(address: address, length: length)
        }
        guard UInt64(readableBytes) + UInt64(writableBytes) + UInt64(length) <= UInt64(UInt32.max) else {
            throw .tooLong(bytes: UInt64(readableBytes) + UInt64(writableBytes) + UInt64(length))
        }
        if w {
            writable.append(MemorySegment(offset: off, length: Int(length)))
            writableBytes += Int(length)
        } else {
            guard writable.isEmpty else { throw .readableAfterWritable(index: index) }
            readable.append(MemorySegment(offset: off, length: Int(length)))
            readableBytes += Int(length)
        }
    }
}

/// The device side of one virtqueue, split or packed. Owned by one device thread.
protocol DeviceVirtqueue: AnyObject {
    var mem: SharedMemory { get }
    /// VIRTIO_F_EVENT_IDX negotiated.
    var eventIndex: Bool { get set }
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    var indirect: Bool { get set }
    /// Takes the next available chain and walks it into `chain`. Returns false when none is
    /// available. A bad chain comes back with `chain.fault` set (it must still be completed); a
    /// fault that breaks the whole queue is thrown.
    func pop(into chain: inout DescriptorChain) throws(QueueFault) -> Bool
    /// Records one used buffer (not yet visible to the driver).
    func pushUsed(id: UInt16, ringSlots: Int, length: UInt32)
    /// Publishes used buffers; returns whether the driver wants an interrupt.
    func publishUsed() -> Bool
    /// Suppresses (false) or re-enables driver notifications while the device is busy.
    func setNotifications(enabled: Bool)
    /// Whether more chains are available (re-checked after re-enabling notifications).
    var hasAvailable: Bool { get }
}

/// Walks an indirect table (§2.7.5.3.1 for split; `packed` selects the §2.8.19 layout) into `chain`.
func walkIndirectTable(
    mem: SharedMemory, address: UInt64, length: UInt32, index: UInt16, packed: Bool,
    into chain: inout DescriptorChain
) throws(ChainFault) {
    guard length > 0, length % 16 == 0 else {
        throw .badIndirect(index: index, reason: "table length \(length) is not a non-zero multiple of 16")
    }
    guard let table = mem.offset(ofDeviceAddress: address, length: Int(length)) else {
        throw .addressOutOfRange(address: address, length: length)
    }
    let entries = Int(length / 16)
    var i = 0
    var ttl = entries
    while true {
        guard ttl > 0 else { throw .badIndirect(index: index, reason: "the table's chain loops") }
        ttl -= 1
        let o = table + 16 * i
        let addr = mem.load64(o)
        let len = mem.load32(o + 8)
        let flags = packed ? mem.load16(o + 14) : mem.load16(o + 12)
        if flags & DescriptorFlags.indirect != 0 {
            throw .badIndirect(index: index, reason: "entry \(i) is itself INDIRECT")
        }
        try chain.append(
            mem: mem, address: addr, length: len, writable: flags & DescriptorFlags.write != 0, index: index)
        if packed {
            // Packed tables are sequential: every entry is used, NEXT is not (§2.8.19).
            i += 1
            if i == entries { return }
        } else {
            if flags & DescriptorFlags.next == 0 { return }
            let next = Int(mem.load16(o + 14))
            guard next < entries else {
                throw .badIndirect(
                    index: index, reason: "entry \(i) points to \(next), outside the \(entries)-entry table")
            }
            i = next
        }
    }
}

final class DeviceSplitQueue: DeviceVirtqueue {
    let mem: SharedMemory
    let size: Int
    private let desc: Int, avail: Int, used: Int
    private var lastAvail: UInt16 = 0
    private var usedIdx: UInt16 = 0
    private var lastSignalledUsed: UInt16 = 0
    var eventIndex = false
    var indirect = false

    /// Validates the queue's placement (§2.7: alignment, and all three areas inside memory).
    init?(mem: SharedMemory, size: Int, descAddr: UInt64, driverAddr: UInt64, deviceAddr: UInt64) {
        guard SplitRingLayout.isValidSize(size) else { return nil }
        let l = SplitRingLayout(size: size)
        guard descAddr % 16 == 0, driverAddr % 2 == 0, deviceAddr % 4 == 0,
            let d = mem.offset(ofDeviceAddress: descAddr, length: l.descriptorTableBytes),
            let a = mem.offset(ofDeviceAddress: driverAddr, length: l.availBytes),
            let u = mem.offset(ofDeviceAddress: deviceAddr, length: l.usedBytes)
        else { return nil }
        // The used ring is the one area the device writes; if it overlapped the descriptor table
        // or the avail ring, the device's own used.idx / used.flags / avail_event stores would
        // make new buffers appear, and the device thread would feed itself forever (found by the
        // device fuzz target). The spec does not name this case; such a queue stays disabled.
        guard !overlaps(u, l.usedBytes, d, l.descriptorTableBytes), !overlaps(u, l.usedBytes, a, l.availBytes) else {
            return nil
        }
        self.mem = mem
        self.size = size
        desc = d
        avail = a
        used = u
    }

    /// The next available head, nil when the ring is empty.
    func popHead() throws(QueueFault) -> UInt16? {
        let idx = mem.load16Acquire(avail + 2)
        if idx == lastAvail { return nil }
        guard Int(idx &- lastAvail) <= size else {
            throw .availIndexRunaway(avail: idx, lastSeen: lastAvail, size: size)
        }
        let head = mem.load16(avail + 4 + 2 * (Int(lastAvail) & (size - 1)))
        lastAvail &+= 1
        if eventIndex { mem.store16(used + 4 + 8 * size, lastAvail) } // avail_event
        guard Int(head) < size else { throw .headOutOfRange(head) }
        return head
    }

    func pop(into chain: inout DescriptorChain) throws(QueueFault) -> Bool {
        guard let head = try popHead() else { return false }
        do { try walk(head, into: &chain) } catch { chain.fault = error }
        return true
    }

    /// Walks and validates the chain at `head` into `chain`. On a fault, `chain` holds the
    /// writable buffers seen so far (so the caller can still try to report IOERR).
    func walk(_ head: UInt16, into chain: inout DescriptorChain) throws(ChainFault) {
        chain.reset(head: head)
        var i = head
        var ttl = size
        while true {
            guard Int(i) < size else { throw .indexOutOfRange(i) }
            guard ttl > 0 else { throw .loop(head: head) }
            ttl -= 1
            let o = desc + 16 * Int(i)
            let addr = mem.load64(o)
            let len = mem.load32(o + 8)
            let flags = mem.load16(o + 12)
            let next = mem.load16(o + 14)
            if flags & DescriptorFlags.indirect != 0 {
                guard indirect else { throw .indirectNotNegotiated(index: i) }
                // §2.7.5.3.1: the driver must not set NEXT with INDIRECT; the table ends the chain.
                guard flags & DescriptorFlags.next == 0 else {
                    throw .badIndirect(index: i, reason: "INDIRECT together with NEXT")
                }
                try walkIndirectTable(mem: mem, address: addr, length: len, index: i, packed: false, into: &chain)
                return
            }
            try chain.append(
                mem: mem, address: addr, length: len, writable: flags & DescriptorFlags.write != 0, index: i)
            if flags & DescriptorFlags.next == 0 { return }
            i = next
        }
    }

    /// Puts one used element (not yet visible to the driver).
    func pushUsed(id head: UInt16, ringSlots: Int = 1, length: UInt32) {
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
        return mem.load16(avail) & 1 == 0 // VIRTQ_AVAIL_F_NO_INTERRUPT
    }

    /// Without EVENT_IDX: VIRTQ_USED_F_NO_NOTIFY while the device is busy anyway.
    func setNotifications(enabled: Bool) {
        if eventIndex { return }
        mem.store16(used, enabled ? 0 : 1)
        Fence.full()
    }

    var hasAvailable: Bool { mem.load16Acquire(avail + 2) != lastAvail }
}

/// Whether [a, a+alen) and [b, b+blen) share a byte.
@inline(__always) func overlaps(_ a: Int, _ alen: Int, _ b: Int, _ blen: Int) -> Bool { a < b + blen && b < a + alen }
