// Recovery: a device that needs a reset (§2.1.2), a broken ring or a late request resets the
// device on a thread of its own and resubmits what was in flight; a vhost-user backend that went
// away is reconnected within `DriverOptions.reconnectTimeoutSeconds`.
import Foundation
import Logging
import NIOCore
import Synchronization
import Virtio

extension VirtioBlkDriver {
    // MARK: recovery

    /// Starts `recover` on a thread of its own unless one runs. A recovery may wait many seconds
    /// for a device to come back (a vhost-user backend restarting), which must not hold up the
    /// event loop or completion thread that noticed the failure.
    func requestRecovery(reason: ResetCause, seenEpoch: Int) {
        guard epoch.load(ordering: .acquiring) == seenEpoch,
            recovering.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { return }
        let t = Thread.named("virtio-blk-recovery") { [self] in
            recover(reason: reason, seenEpoch: seenEpoch)
            recovering.store(false, ordering: .releasing)
        }
        t.start()
    }

    /// Resets the device and brings it back (§2.1.2: DEVICE_NEEDS_RESET; or a request timed out).
    /// Every virtio-blk request is idempotent, so each one in flight is resubmitted (once; up to
    /// three times on a transport that reconnects, where a backend restart is the usual cause).
    /// When the reset fails, everything fails at once, unless the transport can reconnect: then
    /// the requests are held and the reset retried with backoff for `reconnectTimeoutSeconds`,
    /// after which they fail and the retries go on in the background until the device returns.
    func recover(reason: ResetCause, seenEpoch: Int) {
        guard epoch.load(ordering: .acquiring) == seenEpoch,
            lanes.allSatisfy({ l in l.state.withLock { $0.broken == nil && !$0.closing } })
        else { return }
        logger.warning("resetting the virtio-blk device: \(reason)")
        stats.resets.add(1, ordering: .relaxed)
        let window = transport.canReconnect ? options.reconnectTimeoutSeconds : 0
        let windowText = window == window.rounded() ? "\(Int(window)) s" : "\(window) s"
        var (held, fail) = holdInFlight(maxResubmissions: window > 0 ? 3 : 1)
        let started = ContinuousClock.now
        var delay = Duration.milliseconds(50)
        var gaveUp = false
        var waitLogged = false
        while true {
            do {
                try bringUp()
                break
            } catch {
                let why = DeviceFailure(cause: reason, resetError: error)
                if window <= 0 || stopping.load(ordering: .acquiring) {
                    if !gaveUp { failEverything(why, held: held, alsoFailing: fail) }
                    return
                }
                if !waitLogged {
                    waitLogged = true
                    logger.warning(
                        "virtio-blk device gone; holding \(held.count) request(s) and reconnecting for up to \(windowText): \(error)"
                    )
                } else {
                    logger.debug("virtio-blk device still gone: \(error)")
                }
                if !gaveUp, ContinuousClock.now - started >= .seconds(window) {
                    gaveUp = true
                    logger.error(
                        "virtio-blk device did not come back within \(windowText) (\(error)); failing \(held.count) held request(s) and new ones with EIO until it does. Restart the backend on the same socket (virtnbd reconnects by itself) or raise --reconnect-timeout"
                    )
                    failEverything(why, held: held, alsoFailing: fail, logged: true)
                    held = []
                    fail = []
                }
                if !sleepUnlessStopping(delay) {
                    if !gaveUp {
                        failEverything(
                            DeviceFailure(cause: reason, resetError: why.resetError, shuttingDown: true), held: held,
                            alsoFailing: fail)
                    }
                    return
                }
                delay = min(delay * 2, .milliseconds(500))
            }
        }
        epoch.add(1, ordering: .releasing)
        let (secs, atto) = (ContinuousClock.now - started).components
        let outage = String(format: "%.1f ms", Double(secs) * 1000 + Double(atto) / 1e15)
        if gaveUp {
            logger.notice("virtio-blk device is back after \(outage); serving again")
        } else {
            logger.notice(
                "virtio-blk device reset in \(outage); resubmitting \(held.count) request(s), \(fail.count) failed")
        }
        resume(held: held, failing: fail)
    }

