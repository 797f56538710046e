import Glibc
import Logging
import ServerConfig
import VFIO
import VhostUser
import Virtio
import VirtioBlock

/// What an export is served from: any virtio-blk device behind the block layer.
protocol ServedDisk {
    var device: BlockDevice { get }
    var label: String { get }
    /// Device counters for the final log line.
    var statsSummary: String { get }
    /// Drains, flushes and resets the device.
    func shutdown()
    /// Files this start created (a new image), removed if the start fails.
    var createdFiles: [String] { get }
}

extension ServedDisk {
    var createdFiles: [String] { [] }
}

extension EmulatorExport: ServedDisk {
    var statsSummary: String { disk.emulator.stats.summary + " " + device.driver.stats.summary }
}
/// A device reached through a transport that must be closed after the driver stops
/// (vhost-user: stop the ring, close the socket; VFIO: reset, disable interrupts, unmap DMA).
/// Nothing is known about such a device's contents, so every block starts out as data.
struct TransportDisk: ServedDisk {
    let driver: VirtioBlkDriver
    let device: BlockDevice
    let label: String
    private let close: () -> Void

    init(transport: VirtioTransport, close: @escaping () -> Void, label: String, options: DriverOptions, logger: Logger)
        throws
    {
        var dlog = logger
        dlog[metadataKey: "component"] = "driver"
        do {
            driver = try VirtioBlkDriver(transport: transport, options: options, logger: dlog)
        } catch {
            close()
            throw error
        }
        device = BlockDevice(driver: driver)
        self.label = label
        self.close = close
    }

    var statsSummary: String { driver.stats.summary }

    /// Flushes, resets the device, then closes the transport. Safe with a dead backend.
    func shutdown() {
        driver.shutdown(flush: true)
        close()
    }

    /// A vhost-user-blk backend (e.g. qemu-storage-daemon); `queueSize` ≤ 1024 (libvhost-user's limit).
    static func vhostUser(socketPath: String, options: DriverOptions, logger: Logger) throws -> TransportDisk {
        var tlog = logger
        tlog[metadataKey: "component"] = "vhost-user"
        let t = try VhostUserTransport(
            socketPath: socketPath, logger: tlog, reconnect: options.reconnectTimeoutSeconds > 0)
        return try TransportDisk(
            transport: t, close: { t.close() }, label: "vhost-user \(socketPath)", options: options, logger: logger)
    }

    /// An RBD image: a supervised qemu-storage-daemon opens it and exports it over vhost-user
    /// (StorageDaemon); the transport is closed first, then the daemon stopped.
    static func rbd(_ image: RBDImage, readOnly: Bool, options: DriverOptions, logger: Logger) throws -> TransportDisk {
        var qlog = logger
        qlog[metadataKey: "component"] = "qemu-storage-daemon"
        let daemon = try StorageDaemon.start(image, readOnly: readOnly, queues: options.queues, logger: qlog)
        var tlog = logger
        tlog[metadataKey: "component"] = "vhost-user"
        // The socket file appears at bind(), a moment before listen(): a refused first connect is retried.
        var attempt = 0
        let t: VhostUserTransport
        while true {
            do {
                t = try VhostUserTransport(
                    socketPath: daemon.socketPath, logger: tlog, reconnect: options.reconnectTimeoutSeconds > 0)
                break
            } catch VhostUserError.connectFailed(_, let e) where e == ECONNREFUSED && attempt < 20 {
                attempt += 1
                usleep(50_000)
            } catch {
                daemon.stop()
                throw error
            }
        }
        return try TransportDisk(
            transport: t,
            close: {
                t.close()
                daemon.stop()
            }, label: "\(image) via qemu-storage-daemon", options: options, logger: logger)
    }

    /// A virtio-blk PCI device bound to vfio-pci (e.g. 0000:00:05.0).
    static func vfio(pciAddress: String, options: DriverOptions, logger: Logger) throws -> TransportDisk {
        var tlog = logger
        tlog[metadataKey: "component"] = "vfio"
        let t = try VFIOTransport(pciAddress: pciAddress, logger: tlog)
        return try TransportDisk(
            transport: t, close: { t.close() }, label: "VFIO virtio-blk \(t.pciAddress)", options: options,
            logger: logger)
    }
}

/// `--device`: where the virtio-blk device is.
enum DeviceSpec: Equatable {
    /// The in-process emulator (RAM, --file, or the simulated 512 KiB disk).
    case emulator
    case vhostUser(path: String)
    case vfio(address: String)
    /// A Ceph RBD image behind a qemu-storage-daemon that virtnbd supervises.
    case rbd(RBDImage)

    init?(_ s: String) {
        if s == "emulator" {
            self = .emulator
        } else if s.hasPrefix("vhost-user:"), s.count > 11 {
            self = .vhostUser(path: String(s.dropFirst(11)))
        } else if s.hasPrefix("vfio:"), s.count > 5 {
            self = .vfio(address: String(s.dropFirst(5)))
        } else if s.hasPrefix("rbd:"), case .rbd(let p, let i, let c)? = Device.rbd(spec: String(s.dropFirst(4))) {
            self = .rbd(RBDImage(pool: p, image: i, conf: c))
        } else {
            return nil
        }
    }

    func open(
        size: UInt64?, sizeKey: String = "--size", file: String?, readOnly: Bool, options: DriverOptions,
        devicePollMicroseconds: Int = 0, deviceInline: Bool = false, logger: Logger
    ) throws -> ServedDisk {
        switch self {
        case .emulator:
            return try EmulatorExport(
                size: size, sizeKey: sizeKey, file: file, readOnly: readOnly, options: options,
                devicePollMicroseconds: devicePollMicroseconds, deviceInline: deviceInline, logger: logger)
        case .vhostUser(let path):
            return try TransportDisk.vhostUser(socketPath: path, options: options, logger: logger)
        case .vfio(let bdf): return try TransportDisk.vfio(pciAddress: bdf, options: options, logger: logger)
        case .rbd(let image): return try TransportDisk.rbd(image, readOnly: readOnly, options: options, logger: logger)
        }
    }
}
