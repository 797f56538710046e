import NIOConcurrencyHelpers

/// A value that is only reached while holding its lock: virtnbd's lock type for shared values.
///
/// Two kinds of lock are not values and stay `NSLock`: a lock that serialises a whole exchange
/// and blocks while held, which `withLock` forbids: the driver's recovery (`VirtioBlkDriver`:
/// one reset and resubmission at a time, waiting for the device) and the vhost-user transport's
/// control channel (`VhostUserTransport`: a request and its reply over the socket; its
/// `HangupWatch` too). The emulator's per-queue batch lock is a `Locked<Void>` that is held
/// across backend I/O on purpose; `VirtioBlkEmulator.processing` says why.
///
/// Why not `Synchronization.Mutex`: on Linux its slow path lives in the runtime's
/// libswiftSynchronization.so, which is not built with ThreadSanitizer, so under
/// `swift test --sanitize=thread` TSan sees threads take the lock but never sees one hand
/// it over, and reports every access made inside the lock as a data race (checked with a
/// two-thread counter under Swift 6.3.1: `Mutex` gives a report per access, a pthread mutex
/// none). `NIOLockedValueBox` is a `pthread_mutex_t`, which TSan intercepts, and costs the
/// same on the uncontended path. Call sites read exactly as they did with `Mutex`.
public struct Locked<Value> {
    @usableFromInline let box: NIOLockedValueBox<Value>

    @inlinable
    public init(_ value: Value) { box = NIOLockedValueBox(value) }

    /// Runs `body` with exclusive access to the value. Do not block inside it.
    @inlinable
    public func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        try box.withLockedValue(body)
    }
}

extension Locked: Sendable where Value: Sendable {}
