import CVirtShim
// The VFIO virtio-pci transport: a virtio-blk PCI device bound to vfio-pci, driven from user space
// (VIRTIO 1.2 §4.1 "Virtio Over PCI Bus", modern interface only).
//
//   container /dev/vfio/vfio ── TYPE1v2 IOMMU ── MAP_DMA(arena: vaddr → IOVA = deviceBase)
//   group /dev/vfio/<n> ── device fd ── config space (region 7, pread/pwrite)
//                                     └─ BARs (mmap) holding the COMMON / NOTIFY / DEVICE capabilities
//   MSI-X vector i ── eventfd i (queue i; vector 0 also carries config changes)
//
// Register accesses go through MappedBAR (BAR.swift), the only file here with unsafe pointers.
import Foundation
import Logging
import Virtio

#if canImport(Glibc)
    import Glibc
#endif

/// Offsets in `struct virtio_pci_common_cfg` (§4.1.4.3).
enum CommonCfg {
    static let deviceFeatureSelect = 0x00, deviceFeature = 0x04
    static let driverFeatureSelect = 0x08, driverFeature = 0x0C
    static let configMSIXVector = 0x10, numQueues = 0x12, deviceStatus = 0x14, configGeneration = 0x15
    static let queueSelect = 0x16, queueSize = 0x18, queueMSIXVector = 0x1A, queueEnable = 0x1C
    static let queueNotifyOff = 0x1E, queueDesc = 0x20, queueDriver = 0x28, queueDevice = 0x30
    static let length = 0x38
}

/// A capability's window into a mapped BAR. Offsets are relative to the capability.
struct RegisterWindow: @unchecked Sendable {
    let bar: MappedBAR
    let offset: Int
    let length: Int
    @inline(__always) private func at(_ o: Int, _ w: Int) -> Int {
        precondition(o >= 0 && o + w <= length, "register access at \(o)+\(w) outside a \(length)-byte capability")
        return offset + o
    }
    func read8(_ o: Int) -> UInt8 { bar.read8(at(o, 1)) }
    func read16(_ o: Int) -> UInt16 { bar.read16(at(o, 2)) }
    func read32(_ o: Int) -> UInt32 { bar.read32(at(o, 4)) }
    func write8(_ o: Int, _ v: UInt8) { bar.write8(at(o, 1), v) }
    func write16(_ o: Int, _ v: UInt16) { bar.write16(at(o, 2), v) }
    func write32(_ o: Int, _ v: UInt32) { bar.write32(at(o, 4), v) }
    /// 64-bit registers as two 32-bit writes, low half first (§4.1.3.1).
    func write64(_ o: Int, _ v: UInt64) {
        write32(o, UInt32(truncatingIfNeeded: v))
        write32(o + 4, UInt32(truncatingIfNeeded: v >> 32))
    }
}

/// A file descriptor closed when the last reference goes.
final class OwnedFD: Sendable {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { Glibc.close(fd) }
}

public final class VFIOTransport: VirtioTransport, @unchecked Sendable {
    public static let vfioPCIConfigRegion: UInt32 = 7
    public static let vfioPCIMSIXIRQ: UInt32 = 2
    static let type1v2: Int32 = 3
    static let virtioVendor: UInt16 = 0x1AF4

    public let pciAddress: String
    public let iommuGroup: Int
    public let deviceID: UInt32
    private let logger: Logger
    private let container: OwnedFD
    private let group: OwnedFD
    private let device: OwnedFD
    private let common: RegisterWindow
    private let notify: RegisterWindow
    private let notifyMultiplier: UInt32
    private let deviceConfig: RegisterWindow
    /// One eventfd per MSI-X vector in use: vector 0 for queue 0 and config changes, vector i for
    /// queue i while the device has vectors for it (queues beyond share vector 0).
    private let interrupts: [EventFD]

    private struct Mapping {
        let memory: SharedMemory
        let iova: UInt64
        let size: Int
    }
    private struct State {
        var mappings: [Mapping] = []
        var closed = false
    }
    private let state = Locked(State())

