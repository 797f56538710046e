// The one way to build an emulated disk: backend → VirtioBlkEmulator → VirtioMMIOTransport →
// VirtioBlkDriver → BlockDevice. virtnbd's default export, the integration tests' disks, the
// driver, recovery and matrix tests and virtqueue-bench are all made here, so what the tests
// serve is what the server serves.
import Logging
import Virtio
import VirtioBlock
import VirtioEmulator

/// An in-process virtio-blk device on a backend, its driver, and the block layer on top.
public struct EmulatedDisk: Sendable {
    public let emulator: VirtioBlkEmulator
    public let driver: VirtioBlkDriver
    public let device: BlockDevice

    /// virtnbd's disk: the emulator offers `options.queues` request queues and answers GET_ID
    /// with `serial`; everything else is the emulator's default configuration.
    /// - Parameters:
    ///   - holes: what reads as zero at start (a fresh RAM disk: all of it; a file: its holes).
    ///   - discardReadsZero: whether a discarded range reads back as zero (true for the
    ///     emulator's backends, which punch holes).
    /// The device's capacity is whole sectors (rounded up); the block layer serves the backend's
    /// exact size.
    ///   - devicePollMicroseconds: the device keeps polling a drained queue this long before it
    ///     sleeps on the kick eventfd (`EmulatorConfiguration.pollMicroseconds`).
    ///   - inline: the device serves a queue on the thread that notifies it (`EmulatorConfiguration.inline`).
    public init(
        backend: BlockBackend, holes: [Range<UInt64>], discardReadsZero: Bool, serial: String = "virtnbd-emulator",
        options: DriverOptions, devicePollMicroseconds: Int = 0, inline: Bool = false, logger: Logger
    ) throws {
        var cfg = EmulatorConfiguration()
        cfg.serial = serial
        cfg.queues = options.queues
        cfg.pollMicroseconds = devicePollMicroseconds
        cfg.inline = inline
        try self.init(
            backend: backend, configuration: cfg, options: options, holes: holes, discardReadsZero: discardReadsZero,
            logger: logger)
    }

    /// A disk whose device is configured in full: its features, queue count (which may differ
    /// from the driver's), completion order and fault hooks, as the tests and virtqueue-bench
    /// need. `exactSize: false` exports the device's capacity instead of the backend's size.
    /// `discardReadsZero` defaults to false, as `BlockDevice`'s does: with it true the block
    /// layer answers reads of discarded ranges as zeroes without asking the device, so a test
    /// that means to read the device back sets it only on purpose.
    public init(
        backend: BlockBackend, configuration: EmulatorConfiguration, options: DriverOptions = DriverOptions(),
        holes: [Range<UInt64>] = [], discardReadsZero: Bool = false, exactSize: Bool = true,
        logger: Logger = Logger(label: "virtnbd")
    ) throws {
        var elog = logger
        elog[metadataKey: "component"] = "emulator"
        emulator = try VirtioBlkEmulator(backend: backend, configuration: configuration, logger: elog)
        var dlog = logger
        dlog[metadataKey: "component"] = "driver"
        driver = try VirtioBlkDriver(transport: try VirtioMMIOTransport(bus: emulator), options: options, logger: dlog)
        device = BlockDevice(
            driver: driver, size: exactSize ? backend.size : nil, holes: holes, discardReadsZero: discardReadsZero)
    }

    /// Drains the driver (and flushes the device unless `flush` is false), then stops the device.
    public func shutdown(flush: Bool = true) {
        driver.shutdown(flush: flush)
        emulator.shutdown()
    }
}
