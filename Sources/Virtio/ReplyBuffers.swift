// The allocator for READ reply buffers (part of the DMA arena's unsafe corner: it hands C
// memory to NIO). Replies of 4 KiB and more come from CVirtShim's size-class cache (bufpool.c), so
// a 1 MiB READ reuses an already faulted-in block instead of fresh heap, a 4 KiB one skips
// glibc's consolidation on free, and the memory kept is capped.
import CVirtShim
@_spi(CustomByteBufferAllocator) import NIOCore

public enum ReplyBuffers {
    /// A ByteBufferAllocator over `vshim_pool_*`: blocks of 4 KiB to 64 MiB are cached when freed
    /// (at most 24 MiB in all), smaller ones are plain malloc.
    public static let allocator = ByteBufferAllocator(
        allocate: { vshim_pool_alloc($0) },
        reallocate: { vshim_pool_realloc($0, $1, $2) },
        deallocate: { vshim_pool_release($0) },
        copy: { $0.copyMemory(from: $1, byteCount: $2) })
}
