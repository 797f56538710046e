// X.509 distinguished names (a client certificate's subject), for per-export authorisation
// (`allow-dn:`). Pure values: the text form is parsed here, and the DER form is read from the
// certificate's bytes here too, so both sides of a comparison go through one canonical form.
//
// THE CANONICAL FORM (what `description` prints, and what is compared)
//   RFC 4514 order: the most specific RDN first, as nbdkit's nbdkit_peer_tls_dn, `certtool -i`
//   ("Subject:") and `openssl x509 -noout -subject -nameopt RFC2253` print it:
//   `CN=alice,O=Example,C=GB`. That is the reverse of the order in the certificate's DER.
//   - attribute types are upper-case short names (CN, C, L, ST, O, OU, STREET, DC, UID, EMAIL,
//     SERIALNUMBER, TITLE, SN, GN, DNQUALIFIER, PSEUDONYM) or the dotted OID for any other type;
//     on input they are case-insensitive, `2.5.4.3=` and `OID.2.5.4.3=` mean `CN=`, and
//     `E`/`EMAILADDRESS`, `SURNAME`, `GIVENNAME` are accepted for EMAIL, SN, GN;
//   - no spaces around `=`, `,` and `+` (input may have them; unescaped leading and trailing
//     spaces of a type or value are dropped);
//   - values are compared exactly, case included, after escapes (`\,`, `\+`, `\"`, `\\`, `\<`,
//     `\>`, `\;`, `\=`, `\#`, `\ `, and `\XX` hex bytes of UTF-8) are undone; printed with
//     RFC 4514's escapes (`,` `+` `"` `\` `<` `>` `;`, a leading `#` or space, a trailing space);
//   - the attributes of a multi-valued RDN (`CN=a+UID=b`) in sorted order, so their order does
//     not matter; the order of the RDNs does.
//   A certificate value that is not a string (RFC 4514's `#hex` form) is printed as `#` and the
//   hex of its BER; such names cannot be written in the configuration, so they never match.

/// One attribute of an RDN: its type (canonical short name or dotted OID) and its value.
public struct DNAttribute: Sendable, Hashable {
    public var type: String
    /// The string value, or for a non-string certificate value `#` and the hex of its BER.
    public var value: String
    /// `value` is the `#hex` of a non-string certificate value (never produced by parsing text).
    public var isBER: Bool

    public init(type: String, value: String, isBER: Bool = false) {
        self.type = type
        self.value = value
        self.isBER = isBER
    }

    /// `TYPE=value` with RFC 4514 escapes.
    var text: String { type + "=" + (isBER ? value : DistinguishedName.escape(value)) }
}

/// A distinguished name in canonical form (see the top of this file).
public struct DistinguishedName: Sendable, Hashable, CustomStringConvertible {
    /// The RDNs, most specific first (RFC 4514 order); each one's attributes sorted.
    public let rdns: [[DNAttribute]]

    public init(rdns: [[DNAttribute]]) {
        self.rdns = rdns.map { $0.sorted { $0.text < $1.text } }
    }

    /// The canonical text, e.g. `CN=alice,O=Example`.
    public var description: String {
        rdns.map { $0.map(\.text).joined(separator: "+") }.joined(separator: ",")
    }

    // MARK: attribute types

    /// OID → canonical short name.
    static let names: [String: String] = [
        "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
        "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
        "1.2.840.113549.1.9.1": "EMAIL", "2.5.4.5": "SERIALNUMBER", "2.5.4.12": "TITLE", "2.5.4.4": "SN",
        "2.5.4.42": "GN", "2.5.4.46": "DNQUALIFIER", "2.5.4.65": "PSEUDONYM",
    ]
    /// Upper-case spelling → canonical short name (every name, and the aliases).
    static let spellings: [String: String] = {
        var s: [String: String] = [:]
        for n in names.values { s[n] = n }
        s["E"] = "EMAIL"
        s["EMAILADDRESS"] = "EMAIL"
        s["SURNAME"] = "SN"
        s["GIVENNAME"] = "GN"
        return s
    }()

