// One dirty bitmap as a value: bit i says whether bytes [i·g, (i+1)·g) of the export were
// written, trimmed or zeroed since the bitmap was created or last cleared (g = granularity).
// QEMU's `qemu:dirty-bitmap:NAME` meta context reports exactly this, flag bit 0 = dirty.

public struct DirtyBitmap: Sendable, Equatable {
    public var name: String
    /// Bytes per bit: a power of two from 4 KiB to 2 GiB (QEMU's default is 64 KiB).
    public let granularity: UInt64
    /// The export's size: the last chunk may be partial.
    public let size: UInt64
    /// A frozen bitmap no longer records writes (the epoch a checkpoint ended).
    public var frozen: Bool
    /// Little-endian bit order within each word: chunk i is bit i % 64 of words[i / 64].
    public internal(set) var words: [UInt64]

    public static let minimumGranularity: UInt64 = 4096
    public static let maximumGranularity: UInt64 = 1 << 31

    public init(name: String, granularity: UInt64, size: UInt64, frozen: Bool = false, words: [UInt64]? = nil) {
        precondition(granularity.nonzeroBitCount == 1, "granularity is a power of two")
        self.name = name
        self.granularity = granularity
        self.size = size
        self.frozen = frozen
        let n = Self.wordCount(size: size, granularity: granularity)
        self.words = words ?? Array(repeating: 0, count: n)
        precondition(self.words.count == n, "the words cover the export")
    }

    public var chunkCount: Int { Int((size + granularity - 1) / granularity) }

    static func wordCount(size: UInt64, granularity: UInt64) -> Int {
        (Int((size + granularity - 1) / granularity) + 63) / 64
    }

    /// Marks every chunk that [offset, offset+length) touches; returns the indices of the words
    /// that changed (empty when every chunk was dirty already).
    public mutating func mark(_ offset: UInt64, _ length: UInt64) -> [Int] {
        guard length > 0, offset < size else { return [] }
        let first = Int(offset / granularity)
        let last = Int((min(offset + length, size) - 1) / granularity)
        var changed: [Int] = []
        var w = first / 64
        while w <= last / 64 {
            let lo = w == first / 64 ? first % 64 : 0
            let hi = w == last / 64 ? last % 64 : 63
            let bits: UInt64 = hi - lo == 63 ? ~0 : ((1 << UInt64(hi - lo + 1)) - 1) << UInt64(lo)
            if words[w] & bits != bits {
                words[w] |= bits
                changed.append(w)
            }
            w += 1
        }
        return changed
    }

    /// Every chunk dirty (an unclean host stop, see `DirtyBitmaps`).
    public mutating func markAll() { _ = mark(0, size) }

    public mutating func clearAll() { words = Array(repeating: 0, count: words.count) }

    public func isDirty(chunk i: Int) -> Bool { words[i / 64] >> UInt64(i % 64) & 1 == 1 }

    /// The bytes in dirty chunks (the last chunk counts only up to the export's end).
    public var dirtyBytes: UInt64 {
        var n: UInt64 = 0
        for (w, word) in words.enumerated() where word != 0 {
            n += UInt64(word.nonzeroBitCount) * granularity
            let lastChunk = w * 64 + (64 - word.leadingZeroBitCount) - 1
            if lastChunk == chunkCount - 1 { n -= UInt64(chunkCount) * granularity - size }
        }
        return n
    }

    /// Runs of equal state over [start, end), clipped to the export: (start, end, dirty).
    /// Whole words of equal bits are skipped at once, so a clean terabyte is a few thousand steps.
    public func runs(_ start: UInt64, _ end: UInt64) -> [(start: UInt64, end: UInt64, dirty: Bool)] {
        let end = min(end, size)
        guard start < end else { return [] }
        var out: [(start: UInt64, end: UInt64, dirty: Bool)] = []
        var i = Int(start / granularity)
        let last = Int((end - 1) / granularity)
        while i <= last {
            let word = words[i / 64]
            let dirty = word >> UInt64(i % 64) & 1 == 1
            var next = i + 1
            if i % 64 == 0 && (word == 0 || word == ~0) {
                next = i + 64
            }
            let a = max(start, UInt64(i) * granularity)
            let b = min(end, UInt64(min(next, last + 1)) * granularity)
            if let l = out.last, l.dirty == dirty, l.end == a {
                out[out.count - 1].end = b
            } else {
                out.append((a, b, dirty))
            }
            i = next
        }
        return out
    }
}
