import Virtio

/// What went wrong with a block request, in terms an NBD reply can carry; each case says what
/// happened and what to do.
public enum BlkError: Error, Equatable, CustomStringConvertible {
    /// The device answered VIRTIO_BLK_S_IOERR.
    case ioError(BlkCommand)
    /// The device completed the request with a status byte that is not a virtio-blk status (the
    /// driver's 0xFF sentinel when it wrote none).
    case noStatus(BlkCommand, status: UInt8)
    /// The request was still unanswered after the device was reset `resets` times; it is not
    /// resubmitted again.
    case failedAfterReset(BlkCommand, resets: Int)
    /// The device answered VIRTIO_BLK_S_UNSUPP.
    case unsupported(BlkCommand)
    /// The device is unusable (it broke the ring protocol, asked for a reset or lost a request,
    /// and the reset failed); nothing more goes to it until a reset succeeds.
    case deviceBroken(DeviceFailure)
    /// The driver is shutting down.
    case shutdown
    /// The range is outside the export (caught before the device).
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// The export is read-only.
    case readOnly
    /// A block layer's own storage failed: the snapshot overlay file or a bitmap file.
    case layerStorage(LayerStorageFailure)

    public var description: String {
        switch self {
        case .ioError(let c):
            return
                "device I/O error: \(c) failed (VIRTIO_BLK_S_IOERR); check the backing file or device and the backend's log"
        case .noStatus(let c, let st):
            return
                "device I/O error: \(c) completed with status 0x\(String(st, radix: 16)), which is not a virtio-blk status; the device is faulty"
        case .failedAfterReset(let c, let n):
            return
                "device I/O error: \(c) was lost again after \(n) device reset(s) and is not retried; check the device or backend"
        case .unsupported(let c): return "the device does not support \(c) (VIRTIO_BLK_S_UNSUPP)"
        case .deviceBroken(let f):
            return "device unusable: \(f); restart the backend (virtnbd reconnects) or restart virtnbd"
        case .shutdown: return "server is shutting down"
        case .outOfRange(let o, let n, let size):
            return "invalid request: range \(o)+\(n) exceeds the export size \(size)"
        case .readOnly: return "export is read-only"
        case .layerStorage(let f): return "\(f)"
        }
    }
}

/// Why the driver reset its device.
public enum ResetCause: Sendable, Equatable, CustomStringConvertible {
    /// The device broke the virtqueue protocol (§2.7, §2.8).
    case ring(VirtqueueError)
    /// The device set DEVICE_NEEDS_RESET (§2.1.2).
    case needsReset
    /// A request was not completed within `--request-timeout`.
    case timedOut(BlkCommand, seconds: Double)

    public var description: String {
        switch self {
        case .ring(let e): return "\(e)"
        case .needsReset: return "the device set DEVICE_NEEDS_RESET"
        case .timedOut(let c, let s): return "\(c) was not completed within \(s) s (--request-timeout)"
        }
    }
}

/// Why the device is unusable: what made the driver reset it, and why the reset failed.
public struct DeviceFailure: Sendable, Equatable, CustomStringConvertible {
    public let cause: ResetCause
    /// The error the reset (or the transport's reconnect) failed with.
    public let resetError: any Error
    /// The server began shutting down while it waited for the device.
    public let shuttingDown: Bool

    public init(cause: ResetCause, resetError: any Error, shuttingDown: Bool = false) {
        self.cause = cause
        self.resetError = resetError
        self.shuttingDown = shuttingDown
    }

    public var description: String {
        "\(cause); the reset failed: \(resetError)" + (shuttingDown ? "; the server is shutting down" : "")
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.cause == b.cause && a.shuttingDown == b.shuttingDown && "\(a.resetError)" == "\(b.resetError)"
    }
}

/// A block layer's own file failed under a request.
public struct LayerStorageFailure: Sendable, Equatable, CustomStringConvertible {
    public enum Store: Sendable, Equatable {
        /// `--snapshot-overlay file`'s temporary file (unlinked; in TMPDIR or beside the image).
        case snapshotOverlay
        /// The bitmap file beside a `--file` image.
        case bitmapFile(path: String)
    }
    public enum Operation: String, Sendable, Equatable {
        case read, write
    }
    public let store: Store
    public let operation: Operation
    public let bytes: Int
    public let offset: UInt64
    /// What the system said.
    public let error: any Error

    public init(_ store: Store, _ operation: Operation, bytes: Int, at offset: UInt64, error: any Error) {
        self.store = store
        self.operation = operation
        self.bytes = bytes
        self.offset = offset
        self.error = error
    }