    /// A type as written → its canonical form, or nil.
    static func canonicalType(_ t: Substring) -> String? {
        var u = String(t).uppercased()
        if u.hasPrefix("OID.") { u.removeFirst(4) }
        if let n = spellings[u] { return n }
        let arcs = u.split(separator: ".", omittingEmptySubsequences: false)
        guard arcs.count >= 2,
            arcs.allSatisfy({
                !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } && !($0.count > 1 && $0.first == "0")
            })
        else { return nil }
        return names[u] ?? u
    }

    // MARK: escaping

    static func escape(_ v: String) -> String {
        var out = ""
        let chars = Array(v)
        for (i, c) in chars.enumerated() {
            switch c {
            case ",", "+", "\"", "\\", "<", ">", ";": out += "\\" + String(c)
            case "#" where i == 0: out += "\\#"
            case " " where i == 0 || i == chars.count - 1: out += "\\ "
            case "\u{0}": out += "\\00"
            default: out.append(c)
            }
        }
        return out
    }

    // MARK: text

    /// Parses the RFC 4514 text form (see the top of this file for what is accepted).
    public init(parsing text: String) throws(DistinguishedNameError) {
        func fail(_ k: DistinguishedNameError.Kind) -> DistinguishedNameError { DistinguishedNameError(k, text) }
        let chars = Array(text.unicodeScalars)
        var i = 0
        var rdns: [[DNAttribute]] = []
        var current: [DNAttribute] = []
        func skipSpaces() { while i < chars.count && chars[i] == " " { i += 1 } }
        while true {
            // The type, up to "=".
            skipSpaces()
            var type = ""
            while i < chars.count && chars[i] != "=" {
                if chars[i] == "," || chars[i] == "+" || chars[i] == ";" { throw fail(.missingEquals) }
                type.unicodeScalars.append(chars[i])
                i += 1
            }
            while type.hasSuffix(" ") { type.removeLast() }
            if i == chars.count {
                throw fail(
                    type.isEmpty ? (rdns.isEmpty && current.isEmpty ? .empty : .trailingSeparator) : .missingEquals)
            }
            guard !type.isEmpty else { throw fail(.missingType) }
            guard let canonical = Self.canonicalType(Substring(type)) else { throw fail(.unknownType(type)) }
            i += 1 // "="
            skipSpaces()
            if i < chars.count && chars[i] == "#" { throw fail(.hexValue(canonical)) }
            // The value, up to an unescaped "," or "+" (or the end).
            var bytes: [UInt8] = []
            var trailingSpaces = 0 // unescaped spaces at the end so far, dropped
            var separator: Unicode.Scalar?
            while i < chars.count {
                let c = chars[i]
                if c == "," || c == "+" {
                    separator = c
                    i += 1
                    break
                }
                if c == ";" { throw fail(.semicolon) }
                if c == "\\" {
                    guard i + 1 < chars.count else { throw fail(.badEscape) }
                    let n = chars[i + 1]
                    if ",+\"\\<>;=# ".unicodeScalars.contains(n) {
                        bytes += Array(String(n).utf8)
                        i += 2
                    } else if i + 2 < chars.count, let h = UInt8(String(n) + String(chars[i + 2]), radix: 16),
                        n.properties.isASCIIHexDigit, chars[i + 2].properties.isASCIIHexDigit
                    {
                        bytes.append(h)
                        i += 3
                    } else {
                        throw fail(.badEscape)
                    }
                    trailingSpaces = 0
                    continue
                }
                if c == "\"" { throw fail(.quote) }
                bytes += Array(String(c).utf8)
                trailingSpaces = c == " " ? trailingSpaces + 1 : 0
                i += 1
            }
            bytes.removeLast(trailingSpaces)
            guard let value = Self.utf8(bytes[...]) else { throw fail(.badEscape) }
            current.append(DNAttribute(type: canonical, value: value))
            if separator == "+" { continue }
            rdns.append(current)
            current = []
            if separator == nil { break }
        }
        for rdn in rdns {
            if Set(rdn.map(\.type)).count != rdn.count { throw fail(.repeatedType) }
        }
        self.init(rdns: rdns)
    }

    // MARK: DER

    /// The subject of a DER-encoded X.509 certificate (RFC 5280: Certificate → tbsCertificate →
    /// [version], serialNumber, signature, issuer, validity, subject).
    public init(certificateDER der: [UInt8]) throws(DistinguishedNameError) {
        var top = DER(der[...])
        guard let cert = top.next(tag: 0x30) else { throw DistinguishedNameError(.badCertificate, "certificate") }
        var certBody = DER(cert)
        guard let tbs = certBody.next(tag: 0x30) else { throw DistinguishedNameError(.badCertificate, "certificate") }
        var t = DER(tbs)
        if t.peekTag == 0xa0 { _ = t.next(tag: 0xa0) } // [0] EXPLICIT version
        guard t.next(tag: 0x02) != nil, t.next(tag: 0x30) != nil, t.next(tag: 0x30) != nil, t.next(tag: 0x30) != nil,
            let subject = t.nextTLV(tag: 0x30)
        else {
            throw DistinguishedNameError(.badCertificate, "certificate")
        }
        try self.init(nameDER: Array(subject))
    }

    /// A DER-encoded Name (SEQUENCE OF SET OF AttributeTypeAndValue).
    public init(nameDER der: [UInt8]) throws(DistinguishedNameError) {
        let bad = DistinguishedNameError(.badCertificate, "certificate")
        var top = DER(der[...])
        guard let seq = top.next(tag: 0x30), top.atEnd else { throw bad }
        var rdnsDER = DER(seq)
        var rdns: [[DNAttribute]] = []
        while !rdnsDER.atEnd {
            guard let set = rdnsDER.next(tag: 0x31) else { throw bad }
            var avas = DER(set)
            var rdn: [DNAttribute] = []
            while !avas.atEnd {
                guard let ava = avas.next(tag: 0x30) else { throw bad }
                var a = DER(ava)
                guard let oidBytes = a.next(tag: 0x06), let oid = Self.oid(oidBytes), let tag = a.peekTag,
                    let valueTLV = a.nextTLV(tag: tag), a.atEnd
                else { throw bad }
                let type = Self.names[oid] ?? oid
                var v = DER(valueTLV)
                let content = v.next(tag: tag)!
                if let s = Self.string(tag: tag, content) {
                    rdn.append(DNAttribute(type: type, value: s))
                } else {
                    let hex = valueTLV.map { h in
                        let s = String(h, radix: 16)
                        return s.count == 1 ? "0" + s : s
                    }.joined()
                    rdn.append(DNAttribute(type: type, value: "#" + hex, isBER: true))
                }
            }
            guard !rdn.isEmpty else { throw bad }
            rdns.append(rdn)
        }
        self.init(rdns: rdns.reversed()) // RFC 4514: the last RDN first
    }

    static func oid(_ b: ArraySlice<UInt8>) -> String? {
        guard !b.isEmpty else { return nil }
        var arcs: [UInt64] = []
        var v: UInt64 = 0
        for x in b {
            guard v >> 56 == 0 else { return nil }
            v = v << 7 | UInt64(x & 0x7f)
            if x & 0x80 == 0 {
                arcs.append(v)
                v = 0
            }
        }
        guard b.last! & 0x80 == 0 else { return nil }
        let first = arcs.removeFirst()
        let head: [UInt64] = first < 80 ? [first / 40, first % 40] : [2, first - 80]
        return (head + arcs).map(String.init).joined(separator: ".")
    }

    /// Valid UTF-8 only (no replacement characters).
    static func utf8(_ b: ArraySlice<UInt8>) -> String? {
        let s = String(decoding: b, as: UTF8.self)
        return s.utf8.elementsEqual(b) ? s : nil
    }

    /// The directory string types; nil for anything else (kept as `#hex`).
    static func string(tag: UInt8, _ c: ArraySlice<UInt8>) -> String? {
        switch tag {
        case 0x0c: return utf8(c) // UTF8String
        case 0x12, 0x13, 0x16, 0x1a: // Numeric, Printable, IA5, Visible
            return c.allSatisfy({ $0 < 0x80 }) ? String(decoding: c, as: UTF8.self) : nil
        case 0x14: // TeletexString, read as Latin-1 (as OpenSSL does)
            return String(String.UnicodeScalarView(c.map { Unicode.Scalar($0) }))
        case 0x1e: // BMPString, UTF-16BE
            guard c.count % 2 == 0 else { return nil }
            let units = stride(from: c.startIndex, to: c.endIndex, by: 2).map { UInt16(c[$0]) << 8 | UInt16(c[$0 + 1]) }
            let str = String(decoding: units, as: UTF16.self)
            return Array(str.utf16) == units ? str : nil
        case 0x1c: // UniversalString, UTF-32BE
            guard c.count % 4 == 0 else { return nil }
            var s = String.UnicodeScalarView()
            for j in stride(from: c.startIndex, to: c.endIndex, by: 4) {
                let u = UInt32(c[j]) << 24 | UInt32(c[j + 1]) << 16 | UInt32(c[j + 2]) << 8 | UInt32(c[j + 3])
                guard let sc = Unicode.Scalar(u) else { return nil }
                s.append(sc)
            }
            return String(s)
        default: return nil
        }
    }
}

