// Submission: a block command becomes a descriptor chain (header, data pages or segment, status)
// in the lane's per-id request slot; requests that do not fit wait, first come first served.
import Foundation
import Logging
import NIOCore
import Synchronization
import Virtio

extension VirtioBlkDriver {
    // MARK: submission

    enum Decision {
        case launch([Int32])
        /// On the ring already (a request with nothing to fill: a READ, FLUSH): ring the doorbell if given.
        case placed(QueueDoorbells?)
        case wait
        case fail(BlkError)
    }

    /// Issues one request on the calling thread's lane. `fill` runs before the request is made
    /// available (writes copy their data into the pages there); `done` runs on the completion
    /// thread with the pages, which return to the pool when it returns. Requests that do not fit
    /// wait, first come first served.
    public func submit(_ command: BlkCommand, fill: Fill? = nil, done: @escaping Completion) {
        submit(command, on: lanes[IOLane.current % lanes.count], fill: fill, keep: false, done: done)
    }

    /// Issues a READ whose pages stay taken after it completes: `done` gets them as `HeldPages`,
    /// which go back to the lane's pool when released (after the server has sent their bytes).
    public func submitHeld(_ command: BlkCommand, done: @escaping @Sendable (Result<HeldPages, BlkError>) -> Void) {
        guard case .read = command else { preconditionFailure("only READs hold their pages") }
        let lane = lanes[IOLane.current % lanes.count]
        submit(command, on: lane, fill: nil, keep: true) { r in
            done(r.map { HeldPages(io: $0, lane: lane, driver: self) })
        }
    }

    private func submit(_ command: BlkCommand, on lane: Lane, fill: Fill?, keep: Bool, done: @escaping Completion) {
        precondition(command.pages <= maxPagesPerRequest, "callers split requests to maxPagesPerRequest")
        // A `let`: a `var` the lock's closure captures would be boxed on the heap, per request.
        let p = Pending(command: command, fill: fill, done: done, keep: keep)
        let d: Decision = lane.state.withLock { s in
            if let b = s.broken { return .fail(.deviceBroken(b)) }
            if s.closing { return .fail(.shutdown) }
            s.inFlight += 1
            if !s.resetting, s.waiting.isEmpty, let pages = reserve(&s, lane, command) {
                // Nothing to copy in first: onto the ring under this same lock (one lock per request).
                if fill == nil {
                    s.reservedDescriptors -= ringCost(lane, command)
                    return .placed(enqueue(&s, lane, p, pages))
                }
                return .launch(pages)
            }
            s.waiting.append(p)
            return .wait
        }
        switch d {
        case .launch(let pages): launch(lane, p, pages)
        case .placed(let kick): notify(lane, kick)
        case .fail(let e): done(.failure(e))
        case .wait: break
        }
    }

    func isSegmentCommand(_ c: BlkCommand) -> Bool {
        if case .discard = c { return true }
        if case .writeZeroes = c { return true }
        return false
    }
    func descriptorCount(_ c: BlkCommand) -> Int { c.pages + 2 + (isSegmentCommand(c) ? 1 : 0) }
    /// Requests of more than one data page go through an indirect table when there is one.
    @inline(__always) private func goesIndirect(_ lane: Lane, _ c: BlkCommand) -> Bool {
        lane.tables != nil && descriptorCount(c) > 3
    }
    func ringCost(_ lane: Lane, _ c: BlkCommand) -> Int {
        ringDescriptors(segments: descriptorCount(c), indirect: goesIndirect(lane, c))
    }

    /// Takes pages and reserves ring descriptors, or returns nil if either is short.
    func reserve(_ s: inout LaneState, _ lane: Lane, _ c: BlkCommand, pages given: [Int32]? = nil) -> [Int32]? {
        let descs = ringCost(lane, c)
        guard s.queue.freeCount - s.reservedDescriptors >= descs, given != nil || s.pool.count >= c.pages else {
            return nil
        }
        s.reservedDescriptors += descs
        if let g = given { return g }
        guard let pages = s.pool.take(c.pages) else { preconditionFailure("the pool count was checked") }
        return pages
    }

