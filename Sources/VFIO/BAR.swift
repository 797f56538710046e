// BAR.swift: the only place in the VFIO transport where unsafe pointers live (see README,
// "Memory safety"). A mapped PCI BAR is accessed with single volatile loads/stores of exactly the
// register's width (the C shim's vshim_mmio_*): QEMU rejects byte-wise writes to virtio-pci
// registers. Config space is reached with pread/pwrite on the VFIO device fd.
import CVirtShim

#if canImport(Glibc)
    import Glibc
#endif

/// One memory BAR of a VFIO device, mmap'ed from the device fd.
final class MappedBAR: @unchecked Sendable {
    let index: Int
    let size: Int
    private let base: UnsafeMutableRawPointer

    /// Maps `size` bytes at `regionOffset` of the device fd (from VFIO_DEVICE_GET_REGION_INFO).
    init(deviceFD: Int32, index: Int, size: Int, regionOffset: UInt64) throws(VFIOTransportError) {
        guard size > 0 else { throw .barNotMappable(bar: index, reason: "the region has size 0") }
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, deviceFD, off_t(regionOffset)),
            p != MAP_FAILED
        else {
            throw .barNotMappable(bar: index, reason: "mmap of \(size) bytes failed: \(errnoString(errno))")
        }
        self.index = index
        self.size = size
        self.base = p
    }

    deinit { munmap(base, size) }

    @inline(__always) private func check(_ o: Int, _ w: Int) {
        precondition(
            o >= 0 && o % w == 0 && o <= size - w, "BAR \(index) access at \(o) width \(w) out of range or unaligned")
    }
    @inline(__always) func read8(_ o: Int) -> UInt8 {
        check(o, 1)
        return vshim_mmio_read8(base + o)
    }
    @inline(__always) func read16(_ o: Int) -> UInt16 {
        check(o, 2)
        return UInt16(littleEndian: vshim_mmio_read16(base + o))
    }
    @inline(__always) func read32(_ o: Int) -> UInt32 {
        check(o, 4)
        return UInt32(littleEndian: vshim_mmio_read32(base + o))
    }
    @inline(__always) func write8(_ o: Int, _ v: UInt8) {
        check(o, 1)
        vshim_mmio_write8(base + o, v)
    }
    @inline(__always) func write16(_ o: Int, _ v: UInt16) {
        check(o, 2)
        vshim_mmio_write16(base + o, v.littleEndian)
    }
    @inline(__always) func write32(_ o: Int, _ v: UInt32) {
        check(o, 4)
        vshim_mmio_write32(base + o, v.littleEndian)
    }
}

/// PCI config space through the VFIO config region (index 7).
enum PCIConfigIO {
    static func read(deviceFD: Int32, regionOffset: UInt64, at o: Int, count: Int) throws(VFIOTransportError) -> [UInt8]
    {
        var buf = [UInt8](repeating: 0, count: count)
        let r = buf.withUnsafeMutableBytes {
            vshim_pread_exact(deviceFD, $0.baseAddress, count, Int64(regionOffset) + Int64(o))
        }
        guard r == 0 else { throw .configAccessFailed(op: "read", errno: -r) }
        return buf
    }
    static func write16(deviceFD: Int32, regionOffset: UInt64, at o: Int, _ v: UInt16) throws(VFIOTransportError) {
        var le = v.littleEndian
        let r = withUnsafeBytes(of: &le) {
            vshim_pwrite_exact(deviceFD, $0.baseAddress, 2, Int64(regionOffset) + Int64(o))
        }
        guard r == 0 else { throw .configAccessFailed(op: "write", errno: -r) }
    }
}

func errnoString(_ e: Int32) -> String { String(cString: strerror(e)) }
