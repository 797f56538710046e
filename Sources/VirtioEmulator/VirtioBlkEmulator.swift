// An in-process virtio-blk device (VIRTIO 1.2 §5.2) behind the virtio-mmio register model (§4.2).
//
// It is a real device: it runs on its own thread, sees the driver only through its own mapping of
// the shared arena and through registers, is woken by a kick eventfd, and raises its interrupt by
// writing an eventfd. It validates every chain and answers IOERR/UNSUPP instead of trusting it.
import Foundation
import Logging
import Synchronization
import Virtio

/// Counters the emulator keeps (exposed in logs and metrics).
public final class EmulatorStats: Sendable {
    public let reads = Atomic<Int>(0), writes = Atomic<Int>(0), flushes = Atomic<Int>(0)
    public let discards = Atomic<Int>(0), writeZeroes = Atomic<Int>(0), getIDs = Atomic<Int>(0)
    public let ioErrors = Atomic<Int>(0), unsupported = Atomic<Int>(0), badChains = Atomic<Int>(0)
    public let kicks = Atomic<Int>(0), interrupts = Atomic<Int>(0)
    public init() {}
    public var summary: String {
        "virtio_read=\(reads.load(ordering: .relaxed)) virtio_write=\(writes.load(ordering: .relaxed)) virtio_flush=\(flushes.load(ordering: .relaxed)) virtio_discard=\(discards.load(ordering: .relaxed)) virtio_write_zeroes=\(writeZeroes.load(ordering: .relaxed)) virtio_ioerr=\(ioErrors.load(ordering: .relaxed)) virtio_unsupp=\(unsupported.load(ordering: .relaxed)) bad_chains=\(badChains.load(ordering: .relaxed)) kicks=\(kicks.load(ordering: .relaxed)) interrupts=\(interrupts.load(ordering: .relaxed))"
    }
}

public struct EmulatorConfiguration: Sendable {
    public enum CompletionOrder: Sendable { case inOrder, reversed }
    public var maxQueueSize = 32768
    /// Request queues the device offers (VIRTIO_BLK_F_MQ when more than one). Each has its own
    /// kick and interrupt eventfds and its own device thread.
    public var queues = 4
    /// Features the device offers; the RO bit is added for read-only backends, MQ for several queues.
    public var features: VirtioFeatures = [
        .version1, .blkSizeMax, .blkSegMax, .blkBlkSize, .blkFlush, .blkDiscard, .blkWriteZeroes, .eventIdx,
        .indirectDesc, .ringPacked,
    ]
    public var segMax: UInt32 = 254
    public var sizeMax: UInt32 = 1 << 20
    public var maxDiscardSectors: UInt32 = 1 << 22
    public var maxWriteZeroesSectors: UInt32 = 1 << 22
    public var serial = "virtnbd-emulator"
    /// Order in which a batch's completions are published (reversed exercises out-of-order handling).
    public var completionOrder: CompletionOrder = .inOrder
    /// After draining a queue, keep polling it this long before re-enabling notifications and
    /// sleeping on the kick eventfd (0 = sleep at once).
    public var pollMicroseconds = 0
    /// Run to completion: a notify processes its queue at once, on the thread that wrote the
    /// doorbell (as a hypervisor without ioeventfd runs the device's notify handler on the vCPU
    /// that wrote it), instead of waking the queue's device thread. Still only through shared
    /// memory. For backends that do not block (RAM): no thread hop, no kick, no polling.
    public var inline = false
    public init() {}
}

#if DEBUG
    /// Misbehaviour on purpose, for the driver's recovery tests. Debug builds only: a release binary
    /// has no way to make its device misbehave.
    public struct EmulatorFaults: Sendable {
        /// Requests (counted from 1 over all queues) the device takes but never completes.
        public var swallow: Set<Int> = []
        /// After this many requests the device sets DEVICE_NEEDS_RESET (once).
        public var needsResetAfter: Int?
        public init() {}
    }
#endif

