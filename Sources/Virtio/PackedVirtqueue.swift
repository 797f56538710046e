// The driver side of a packed virtqueue (VIRTIO 1.2 §2.8), negotiated with VIRTIO_F_RING_PACKED.
//
// Layout (§2.8.10, §2.8.13, §2.8.14), all little-endian:
//   pvirtq_desc           {le64 addr; le32 len; le16 id; le16 flags}   16 B each, ring aligned 16
//   pvirtq_event_suppress {le16 desc_event_off:15 | desc_event_wrap:1; le16 desc_event_flags}
//                         4 B each, aligned 4: the driver area (written by the driver, read by
//                         the device) and the device area (written by the device).
//
// One ring holds both directions: the driver writes available descriptors in ring order and the
// device overwrites them with used descriptors, one per buffer, in completion order (§2.8.9).
// Whether a slot is available or used is told by its AVAIL/USED flag bits compared with a
// one-bit wrap counter on each side (§2.8.1). The queue size need not be a power of two (§2.8.10).
//
// As with the split ring, the driver never trusts device-writable memory for its bookkeeping: the
// free ids, the number of ring slots each buffer occupies and its writable byte count live in a
// private shadow, and every id the device returns is checked against it. Ring positions are only
// ever advanced by the driver's own slot counts, so a faulty device cannot make them run away.

extension DescriptorFlags {
    /// Packed ring: the descriptor is available when AVAIL equals the driver's wrap counter and
    /// USED does not (§2.8.1).
    public static let avail: UInt16 = 1 << 7
    /// Packed ring: the descriptor is used when AVAIL and USED both equal the device's wrap counter.
    public static let used: UInt16 = 1 << 15
}

/// `desc_event_flags` of a packed ring's event suppression structures (§2.8.10).
public enum RingEventFlags {
    /// Notify (interrupt) on every new buffer.
    public static let enable: UInt16 = 0
    /// Do not notify.
    public static let disable: UInt16 = 1
    /// Notify when the descriptor at `desc_event_off`/`desc_event_wrap` is made available or used.
    /// Only with VIRTIO_F_EVENT_IDX.
    public static let desc: UInt16 = 2
    /// Bit 15 of `desc_event_off_wrap` is the wrap counter; bits 0–14 the ring offset.
    public static let wrapBit: UInt16 = 1 << 15
}

/// Byte sizes of the three areas for a packed queue of `size` entries (§2.8.10).
public struct PackedRingLayout: Sendable {
    public let size: Int
    public init(size: Int) { self.size = size }
    public var descriptorRingBytes: Int { 16 * size }
    /// Each event suppression structure.
    public static let eventSuppressionBytes = 4
    /// §2.8: up to 2^15 entries, any number (not only powers of two).
    public static func isValidSize(_ n: Int) -> Bool { n > 0 && n <= 32768 }

    /// The flags value that makes a descriptor available under `wrap` (§2.8.1): AVAIL = wrap, USED = !wrap.
    @inline(__always) public static func availBits(wrap: Bool) -> UInt16 {
        wrap ? DescriptorFlags.avail : DescriptorFlags.used
    }
    /// The flags value that marks a descriptor used under `wrap` (§2.8.1): AVAIL = USED = wrap.
    @inline(__always) public static func usedBits(wrap: Bool) -> UInt16 {
        wrap ? DescriptorFlags.avail | DescriptorFlags.used : 0
    }
    /// Whether `flags` shows a descriptor made available under the driver wrap counter `wrap`.
    @inline(__always) public static func isAvailable(_ flags: UInt16, wrap: Bool) -> Bool {
        (flags & DescriptorFlags.avail != 0) == wrap && (flags & DescriptorFlags.used != 0) != wrap
    }
    /// Whether `flags` shows a descriptor used under the device wrap counter `wrap`.
    @inline(__always) public static func isUsed(_ flags: UInt16, wrap: Bool) -> Bool {
        (flags & DescriptorFlags.avail != 0) == wrap && (flags & DescriptorFlags.used != 0) == wrap
    }

