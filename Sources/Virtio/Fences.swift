import CVirtShim

/// Memory ordering between driver and device (VIRTIO 1.2 §2.7.13, §2.7.7).
public enum Fence {
    @inline(__always) public static func release() { vshim_fence_release() }
    @inline(__always) public static func acquire() { vshim_fence_acquire() }
    @inline(__always) public static func full() { vshim_fence_full() }
}

/// An eventfd: the doorbell (kick) and the interrupt (call) between driver and device.
public final class EventFD: @unchecked Sendable {
    public let fd: Int32
    public init(nonBlocking: Bool = true) throws(SharedMemoryError) {
        let fd = vshim_eventfd(nonBlocking ? 1 : 0)
        guard fd >= 0 else { throw .ioFailed(op: "eventfd", errno: errno) }
        self.fd = fd
    }
    deinit { close(fd) }
    @inline(__always) public func signal() { _ = vshim_eventfd_signal(fd) }
    /// Clears the counter and returns how many signals were pending.
    @discardableResult @inline(__always) public func drain() -> UInt64 { vshim_eventfd_drain(fd) }
    /// Blocks until signalled or `other` is signalled; returns (self, other) readiness.
    public func wait(orUntil other: EventFD, timeoutMilliseconds: Int32 = -1) -> (mine: Bool, other: Bool) {
        let r = vshim_wait_either(fd, other.fd, timeoutMilliseconds)
        if r < 0 { return (false, false) }
        return (r & 1 != 0, r & 2 != 0)
    }
}
#if canImport(Glibc)
    import Glibc
#endif
