import Logging
import Virtio
import VirtioBlock
import VirtioEmulator

/// The default export: the in-process virtio-blk emulator, its driver, and the block layer on top.
struct EmulatedDisk {
    /// The simulated disk served when neither --size nor --file is given.
    static let simulatedSize: UInt64 = 512 * 1024

    let emulator: VirtioBlkEmulator
    let driver: VirtioBlkDriver
    let device: BlockDevice
    let label: String

    init(size: UInt64?, file: String?, readOnly: Bool, queueSize: Int, logger: Logger) throws {
        let backend: BlockBackend
        if let path = file {
            backend = try FileBackend(path: path, readOnly: readOnly, createSize: size)
            label = "file \(path)"
        } else if let s = size {
            backend = try RAMBackend(size: s, readOnly: readOnly)
            label = "RAM \(s) bytes"
        } else {
            backend = try RAMBackend(size: Self.simulatedSize, readOnly: readOnly)
            label = "simulated 512 KiB disk"
        }
        var cfg = EmulatorConfiguration()
        cfg.serial = file == nil && size == nil ? "virtnbd-simulated" : "virtnbd-emulator"
        var elog = logger; elog[metadataKey: "component"] = "emulator"
        emulator = try VirtioBlkEmulator(backend: backend, configuration: cfg, logger: elog)
        var dlog = logger; dlog[metadataKey: "component"] = "driver"
        driver = try VirtioBlkDriver(transport: try VirtioMMIOTransport(bus: emulator), queueSize: queueSize, logger: dlog)
        device = BlockDevice(driver: driver)
    }

    func shutdown() {
        driver.shutdown(flush: true)
        emulator.shutdown()
    }
}