    /// The event suppression decision with VIRTIO_F_EVENT_IDX (§2.8.10, as Linux's
    /// virtqueue_kick_prepare_packed): `offWrap` names the descriptor the peer wants to hear about;
    /// `new` is our next ring position under `wrap`, and `added` slots were made available (or
    /// used) since the last decision. True if the named descriptor is among those slots.
    @inline(__always) public static func needEvent(offWrap: UInt16, new: Int, wrap: Bool, added: Int, size: Int) -> Bool
    {
        var event = offWrap & ~RingEventFlags.wrapBit
        // An event index from the previous lap.
        if (offWrap & RingEventFlags.wrapBit != 0) != wrap { event &-= UInt16(truncatingIfNeeded: size) }
        let new16 = UInt16(truncatingIfNeeded: new)
        let old16 = new16 &- UInt16(truncatingIfNeeded: added)
        return SplitVirtqueue.needEvent(event: event, new: new16, old: old16)
    }

    /// `desc_event_off_wrap` for ring position `position` under wrap counter `wrap`.
    @inline(__always) public static func offWrap(position: Int, wrap: Bool) -> UInt16 {
        UInt16(truncatingIfNeeded: position) | (wrap ? RingEventFlags.wrapBit : 0)
    }
}

public final class PackedVirtqueue: DriverVirtqueue {
    public let size: Int
    /// The descriptor ring (descriptor area).
    public let descriptors: DMARegion
    /// The driver event suppression structure (driver area): written here, read by the device.
    public let driverEvent: DMARegion
    /// The device event suppression structure (device area): written by the device, read here.
    public let deviceEvent: DMARegion
    private let mem: SharedMemory

    private struct Shadow {
        var nextFreeID: UInt16 = 0
        var ringSlots: UInt16 = 0 // > 0 only while the buffer is in flight
        var writableBytes: UInt32 = 0
    }
    /// Indexed by buffer id (§2.8.6). Free ids form a LIFO list through `nextFreeID`.
    // The ring state below has no dynamic exclusivity checks (@exclusivity(unchecked)): a ring is
    // used only under its owner's lock (the driver's lane lock), no method lends it out inout, and
    // the checks cost ~3 % of the instructions of a 4 KiB request (Scripts/profile).
    @exclusivity(unchecked) private var shadow: [Shadow]
    @exclusivity(unchecked) private var freeIDHead: UInt16 = 0
    @exclusivity(unchecked) public private(set) var freeCount: Int
    @exclusivity(unchecked) public private(set) var inFlightCount = 0

    // Driver side of the ring (§2.8.1): the next slot to make available and the driver wrap counter.
    @exclusivity(unchecked) private var nextAvail = 0
    @exclusivity(unchecked) private var availWrap = true
    // Where the device writes the next used descriptor, and the wrap counter it will use there.
    @exclusivity(unchecked) private var nextUsedPos = 0
    @exclusivity(unchecked) private var usedWrap = true

    /// Heads added since the last `publish`: their flags are written last (§2.8.21.1) so the device
    /// never sees a partial chain, and all at once so that a batch is one decision.
    @exclusivity(unchecked) private var pendingHeads: [(offset: Int, flags: UInt16)] = []
    @exclusivity(unchecked) private var pendingSlots = 0

    /// Whether VIRTIO_F_EVENT_IDX was negotiated (§2.8.10). Setting it rewrites the driver area.
    public var eventIndex = false { didSet { writeDriverEvent() } }
    @exclusivity(unchecked) private var interruptsOn = true

    public init(arena: DMAArena, size: Int) throws {
        precondition(PackedRingLayout.isValidSize(size), "packed queue size must be 1...32768")
        let l = PackedRingLayout(size: size)
        self.size = size
        self.mem = arena.memory
        descriptors = try arena.allocate(l.descriptorRingBytes, alignment: 16) // §2.8.10.1
        driverEvent = try arena.allocate(PackedRingLayout.eventSuppressionBytes, alignment: 4)
        deviceEvent = try arena.allocate(PackedRingLayout.eventSuppressionBytes, alignment: 4)
        shadow = (0..<size).map { Shadow(nextFreeID: UInt16(truncatingIfNeeded: $0 + 1)) }
        freeCount = size
    }

