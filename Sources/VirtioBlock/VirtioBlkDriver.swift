// The virtio-blk driver: feature negotiation as a policy (VIRTIO 1.2 §3.1.1), requests as
// header / data / status chains (§5.2.6), many in flight on one or more queues (VIRTIO_BLK_F_MQ),
// completed in whatever order the device uses, and recovery by reset (§2.1.2).
//
// Each queue is a `Lane` with its own ring, lock, page pool and request slots: a submitting thread
// uses the lane `IOLane.current` names (one per NIO event loop), which also reaps it (or, with
// `--poll-us` or a shared interrupt, a completion thread per lane does). The driver talks to the
// device only through `VirtioTransport` and to the rings only through `DriverVirtqueue`.
//
// The parts: this file (options, state, bring-up), +Submission (commands into chains),
// +Completion (reaping, timeouts, config changes), +Recovery (reset, resubmission, reconnect).
import Foundation
import Logging
import NIOCore
import Synchronization
import Virtio

/// Who takes completions off the used rings (`DriverOptions.completions`).
public enum CompletionDelivery: Sendable, Equatable {
    /// One completion thread per queue sleeps on its interrupt and runs the completions.
    case threads
    /// The caller services each queue on its own thread (an event loop watching the interrupt).
    case caller
}

/// How the driver sets the device up. Everything both sides support is offered by default;
/// these switches turn things off or force a choice (`--ring`, `--queues`, `--no-event-idx`, …).
public struct DriverOptions: Sendable, Equatable {
    /// Preferred ring format; packed falls back to split when the device lacks VIRTIO_F_RING_PACKED.
    public var ring: RingFormat = .split
    /// Request queues wanted; capped by the device's num_queues (1 without VIRTIO_BLK_F_MQ).
    public var queues = 1
    /// Descriptors per queue: split rings need a power of two, packed rings any size; ≤ 32768.
    public var queueSize = 256
    /// Offer VIRTIO_F_EVENT_IDX (else the NO_NOTIFY / NO_INTERRUPT flags suppress notifications).
    public var eventIndex = true
    /// Offer VIRTIO_F_INDIRECT_DESC (multi-page requests then take one ring descriptor).
    public var indirect = true
    /// 4 KiB data pages in the arena, shared out among the queues; bounds the bytes in flight.
    public var ioPages = 2048
    /// After a completion, poll the ring this long before sleeping on the interrupt again (0 = never poll).
    public var pollMicroseconds = 0
    /// A request the device has not completed after this many seconds makes the driver reset the
    /// device and resubmit (0 = wait forever).
    public var requestTimeoutSeconds = 30.0
    /// When a reset fails on a transport that can reconnect (`VirtioTransport.canReconnect`: a
    /// vhost-user backend that exited), keep the requests in flight held and retry for this many
    /// seconds before failing them with EIO (0 = fail at once). After the window the driver keeps
    /// retrying in the background and serves again when the device returns.
    public var reconnectTimeoutSeconds = 30.0
    /// Who reaps the used rings: a completion thread per queue (the default), or the caller
    /// (`.caller`): the host watches each queue's interrupt eventfd in its own event loop and
    /// calls `serviceQueue` when it fires and `tickQueue` once a second, so completions run on
    /// the thread that submitted (no hop through a completion thread). The driver falls back to
    /// threads with `pollMicroseconds` > 0 (polling would block the caller's loop) and when
    /// queues share one interrupt (VFIO's single MSI-X vector), and says so in `reapedByCaller`.
    public var completions: CompletionDelivery = .threads
    public init() {}

    /// Why a choice cannot work, before any device is touched.
    public func validate() throws(DriverOptionsError) {
        guard queues >= 1, queues <= 64 else { throw .queues(queues) }
        switch ring {
        case .split: guard SplitRingLayout.isValidSize(queueSize) else { throw .splitQueueSize(queueSize) }
        case .packed: guard queueSize >= 2, queueSize <= 32768 else { throw .packedQueueSize(queueSize) }
        }
        guard ioPages >= 1 else { throw .ioPages(ioPages) }
        guard reconnectTimeoutSeconds >= 0, reconnectTimeoutSeconds <= 86400 else {
            throw .reconnectTimeout(reconnectTimeoutSeconds)
        }
    }
}