/// A minimal DER reader: single-byte tags, definite lengths.
struct DER {
    var rest: ArraySlice<UInt8>
    init(_ b: ArraySlice<UInt8>) { rest = b }
    var atEnd: Bool { rest.isEmpty }
    var peekTag: UInt8? { rest.first }

    /// The next element if it has this tag: its whole encoding (tag, length, content).
    mutating func nextTLV(tag: UInt8) -> ArraySlice<UInt8>? {
        guard let (start, end) = header(tag: tag) else { return nil }
        _ = start
        let tlv = rest[rest.startIndex..<end]
        rest = rest[end...]
        return tlv
    }

    /// The next element if it has this tag: its content.
    mutating func next(tag: UInt8) -> ArraySlice<UInt8>? {
        guard let (start, end) = header(tag: tag) else { return nil }
        let content = rest[start..<end]
        rest = rest[end...]
        return content
    }

    private func header(tag: UInt8) -> (Int, Int)? {
        var i = rest.startIndex
        guard i < rest.endIndex, rest[i] == tag, tag & 0x1f != 0x1f else { return nil }
        i += 1
        guard i < rest.endIndex else { return nil }
        var len = Int(rest[i])
        i += 1
        if len & 0x80 != 0 {
            let n = len & 0x7f
            guard (1...4).contains(n), rest.endIndex - i >= n else { return nil }
            len = 0
            for _ in 0..<n {
                len = len << 8 | Int(rest[i])
                i += 1
            }
        }
        guard rest.endIndex - i >= len else { return nil }
        return (i, i + len)
    }
}

