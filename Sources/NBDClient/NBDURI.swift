// NBD URIs as the NBD project's doc/uri.md and libnbd (nbd_connect_uri) write them:
//   nbd://[host][:port]/[export]            TCP, port 10809 by default
//   nbd+unix:///[export]?socket=PATH        Unix domain socket
// with `nbds` for TLS. The export name is the percent-decoded path after the first "/".
// Pure value, no I/O.

public struct NBDURI: Sendable, Equatable, CustomStringConvertible {
    public enum Transport: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public static let defaultPort = 10809

    public var transport: Transport
    public var exportName: String
    /// `nbds` / `nbds+unix`: the URI asks for TLS.
    public var tls: Bool
    /// The text the user gave, for messages.
    public var text: String

    public init(transport: Transport, exportName: String, tls: Bool = false) {
        self.transport = transport
        self.exportName = exportName
        self.tls = tls
        let enc = Self.percentEncode(exportName)
        switch transport {
        case .tcp(let h, let p): text = "nbd\(tls ? "s" : "")://\(h.contains(":") ? "[\(h)]" : h):\(p)/\(enc)"
        case .unix(let path):
            text = "nbd\(tls ? "s" : "")+unix:///\(enc)?socket=\(Self.percentEncode(path, keepSlash: true))"
        }
    }

    public var description: String { text }

    /// Whether `s` looks like an NBD URI at all (for telling a URI from a file name).
    public static func looksLikeURI(_ s: String) -> Bool {
        guard let r = s.firstRange(of: "://") else { return false }
        return s[..<r.lowerBound].lowercased().hasPrefix("nbd")
    }

    public init(parsing s: String) throws(NBDURIError) {
        guard let sep = s.firstRange(of: "://") else { throw .notAURI(s) }
        let scheme = s[..<sep.lowerBound].lowercased()
        let unix: Bool
        switch scheme {
        case "nbd", "nbds": unix = false
        case "nbd+unix", "nbds+unix": unix = true
        default: throw .unsupportedScheme(s, scheme: String(scheme))
        }
        let tls = scheme.hasPrefix("nbds")

        // authority / path ? query # fragment
        var rest = Substring(s[sep.upperBound...])
        if let h = rest.firstIndex(of: "#") { rest = rest[..<h] }
        var query = Substring("")
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        var authority = rest[..<slash]
        let path = rest[slash...]
        // user@ is ignored.
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }

        var params: [String: String] = [:]
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let k = Self.percentDecode(kv[0]), let v = Self.percentDecode(kv.count > 1 ? kv[1] : "") else {
                throw .badPercentEncoding(s)
            }
            params[k] = v
        }
        guard let export = Self.percentDecode(path.isEmpty ? "" : path.dropFirst()) else {
            throw .badPercentEncoding(s)
        }

        // Host and port: "[v6]:port", "host:port", "host".
        var host = Substring("")
        var portText: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw .badHost(s) }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw .badHost(s) }
                portText = after.dropFirst()
            }
        } else if let colon = authority.lastIndex(of: ":") {
            host = authority[..<colon]
            portText = authority[authority.index(after: colon)...]
        } else {
            host = authority
        }

        if unix {
            guard host.isEmpty || host == "localhost", portText == nil else { throw .hostWithUnixSocket(s) }
            guard let sock = params["socket"], !sock.isEmpty else { throw .missingSocket(s) }
            self.init(transport: .unix(path: sock), exportName: export, tls: tls)
        } else {
            if params["socket"] != nil { throw .socketWithTCP(s) }
            var port = Self.defaultPort
            if let p = portText, !p.isEmpty {
                guard let n = Int(p), (1...65535).contains(n) else { throw .badPort(s, port: String(p)) }
                port = n
            }
            let h = host.isEmpty ? "localhost" : Self.percentDecode(host) ?? String(host)
            self.init(transport: .tcp(host: h, port: port), exportName: export, tls: tls)
        }
        text = s
    }

    static func percentDecode<S: StringProtocol>(_ s: S) -> String? {
        var bytes: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let c = it.popFirst() {
            if c == UInt8(ascii: "%") {
                guard it.count >= 2, let hi = hexValue(it.removeFirst()), let lo = hexValue(it.removeFirst()) else {
                    return nil
                }
                bytes.append(hi << 4 | lo)
            } else {
                bytes.append(c)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    static func percentEncode(_ s: String, keepSlash: Bool = false) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(Unicode.Scalar(b))
            if (b < 0x80 && (c.isLetter || c.isNumber)) || "-._~".contains(c) || (keepSlash && c == "/") {
                out.append(c)
            } else {
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }
}

public enum NBDURIError: Error, Equatable, CustomStringConvertible {
    case notAURI(String)
    case unsupportedScheme(String, scheme: String)
    case badPercentEncoding(String)
    case badHost(String)
    case badPort(String, port: String)
    case hostWithUnixSocket(String)
    case missingSocket(String)
    case socketWithTCP(String)

    public var description: String {
        switch self {
        case .notAURI(let s):
            return "\"\(s)\" is not an NBD URI; write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        case .unsupportedScheme(let s, let scheme):
            return
                "\"\(s)\": the scheme \"\(scheme)\" is not supported; use nbd://, nbds://, nbd+unix:// or nbds+unix://"
        case .badPercentEncoding(let s):
            return
                "\"\(s)\" has a bad percent escape (% must be followed by two hex digits forming UTF-8); escape a literal % as %25"
        case .badHost(let s):
            return "\"\(s)\": bad host; write an IPv6 address in brackets, e.g. nbd://[::1]:10809/"
        case .badPort(let s, let port):
            return "\"\(s)\": \"\(port)\" is not a port number between 1 and 65535"
        case .hostWithUnixSocket(let s):
            return "\"\(s)\": an nbd+unix URI has no host or port; write nbd+unix:///EXPORT?socket=PATH"
        case .missingSocket(let s):
            return "\"\(s)\": an nbd+unix URI needs the socket path, e.g. nbd+unix:///?socket=/run/nbd.sock"
        case .socketWithTCP(let s):
            return
                "\"\(s)\": ?socket= belongs to nbd+unix:// URIs; use nbd+unix:///EXPORT?socket=PATH for a Unix socket"
        }
    }
}
