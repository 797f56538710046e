/// Register offsets of the virtio-mmio transport, version 2 (VIRTIO 1.2 §4.2.2).
public enum MMIORegister {
    public static let magic = 0x000, version = 0x004, deviceID = 0x008, vendorID = 0x00C
    public static let deviceFeatures = 0x010, deviceFeaturesSel = 0x014
    public static let driverFeatures = 0x020, driverFeaturesSel = 0x024
    public static let queueSel = 0x030, queueNumMax = 0x034, queueNum = 0x038, queueReady = 0x044
    public static let queueNotify = 0x050, interruptStatus = 0x060, interruptACK = 0x064, status = 0x070
    public static let queueDescLow = 0x080, queueDescHigh = 0x084
    public static let queueDriverLow = 0x090, queueDriverHigh = 0x094
    public static let queueDeviceLow = 0x0A0, queueDeviceHigh = 0x0A4
    public static let queueReset = 0x0C0
    public static let configGeneration = 0x0FC
    public static let config = 0x100
    public static let magicValue: UInt32 = 0x7472_6976
}

/// What a virtio-mmio device looks like from the driver: a register window, plus the two things a
/// bus supplies outside the registers (shared memory visibility and one interrupt line as an eventfd).
public protocol MMIOBus: AnyObject, Sendable {
    func read32(_ offset: Int) -> UInt32
    func write32(_ offset: Int, _ value: UInt32)
    /// Config space reads are byte-addressed, little-endian, of width 1/2/4.
    func readConfig8(_ offset: Int) -> UInt8
    func attachMemory(_ memory: SharedMemory) throws
    var interrupt: EventFD { get }
    /// The interrupt of one queue (an MSI-X vector per queue); buses with one line return `interrupt`.
    func interrupt(forQueue queue: Int) -> EventFD
    /// A notify write serves the queue before it returns (`QueueDoorbells.completesOnKick`).
    var completesOnNotify: Bool { get }
}

extension MMIOBus {
    public var completesOnNotify: Bool { false }
}

extension MMIOBus {
    public func interrupt(forQueue queue: Int) -> EventFD { interrupt }
}

/// The driver side of virtio-mmio: turns transport calls into register accesses.
public final class VirtioMMIOTransport: VirtioTransport, @unchecked Sendable {
    public let bus: MMIOBus
    public let deviceID: UInt32

    public init(bus: MMIOBus) throws {
        self.bus = bus
        let magic = bus.read32(MMIORegister.magic)
        guard magic == MMIORegister.magicValue else { throw VirtioTransportError.badMagic(magic) }
        let version = bus.read32(MMIORegister.version)
        guard version == 2 else { throw VirtioTransportError.unsupportedVersion(version) }
        deviceID = bus.read32(MMIORegister.deviceID)
    }

    public func attachMemory(_ memory: SharedMemory) throws { try bus.attachMemory(memory) }
    public func reset() throws {
        bus.write32(MMIORegister.status, 0)
        // §4.2.3.1: the driver waits until status reads back 0.
        while bus.read32(MMIORegister.status) != 0 {}
    }
    public func readStatus() -> VirtioStatus {
        VirtioStatus(rawValue: UInt8(truncatingIfNeeded: bus.read32(MMIORegister.status)))
    }
    public func writeStatus(_ status: VirtioStatus) throws { bus.write32(MMIORegister.status, UInt32(status.rawValue)) }

    public func readDeviceFeatures() -> VirtioFeatures {
        bus.write32(MMIORegister.deviceFeaturesSel, 0)
        let lo = UInt64(bus.read32(MMIORegister.deviceFeatures))
        bus.write32(MMIORegister.deviceFeaturesSel, 1)
        let hi = UInt64(bus.read32(MMIORegister.deviceFeatures))
        return VirtioFeatures(rawValue: hi << 32 | lo)
    }
    public func writeDriverFeatures(_ features: VirtioFeatures) throws {
        bus.write32(MMIORegister.driverFeaturesSel, 0)
        bus.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue))
        bus.write32(MMIORegister.driverFeaturesSel, 1)
        bus.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue >> 32))
    }
    public var queueCount: Int {
        // virtio-mmio has no queue count register: probe until QueueNumMax reads 0.
        var n = 0
        while n < 64 && maxQueueSize(n) > 0 { n += 1 }
        return n
    }
    public func maxQueueSize(_ index: Int) -> Int {
        bus.write32(MMIORegister.queueSel, UInt32(index))
        return Int(bus.read32(MMIORegister.queueNumMax))
    }
    public func setupQueue(_ index: Int, size: Int, descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) throws
        -> QueueDoorbells
    {
        bus.write32(MMIORegister.queueSel, UInt32(index))
        guard bus.read32(MMIORegister.queueReady) == 0 else {
            throw VirtioTransportError.queueAlreadyLive(index: index)
        }
        let max = Int(bus.read32(MMIORegister.queueNumMax))
        guard max > 0 else { throw VirtioTransportError.queueUnavailable(index: index) }
        guard size <= max else { throw VirtioTransportError.queueTooLarge(index: index, requested: size, max: max) }
        bus.write32(MMIORegister.queueNum, UInt32(size))
        for (reg, v) in [
            (MMIORegister.queueDescLow, descriptors), (MMIORegister.queueDriverLow, driverArea),
            (MMIORegister.queueDeviceLow, deviceArea),
        ] {
            bus.write32(reg, UInt32(truncatingIfNeeded: v))
            bus.write32(reg + 4, UInt32(truncatingIfNeeded: v >> 32))
        }
        bus.write32(MMIORegister.queueReady, 1)
        guard bus.read32(MMIORegister.queueReady) == 1 else {
            throw VirtioTransportError.queueRefused(index: index)
        }
        let bus = self.bus
        let q = UInt32(index)
        return QueueDoorbells(
            kick: { bus.write32(MMIORegister.queueNotify, q) }, interrupt: bus.interrupt(forQueue: index),
            completesOnKick: bus.completesOnNotify)
    }
    public func readConfig(offset: Int, width: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<width { v |= UInt64(bus.readConfig8(MMIORegister.config + offset + i)) << (8 * UInt64(i)) }
        return v
    }
    public func configGeneration() -> UInt32 { bus.read32(MMIORegister.configGeneration) }
}
