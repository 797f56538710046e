// Parsing and comparing single values. Shared by the file parser and the flag merge.

/// Why a text is not a size, for `--size`, `--max-payload` and the file's `size:`.
public enum SizeProblem: Error, Sendable, Equatable, CustomStringConvertible {
    case empty, negative, fraction, zero, overflow
    case unit(String)

    /// What a size looks like, the fix every message ends with.
    public static let howTo =
        "use a whole number with K, M, G or T (binary units; KiB, MiB, GiB, TiB and KB… mean the same), e.g. 64M"

    public var description: String {
        switch self {
        case .empty: return "no number"
        case .negative: return "a size cannot be negative"
        case .fraction: return "sizes are whole numbers, e.g. 1536K rather than 1.5M"
        case .zero: return "a size must be more than 0"
        case .overflow: return "larger than 16 EiB"
        case .unit(let u): return "\"\(u)\" is not a unit"
        }
    }
}

/// Sizes as the command line and the configuration file write them.
public enum ByteSizeText {
    /// 512, 64K, 64M, 1G, 2T, optionally followed by B or iB (binary units either way).
    public static func parse(_ text: String) -> Result<UInt64, SizeProblem> {
        var s = Substring(text)
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        if s.hasPrefix("-") { return .failure(.negative) }
        let digits = s.prefix { $0.isASCII && $0.isNumber }
        let written = s.dropFirst(digits.count)
        if written.hasPrefix(".") || written.hasPrefix(",") { return .failure(.fraction) }
        guard !digits.isEmpty else { return .failure(.empty) }
        let units: [String: UInt64] = ["": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var unit = written.uppercased()
        if unit.count == 3, unit.hasSuffix("IB") {
            unit.removeLast(2)
        } else if unit.count == 2, unit.hasSuffix("B") {
            unit.removeLast()
        }
        guard let mult = units[unit], unit != "B" || written.count == 1 else { return .failure(.unit(String(written))) }
        guard let n = UInt64(digits) else { return .failure(.overflow) }
        let (v, overflow) = n.multipliedReportingOverflow(by: mult)
        if overflow { return .failure(.overflow) }
        if v == 0 { return .failure(.zero) }
        return .success(v)
    }
}

enum Values {
    /// A size as `--size` takes it; nil when it is not one (see `ByteSizeText`).
    static func size(_ text: String) -> UInt64? {
        if case .success(let v) = ByteSizeText.parse(text) { return v }
        return nil
    }

    enum HostPortProblem: Error { case noPort, badPort, unbracketedIPv6, emptyHost, spaces }

