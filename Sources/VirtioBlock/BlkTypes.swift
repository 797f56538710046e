import Virtio

/// What went wrong with a block request, in terms an NBD reply can carry.
public enum BlkError: Error, Equatable, CustomStringConvertible {
    /// The device answered VIRTIO_BLK_S_IOERR (or wrote no valid status).
    case ioError(String)
    /// The device answered VIRTIO_BLK_S_UNSUPP.
    case unsupported(String)
    /// The device broke the virtqueue protocol or needs a reset; nothing more goes to it.
    case deviceBroken(String)
    /// The driver is shutting down.
    case shutdown
    /// The request itself is out of range or malformed (caught before the device).
    case invalid(String)
    /// The export is read-only.
    case readOnly

    public var description: String {
        switch self {
        case .ioError(let s): return "device I/O error: \(s)"
        case .unsupported(let s): return "device does not support \(s)"
        case .deviceBroken(let s): return "device unusable: \(s); restart virtnbd or reset the device"
        case .shutdown: return "server is shutting down"
        case .invalid(let s): return "invalid request: \(s)"
        case .readOnly: return "export is read-only"
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
public enum BlkCommand: Sendable {
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
