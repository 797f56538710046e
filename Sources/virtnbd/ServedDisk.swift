import Logging
import VirtioBlock

/// What an export is served from: any virtio-blk device behind the block layer.
protocol ServedDisk {
    var device: BlockDevice { get }
    var label: String { get }
    /// Device counters for the final log line.
    var statsSummary: String { get }
    /// Drains, flushes and resets the device.
    func shutdown()
}

extension EmulatedDisk: ServedDisk {
    var statsSummary: String { emulator.stats.summary + " " + device.driver.stats.summary }
}
extension VhostUserDisk: ServedDisk {
    var statsSummary: String { driver.stats.summary }
}
extension VFIODisk: ServedDisk {
    var statsSummary: String { driver.stats.summary }
}

/// `--device`: where the virtio-blk device is.
enum DeviceSpec: Equatable {
    /// The in-process emulator (RAM, --file, or the simulated 512 KiB disk).
    case emulator
    case vhostUser(path: String)
    case vfio(address: String)

    init?(_ s: String) {
        if s == "emulator" { self = .emulator }
        else if s.hasPrefix("vhost-user:"), s.count > 11 { self = .vhostUser(path: String(s.dropFirst(11))) }
        else if s.hasPrefix("vfio:"), s.count > 5 { self = .vfio(address: String(s.dropFirst(5))) }
        else { return nil }
    }

    func open(size: UInt64?, file: String?, readOnly: Bool, queueSize: Int, logger: Logger) throws -> ServedDisk {
        switch self {
        case .emulator: return try EmulatedDisk(size: size, file: file, readOnly: readOnly, queueSize: queueSize, logger: logger)
        case .vhostUser(let path): return try VhostUserDisk(socketPath: path, queueSize: queueSize, logger: logger)
        case .vfio(let bdf): return try VFIODisk(pciAddress: bdf, queueSize: queueSize, logger: logger)
        }
    }
}
