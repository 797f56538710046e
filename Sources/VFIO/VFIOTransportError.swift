import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// What went wrong while taking over a PCI device through VFIO: the step, and what to check.
public enum VFIOTransportError: Error, CustomStringConvertible, Equatable {
    case badPCIAddress(String)
    case noContainer(errno: Int32)
    case unsupportedAPI(version: Int32)
    case noType1v2
    case noSuchDevice(pciAddress: String)
    case noIOMMUGroup(pciAddress: String)
    case notBoundToVFIO(pciAddress: String, driver: String?)
    case groupOpenFailed(path: String, errno: Int32)
    case groupNotViable(group: Int, blockers: [String])
    case setContainerFailed(errno: Int32)
    case setIOMMUFailed(errno: Int32)
    case deviceFDFailed(pciAddress: String, errno: Int32)
    case regionInfoFailed(index: Int, errno: Int32)
    case configAccessFailed(op: String, errno: Int32)
    case notVirtioBlk(vendor: UInt16, device: UInt16)
    case missingCapability(String)
    case capabilityOutOfRange(String)
    case barNotMappable(bar: Int, reason: String)
    case noMSIX(errno: Int32)
    case irqSetupFailed(errno: Int32)
    case vectorRejected(String)
    case mapDMAFailed(iova: UInt64, size: Int, errno: Int32)
    case resetTimeout(status: UInt8)
    case closed

    public var description: String {
        func e(_ n: Int32) -> String { String(cString: strerror(n)) }
        let bind =
            "bind it with: echo vfio-pci > /sys/bus/pci/devices/BDF/driver_override; "
            + "echo BDF > /sys/bus/pci/devices/BDF/driver/unbind (if bound); echo BDF > /sys/bus/pci/drivers_probe"
        switch self {
        case .badPCIAddress(let a):
            return "'\(a)' is not a PCI address; use the domain:bus:device.function form of lspci -D, e.g. 0000:00:05.0"
        case .noContainer(let n):
            return
                "VFIO: cannot open /dev/vfio/vfio (\(e(n))): the vfio modules are not loaded (modprobe vfio vfio_iommu_type1 vfio-pci), "
                + "this machine has no IOMMU (enable VT-d/AMD-Vi and boot with intel_iommu=on or amd_iommu=on), or this is not Linux with VFIO; "
                + "without VFIO, serve an image file with --file instead"
        case .unsupportedAPI(let v):
            return "VFIO: API version \(v), expected 0 (VFIO_API_VERSION); the kernel's VFIO is not supported"
        case .noType1v2:
            return
                "VFIO: the container does not support the TYPE1v2 IOMMU (VFIO_CHECK_EXTENSION(3) = 0); is vfio_iommu_type1 loaded and is the IOMMU enabled?"
        case .noSuchDevice(let a):
            return
                "VFIO: no PCI device \(a) (/sys/bus/pci/devices/\(a) does not exist); check the address with lspci -D"
        case .noIOMMUGroup(let a):
            return
                "VFIO: \(a) has no IOMMU group (/sys/bus/pci/devices/\(a)/iommu_group missing): the IOMMU is off; boot with intel_iommu=on iommu=pt (or amd_iommu=on)"
        case .notBoundToVFIO(let a, let d):
            return "VFIO: \(a) is " + (d.map { "bound to \($0)" } ?? "not bound to any driver") + ", not vfio-pci; "
                + bind.replacingOccurrences(of: "BDF", with: a) + " (modprobe vfio-pci first)"
        case .groupOpenFailed(let p, let n):
            let hint: String
            switch n {
            case EBUSY: hint = "another process (QEMU, another virtnbd?) already uses this IOMMU group"
            case EACCES, EPERM: hint = "run as root or give this user access to \(p)"
            case ENOENT: hint = "no device of the group is bound to vfio-pci yet"
            default: hint = "check dmesg"
            }
            return "VFIO: cannot open \(p) (\(e(n))): \(hint)"
        case .groupNotViable(let g, let b):
            return
                "VFIO: IOMMU group \(g) is not viable: every device in the group must be bound to vfio-pci (or no driver); "
                + (b.isEmpty
                    ? "see /sys/kernel/iommu_groups/\(g)/devices"
                    : "still bound elsewhere: \(b.joined(separator: ", "))")
        case .setContainerFailed(let n):
            return "VFIO: GROUP_SET_CONTAINER failed (\(e(n))); is the group already attached to another container?"
        case .setIOMMUFailed(let n):
            return "VFIO: SET_IOMMU(TYPE1v2) failed (\(e(n)))"
                + (n == EPERM
                    ? ": no interrupt remapping; enable it, or (unsafe) modprobe vfio_iommu_type1 allow_unsafe_interrupts=1"
                    : "; check dmesg")
        case .deviceFDFailed(let a, let n):
            return
                "VFIO: GROUP_GET_DEVICE_FD(\(a)) failed (\(e(n))); is the device still bound to vfio-pci and not in use?"
        case .regionInfoFailed(let i, let n): return "VFIO: DEVICE_GET_REGION_INFO(\(i)) failed (\(e(n)))"
        case .configAccessFailed(let op, let n): return "VFIO: PCI config space \(op) failed (\(e(n)))"
        case .notVirtioBlk(let v, let d):
            return
                "VFIO: the device is \(String(format: "%04x:%04x", v, d)), not a virtio-blk device with the modern (virtio 1.x) interface "
                + "(1af4:1042, or transitional 1af4:1001 with modern capabilities); with QEMU use virtio-blk-pci,disable-legacy=on"
        case .missingCapability(let c):
            return
                "VFIO: the device has no virtio-pci \(c) capability: it does not offer the modern (virtio 1.x) interface (QEMU: disable-modern=off)"
        case .capabilityOutOfRange(let c):
            return "VFIO: the virtio-pci \(c) capability points outside its BAR; the device is broken"
        case .barNotMappable(let b, let r):
            return "VFIO: BAR \(b) cannot be mapped: \(r); the registers must be in a mmap-able memory BAR"
        case .noMSIX(let n):
            return "VFIO: the device has no usable MSI-X vectors" + (n != 0 ? " (\(e(n)))" : "")
                + "; this transport needs MSI-X interrupts"
        case .irqSetupFailed(let n): return "VFIO: DEVICE_SET_IRQS (MSI-X → eventfd) failed (\(e(n))); check dmesg"
        case .vectorRejected(let w):
            return
                "VFIO: the device refused MSI-X vector 0 for \(w) (read back 0xFFFF: out of vectors or MSI-X not enabled)"
        case .mapDMAFailed(let iova, let size, let n):
            let hint: String
            switch n {
            case ENOMEM: hint = "pinning failed: raise the locked-memory limit (ulimit -l) or run as root"
            case EINVAL: hint = "the IOVA range is outside what the IOMMU can address or not page-aligned"
            case EEXIST: hint = "the IOVA range overlaps an existing mapping"
            default: hint = "check dmesg for IOMMU errors"
            }
            return "VFIO: IOMMU_MAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16)) failed (\(e(n))): \(hint)"
        case .resetTimeout(let s):
            return "VFIO: the device did not finish its reset (status still 0x\(String(s, radix: 16)) after 1 s)"
        case .closed: return "VFIO: the transport was closed"
        }
    }
}
