// The driver side of a split virtqueue (VIRTIO 1.2 §2.7).
//
// Layout (§2.7.5–2.7.8), all little-endian:
//   virtq_desc  {le64 addr; le32 len; le16 flags; le16 next}      16 B each, table aligned 16
//   virtq_avail {le16 flags; le16 idx; le16 ring[N]; le16 used_event}       aligned 2
//   virtq_used  {le16 flags; le16 idx; {le32 id; le32 len} ring[N]; le16 avail_event}  aligned 4
//
// The driver never trusts device-writable memory for its own bookkeeping: the free list and the
// shape of every chain live in a private shadow (like Linux's desc_extra), and every id the device
// returns through the used ring is checked against it.

/// One buffer of a chain.
public struct VirtqueueSegment: Sendable {
    public var address: UInt64
    public var length: UInt32
    public var deviceWritable: Bool
    public init(address: UInt64, length: UInt32, deviceWritable: Bool) {
        self.address = address
        self.length = length
        self.deviceWritable = deviceWritable
    }
}

/// The device broke the ring protocol. The queue cannot be trusted afterwards (§2.1.2: reset it).
public enum VirtqueueError: Error, CustomStringConvertible, Equatable {
    case usedIDOutOfRange(id: UInt32, queueSize: Int)
    case usedIDNotInFlight(id: UInt16)
    case usedIndexRunaway(used: UInt16, lastSeen: UInt16, queueSize: Int)
    case usedLengthTooLarge(id: UInt16, length: UInt32, writable: UInt32)

    public var description: String {
        switch self {
        case .usedIDOutOfRange(let id, let n):
            return
                "device returned used id \(id), but the queue has only \(n) descriptors; the device is faulty and must be reset"
        case .usedIDNotInFlight(let id):
            return
                "device returned descriptor \(id), which is not the head of an in-flight chain; the device is faulty and must be reset"
        case .usedIndexRunaway(let u, let l, let n):
            return
                "used.idx moved from \(l) to \(u), more than the queue size \(n); the device is faulty and must be reset"
        case .usedLengthTooLarge(let id, let len, let w):
            return "device reported \(len) bytes written to chain \(id), which has only \(w) writable bytes"
        }
    }
}

public enum DescriptorFlags {
    public static let next: UInt16 = 1
    public static let write: UInt16 = 2
    public static let indirect: UInt16 = 4
}

/// Byte sizes of the three areas for a queue of `size` entries.
public struct SplitRingLayout: Sendable {
    public let size: Int
    public init(size: Int) { self.size = size }
    public var descriptorTableBytes: Int { 16 * size }
    public var availBytes: Int { 6 + 2 * size }
    public var usedBytes: Int { 6 + 8 * size }
    public static func isValidSize(_ n: Int) -> Bool { n > 0 && n <= 32768 && n & (n - 1) == 0 }
}

public final class SplitVirtqueue: DriverVirtqueue {
    public let size: Int
    public let descriptors: DMARegion
    public let availRing: DMARegion
    public let usedRing: DMARegion
    private let mem: SharedMemory

    private struct Shadow {
        var next: UInt16 = 0
        var chainLength: UInt16 = 0 // > 0 only on the head of an in-flight chain
        var writableBytes: UInt32 = 0
    }
    // The ring state below has no dynamic exclusivity checks (@exclusivity(unchecked)): a ring is
    // used only under its owner's lock (the driver's lane lock), no method lends it out inout, and
    // the checks cost ~3 % of the instructions of a 4 KiB request (Scripts/profile).
    @exclusivity(unchecked) private var shadow: [Shadow]
    @exclusivity(unchecked) private var freeHead: UInt16 = 0
    @exclusivity(unchecked) public private(set) var freeCount: Int
    @exclusivity(unchecked) private var availIdx: UInt16 = 0 // our copy of avail.idx
    @exclusivity(unchecked) private var lastKickIdx: UInt16 = 0 // avail.idx at the last notification decision
    @exclusivity(unchecked) private var lastUsedIdx: UInt16 = 0
    /// Whether VIRTIO_F_EVENT_IDX was negotiated (§2.7.10).
    @exclusivity(unchecked) public var eventIndex = false
    @exclusivity(unchecked) private var interruptsOn = true