    /// Takes over the virtio-blk device at `pciAddress` (e.g. "0000:00:05.0" or "00:05.0"), which must
    /// be bound to vfio-pci, maps its registers and routes each queue's MSI-X vector to an eventfd.
    public init(pciAddress: String, logger: Logger) throws {
        let bdf = try VFIOTransport.normalise(pciAddress)
        self.pciAddress = bdf
        self.logger = logger
        let container = try Self.openContainer()
        self.container = container
        let g = try Self.findIOMMUGroup(bdf)
        iommuGroup = g
        let (group, device) = try Self.openDevice(bdf, group: g, container: container.fd)
        self.group = group
        self.device = device
        let dfd = device.fd
        let (cfg, vendor, devid) = try Self.probe(dfd)
        deviceID = 2 // probe accepts virtio-blk only
        let caps = try Self.capabilities(cfg)
        let windows = try Self.map(caps, dfd)
        common = windows.common
        notify = windows.notify
        deviceConfig = windows.device
        notifyMultiplier = VFIOTransport.le32(cfg, caps[2]!.capAt + 16)
        let (irqs, irqCount) = try Self.routeInterrupts(dfd, queues: Int(windows.common.read16(CommonCfg.numQueues)))
        interrupts = irqs

        let bars = windows.bars
        logger.info(
            "VFIO device ready",
            metadata: [
                "pci": "\(bdf)", "iommu-group": "\(g)",
                "id": "\(String(format: "%04x:%04x", vendor, devid))",
                "bars": "\(bars.keys.sorted().map { "BAR\($0)=\(bars[$0]!.size / 1024)K" }.joined(separator: ","))",
                "notify-multiplier": "\(notifyMultiplier)", "msix-vectors": "\(irqCount)",
                "vectors-used": "\(irqs.count)",
                "queues": "\(common.read16(CommonCfg.numQueues))",
            ])
    }