/// A `DriverOptions` value that cannot work, found before any device is touched; each says which
/// flag to change.
public enum DriverOptionsError: Error, Equatable, CustomStringConvertible {
    case queues(Int)
    case splitQueueSize(Int)
    case packedQueueSize(Int)
    case ioPages(Int)
    case reconnectTimeout(Double)

    public var description: String {
        switch self {
        case .queues(let n): return "--queues must be 1-64, not \(n)"
        case .splitQueueSize(let n):
            return
                "queue size \(n) is not a power of two from 1 to 32768, which a split ring needs (a packed ring takes any size from 2 to 32768)"
        case .packedQueueSize(let n): return "queue size \(n) is not from 2 to 32768 (a packed ring's sizes)"
        case .ioPages(let n): return "ioPages must be at least 1, not \(n)"
        case .reconnectTimeout(let t): return "--reconnect-timeout must be 0 to 86400 seconds, not \(t)"
        }
    }
}

public final class VirtioBlkDriver: @unchecked Sendable {
    public static let pageSize = 4096
    /// Data segments per request (each one 4 KiB page).
    public let maxPagesPerRequest: Int
    /// The shape read at start; `capacityBytes` follows later config changes.
    public let geometry: BlkGeometry
    public let negotiated: VirtioFeatures
    public let queueSize: Int
    /// The ring format in use (after any fallback).
    public let ring: RingFormat
    public let stats = DriverStats()
    public var queueCount: Int { lanes.count }
    /// Current capacity, re-read on every configuration change (§2.5.1).
    public var capacityBytes: UInt64 { capacity.load(ordering: .relaxed) }

    let transport: VirtioTransport
    let arena: DMAArena
    /// I/O pages per lane: a connection holds at most half of them in held READs at a time.
    public let pagesPerLane: Int
    let options: DriverOptions
    let logger: Logger
    let lanes: [Lane]
    let stopFD: EventFD
    let capacity: Atomic<UInt64>
    /// Bumped by each reset; a lane that saw a failure in epoch e asks for a reset of epoch e only.
    let epoch = Atomic<Int>(0)
    /// A recovery thread is running (at most one; `requestRecovery`).
    let recovering = Atomic<Bool>(false)
    /// `shutdown` began: a recovery waiting for a device to return gives up.
    let stopping = Atomic<Bool>(false)
    let threadsDone = DispatchSemaphore(value: 0)
    /// Completion threads running (written by init, stopThreads and deinit).
    let threadCount = Locked(0)
    /// The configuration generation last acted on (lane 0's reaper checks it).
    let seenConfigGeneration: Atomic<UInt32>
    /// True when the caller services the queues (`DriverOptions.completions == .caller` and
    /// nothing forced threads): it must watch `queueInterrupts` and call `serviceQueue` / `tickQueue`.
    public let reapedByCaller: Bool

    public typealias Completion = @Sendable (Result<IOPages, BlkError>) -> Void
    public typealias Fill = @Sendable (IOPages) -> Void

