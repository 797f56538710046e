// The virtio-blk driver: feature negotiation (VIRTIO 1.2 §3.1.1), requests as
// header / data / status chains (§5.2.6), many in flight, completed in whatever order the device
// uses. It talks to the device only through `VirtioTransport`.
import Foundation
import Logging
import Synchronization
import Virtio

public final class VirtioBlkDriver: @unchecked Sendable {
    public static let pageSize = 4096
    /// Data segments per request (each one 4 KiB page).
    public let maxPagesPerRequest: Int
    public let geometry: BlkGeometry
    public let negotiated: VirtioFeatures
    public let queueSize: Int
    public let stats = DriverStats()

    private let transport: VirtioTransport
    private let arena: DMAArena
    private let headers: DMARegion
    private let doorbells: QueueDoorbells
    private let stopFD: EventFD
    private let logger: Logger
    private var thread: Thread?
    private let threadDone = DispatchSemaphore(value: 0)

    public typealias Completion = @Sendable (Result<IOPages, BlkError>) -> Void
    public typealias Fill = @Sendable (IOPages) -> Void

    private struct Pending {
        var command: BlkCommand
        var fill: Fill?
        var done: Completion
    }
    private struct Slot {
        var pages: [Int32]
        var done: Completion
        var command: BlkCommand
    }
    private struct State {
        var queue: any DriverVirtqueue
        var slots: [Slot?]
        var waiting: [Pending] = []
        var waitingHead = 0
        var reservedDescriptors = 0
        var inFlight = 0
        var broken: String?
        var closing = false
    }
    private let state: Mutex<State>
    private let drained = NSCondition()