    /// `host:port`, `[v6]:port`. The port is required and 1-65535.
    static func hostPort(_ text: String) -> Result<(host: String, port: Int), HostPortProblem> {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return .failure(.unbracketedIPv6) }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return .failure(.noPort) }
            portText = rest.dropFirst()
        } else {
            let colons = text.filter { $0 == ":" }.count
            if colons > 1 { return .failure(.unbracketedIPv6) }
            guard colons == 1, let c = text.firstIndex(of: ":") else { return .failure(.noPort) }
            host = text[..<c]
            portText = text[text.index(after: c)...]
        }
        guard !host.isEmpty else { return .failure(.emptyHost) }
        guard !host.contains(where: \.isWhitespace) else { return .failure(.spaces) }
        guard !portText.isEmpty, portText.allSatisfy({ $0.isASCII && $0.isNumber }), let p = Int(portText),
            (1...65535).contains(p)
        else { return .failure(.badPort) }
        return .success((String(host).lowercased(), p))
    }

    /// `0000:00:05.0` or `00:05.0` (domain 0000 assumed), as VFIOTransport; returns the full form.
    static func pciAddress(_ a: String) -> String? {
        let s = a.lowercased()
        let full = s.split(separator: ":", omittingEmptySubsequences: false).count == 2 ? "0000:" + s : s
        let parts = full.split(separator: ":", omittingEmptySubsequences: false)
        let hex = { (p: Substring, n: Int) in p.count == n && p.allSatisfy(\.isHexDigit) }
        guard parts.count == 3, hex(parts[0], 4), hex(parts[1], 2) else { return nil }
        let df = parts[2].split(separator: ".", omittingEmptySubsequences: false)
        guard df.count == 2, hex(df[0], 2), let d = Int(df[0], radix: 16), d <= 0x1f,
            df[1].count == 1, let f = Int(df[1]), f <= 7
        else { return nil }
        return full
    }

    /// `POOL/IMAGE[@CONF]` (what follows `rbd:` in `--device`): a pool and an image name, neither
    /// empty, the image without `/` or `@`; CONF, if there, a ceph.conf path. Nil when malformed.
    static func rbdImage(_ s: String) -> (pool: String, image: String, conf: String?)? {
        let (target, conf): (Substring, String?)
        if let at = s.firstIndex(of: "@") {
            target = s[..<at]
            conf = String(s[s.index(after: at)...])
            if conf?.isEmpty ?? true { return nil }
        } else {
            (target, conf) = (Substring(s), nil)
        }
        let parts = target.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, rbdName(parts[0]), rbdName(parts[1]) else { return nil }
        return (String(parts[0]), String(parts[1]), conf)
    }

    /// A pool or image name: not empty, no `/`, `@` or control characters.
    static func rbdName(_ s: Substring) -> Bool {
        !s.isEmpty && !s.contains { $0 == "/" || $0 == "@" || $0.isNewline || ($0.asciiValue ?? 32) < 32 }
    }

    static func isPowerOfTwoQueueSize(_ n: Int) -> Bool { n > 0 && n <= 32768 && n & (n - 1) == 0 }

    /// Why a virtqueue cannot have `n` entries: split rings (the default) need a power of two
    /// from 1 to 32768, packed rings any size from 2 to 32768 (as `DriverOptions.validate`).
    static func queueSizeProblem(_ n: Int, packed: Bool) -> String? {
        if packed { return (2...32768).contains(n) ? nil : "is not from 2 to 32768 (a packed ring's sizes)" }
        return isPowerOfTwoQueueSize(n)
            ? nil : "is not a power of two from 1 to 32768, which a split ring (the default) needs"
    }

    /// The power of two nearest `n` within 1...32768 (for a suggestion).
    static func nearestPowerOfTwo(_ n: Int) -> Int {
        var p = 1
        while p < 32768 && p * 2 <= max(n, 1) { p *= 2 }
        return p < 32768 && n - p > p * 2 - n ? p * 2 : p
    }

    /// Collapses `//` and `/./` so two spellings of one socket path compare equal.
    static func normalisePath(_ p: String) -> String {
        let absolute = p.hasPrefix("/")
        let parts = p.split(separator: "/").filter { $0 != "." }
        return (absolute ? "/" : "") + parts.joined(separator: "/")
    }

    /// Whether two listeners cannot both be bound. A wildcard (0.0.0.0) takes the port on every
    /// IPv4 address, and `::` on every address (Linux's default dual stack, bindv6only=0).
    static func collide(_ a: Listener, _ b: Listener) -> Bool {
        switch (a, b) {
        case (.unix(let p), .unix(let q)): return normalisePath(p) == normalisePath(q)
        case (.tcp(let h, let p), .tcp(let k, let q)):
            guard p == q else { return false }
            if h == k || h == "::" || k == "::" { return true }
            let v6 = { (x: String) in x.contains(":") }
            return (h == "0.0.0.0" && !v6(k)) || (k == "0.0.0.0" && !v6(h))
        default: return false
        }
    }

    /// Resolves a relative path against the configuration file's directory.
    static func resolve(_ path: String, against base: String?) -> String {
        guard let base, !path.hasPrefix("/") else { return path }
        return base.hasSuffix("/") ? base + path : base + "/" + path
    }

    /// The directory part of a path, or nil for a bare file name.
    static func directory(of path: String) -> String? {
        guard let slash = path.lastIndex(of: "/") else { return nil }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a)
        let b = Array(b)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var prev = Array(0...b.count)
        for i in 1...a.count {
            var cur = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            prev = cur
        }
        return prev[b.count]
    }

    /// "did you mean \"size\"?" for a near miss, else the list of known keys.
    static func hint(for key: String, known: [String]) -> String {
        let best = known.map { ($0, editDistance(key.lowercased(), $0)) }.min { $0.1 < $1.1 }
        if let (k, d) = best, d <= max(2, k.count / 3) { return "did you mean \"\(k)\"?" }
        return "known keys here: " + known.joined(separator: ", ")
    }

    static func quoted(_ s: String) -> String { "\"" + s + "\"" }
}
