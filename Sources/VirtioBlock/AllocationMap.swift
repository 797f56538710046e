import Virtio

/// What the server knows about a range of the export, at 4 KiB granularity. Only ranges the
/// server itself made or opened as holes/zeroes are recorded; everything else is `.data`.
public enum Allocation: UInt8, Sendable, Equatable {
    /// Allocated, contents unknown (the default).
    case data = 0
    /// Deallocated (trimmed) but the device does not promise zeroes.
    case hole = 1
    /// Reads as zero, still allocated (write-zeroes with NO_HOLE).
    case zero = 2
    /// Deallocated and reads as zero (never-written RAM, a file's holes, trimmed RAM/file blocks).
    case holeZero = 3

    /// NBD base:allocation flags: HOLE bit 0, ZERO bit 1.
    public var baseAllocationFlags: UInt32 { UInt32(rawValue) }
    public var readsAsZero: Bool { self == .zero || self == .holeZero }
}

/// A compact map from byte ranges to `Allocation`: a sorted array of disjoint non-data runs.
/// A fresh 1 TiB RAM export is one entry. All offsets are multiples of 4 KiB except `size`, the
/// export's exact end: ranges given past it are cut there, so the last run ends at `size`.
public final class AllocationMap: Sendable {
    public struct Run: Sendable, Equatable {
        public var start: UInt64
        public var end: UInt64
        public var state: Allocation
        public init(start: UInt64, end: UInt64, state: Allocation) {
            self.start = start
            self.end = end
            self.state = state
        }
    }
    private let runs: Locked<[Run]>
    public let size: UInt64

    public init(size: UInt64, initial: Allocation = .data) {
        self.size = size
        runs = Locked(initial == .data || size == 0 ? [] : [Run(start: 0, end: size, state: initial)])
    }

    /// Sets [start, end) to `state` (up to `size`), merging with equal neighbours.
    public func set(_ start: UInt64, _ end: UInt64, _ state: Allocation) {
        let end = min(end, size)
        guard start < end else { return }
        runs.withLock { r in
            // Index of the first run that ends after `start`.
            var lo = 0
            var hi = r.count
            while lo < hi {
                let m = (lo + hi) / 2
                if r[m].end <= start { lo = m + 1 } else { hi = m }
            }
            // Nothing changes (the common case: writes over data): no array surgery.
            if state == .data
                ? (lo == r.count || r[lo].start >= end)
                : (lo < r.count && r[lo].start <= start && r[lo].end >= end && r[lo].state == state)
            {
                return
            }
            var replacement: [Run] = []
            var i = lo
            // Keep the part of an overlapping run before `start`.
            if i < r.count, r[i].start < start {
                replacement.append(Run(start: r[i].start, end: start, state: r[i].state))
            }
            var tail: Run?
            while i < r.count, r[i].start < end {
                if r[i].end > end { tail = Run(start: end, end: r[i].end, state: r[i].state) }
                i += 1
            }
            if state != .data { replacement.append(Run(start: start, end: end, state: state)) }
            if let t = tail { replacement.append(t) }
            r.replaceSubrange(lo..<i, with: replacement)
            // Merge adjacent runs with the same state around the edit.
            var k = max(0, lo - 1)
            while k + 1 < r.count && k <= lo + replacement.count {
                if r[k].end == r[k + 1].start && r[k].state == r[k + 1].state {
                    r[k].end = r[k + 1].end
                    r.remove(at: k + 1)
                } else {
                    k += 1
                }
            }
        }
    }

    /// Whether all of [start, end) is plain data (the common case), without building extents.
    public func isAllData(_ start: UInt64, _ end: UInt64) -> Bool {
        runs.withLock { r in
            if r.isEmpty { return true }
            var lo = 0
            var hi = r.count
            while lo < hi {
                let m = (lo + hi) / 2
                if r[m].end <= start { lo = m + 1 } else { hi = m }
            }
            return lo == r.count || r[lo].start >= end
        }
    }

    /// The extents covering [start, end) (up to `size`), in order, with data gaps filled in.
    public func extents(_ start: UInt64, _ end: UInt64) -> [Run] {
        let end = min(end, size)
        guard start < end else { return [] }
        return runs.withLock { r in
            var lo = 0
            var hi = r.count
            while lo < hi {
                let m = (lo + hi) / 2
                if r[m].end <= start { lo = m + 1 } else { hi = m }
            }
            var out: [Run] = []
            var at = start
            var i = lo
            while at < end {
                if i < r.count, r[i].start <= at {
                    let e = min(r[i].end, end)
                    out.append(Run(start: at, end: e, state: r[i].state))
                    at = e
                    i += 1
                } else {
                    let e = min(i < r.count ? r[i].start : end, end)
                    out.append(Run(start: at, end: e, state: .data))
                    at = e
                }
            }
            return out
        }
    }

    public var runCount: Int { runs.withLock { $0.count } }
}
