import CVirtShim
// What the emulated disk stores its blocks in. The device thread is the only caller.
import Virtio

#if canImport(Glibc)
    import Glibc
#endif

public enum BackendError: Error, CustomStringConvertible {
    /// `mayCreate`: the file would have been created had it been given a size.
    case open(path: String, errno: Int32, readOnly: Bool, mayCreate: Bool)
    case notRegular(path: String)
    case badSize(path: String, size: Int64)
    /// An existing image whose size is not the one asked for: images are never resized.
    case sizeMismatch(path: String, size: Int64, wanted: UInt64)
    case emptyRAM
    case io(op: String, errno: Int32)
    public var description: String {
        switch self {
        case .open(let p, let e, let readOnly, let mayCreate):
            let what = "cannot open \(p): \(String(cString: strerror(e)))"
            switch e {
            case ENOENT:
                return mayCreate
                    ? "\(what); check the path, or give a size (--size, or size: in the configuration) to create it"
                    : "\(what); check that its directory exists"
            case EACCES, EPERM, EROFS:
                return readOnly
                    ? "\(what); check the permissions of the file and its directories"
                    : "\(what); check the permissions, or serve it read-only (-r, or read-only: true)"
            default: return "\(what); check the path"
            }
        case .notRegular(let p): return "\(p) is not a regular file or block device"
        case .badSize(let p, let s):
            return s == 0
                ? "\(p) is empty; an export needs at least 1 byte (give the file a size first, e.g. truncate -s 64M \(p))"
                : "\(p) reports a size of \(s) bytes"
        case .sizeMismatch(let p, let s, let w):
            return "\(p) already exists with \(s) bytes, not \(w); an existing image is never resized"
        case .emptyRAM: return "a RAM disk needs at least 1 byte"
        case .io(let op, let e): return "\(op): \(String(cString: strerror(e)))"
        }
    }
}

public protocol BlockBackend: AnyObject {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    /// Reads `count` bytes at byte offset `at` into shared memory.
    func read(at: UInt64, into mem: SharedMemory, offset: Int, count: Int) throws
    func write(at: UInt64, from mem: SharedMemory, offset: Int, count: Int) throws
    func flush() throws
    /// Deallocates (reads return zeroes afterwards on both backends here).
    func discard(at: UInt64, count: UInt64) throws
    func writeZeroes(at: UInt64, count: UInt64, unmap: Bool) throws
}

/// Blocks in RAM: private anonymous memory, so never-written pages cost nothing and DISCARD
/// gives memory back (MADV_DONTNEED).
public final class RAMBackend: BlockBackend {
    public let size: UInt64
    public let readOnly: Bool
    let store: SharedMemory
    public init(size: UInt64, readOnly: Bool = false) throws {
        guard size >= 1 else { throw BackendError.emptyRAM }
        self.size = size
        self.readOnly = readOnly
        store = try SharedMemory(privateSize: Int(size))
    }
    public func read(at: UInt64, into mem: SharedMemory, offset: Int, count: Int) throws {
        mem.copy(from: store, at: Int(at), to: offset, count: count)
    }
    public func write(at: UInt64, from mem: SharedMemory, offset: Int, count: Int) throws {
        store.copy(from: mem, at: offset, to: Int(at), count: count)
    }
    public func flush() throws {}
    public func discard(at: UInt64, count: UInt64) throws { store.punchHole(Int(at), count: Int(count)) }
    public func writeZeroes(at: UInt64, count: UInt64, unmap: Bool) throws {
        store.punchHole(Int(at), count: Int(count))
    }
}

/// Blocks in a raw file (sparse where the filesystem allows). FLUSH is fdatasync.
public final class FileBackend: BlockBackend {
    public let size: UInt64
    public let readOnly: Bool
    public let path: String
    /// Whether this open created the file (`createSize`), so that a start that fails can remove it.
    public let created: Bool
    let fd: Int32

    /// Opens `path`. With `createSize` a missing file is created sparse with that size (read-only
    /// too: it then serves zeroes), and an existing one must already have exactly that size: an
    /// image is never resized (`.sizeMismatch`).
    public init(path: String, readOnly: Bool, createSize: UInt64? = nil) throws {
        self.path = path
        self.readOnly = readOnly
        var fd: Int32 = -1
        var created = false
        if createSize != nil {
            fd = open(path, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL, 0o644)
            if fd >= 0 {
                created = true
            } else if errno != EEXIST {
                throw BackendError.open(path: path, errno: errno, readOnly: readOnly, mayCreate: false)
            }
        }
        if fd < 0 { fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC) }
        guard fd >= 0 else {
            throw BackendError.open(path: path, errno: errno, readOnly: readOnly, mayCreate: createSize == nil)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            close(fd)
            throw BackendError.io(op: "fstat \(path)", errno: errno)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw BackendError.notRegular(path: path)
        }
        var sz = Int64(st.st_size)
        if let want = createSize {
            if created {
                guard ftruncate(fd, off_t(want)) == 0 else {
                    let e = errno
                    close(fd)
                    unlink(path)
                    throw BackendError.io(op: "ftruncate \(path)", errno: e)
                }
                sz = Int64(want)
            } else if sz != Int64(want) {
                close(fd)
                throw BackendError.sizeMismatch(path: path, size: sz, wanted: want)
            }
        }
        // Served to the byte: the file's size need not be a multiple of 4 KiB or of a sector.
        guard sz >= 1 else {
            close(fd)
            throw BackendError.badSize(path: path, size: sz)
        }
        self.fd = fd
        self.size = UInt64(sz)
        self.created = created
    }
    deinit { close(fd) }

    /// The file's holes (lseek SEEK_HOLE / SEEK_DATA), within the exported size.
    public func holes() -> [Range<UInt64>] {
        let seekData: Int32 = 3
        let seekHole: Int32 = 4 // <unistd.h> with _GNU_SOURCE
        var out: [Range<UInt64>] = []
        var pos: off_t = 0
        let end = off_t(size)
        while pos < end {
            let hole = lseek(fd, pos, seekHole)
            if hole < 0 || hole >= end { break }
            var data = lseek(fd, hole, seekData)
            if data < 0 || data > end { data = end } // ENXIO: a hole runs to EOF
            if data > hole { out.append(UInt64(hole)..<UInt64(data)) }
            pos = data
        }
        return out
    }

    public func read(at: UInt64, into mem: SharedMemory, offset: Int, count: Int) throws {
        try mem.pread(fd: fd, fileOffset: Int64(at), to: offset, count: count)
    }
    public func write(at: UInt64, from mem: SharedMemory, offset: Int, count: Int) throws {
        try mem.pwrite(fd: fd, fileOffset: Int64(at), from: offset, count: count)
    }
    public func flush() throws {
        guard fdatasync(fd) == 0 else { throw BackendError.io(op: "fdatasync \(path)", errno: errno) }
    }
    public func discard(at: UInt64, count: UInt64) throws {
        let r = vshim_punch_hole(fd, Int64(at), Int64(count))
        if r != 0 { try writeZeroes(at: at, count: count, unmap: false) }
    }
    public func writeZeroes(at: UInt64, count: UInt64, unmap: Bool) throws {
        if unmap, vshim_punch_hole(fd, Int64(at), Int64(count)) == 0 { return }
        if vshim_zero_range(fd, Int64(at), Int64(count)) == 0 { return }
        let r = vshim_pwrite_zeroes(fd, Int64(at), Int64(count))
        if r != 0 { throw BackendError.io(op: "pwrite zeroes \(path)", errno: -r) }
    }
}
