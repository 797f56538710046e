// Access control by client address: IPv4/IPv6 networks in CIDR notation and the `--allow` list.
// Pure values: no sockets, no libc address parsing (inet_pton) — every rule is explicit and tested.
//
// Every address is kept as 128 bits. An IPv4 address a.b.c.d is held as its IPv4-mapped IPv6
// form ::ffff:a.b.c.d, and an IPv4 network /N as that mapped network /(96+N). A dual-stack
// listener (`--listen ::`) reports IPv4 clients as ::ffff:a.b.c.d, so `127.0.0.0/8` matches a
// client whether it arrived as 127.0.0.1 or as ::ffff:127.0.0.1, and an IPv6 network matches
// exactly the addresses it contains (so `::/0` matches IPv4 clients as well).

/// A 128-bit IP address (IPv4 held as IPv4-mapped IPv6).
public struct IPAddress: Sendable, Hashable, CustomStringConvertible {
    /// The upper and lower 64 bits, network order (the first group is the top of `high`).
    public let high: UInt64
    public let low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// An IPv4 address from its 32 bits (the first octet is the top byte).
    public init(v4 bits: UInt32) { self.init(high: 0, low: 0xffff_0000_0000 | UInt64(bits)) }

    /// Parses `a.b.c.d` or any RFC 4291 IPv6 text form (`::1`, `fe80::1:2`, `::ffff:10.0.0.1`).
    /// Returns nil for anything else (brackets, zone ids, ports, leading zeros in IPv4 octets).
    public init?(_ text: String) {
        if let v4 = Self.parseV4(Substring(text)) {
            self.init(v4: v4)
        } else if let (h, l) = Self.parseV6(Substring(text)) {
            self.init(high: h, low: l)
        } else {
            return nil
        }
    }

    /// Whether this is an IPv4 address (::ffff:0:0/96).
    public var isV4: Bool { high == 0 && low >> 32 == 0xffff }

    public var description: String {
        if isV4 { return Self.formatV4(UInt32(truncatingIfNeeded: low)) } // also ::ffff:a.b.c.d
        return Self.formatV6(high: high, low: low)
    }

    // MARK: parsing

