// Completion: the used ring is reaped on the caller's event loop (`serviceQueue`) or on a
// completion thread per lane; each request's callback runs there, then waiting requests launch.
import Foundation
import Logging
import NIOCore
import Synchronization
import Virtio

extension VirtioBlkDriver {
    // MARK: completion

    func completionLoop(_ lane: Lane) {
        defer { threadsDone.signal() }
        IOLane.set(lane.index) // follow-up requests issued from completions stay on this queue
        var finished = Reaped()
        let timeout = options.requestTimeoutSeconds
        // The timeout sweep scans every slot of the lane under its lock: once a second is enough
        // (a request is late after `timeout` seconds, so finding it up to 1 s later is fine).
        var nextSweep = ContinuousClock.now + .seconds(1)
        while true {
            let interrupt = lane.state.withLock { $0.doorbells.interrupt }
            // With a request timeout, wake once a second to look for requests the device sits on
            // (an idle lane costs one wake-up a second, nothing measurable).
            let (fired, stop) = interrupt.wait(orUntil: stopFD, timeoutMilliseconds: timeout > 0 ? 1000 : -1)
            if stop { return }
            if fired {
                interrupt.drain()
                stats.interrupts.add(1, ordering: .relaxed)
            }
            if lane.index == 0 { checkConfig() }
            let n = reap(lane, into: &finished)
            if options.pollMicroseconds > 0 && n > 0 {
                // Adaptive polling: while completions keep coming, poll instead of taking interrupts;
                // after a quiet window, re-arm the interrupt (and poll on if buffers slipped in).
                let window = Duration.microseconds(options.pollMicroseconds)
                repeat {
                    lane.state.withLock { $0.queue.disableInterrupts() }
                    var deadline = ContinuousClock.now + window
                    while ContinuousClock.now < deadline {
                        if reap(lane, into: &finished, checkStatus: false) > 0 { deadline = .now + window }
                    }
                } while lane.state.withLock({ !$0.polled && $0.queue.enableInterrupts() })
            }
            if timeout > 0, ContinuousClock.now >= nextSweep {
                checkTimeouts(lane, limit: timeout)
                nextSweep = .now + .seconds(1)
            }
        }
    }

    /// Each queue's interrupt, for a caller that reaps (`reapedByCaller`): watch `queueInterrupts[i]`
    /// for readability on the thread that submits to queue i (an event loop's epoll) and call
    /// `serviceQueue(i)` there when it fires. The eventfd is the same one for the driver's whole
    /// life, across device resets. Empty when completion threads reap.
    public var queueInterrupts: [EventFD] {
        reapedByCaller ? lanes.map { l in l.state.withLock { $0.doorbells.interrupt } } : []
    }

    /// Queue `i`'s interrupt fired and the caller has read (cleared) its eventfd: run what the
    /// device has completed, on the calling thread (the caller's event loop), inside this call.
    public func serviceQueue(_ i: Int) {
        let lane = lanes[i]
        stats.interrupts.add(1, ordering: .relaxed)
        if i == 0 { checkConfig() }
        reapNow(lane)
    }

    /// Reaps `lane` on the calling thread, into the lane's kept array.
    func reapNow(_ lane: Lane) {
        var finished = Reaped()
        lane.reapScratch.withLock { swap(&$0, &finished) }
        reap(lane, into: &finished)
        lane.reapScratch.withLock { swap(&$0, &finished) }
    }

    /// Once a second on queue `i`'s thread when the caller reaps: a configuration change missed
    /// (queue 0), requests the device sits on longer than the request timeout.
    public func tickQueue(_ i: Int) {
        if i == 0 { checkConfig() }
        let timeout = options.requestTimeoutSeconds
        if timeout > 0 { checkTimeouts(lanes[i], limit: timeout) }
    }

    /// Completes, on the calling thread, whatever the device has used on this thread's queue, and
    /// returns how many (for callers that spin instead of waiting, like io_uring's IOPOLL). The
    /// first call turns the queue's interrupts off: from then on the caller must keep polling
    /// (the completion thread still sweeps once a second when a request timeout is set).
    @discardableResult
    public func pollCompletions() -> Int {
        let lane = lanes[IOLane.current % lanes.count]
        lane.state.withLock { s in
            if !s.polled {
                s.polled = true
                s.queue.disableInterrupts()
            }
        }
        var finished = Reaped()
        return reap(lane, into: &finished, checkStatus: false)
    }

