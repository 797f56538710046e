// SharedMemory: one of the small places where unsafe pointers live (see README, "Memory safety").
//
// A memfd-backed mapping that a driver and a device both see. Every byte is addressed by its
// *device address* (deviceBase + offset); the host pointer never leaves this file. The same
// (fd, size, deviceBase) triple is what vhost-user sends in SET_MEM_TABLE and what VFIO maps with
// IOMMU_MAP_DMA, so nothing here assumes a particular transport.
import CVirtShim
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// What went wrong with shared memory, and what to do about it.
public enum SharedMemoryError: Error, CustomStringConvertible, Equatable {
    case memfdFailed(errno: Int32)
    case dupFailed(fd: Int32, errno: Int32)
    case truncateFailed(size: Int, errno: Int32)
    case mmapFailed(size: Int, errno: Int32)
    case outOfRange(address: UInt64, length: Int)
    case ioFailed(op: String, errno: Int32)

    public var description: String {
        switch self {
        case .memfdFailed(let e):
            return
                "memfd_create failed: \(String(cString: strerror(e))); check RLIMIT_NOFILE and that /proc/sys/fs is sane"
        case .dupFailed(let fd, let e):
            return
                "cannot duplicate shared-memory fd \(fd): \(String(cString: strerror(e))); raise RLIMIT_NOFILE (ulimit -n)"
        case .truncateFailed(let s, let e):
            return
                "cannot size shared memory to \(s) bytes: \(String(cString: strerror(e))); is there enough memory or tmpfs space?"
        case .mmapFailed(let s, let e):
            return
                "mmap of \(s) bytes failed: \(String(cString: strerror(e))); lower --size or raise vm.max_map_count/ulimit -v"
        case .outOfRange(let a, let l):
            return "device address 0x\(String(a, radix: 16)) length \(l) lies outside shared memory"
        case .ioFailed(let op, let e): return "\(op) failed: \(String(cString: strerror(e)))"
        }
    }
}

public final class SharedMemory: @unchecked Sendable {
    /// The memfd; owned (closed on deinit). -1 for private memory (`init(privateSize:)`).
    public let fd: Int32
    public let size: Int
    /// Device address of offset 0.
    public let deviceBase: UInt64
    private let base: UnsafeMutableRawPointer

    /// Creates a new zero-filled memfd of `size` bytes and maps it shared.
    public init(size: Int, deviceBase: UInt64 = 0, name: String = "virtnbd-dma") throws(SharedMemoryError) {
        let fd = vshim_memfd_create(name)
        guard fd >= 0 else { throw .memfdFailed(errno: errno) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            throw .truncateFailed(size: size, errno: e)
        }
        self.base = try Self.map(fd, size)
        self.fd = fd
        self.size = size
        self.deviceBase = deviceBase
    }

    /// Private anonymous memory, zero-filled, that only this process sees: a device's own RAM
    /// (the emulator's RAM backend), never an arena. Anonymous pages fault in more cheaply than a
    /// memfd's (a first nbdcopy of 512 MiB: 0.45-0.51 s against 0.60-0.64 s). Huge pages are not
    /// asked for: with MADV_HUGEPAGE the same copy took 0.27-1.12 s, the slow ones waiting for
    /// compaction. Never-written pages cost nothing.
    public init(privateSize size: Int) throws(SharedMemoryError) {
        guard
            let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            p != MAP_FAILED
        else { throw .mmapFailed(size: size, errno: errno) }
        self.base = p
        self.fd = -1
        self.size = size
        self.deviceBase = 0
    }

    /// Maps an existing shared-memory fd (as a device does with the driver's arena). The fd is dup'ed.
    public init(mapping otherFD: Int32, size: Int, deviceBase: UInt64) throws(SharedMemoryError) {
        let fd = dup(otherFD)
        guard fd >= 0 else { throw .dupFailed(fd: otherFD, errno: errno) }
        self.base = try Self.map(fd, size)
        self.fd = fd
        self.size = size
        self.deviceBase = deviceBase
    }