    public init(arena: DMAArena, size: Int) throws {
        precondition(SplitRingLayout.isValidSize(size), "queue size must be a power of two up to 32768")
        let l = SplitRingLayout(size: size)
        self.size = size
        self.mem = arena.memory
        descriptors = try arena.allocate(l.descriptorTableBytes, alignment: 16)
        availRing = try arena.allocate(l.availBytes, alignment: 2)
        usedRing = try arena.allocate(l.usedBytes, alignment: 4)
        shadow = (0..<size).map { Shadow(next: UInt16(truncatingIfNeeded: $0 + 1)) }
        freeCount = size
    }

    @inline(__always) private func descOffset(_ i: UInt16) -> Int { descriptors.offset + 16 * Int(i) }

    public var addresses: QueueAddresses {
        QueueAddresses(
            descriptors: descriptors.deviceAddress, driverArea: availRing.deviceAddress,
            deviceArea: usedRing.deviceAddress)
    }

    /// Adds a chain of `count` segments; returns the head id, or nil when too few descriptors are free.
    /// Device-readable segments must come before device-writable ones (§2.7.4.2). With `indirect`
    /// the chain is written into that table (§2.7.5.3) and takes one ring descriptor.
    public func add(count: Int, indirect: DMARegion? = nil, segment: (Int) -> VirtqueueSegment) -> UInt16? {
        let ringCount = indirect == nil ? count : 1
        guard count > 0, ringCount <= freeCount else { return nil }
        let head = freeHead
        var writable: UInt32 = 0
        if let table = indirect {
            precondition(
                table.length >= 16 * count && count <= 0xFFFF, "indirect table too small for \(count) segments")
            for k in 0..<count {
                let s = segment(k)
                let o = table.offset + 16 * k
                var flags: UInt16 = s.deviceWritable ? DescriptorFlags.write : 0
                if k < count - 1 { flags |= DescriptorFlags.next }
                mem.store64(o, s.address)
                mem.store32(o + 8, s.length)
                mem.store16(o + 12, flags)
                mem.store16(o + 14, UInt16(truncatingIfNeeded: k + 1))
                if s.deviceWritable { writable &+= s.length }
            }
            let o = descOffset(head)
            mem.store64(o, table.deviceAddress)
            mem.store32(o + 8, UInt32(16 * count))
            mem.store16(o + 12, DescriptorFlags.indirect)
            mem.store16(o + 14, 0)
            freeHead = shadow[Int(head)].next
        } else {
            var i = head
            for k in 0..<count {
                let s = segment(k)
                let o = descOffset(i)
                let next = shadow[Int(i)].next
                var flags: UInt16 = s.deviceWritable ? DescriptorFlags.write : 0
                if k < count - 1 { flags |= DescriptorFlags.next }
                mem.store64(o, s.address)
                mem.store32(o + 8, s.length)
                mem.store16(o + 12, flags)
                mem.store16(o + 14, next)
                if s.deviceWritable { writable &+= s.length }
                if k < count - 1 { i = next } else { freeHead = next }
            }
        }
        freeCount -= ringCount
        shadow[Int(head)].chainLength = UInt16(ringCount)
        inFlightCount += 1
        shadow[Int(head)].writableBytes = writable
        // The avail ring entry; avail.idx is published separately so that many chains go out at once.
        mem.store16(availRing.offset + 4 + 2 * (Int(availIdx) & (size - 1)), head)
        availIdx &+= 1
        return head
    }