    /// Brings the device up and starts the completion thread.
    /// - Parameters:
    ///   - queueSize: split-ring size, a power of two ≤ 32768 (and ≤ the device maximum).
    ///   - ioPages: 4 KiB data pages in the arena; bounds the bytes in flight.
    public init(transport: VirtioTransport, queueSize: Int = 256, ioPages: Int = 4096, logger: Logger = Logger(label: "virtnbd.driver")) throws {
        guard SplitRingLayout.isValidSize(queueSize) else {
            throw VirtioTransportError.deviceFailed("queue size \(queueSize) is not a power of two between 1 and 32768")
        }
        guard transport.deviceID == 2 else { throw VirtioTransportError.wrongDevice(expected: 2, found: transport.deviceID) }
        self.transport = transport
        self.logger = logger
        self.queueSize = queueSize

        // §3.1.1 steps 1-3: reset, ACKNOWLEDGE, DRIVER.
        try transport.reset()
        try transport.writeStatus([.acknowledge])
        try transport.writeStatus([.acknowledge, .driver])
        // Steps 4-6: features.
        let offered = transport.readDeviceFeatures()
        let wanted: VirtioFeatures = [.version1, .accessPlatform, .blkSizeMax, .blkSegMax, .blkBlkSize, .blkFlush, .blkRO, .blkDiscard, .blkWriteZeroes, .eventIdx]
        let features = offered.intersection(wanted)
        guard features.contains(.version1) else {
            try? transport.writeStatus([.failed])
            throw VirtioTransportError.featuresRejected(offered)
        }
        try transport.writeDriverFeatures(features)
        try transport.writeStatus([.acknowledge, .driver, .featuresOK])
        guard transport.readStatus().contains(.featuresOK) else {
            try? transport.writeStatus([.failed])
            throw VirtioTransportError.featuresRejected(features)
        }
        negotiated = features

        // Config space (§5.2.4), read under the generation counter (§2.5.1).
        var g: BlkGeometry
        repeat {
            let gen = transport.configGeneration()
            let cfg = { (o: Int, w: Int) in transport.readConfig(offset: o, width: w) }
            g = BlkGeometry(
                capacityBytes: cfg(0, 8) &* 512,
                blockSize: features.contains(.blkBlkSize) ? UInt32(cfg(20, 4)) : 512,
                segMax: features.contains(.blkSegMax) ? UInt32(cfg(12, 4)) : 1,
                sizeMax: features.contains(.blkSizeMax) ? UInt32(cfg(8, 4)) : UInt32.max,
                readOnly: features.contains(.blkRO),
                canFlush: features.contains(.blkFlush),
                canDiscard: features.contains(.blkDiscard),
                canWriteZeroes: features.contains(.blkWriteZeroes),
                maxDiscardSectors: features.contains(.blkDiscard) ? UInt32(cfg(36, 4)) : 0,
                maxWriteZeroesSectors: features.contains(.blkWriteZeroes) ? UInt32(cfg(48, 4)) : 0,
                writeZeroesMayUnmap: features.contains(.blkWriteZeroes) && cfg(56, 1) != 0)
            if gen == transport.configGeneration() { break }
        } while true
        // Some devices (QEMU 7.2's vhost-user-blk) offer SIZE_MAX but leave it 0: no limit.
        if g.sizeMax == 0 { g.sizeMax = UInt32.max }
        guard g.sizeMax >= UInt32(Self.pageSize) else {
            throw VirtioTransportError.deviceFailed("size_max \(g.sizeMax) is below 4096; 4 KiB segments are required")
        }
        guard g.blockSize <= 4096 else { throw VirtioTransportError.deviceFailed("blk_size \(g.blockSize) > 4096 is not supported") }
        geometry = g
        maxPagesPerRequest = max(1, min(Int(g.segMax), 32, queueSize - 2))

        // Step 7: queues, in the arena.
        let maxQ = transport.maxQueueSize(0)
        guard maxQ > 0 else { throw VirtioTransportError.queueUnavailable(index: 0) }
        guard queueSize <= maxQ else { throw VirtioTransportError.queueTooLarge(index: 0, requested: queueSize, max: maxQ) }
        let l = SplitRingLayout(size: queueSize)
        arena = try DMAArena(structureBytes: l.descriptorTableBytes + l.availBytes + l.usedBytes + 64 * queueSize + 4096, ioPages: ioPages)
        let q = try SplitVirtqueue(arena: arena, size: queueSize)
        q.eventIndex = features.contains(.eventIdx)
        // Per-head request slots: header at +0, discard/zeroes segment at +16, status at +32.
        headers = try arena.allocate(64 * queueSize, alignment: 64)
        try transport.attachMemory(arena.memory)
        doorbells = try transport.setupQueue(0, size: queueSize, descriptors: q.addresses.descriptors,
                                             driverArea: q.addresses.driverArea, deviceArea: q.addresses.deviceArea)
        stopFD = try EventFD()
        state = Mutex(State(queue: q, slots: Array(repeating: nil, count: queueSize)))
        // Step 8: DRIVER_OK.
        try transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        logger.info("virtio-blk ready", metadata: [
            "capacity": "\(g.capacityBytes)", "features": "\(features)", "queue-size": "\(queueSize)",
            "seg-max": "\(g.segMax)", "pages-per-request": "\(maxPagesPerRequest)", "io-pages": "\(ioPages)"])
        let t = Thread { [unowned self] in self.completionLoop() }
        t.name = "virtio-blk-irq"
        thread = t
        t.start()
    }

    deinit { stopThread() }

    // MARK: submission

    /// Issues one request. `fill` runs before the request is made available (writes copy their data
    /// into the pages there); `done` runs on the completion thread with the pages, which return to
    /// the pool when it returns. Requests that do not fit wait, first come first served.
    public func submit(_ command: BlkCommand, fill: Fill? = nil, done: @escaping Completion) {
        precondition(command.pages <= maxPagesPerRequest, "callers split requests to maxPagesPerRequest")
        let p = Pending(command: command, fill: fill, done: done)
        let start: (Pending, [Int32])?? = state.withLock { s in
            if let b = s.broken { _ = b; return .some(nil) }
            if s.closing { return .some(nil) }
            s.inFlight += 1
            if s.waitingHead == s.waiting.count, let pages = reserve(&s, p.command) { return .some((p, pages)) }
            s.waiting.append(p)
            return nil
        }
        switch start {
        case .some(.some(let (p, pages))): launch(p, pages)
        case .some(.none):
            let reason = state.withLock { $0.broken }
            done(.failure(reason.map { .deviceBroken($0) } ?? .shutdown))
        case .none: break
        }
    }

