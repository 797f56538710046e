import Logging
import VhostUser
import Virtio
import VirtioBlock

/// An export backed by a vhost-user-blk backend (e.g. qemu-storage-daemon) on a Unix socket:
/// VhostUserTransport → VirtioBlkDriver → BlockDevice.
struct VhostUserDisk {
    let transport: VhostUserTransport
    let driver: VirtioBlkDriver
    let device: BlockDevice
    let label: String

    /// Connects and brings the device up. `queueSize` must not exceed 1024 (the libvhost-user ring limit).
    init(socketPath: String, queueSize: Int, logger: Logger) throws {
        var tlog = logger; tlog[metadataKey: "component"] = "vhost-user"
        let t = try VhostUserTransport(socketPath: socketPath, logger: tlog)
        var dlog = logger; dlog[metadataKey: "component"] = "driver"
        do {
            driver = try VirtioBlkDriver(transport: t, queueSize: queueSize, logger: dlog)
        } catch {
            t.close()
            throw error
        }
        transport = t
        device = BlockDevice(driver: driver)
        label = "vhost-user \(socketPath)"
    }

    /// Flushes, stops the ring (GET_VRING_BASE) and closes the connection. Safe with a dead backend.
    func shutdown() {
        driver.shutdown(flush: true)
        transport.close()
    }
}