    /// Four decimal octets, 0-255, without leading zeros (as inet_pton: `010` is not 10 or 8).
    static func parseV4(_ s: Substring) -> UInt32? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for p in parts {
            guard (1...3).contains(p.count), p.allSatisfy({ $0.isASCII && $0.isNumber }),
                !(p.count > 1 && p.first == "0"), let o = UInt32(p), o <= 255
            else { return nil }
            v = v << 8 | o
        }
        return v
    }

    /// Eight 16-bit groups, one `::` standing for one or more zero groups, optionally ending in a
    /// dotted IPv4 address that fills the last two groups.
    static func parseV6(_ s: Substring) -> (UInt64, UInt64)? {
        guard s.contains(":"), s.allSatisfy({ $0.isASCII && ($0.isHexDigit || $0 == ":" || $0 == ".") }) else {
            return nil
        }
        func groups(_ part: Substring, allowV4Tail: Bool) -> [UInt16]? {
            if part.isEmpty { return [] }
            let fields = part.split(separator: ":", omittingEmptySubsequences: false)
            var out: [UInt16] = []
            for (i, f) in fields.enumerated() {
                if f.contains(".") {
                    guard allowV4Tail, i == fields.count - 1, let v4 = parseV4(f) else { return nil }
                    out += [UInt16(v4 >> 16), UInt16(v4 & 0xffff)]
                } else {
                    guard (1...4).contains(f.count), let g = UInt16(f, radix: 16) else { return nil }
                    out.append(g)
                }
            }
            return out
        }
        var all: [UInt16]
        if let range = s.firstRange(of: "::") {
            let head = s[..<range.lowerBound]
            let tail = s[range.upperBound...]
            guard !tail.contains("::"), let h = groups(head, allowV4Tail: false),
                let t = groups(tail, allowV4Tail: true),
                h.count + t.count <= 7
            else { return nil }
            all = h + Array(repeating: 0, count: 8 - h.count - t.count) + t
        } else {
            guard let g = groups(s, allowV4Tail: true), g.count == 8 else { return nil }
            all = g
        }
        let pack = { (g: ArraySlice<UInt16>) in g.reduce(UInt64(0)) { $0 << 16 | UInt64($1) } }
        return (pack(all[0..<4]), pack(all[4..<8]))
    }

    // MARK: formatting (RFC 5952: lower case, the longest run of two or more zero groups as ::)

    static func formatV4(_ v: UInt32) -> String {
        "\(v >> 24).\(v >> 16 & 0xff).\(v >> 8 & 0xff).\(v & 0xff)"
    }

    static func formatV6(high: UInt64, low: UInt64) -> String {
        if high == 0 && low >> 32 == 0xffff { return "::ffff:" + formatV4(UInt32(truncatingIfNeeded: low)) }
        let g = (0..<8).map { i in UInt16(truncatingIfNeeded: (i < 4 ? high : low) >> (48 - 16 * UInt64(i % 4))) }
        var best = (start: -1, count: 0)
        var i = 0
        while i < 8 {
            guard g[i] == 0 else {
                i += 1
                continue
            }
            var j = i
            while j < 8 && g[j] == 0 { j += 1 }
            if j - i > best.count { best = (i, j - i) }
            i = j
        }
        let hex = { (r: Range<Int>) in r.map { String(g[$0], radix: 16) }.joined(separator: ":") }
        guard best.count >= 2 else { return hex(0..<8) }
        return hex(0..<best.start) + "::" + hex((best.start + best.count)..<8)
    }
}

/// Why a `--allow` value (or an `allow:` entry) is not a network.
public struct IPNetworkError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case empty
        case badAddress
        case zoneID
        case badPrefix(maximum: Int)
        /// Bits below the prefix are set; `network` is what was probably meant.
        case hostBitsSet(network: String)
    }
    public var kind: Kind
    /// The text as given.
    public var text: String

    public init(_ kind: Kind, _ text: String) {
        self.kind = kind
        self.text = text
    }

    /// What is wrong, then what to write instead.
    public var description: String { problem + "; " + fix }

    /// What is wrong with the text.
    public var problem: String {
        let q = "\"" + text + "\""
        switch kind {
        case .empty: return "an empty network"
        case .badAddress: return "\(q) is not an IPv4 or IPv6 address"
        case .zoneID: return "\(q) has a zone id (%…)"
        case .badPrefix: return "\(q) has no valid prefix length"
        case .hostBitsSet: return "\(q) has bits set after the prefix"
        }
    }

    /// What to write instead.
    public var fix: String {
        switch kind {
        case .empty: return "write an address with a prefix length, e.g. 127.0.0.0/8 or ::1/128"
        case .badAddress: return "write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8 (no brackets, no port, no host names)"
        case .zoneID: return "zones are not supported, write the address without it"
        case .badPrefix(let max): return "after the / write a whole number from 0 to \(max)"
        case .hostBitsSet(let network):
            return "write the network \(network), or the single host with /\(network.contains(":") ? 128 : 32)"
        }
    }
}

/// An IPv4 or IPv6 network: an address and a prefix length (`10.0.0.0/8`, `::1/128`). A bare
/// address is the single host (/32 or /128). Bits after the prefix must be zero.
public struct IPNetwork: Sendable, Hashable, CustomStringConvertible {
    /// The network address (IPv4 as IPv4-mapped IPv6).
    public let address: IPAddress
    /// The prefix length as written: 0-32 for IPv4, 0-128 for IPv6.
    public let prefixLength: Int
    /// Whether it was written as IPv4 (then `prefixLength` counts IPv4 bits).
    public let isV4: Bool

