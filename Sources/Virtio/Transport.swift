/// The one interface between a virtio driver and a device, whatever carries it
/// (in-process emulator over a virtio-mmio register model, VFIO virtio-pci, vhost-user).
/// It mirrors the device-initialisation steps of VIRTIO 1.2 §3.1.1.
public protocol VirtioTransport: AnyObject, Sendable {
    /// Virtio device ID (2 = block).
    var deviceID: UInt32 { get }
    /// Makes the arena visible to the device (emulator mapping, vhost-user SET_MEM_TABLE, VFIO MAP_DMA).
    func attachMemory(_ memory: SharedMemory) throws
    func reset() throws
    func readStatus() -> VirtioStatus
    func writeStatus(_ status: VirtioStatus) throws
    func readDeviceFeatures() -> VirtioFeatures
    func writeDriverFeatures(_ features: VirtioFeatures) throws
    var queueCount: Int { get }
    /// Largest queue size the device supports for queue `index` (0 if the queue does not exist).
    func maxQueueSize(_ index: Int) -> Int
    /// Tells the device where queue `index` lives and enables it. `notifier` is the interrupt the
    /// device raises for this queue; `kick` is what the driver calls to notify.
    func setupQueue(_ index: Int, size: Int, descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) throws
        -> QueueDoorbells
    /// Device-specific config space (little-endian), read with the config-generation retry loop.
    func readConfig(offset: Int, width: Int) -> UInt64
    func configGeneration() -> UInt32
    /// True when a `reset()` that failed may succeed later: the device lives in another process that
    /// can restart (a vhost-user backend), and `reset()` reconnects to it. The driver then holds
    /// requests and retries the reset for `DriverOptions.reconnectTimeoutSeconds`.
    var canReconnect: Bool { get }
}

extension VirtioTransport {
    public var canReconnect: Bool { false }
}

/// How a queue signals in both directions.
public struct QueueDoorbells: Sendable {
    /// Called by the driver to notify the device that buffers are available.
    public let kick: @Sendable () -> Void
    /// Readable when the device has raised an interrupt for this queue (cleared by draining).
    public let interrupt: EventFD
    /// The device has served the queue by the time `kick` returns (an in-process device that runs
    /// to completion on the notifying thread): the driver may reap at once instead of waiting for
    /// the interrupt to come round its event loop.
    public let completesOnKick: Bool
    public init(kick: @escaping @Sendable () -> Void, interrupt: EventFD, completesOnKick: Bool = false) {
        self.kick = kick
        self.interrupt = interrupt
        self.completesOnKick = completesOnKick
    }
}

/// Errors a transport reports. Each says what happened and what to check.
public enum VirtioTransportError: Error, CustomStringConvertible {
    case badMagic(UInt32)
    case unsupportedVersion(UInt32)
    case wrongDevice(expected: UInt32, found: UInt32)
    case featuresRejected(VirtioFeatures)
    case queueUnavailable(index: Int)
    case queueTooLarge(index: Int, requested: Int, max: Int)
    /// The queue was already enabled when the driver came to set it up (the device was not reset).
    case queueAlreadyLive(index: Int)
    /// The device did not enable the queue after the driver gave it the ring addresses.
    case queueRefused(index: Int)

    public var description: String {
        switch self {
        case .badMagic(let m):
            return "virtio-mmio magic is 0x\(String(m, radix: 16)), not 0x74726976: this is not a virtio-mmio device"
        case .unsupportedVersion(let v): return "virtio-mmio version \(v); only version 2 (virtio 1.x) is supported"
        case .wrongDevice(let e, let f): return "device ID \(f), expected \(e) (virtio-blk)"
        case .featuresRejected(let f): return "the device cleared FEATURES_OK for features \(f); try fewer features"
        case .queueUnavailable(let i): return "queue \(i) does not exist on this device"
        case .queueTooLarge(let i, let r, let m):
            return "queue \(i): size \(r) exceeds device maximum \(m); use a smaller --queue-size"
        case .queueAlreadyLive(let i):
            return "queue \(i) was already enabled before setup: the device was not reset (is another driver using it?)"
        case .queueRefused(let i):
            return "queue \(i) stayed disabled after its ring addresses were written: the device refused the rings; "
                + "try another --queue-size or --ring"
        }
    }
}
