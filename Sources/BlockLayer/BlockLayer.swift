// The block layer: what an NBD export calls, a small stack of layers over the virtio-blk device,
// in the spirit of nbdkit's filters. Each layer is a `BlockLayer` that wraps the one below it;
// the bottom is the device itself (`BlockDevice`). An export with no layers calls the device
// directly, so a request no layer changes costs nothing.
//
// Offsets and lengths arrive already checked against the export's size by the transmission
// rules; layers check again only where they must (the device does).
import NIOCore
import VirtioBlock

/// A run of `qemu:allocation-depth` values.
public typealias DepthRun = ValueRun<UInt32>

/// A byte range [start, end) and what holds for it.
public struct ValueRun<Value: Equatable & Sendable>: Sendable, Equatable {
    public var start: UInt64
    public var end: UInt64
    public var value: Value
    public init(start: UInt64, end: UInt64, value: Value) {
        self.start = start
        self.end = end
        self.value = value
    }
}

extension Allocation {
    /// Holds data of its own in this layer (written or zeroed in place), as opposed to a hole.
    public var isAllocated: Bool { self == .data || self == .zero }
}

/// What a stack of layers can do, as the transmission flags advertise it.
public struct BlockCapabilities: Sendable, Equatable {
    public var readOnly: Bool
    public var canFlush: Bool
    public var canTrim: Bool
    /// WRITE_ZEROES without writing every byte (NBD_CMD_FLAG_FAST_ZERO may succeed).
    public var canFastZero: Bool

    public init(readOnly: Bool, canFlush: Bool, canTrim: Bool, canFastZero: Bool) {
        self.readOnly = readOnly
        self.canFlush = canFlush
        self.canTrim = canTrim
        self.canFastZero = canFastZero
    }
}

/// One layer of an export's block stack.
public protocol BlockLayer: AnyObject, Sendable {
    /// The export's byte size.
    var size: UInt64 { get }
    var capabilities: BlockCapabilities { get }
    func read(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator, _ done: @escaping BlockDevice.ReadCompletion)
    /// Data and known-zero extents in order (sparse reads: zero extents cost no device I/O).
    func readExtents(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<[BlockDevice.Extent], BlkError>) -> Void)
    /// With `fua`, the bytes are on stable storage when `done` runs.
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, _ done: @escaping BlockDevice.Completion)
    func flush(_ done: @escaping BlockDevice.Completion)
    /// Advisory: whole blocks inside the range may be deallocated.
    func trim(offset: UInt64, length: UInt64, _ done: @escaping BlockDevice.Completion)
    func writeZeroes(
        offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, _ done: @escaping BlockDevice.Completion)
    /// base:allocation over [start, end): consecutive runs covering it (they may start before it).
    func allocationRuns(_ start: UInt64, _ end: UInt64) -> [AllocationMap.Run]
    /// A READ that may leave its bytes in device memory for the server to send without a copy
    /// (`.held`); a layer that changes data answers `.data` or `.extents` (the default does).
    func readHeld(
        offset: UInt64, length: Int, sparse: Bool, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<BlockDevice.ReadReply, BlkError>) -> Void)
    /// The most bytes one connection may hold in `.held` replies not yet sent; 0: never ask.
    var heldReadLimit: Int { get }
    /// `qemu:allocation-depth` over [start, end): consecutive runs of 0 (allocated in no layer),
    /// 1 (in the top layer), 2 (in the layer below), as QEMU 5.2 defines it. Only stacks that
    /// have layers offer it (`allocationDepthOffered`).
    func allocationDepthRuns(_ start: UInt64, _ end: UInt64) -> [DepthRun]
    /// Whether this stack has layers whose depth `allocationDepthRuns` can tell apart.
    var allocationDepthOffered: Bool { get }
    /// Holds the device's doorbell for the calling thread's requests until `unplug()`, so that
    /// a batch of requests reaches the device with one notification. Layers pass it down.
    func plug()
    func unplug()
}

extension BlockLayer {
    public func readHeld(
        offset: UInt64, length: Int, sparse: Bool, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<BlockDevice.ReadReply, BlkError>) -> Void
    ) {
        if sparse {
            readExtents(offset: offset, length: length, allocator: allocator) { done($0.map { .extents($0) }) }
        } else {
            read(offset: offset, length: length, allocator: allocator) { done($0.map { .data($0) }) }
        }
    }
    public var heldReadLimit: Int { 0 }
    /// One layer: allocated blocks are depth 1, holes 0.
    public func allocationDepthRuns(_ start: UInt64, _ end: UInt64) -> [DepthRun] {
        allocationRuns(start, end).map { DepthRun(start: $0.start, end: $0.end, value: $0.state.isAllocated ? 1 : 0) }
    }
    public var allocationDepthOffered: Bool { false }
    public func plug() {}
    public func unplug() {}
}

extension BlockDevice: BlockLayer {
    public var capabilities: BlockCapabilities {
        let g = geometry
        return BlockCapabilities(
            readOnly: g.readOnly, canFlush: g.canFlush, canTrim: g.canDiscard, canFastZero: g.canWriteZeroes)
    }

    public func allocationRuns(_ start: UInt64, _ end: UInt64) -> [AllocationMap.Run] {
        allocation.extents(start, end)
    }
    public func plug() { driver.plug() }
    public func unplug() { driver.unplug() }
}