    @inline(__always) private func descOffset(_ position: Int) -> Int { descriptors.offset + 16 * position }

    public func reset() {
        mem.zero(descriptors.offset, count: descriptors.length)
        mem.zero(driverEvent.offset, count: driverEvent.length)
        mem.zero(deviceEvent.offset, count: deviceEvent.length)
        shadow = (0..<size).map { Shadow(nextFreeID: UInt16(truncatingIfNeeded: $0 + 1)) }
        freeIDHead = 0
        freeCount = size
        inFlightCount = 0
        nextAvail = 0
        availWrap = true
        nextUsedPos = 0
        usedWrap = true
        pendingHeads.removeAll(keepingCapacity: true)
        pendingSlots = 0
        interruptsOn = true
        writeDriverEvent()
    }

    public var addresses: QueueAddresses {
        QueueAddresses(
            descriptors: descriptors.deviceAddress, driverArea: driverEvent.deviceAddress,
            deviceArea: deviceEvent.deviceAddress)
    }

    /// The buffer id the next `add` will use.
    public var nextFreeID: UInt16 { freeIDHead }

    /// Adds a chain of `count` segments; returns its buffer id, or nil when too few ring slots are
    /// free. Device-readable segments must come before device-writable ones (§2.8.17). With
    /// `indirect` the segments go into that table, sequentially in the packed descriptor layout
    /// (§2.8.19), and the ring gets one descriptor. The chain is made visible by `publish`.
    public func add(count: Int, indirect: DMARegion? = nil, segment: (Int) -> VirtqueueSegment) -> UInt16? {
        let ringCount = indirect == nil ? count : 1
        guard count > 0, ringCount <= freeCount else { return nil }
        // At most `size` buffers are in flight, each on at least one slot, so an id is always free here.
        let id = freeIDHead
        var writable: UInt32 = 0
        let headOffset = descOffset(nextAvail)
        let headFlags: UInt16
        if let table = indirect {
            precondition(
                table.length >= 16 * count && 16 * count <= Int(UInt32.max),
                "indirect table too small for \(count) segments")
            for k in 0..<count {
                let s = segment(k)
                let o = table.offset + 16 * k
                // Only WRITE is valid inside a packed indirect table; the id is reserved (§2.8.19).
                mem.store64(o, s.address)
                mem.store32(o + 8, s.length)
                mem.store16(o + 12, 0)
                mem.store16(o + 14, s.deviceWritable ? DescriptorFlags.write : 0)
                if s.deviceWritable { writable &+= s.length }
            }
            mem.store64(headOffset, table.deviceAddress)
            mem.store32(headOffset + 8, UInt32(16 * count))
            mem.store16(headOffset + 12, id)
            headFlags = DescriptorFlags.indirect | PackedRingLayout.availBits(wrap: availWrap)
            advanceAvail()
        } else {
            var first: UInt16 = 0
            for k in 0..<count {
                let s = segment(k)
                let o = descOffset(nextAvail)
                var flags: UInt16 =
                    (s.deviceWritable ? DescriptorFlags.write : 0) | PackedRingLayout.availBits(wrap: availWrap)
                if k < count - 1 { flags |= DescriptorFlags.next }
                mem.store64(o, s.address)
                mem.store32(o + 8, s.length)
                // §2.8.6 puts the id in the last descriptor; writing it in every one costs nothing.
                mem.store16(o + 12, id)
                if k == 0 { first = flags } else { mem.store16(o + 14, flags) }
                if s.deviceWritable { writable &+= s.length }
                advanceAvail()
            }
            headFlags = first
        }
        pendingHeads.append((headOffset, headFlags))
        pendingSlots += ringCount
        freeCount -= ringCount
        freeIDHead = shadow[Int(id)].nextFreeID
        shadow[Int(id)].ringSlots = UInt16(ringCount)
        shadow[Int(id)].writableBytes = writable
        inFlightCount += 1
        return id
    }

