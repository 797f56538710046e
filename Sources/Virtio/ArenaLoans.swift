// ByteBuffers lent out of shared memory (part of the DMA arena's unsafe corner: it hands arena
// pointers to NIO). A lent buffer's storage is the arena itself; the allocator behind it never
// frees that storage, it drops the owner registered for the pointer, whose deinit returns the
// pages. Growing or copying such a buffer moves it to malloc'd memory first.
import CVirtShim
@_spi(CustomByteBufferAllocator) import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

enum ArenaLoans {
    /// Lent storage → who keeps it out of the pool until the buffer is freed.
    private static let owners = Locked<[UInt: AnyObject & Sendable]>([:])

    static func lend(_ bytes: UnsafeMutableRawBufferPointer, to owner: AnyObject & Sendable) -> ByteBuffer {
        let key = UInt(bitPattern: bytes.baseAddress!)
        owners.withLock { o in
            precondition(o[key] == nil, "arena bytes lent twice")
            o[key] = owner
        }
        return ByteBuffer(takingOwnershipOf: bytes, allocator: allocator)
    }

    /// Ends a loan; nil if `p` was not lent (it is malloc'd). The owner is dropped by the caller,
    /// outside the lock.
    static func end(_ p: UnsafeMutableRawPointer) -> (AnyObject & Sendable)? {
        let key = UInt(bitPattern: p)
        return owners.withLock { $0.removeValue(forKey: key) }
    }

    static let allocator = ByteBufferAllocator(
        allocate: { malloc($0) },
        reallocate: { p, old, new in
            guard let p else { return malloc(new) }
            guard let owner = ArenaLoans.end(p) else { return realloc(p, new) }
            // NIO grows a uniquely held buffer in place: lent bytes move to the heap first.
            guard let q = malloc(new) else { return nil }
            q.copyMemory(from: p, byteCount: min(old, new))
            withExtendedLifetime(owner) {}
            return q
        },
        deallocate: { p in
            if let owner = ArenaLoans.end(p) {
                withExtendedLifetime(owner) {}
            } else {
                free(p)
            }
        },
        copy: { $0.copyMemory(from: $1, byteCount: $2) })
}