    /// Publishes every chain added since the last call. Returns whether the device wants a notification.
    public func publish() -> Bool {
        Fence.release() // descriptors and ring entries before idx
        mem.store16Release(availRing.offset + 2, availIdx)
        Fence.full() // idx before reading the device's suppression state
        let old = lastKickIdx
        lastKickIdx = availIdx
        if old == availIdx { return false }
        if eventIndex {
            let availEvent = mem.load16(usedRing.offset + 4 + 8 * size)
            return Self.needEvent(event: availEvent, new: availIdx, old: old)
        }
        return mem.load16(usedRing.offset) & 1 == 0 // VIRTQ_USED_F_NO_NOTIFY
    }

    /// vring_need_event (§2.7.10): true if `event` lies in (old, new].
    @inline(__always) public static func needEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- event &- 1) < (new &- old)
    }

    /// Takes the next used element, validated against the shadow, and frees its chain.
    public func nextUsed() throws(VirtqueueError) -> (id: UInt16, length: UInt32)? {
        let usedIdx = mem.load16Acquire(usedRing.offset + 2)
        if usedIdx == lastUsedIdx { return nil }
        guard Int(usedIdx &- lastUsedIdx) <= size else {
            throw .usedIndexRunaway(used: usedIdx, lastSeen: lastUsedIdx, queueSize: size)
        }
        let e = usedRing.offset + 4 + 8 * (Int(lastUsedIdx) & (size - 1))
        let id = mem.load32(e)
        let len = mem.load32(e + 4)
        guard id < UInt32(size) else { throw .usedIDOutOfRange(id: id, queueSize: size) }
        let head = UInt16(id)
        let n = shadow[Int(head)].chainLength
        guard n > 0 else { throw .usedIDNotInFlight(id: head) }
        let writable = shadow[Int(head)].writableBytes
        lastUsedIdx &+= 1
        // Free the chain from the shadow; the table in shared memory is never read back.
        var tail = head
        for _ in 1..<Int(n) { tail = shadow[Int(tail)].next }
        shadow[Int(tail)].next = freeHead
        freeHead = head
        freeCount += Int(n)
        shadow[Int(head)].chainLength = 0
        inFlightCount -= 1
        if eventIndex && interruptsOn { mem.store16(availRing.offset + 4 + 2 * size, lastUsedIdx) } // used_event
        guard len <= writable else { throw .usedLengthTooLarge(id: head, length: len, writable: writable) }
        return (head, len)
    }

    public func reset() {
        mem.zero(descriptors.offset, count: descriptors.length)
        mem.zero(availRing.offset, count: availRing.length)
        mem.zero(usedRing.offset, count: usedRing.length)
        shadow = (0..<size).map { Shadow(next: UInt16(truncatingIfNeeded: $0 + 1)) }
        freeHead = 0
        freeCount = size
        inFlightCount = 0
        availIdx = 0
        lastKickIdx = 0
        lastUsedIdx = 0
        interruptsOn = true
    }

    /// The head id the next `add` will use (the first free descriptor).
    public var nextFreeID: UInt16 { freeHead }

    /// Without EVENT_IDX: VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7). With it, used_event goes one
    /// behind the used entries taken: the device's check (`needEvent`, §2.7.10) is then false for
    /// any new entries, since the driver has seen everything up to its last check and more.
    public func disableInterrupts() {
        interruptsOn = false
        if eventIndex {
            mem.store16(availRing.offset + 4 + 2 * size, lastUsedIdx &- 1)
        } else {
            mem.store16(availRing.offset, 1)
        }
    }

    public func enableInterrupts() -> Bool {
        interruptsOn = true
        if eventIndex {
            mem.store16(availRing.offset + 4 + 2 * size, lastUsedIdx)
        } else {
            mem.store16(availRing.offset, 0)
        }
        Fence.full() // the request before re-checking used.idx
        return mem.load16Acquire(usedRing.offset + 2) != lastUsedIdx
    }

    @exclusivity(unchecked) public private(set) var inFlightCount = 0
}
