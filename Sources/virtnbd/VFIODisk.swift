import Logging
import VFIO
import Virtio
import VirtioBlock

/// An export backed by a real (or QEMU-emulated) virtio-blk PCI device bound to vfio-pci:
/// VFIOTransport → VirtioBlkDriver → BlockDevice. Nothing is known about the device's contents,
/// so every block starts out as data.
struct VFIODisk {
    let transport: VFIOTransport
    let driver: VirtioBlkDriver
    let device: BlockDevice
    let label: String

    /// Takes over the device at `pciAddress` (e.g. 0000:00:05.0) and brings it up.
    init(pciAddress: String, queueSize: Int, logger: Logger) throws {
        var tlog = logger; tlog[metadataKey: "component"] = "vfio"
        let t = try VFIOTransport(pciAddress: pciAddress, logger: tlog)
        var dlog = logger; dlog[metadataKey: "component"] = "driver"
        do {
            driver = try VirtioBlkDriver(transport: t, queueSize: queueSize, logger: dlog)
        } catch {
            t.close()
            throw error
        }
        transport = t
        device = BlockDevice(driver: driver)
        label = "VFIO virtio-blk \(t.pciAddress)"
    }

    /// Flushes, resets the device, disables its interrupts and removes the IOMMU mappings.
    func shutdown() {
        driver.shutdown(flush: true)
        transport.close()
    }
}
