// The device side of a packed virtqueue (VIRTIO 1.2 §2.8). Every field the driver wrote — flags,
// ids, addresses, lengths, indirect tables — is hostile input: the ring walk is bounded by the
// queue size, buffer ids are checked against the device's own in-flight set, and every buffer is
// bounds-checked by `DescriptorChain.append`. Nothing here can trap on bad input.
import Virtio

final class DevicePackedQueue: DeviceVirtqueue {
    let mem: SharedMemory
    let size: Int
    /// Offsets of the descriptor ring, the driver event suppression structure (read here) and the
    /// device event suppression structure (written here), §2.8.10.
    private let desc: Int, driverEvent: Int, deviceEvent: Int

    // The next slot to poll for an available descriptor and the device's view of the driver wrap
    // counter there (§2.8.1, §2.8.2).
    private var lastAvail = 0
    private var availWrap = true
    // The next slot to write a used descriptor into and the Device Ring Wrap Counter (§2.8.1).
    private var usedPos = 0
    private var usedWrap = true
    /// Buffer ids popped and not yet pushed back; an id may not be reused while in flight (§2.8.6).
    private var inFlight: [Bool]

    /// Used descriptors pushed since the last `publishUsed`: id and length are written at once, the
    /// flags (which hand the slot to the driver) at publication, first one last (§2.8.21).
    private var pendingUsed: [(offset: Int, flags: UInt16)] = []
    private var pendingSlots = 0
    private var notificationsOn = true

    var eventIndex = false { didSet { writeDeviceEvent() } }
    var indirect = false

    /// Validates the queue's placement (§2.8.10.1: descriptor ring aligned 16, event suppression
    /// structures aligned 4, all three areas inside memory) and its size (1...32768, §2.8).
    init?(mem: SharedMemory, size: Int, descAddr: UInt64, driverAddr: UInt64, deviceAddr: UInt64) {
        guard PackedRingLayout.isValidSize(size) else { return nil }
        let l = PackedRingLayout(size: size)
        guard descAddr % 16 == 0, driverAddr % 4 == 0, deviceAddr % 4 == 0,
            let d = mem.offset(ofDeviceAddress: descAddr, length: l.descriptorRingBytes),
            let dr = mem.offset(ofDeviceAddress: driverAddr, length: PackedRingLayout.eventSuppressionBytes),
            let dv = mem.offset(ofDeviceAddress: deviceAddr, length: PackedRingLayout.eventSuppressionBytes)
        else { return nil }
        // The device event suppression area is written by the device on every notification
        // change; inside the descriptor ring those stores would flip AVAIL bits and the device
        // would feed itself forever (see DeviceSplitQueue). Such a queue stays disabled.
        guard !overlaps(dv, PackedRingLayout.eventSuppressionBytes, d, l.descriptorRingBytes) else { return nil }
        self.mem = mem
        self.size = size
        desc = d
        driverEvent = dr
        deviceEvent = dv
        inFlight = [Bool](repeating: false, count: size)
    }

    @inline(__always) private func descOffset(_ position: Int) -> Int { desc + 16 * position }

    /// Takes the next available buffer (§2.8.2) and walks it into `chain`. A chain that breaks the
    /// rules is returned with `chain.fault` set and must still be completed; a buffer id out of
    /// range or already in flight throws, since the device cannot complete it without corrupting
    /// another buffer.
    func pop(into chain: inout DescriptorChain) throws(QueueFault) -> Bool {
        let headFlags = mem.load16Acquire(descOffset(lastAvail) + 14)
        guard PackedRingLayout.isAvailable(headFlags, wrap: availWrap) else { return false }
        let head = UInt16(truncatingIfNeeded: lastAvail)

        // First the chain's extent: NEXT links consecutive slots (§2.8.17). It may span at most the
        // whole ring, and every descriptor in it must have been made available in this lap
        // (§2.8.17.1: the driver exposes the head only after the rest).
        var slots = 1
        var position = lastAvail
        var wrap = availWrap
        var flags = headFlags
        var extentFault: ChainFault?
        while flags & DescriptorFlags.next != 0 {
            guard slots < size else {
                extentFault = .unterminated(head: head)
                break
            }
            position += 1
            if position == size {
                position = 0
                wrap.toggle()
            }
            let f = mem.load16(descOffset(position) + 14)
            guard PackedRingLayout.isAvailable(f, wrap: wrap) else {
                // The slot after the last available one: the chain runs off what the driver exposed.
                extentFault = .notAvailable(head: head, index: UInt16(truncatingIfNeeded: position))
                position = position == 0 ? size - 1 : position - 1
                break
            }
            flags = f
            slots += 1
        }
        // §2.8.6: the buffer id is in the last descriptor of the chain.
        let id = mem.load16(descOffset(position) + 12)
        guard Int(id) < size, !inFlight[Int(id)] else { throw .badBufferID(id) }
        inFlight[Int(id)] = true

        // Consume the slots before walking, so that a faulty chain is still skipped as a whole.
        let first = lastAvail
        lastAvail += slots
        if lastAvail >= size {
            lastAvail -= size
            availWrap.toggle()
        }
        if eventIndex && notificationsOn {
            mem.store16(deviceEvent, PackedRingLayout.offWrap(position: lastAvail, wrap: availWrap))
        }

        chain.reset(head: id)
        chain.ringSlots = slots
        do { try walk(first: first, slots: slots, into: &chain) } catch { chain.fault = error }
        if chain.fault == nil, let f = extentFault { chain.fault = f }
        return true
    }