public final class VirtioBlkEmulator: MMIOBus, @unchecked Sendable {
    public let stats = EmulatorStats()
    /// Interrupt of queue 0 (virtio-mmio's one line); `interrupt(forQueue:)` has the others (as MSI-X vectors would).
    public var interrupt: EventFD { interrupts[0] }
    public var completesOnNotify: Bool { config.inline }
    private let interrupts: [EventFD]
    private let kicks: [EventFD]
    /// Held by queue i's device thread while it works through a batch of that queue. A reset
    /// takes each one after clearing the registers (a barrier), so once the driver's status-0
    /// write returns no device thread still touches the old rings: §2.1.2 / §4.2.2.1 — after a
    /// reset the device must not use the queues any more, or a used entry published late would
    /// complete a request the driver has already resubmitted.
    ///
    /// It is held across backend I/O (a pread, pwrite, fdatasync or hole punch of the file), the
    /// one exception to `Locked`'s "do not block inside it", and that is deliberate: a batch's
    /// requests are popped from the old rings and their used entries published after their I/O,
    /// so releasing it around the I/O would reopen the window the barrier closes. Nothing else
    /// contends for it: the queue's own device thread takes it per batch, and only a reset (a
    /// status-0 write: at setup, in the driver's recovery, at shutdown) waits on it, for the I/O
    /// of the requests the batch still finds available plus the poll window (`pollMicroseconds`).
    /// A resetting driver submits nothing more, so that is bounded. Other register accesses take
    /// `regs`, never this lock.
    /// One per queue: held while a batch is served (a reset waits for it), and the batch's
    /// working storage, kept between batches so that serving one allocates nothing.
    private let processing: [Locked<BatchScratch>]
    private let stopFD: EventFD
    private let backend: BlockBackend
    private let config: EmulatorConfiguration
    private let offered: VirtioFeatures
    private let logger: Logger

    /// Register state, shared by driver threads (register accesses) and the device threads.
    private struct QueueRegs {
        var num: UInt32 = 0
        var ready = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }
    private struct Registers {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [QueueRegs]
        var interruptStatus: UInt32 = 0
        var memory: SharedMemory?
        var live: [(any DeviceVirtqueue)?]
        var generation: UInt32 = 0
        var configSpace: [UInt8]
        var capacityBytes: UInt64
        #if DEBUG
            var faults = EmulatorFaults()
            var requests = 0
        #endif
        init(queues n: Int, memory: SharedMemory?, generation: UInt32, configSpace: [UInt8], capacityBytes: UInt64) {
            queues = Array(repeating: QueueRegs(), count: n)
            live = Array(repeating: nil, count: n)
            self.memory = memory
            self.generation = generation
            self.configSpace = configSpace
            self.capacityBytes = capacityBytes
        }
    }
    private let regs: Locked<Registers>
    /// What the device reports as its size (`setCapacity`); requests beyond it get IOERR.
    private let capacity: Atomic<UInt64>
    /// The backend's size rounded up to whole 512-byte sectors: the largest capacity. A backend
    /// whose size is not a whole number of sectors ends inside the last sector; that sector's
    /// bytes past the end read as zero and writes to them are dropped (the backend never grows).
    public let deviceBytes: UInt64
    private var threads: [Thread] = []
    private let done = DispatchSemaphore(value: 0)

    public init(
        backend: BlockBackend, configuration: EmulatorConfiguration = .init(),
        logger: Logger = Logger(label: "virtnbd.emulator")
    ) throws {
        self.backend = backend
        self.config = configuration
        self.logger = logger
        let n = max(1, min(configuration.queues, 64))
        var f = configuration.features
        if backend.readOnly {
            f.insert(.blkRO)
            f.remove(.blkDiscard)
            f.remove(.blkWriteZeroes)
        }
        if n > 1 { f.insert(.blkMQ) } else { f.remove(.blkMQ) }
        offered = f
        interrupts = try (0..<n).map { _ in try EventFD() }
        kicks = try (0..<n).map { _ in try EventFD() }
        processing = (0..<n).map { _ in Locked(BatchScratch()) }
        stopFD = try EventFD()
        deviceBytes = (backend.size + 511) & ~511
        capacity = Atomic(deviceBytes)
        regs = Locked(
            Registers(
                queues: n, memory: nil, generation: 0,
                configSpace: Self.makeConfig(capacitySectors: deviceBytes / 512, queues: n, c: configuration),
                capacityBytes: deviceBytes))
        for q in 0..<n {
            let t = Thread.named("virtio-blk-dev\(q)") { [unowned self] in self.run(queue: q) }
            threads.append(t)
            t.start()
        }
        if configuration.inline {
            logger.info(
                "the device runs to completion on the notifying thread (--device-inline); its threads only answer status changes"
            )
        }
    }

