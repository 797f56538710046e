// A lane's free I/O pages: a bitmap over the lane's consecutive range of arena pages.
//
// `take` hands out consecutive pages when a run of them is free (first fit), so a multi-page
// READ's data is one span of the arena's memfd, which the server sends with sendfile(2) instead
// of copying it into a reply buffer (`HeldPages`). Single pages come from the lowest free word,
// which keeps the small requests at the bottom of the range and the long runs free above them.
// When no run is free the pages are any free ones: the request still goes, as a scattered chain.

struct PagePool {
    /// The arena page number of bit 0.
    let first: Int32
    let capacity: Int
    /// Bit i of word w set: page first + 64·w + i is free. Bits past `capacity` stay clear.
    private var words: [UInt64]
    private(set) var count: Int
    /// A one-page list for every page, made once: a single-page request (every 4 KiB one) shares
    /// its page's list instead of allocating one (lists are values, never changed in place).
    private let singles: [[Int32]]

    /// Every page of [first, first + capacity) free.
    init(first: Int32, capacity: Int) {
        precondition(capacity >= 0)
        self.first = first
        self.capacity = capacity
        var w = [UInt64](repeating: ~0, count: capacity / 64)
        if capacity % 64 != 0 { w.append((UInt64(1) << UInt64(capacity % 64)) - 1) }
        words = w
        count = capacity
        singles = (0..<capacity).map { [first + Int32($0)] }
    }

    /// `n` free pages, consecutive and ascending when such a run is free; nil when fewer than `n` are free.
    mutating func take(_ n: Int) -> [Int32]? {
        guard n <= count else { return nil }
        if n == 1 {
            for w in words.indices where words[w] != 0 {
                let b = words[w].trailingZeroBitCount
                words[w] &= words[w] - 1
                count -= 1
                return singles[w * 64 + b]
            }
            preconditionFailure("PagePool count says a page is free but no bit is set")
        }
        let start = run(of: n) ?? -1
        var pages: [Int32] = []
        pages.reserveCapacity(n)
        if start >= 0 {
            for i in start..<(start + n) {
                words[i >> 6] &= ~(UInt64(1) << UInt64(i & 63))
                pages.append(first + Int32(i))
            }
        } else {
            // Fragmented: the lowest free pages, whatever they are.
            for w in words.indices where pages.count < n {
                while words[w] != 0 && pages.count < n {
                    let b = words[w].trailingZeroBitCount
                    words[w] &= words[w] - 1
                    pages.append(first + Int32(w * 64 + b))
                }
            }
        }
        count -= n
        return pages
    }

    /// Returns pages taken from this pool.
    mutating func give(_ pages: [Int32]) {
        for p in pages {
            let i = Int(p - first)
            precondition(i >= 0 && i < capacity, "page \(p) is not this pool's")
            let bit = UInt64(1) << UInt64(i & 63)
            precondition(words[i >> 6] & bit == 0, "page \(p) returned twice")
            words[i >> 6] |= bit
        }
        count += pages.count
    }

    /// The index of the first run of `n` free pages, or nil.
    private func run(of n: Int) -> Int? {
        var start = 0
        var length = 0
        for w in words.indices {
            let word = words[w]
            if word == ~0 {
                if length == 0 { start = w * 64 }
                length += 64
                if length >= n { return start }
                continue
            }
            if word == 0 {
                length = 0
                continue
            }
            var rest = word
            var b = 0
            while b < 64 {
                if rest & 1 == 1 {
                    if length == 0 { start = w * 64 + b }
                    length += 1
                    if length >= n { return start }
                    rest >>= 1
                    b += 1
                } else {
                    length = 0
                    // Skip the clear bits at once.
                    if rest == 0 { break }
                    let z = rest.trailingZeroBitCount
                    rest >>= UInt64(z)
                    b += z
                }
            }
        }
        return nil
    }
}
