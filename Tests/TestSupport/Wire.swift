// Big-endian bytes for the tests that speak NBD on the wire (NBDProtocolTests, IntegrationTests).
// Written from doc/proto.md, not from the server's encoders: the tests compare the server
// against the spec, not against itself.

/// Big-endian byte writer.
public struct Wire {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) {
        for s in stride(from: 8, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt16(s))) }
    }
    public mutating func u32(_ v: UInt32) {
        for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) }
    }
    public mutating func u64(_ v: UInt64) {
        for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) }
    }
    public mutating func str(_ s: String) { bytes.append(contentsOf: Array(s.utf8)) }
    public mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
}

/// Big-endian byte reader: nil on short input, so a test fails instead of trapping.
public struct WireReader {
    public let bytes: [UInt8]
    public var pos = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var remaining: Int { bytes.count - pos }
    public mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, remaining >= n else { return nil }
        defer { pos += n }
        return Array(bytes[pos..<pos + n])
    }
    public mutating func uint(_ width: Int) -> UInt64? {
        guard let b = take(width) else { return nil }
        return b.reduce(0) { ($0 << 8) | UInt64($1) }
    }
    public mutating func u16() -> UInt16? { uint(2).map { UInt16($0) } }
    public mutating func u32() -> UInt32? { uint(4).map { UInt32($0) } }
    public mutating func u64() -> UInt64? { uint(8) }
}

/// A 32-byte extended request (extension branch, "Request message"): magic 0x21e41c71, u16 flags,
/// u16 type, u64 cookie, u64 offset, u64 length; then the payload, if any.
public func extendedRequest(
    flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64, payload: [UInt8] = []
) -> [UInt8] {
    var w = Wire()
    w.u32(0x21e4_1c71)
    w.u16(flags)
    w.u16(type)
    w.u64(cookie)
    w.u64(offset)
    w.u64(length)
    w.raw(payload)
    return w.bytes
}