    /// Completes what the device has used; returns how many.
    @discardableResult
    func reap(_ lane: Lane, into finished: inout Reaped, checkStatus: Bool = true) -> Int {
        let mem = arena.memory
        var failure: ResetCause?
        let seen = epoch.load(ordering: .acquiring)
        let usable = lane.state.withLock { s -> Bool in
            guard !s.resetting, s.broken == nil else { return false }
            do throws(VirtqueueError) {
                while true {
                    while let (id, _) = try s.queue.nextUsed() {
                        guard let slot = s.slots[Int(id)].take() else { continue } // moved out, not copied
                        let at = BlkRequestSlot(id: Int(id), base: lane.headers.offset, device: 0).offset
                        finished.slots.append((consume slot, mem.load8(at + BlkRequestSlot.status)))
                    }
                    // After a quiet kick: interrupts on again, and whatever the device used
                    // before they were is taken now (it will not interrupt for it).
                    guard s.quietKick else { break }
                    s.quietKick = false
                    if s.polled || !s.queue.enableInterrupts() { break }
                }
            } catch {
                failure = .ring(error)
            }
            return true
        }
        guard usable else { return 0 }
        if checkStatus, failure == nil, finished.slots.isEmpty, transport.readStatus().contains(.deviceNeedsReset) {
            failure = .needsReset
        }
        let count = finished.slots.count
        // Each slot is moved out of its place (`take`), in arrival order, not copied: a copy
        // retains and releases its pages, completion and command.
        for i in finished.slots.indices {
            guard let slot = finished.slots[i].0.take() else { continue }
            let status = finished.slots[i].1
            // A held read's pages come back through `giveBack` when its `HeldPages` goes (data sent).
            if !(slot.keep && status == BlkStatus.ok) { finished.pages.append(contentsOf: slot.pages) }
            let io = IOPages(pages: slot.pages, memory: mem, arena: arena)
            switch status {
            case BlkStatus.ok: slot.done(.success(io))
            case BlkStatus.unsupp:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.unsupported(slot.command)))
            case BlkStatus.ioErr:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.ioError(slot.command)))
            default:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.noStatus(slot.command, status: status)))
            }
        }
        // Return pages, then start whatever now fits.
        let toLaunch: [(Pending, [Int32])] = lane.state.withLock { s in
            s.pool.give(finished.pages)
            s.inFlight -= count
            return takeWaiting(&s, lane)
        }
        finished.slots.removeAll(keepingCapacity: true)
        finished.pages.removeAll(keepingCapacity: true)
        for (p, pages) in toLaunch { launch(lane, p, pages) }
        if let f = failure { requestRecovery(reason: f, seenEpoch: seen) }
        return count
    }

    /// Pages a completed request kept (`HeldPages`) go back; whatever now fits launches.
    func giveBack(_ lane: Lane, _ pages: [Int32]) {
        let toLaunch: [(Pending, [Int32])] = lane.state.withLock { s in
            s.pool.give(pages)
            return takeWaiting(&s, lane)
        }
        for (p, pages) in toLaunch { launch(lane, p, pages) }
    }

    /// Waiting requests that now fit, in order.
    func takeWaiting(_ s: inout LaneState, _ lane: Lane) -> [(Pending, [Int32])] {
        var out: [(Pending, [Int32])] = []
        guard !s.resetting else { return out }
        while let first = s.waiting.first, let pages = reserve(&s, lane, first.command, pages: first.pages) {
            out.append((s.waiting.removeFirst(), pages))
        }
        return out
    }

    func checkTimeouts(_ lane: Lane, limit: Double) {
        let seen = epoch.load(ordering: .acquiring)
        let now = ContinuousClock.now
        let late: Slot? = lane.state.withLock { s in
            guard !s.resetting, s.broken == nil, s.inFlight > 0 else { return nil }
            return s.slots.lazy.compactMap { $0 }.first { now - $0.submitted > .seconds(limit) }
        }
        if let l = late {
            stats.timeouts.add(1, ordering: .relaxed)
            requestRecovery(reason: .timedOut(l.command, seconds: limit), seenEpoch: seen)
        }
    }

    /// A configuration change (§2.5.1): re-read the capacity under the generation counter.
    func checkConfig() {
        let gen = transport.configGeneration()
        guard gen != seenConfigGeneration.load(ordering: .relaxed) else { return }
        var bytes: UInt64
        var g = gen
        repeat {
            bytes = transport.readConfig(offset: BlkConfig.capacity, width: 8) &* 512
            let again = transport.configGeneration()
            if again == g { break }
            g = again
        } while true
        seenConfigGeneration.store(g, ordering: .relaxed)
        let old = capacity.exchange(bytes, ordering: .relaxed)
        if old != bytes {
            stats.configChanges.add(1, ordering: .relaxed)
            logger.notice("device capacity changed from \(old) to \(bytes) bytes", metadata: ["generation": "\(g)"])
        }
    }
}