    public var queueCount: Int { kicks.count }
    public func interrupt(forQueue q: Int) -> EventFD { interrupts[q < interrupts.count ? q : 0] }

    /// Stops the device threads (the backend is flushed by the driver before this).
    public func shutdown() {
        guard !threads.isEmpty else { return }
        stopFD.signal()
        for _ in threads { done.wait() }
        threads = []
    }
    deinit {
        if !threads.isEmpty {
            stopFD.signal()
            for _ in threads { done.wait() }
        }
    }

    /// Changes the capacity the device reports (e.g. after the backing store grew), bumps the
    /// config generation and raises a configuration-change interrupt (§2.5.1, §4.2.2 ISR bit 1).
    /// It never exceeds `deviceBytes`, the backend's size in whole sectors.
    public func setCapacity(bytes: UInt64) {
        regs.withLock { r in
            r.capacityBytes = min(bytes, deviceBytes) & ~511
            capacity.store(r.capacityBytes, ordering: .relaxed)
            for i in 0..<8 { r.configSpace[i] = UInt8(truncatingIfNeeded: (r.capacityBytes / 512) >> (8 * UInt64(i))) }
            r.generation &+= 1
        }
        raiseInterrupt(queue: nil)
    }

    #if DEBUG
        /// Installs misbehaviour for recovery tests (debug builds only).
        public func inject(_ faults: EmulatorFaults) {
            regs.withLock {
                $0.faults = faults
                $0.requests = 0
            }
            faultsArmed.store(!faults.swallow.isEmpty || faults.needsResetAfter != nil, ordering: .releasing)
        }
        /// Whether `inject` armed anything: without faults the per-request hook takes no lock (the
        /// register lock is shared by every queue's thread).
        private let faultsArmed = Atomic<Bool>(false)
    #endif

