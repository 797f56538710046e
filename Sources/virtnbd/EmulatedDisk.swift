import Foundation
import Logging
import Virtio
import VirtioBlock
import VirtioDisk
import VirtioEmulator

/// The default export: an `EmulatedDisk` on a RAM disk or a raw file, with the label the logs use.
struct EmulatorExport {
    /// The simulated disk served when neither --size nor --file is given.
    static let simulatedSize: UInt64 = 512 * 1024

    let disk: EmulatedDisk
    let label: String
    /// The image, when this start created it.
    let createdFiles: [String]
    var device: BlockDevice { disk.device }

    /// `sizeKey` names where `size` came from (`--size`, or the file's key) for a size-mismatch message.
    init(
        size: UInt64?, sizeKey: String = "--size", file: String?, readOnly: Bool, options: DriverOptions,
        devicePollMicroseconds: Int = 0, deviceInline: Bool = false, logger: Logger
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
            createdFiles = f.created ? [path] : []
        } else {
            let s = size ?? Self.simulatedSize
            backend = try RAMBackend(size: s, readOnly: readOnly)
            holes = [0..<s]
            label = size == nil ? "simulated 512 KiB disk" : "RAM \(s) bytes"
            createdFiles = []
        }
        do {
            disk = try EmulatedDisk(
                backend: backend, holes: holes, discardReadsZero: true,
                serial: file == nil && size == nil ? "virtnbd-simulated" : "virtnbd-emulator", options: options,
                devicePollMicroseconds: devicePollMicroseconds, inline: deviceInline && file == nil, logger: logger)
        } catch {
            for f in createdFiles { unlink(f) }
            throw error
        }
    }

    func shutdown() { disk.shutdown() }
}
/// `--file EXISTING --size N` with a different size: virtnbd never resizes an image.
struct ImageSizeError: Error, CustomStringConvertible {
    let path: String, size: UInt64, wanted: UInt64, key: String
    var description: String {
        "\(path) already exists with \(size) bytes (\(humanSize(size))), not the \(humanSize(wanted)) of \(key); virtnbd never resizes an "
            + "existing image (a size applies only when it creates one): drop \(key) to serve the file as it is, or resize it first (truncate -s \(humanSize(wanted)) \(path))"
    }
}
