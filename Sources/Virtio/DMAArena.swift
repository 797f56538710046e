// The DMA arena: shared memory split in two.
//  - structures: a bump allocator for long-lived structures (rings, per-slot request headers);
//  - I/O pages: fixed 4 KiB pages for data, numbered from `poolFirstPage`; the driver hands them
//    out to its lanes and keeps their free lists itself.
// Every allocation knows its offset (host side) and its device address (what goes into descriptors).

/// A range of arena memory.
public struct DMARegion: Sendable, Equatable {
    public let offset: Int
    public let length: Int
    public let deviceAddress: UInt64
}

public enum DMAArenaError: Error, CustomStringConvertible {
    case exhausted(requested: Int, alignment: Int, free: Int)
    case badAlignment(Int)
    public var description: String {
        switch self {
        case .exhausted(let r, let a, let f):
            return "DMA arena exhausted: wanted \(r) bytes aligned to \(a), \(f) free; raise the arena size"
        case .badAlignment(let a): return "alignment \(a) is not a power of two"
        }
    }
}

public final class DMAArena: @unchecked Sendable {
    public static let pageSize = 4096
    public let memory: SharedMemory
    private var bumpNext = 0
    private let bumpLimit: Int
    /// I/O pages: [poolFirstPage, poolFirstPage + ioPages).
    public let poolFirstPage: Int

    /// - Parameters:
    ///   - structureBytes: room for rings and headers (rounded up to pages).
    ///   - ioPages: number of 4 KiB I/O pages.
    ///   - deviceBase: device address of the first byte (an IOVA for VFIO; anything non-zero helps catch bugs).
    public init(structureBytes: Int, ioPages: Int, deviceBase: UInt64 = 0x1_0000_0000) throws {
        let structPages = (structureBytes + Self.pageSize - 1) / Self.pageSize
        memory = try SharedMemory(size: (structPages + ioPages) * Self.pageSize, deviceBase: deviceBase)
        bumpLimit = structPages * Self.pageSize
        poolFirstPage = structPages
    }

    /// Allocates long-lived, zeroed memory (never freed).
    public func allocate(_ length: Int, alignment: Int) throws -> DMARegion {
        guard alignment > 0, alignment & (alignment - 1) == 0 else { throw DMAArenaError.badAlignment(alignment) }
        let start = (bumpNext + alignment - 1) & ~(alignment - 1)
        guard start + length <= bumpLimit else {
            throw DMAArenaError.exhausted(requested: length, alignment: alignment, free: bumpLimit - bumpNext)
        }
        bumpNext = start + length
        memory.zero(start, count: length)
        return DMARegion(offset: start, length: length, deviceAddress: memory.deviceBase + UInt64(start))
    }

    // MARK: I/O pages

    @inline(__always) public func pageOffset(_ p: Int32) -> Int { Int(p) * Self.pageSize }
    @inline(__always) public func pageDeviceAddress(_ p: Int32) -> UInt64 {
        memory.deviceBase + UInt64(Int(p) * Self.pageSize)
    }
}

extension DMARegion {
    /// The part of this region at `offset` (relative) of `length` bytes.
    public func slice(at offset: Int, length: Int) -> DMARegion {
        precondition(offset >= 0 && length >= 0 && offset + length <= self.length, "slice outside the region")
        return DMARegion(offset: self.offset + offset, length: length, deviceAddress: deviceAddress + UInt64(offset))
    }
}