public struct DistinguishedNameError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case empty, missingEquals, missingType
        case unknownType(String)
        case hexValue(String)
        case badEscape
        case semicolon, quote, trailingSeparator, repeatedType, badCertificate
    }
    public var kind: Kind
    /// The text as given.
    public var text: String

    public init(_ kind: Kind, _ text: String) {
        self.kind = kind
        self.text = text
    }

    public var description: String { problem + "; " + fix }

    public var problem: String {
        let q = "\"" + text + "\""
        switch kind {
        case .empty: return "an empty distinguished name"
        case .missingEquals: return "\(q) has an attribute without \"=\""
        case .missingType: return "\(q) has a value without an attribute type"
        case .unknownType(let t): return "\(q): \"\(t)\" is not an attribute type virtnbd knows"
        case .hexValue(let t): return "\(q): the \(t) value is in #hex (BER) form"
        case .badEscape:
            return
                "\(q) has a bad escape (a \\ must be followed by one of ,+\"\\<>;=# or space, or two hex digits of UTF-8)"
        case .semicolon: return "\(q) has an unescaped \";\""
        case .quote: return "\(q) has an unescaped quote"
        case .trailingSeparator: return "\(q) ends with a separator"
        case .repeatedType: return "\(q) repeats an attribute type within one RDN"
        case .badCertificate: return "the client certificate's subject cannot be decoded"
        }
    }

    public var fix: String {
        let form =
            "write it as certtool -i or openssl x509 -noout -subject -nameopt RFC2253 prints it, e.g. CN=alice,O=Example"
        switch kind {
        case .unknownType:
            return
                "use CN, C, L, ST, O, OU, STREET, DC, UID, EMAIL, SERIALNUMBER, TITLE, SN, GN, DNQUALIFIER, PSEUDONYM or a dotted OID (2.5.4.3)"
        case .hexValue: return "write the value as text"
        case .semicolon: return "separate RDNs with \",\" (RFC 4514), or escape it as \\;"
        case .quote: return "escape it as \\\" (quoted values are not supported)"
        case .badCertificate: return "the client needs a well-formed X.509 certificate"
        default: return form
        }
    }
}