    struct Pending {
        var command: BlkCommand
        var fill: Fill?
        var done: Completion
        /// Pages already holding the data (a resubmission after a reset).
        var pages: [Int32]?
        /// Times this request was resubmitted after a device reset.
        var resubmissions = 0
        /// On success the pages stay taken: the completion made a `HeldPages` of them.
        var keep = false
    }
    struct Slot {
        var pages: [Int32]
        var done: Completion
        var command: BlkCommand
        var submitted: ContinuousClock.Instant
        var resubmissions: Int
        var keep: Bool
    }
    /// What a reap collects: the completed slots with their status bytes, and their pages to
    /// give back to the pool in one go (both kept between reaps by their owner).
    struct Reaped {
        /// Optional so that each can be moved out (`take()`) rather than copied.
        var slots: [(Slot?, UInt8)] = []
        var pages: [Int32] = []
    }
    struct LaneState {
        var queue: any DriverVirtqueue
        var doorbells: QueueDoorbells
        var slots: [Slot?]
        var pool: PagePool
        /// Requests that did not fit (pages or descriptors), first come first served. A request
        /// leaves the queue when it is launched, so nothing it holds (a read's reply buffer in its
        /// completion) outlives it: an array with a moving head kept every request taken from it
        /// until the queue was once empty, 1.4 GB of 1 MiB read buffers under fio 1M QD32.
        var waiting = CircularBuffer<Pending>()
        var reservedDescriptors = 0
        /// Accepted and not yet completed (waiting or on the ring).
        var inFlight = 0
        var broken: DeviceFailure?
        var closing = false
        /// The device is being reset: nothing goes to the ring, new requests wait.
        var resetting = false
        /// A caller reaps this queue itself (`pollCompletions`); interrupts stay off.
        var polled = false
        /// Interrupts are off for a kick to a device that completes on it (`completesOnKick`):
        /// the kicking thread reaps right after, and that reap turns them on again.
        var quietKick = false
        /// Plugs held on this lane (`plug()`): doorbells wait for the last `unplug()`.
        var plugs = 0
        /// A doorbell the ring asked for while plugged, rung at the unplug.
        var deferredKick = false
    }
    final class Lane: @unchecked Sendable {
        let index: Int
        /// The per-id request slots (`BlkRequestSlot`: header, discard / zeroes segment, status).
        let headers: DMARegion
        /// Per-id indirect table (nil without VIRTIO_F_INDIRECT_DESC).
        let tables: DMARegion?
        let tableStride: Int
        let addresses: QueueAddresses
        let state: Locked<LaneState>
        /// The completions array `serviceQueue` reaps into, kept between calls so that a reap
        /// does not allocate and grow a fresh one (a reaper swaps it out and back; a second
        /// reaper at the same time finds it empty and uses its own).
        let reapScratch = Locked(Reaped())
        init(
            index: Int, headers: DMARegion, tables: DMARegion?, tableStride: Int, addresses: QueueAddresses,
            state: sending LaneState
        ) {
            self.index = index
            self.headers = headers
            self.tables = tables
            self.tableStride = tableStride
            self.addresses = addresses
            self.state = Locked(state)
        }
    }

    /// Brings the device up (§3.1.1) and, unless the caller reaps, starts one completion thread per queue.
    public init(
        transport: VirtioTransport, options: DriverOptions = .init(), logger: Logger = Logger(label: "virtnbd.driver")
    ) throws {
        try options.validate()
        guard transport.deviceID == 2 else {
            throw VirtioTransportError.wrongDevice(expected: 2, found: transport.deviceID)
        }
        self.transport = transport
        self.logger = logger
        self.options = options
        let (features, ring) = try Self.negotiateFeatures(transport, options, logger)
        negotiated = features
        self.ring = ring
        let (g, numQueues) = try Self.readGeometry(transport, features)
        geometry = g
        capacity = Atomic(g.capacityBytes)
        let useIndirect = features.contains(.indirectDesc)
        // Without indirect tables a request's descriptors must fit in the ring (header + pages + status).
        maxPagesPerRequest = max(1, min(Int(g.segMax), 32, useIndirect ? 32 : options.queueSize - 2))
        let nQueues = min(options.queues, numQueues, transport.queueCount > 0 ? transport.queueCount : 1)
        if nQueues < options.queues {
            logger.notice("asked for \(options.queues) queues; the device offers \(numQueues); using \(nQueues)")
        }
        queueSize = options.queueSize
        let (arena, lanes) = try Self.makeLanes(
            transport, count: nQueues, ring: ring, features: features, queueSize: queueSize,
            pagesPerRequest: maxPagesPerRequest, ioPages: options.ioPages)
        self.arena = arena
        self.lanes = lanes
        pagesPerLane = lanes.first.map { $0.state.withLock { $0.pool.capacity } } ?? 0
        stopFD = try EventFD()
        // Step 8: DRIVER_OK.
        try transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        logger.info(
            "virtio-blk ready",
            metadata: [
                "capacity": "\(g.capacityBytes)", "features": "\(features)", "ring": "\(ring)", "queues": "\(nQueues)",
                "queue-size": "\(queueSize)", "seg-max": "\(g.segMax)", "pages-per-request": "\(maxPagesPerRequest)",
                "io-pages": "\(lanes.reduce(0) { n, l in n + l.state.withLock { $0.pool.count } })",
            ])
        seenConfigGeneration = Atomic(transport.configGeneration())
        let interrupts = lanes.map { l in l.state.withLock { ObjectIdentifier($0.doorbells.interrupt) } }
        let distinct = Set(interrupts).count == interrupts.count
        reapedByCaller = options.completions == .caller && options.pollMicroseconds == 0 && distinct
        if options.completions == .caller && !reapedByCaller {
            logger.debug(
                "completion threads instead of the caller's loops",
                metadata: ["why": "\(distinct ? "--poll-us polls the rings" : "the queues share one interrupt")"])
        }
        if !reapedByCaller { startCompletionThreads() }
    }

