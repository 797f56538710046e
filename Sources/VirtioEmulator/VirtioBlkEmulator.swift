// An in-process virtio-blk device (VIRTIO 1.2 §5.2) behind the virtio-mmio register model (§4.2).
//
// It is a real device: it runs on its own thread, sees the driver only through its own mapping of
// the shared arena and through registers, is woken by a kick eventfd, and raises its interrupt by
// writing an eventfd. It validates every chain and answers IOERR/UNSUPP instead of trusting it.
import Foundation
import Logging
import Synchronization
import Virtio

/// virtio-blk request types and statuses (§5.2.6).
public enum BlkRequestType {
    public static let `in`: UInt32 = 0, out: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8
    public static let discard: UInt32 = 11, writeZeroes: UInt32 = 13
}
public enum BlkStatus {
    public static let ok: UInt8 = 0, ioErr: UInt8 = 1, unsupp: UInt8 = 2
}

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
    /// Features the device offers; the RO bit is added for read-only backends.
    public var features: VirtioFeatures = [.version1, .blkSizeMax, .blkSegMax, .blkBlkSize, .blkFlush, .blkDiscard, .blkWriteZeroes, .eventIdx, .indirectDesc]
    public var segMax: UInt32 = 254
    public var sizeMax: UInt32 = 1 << 20
    public var maxDiscardSectors: UInt32 = 1 << 22
    public var maxWriteZeroesSectors: UInt32 = 1 << 22
    public var serial = "virtnbd-emulator"
    /// Order in which a batch's completions are published (reversed exercises out-of-order handling).
    public var completionOrder: CompletionOrder = .inOrder
    public init() {}
}

public final class VirtioBlkEmulator: MMIOBus, @unchecked Sendable {
    public let stats = EmulatorStats()
    public let interrupt: EventFD
    private let kick: EventFD
    private let stopFD: EventFD
    private let backend: BlockBackend
    private let config: EmulatorConfiguration
    private let offered: VirtioFeatures
    private let configSpace: [UInt8]
    private let logger: Logger

    /// Register state, shared by driver threads (register accesses) and the device thread.
    private struct QueueRegs { var num: UInt32 = 0; var ready = false; var desc: UInt64 = 0; var driver: UInt64 = 0; var device: UInt64 = 0 }
    private struct Registers {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queue = QueueRegs()
        var interruptStatus: UInt32 = 0
        var memory: SharedMemory?
        var live: (any DeviceVirtqueue)?
        var generation = 0
    }
    private let regs = Mutex(Registers())
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    public init(backend: BlockBackend, configuration: EmulatorConfiguration = .init(), logger: Logger = Logger(label: "virtnbd.emulator")) throws {
        self.backend = backend
        self.config = configuration
        self.logger = logger
        var f = configuration.features
        if backend.readOnly { f.insert(.blkRO); f.remove(.blkDiscard); f.remove(.blkWriteZeroes) }
        offered = f
        interrupt = try EventFD()
        kick = try EventFD()
        stopFD = try EventFD()
        configSpace = Self.makeConfig(capacitySectors: backend.size / 512, c: configuration)
        let t = Thread { [unowned self] in self.run() }
        t.name = "virtio-blk-dev"   // ≤ 15 bytes: Linux thread names
        thread = t
        t.start()
    }

    /// Stops the device thread (the backend is flushed by the driver before this).
    public func shutdown() {
        guard thread != nil else { return }
        stopFD.signal()
        done.wait()
        thread = nil
    }
    deinit { if thread != nil { stopFD.signal(); done.wait() } }