    @inline(__always) private func advanceAvail() {
        nextAvail += 1
        if nextAvail == size {
            nextAvail = 0
            availWrap.toggle()
        } // §2.8.1: toggle after the last slot
    }

    /// Makes every chain added since the last call visible: their head flags are written, the
    /// first head last with release semantics so the device sees the batch whole. Returns whether
    /// the device asked to be notified (§2.8.21.3).
    public func publish() -> Bool {
        guard let first = pendingHeads.first else { return false }
        Fence.release() // descriptor bodies before any head flags
        for h in pendingHeads.dropFirst().reversed() { mem.store16(h.offset + 14, h.flags) }
        mem.store16Release(first.offset + 14, first.flags)
        pendingHeads.removeAll(keepingCapacity: true)
        let added = pendingSlots
        pendingSlots = 0
        Fence.full() // flags before reading the device's suppression state (§2.8.21.3.1)
        let flags = mem.load16(deviceEvent.offset + 2) & 3
        if eventIndex && flags == RingEventFlags.desc {
            let offWrap = mem.load16(deviceEvent.offset)
            return PackedRingLayout.needEvent(
                offWrap: offWrap, new: nextAvail, wrap: availWrap, added: added, size: size)
        }
        return flags != RingEventFlags.disable // DESC without EVENT_IDX, or reserved: notify
    }

    /// Takes the next used buffer (§2.8.22), validated against the shadow, and frees its ring slots.
    public func nextUsed() throws(VirtqueueError) -> (id: UInt16, length: UInt32)? {
        let o = descOffset(nextUsedPos)
        let flags = mem.load16Acquire(o + 14)
        guard PackedRingLayout.isUsed(flags, wrap: usedWrap) else { return nil }
        let id = mem.load16(o + 12)
        // §2.8.4: the length is only meaningful when the device set WRITE.
        let len = flags & DescriptorFlags.write != 0 ? mem.load32(o + 8) : 0
        guard Int(id) < size else { throw .usedIDOutOfRange(id: UInt32(id), queueSize: size) }
        let slots = Int(shadow[Int(id)].ringSlots)
        guard slots > 0 else { throw .usedIDNotInFlight(id: id) }
        let writable = shadow[Int(id)].writableBytes
        // Skip the rest of the chain's slots (§2.8.2): the next used descriptor follows them.
        nextUsedPos += slots
        if nextUsedPos >= size {
            nextUsedPos -= size
            usedWrap.toggle()
        }
        freeCount += slots
        shadow[Int(id)].ringSlots = 0
        shadow[Int(id)].nextFreeID = freeIDHead
        freeIDHead = id
        inFlightCount -= 1
        if eventIndex && interruptsOn {
            mem.store16(driverEvent.offset, PackedRingLayout.offWrap(position: nextUsedPos, wrap: usedWrap))
        }
        guard len <= writable else { throw .usedLengthTooLarge(id: id, length: len, writable: writable) }
        return (id, len)
    }

    /// Writes the driver event suppression structure for the current state: DISABLE while
    /// interrupts are off; otherwise DESC at the next used position with EVENT_IDX, else ENABLE.
    private func writeDriverEvent() {
        if !interruptsOn {
            mem.store16(driverEvent.offset + 2, RingEventFlags.disable)
        } else if eventIndex {
            mem.store16(driverEvent.offset, PackedRingLayout.offWrap(position: nextUsedPos, wrap: usedWrap))
            Fence.release() // the offset before the flags that make it count
            mem.store16(driverEvent.offset + 2, RingEventFlags.desc)
        } else {
            mem.store16(driverEvent.offset + 2, RingEventFlags.enable)
        }
    }

    /// RING_EVENT_FLAGS_DISABLE in the driver area (§2.8.10), with or without EVENT_IDX.
    public func disableInterrupts() {
        interruptsOn = false
        writeDriverEvent()
    }

    public func enableInterrupts() -> Bool {
        interruptsOn = true
        writeDriverEvent()
        Fence.full() // the request before re-checking the ring (§2.8.22)
        return PackedRingLayout.isUsed(mem.load16Acquire(descOffset(nextUsedPos) + 14), wrap: usedWrap)
    }
}