    /// §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, then everything both sides support minus what
    /// the options turn off; and the ring format (packed falls back to split without RING_PACKED).
    static func negotiateFeatures(_ transport: VirtioTransport, _ options: DriverOptions, _ logger: Logger)
        throws -> (VirtioFeatures, RingFormat)
    {
        try transport.reset()
        try transport.writeStatus([.acknowledge])
        try transport.writeStatus([.acknowledge, .driver])
        let offered = transport.readDeviceFeatures()
        var wanted: VirtioFeatures = [
            .version1, .accessPlatform, .blkSizeMax, .blkSegMax, .blkBlkSize, .blkFlush, .blkRO, .blkDiscard,
            .blkWriteZeroes,
        ]
        if options.eventIndex { wanted.insert(.eventIdx) }
        if options.indirect { wanted.insert(.indirectDesc) }
        if options.queues > 1 { wanted.insert(.blkMQ) }
        if options.ring == .packed { wanted.insert(.ringPacked) }
        let features = offered.intersection(wanted)
        guard features.contains(.version1) else {
            try? transport.writeStatus([.failed])
            throw VirtioTransportError.featuresRejected(offered)
        }
        try negotiate(transport, features)
        var ring = options.ring
        if ring == .packed && !features.contains(.ringPacked) {
            logger.warning("the device does not offer VIRTIO_F_RING_PACKED; using a split ring")
            ring = .split
        }
        if ring == .split && !SplitRingLayout.isValidSize(options.queueSize) {
            throw BlkDeviceError.splitRingNeedsPowerOfTwo(queueSize: options.queueSize)
        }
        return (features, ring)
    }

    /// The config space (§5.2.4), read under the generation counter (§2.5.1): the disk's shape
    /// and the device's queue count.
    static func readGeometry(_ transport: VirtioTransport, _ features: VirtioFeatures) throws -> (
        BlkGeometry, Int
    ) {
        var g: BlkGeometry
        var numQueues = 1
        repeat {
            let gen = transport.configGeneration()
            let cfg = { (o: Int, w: Int) in transport.readConfig(offset: o, width: w) }
            g = BlkGeometry(
                capacityBytes: cfg(BlkConfig.capacity, 8) &* 512,
                blockSize: features.contains(.blkBlkSize) ? UInt32(cfg(BlkConfig.blockSize, 4)) : 512,
                segMax: features.contains(.blkSegMax) ? UInt32(cfg(BlkConfig.segMax, 4)) : 1,
                sizeMax: features.contains(.blkSizeMax) ? UInt32(cfg(BlkConfig.sizeMax, 4)) : UInt32.max,
                readOnly: features.contains(.blkRO),
                canFlush: features.contains(.blkFlush),
                canDiscard: features.contains(.blkDiscard),
                canWriteZeroes: features.contains(.blkWriteZeroes),
                maxDiscardSectors: features.contains(.blkDiscard) ? UInt32(cfg(BlkConfig.maxDiscardSectors, 4)) : 0,
                maxWriteZeroesSectors: features.contains(.blkWriteZeroes)
                    ? UInt32(cfg(BlkConfig.maxWriteZeroesSectors, 4)) : 0,
                writeZeroesMayUnmap: features.contains(.blkWriteZeroes) && cfg(BlkConfig.writeZeroesMayUnmap, 1) != 0)
            numQueues = features.contains(.blkMQ) ? max(1, Int(cfg(BlkConfig.numQueues, 2))) : 1
            if gen == transport.configGeneration() { break }
        } while true
        // Some devices (QEMU 7.2's vhost-user-blk) offer SIZE_MAX but leave it 0: no limit.
        if g.sizeMax == 0 { g.sizeMax = UInt32.max }
        guard g.sizeMax >= UInt32(Self.pageSize) else {
            throw BlkDeviceError.sizeMaxTooSmall(g.sizeMax)
        }
        guard g.blockSize <= 4096 else {
            throw BlkDeviceError.blockSizeTooLarge(g.blockSize)
        }
        return (g, numQueues)
    }