    /// Takes pages and reserves descriptors, or returns nil if either is short.
    private func reserve(_ s: inout State, _ c: BlkCommand) -> [Int32]? {
        let descs = descriptorCount(c)
        guard s.queue.freeCount - s.reservedDescriptors >= descs, arena.freePageCount >= c.pages else { return nil }
        s.reservedDescriptors += descs
        var pages: [Int32] = []
        pages.reserveCapacity(c.pages)
        for _ in 0..<c.pages { pages.append(arena.takePage()!) }
        return pages
    }
    private func isSegmentCommand(_ c: BlkCommand) -> Bool {
        if case .discard = c { return true }
        if case .writeZeroes = c { return true }
        return false
    }
    private func descriptorCount(_ c: BlkCommand) -> Int { c.pages + 2 + (isSegmentCommand(c) ? 1 : 0) }

    /// Fills data (outside the lock), builds the chain, publishes it and kicks if the device wants.
    private func launch(_ p: Pending, _ pages: [Int32]) {
        let io = IOPages(pages: pages, memory: arena.memory, arena: arena)
        p.fill?(io)
        let mem = arena.memory
        let kick: Bool = state.withLock { s in
            let n = descriptorCount(p.command)
            s.reservedDescriptors -= n
            // Header and status live in the per-head slot of the chain add() is about to build.
            let head = s.queue.nextFreeID
            let h = headers.offset + 64 * Int(head)
            let hAddr = headers.deviceAddress + UInt64(64 * Int(head))
            var sector: UInt64 = 0
            switch p.command {
            case .read(let sec, _), .write(let sec, _): sector = sec
            case .discard(let sec, let n), .writeZeroes(let sec, let n, _):
                mem.store64(h + 16, sec); mem.store32(h + 24, n)
                if case .writeZeroes(_, _, let unmap) = p.command { mem.store32(h + 28, unmap ? 1 : 0) } else { mem.store32(h + 28, 0) }
            default: break
            }
            mem.store32(h, p.command.typeCode)
            mem.store32(h + 4, 0)
            mem.store64(h + 8, sector)
            mem.store8(h + 32, 0xFF)     // no status yet: anything but 0/1/2 afterwards is an I/O error
            let isRead: Bool
            switch p.command { case .read, .getID: isRead = true; default: isRead = false }
            let seg = isSegmentCommand(p.command)
            let got = s.queue.add(count: n, indirect: nil) { k in
                if k == 0 { return VirtqueueSegment(address: hAddr, length: 16, deviceWritable: false) }
                if k == n - 1 { return VirtqueueSegment(address: hAddr + 32, length: 1, deviceWritable: true) }
                if seg { return VirtqueueSegment(address: hAddr + 16, length: 16, deviceWritable: false) }
                let len: UInt32 = { if case .getID = p.command { return 20 } else { return UInt32(Self.pageSize) } }()
                return VirtqueueSegment(address: arena.pageDeviceAddress(pages[k - 1]), length: len, deviceWritable: isRead)
            }
            precondition(got == head, "reserved descriptors must be available")
            s.slots[Int(head)] = Slot(pages: pages, done: p.done, command: p.command)
            return s.queue.publish()
        }
        if kick {
            stats.kicks.add(1, ordering: .relaxed)
            doorbells.kick()
        }
    }

    // MARK: completion

    private func completionLoop() {
        defer { threadDone.signal() }
        var finished: [(Slot, UInt8, UInt16)] = []
        while true {
            let (_, stop) = doorbells.interrupt.wait(orUntil: stopFD)
            if stop { return }
            doorbells.interrupt.drain()
            stats.interrupts.add(1, ordering: .relaxed)
            reap(into: &finished)
        }
    }

