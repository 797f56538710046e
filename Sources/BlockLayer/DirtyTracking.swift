// The dirty-tracking layer: every write, trim and zeroing is marked in the export's bitmaps
// before it goes down the stack, and finished (`DirtyBitmaps.end`) before it is answered.
// Reads, flushes and block status pass straight through.
import NIOCore
import VirtioBlock

public final class DirtyTracking: BlockLayer {
    public let inner: BlockLayer
    public func plug() { inner.plug() }
    public func unplug() { inner.unplug() }
    public let bitmaps: DirtyBitmaps

    public init(over inner: BlockLayer, bitmaps: DirtyBitmaps) {
        self.inner = inner
        self.bitmaps = bitmaps
    }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockCapabilities { inner.capabilities }

    public func read(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator, _ done: @escaping BlockDevice.ReadCompletion
    ) {
        inner.read(offset: offset, length: length, allocator: allocator, done)
    }

    public func readExtents(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<[BlockDevice.Extent], BlkError>) -> Void
    ) {
        inner.readExtents(offset: offset, length: length, allocator: allocator, done)
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, _ done: @escaping BlockDevice.Completion) {
        tracked(offset, UInt64(data.readableBytes), done) { d in
            self.inner.write(offset: offset, data: data, fua: fua, d)
        }
    }

    public func flush(_ done: @escaping BlockDevice.Completion) { inner.flush(done) }

    public func trim(offset: UInt64, length: UInt64, _ done: @escaping BlockDevice.Completion) {
        tracked(offset, length, done) { d in self.inner.trim(offset: offset, length: length, d) }
    }

    public func writeZeroes(
        offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, _ done: @escaping BlockDevice.Completion
    ) {
        tracked(offset, length, done) { d in
            self.inner.writeZeroes(offset: offset, length: length, mayUnmap: mayUnmap, fua: fua, d)
        }
    }

    public func allocationRuns(_ start: UInt64, _ end: UInt64) -> [AllocationMap.Run] {
        inner.allocationRuns(start, end)
    }
    public func allocationDepthRuns(_ start: UInt64, _ end: UInt64) -> [DepthRun] {
        inner.allocationDepthRuns(start, end)
    }
    public var allocationDepthOffered: Bool { inner.allocationDepthOffered }

    private func tracked(
        _ offset: UInt64, _ length: UInt64, _ done: @escaping BlockDevice.Completion,
        _ body: (@escaping BlockDevice.Completion) -> Void
    ) {
        switch bitmaps.begin(offset, length) {
        case .failure(let e): done(.failure(e))
        case .success(let epoch):
            let bitmaps = self.bitmaps
            body { r in
                bitmaps.end(epoch)
                done(r)
            }
        }
    }
}