    /// Step 7: the queues, their request slots and indirect tables in one arena, the I/O pages
    /// shared out among them, each ring handed to the device.
    static func makeLanes(
        _ transport: VirtioTransport, count nQueues: Int, ring: RingFormat, features: VirtioFeatures, queueSize: Int,
        pagesPerRequest: Int, ioPages: Int
    ) throws -> (DMAArena, [Lane]) {
        for q in 0..<nQueues {
            let maxQ = transport.maxQueueSize(q)
            guard maxQ > 0 else { throw VirtioTransportError.queueUnavailable(index: q) }
            guard queueSize <= maxQ else {
                throw VirtioTransportError.queueTooLarge(index: q, requested: queueSize, max: maxQ)
            }
        }
        let useIndirect = features.contains(.indirectDesc)
        let split = SplitRingLayout(size: queueSize)
        // Packed: the descriptor ring plus two 4-byte event suppression structures (§2.8.10).
        let ringBytes =
            ring == .split
            ? split.descriptorTableBytes + split.availBytes + split.usedBytes + 64
            : PackedRingLayout(size: queueSize).descriptorRingBytes + 2 * PackedRingLayout.eventSuppressionBytes + 64
        let tableStride = 16 * (pagesPerRequest + 3)
        let perQueue =
            ringBytes + BlkRequestSlot.stride * queueSize + (useIndirect ? tableStride * queueSize + 64 : 0) + 4096
        let pagesPerQueue = max(pagesPerRequest, ioPages / nQueues)
        let arena = try DMAArena(structureBytes: perQueue * nQueues, ioPages: pagesPerQueue * nQueues)
        var lanes: [Lane] = []
        let firstPage = arena.poolFirstPage
        // The device sees the whole memfd, so rings allocated after attaching are visible too.
        try transport.attachMemory(arena.memory)
        for q in 0..<nQueues {
            let vq = try makeQueue(ring, arena: arena, size: queueSize)
            vq.eventIndex = features.contains(.eventIdx)
            let addresses = vq.addresses
            let headers = try arena.allocate(BlkRequestSlot.stride * queueSize, alignment: BlkRequestSlot.stride)
            let tables = useIndirect ? try arena.allocate(tableStride * queueSize, alignment: 16) : nil
            let d = try transport.setupQueue(
                q, size: queueSize, descriptors: addresses.descriptors,
                driverArea: addresses.driverArea, deviceArea: addresses.deviceArea)
            let mine = PagePool(first: Int32(firstPage + q * pagesPerQueue), capacity: pagesPerQueue)
            lanes.append(
                Lane(
                    index: q, headers: headers, tables: tables, tableStride: tableStride, addresses: addresses,
                    state: LaneState(
                        queue: vq, doorbells: d, slots: Array(repeating: nil, count: queueSize), pool: mine)))
        }
        return (arena, lanes)
    }

    func startCompletionThreads() {
        for lane in lanes {
            let t = Thread.named("virtio-blk-irq\(lane.index)") { [unowned self] in self.completionLoop(lane) }
            threadCount.withLock { $0 += 1 }
            t.start()
        }
    }

