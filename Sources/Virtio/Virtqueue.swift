// What the driver needs from a virtqueue, whatever its format: split (VIRTIO 1.2 §2.7) or
// packed (§2.8). `VirtioBlkDriver` is written against this protocol only.
import CVirtShim

/// The two ring formats (§2.6). Packed needs VIRTIO_F_RING_PACKED.
public enum RingFormat: String, Sendable, CaseIterable, CustomStringConvertible {
    case split, packed
    public var description: String { rawValue }
}

/// Device addresses of a queue's three areas, as `VirtioTransport.setupQueue` takes them.
/// Split: descriptor table, available ring, used ring. Packed: descriptor ring, driver event
/// suppression, device event suppression (§2.8.10).
public struct QueueAddresses: Sendable, Equatable {
    public var descriptors: UInt64
    public var driverArea: UInt64
    public var deviceArea: UInt64
    public init(descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) {
        self.descriptors = descriptors
        self.driverArea = driverArea
        self.deviceArea = deviceArea
    }
}

/// The driver side of one virtqueue. Not thread-safe: its owner serialises every call.
///
/// Ids: `add` returns a buffer id in `0..<size` that `nextUsed` later returns. For split rings it
/// is the head descriptor index; for packed rings the buffer id (§2.8.6). The driver keys its
/// per-request state (header slot, pages) by this id.
public protocol DriverVirtqueue: AnyObject {
    /// Number of descriptors (and ids).
    var size: Int { get }
    /// Ring descriptors not in use.
    var freeCount: Int { get }
    /// Chains added and not yet returned by `nextUsed`.
    var inFlightCount: Int { get }
    /// Where the areas live, for `VirtioTransport.setupQueue`.
    var addresses: QueueAddresses { get }
    /// The id the next successful `add` returns.
    var nextFreeID: UInt16 { get }
    /// Whether VIRTIO_F_EVENT_IDX was negotiated (§2.7.10, §2.8.10). Set before the first add.
    var eventIndex: Bool { get set }

    /// Adds a chain of `count` segments, device-readable ones first (§2.7.4.2). With `indirect`
    /// (VIRTIO_F_INDIRECT_DESC, §2.7.5.3 / §2.8.19) the segments are written into that table,
    /// which must hold 16 × `count` bytes, and the ring gets one descriptor. Returns the id, or nil
    /// when too few ring descriptors are free (`count`, or 1 with `indirect`).
    func add(count: Int, indirect: DMARegion?, segment: (Int) -> VirtqueueSegment) -> UInt16?
    /// Makes every chain added since the last call visible to the device. Returns whether the
    /// device asked to be notified (§2.7.13.4, §2.8.23).
    func publish() -> Bool
    /// Takes the next used buffer, validated against the driver's private shadow, and frees its
    /// descriptors. nil when the device has returned nothing new.
    func nextUsed() throws(VirtqueueError) -> (id: UInt16, length: UInt32)?
    /// Asks the device not to interrupt (for polling while busy).
    func disableInterrupts()
    /// Asks for an interrupt on the next used buffer. Returns true if used buffers are already
    /// pending (the caller must reap them: the device may not interrupt for those).
    func enableInterrupts() -> Bool
    /// Forgets every chain and zeroes the rings, as after a device reset (§2.1.2, §3.1.1): the
    /// queue is as new and can be set up again at the same addresses.
    func reset()
}

/// Driver ring descriptors one request needs, given whether it goes indirect.
@inline(__always) public func ringDescriptors(segments: Int, indirect: Bool) -> Int { indirect ? 1 : segments }

/// Which virtqueue a thread's requests use. Each NIO event loop thread is given its own lane at
/// start, so loops never share a queue (or its lock); other threads use lane 0.
public enum IOLane {
    public static var current: Int { Int(vshim_lane_get()) }
    public static func set(_ lane: Int) { vshim_lane_set(Int32(truncatingIfNeeded: lane)) }
}
