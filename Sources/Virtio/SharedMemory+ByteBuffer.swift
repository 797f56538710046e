// Bulk copies between the DMA arena and NIO ByteBuffers. Part of the DMA arena's unsafe corner:
// the only place where a ByteBuffer's storage and arena memory meet.
import NIOCore

extension SharedMemory {
    /// Copies `count` bytes at `offset` into `buffer` at absolute index `index` (capacity must suffice).
    public func copyOut(_ o: Int, count: Int, into buffer: inout ByteBuffer, at index: Int) {
        withBytes(at: o, count: count) { _ = buffer.setBytes($0, at: index) }
    }

    /// Copies `count` readable bytes of `buffer`, starting `skip` bytes after its reader index, to `offset`.
    public func copyIn(from buffer: ByteBuffer, skip: Int, count: Int, to o: Int) {
        buffer.withUnsafeReadableBytes { src in
            withMutableBytes(at: o, count: count) { dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[skip..<skip + count]))
            }
        }
    }
}