    /// Fills data (outside the lock), builds the chain, publishes it and kicks if the device wants.
    func launch(_ lane: Lane, _ p: Pending, _ pages: [Int32]) {
        if p.pages == nil, let fill = p.fill { fill(IOPages(pages: pages, memory: arena.memory, arena: arena)) }
        var failed: DeviceFailure?
        let kick: QueueDoorbells? = lane.state.withLock { s in
            s.reservedDescriptors -= ringCost(lane, p.command)
            if let why = s.broken {
                // A reset failed between reserve and launch: the request is in neither the slots
                // nor the waiting list the failure went through, so it fails here (else it would
                // go onto a dead ring and never be answered).
                s.pool.give(pages)
                s.inFlight -= 1
                failed = why
                return nil
            }
            if s.resetting {
                // The device went away between reserve and launch: wait for the reset, data kept.
                var again = p
                again.pages = pages
                s.waiting.append(again)
                return nil
            }
            return enqueue(&s, lane, p, pages)
        }
        if let why = failed { return p.done(.failure(.deviceBroken(why))) }
        notify(lane, kick)
    }

    /// Builds the request's chain in its per-id slot, adds it to the ring (descriptors reserved)
    /// and publishes it; returns the doorbell if the device wants a notification. Under the lane's lock.
    /// The caller has given back the descriptors `reserve` set aside for it (they are taken now).
    private func enqueue(_ s: inout LaneState, _ lane: Lane, _ p: Pending, _ pages: [Int32]) -> QueueDoorbells? {
        let n = descriptorCount(p.command)
        let indirect = goesIndirect(lane, p.command)
        let lastPageBytes = lastPageLength(p.command)
        if lastPageBytes < Self.pageSize, case .read = p.command {
            // The device fills only the sectors it has; the rest of the page reads as zero.
            arena.memory.zero(
                arena.pageOffset(pages[pages.count - 1]) + lastPageBytes, count: Self.pageSize - lastPageBytes)
        }
        // Header and status live in the per-id slot of the chain add() is about to build.
        let id = Int(s.queue.nextFreeID)
        let slot = BlkRequestSlot(id: id, base: lane.headers.offset, device: lane.headers.deviceAddress)
        writeSlot(slot, p.command)
        let table = indirect ? lane.tables!.slice(at: lane.tableStride * id, length: lane.tableStride) : nil
        let got = s.queue.add(count: n, indirect: table) { k in
            chainSegment(k, of: n, slot: slot, command: p.command, pages: pages, lastPageBytes: lastPageBytes)
        }
        precondition(got.map(Int.init) == id, "reserved descriptors must be available")
        s.slots[id] = Slot(
            pages: pages, done: p.done, command: p.command, submitted: .now, resubmissions: p.resubmissions,
            keep: p.keep)
        guard s.queue.publish() else { return nil }
        return doorbell(&s)
    }

    /// The doorbell a publish asked for: none yet while plugged (the unplug rings it). Under the lane's lock.
    private func doorbell(_ s: inout LaneState) -> QueueDoorbells? {
        if s.plugs > 0 {
            // Plugged: the requests that follow go on the ring first, then one doorbell.
            s.deferredKick = true
            return nil
        }
        if s.doorbells.completesOnKick && reapedByCaller && !s.polled && !s.quietKick {
            // The device completes this on the kick and the kicker reaps at once: an interrupt
            // would only wake the event loop for nothing (three system calls per request at QD1).
            s.queue.disableInterrupts()
            s.quietKick = true
        }
        return s.doorbells
    }

    /// Holds the calling thread's lane's doorbell until `unplug()`: the requests issued meanwhile
    /// (one socket read's worth, say) reach the device with one notification, and a device that
    /// completes on the kick answers them in one pass, reaped once (Linux's block-layer plugging).
    /// Every `plug()` must be matched by an `unplug()` on the same thread.
    public func plug() {
        lanes[IOLane.current % lanes.count].state.withLock { $0.plugs += 1 }
    }

    /// Lets the doorbell go: rings it if a request published while plugged asked for it.
    public func unplug() {
        let lane = lanes[IOLane.current % lanes.count]
        let kick: QueueDoorbells? = lane.state.withLock { s in
            precondition(s.plugs > 0, "unplug without plug")
            s.plugs -= 1
            guard s.plugs == 0, s.deferredKick else { return nil }
            s.deferredKick = false
            return doorbell(&s)
        }
        notify(lane, kick)
    }

