import Synchronization
import Virtio

/// The server-wide memory budget (issue #31, `--memory-budget`): the bytes that all clients
/// together make the server hold. It counts input received and not yet parsed (a WRITE's payload
/// as it arrives, a partial option) and request bytes in flight (WRITE payloads on their way to
/// the device, READ data on its way back). Replies are bounded per connection instead (the
/// channel's write-buffer high-water mark pauses parsing, and large READs are answered from the
/// device's fixed page pool).
///
/// When the budget is spent:
/// - a connection holding more than `reserve` bytes of unparsed input stops reading (a stalled or
///   slow WRITE waits here, its socket buffer fills, the client's sends block);
/// - a connection with requests in flight parses no more until they complete;
/// - a connection with at most `reserve` bytes of input and nothing in flight goes on, so a small
///   request always gets its answer and the budget cannot deadlock the server.
/// So the server holds at most `limit` plus, per connection, `reserve` and one read.
///
/// Connections stopped by the budget register a wake-up; they are woken (on their own event
/// loops) as soon as the budget is no longer spent.
public final class ByteBudget: Sendable {
    /// 96 MiB: a maximum WRITE (64 MiB) and more at once (before #31 only 16 MiB of requests
    /// could be in flight). Past the limit each connection still holds what one read brought in
    /// (up to its socket buffer): 256 connections each stalled in a 64 MiB WRITE made the server
    /// hold 96 + about 118 MiB (docs/performance.md).
    public static let defaultLimit = 96 << 20
    /// Unparsed input a connection may hold and still read while the budget is spent: small
    /// requests (a 4 KiB WRITE is 4,124 bytes) always get through. 256 stalled writers hold at
    /// most this and one read each (up to a socket buffer) beyond the limit.
    public static let reserve = 64 << 10

    public let limit: Int
    private let used = Atomic<Int>(0)
    /// Registered wake-ups, counted apart so that `give` looks at the lock only when there are some.
    private let waiting = Atomic<Int>(0)
    private let wakeups = Locked<[@Sendable () -> Void]>([])

    public init(limit: Int = ByteBudget.defaultLimit) { self.limit = limit }

    var exhausted: Bool { used.load(ordering: .sequentiallyConsistent) >= limit }
    /// Bytes held now (metrics, tests).
    public var held: Int { used.load(ordering: .relaxed) }

    func take(_ n: Int) { if n > 0 { used.add(n, ordering: .sequentiallyConsistent) } }

    func give(_ n: Int) {
        guard n > 0 else { return }
        let now = used.subtract(n, ordering: .sequentiallyConsistent).newValue
        if now < limit && waiting.load(ordering: .sequentiallyConsistent) > 0 { wakeAll() }
    }

    /// Calls `wake` once the budget is no longer spent: at once if it is not spent now. `wake`
    /// runs on whichever thread gave the bytes back; it should only hop to its event loop.
    func whenAvailable(_ wake: @escaping @Sendable () -> Void) {
        wakeups.withLock { $0.append(wake) }
        waiting.add(1, ordering: .sequentiallyConsistent)
        // A give that ran between the append and the count did not see this wake-up.
        if !exhausted { wakeAll() }
    }

    private func wakeAll() {
        let all = wakeups.withLock { w in
            defer { w.removeAll() }
            return w
        }
        guard !all.isEmpty else { return }
        waiting.subtract(all.count, ordering: .sequentiallyConsistent)
        for w in all { w() }
    }
}
