// The one way to build an emulated disk: backend → VirtioBlkEmulator → VirtioMMIOTransport →
// VirtioBlkDriver → BlockDevice. virtnbd's default export and the integration tests' disks are
// both made here, so what the tests serve is what the server serves.
import Logging
import Virtio
import VirtioBlock
import VirtioEmulator

/// An in-process virtio-blk device on a backend, its driver, and the block layer on top.
public struct EmulatedDisk: Sendable {
    public let emulator: VirtioBlkEmulator
    public let driver: VirtioBlkDriver
    public let device: BlockDevice

    /// - Parameters:
    ///   - holes: what reads as zero at start (a fresh RAM disk: all of it; a file: its holes).
    ///   - discardReadsZero: whether a discarded range reads back as zero (true for the
    ///     emulator's backends, which punch holes).
    ///   - serial: the device's GET_ID answer.
    ///   - options: the driver's; the emulator offers `options.queues` request queues.
    /// The device's capacity is whole sectors (rounded up); the block layer serves the backend's
    /// exact size.
    public init(
        backend: BlockBackend, holes: [Range<UInt64>], discardReadsZero: Bool, serial: String = "virtnbd-emulator",
        options: DriverOptions, logger: Logger
    ) throws {
        var cfg = EmulatorConfiguration()
        cfg.serial = serial
        cfg.queues = options.queues
        var elog = logger
        elog[metadataKey: "component"] = "emulator"
        emulator = try VirtioBlkEmulator(backend: backend, configuration: cfg, logger: elog)
        var dlog = logger
        dlog[metadataKey: "component"] = "driver"
        driver = try VirtioBlkDriver(transport: try VirtioMMIOTransport(bus: emulator), options: options, logger: dlog)
        device = BlockDevice(driver: driver, size: backend.size, holes: holes, discardReadsZero: discardReadsZero)
    }

    /// Drains and flushes the driver, then stops the device.
    public func shutdown() {
        driver.shutdown(flush: true)
        emulator.shutdown()
    }
}