    private func reap(into finished: inout [(Slot, UInt8, UInt16)]) {
        let mem = arena.memory
        var failure: String?
        state.withLock { s in
            do {
                while let (head, _) = try s.queue.nextUsed() {
                    guard let slot = s.slots[Int(head)] else { continue }
                    s.slots[Int(head)] = nil
                    finished.append((slot, mem.load8(headers.offset + 64 * Int(head) + 32), head))
                }
            } catch {
                failure = "\(error)"
            }
        }
        if failure == nil, finished.isEmpty, transport.readStatus().contains(.deviceNeedsReset) {
            failure = "the device set DEVICE_NEEDS_RESET"
        }
        for (slot, status, _) in finished {
            let io = IOPages(pages: slot.pages, memory: mem, arena: arena)
            switch status {
            case 0: slot.done(.success(io))
            case 2: stats.errors.add(1, ordering: .relaxed); slot.done(.failure(.unsupported(describe(slot.command))))
            case 1: stats.errors.add(1, ordering: .relaxed); slot.done(.failure(.ioError("\(describe(slot.command)) failed")))
            default: stats.errors.add(1, ordering: .relaxed); slot.done(.failure(.ioError("\(describe(slot.command)): device wrote no status")))
            }
        }
        // Return pages, then start whatever now fits.
        var toLaunch: [(Pending, [Int32])] = []
        var toFail: [(Completion, BlkError)] = []
        var newlyBroken = false
        state.withLock { s in
            for (slot, _, _) in finished { for p in slot.pages { arena.returnPage(p) } }
            s.inFlight -= finished.count
            if let f = failure, s.broken == nil {
                s.broken = f
                newlyBroken = true
                for i in s.slots.indices { if let sl = s.slots[i] { toFail.append((sl.done, .deviceBroken(f))); s.slots[i] = nil; for p in sl.pages { arena.returnPage(p) } } }
            }
            if let f = s.broken {
                for i in s.waitingHead..<s.waiting.count { toFail.append((s.waiting[i].done, .deviceBroken(f))) }
                s.waiting.removeAll(); s.waitingHead = 0
                s.inFlight -= toFail.count
            }
            while s.waitingHead < s.waiting.count, let pages = reserve(&s, s.waiting[s.waitingHead].command) {
                toLaunch.append((s.waiting[s.waitingHead], pages))
                s.waitingHead += 1
            }
            if s.waitingHead == s.waiting.count { s.waiting.removeAll(keepingCapacity: true); s.waitingHead = 0 }
        }
        if let f = failure, newlyBroken { logger.error("virtio-blk device failed: \(f); failing every request") }
        finished.removeAll(keepingCapacity: true)
        for (d, e) in toFail { d(.failure(e)) }
        for (p, pages) in toLaunch { launch(p, pages) }
        drained.lock(); drained.broadcast(); drained.unlock()
    }

    private func describe(_ c: BlkCommand) -> String {
        switch c {
        case .read(let s, let p): return "read of \(p * 4096) bytes at sector \(s)"
        case .write(let s, let p): return "write of \(p * 4096) bytes at sector \(s)"
        case .flush: return "flush"
        case .discard(let s, let n): return "discard of \(n) sectors at \(s)"
        case .writeZeroes(let s, let n, _): return "write-zeroes of \(n) sectors at \(s)"
        case .getID: return "get-id"
        }
    }

    // MARK: lifecycle

    /// Waits for every request to finish (new ones are refused), flushes, resets the device.
    public func shutdown(flush: Bool = true) {
        if flush && geometry.canFlush {
            let sem = DispatchSemaphore(value: 0)
            submit(.flush) { r in
                if case .failure(let e) = r { self.logger.error("final flush failed: \(e)") }
                sem.signal()
            }
            sem.wait()
        }
        state.withLock { $0.closing = true }
        drained.lock()
        while state.withLock({ $0.inFlight > 0 && $0.broken == nil }) { _ = drained.wait(until: Date().addingTimeInterval(0.1)) }
        drained.unlock()
        try? transport.reset()
        stopThread()
    }

    private func stopThread() {
        guard thread != nil else { return }
        stopFD.signal()
        threadDone.wait()
        thread = nil
    }

    public var inFlightCount: Int { state.withLock { $0.inFlight } }
}

/// Counters the driver keeps.
public final class DriverStats: Sendable {
    public let kicks = Atomic<Int>(0), interrupts = Atomic<Int>(0), errors = Atomic<Int>(0)
    public init() {}
    public var summary: String {
        "driver_kicks=\(kicks.load(ordering: .relaxed)) driver_interrupts=\(interrupts.load(ordering: .relaxed)) driver_errors=\(errors.load(ordering: .relaxed))"
    }
}