    /// 1. The container: API version and the TYPE1v2 IOMMU.
    private static func openContainer() throws(VFIOTransportError) -> OwnedFD {
        let c = Glibc.open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC)
        guard c >= 0 else { throw VFIOTransportError.noContainer(errno: errno) }
        let container = OwnedFD(c)
        let api = vshim_vfio_get_api_version(c)
        guard api == 0 else { throw VFIOTransportError.unsupportedAPI(version: api) }
        guard vshim_vfio_check_extension(c, VFIOTransport.type1v2) > 0 else { throw VFIOTransportError.noType1v2 }
        return container
    }

    /// 2. The device in sysfs: IOMMU group and driver.
    private static func findIOMMUGroup(_ bdf: String) throws(VFIOTransportError) -> Int {
        let sys = "/sys/bus/pci/devices/\(bdf)"
        guard FileManager.default.fileExists(atPath: sys) else {
            throw VFIOTransportError.noSuchDevice(pciAddress: bdf)
        }
        guard let g = VFIOTransport.linkBasename("\(sys)/iommu_group").flatMap({ Int($0) }) else {
            throw VFIOTransportError.noIOMMUGroup(pciAddress: bdf)
        }
        let driver = VFIOTransport.linkBasename("\(sys)/driver")
        guard driver == "vfio-pci" else { throw VFIOTransportError.notBoundToVFIO(pciAddress: bdf, driver: driver) }
        return g
    }

    /// 3. The group: viable, attached to the container; then the IOMMU model; then the device fd.
    private static func openDevice(
        _ bdf: String, group g: Int, container c: Int32
    ) throws(VFIOTransportError) -> (group: OwnedFD, device: OwnedFD) {
        let gpath = "/dev/vfio/\(g)"
        let gfd = Glibc.open(gpath, O_RDWR | O_CLOEXEC)
        guard gfd >= 0 else { throw VFIOTransportError.groupOpenFailed(path: gpath, errno: errno) }
        let group = OwnedFD(gfd)
        var gflags: UInt32 = 0
        var r = vshim_vfio_group_status(gfd, &gflags)
        guard r == 0, gflags & 1 != 0 else {
            throw VFIOTransportError.groupNotViable(group: g, blockers: VFIOTransport.groupBlockers(g))
        }
        r = vshim_vfio_group_set_container(gfd, c)
        guard r == 0 else { throw VFIOTransportError.setContainerFailed(errno: -r) }
        r = vshim_vfio_set_iommu(c, VFIOTransport.type1v2)
        guard r == 0 else { throw VFIOTransportError.setIOMMUFailed(errno: -r) }
        let dfd = vshim_vfio_group_get_device_fd(gfd, bdf)
        guard dfd >= 0 else { throw VFIOTransportError.deviceFDFailed(pciAddress: bdf, errno: -dfd) }
        return (group, OwnedFD(dfd))
    }

    /// 4. PCI config space: identity (a virtio-blk device), then memory decoding + bus mastering
    /// (the device DMAs). Returns the first 256 bytes of config space, the vendor and device IDs.
    private static func probe(_ dfd: Int32) throws(VFIOTransportError) -> (cfg: [UInt8], vendor: UInt16, device: UInt16)
    {
        let cfgRegion = try VFIOTransport.regionInfo(dfd, VFIOTransport.vfioPCIConfigRegion)
        let cfg = try PCIConfigIO.read(deviceFD: dfd, regionOffset: cfgRegion.offset, at: 0, count: 256)
        let vendor = VFIOTransport.le16(cfg, 0)
        let devid = VFIOTransport.le16(cfg, 2)
        let subsys = VFIOTransport.le16(cfg, 0x2E)
        // §4.1.2.1: modern IDs are 0x1040 + virtio device ID; transitional blk is 0x1001 (subsystem 2).
        let virtioID: UInt16 =
            (0x1040...0x107F).contains(devid) ? devid - 0x1040 : (0x1000...0x103F).contains(devid) ? subsys : 0xFFFF
        guard vendor == VFIOTransport.virtioVendor, virtioID == 2 else {
            throw VFIOTransportError.notVirtioBlk(vendor: vendor, device: devid)
        }
        let command = VFIOTransport.le16(cfg, 4)
        if command & 0x6 != 0x6 {
            try PCIConfigIO.write16(deviceFD: dfd, regionOffset: cfgRegion.offset, at: 4, command | 0x6)
        }
        return (cfg, vendor, devid)
    }

    /// A virtio vendor capability: where its structure lies, and where the capability itself is in config space.
    private typealias Capability = (bar: Int, offset: Int, length: Int, capAt: Int)
    private static let capabilityNames: [UInt8: String] = [1: "COMMON", 2: "NOTIFY", 3: "ISR", 4: "DEVICE"]

    /// 5a. The virtio vendor capabilities (§4.1.4); COMMON, NOTIFY and DEVICE must be there.
    private static func capabilities(_ cfg: [UInt8]) throws(VFIOTransportError) -> [UInt8: Capability] {
        var caps: [UInt8: Capability] = [:]
        if VFIOTransport.le16(cfg, 6) & 0x10 != 0 {
            var p = Int(cfg[0x34]) & ~3
            var hops = 0
            while p >= 0x40 && p + 16 <= cfg.count && hops < 48 {
                if cfg[p] == 0x09, cfg[p + 2] >= 16 {
                    let type = cfg[p + 3]
                    let bar = Int(cfg[p + 4])
                    if (1...4).contains(type), bar <= 5, caps[type] == nil { // the first of each type wins (§4.1.4.1)
                        caps[type] = (bar, Int(VFIOTransport.le32(cfg, p + 8)), Int(VFIOTransport.le32(cfg, p + 12)), p)
                    }
                }
                p = Int(cfg[p + 1]) & ~3
                hops += 1
            }
        }
        for t: UInt8 in [1, 2, 4] where caps[t] == nil {
            throw VFIOTransportError.missingCapability("\(capabilityNames[t]!)_CFG")
        }
        return caps
    }

    /// 5b. The BARs the capabilities live in (mmap), and a register window for each structure.
    private static func map(
        _ caps: [UInt8: Capability], _ dfd: Int32
    ) throws(VFIOTransportError) -> (
        common: RegisterWindow, notify: RegisterWindow, device: RegisterWindow, bars: [Int: MappedBAR]
    ) {
        var bars: [Int: MappedBAR] = [:]
        func window(_ t: UInt8, minLength: Int) throws(VFIOTransportError) -> RegisterWindow {
            let cap = caps[t]!
            if bars[cap.bar] == nil {
                let info = try VFIOTransport.regionInfo(dfd, UInt32(cap.bar))
                guard info.flags & 4 != 0 else {
                    throw VFIOTransportError.barNotMappable(
                        bar: cap.bar,
                        reason: "VFIO does not allow mmap of this region (flags 0x\(String(info.flags, radix: 16)))")
                }
                bars[cap.bar] = try MappedBAR(
                    deviceFD: dfd, index: cap.bar, size: Int(info.size), regionOffset: info.offset)
            }
            let b = bars[cap.bar]!
            guard cap.length >= minLength, cap.offset >= 0, cap.offset <= b.size - cap.length else {
                throw VFIOTransportError.capabilityOutOfRange(capabilityNames[t]!)
            }
            return RegisterWindow(bar: b, offset: cap.offset, length: cap.length)
        }
        let common = try window(1, minLength: CommonCfg.length)
        let notify = try window(2, minLength: 2)
        let device = try window(4, minLength: 0)
        return (common, notify, device, bars)
    }

    /// 6. Interrupts: MSI-X vector i → eventfd i, one per queue while vectors last (queue 0 and
    /// config changes share vector 0), so each queue's completions wake only its own reaper.
    /// Returns the eventfds and the number of MSI-X vectors the device has.
    private static func routeInterrupts(_ dfd: Int32, queues: Int) throws -> ([EventFD], UInt32) {
        var irqFlags: UInt32 = 0
        var irqCount: UInt32 = 0
        var r = vshim_vfio_irq_info(dfd, VFIOTransport.vfioPCIMSIXIRQ, &irqFlags, &irqCount)
        guard r == 0, irqCount >= 1 else { throw VFIOTransportError.noMSIX(errno: -r) }
        let vectors = max(1, min(Int(irqCount), queues, 64))
        let irqs = try (0..<vectors).map { _ in try EventFD() }
        r = vshim_vfio_set_irq_eventfds(dfd, VFIOTransport.vfioPCIMSIXIRQ, 0, UInt32(vectors), irqs.map(\.fd))
        guard r == 0 else { throw VFIOTransportError.irqSetupFailed(errno: -r) }
        return (irqs, irqCount)
    }

    deinit { close() }

    /// Resets the device, disables its interrupts and removes the DMA mappings. Idempotent; the
    /// file descriptors and BAR mappings go with the object.
    public func close() {
        let mappings: [Mapping]? = state.withLock { s in
            if s.closed { return nil }
            s.closed = true
            defer { s.mappings = [] }
            return s.mappings
        }
        guard let mappings else { return }
        resetDevice()
        _ = vshim_vfio_disable_irqs(device.fd, Self.vfioPCIMSIXIRQ)
        for m in mappings {
            let r = vshim_vfio_unmap_dma(container.fd, m.iova, UInt64(m.size))
            if r != 0 { logger.warning("VFIO: UNMAP_DMA at 0x\(String(m.iova, radix: 16)) failed: \(errnoString(-r))") }
        }
        logger.debug("VFIO device \(pciAddress) released")
    }

    // MARK: VirtioTransport

    public func attachMemory(_ memory: SharedMemory) throws {
        try state.withLock { s in
            guard !s.closed else { throw VFIOTransportError.closed }
            if s.mappings.contains(where: { $0.memory === memory }) { return }
            let r = vshim_vfio_map_dma(container.fd, memory.hostAddress, memory.deviceBase, UInt64(memory.size))
            guard r == 0 else {
                throw VFIOTransportError.mapDMAFailed(iova: memory.deviceBase, size: memory.size, errno: -r)
            }
            s.mappings.append(Mapping(memory: memory, iova: memory.deviceBase, size: memory.size))
        }
        logger.debug("VFIO: mapped \(memory.size) bytes at IOVA 0x\(String(memory.deviceBase, radix: 16))")
    }

    public func reset() throws {
        guard resetDevice() else { throw VFIOTransportError.resetTimeout(status: common.read8(CommonCfg.deviceStatus)) }
    }

    /// Writes status 0 and waits (at most 1 s) until it reads back 0 (§4.1.4.3.2).
    @discardableResult private func resetDevice() -> Bool {
        common.write8(CommonCfg.deviceStatus, 0)
        for i in 0..<2000 {
            if common.read8(CommonCfg.deviceStatus) == 0 { return true }
            if i > 10 { usleep(500) }
        }
        return false
    }

    public func readStatus() -> VirtioStatus { VirtioStatus(rawValue: common.read8(CommonCfg.deviceStatus)) }
    public func writeStatus(_ status: VirtioStatus) throws { common.write8(CommonCfg.deviceStatus, status.rawValue) }

    public func readDeviceFeatures() -> VirtioFeatures {
        common.write32(CommonCfg.deviceFeatureSelect, 0)
        let lo = UInt64(common.read32(CommonCfg.deviceFeature))
        common.write32(CommonCfg.deviceFeatureSelect, 1)
        let hi = UInt64(common.read32(CommonCfg.deviceFeature))
        return VirtioFeatures(rawValue: hi << 32 | lo)
    }

    /// Every DMA of this transport goes through the IOMMU at the addresses MAP_DMA set up, so it
    /// accepts ACCESS_PLATFORM whenever the device offers it (a transport feature, as in Linux's
    /// vring_transport_features); QEMU refuses FEATURES_OK without it when iommu_platform=on.
    public func writeDriverFeatures(_ features: VirtioFeatures) throws {
        var f = features
        if readDeviceFeatures().contains(.accessPlatform), !f.contains(.accessPlatform) {
            f.insert(.accessPlatform)
            logger.debug("VFIO: accepting ACCESS_PLATFORM (DMA goes through the IOMMU)")
        }
        common.write32(CommonCfg.driverFeatureSelect, 0)
        common.write32(CommonCfg.driverFeature, UInt32(truncatingIfNeeded: f.rawValue))
        common.write32(CommonCfg.driverFeatureSelect, 1)
        common.write32(CommonCfg.driverFeature, UInt32(truncatingIfNeeded: f.rawValue >> 32))
    }

    public var queueCount: Int { Int(common.read16(CommonCfg.numQueues)) }

    public func maxQueueSize(_ index: Int) -> Int {
        guard index >= 0, index < queueCount else { return 0 }
        common.write16(CommonCfg.queueSelect, UInt16(index))
        return Int(common.read16(CommonCfg.queueSize))
    }

    public func setupQueue(_ index: Int, size: Int, descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) throws
        -> QueueDoorbells
    {
        guard index >= 0, index < queueCount else { throw VirtioTransportError.queueUnavailable(index: index) }
        // Config changes (including DEVICE_NEEDS_RESET) also raise vector 0, so the driver wakes and looks.
        common.write16(CommonCfg.configMSIXVector, 0)
        guard common.read16(CommonCfg.configMSIXVector) != 0xFFFF else {
            throw VFIOTransportError.vectorRejected("config changes")
        }
        common.write16(CommonCfg.queueSelect, UInt16(index))
        guard common.read16(CommonCfg.queueEnable) == 0 else {
            throw VirtioTransportError.queueAlreadyLive(index: index)
        }
        let max = Int(common.read16(CommonCfg.queueSize))
        guard max > 0 else { throw VirtioTransportError.queueUnavailable(index: index) }
        guard size <= max else { throw VirtioTransportError.queueTooLarge(index: index, requested: size, max: max) }
        common.write16(CommonCfg.queueSize, UInt16(size))
        let vector = index < interrupts.count ? index : 0
        common.write16(CommonCfg.queueMSIXVector, UInt16(vector))
        guard common.read16(CommonCfg.queueMSIXVector) != 0xFFFF else {
            throw VFIOTransportError.vectorRejected("queue \(index)")
        }
        common.write64(CommonCfg.queueDesc, descriptors)
        common.write64(CommonCfg.queueDriver, driverArea)
        common.write64(CommonCfg.queueDevice, deviceArea)
        let notifyAt = Int(common.read16(CommonCfg.queueNotifyOff)) * Int(notifyMultiplier)
        guard notifyAt + 2 <= notify.length else {
            throw VFIOTransportError.capabilityOutOfRange("NOTIFY (queue \(index))")
        }
        common.write16(CommonCfg.queueEnable, 1)
        guard common.read16(CommonCfg.queueEnable) == 1 else {
            throw VirtioTransportError.queueRefused(index: index)
        }
        logger.debug("VFIO: queue \(index) size \(size) enabled, notify at +\(notifyAt), MSI-X vector \(vector)")
        let n = notify
        let q = UInt16(index)
        return QueueDoorbells(kick: { n.write16(notifyAt, q) }, interrupt: interrupts[vector])
    }

    /// Device-specific config (§4.1.4.6): aligned fields with one access of their width; 64-bit
    /// fields as two 32-bit reads (the driver's generation loop makes the pair consistent).
    public func readConfig(offset: Int, width: Int) -> UInt64 {
        guard offset >= 0, offset + width <= deviceConfig.length else { return 0 }
        switch width {
        case 1: return UInt64(deviceConfig.read8(offset))
        case 2 where offset % 2 == 0: return UInt64(deviceConfig.read16(offset))
        case 4 where offset % 4 == 0: return UInt64(deviceConfig.read32(offset))
        case 8 where offset % 4 == 0:
            return UInt64(deviceConfig.read32(offset)) | UInt64(deviceConfig.read32(offset + 4)) << 32
        default:
            var v: UInt64 = 0
            for i in 0..<width { v |= UInt64(deviceConfig.read8(offset + i)) << (8 * UInt64(i)) }
            return v
        }
    }

    public func configGeneration() -> UInt32 { UInt32(common.read8(CommonCfg.configGeneration)) }

    // MARK: helpers

    /// "00:05.0" → "0000:00:05.0"; rejects anything that is not domain:bus:device.function in hex.
    static func normalise(_ a: String) throws(VFIOTransportError) -> String {
        let s = a.lowercased()
        let full = s.split(separator: ":").count == 2 ? "0000:" + s : s
        let parts = full.split(separator: ":", omittingEmptySubsequences: false)
        let hex = { (p: Substring, n: Int) in p.count == n && p.allSatisfy(\.isHexDigit) }
        guard parts.count == 3, hex(parts[0], 4), hex(parts[1], 2) else { throw .badPCIAddress(a) }
        let df = parts[2].split(separator: ".", omittingEmptySubsequences: false)
        guard df.count == 2, hex(df[0], 2), df[1].count == 1, let f = Int(df[1]), f <= 7 else {
            throw .badPCIAddress(a)
        }
        return full
    }

    static func linkBasename(_ path: String) -> String? {
        guard let dest = try? FileManager.default.destinationOfSymbolicLink(atPath: path) else { return nil }
        return dest.split(separator: "/").last.map(String.init)
    }

    /// Devices of the group bound to something other than vfio-pci (what makes it non-viable).
    static func groupBlockers(_ g: Int) -> [String] {
        let dir = "/sys/kernel/iommu_groups/\(g)/devices"
        let devs = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return devs.sorted().compactMap { d in
            guard let drv = linkBasename("\(dir)/\(d)/driver"), drv != "vfio-pci", drv != "pcieport" else { return nil }
            return "\(d) (\(drv))"
        }
    }

    static func regionInfo(_ dfd: Int32, _ index: UInt32) throws(VFIOTransportError) -> (
        flags: UInt32, size: UInt64, offset: UInt64
    ) {
        var flags: UInt32 = 0
        var size: UInt64 = 0
        var offset: UInt64 = 0
        let r = vshim_vfio_region_info(dfd, index, &flags, &size, &offset)
        guard r == 0 else { throw .regionInfoFailed(index: Int(index), errno: -r) }
        return (flags, size, offset)
    }

    static func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    static func le32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(le16(b, o)) | UInt32(le16(b, o + 2)) << 16 }
}