    /// Rings the doorbell the ring asked for.
    private func notify(_ lane: Lane, _ kick: QueueDoorbells?) {
        if let d = kick {
            stats.kicks.add(1, ordering: .relaxed)
            d.kick()
            // The device ran to completion on this thread: its completions are in the used ring
            // now, so take them here rather than after the interrupt's trip round the event loop.
            if d.completesOnKick && reapedByCaller { reapNow(lane) }
        }
    }

    /// The request header (type, sector), a discard / write-zeroes segment, and the status byte
    /// preset to 0xFF: anything but ok / ioErr / unsupp after completion is an I/O error (§5.2.6).
    func writeSlot(_ slot: BlkRequestSlot, _ c: BlkCommand) {
        let mem = arena.memory
        let h = slot.offset + BlkRequestSlot.header
        let seg = slot.offset + BlkRequestSlot.segment
        var sector: UInt64 = 0
        switch c {
        case .read(let sec, _), .write(let sec, _): sector = sec
        case .discard(let sec, let n), .writeZeroes(let sec, let n, _):
            mem.store64(seg, sec)
            mem.store32(seg + 8, n)
            if case .writeZeroes(_, _, let unmap) = c {
                mem.store32(seg + 12, unmap ? BlkRequestLayout.unmapFlag : 0)
            } else {
                mem.store32(seg + 12, 0)
            }
        default: break
        }
        mem.store32(h, c.typeCode)
        mem.store32(h + 4, 0)
        mem.store64(h + 8, sector)
        mem.store8(slot.offset + BlkRequestSlot.status, 0xFF)
    }

    /// Descriptor `k` of a request's `n`: the header, then the segment or the data pages (device
    /// writable for reads and get-id), then the status byte.
    @inline(__always)
    func chainSegment(
        _ k: Int, of n: Int, slot: BlkRequestSlot, command c: BlkCommand, pages: [Int32], lastPageBytes: Int
    ) -> VirtqueueSegment {
        let a = slot.deviceAddress
        if k == 0 {
            return VirtqueueSegment(
                address: a + UInt64(BlkRequestSlot.header), length: UInt32(BlkRequestLayout.headerBytes),
                deviceWritable: false)
        }
        if k == n - 1 {
            return VirtqueueSegment(
                address: a + UInt64(BlkRequestSlot.status), length: UInt32(BlkRequestLayout.statusBytes),
                deviceWritable: true)
        }
        if isSegmentCommand(c) {
            return VirtqueueSegment(
                address: a + UInt64(BlkRequestSlot.segment), length: UInt32(BlkRequestLayout.segmentBytes),
                deviceWritable: false)
        }
        let isRead: Bool
        let len: UInt32
        switch c {
        case .getID:
            isRead = true
            len = UInt32(BlkRequestLayout.deviceIDBytes)
        case .read:
            isRead = true
            len = UInt32(k == n - 2 ? lastPageBytes : Self.pageSize)
        default:
            isRead = false
            len = UInt32(k == n - 2 ? lastPageBytes : Self.pageSize)
        }
        return VirtqueueSegment(address: arena.pageDeviceAddress(pages[k - 1]), length: len, deviceWritable: isRead)
    }

    /// The data length of a read or write's last page: 4096, or less when the request would run
    /// past the device's capacity only inside that page (a capacity that is not a multiple of
    /// 4 KiB, e.g. a 10240-byte image): then the request stops at the capacity, in whole sectors.
    /// A request that starts at or past the capacity, or runs past it by a page or more (the
    /// device shrank under it), goes out whole and the device fails it.
    func lastPageLength(_ c: BlkCommand) -> Int {
        let sector: UInt64
        let pages: Int
        switch c {
        case .read(let s, let p), .write(let s, let p):
            sector = s
            pages = p
        default: return Self.pageSize
        }
        let cap = capacity.load(ordering: .relaxed)
        let (start, o1) = sector.multipliedReportingOverflow(by: 512)
        let (end, o2) = start.addingReportingOverflow(UInt64(pages * Self.pageSize))
        guard !o1, !o2, start < cap, end > cap, end - cap < UInt64(Self.pageSize) else { return Self.pageSize }
        return Self.pageSize - Int(end - cap)
    }
}
