/// SplitMix64: a small seeded generator shared by the test targets, so a failing test replays
/// the same inputs from its seed.
public struct SplitMix: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// `n` pseudo-random bytes.
    public mutating func bytes(_ n: Int) -> [UInt8] {
        var out = [UInt8](); out.reserveCapacity(n + 8)
        while out.count < n { let v = next(); for s in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(s)))) } }
        return Array(out.prefix(n))
    }
}