    /// Marks every lane resetting and takes its requests off the ring: those still allowed a
    /// resubmission are held, the others fail.
    func holdInFlight(maxResubmissions: Int) -> (
        held: [(Lane, Pending, [Int32])], fail: [(Completion, BlkError)]
    ) {
        var held: [(Lane, Pending, [Int32])] = []
        var fail: [(Completion, BlkError)] = []
        for lane in lanes {
            lane.state.withLock { s in
                s.resetting = true
                for i in s.slots.indices {
                    guard let sl = s.slots[i] else { continue }
                    s.slots[i] = nil
                    if sl.resubmissions >= maxResubmissions {
                        fail.append((sl.done, .failedAfterReset(sl.command, resets: sl.resubmissions + 1)))
                        s.pool.give(sl.pages)
                        s.inFlight -= 1
                    } else {
                        let p = Pending(
                            command: sl.command, fill: nil, done: sl.done, pages: sl.pages,
                            resubmissions: sl.resubmissions + 1, keep: sl.keep)
                        held.append((lane, p, sl.pages))
                    }
                }
            }
        }
        return (held, fail)
    }

    /// §3.1.1 again on the same arena and ring addresses; the transport's `reset` reconnects a
    /// backend that went away.
    func bringUp() throws {
        try transport.reset()
        try transport.writeStatus([.acknowledge])
        try transport.writeStatus([.acknowledge, .driver])
        try Self.negotiate(transport, negotiated)
        for lane in lanes {
            // The lane is resetting (or broken), so nothing else touches its ring; the transport's
            // setup, which may be a socket round trip, runs outside the lane lock that submitting
            // event loops take.
            lane.state.withLock { $0.queue.reset() }
            let d = try transport.setupQueue(
                lane.index, size: queueSize, descriptors: lane.addresses.descriptors,
                driverArea: lane.addresses.driverArea, deviceArea: lane.addresses.deviceArea)
            try lane.state.withLock { s in
                // A caller watches the interrupt it was given at start: it must stay the same.
                guard !reapedByCaller || d.interrupt === s.doorbells.interrupt else {
                    throw BlkDeviceError.interruptReplaced(queue: lane.index)
                }
                s.doorbells = d
            }
        }
        try transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        guard !transport.readStatus().contains(.deviceNeedsReset) else {
            throw BlkDeviceError.stillNeedsReset
        }
    }

    /// The reset failed for good (or for now): every lane is broken, so new requests fail at once,
    /// and everything held or waiting fails with `why`.
    /// `logged`: the caller has already said so in its own line (the reconnect window ran out).
    func failEverything(
        _ why: DeviceFailure, held: [(Lane, Pending, [Int32])], alsoFailing already: [(Completion, BlkError)],
        logged: Bool = false
    ) {
        if !logged { logger.error("virtio-blk device failed: \(why); failing every request") }
        epoch.add(1, ordering: .releasing)
        var fail = already
        for lane in lanes {
            lane.state.withLock { s in
                s.broken = why
                s.resetting = false
                for w in s.waiting { fail.append((w.done, .deviceBroken(why))) }
                s.inFlight -= s.waiting.count
                s.waiting.removeAll()
            }
        }
        for (lane, p, pages) in held {
            lane.state.withLock { s in
                s.pool.give(pages)
                s.inFlight -= 1
            }
            fail.append((p.done, .deviceBroken(why)))
        }
        for (d, e) in fail { d(.failure(e)) }
    }

    /// The device is back: lanes take requests again, held ones first, then whatever waited.
    func resume(held: [(Lane, Pending, [Int32])], failing fail: [(Completion, BlkError)]) {
        var launches: [(Lane, Pending, [Int32])] = []
        for lane in lanes {
            lane.state.withLock { s in
                s.resetting = false
                s.broken = nil
                // Resubmissions go first; a fresh ring has room for everything that was on it.
                for (l, p, pages) in held where l === lane {
                    s.reservedDescriptors += ringCost(lane, p.command)
                    launches.append((lane, p, pages))
                }
                for (p, pages) in takeWaiting(&s, lane) { launches.append((lane, p, pages)) }
                if s.polled { s.queue.disableInterrupts() }
            }
        }
        for (d, e) in fail { d(.failure(e)) }
        for (lane, p, pages) in launches { launch(lane, p, pages) }
    }

    /// Sleeps `d` in short steps; false if `shutdown` began meanwhile.
    func sleepUnlessStopping(_ d: Duration) -> Bool {
        let end = ContinuousClock.now + d
        while ContinuousClock.now < end {
            if stopping.load(ordering: .acquiring) { return false }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return !stopping.load(ordering: .acquiring)
    }
}