    public var description: String {
        switch store {
        case .snapshotOverlay:
            return "snapshot overlay file: \(operation.rawValue) of \(bytes) bytes at \(offset) failed: \(error); "
                + "free space where the overlay lives (TMPDIR, or beside the image) or use --snapshot-overlay ram"
        case .bitmapFile(let path):
            return "bitmap file \(path): \(operation.rawValue) of \(bytes) bytes at \(offset) failed: \(error); "
                + "the write was not made, since it could not be tracked; check the disk the file is on"
        }
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.store == b.store && a.operation == b.operation && a.bytes == b.bytes && a.offset == b.offset
            && "\(a.error)" == "\(b.error)"
    }
}

/// The device cannot be driven as virtnbd needs it (found while bringing it up or resetting it).
public enum BlkDeviceError: Error, Equatable, CustomStringConvertible {
    /// The device offers only a split ring, whose size must be a power of two (§2.7).
    case splitRingNeedsPowerOfTwo(queueSize: Int)
    /// size_max is smaller than the 4 KiB segments the driver uses.
    case sizeMaxTooSmall(UInt32)
    /// blk_size is larger than the 4 KiB the driver handles.
    case blockSizeTooLarge(UInt32)
    /// A reset handed the queue a new interrupt eventfd, which the event loop does not watch.
    case interruptReplaced(queue: Int)
    /// The device still set DEVICE_NEEDS_RESET after it was reset.
    case stillNeedsReset

    public var description: String {
        switch self {
        case .splitRingNeedsPowerOfTwo(let n):
            return
                "queue size \(n) is not a power of two, which the split ring the device forces needs; use --queue-size 256"
        case .sizeMaxTooSmall(let m): return "the device's size_max \(m) is below 4096; virtnbd needs 4 KiB segments"
        case .blockSizeTooLarge(let b):
            return "the device's blk_size \(b) is above 4096, which virtnbd does not support"
        case .interruptReplaced(let q):
            return
                "queue \(q) got a new interrupt eventfd from the reset, which the event loop does not watch; restart virtnbd"
        case .stillNeedsReset:
            return "the device still set DEVICE_NEEDS_RESET after a reset; check the device, then restart virtnbd"
        }
    }
}

/// The negotiated shape of a virtio-blk device (VIRTIO 1.2 §5.2.4).
public struct BlkGeometry: Sendable, Equatable {
    public var capacityBytes: UInt64
    public var blockSize: UInt32
    public var segMax: UInt32
    public var sizeMax: UInt32
    public var readOnly: Bool
    public var canFlush: Bool
    public var canDiscard: Bool
    public var canWriteZeroes: Bool
    public var maxDiscardSectors: UInt32
    public var maxWriteZeroesSectors: UInt32
    public var writeZeroesMayUnmap: Bool
}

/// One virtio-blk request as the driver issues it.
public enum BlkCommand: Sendable, Equatable, CustomStringConvertible {
    /// Read `pages` 4 KiB pages starting at 512-byte `sector`.
    case read(sector: UInt64, pages: Int)
    case write(sector: UInt64, pages: Int)
    case flush
    case discard(sector: UInt64, sectors: UInt32)
    case writeZeroes(sector: UInt64, sectors: UInt32, unmap: Bool)
    case getID

    var pages: Int {
        switch self {
        case .read(_, let p), .write(_, let p): return p
        case .getID: return 1
        default: return 0
        }
    }
    public var description: String {
        switch self {
        case .read(let s, let p): return "read of \(p * 4096) bytes at sector \(s)"
        case .write(let s, let p): return "write of \(p * 4096) bytes at sector \(s)"
        case .flush: return "flush"
        case .discard(let s, let n): return "discard of \(n) sectors at \(s)"
        case .writeZeroes(let s, let n, _): return "write-zeroes of \(n) sectors at \(s)"
        case .getID: return "get-id"
        }
    }
    var typeCode: UInt32 {
        switch self {
        case .read: return BlkRequestType.in
        case .write: return BlkRequestType.out
        case .flush: return BlkRequestType.flush
        case .getID: return BlkRequestType.getID
        case .discard: return BlkRequestType.discard
        case .writeZeroes: return BlkRequestType.writeZeroes
        }
    }
}

/// The I/O pages a request owns while it is in flight.
public struct IOPages: Sendable {
    public let pages: [Int32]
    public let memory: SharedMemory
    let arena: DMAArena
    @inline(__always) public func offset(ofPage i: Int) -> Int { arena.pageOffset(pages[i]) }
}