    /// Walks `slots` ring descriptors from `first` into `chain`. On a fault `chain` keeps the
    /// buffers seen so far (so the caller can still try to report IOERR).
    private func walk(first: Int, slots: Int, into chain: inout DescriptorChain) throws(ChainFault) {
        var position = first
        for _ in 0..<slots {
            let o = descOffset(position)
            let index = UInt16(truncatingIfNeeded: position)
            let addr = mem.load64(o)
            let len = mem.load32(o + 8)
            let flags = mem.load16(o + 14)
            if flags & DescriptorFlags.indirect != 0 {
                guard indirect else { throw .indirectNotNegotiated(index: index) }
                // §2.8.19.1: no INDIRECT descriptor inside a list linked by NEXT; WRITE on it is ignored.
                guard slots == 1 else { throw .badIndirect(index: index, reason: "INDIRECT in a chain linked by NEXT") }
                try walkIndirectTable(mem: mem, address: addr, length: len, index: index, packed: true, into: &chain)
                return
            }
            try chain.append(
                mem: mem, address: addr, length: len, writable: flags & DescriptorFlags.write != 0, index: index)
            position += 1
            if position == size { position = 0 }
        }
    }

    /// Writes one used descriptor at the next used position (§2.8.21: in completion order, one per
    /// buffer), not yet visible to the driver, and skips the rest of the chain's `ringSlots`.
    func pushUsed(id: UInt16, ringSlots: Int = 1, length: UInt32) {
        let o = descOffset(usedPos)
        mem.store32(o + 8, length)
        mem.store16(o + 12, id)
        // AVAIL = USED = the device wrap counter; WRITE says whether anything was written (§2.8.4).
        pendingUsed.append((o, PackedRingLayout.usedBits(wrap: usedWrap) | (length > 0 ? DescriptorFlags.write : 0)))
        let slots = min(max(ringSlots, 1), size)
        pendingSlots += slots
        usedPos += slots
        if usedPos >= size {
            usedPos -= size
            usedWrap.toggle()
        } // toggle after using the last slot
        if Int(id) < size { inFlight[Int(id)] = false }
    }

    /// Hands the pushed used descriptors to the driver (flags last, the batch's first one with
    /// release semantics) and returns whether the driver wants an interrupt (§2.8.10, §2.8.22).
    func publishUsed() -> Bool {
        guard let first = pendingUsed.first else { return false }
        Fence.release() // ids and lengths before any flags
        for u in pendingUsed.dropFirst().reversed() { mem.store16(u.offset + 14, u.flags) }
        mem.store16Release(first.offset + 14, first.flags)
        pendingUsed.removeAll(keepingCapacity: true)
        let added = pendingSlots
        pendingSlots = 0
        Fence.full() // flags before reading the driver's suppression state
        let flags = mem.load16(driverEvent + 2) & 3
        if eventIndex && flags == RingEventFlags.desc {
            return PackedRingLayout.needEvent(
                offWrap: mem.load16(driverEvent), new: usedPos, wrap: usedWrap, added: added, size: size)
        }
        return flags != RingEventFlags.disable
    }

    /// The device event suppression structure (§2.8.10): DISABLE while busy; otherwise DESC at the
    /// next slot to poll with EVENT_IDX, else ENABLE.
    func setNotifications(enabled: Bool) {
        notificationsOn = enabled
        writeDeviceEvent()
        Fence.full()
    }

    private func writeDeviceEvent() {
        if !notificationsOn {
            mem.store16(deviceEvent + 2, RingEventFlags.disable)
        } else if eventIndex {
            mem.store16(deviceEvent, PackedRingLayout.offWrap(position: lastAvail, wrap: availWrap))
            Fence.release()
            mem.store16(deviceEvent + 2, RingEventFlags.desc)
        } else {
            mem.store16(deviceEvent + 2, RingEventFlags.enable)
        }
    }

    var hasAvailable: Bool {
        PackedRingLayout.isAvailable(mem.load16Acquire(descOffset(lastAvail) + 14), wrap: availWrap)
    }

    /// Whether buffer `id` is popped and not yet pushed back (for tests).
    func isInFlight(_ id: UInt16) -> Bool { Int(id) < size && inFlight[Int(id)] }
}
