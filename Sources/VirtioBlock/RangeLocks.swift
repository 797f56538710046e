import Virtio

/// Byte-range locks over 4 KiB blocks, so that overlapping requests in flight never tear each
/// other: a read-modify-write holds its blocks exclusively from the read until the write is done.
/// Readers share. Waiters are served in arrival order (no starvation).
public final class RangeLocks: Sendable {
    public typealias Grant = @Sendable (_ token: Int) -> Void
    private struct Holder {
        var token: Int
        var lo: UInt64
        var hi: UInt64
        var exclusive: Bool
    }
    private struct Waiter {
        var holder: Holder
        var grant: Grant
    }
    private struct State {
        var active: [Holder] = []
        var waiting: [Waiter] = []
        var next = 0
    }
    private let state = Locked(State())

    public init() {}

    private static func conflicts(_ a: Holder, _ b: Holder) -> Bool {
        a.lo < b.hi && b.lo < a.hi && (a.exclusive || b.exclusive)
    }

    /// Takes [lo, hi) and returns its token if nothing holds or waits for an overlapping range
    /// (the common case); nil otherwise, and then the caller queues with `acquire`. Callers use it
    /// first so that an uncontended request needs no grant closure.
    public func tryAcquire(_ lo: UInt64, _ hi: UInt64, exclusive: Bool) -> Int? {
        state.withLock { s in
            let h = Holder(token: s.next + 1, lo: lo, hi: hi, exclusive: exclusive)
            guard
                !s.active.contains(where: { Self.conflicts($0, h) })
                    && !s.waiting.contains(where: { Self.conflicts($0.holder, h) })
            else { return nil }
            s.next += 1
            s.active.append(h)
            return h.token
        }
    }

    /// Calls `grant` (now, or later from the releasing thread) once [lo, hi) is held.
    public func acquire(_ lo: UInt64, _ hi: UInt64, exclusive: Bool, _ grant: @escaping Grant) {
        let go: Int? = state.withLock { s in
            s.next += 1
            let h = Holder(token: s.next, lo: lo, hi: hi, exclusive: exclusive)
            if !s.active.contains(where: { Self.conflicts($0, h) })
                && !s.waiting.contains(where: { Self.conflicts($0.holder, h) })
            {
                s.active.append(h)
                return h.token
            }
            s.waiting.append(Waiter(holder: h, grant: grant))
            return nil
        }
        if let t = go { grant(t) }
    }

    public func release(_ token: Int) {
        let granted: [(Grant, Int)] = state.withLock { s in
            // The order of `active` does not matter: swap the holder out instead of shifting.
            if let i = s.active.firstIndex(where: { $0.token == token }) {
                s.active.swapAt(i, s.active.count - 1)
                s.active.removeLast()
            }
            if s.waiting.isEmpty { return [] }
            var out: [(Grant, Int)] = []
            var i = 0
            while i < s.waiting.count {
                let w = s.waiting[i]
                let blockedByActive = s.active.contains { Self.conflicts($0, w.holder) }
                let blockedByEarlier = s.waiting[..<i].contains { Self.conflicts($0.holder, w.holder) }
                if !blockedByActive && !blockedByEarlier {
                    s.active.append(w.holder)
                    out.append((w.grant, w.holder.token))
                    s.waiting.remove(at: i)
                } else {
                    i += 1
                }
            }
            return out
        }
        for (g, t) in granted { g(t) }
    }

    public var heldCount: Int { state.withLock { $0.active.count } }
}
