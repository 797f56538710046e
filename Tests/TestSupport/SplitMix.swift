#if canImport(Glibc)
    import Glibc
#endif

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
        var out = [UInt8]()
        out.reserveCapacity(n + 8)
        while out.count < n {
            let v = next()
            for s in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(s)))) }
        }
        return Array(out.prefix(n))
    }
}

/// The seed of a random test: `VIRTNBD_TEST_SEED` from the environment (to replay a failure),
/// else a fixed seed derived from the test's name (FNV-1a, the same in every process, unlike
/// `String.hashValue`). The seed is printed, so a failing run's log says how to replay it.
public enum TestSeed {
    public static func seed(_ name: String) -> UInt64 {
        let seed: UInt64
        if let s = ProcessInfoEnvironment.value("VIRTNBD_TEST_SEED"),
            let v = s.hasPrefix("0x") ? UInt64(s.dropFirst(2), radix: 16) : UInt64(s)
        {
            seed = v
        } else {
            seed = name.utf8.reduce(0xcbf2_9ce4_8422_2325 as UInt64) { ($0 ^ UInt64($1)) &* 0x0000_0100_0000_01B3 }
        }
        print("random test \(name): seed=\(seed) (replay: VIRTNBD_TEST_SEED=\(seed))")
        return seed
    }

    /// A generator seeded for `name`.
    public static func generator(_ name: String) -> SplitMix { SplitMix(seed: seed(name)) }
}

/// getenv without Foundation (TestSupport has no dependencies).
enum ProcessInfoEnvironment {
    static func value(_ key: String) -> String? {
        guard let p = getenv(key) else { return nil }
        return String(cString: p)
    }
}