    /// Maps `fd` shared and read-write; on failure closes it.
    private static func map(_ fd: Int32, _ size: Int) throws(SharedMemoryError) -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            let e = errno
            close(fd)
            throw .mmapFailed(size: size, errno: e)
        }
        return p
    }

    deinit {
        munmap(base, size)
        if fd >= 0 { close(fd) }
    }

    /// The host virtual address of offset 0, as a number (vhost-user's "user address").
    public var hostAddress: UInt64 { UInt64(UInt(bitPattern: base)) }

    /// Translates a device address range to an offset, or nil if any byte lies outside. Overflow-safe.
    @inlinable
    public func offset(ofDeviceAddress addr: UInt64, length: Int) -> Int? {
        guard length >= 0, addr >= deviceBase else { return nil }
        let off = addr - deviceBase
        guard off <= UInt64(size), UInt64(length) <= UInt64(size) - off else { return nil }
        return Int(off)
    }

    @inline(__always) private func check(_ offset: Int, _ length: Int) {
        precondition(
            offset >= 0 && length >= 0 && offset <= size - length,
            "shared memory access out of range: a caller skipped offset(ofDeviceAddress:)")
    }

    // MARK: fixed-width little-endian accesses (ring fields)
    @inline(__always) public func load8(_ o: Int) -> UInt8 {
        check(o, 1)
        return base.load(fromByteOffset: o, as: UInt8.self)
    }
    @inline(__always) public func store8(_ o: Int, _ v: UInt8) {
        check(o, 1)
        base.storeBytes(of: v, toByteOffset: o, as: UInt8.self)
    }
    @inline(__always) public func load16(_ o: Int) -> UInt16 {
        check(o, 2)
        return UInt16(littleEndian: vshim_load16(base + o))
    }
    @inline(__always) public func load32(_ o: Int) -> UInt32 {
        check(o, 4)
        return UInt32(littleEndian: vshim_load32(base + o))
    }
    @inline(__always) public func load64(_ o: Int) -> UInt64 {
        check(o, 8)
        return UInt64(littleEndian: vshim_load64(base + o))
    }
    @inline(__always) public func store16(_ o: Int, _ v: UInt16) {
        check(o, 2)
        vshim_store16(base + o, v.littleEndian)
    }
    @inline(__always) public func store32(_ o: Int, _ v: UInt32) {
        check(o, 4)
        vshim_store32(base + o, v.littleEndian)
    }
    @inline(__always) public func store64(_ o: Int, _ v: UInt64) {
        check(o, 8)
        vshim_store64(base + o, v.littleEndian)
    }
    /// Acquire load: reads that follow see what the other side wrote before its release store.
    @inline(__always) public func load16Acquire(_ o: Int) -> UInt16 {
        check(o, 2)
        return UInt16(littleEndian: vshim_load16_acquire(base + o))
    }
    /// Release store: everything written before is visible to whoever acquires this value.
    @inline(__always) public func store16Release(_ o: Int, _ v: UInt16) {
        check(o, 2)
        vshim_store16_release(base + o, v.littleEndian)
    }

    // MARK: bulk data
    public func zero(_ o: Int, count: Int) {
        check(o, count)
        memset(base + o, 0, count)
    }

    /// Copies `count` bytes at `offset` out into a Swift array.
    public func bytes(at o: Int, count: Int) -> [UInt8] {
        check(o, count)
        return [UInt8](UnsafeRawBufferPointer(start: base + o, count: count))
    }

    /// Copies bytes from a contiguous collection into memory at `offset`.
    public func write<C: Collection>(_ bytes: C, at o: Int) where C.Element == UInt8 {
        check(o, bytes.count)
        let done: Void? = bytes.withContiguousStorageIfAvailable { src in
            if let s = src.baseAddress { memcpy(base + o, s, src.count) }
        }
        if done == nil {
            var i = o
            for b in bytes {
                base.storeBytes(of: b, toByteOffset: i, as: UInt8.self)
                i += 1
            }
        }
    }

    /// Gives read-only access to a range for bulk consumers that copy out (e.g. into a NIO ByteBuffer).
    /// A ByteBuffer whose storage is [o, o+count) of this memory itself: no copy. `owner` stays
    /// alive until NIO frees the buffer (its last copy is gone); the owner's deinit may then take
    /// the bytes back. Nothing may write the range meanwhile (the caller's pages are its own).
    public func lend(_ o: Int, count: Int, to owner: AnyObject & Sendable) -> ByteBuffer {
        check(o, count)
        precondition(count > 0 && count <= Int(UInt32.max), "a lent range is 1 byte to 4 GiB")
        return ArenaLoans.lend(UnsafeMutableRawBufferPointer(start: base + o, count: count), to: owner)
    }

    public func withBytes<R>(at o: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        check(o, count)
        return try body(UnsafeRawBufferPointer(start: base + o, count: count))
    }

    /// Gives write access to a range for bulk producers that copy in (e.g. from a NIO ByteBuffer).
    public func withMutableBytes<R>(at o: Int, count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows
        -> R
    {
        check(o, count)
        return try body(UnsafeMutableRawBufferPointer(start: base + o, count: count))
    }

    /// Copies between two shared memories (RAM backend <-> I/O buffers). Ranges must be in bounds.
    public func copy(from src: SharedMemory, at srcOffset: Int, to dstOffset: Int, count: Int) {
        src.check(srcOffset, count)
        check(dstOffset, count)
        memmove(base + dstOffset, src.base + srcOffset, count)
    }

    /// pread(2) from a file straight into memory. Short reads past EOF are zero-filled.
    public func pread(fd file: Int32, fileOffset: Int64, to o: Int, count: Int) throws(SharedMemoryError) {
        check(o, count)
        var done = 0
        while done < count {
            let n = Glibc.pread(file, base + o + done, count - done, off_t(fileOffset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .ioFailed(op: "pread", errno: errno)
            }
            if n == 0 {
                memset(base + o + done, 0, count - done)
                break
            }
            done += n
        }
    }

    /// pwrite(2) from memory straight into a file.
    public func pwrite(fd file: Int32, fileOffset: Int64, from o: Int, count: Int) throws(SharedMemoryError) {
        check(o, count)
        var done = 0
        while done < count {
            let n = Glibc.pwrite(file, base + o + done, count - done, off_t(fileOffset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .ioFailed(op: "pwrite", errno: errno)
            }
            done += n
        }
    }

    /// Releases the backing pages of a range (reads return zero afterwards).
    public func punchHole(_ o: Int, count: Int) {
        check(o, count)
        if fd >= 0 {
            if vshim_punch_hole(fd, Int64(o), Int64(count)) != 0 { memset(base + o, 0, count) }
            return
        }
        // Private memory: whole pages are dropped (they read as zero again), the edges zeroed.
        let page = 4096
        let lo = (o + page - 1) / page * page
        let hi = (o + count) / page * page
        guard lo < hi else {
            memset(base + o, 0, count)
            return
        }
        memset(base + o, 0, lo - o)
        memset(base + hi, 0, o + count - hi)
        if madvise(base + lo, hi - lo, MADV_DONTNEED) != 0 { memset(base + lo, 0, hi - lo) }
    }
}