    /// Config space layout (§5.2.4).
    static func makeConfig(capacitySectors: UInt64, queues: Int, c: EmulatorConfiguration) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: BlkConfig.size)
        func put(_ off: Int, _ v: UInt64, _ w: Int) {
            for i in 0..<w { b[off + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
        }
        put(BlkConfig.capacity, capacitySectors, 8)
        put(BlkConfig.sizeMax, UInt64(c.sizeMax), 4)
        put(BlkConfig.segMax, UInt64(c.segMax), 4)
        put(BlkConfig.blockSize, 4096, 4)
        put(BlkConfig.numQueues, UInt64(queues), 2)
        put(BlkConfig.maxDiscardSectors, UInt64(c.maxDiscardSectors), 4)
        put(BlkConfig.maxDiscardSegments, 1, 4)
        put(BlkConfig.discardSectorAlignment, 8, 4) // 4 KiB
        put(BlkConfig.maxWriteZeroesSectors, UInt64(c.maxWriteZeroesSectors), 4)
        put(BlkConfig.maxWriteZeroesSegments, 1, 4)
        put(BlkConfig.writeZeroesMayUnmap, 1, 1)
        return b
    }

    // MARK: MMIOBus (driver-facing registers)

    public func attachMemory(_ memory: SharedMemory) throws {
        // The device maps the driver's memfd itself: it shares memory, not pointers.
        let mine = try SharedMemory(mapping: memory.fd, size: memory.size, deviceBase: memory.deviceBase)
        regs.withLock { $0.memory = mine }
    }

    public func read32(_ offset: Int) -> UInt32 {
        regs.withLock { r in
            let sel = Int(r.queueSel)
            let valid = sel < r.queues.count
            switch offset {
            case MMIORegister.magic: return MMIORegister.magicValue
            case MMIORegister.version: return 2
            case MMIORegister.deviceID: return 2
            case MMIORegister.vendorID: return 0x564E_4244 // "VNBD"
            case MMIORegister.deviceFeatures:
                return r.deviceFeaturesSel == 0
                    ? UInt32(truncatingIfNeeded: offered.rawValue)
                    : r.deviceFeaturesSel == 1 ? UInt32(truncatingIfNeeded: offered.rawValue >> 32) : 0
            case MMIORegister.queueNumMax: return valid ? UInt32(config.maxQueueSize) : 0
            case MMIORegister.queueNum: return valid ? r.queues[sel].num : 0
            case MMIORegister.queueReady: return valid && r.queues[sel].ready ? 1 : 0
            case MMIORegister.interruptStatus: return r.interruptStatus
            case MMIORegister.status: return r.status
            case MMIORegister.configGeneration: return r.generation
            default: return 0
            }
        }
    }

    public func write32(_ offset: Int, _ value: UInt32) {
        if offset == MMIORegister.queueNotify {
            guard Int(value) < kicks.count else { return }
            if config.inline {
                drain(queue: Int(value), window: .zero)
            } else {
                kicks[Int(value)].signal()
            }
            return
        }
        regs.withLock { r in
            let sel = Int(r.queueSel)
            let valid = sel < r.queues.count
            func low(_ v: inout UInt64) { v = (v & ~0xFFFF_FFFF) | UInt64(value) }
            func high(_ v: inout UInt64) { v = (v & 0xFFFF_FFFF) | UInt64(value) << 32 }
            switch offset {
            case MMIORegister.deviceFeaturesSel: r.deviceFeaturesSel = value
            case MMIORegister.driverFeaturesSel: r.driverFeaturesSel = value
            case MMIORegister.driverFeatures:
                if r.driverFeaturesSel == 0 {
                    r.driverFeatures = (r.driverFeatures & ~0xFFFF_FFFF) | UInt64(value)
                } else if r.driverFeaturesSel == 1 {
                    r.driverFeatures = (r.driverFeatures & 0xFFFF_FFFF) | UInt64(value) << 32
                }
            case MMIORegister.queueSel: r.queueSel = value
            case MMIORegister.queueNum where valid: r.queues[sel].num = value
            case MMIORegister.queueDescLow where valid: low(&r.queues[sel].desc)
            case MMIORegister.queueDescHigh where valid: high(&r.queues[sel].desc)
            case MMIORegister.queueDriverLow where valid: low(&r.queues[sel].driver)
            case MMIORegister.queueDriverHigh where valid: high(&r.queues[sel].driver)
            case MMIORegister.queueDeviceLow where valid: low(&r.queues[sel].device)
            case MMIORegister.queueDeviceHigh where valid: high(&r.queues[sel].device)
            case MMIORegister.queueReady where valid: setQueueReady(&r, sel, value != 0)
            case MMIORegister.interruptACK: r.interruptStatus &= ~value
            case MMIORegister.status: setStatus(&r, value)
            default: break
            }
        }
        if offset == MMIORegister.status && value == 0 {
            // Reset: wait until no device thread is inside a batch of the old queues.
            for p in processing { p.withLock { _ in } }
        }
        if offset == MMIORegister.status { for k in kicks { k.signal() } } // DRIVER_OK may make work available
    }

    /// QueueReady (§4.2.2): a ready queue is built over the ring the driver placed; 0 takes it down.
    private func setQueueReady(_ r: inout Registers, _ sel: Int, _ ready: Bool) {
        guard ready else {
            r.queues[sel].ready = false
            r.live[sel] = nil
            return
        }
        let features = VirtioFeatures(rawValue: r.driverFeatures)
        let q = r.queues[sel]
        guard let mem = r.memory, Int(q.num) <= config.maxQueueSize,
            let dq = makeQueue(packed: features.contains(.ringPacked), mem: mem, q)
        else {
            logger.warning("driver configured queue \(sel) with an invalid size or placement; queue stays disabled")
            return
        }
        dq.eventIndex = features.contains(.eventIdx)
        dq.indirect = features.contains(.indirectDesc)
        r.queues[sel].ready = true
        r.live[sel] = dq
    }

    /// Device status (§2.1): 0 resets the registers; FEATURES_OK is refused for a feature set
    /// the device does not offer.
    private func setStatus(_ r: inout Registers, _ value: UInt32) {
        if value == 0 {
            var fresh = Registers(
                queues: r.queues.count, memory: r.memory, generation: r.generation &+ 1,
                configSpace: r.configSpace, capacityBytes: r.capacityBytes)
            #if DEBUG
                fresh.faults = r.faults
                fresh.requests = r.requests // injected faults outlive resets
            #endif
            r = fresh
            return
        }
        var v = value
        let drv = VirtioFeatures(rawValue: r.driverFeatures)
        if v & UInt32(VirtioStatus.featuresOK.rawValue) != 0
            && (!offered.isSuperset(of: drv) || !drv.contains(.version1))
        {
            v &= ~UInt32(VirtioStatus.featuresOK.rawValue) // §2.2.2: refuse unsupported feature sets
        }
        // The device's own NEEDS_RESET bit survives driver status writes until reset.
        r.status = v | (r.status & UInt32(VirtioStatus.deviceNeedsReset.rawValue))
    }

    /// The queue format the driver negotiated, placed where it said (nil: bad size or placement).
    private func makeQueue(packed: Bool, mem: SharedMemory, _ q: QueueRegs) -> (any DeviceVirtqueue)? {
        packed
            ? DevicePackedQueue(
                mem: mem, size: Int(q.num), descAddr: q.desc, driverAddr: q.driver, deviceAddr: q.device)
            : DeviceSplitQueue(mem: mem, size: Int(q.num), descAddr: q.desc, driverAddr: q.driver, deviceAddr: q.device)
    }

    public func readConfig8(_ offset: Int) -> UInt8 {
        let o = offset - MMIORegister.config
        return regs.withLock { r in o >= 0 && o < r.configSpace.count ? r.configSpace[o] : 0 }
    }

    // MARK: the device threads, one per queue

    private func run(queue index: Int) {
        defer { done.signal() }
        let kick = kicks[index]
        while true {
            let (_, stop) = kick.wait(orUntil: stopFD)
            if stop { return }
            kick.drain()
            drain(queue: index, window: .microseconds(config.pollMicroseconds))
        }
    }

    /// Serves queue `index` until it has nothing available: on its device thread after a kick,
    /// or inline on the notifying thread (`EmulatorConfiguration.inline`). With a `window` it
    /// keeps polling that long after the last request before it turns notifications back on.
    private func drain(queue index: Int, window: Duration) {
        stats.kicks.add(1, ordering: .relaxed)
        // The queue is looked up inside the batch lock, so a reset either comes before (the
        // lookup finds no queue) or waits for the batch to end.
        processing[index].withLock { scratch in
            let (queue, driverOK, features) = regs.withLock { r in
                (
                    r.live[index],
                    r.status & UInt32(VirtioStatus.driverOK.rawValue) != 0
                        && r.status & UInt32(VirtioStatus.deviceNeedsReset.rawValue) == 0,
                    VirtioFeatures(rawValue: r.driverFeatures)
                )
            }
            guard let q = queue, driverOK else { return }
            do {
                repeat {
                    q.setNotifications(enabled: false)
                    var deadline = ContinuousClock.now + window
                    repeat {
                        var got = false
                        while try q.pop(into: &scratch.chain) {
                            got = true
                            #if DEBUG
                                switch checkFaults() {
                                case .swallow: continue
                                case .needsReset: throw DeviceFault.injected
                                case .none: break
                                }
                            #endif
                            let len = process(
                                chain: scratch.chain, mem: q.mem, header: &scratch.header, features: features)
                            scratch.completed.append((scratch.chain.head, scratch.chain.ringSlots, len))
                            if scratch.completed.count >= 64 { flushCompleted(&scratch.completed, q, index) }
                        }
                        flushCompleted(&scratch.completed, q, index)
                        if got { deadline = .now + window } else if window > .zero { sched_yield() }
                    } while window > .zero && ContinuousClock.now < deadline
                    q.setNotifications(enabled: true)
                } while q.hasAvailable
            } catch {
                stats.badChains.add(1, ordering: .relaxed)
                logger.error("virtqueue \(index) is broken: \(error); setting DEVICE_NEEDS_RESET")
                flushCompleted(&scratch.completed, q, index)
                regs.withLock { r in
                    r.status |= UInt32(VirtioStatus.deviceNeedsReset.rawValue)
                    for i in r.live.indices { r.live[i] = nil }
                }
                raiseInterrupt(queue: nil)
            }
        }
    }

    /// A batch's working storage (`processing`).
    private struct BatchScratch {
        var chain = DescriptorChain()
        var completed: [(id: UInt16, slots: Int, length: UInt32)] = []
        var header = [UInt8](repeating: 0, count: 16)
    }

    #if DEBUG
        private enum DeviceFault: Error, CustomStringConvertible {
            case injected
            var description: String { "fault injected by a test" }
        }
        private enum FaultAction { case none, swallow, needsReset }
        private func checkFaults() -> FaultAction {
            guard faultsArmed.load(ordering: .acquiring) else { return .none }
            return regs.withLock { r in
                r.requests += 1
                if r.faults.swallow.contains(r.requests) { return .swallow }
                if let n = r.faults.needsResetAfter, r.requests > n {
                    r.faults.needsResetAfter = nil
                    return .needsReset
                }
                return .none
            }
        }
    #endif

    private func flushCompleted(
        _ completed: inout [(id: UInt16, slots: Int, length: UInt32)], _ q: any DeviceVirtqueue, _ index: Int
    ) {
        if completed.isEmpty { return }
        if config.completionOrder == .reversed { completed.reverse() }
        for c in completed { q.pushUsed(id: c.id, ringSlots: c.slots, length: c.length) }
        completed.removeAll(keepingCapacity: true)
        if q.publishUsed() { raiseInterrupt(queue: index) }
    }

    /// Raises queue `queue`'s interrupt, or a configuration-change interrupt on every vector (nil).
    private func raiseInterrupt(queue: Int?) {
        regs.withLock { $0.interruptStatus |= queue == nil ? 2 : 1 }
        stats.interrupts.add(1, ordering: .relaxed)
        if let q = queue { interrupts[q].signal() } else { for i in interrupts { i.signal() } }
    }

    /// Parses one chain, then executes it; returns the used length (bytes written into
    /// device-writable buffers).
    private func process(chain: DescriptorChain, mem: SharedMemory, header: inout [UInt8], features: VirtioFeatures)
        -> UInt32
    {
        let parser = BlkRequestParser(
            features: features, readOnly: backend.readOnly,
            capacityBytes: min(deviceBytes, capacity.load(ordering: .relaxed)),
            maxDiscardSectors: config.maxDiscardSectors, maxWriteZeroesSectors: config.maxWriteZeroesSectors)
        switch parser.parse(chain, mem: mem, header: &header) {
        case .request(let request, let status):
            return execute(request, chain, mem, status: status)
        case .refused(let why, let status):
            return why.status == BlkStatus.unsupp ? unsupp(mem, status) : ioErr(mem, status)
        case .fault(let fault):
            stats.badChains.add(1, ordering: .relaxed)
            switch fault {
            case .invalid(let why):
                logger.debug("rejecting chain \(chain.head): \(why)")
                return failChain(chain, mem)
            case .noStatusByte:
                logger.debug("rejecting chain \(chain.head): no device-writable status byte")
                return 0
            case .shortHeader(let status):
                return finish(mem, status, BlkStatus.ioErr, 1)
            }
        }
    }

    /// Runs a parsed request against the backend and writes its status byte; a backend error is IOERR.
    private func execute(_ request: BlkRequest, _ chain: DescriptorChain, _ mem: SharedMemory, status: Int) -> UInt32 {
        do {
            switch request {
            case .read(let sector, let bytes):
                var pos = sector * 512
                try forEachPiece(chain.writable, skip: 0, count: bytes) { off, n in
                    try readBackend(at: pos, into: mem, offset: off, count: n)
                    pos += UInt64(n)
                }
                stats.reads.add(1, ordering: .relaxed)
                return finish(mem, status, BlkStatus.ok, UInt32(bytes + 1))
            case .write(let sector, let bytes):
                var pos = sector * 512
                try forEachPiece(chain.readable, skip: 16, count: bytes) { off, n in
                    let k = backendBytes(at: pos, n)
                    if k > 0 { try backend.write(at: pos, from: mem, offset: off, count: k) }
                    pos += UInt64(n)
                }
                stats.writes.add(1, ordering: .relaxed)
                return finish(mem, status, BlkStatus.ok, 1)
            case .flush:
                try backend.flush()
                stats.flushes.add(1, ordering: .relaxed)
                return finish(mem, status, BlkStatus.ok, 1)
            case .getID:
                var id = Array(config.serial.utf8.prefix(20))
                id += [UInt8](repeating: 0, count: 20 - id.count)
                var k = 0
                forEachPiece(chain.writable, skip: 0, count: 20) { off, n in
                    mem.write(id[k..<k + n], at: off)
                    k += n
                }
                stats.getIDs.add(1, ordering: .relaxed)
                return finish(mem, status, BlkStatus.ok, 21)
            case .discard(let s, let n):
                let k = UInt64(backendBytes(at: s * 512, Int(n * 512)))
                if k > 0 { try backend.discard(at: s * 512, count: k) }
                stats.discards.add(1, ordering: .relaxed)
                logger.debug("DISCARD sector=\(s) sectors=\(n)")
                return finish(mem, status, BlkStatus.ok, 1)
            case .writeZeroes(let s, let n, let unmap):
                let k = UInt64(backendBytes(at: s * 512, Int(n * 512)))
                if k > 0 { try backend.writeZeroes(at: s * 512, count: k, unmap: unmap) }
                stats.writeZeroes.add(1, ordering: .relaxed)
                logger.debug("WRITE_ZEROES sector=\(s) sectors=\(n)")
                return finish(mem, status, BlkStatus.ok, 1)
            }
        } catch {
            logger.error("backend I/O failed: \(error)")
            return ioErr(mem, status)
        }
    }

    /// How many of the `count` bytes at `at` (an in-range request) the backend holds: all but
    /// those past its end, in the last sector.
    private func backendBytes(at: UInt64, _ count: Int) -> Int {
        at >= backend.size ? 0 : Int(min(UInt64(count), backend.size - at))
    }
    /// A read the backend serves up to its end; the bytes past it read as zero.
    private func readBackend(at: UInt64, into mem: SharedMemory, offset: Int, count: Int) throws {
        let k = backendBytes(at: at, count)
        if k > 0 { try backend.read(at: at, into: mem, offset: offset, count: k) }
        if k < count { mem.zero(offset + k, count: count - k) }
    }
    private func finish(_ mem: SharedMemory, _ statusOffset: Int, _ status: UInt8, _ len: UInt32) -> UInt32 {
        mem.store8(statusOffset, status)
        return len
    }
    private func ioErr(_ mem: SharedMemory, _ o: Int) -> UInt32 {
        stats.ioErrors.add(1, ordering: .relaxed)
        return finish(mem, o, BlkStatus.ioErr, 1)
    }
    private func unsupp(_ mem: SharedMemory, _ o: Int) -> UInt32 {
        stats.unsupported.add(1, ordering: .relaxed)
        return finish(mem, o, BlkStatus.unsupp, 1)
    }
    /// A chain that failed validation: report IOERR in the last writable byte seen, if any.
    private func failChain(_ chain: DescriptorChain, _ mem: SharedMemory) -> UInt32 {
        guard let last = chain.writable.last, last.length > 0 else { return 0 }
        return ioErr(mem, last.offset + last.length - 1)
    }
}