    /// The prefix length over all 128 bits.
    var length128: Int { isV4 ? prefixLength + 96 : prefixLength }

    public init(parsing text: String) throws(IPNetworkError) {
        let s = text.trimmingWhitespace()
        guard !s.isEmpty else { throw IPNetworkError(.empty, text) }
        guard !s.contains("%") else { throw IPNetworkError(.zoneID, text) }
        let parts = s.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        let addressText = parts[0]
        let v4 = IPAddress.parseV4(addressText)
        let address: IPAddress
        if let v4 {
            address = IPAddress(v4: v4)
        } else if let (h, l) = IPAddress.parseV6(addressText) {
            address = IPAddress(high: h, low: l)
        } else {
            throw IPNetworkError(.badAddress, text)
        }
        let maximum = v4 != nil ? 32 : 128
        var prefix = maximum
        if parts.count == 2 {
            let p = parts[1]
            guard (1...3).contains(p.count), p.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(p), n <= maximum
            else {
                throw IPNetworkError(.badPrefix(maximum: maximum), text)
            }
            prefix = n
        }
        let candidate = IPNetwork(address: address, prefixLength: prefix, isV4: v4 != nil)
        guard candidate.masked(address) == address else {
            let network = IPNetwork(address: candidate.masked(address), prefixLength: prefix, isV4: v4 != nil)
            throw IPNetworkError(.hostBitsSet(network: network.description), text)
        }
        self = candidate
    }

    init(address: IPAddress, prefixLength: Int, isV4: Bool) {
        self.address = address
        self.prefixLength = prefixLength
        self.isV4 = isV4
    }

    /// The address with every bit after the prefix cleared.
    func masked(_ a: IPAddress) -> IPAddress {
        let n = length128
        let hiMask: UInt64 = n >= 64 ? ~0 : (n == 0 ? 0 : ~0 << UInt64(64 - n))
        let loMask: UInt64 = n <= 64 ? 0 : (n == 128 ? ~0 : ~0 << UInt64(128 - n))
        return IPAddress(high: a.high & hiMask, low: a.low & loMask)
    }

    public func contains(_ a: IPAddress) -> Bool { masked(a) == address }

    public var description: String {
        isV4
            ? "\(IPAddress.formatV4(UInt32(truncatingIfNeeded: address.low)))/\(prefixLength)"
            : "\(IPAddress.formatV6(high: address.high, low: address.low))/\(prefixLength)"
    }
}

/// The networks clients may connect from. Empty = everyone may.
public struct AccessList: Sendable, Hashable, CustomStringConvertible {
    public var networks: [IPNetwork]

    public init(_ networks: [IPNetwork] = []) { self.networks = networks }

    /// Parses each text (as `--allow`); the first bad one throws.
    public init(parsing texts: [String]) throws(IPNetworkError) {
        var out: [IPNetwork] = []
        for t in texts { out.append(try IPNetwork(parsing: t)) }
        self.init(out)
    }

    public var allowsEveryone: Bool { networks.isEmpty }

    public enum Decision: Sendable, Equatable {
        /// No list: every address may connect.
        case open
        /// Allowed by this network (the first that contains the address).
        case allowed(by: IPNetwork)
        /// In none of the networks.
        case refused
    }

    public func decide(_ a: IPAddress) -> Decision {
        if networks.isEmpty { return .open }
        return networks.first { $0.contains(a) }.map { .allowed(by: $0) } ?? .refused
    }

    /// `10.0.0.0/8, ::1/128`
    public var description: String {
        networks.isEmpty ? "everyone" : networks.map(\.description).joined(separator: ", ")
    }
}

extension String {
    func trimmingWhitespace() -> Substring {
        var s = Substring(self)
        while s.first?.isWhitespace == true { s.removeFirst() }
        while s.last?.isWhitespace == true { s.removeLast() }
        return s
    }
}
