// The virtio-blk driver: feature negotiation as a policy (VIRTIO 1.2 §3.1.1), requests as
// header / data / status chains (§5.2.6), many in flight on one or more queues (VIRTIO_BLK_F_MQ),
// completed in whatever order the device uses, and recovery by reset (§2.1.2).
//
// Each queue is a `Lane` with its own ring, lock, page pool, request slots and completion thread:
// a submitting thread uses the lane `IOLane.current` names (one per NIO event loop), so event
// loops never share a lock on the fast path. The driver talks to the device only through
// `VirtioTransport` and to the rings only through `DriverVirtqueue` (split or packed).
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
    public func validate() throws(VirtioTransportError) {
        guard queues >= 1, queues <= 64 else { throw .deviceFailed("--queues must be 1-64, not \(queues)") }
        switch ring {
        case .split:
            guard SplitRingLayout.isValidSize(queueSize) else {
                throw .deviceFailed(
                    "queue size \(queueSize) is not a power of two from 1 to 32768, which a split ring needs (a packed ring takes any size from 2 to 32768)"
                )
            }
        case .packed:
            guard queueSize >= 2, queueSize <= 32768 else {
                throw .deviceFailed("queue size \(queueSize) is not from 2 to 32768 (a packed ring's sizes)")
            }
        }
        guard ioPages >= 1 else { throw .deviceFailed("ioPages must be at least 1") }
        guard reconnectTimeoutSeconds >= 0, reconnectTimeoutSeconds <= 86400 else {
            throw .deviceFailed("the reconnect timeout must be 0 to 86400 seconds")
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

    private let transport: VirtioTransport
    private let arena: DMAArena
    private let options: DriverOptions
    private let logger: Logger
    private let lanes: [Lane]
    private let stopFD: EventFD
    private let capacity: Atomic<UInt64>
    /// Bumped by each reset; a lane that saw a failure in epoch e asks for a reset of epoch e only.
    private let epoch = Atomic<Int>(0)
    /// A recovery thread is running (at most one; `requestRecovery`).
    private let recovering = Atomic<Bool>(false)
    /// `shutdown` began: a recovery waiting for a device to return gives up.
    private let stopping = Atomic<Bool>(false)
    private let threadsDone = DispatchSemaphore(value: 0)
    private var threadCount = 0
    /// The configuration generation last acted on (lane 0's reaper checks it).
    private let seenConfigGeneration: Atomic<UInt32>
    /// True when the caller services the queues (`DriverOptions.completions == .caller` and
    /// nothing forced threads): it must watch `queueInterrupts` and call `serviceQueue` / `tickQueue`.
    public let reapedByCaller: Bool

    public typealias Completion = @Sendable (Result<IOPages, BlkError>) -> Void
    public typealias Fill = @Sendable (IOPages) -> Void

    private struct Pending {
        var command: BlkCommand
        var fill: Fill?
        var done: Completion
        /// Pages already holding the data (a resubmission after a reset).
        var pages: [Int32]?
        /// Times this request was resubmitted after a device reset.
        var resubmissions = 0
    }
    private struct Slot {
        var pages: [Int32]
        var done: Completion
        var command: BlkCommand
        var submitted: ContinuousClock.Instant
        var resubmissions: Int
    }
    private struct LaneState {
        var queue: any DriverVirtqueue
        var doorbells: QueueDoorbells
        var slots: [Slot?]
        var freePages: [Int32]
        /// Requests that did not fit (pages or descriptors), first come first served. A request
        /// leaves the queue when it is launched, so nothing it holds (a read's reply buffer in its
        /// completion) outlives it: an array with a moving head kept every request taken from it
        /// until the queue was once empty, 1.4 GB of 1 MiB read buffers under fio 1M QD32.
        var waiting = CircularBuffer<Pending>()
        var reservedDescriptors = 0
        /// Accepted and not yet completed (waiting or on the ring).
        var inFlight = 0
        var broken: String?
        var closing = false
        /// The device is being reset: nothing goes to the ring, new requests wait.
        var resetting = false
        /// A caller reaps this queue itself (`pollCompletions`); interrupts stay off.
        var polled = false
    }
    private final class Lane: @unchecked Sendable {
        let index: Int
        /// The per-id request slots (`BlkRequestSlot`: header, discard / zeroes segment, status).
        let headers: DMARegion
        /// Per-id indirect table (nil without VIRTIO_F_INDIRECT_DESC).
        let tables: DMARegion?
        let tableStride: Int
        let addresses: QueueAddresses
        let state: Locked<LaneState>
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

    /// Brings the device up and starts one completion thread per queue.
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

        // §3.1.1 steps 1-3: reset, ACKNOWLEDGE, DRIVER.
        try transport.reset()
        try transport.writeStatus([.acknowledge])
        try transport.writeStatus([.acknowledge, .driver])
        // Steps 4-6: offer everything both sides support, minus what the options turn off.
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
        try Self.negotiate(transport, features)
        negotiated = features
        var ring = options.ring
        if ring == .packed && !features.contains(.ringPacked) {
            logger.warning("the device does not offer VIRTIO_F_RING_PACKED; using a split ring")
            ring = .split
        }
        self.ring = ring
        let queueSize = options.queueSize
        if ring == .split && !SplitRingLayout.isValidSize(queueSize) {
            throw VirtioTransportError.deviceFailed(
                "queue size \(queueSize) is not a power of two, which the split ring the device forces needs")
        }

        // Config space (§5.2.4), read under the generation counter (§2.5.1).
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
            throw VirtioTransportError.deviceFailed("size_max \(g.sizeMax) is below 4096; 4 KiB segments are required")
        }
        guard g.blockSize <= 4096 else {
            throw VirtioTransportError.deviceFailed("blk_size \(g.blockSize) > 4096 is not supported")
        }
        geometry = g
        capacity = Atomic(g.capacityBytes)
        let useIndirect = features.contains(.indirectDesc)
        // Without indirect tables a request's descriptors must fit in the ring (header + pages + status).
        maxPagesPerRequest = max(1, min(Int(g.segMax), 32, useIndirect ? 32 : queueSize - 2))
        let nQueues = min(options.queues, numQueues, transport.queueCount > 0 ? transport.queueCount : 1)
        if nQueues < options.queues {
            logger.notice("asked for \(options.queues) queues; the device offers \(numQueues); using \(nQueues)")
        }
        for q in 0..<nQueues {
            let maxQ = transport.maxQueueSize(q)
            guard maxQ > 0 else { throw VirtioTransportError.queueUnavailable(index: q) }
            guard queueSize <= maxQ else {
                throw VirtioTransportError.queueTooLarge(index: q, requested: queueSize, max: maxQ)
            }
        }
        self.queueSize = queueSize

        // Step 7: queues, headers and indirect tables in one arena; pages shared out per queue.
        let split = SplitRingLayout(size: queueSize)
        // Packed: the descriptor ring plus two 4-byte event suppression structures (§2.8.10).
        let ringBytes =
            ring == .split
            ? split.descriptorTableBytes + split.availBytes + split.usedBytes + 64
            : PackedRingLayout(size: queueSize).descriptorRingBytes + 2 * PackedRingLayout.eventSuppressionBytes + 64
        let tableStride = 16 * (maxPagesPerRequest + 3)
        let perQueue =
            ringBytes + BlkRequestSlot.stride * queueSize + (useIndirect ? tableStride * queueSize + 64 : 0) + 4096
        let pagesPerQueue = max(maxPagesPerRequest, options.ioPages / nQueues)
        let arena = try DMAArena(structureBytes: perQueue * nQueues, ioPages: pagesPerQueue * nQueues)
        self.arena = arena
        var laneList: [Lane] = []
        let firstPage = arena.poolFirstPage
        var pool = (0..<(pagesPerQueue * nQueues)).map { Int32(firstPage + $0) }
        // The device sees the whole memfd, so rings allocated after attaching are visible too.
        try transport.attachMemory(arena.memory)
        for q in 0..<nQueues {
            let vq = try Self.makeQueue(ring, arena: arena, size: queueSize)
            vq.eventIndex = features.contains(.eventIdx)
            let addresses = vq.addresses
            let headers = try arena.allocate(BlkRequestSlot.stride * queueSize, alignment: BlkRequestSlot.stride)
            let tables = useIndirect ? try arena.allocate(tableStride * queueSize, alignment: 16) : nil
            let d = try transport.setupQueue(
                q, size: queueSize, descriptors: addresses.descriptors,
                driverArea: addresses.driverArea, deviceArea: addresses.deviceArea)
            let mine = Array(pool.suffix(pagesPerQueue))
            pool.removeLast(pagesPerQueue)
            laneList.append(
                Lane(
                    index: q, headers: headers, tables: tables, tableStride: tableStride, addresses: addresses,
                    state: LaneState(
                        queue: vq, doorbells: d, slots: Array(repeating: nil, count: queueSize), freePages: mine)))
        }
        lanes = laneList
        stopFD = try EventFD()
        // Step 8: DRIVER_OK.
        try transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        logger.info(
            "virtio-blk ready",
            metadata: [
                "capacity": "\(g.capacityBytes)", "features": "\(features)", "ring": "\(ring)", "queues": "\(nQueues)",
                "queue-size": "\(queueSize)", "seg-max": "\(g.segMax)", "pages-per-request": "\(maxPagesPerRequest)",
                "io-pages": "\(pagesPerQueue * nQueues)",
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
        if reapedByCaller { return }
        for lane in lanes {
            let t = Thread { [unowned self] in self.completionLoop(lane) }
            t.name = "virtio-blk-irq\(lane.index)"
            threadCount += 1
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
    private static func negotiate(_ transport: VirtioTransport, _ features: VirtioFeatures) throws {
        try transport.writeDriverFeatures(features)
        try transport.writeStatus([.acknowledge, .driver, .featuresOK])
        guard transport.readStatus().contains(.featuresOK) else {
            try? transport.writeStatus([.failed])
            throw VirtioTransportError.featuresRejected(features)
        }
    }

    /// A ring of the chosen format in the arena.
    private static func makeQueue(_ ring: RingFormat, arena: DMAArena, size: Int) throws -> any DriverVirtqueue {
        switch ring {
        case .split: return try SplitVirtqueue(arena: arena, size: size)
        case .packed: return try PackedVirtqueue(arena: arena, size: size)
        }
    }

    // MARK: submission

    private enum Decision {
        case launch([Int32])
        case wait
        case fail(BlkError)
    }

    /// Issues one request on the calling thread's lane. `fill` runs before the request is made
    /// available (writes copy their data into the pages there); `done` runs on the completion
    /// thread with the pages, which return to the pool when it returns. Requests that do not fit
    /// wait, first come first served.
    public func submit(_ command: BlkCommand, fill: Fill? = nil, done: @escaping Completion) {
        precondition(command.pages <= maxPagesPerRequest, "callers split requests to maxPagesPerRequest")
        let lane = lanes[IOLane.current % lanes.count]
        let p = Pending(command: command, fill: fill, done: done)
        let d: Decision = lane.state.withLock { s in
            if let b = s.broken { return .fail(.deviceBroken(b)) }
            if s.closing { return .fail(.shutdown) }
            s.inFlight += 1
            if !s.resetting, s.waiting.isEmpty, let pages = reserve(&s, lane, command) {
                return .launch(pages)
            }
            s.waiting.append(p)
            return .wait
        }
        switch d {
        case .launch(let pages): launch(lane, p, pages)
        case .fail(let e): done(.failure(e))
        case .wait: break
        }
    }

    private func isSegmentCommand(_ c: BlkCommand) -> Bool {
        if case .discard = c { return true }
        if case .writeZeroes = c { return true }
        return false
    }
    private func descriptorCount(_ c: BlkCommand) -> Int { c.pages + 2 + (isSegmentCommand(c) ? 1 : 0) }
    /// Requests of more than one data page go through an indirect table when there is one.
    @inline(__always) private func goesIndirect(_ lane: Lane, _ c: BlkCommand) -> Bool {
        lane.tables != nil && descriptorCount(c) > 3
    }
    private func ringCost(_ lane: Lane, _ c: BlkCommand) -> Int {
        ringDescriptors(segments: descriptorCount(c), indirect: goesIndirect(lane, c))
    }

    /// Takes pages and reserves ring descriptors, or returns nil if either is short.
    private func reserve(_ s: inout LaneState, _ lane: Lane, _ c: BlkCommand, pages given: [Int32]? = nil) -> [Int32]? {
        let descs = ringCost(lane, c)
        guard s.queue.freeCount - s.reservedDescriptors >= descs, given != nil || s.freePages.count >= c.pages else {
            return nil
        }
        s.reservedDescriptors += descs
        if let g = given { return g }
        var pages: [Int32] = []
        pages.reserveCapacity(c.pages)
        for _ in 0..<c.pages { pages.append(s.freePages.removeLast()) }
        return pages
    }

    /// Fills data (outside the lock), builds the chain, publishes it and kicks if the device wants.
    private func launch(_ lane: Lane, _ p: Pending, _ pages: [Int32]) {
        if p.pages == nil, let fill = p.fill { fill(IOPages(pages: pages, memory: arena.memory, arena: arena)) }
        let mem = arena.memory
        let lastPageBytes = lastPageLength(p.command)
        if lastPageBytes < Self.pageSize, case .read = p.command {
            // The device fills only the sectors it has; the rest of the page reads as zero.
            mem.zero(arena.pageOffset(pages[pages.count - 1]) + lastPageBytes, count: Self.pageSize - lastPageBytes)
        }
        var failed: String?
        let kick: QueueDoorbells? = lane.state.withLock { s in
            let n = descriptorCount(p.command)
            let indirect = goesIndirect(lane, p.command)
            s.reservedDescriptors -= ringDescriptors(segments: n, indirect: indirect)
            if let why = s.broken {
                // A reset failed between reserve and launch: the request is in neither the slots
                // nor the waiting list the failure went through, so it fails here (else it would
                // go onto a dead ring and never be answered).
                s.freePages.append(contentsOf: pages)
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
            // Header and status live in the per-id slot of the chain add() is about to build.
            let id = Int(s.queue.nextFreeID)
            let slot = BlkRequestSlot(id: id, base: lane.headers.offset, device: lane.headers.deviceAddress)
            let h = slot.offset + BlkRequestSlot.header
            let seg = slot.offset + BlkRequestSlot.segment
            var sector: UInt64 = 0
            switch p.command {
            case .read(let sec, _), .write(let sec, _): sector = sec
            case .discard(let sec, let n), .writeZeroes(let sec, let n, _):
                mem.store64(seg, sec)
                mem.store32(seg + 8, n)
                if case .writeZeroes(_, _, let unmap) = p.command {
                    mem.store32(seg + 12, unmap ? BlkRequestLayout.unmapFlag : 0)
                } else {
                    mem.store32(seg + 12, 0)
                }
            default: break
            }
            mem.store32(h, p.command.typeCode)
            mem.store32(h + 4, 0)
            mem.store64(h + 8, sector)
            // No status yet: anything but ok / ioErr / unsupp afterwards is an I/O error.
            mem.store8(slot.offset + BlkRequestSlot.status, 0xFF)
            let isRead: Bool
            switch p.command {
            case .read, .getID: isRead = true
            default: isRead = false
            }
            let hasSegment = isSegmentCommand(p.command)
            let table = indirect ? lane.tables!.slice(at: lane.tableStride * id, length: lane.tableStride) : nil
            let a = slot.deviceAddress
            let got = s.queue.add(count: n, indirect: table) { k in
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
                if hasSegment {
                    return VirtqueueSegment(
                        address: a + UInt64(BlkRequestSlot.segment), length: UInt32(BlkRequestLayout.segmentBytes),
                        deviceWritable: false)
                }
                let len: UInt32 = {
                    if case .getID = p.command {
                        return UInt32(BlkRequestLayout.deviceIDBytes)
                    } else {
                        return UInt32(k == n - 2 ? lastPageBytes : Self.pageSize)
                    }
                }()
                return VirtqueueSegment(
                    address: arena.pageDeviceAddress(pages[k - 1]), length: len, deviceWritable: isRead)
            }
            precondition(got.map(Int.init) == id, "reserved descriptors must be available")
            s.slots[id] = Slot(
                pages: pages, done: p.done, command: p.command, submitted: .now, resubmissions: p.resubmissions)
            return s.queue.publish() ? s.doorbells : nil
        }
        if let why = failed { return p.done(.failure(.deviceBroken(why))) }
        if let d = kick {
            stats.kicks.add(1, ordering: .relaxed)
            d.kick()
        }
    }

    /// The data length of a read or write's last page: 4096, or less when the request would run
    /// past the device's capacity only inside that page (a capacity that is not a multiple of
    /// 4 KiB, e.g. a 10240-byte image): then the request stops at the capacity, in whole sectors.
    /// A request that starts at or past the capacity, or runs past it by a page or more (the
    /// device shrank under it), goes out whole and the device fails it.
    private func lastPageLength(_ c: BlkCommand) -> Int {
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

    // MARK: completion

    private func completionLoop(_ lane: Lane) {
        defer { threadsDone.signal() }
        IOLane.set(lane.index) // follow-up requests issued from completions stay on this queue
        var finished: [(Slot, UInt8)] = []
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
        var finished: [(Slot, UInt8)] = []
        reap(lane, into: &finished)
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
        var finished: [(Slot, UInt8)] = []
        return reap(lane, into: &finished, checkStatus: false)
    }

    /// Completes what the device has used; returns how many.
    @discardableResult
    private func reap(_ lane: Lane, into finished: inout [(Slot, UInt8)], checkStatus: Bool = true) -> Int {
        let mem = arena.memory
        var failure: String?
        let seen = epoch.load(ordering: .acquiring)
        let usable = lane.state.withLock { s -> Bool in
            guard !s.resetting, s.broken == nil else { return false }
            do {
                while let (id, _) = try s.queue.nextUsed() {
                    guard let slot = s.slots[Int(id)] else { continue }
                    s.slots[Int(id)] = nil
                    let at = BlkRequestSlot(id: Int(id), base: lane.headers.offset, device: 0).offset
                    finished.append((slot, mem.load8(at + BlkRequestSlot.status)))
                }
            } catch {
                failure = "\(error)"
            }
            return true
        }
        guard usable else { return 0 }
        if checkStatus, failure == nil, finished.isEmpty, transport.readStatus().contains(.deviceNeedsReset) {
            failure = "the device set DEVICE_NEEDS_RESET"
        }
        let count = finished.count
        for (slot, status) in finished {
            let io = IOPages(pages: slot.pages, memory: mem, arena: arena)
            switch status {
            case BlkStatus.ok: slot.done(.success(io))
            case BlkStatus.unsupp:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.unsupported(describe(slot.command))))
            case BlkStatus.ioErr:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.ioError("\(describe(slot.command)) failed")))
            default:
                stats.errors.add(1, ordering: .relaxed)
                slot.done(.failure(.ioError("\(describe(slot.command)): device wrote no status")))
            }
        }
        // Return pages, then start whatever now fits.
        let toLaunch: [(Pending, [Int32])] = lane.state.withLock { s in
            for (slot, _) in finished { s.freePages.append(contentsOf: slot.pages) }
            s.inFlight -= finished.count
            return takeWaiting(&s, lane)
        }
        finished.removeAll(keepingCapacity: true)
        for (p, pages) in toLaunch { launch(lane, p, pages) }
        if let f = failure { requestRecovery(reason: f, seenEpoch: seen) }
        return count
    }

    /// Waiting requests that now fit, in order.
    private func takeWaiting(_ s: inout LaneState, _ lane: Lane) -> [(Pending, [Int32])] {
        var out: [(Pending, [Int32])] = []
        guard !s.resetting else { return out }
        while let first = s.waiting.first, let pages = reserve(&s, lane, first.command, pages: first.pages) {
            out.append((s.waiting.removeFirst(), pages))
        }
        return out
    }

    private func checkTimeouts(_ lane: Lane, limit: Double) {
        let seen = epoch.load(ordering: .acquiring)
        let now = ContinuousClock.now
        let late: Slot? = lane.state.withLock { s in
            guard !s.resetting, s.broken == nil, s.inFlight > 0 else { return nil }
            return s.slots.lazy.compactMap { $0 }.first { now - $0.submitted > .seconds(limit) }
        }
        if let l = late {
            stats.timeouts.add(1, ordering: .relaxed)
            requestRecovery(reason: "\(describe(l.command)) was not completed within \(limit) s", seenEpoch: seen)
        }
    }

    /// A configuration change (§2.5.1): re-read the capacity under the generation counter.
    private func checkConfig() {
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

    // MARK: recovery

    /// Starts `recover` on a thread of its own unless one runs. A recovery may wait many seconds
    /// for a device to come back (a vhost-user backend restarting), which must not hold up the
    /// event loop or completion thread that noticed the failure.
    private func requestRecovery(reason: String, seenEpoch: Int) {
        guard epoch.load(ordering: .acquiring) == seenEpoch,
            recovering.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { return }
        let t = Thread { [self] in
            recover(reason: reason, seenEpoch: seenEpoch)
            recovering.store(false, ordering: .releasing)
        }
        t.name = "virtio-blk-recovery"
        t.start()
    }

    /// Resets the device and brings it back (§2.1.2: DEVICE_NEEDS_RESET; or a request timed out).
    /// Every virtio-blk request is idempotent, so each one in flight is resubmitted (once; up to
    /// three times on a transport that reconnects, where a backend restart is the usual cause).
    /// When the reset fails, everything fails at once, unless the transport can reconnect: then
    /// the requests are held and the reset retried with backoff for `reconnectTimeoutSeconds`,
    /// after which they fail and the retries go on in the background until the device returns.
    private func recover(reason: String, seenEpoch: Int) {
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
                let why = "\(reason); the reset failed: \(error)"
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
                    failEverything(why, held: held, alsoFailing: fail)
                    held = []
                    fail = []
                }
                if !sleepUnlessStopping(delay) {
                    if !gaveUp { failEverything("\(why); the server is shutting down", held: held, alsoFailing: fail) }
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
    private func holdInFlight(maxResubmissions: Int) -> (
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
                        fail.append((sl.done, .ioError("\(describe(sl.command)) failed again after a device reset")))
                        s.freePages.append(contentsOf: sl.pages)
                        s.inFlight -= 1
                    } else {
                        let p = Pending(
                            command: sl.command, fill: nil, done: sl.done, pages: sl.pages,
                            resubmissions: sl.resubmissions + 1)
                        held.append((lane, p, sl.pages))
                    }
                }
            }
        }
        return (held, fail)
    }

    /// §3.1.1 again on the same arena and ring addresses; the transport's `reset` reconnects a
    /// backend that went away.
    private func bringUp() throws {
        try transport.reset()
        try transport.writeStatus([.acknowledge])
        try transport.writeStatus([.acknowledge, .driver])
        try Self.negotiate(transport, negotiated)
        for lane in lanes {
            let d = try lane.state.withLock { s in
                s.queue.reset()
                return try transport.setupQueue(
                    lane.index, size: queueSize, descriptors: lane.addresses.descriptors,
                    driverArea: lane.addresses.driverArea, deviceArea: lane.addresses.deviceArea)
            }
            try lane.state.withLock { s in
                // A caller watches the interrupt it was given at start: it must stay the same.
                guard !reapedByCaller || d.interrupt === s.doorbells.interrupt else {
                    throw VirtioTransportError.deviceFailed(
                        "queue \(lane.index) got a new interrupt eventfd from the reset, which the event loop does not watch"
                    )
                }
                s.doorbells = d
            }
        }
        try transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        guard !transport.readStatus().contains(.deviceNeedsReset) else {
            throw VirtioTransportError.deviceFailed("the device still needs a reset after one")
        }
    }

    /// The reset failed for good (or for now): every lane is broken, so new requests fail at once,
    /// and everything held or waiting fails with `why`.
    private func failEverything(
        _ why: String, held: [(Lane, Pending, [Int32])], alsoFailing already: [(Completion, BlkError)]
    ) {
        logger.error("virtio-blk device failed: \(why); failing every request")
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
                s.freePages.append(contentsOf: pages)
                s.inFlight -= 1
            }
            fail.append((p.done, .deviceBroken(why)))
        }
        for (d, e) in fail { d(.failure(e)) }
    }

    /// The device is back: lanes take requests again, held ones first, then whatever waited.
    private func resume(held: [(Lane, Pending, [Int32])], failing fail: [(Completion, BlkError)]) {
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
    private func sleepUnlessStopping(_ d: Duration) -> Bool {
        let end = ContinuousClock.now + d
        while ContinuousClock.now < end {
            if stopping.load(ordering: .acquiring) { return false }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return !stopping.load(ordering: .acquiring)
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
    private func reapFromShutdown() {
        guard reapedByCaller else { return }
        var finished: [(Slot, UInt8)] = []
        for lane in lanes { reap(lane, into: &finished) }
    }

    private func stopThreads() {
        guard threadCount > 0 else { return }
        stopFD.signal()
        for _ in 0..<threadCount { threadsDone.wait() }
        threadCount = 0
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