    /// Config space layout (§5.2.4).
    static func makeConfig(capacitySectors: UInt64, c: EmulatorConfiguration) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 60)
        func put(_ off: Int, _ v: UInt64, _ w: Int) { for i in 0..<w { b[off + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        put(0, capacitySectors, 8)
        put(8, UInt64(c.sizeMax), 4)
        put(12, UInt64(c.segMax), 4)
        put(20, 4096, 4)                         // blk_size
        put(34, 1, 2)                            // num_queues
        put(36, UInt64(c.maxDiscardSectors), 4)
        put(40, 1, 4)                            // max_discard_seg
        put(44, 8, 4)                            // discard_sector_alignment (4 KiB)
        put(48, UInt64(c.maxWriteZeroesSectors), 4)
        put(52, 1, 4)                            // max_write_zeroes_seg
        put(56, 1, 1)                            // write_zeroes_may_unmap
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
            switch offset {
            case MMIORegister.magic: return MMIORegister.magicValue
            case MMIORegister.version: return 2
            case MMIORegister.deviceID: return 2
            case MMIORegister.vendorID: return 0x564E_4244   // "VNBD"
            case MMIORegister.deviceFeatures:
                return r.deviceFeaturesSel == 0 ? UInt32(truncatingIfNeeded: offered.rawValue)
                    : r.deviceFeaturesSel == 1 ? UInt32(truncatingIfNeeded: offered.rawValue >> 32) : 0
            case MMIORegister.queueNumMax: return r.queueSel == 0 ? UInt32(config.maxQueueSize) : 0
            case MMIORegister.queueNum: return r.queue.num
            case MMIORegister.queueReady: return r.queueSel == 0 && r.queue.ready ? 1 : 0
            case MMIORegister.interruptStatus: return r.interruptStatus
            case MMIORegister.status: return r.status
            case MMIORegister.configGeneration: return 0
            default: return 0
            }
        }
    }

    public func write32(_ offset: Int, _ value: UInt32) {
        if offset == MMIORegister.queueNotify {
            kick.signal()
            return
        }
        regs.withLock { r in
            switch offset {
            case MMIORegister.deviceFeaturesSel: r.deviceFeaturesSel = value
            case MMIORegister.driverFeaturesSel: r.driverFeaturesSel = value
            case MMIORegister.driverFeatures:
                if r.driverFeaturesSel == 0 { r.driverFeatures = (r.driverFeatures & ~0xFFFF_FFFF) | UInt64(value) }
                else if r.driverFeaturesSel == 1 { r.driverFeatures = (r.driverFeatures & 0xFFFF_FFFF) | UInt64(value) << 32 }
            case MMIORegister.queueSel: r.queueSel = value
            case MMIORegister.queueNum where r.queueSel == 0: r.queue.num = value
            case MMIORegister.queueDescLow where r.queueSel == 0: r.queue.desc = (r.queue.desc & ~0xFFFF_FFFF) | UInt64(value)
            case MMIORegister.queueDescHigh where r.queueSel == 0: r.queue.desc = (r.queue.desc & 0xFFFF_FFFF) | UInt64(value) << 32
            case MMIORegister.queueDriverLow where r.queueSel == 0: r.queue.driver = (r.queue.driver & ~0xFFFF_FFFF) | UInt64(value)
            case MMIORegister.queueDriverHigh where r.queueSel == 0: r.queue.driver = (r.queue.driver & 0xFFFF_FFFF) | UInt64(value) << 32
            case MMIORegister.queueDeviceLow where r.queueSel == 0: r.queue.device = (r.queue.device & ~0xFFFF_FFFF) | UInt64(value)
            case MMIORegister.queueDeviceHigh where r.queueSel == 0: r.queue.device = (r.queue.device & 0xFFFF_FFFF) | UInt64(value) << 32
            case MMIORegister.queueReady where r.queueSel == 0:
                if value == 0 { r.queue.ready = false; r.live = nil; break }
                guard let mem = r.memory, Int(r.queue.num) <= config.maxQueueSize,
                      let q = DeviceSplitQueue(mem: mem, size: Int(r.queue.num), descAddr: r.queue.desc, driverAddr: r.queue.driver, deviceAddr: r.queue.device)
                else {
                    logger.warning("driver configured queue 0 with an invalid size or placement; queue stays disabled")
                    break
                }
                q.eventIndex = VirtioFeatures(rawValue: r.driverFeatures).contains(.eventIdx)
                q.indirect = VirtioFeatures(rawValue: r.driverFeatures).contains(.indirectDesc)
                r.queue.ready = true
                r.live = q
            case MMIORegister.interruptACK: r.interruptStatus &= ~value
            case MMIORegister.status:
                if value == 0 {
                    r = Registers(memory: r.memory, generation: r.generation + 1)
                    return
                }
                var v = value
                let drv = VirtioFeatures(rawValue: r.driverFeatures)
                if v & UInt32(VirtioStatus.featuresOK.rawValue) != 0 && (!offered.isSuperset(of: drv) || !drv.contains(.version1)) {
                    v &= ~UInt32(VirtioStatus.featuresOK.rawValue)   // §2.2.2: refuse unsupported feature sets
                }
                r.status = v
            default: break
            }
        }
        if offset == MMIORegister.status { kick.signal() }   // DRIVER_OK may make work available
    }

    public func readConfig8(_ offset: Int) -> UInt8 {
        let o = offset - MMIORegister.config
        return o >= 0 && o < configSpace.count ? configSpace[o] : 0
    }

    // MARK: the device thread

    private func run() {
        defer { done.signal() }
        var chain = DescriptorChain()
        var completed: [(id: UInt16, slots: Int, length: UInt32)] = []
        var header = [UInt8](repeating: 0, count: 16)
        while true {
            let (_, stop) = kick.wait(orUntil: stopFD)
            if stop { return }
            kick.drain()
            stats.kicks.add(1, ordering: .relaxed)
            let (queue, driverOK, features) = regs.withLock { r in
                (r.live, r.status & UInt32(VirtioStatus.driverOK.rawValue) != 0 && r.status & UInt32(VirtioStatus.deviceNeedsReset.rawValue) == 0, VirtioFeatures(rawValue: r.driverFeatures))
            }
            guard let q = queue, driverOK else { continue }
            do {
                repeat {
                    q.setNotifications(enabled: false)
                    while try q.pop(into: &chain) {
                        let len = process(chain: chain, mem: q.mem, header: &header, features: features)
                        completed.append((chain.head, chain.ringSlots, len))
                        if completed.count >= 64 { flushCompleted(&completed, q) }
                    }
                    flushCompleted(&completed, q)
                    q.setNotifications(enabled: true)
                } while q.hasAvailable
            } catch {
                stats.badChains.add(1, ordering: .relaxed)
                logger.error("virtqueue 0 is broken: \(error); setting DEVICE_NEEDS_RESET")
                flushCompleted(&completed, q)
                regs.withLock { $0.status |= UInt32(VirtioStatus.deviceNeedsReset.rawValue); $0.live = nil }
                raiseInterrupt(config: true)
            }
        }
    }

    private func flushCompleted(_ completed: inout [(id: UInt16, slots: Int, length: UInt32)], _ q: any DeviceVirtqueue) {
        if completed.isEmpty { return }
        if config.completionOrder == .reversed { completed.reverse() }
        for c in completed { q.pushUsed(id: c.id, ringSlots: c.slots, length: c.length) }
        completed.removeAll(keepingCapacity: true)
        if q.publishUsed() { raiseInterrupt(config: false) }
    }

    private func raiseInterrupt(config: Bool) {
        regs.withLock { $0.interruptStatus |= config ? 2 : 1 }
        stats.interrupts.add(1, ordering: .relaxed)
        interrupt.signal()
    }

    /// Executes one request; returns the used length (bytes written into device-writable buffers).
    private func process(chain: DescriptorChain, mem: SharedMemory, header: inout [UInt8], features: VirtioFeatures) -> UInt32 {
        let head = chain.head
        if let fault = chain.fault {
            stats.badChains.add(1, ordering: .relaxed)
            logger.debug("rejecting chain \(head): \(fault)")
            return failChain(chain, mem)
        }
        // The status byte is the last device-writable byte (§5.2.6).
        guard let last = chain.writable.last, last.length > 0 else {
            stats.badChains.add(1, ordering: .relaxed)
            logger.debug("rejecting chain \(head): no device-writable status byte")
            return 0
        }
        let statusOffset = last.offset + last.length - 1
        let dataIn = chain.writableBytes - 1
        guard chain.readableBytes >= 16 else {
            stats.badChains.add(1, ordering: .relaxed)
            return finish(mem, statusOffset, BlkStatus.ioErr, 1)
        }
        gather(chain.readable, skip: 0, count: 16, mem: mem, into: &header)
        let type = le32(header, 0)
        let sector = le64(header, 8)
        let dataOut = chain.readableBytes - 16
        do {
            switch type {
            case BlkRequestType.in:
                guard dataOut == 0, dataIn % 512 == 0, inRange(sector, UInt64(dataIn)) else { return ioErr(mem, statusOffset) }
                var pos = sector * 512
                try forEach(chain.writable, skip: 0, count: dataIn) { off, n in
                    try backend.read(at: pos, into: mem, offset: off, count: n); pos += UInt64(n)
                }
                stats.reads.add(1, ordering: .relaxed)
                return finish(mem, statusOffset, BlkStatus.ok, UInt32(dataIn + 1))
            case BlkRequestType.out:
                guard !backend.readOnly else { return ioErr(mem, statusOffset) }
                guard dataIn == 0, dataOut % 512 == 0, inRange(sector, UInt64(dataOut)) else { return ioErr(mem, statusOffset) }
                var pos = sector * 512
                try forEach(chain.readable, skip: 16, count: dataOut) { off, n in
                    try backend.write(at: pos, from: mem, offset: off, count: n); pos += UInt64(n)
                }
                stats.writes.add(1, ordering: .relaxed)
                return finish(mem, statusOffset, BlkStatus.ok, 1)
            case BlkRequestType.flush:
                guard features.contains(.blkFlush) else { return unsupp(mem, statusOffset) }
                try backend.flush()
                stats.flushes.add(1, ordering: .relaxed)
                return finish(mem, statusOffset, BlkStatus.ok, 1)
            case BlkRequestType.getID:
                guard dataIn >= 20 else { return ioErr(mem, statusOffset) }
                var id = Array(config.serial.utf8.prefix(20))
                id += [UInt8](repeating: 0, count: 20 - id.count)
                var k = 0
                forEach(chain.writable, skip: 0, count: 20) { off, n in mem.write(id[k..<k + n], at: off); k += n }
                stats.getIDs.add(1, ordering: .relaxed)
                return finish(mem, statusOffset, BlkStatus.ok, 21)
            case BlkRequestType.discard, BlkRequestType.writeZeroes:
                let isDiscard = type == BlkRequestType.discard
                guard features.contains(isDiscard ? .blkDiscard : .blkWriteZeroes) else { return unsupp(mem, statusOffset) }
                guard !backend.readOnly else { return ioErr(mem, statusOffset) }
                guard dataOut > 0, dataOut % 16 == 0, dataOut / 16 <= 1 else { return unsupp(mem, statusOffset) }
                var seg = [UInt8](repeating: 0, count: 16)
                gather(chain.readable, skip: 16, count: 16, mem: mem, into: &seg)
                let s = le64(seg, 0), n = UInt64(le32(seg, 8)), flags = le32(seg, 12)
                let limit = UInt64(isDiscard ? config.maxDiscardSectors : config.maxWriteZeroesSectors)
                // §5.2.6.2: unmap must be 0 on DISCARD; unknown flag bits are UNSUPP.
                guard flags & ~1 == 0, !(isDiscard && flags & 1 != 0) else { return unsupp(mem, statusOffset) }
                guard n <= limit, inRange(s, n * 512) else { return ioErr(mem, statusOffset) }
                if isDiscard {
                    try backend.discard(at: s * 512, count: n * 512)
                    stats.discards.add(1, ordering: .relaxed)
                } else {
                    try backend.writeZeroes(at: s * 512, count: n * 512, unmap: flags & 1 != 0)
                    stats.writeZeroes.add(1, ordering: .relaxed)
                }
                logger.debug("\(isDiscard ? "DISCARD" : "WRITE_ZEROES") sector=\(s) sectors=\(n)")
                return finish(mem, statusOffset, BlkStatus.ok, 1)
            default:
                return unsupp(mem, statusOffset)
            }
        } catch {
            logger.error("backend I/O failed: \(error)")
            return ioErr(mem, statusOffset)
        }
    }

    private func inRange(_ sector: UInt64, _ bytes: UInt64) -> Bool {
        let (start, o1) = sector.multipliedReportingOverflow(by: 512)
        let (end, o2) = start.addingReportingOverflow(bytes)
        return !o1 && !o2 && end <= backend.size
    }
    private func finish(_ mem: SharedMemory, _ statusOffset: Int, _ status: UInt8, _ len: UInt32) -> UInt32 {
        mem.store8(statusOffset, status)
        return len
    }
    private func ioErr(_ mem: SharedMemory, _ o: Int) -> UInt32 { stats.ioErrors.add(1, ordering: .relaxed); return finish(mem, o, BlkStatus.ioErr, 1) }
    private func unsupp(_ mem: SharedMemory, _ o: Int) -> UInt32 { stats.unsupported.add(1, ordering: .relaxed); return finish(mem, o, BlkStatus.unsupp, 1) }
    /// A chain that failed validation: report IOERR in the last writable byte seen, if any.
    private func failChain(_ chain: DescriptorChain, _ mem: SharedMemory) -> UInt32 {
        guard let last = chain.writable.last, last.length > 0 else { return 0 }
        return ioErr(mem, last.offset + last.length - 1)
    }

    private func forEach(_ segs: [MemorySegment], skip: Int, count: Int, _ body: (Int, Int) throws -> Void) rethrows {
        var skip = skip, left = count
        for s in segs where left > 0 {
            if skip >= s.length { skip -= s.length; continue }
            let n = min(s.length - skip, left)
            try body(s.offset + skip, n)
            left -= n; skip = 0
        }
    }
    private func gather(_ segs: [MemorySegment], skip: Int, count: Int, mem: SharedMemory, into out: inout [UInt8]) {
        var k = 0
        forEach(segs, skip: skip, count: count) { off, n in
            for i in 0..<n { out[k + i] = mem.load8(off + i) }
            k += n
        }
    }
    private func le32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
    private func le64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }
}
