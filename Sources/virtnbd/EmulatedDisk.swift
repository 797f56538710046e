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

    /// `sizeKey` names where `size` came from (`--size`, or the file's key) for a size-mismatch message.
    init(
        size: UInt64?, sizeKey: String = "--size", file: String?, readOnly: Bool, options: DriverOptions, logger: Logger
    ) throws {
        let backend: BlockBackend
        // What the server knows about zeroes at start: a fresh RAM disk is all hole, a file has its holes.
        var holes: [Range<UInt64>] = []
        if let path = file {
            let f: FileBackend
            do {
                f = try FileBackend(path: path, readOnly: readOnly, createSize: size)
            } catch BackendError.sizeMismatch(let p, let have, let want) {
                throw ImageSizeError(path: p, size: UInt64(max(have, 0)), wanted: want, key: sizeKey)
            }
            holes = f.holes()
            backend = f
            label = "file \(path)"
        } else {
            let s = size ?? Self.simulatedSize
            backend = try RAMBackend(size: s, readOnly: readOnly)
            holes = [0..<s]
            label = size == nil ? "simulated 512 KiB disk" : "RAM \(s) bytes"
        }
        // The device's capacity is whole sectors (rounded up); the export is the backend's exact size.
        var cfg = EmulatorConfiguration()
        cfg.serial = file == nil && size == nil ? "virtnbd-simulated" : "virtnbd-emulator"
        cfg.queues = options.queues
        var elog = logger
        elog[metadataKey: "component"] = "emulator"
        emulator = try VirtioBlkEmulator(backend: backend, configuration: cfg, logger: elog)
        var dlog = logger
        dlog[metadataKey: "component"] = "driver"
        driver = try VirtioBlkDriver(transport: try VirtioMMIOTransport(bus: emulator), options: options, logger: dlog)
        device = BlockDevice(driver: driver, size: backend.size, holes: holes, discardReadsZero: true)
    }

    func shutdown() {
        driver.shutdown(flush: true)
        emulator.shutdown()
    }
}

/// `--file EXISTING --size N` with a different size: virtnbd never resizes an image.
struct ImageSizeError: Error, CustomStringConvertible {
    let path: String, size: UInt64, wanted: UInt64, key: String
    var description: String {
        "\(path) already exists with \(size) bytes (\(humanSize(size))), not the \(humanSize(wanted)) of \(key); virtnbd never resizes an "
            + "existing image (a size applies only when it creates one): drop \(key) to serve the file as it is, or resize it first (truncate -s \(humanSize(wanted)) \(path))"
    }
}