    /// Sends the calling thread's requests to queue `lane` (modulo the queue count).
    public static func useLane(_ lane: Int) { IOLane.set(lane) }

    /// The compatibility initialiser: one split queue of `queueSize`.
    public convenience init(
        transport: VirtioTransport, queueSize: Int, ioPages: Int = 4096,
        logger: Logger = Logger(label: "virtnbd.driver")
    ) throws {
        var o = DriverOptions()
        o.queueSize = queueSize
        o.ioPages = ioPages
        try self.init(transport: transport, options: o, logger: logger)
    }

    deinit { stopThreads() }

    /// §3.1.1 steps 5-6: write the features, set FEATURES_OK, check the device kept it.
    static func negotiate(_ transport: VirtioTransport, _ features: VirtioFeatures) throws {
        try transport.writeDriverFeatures(features)
        try transport.writeStatus([.acknowledge, .driver, .featuresOK])
        guard transport.readStatus().contains(.featuresOK) else {
            try? transport.writeStatus([.failed])
            throw VirtioTransportError.featuresRejected(features)
        }
    }

    /// A ring of the chosen format in the arena.
    static func makeQueue(_ ring: RingFormat, arena: DMAArena, size: Int) throws -> any DriverVirtqueue {
        switch ring {
        case .split: return try SplitVirtqueue(arena: arena, size: size)
        case .packed: return try PackedVirtqueue(arena: arena, size: size)
        }
    }

    // MARK: lifecycle

    /// Waits for every request to finish (new ones are refused), flushes, resets the device.
    /// Must not be called on a thread that reaps a queue (an event loop watching it). When the
    /// caller reaps, the waiting thread also reaps, every 10 ms: whoever was meant to (an
    /// NBDServer's loops) may not exist, e.g. when the server failed to start after the device.
    public func shutdown(flush: Bool = true) {
        // A recovery waiting for the device to come back gives up now (failing what it holds).
        stopping.store(true, ordering: .releasing)
        if flush && geometry.canFlush {
            let sem = DispatchSemaphore(value: 0)
            submit(.flush) { r in
                if case .failure(let e) = r { self.logger.error("final flush failed: \(e)") }
                sem.signal()
            }
            while sem.wait(timeout: .now() + .milliseconds(10)) == .timedOut { reapFromShutdown() }
        }
        for lane in lanes { lane.state.withLock { $0.closing = true } }
        while lanes.contains(where: { l in l.state.withLock { $0.inFlight > 0 && $0.broken == nil } }) {
            Thread.sleep(forTimeInterval: 0.01)
            reapFromShutdown()
        }
        while recovering.load(ordering: .acquiring) { Thread.sleep(forTimeInterval: 0.01) }
        try? transport.reset()
        stopThreads()
    }

    /// Reaps every queue on the calling thread, when the caller reaps (see `shutdown`).
    func reapFromShutdown() {
        guard reapedByCaller else { return }
        var finished = Reaped()
        for lane in lanes { reap(lane, into: &finished) }
    }

    func stopThreads() {
        let n = threadCount.withLock { n in
            defer { n = 0 }
            return n
        }
        guard n > 0 else { return }
        stopFD.signal()
        for _ in 0..<n { threadsDone.wait() }
    }

    public var inFlightCount: Int { lanes.reduce(0) { n, l in n + l.state.withLock { $0.inFlight } } }
}

/// Counters the driver keeps.
public final class DriverStats: Sendable {
    public let kicks = Atomic<Int>(0), interrupts = Atomic<Int>(0), errors = Atomic<Int>(0)
    public let resets = Atomic<Int>(0), timeouts = Atomic<Int>(0), configChanges = Atomic<Int>(0)
    public init() {}
    public var summary: String {
        "driver_kicks=\(kicks.load(ordering: .relaxed)) driver_interrupts=\(interrupts.load(ordering: .relaxed)) driver_errors=\(errors.load(ordering: .relaxed)) driver_resets=\(resets.load(ordering: .relaxed)) driver_timeouts=\(timeouts.load(ordering: .relaxed))"
    }
}
