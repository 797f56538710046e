// YAML → VirtNBDConfig, with every check located at the line of the offending key or value.
// Scalars are read as the text the operator wrote (no YAML 1.1 typing: `off` stays "off",
// `0000:00:05.0` stays a PCI address), then converted by virtnbd's own rules.
import AccessControl
import Foundation
import Yams

extension VirtNBDConfig {
    /// Reads and validates a configuration file. Relative paths inside it are taken relative to
    /// the file's own directory.
    public static func load(path: String) throws(ConfigError) -> VirtNBDConfig {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: path, isDirectory: &isDir) else {
            throw ConfigError(
                .unreadable, file: path, line: nil, keyPath: "", problem: "no such file",
                fix: "check the path given to --config (an example is Config/virtnbd.yaml)")
        }
        guard !isDir.boolValue, let data = fm.contents(atPath: path) else {
            throw ConfigError(
                .unreadable, file: path, line: nil, keyPath: "",
                problem: isDir.boolValue ? "is a directory" : "cannot be read",
                fix: "give --config a YAML file that virtnbd's user may read")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(
                .unreadable, file: path, line: nil, keyPath: "", problem: "is not UTF-8 text",
                fix: "save the file as UTF-8")
        }
        return try parse(text, file: path, baseDirectory: Values.directory(of: path))
    }

    /// Parses configuration text. `file` only names the source in messages; relative paths are
    /// resolved against `baseDirectory` (left relative when nil).
    public static func parse(_ text: String, file: String = "virtnbd.yaml", baseDirectory: String? = nil)
        throws(ConfigError) -> VirtNBDConfig
    {
        try ConfigParser(file: file, text: text, base: baseDirectory).parse()
    }
}

/// The keys each mapping accepts.
enum Keys {
    static let root = ["listen", "allow", "limits", "log", "metrics", "tls", "exports"]
    static let limits = [
        "max-connections", "handshake-timeout", "keepalive", "keepalive-idle", "keepalive-interval", "keepalive-count",
    ]
    static let log = ["level"]
    static let tls = ["policy", "certificates", "psk", "verify-peer"]
    static let export = [
        "name", "description", "device", "size", "path", "socket", "pci", "read-only", "tls", "queue-size",
        "max-payload", "allow-dn", "allow-psk", "snapshot", "snapshot-overlay", "bitmaps", "bitmap-granularity", "pool",
        "image", "conf",
    ]
    static let devices = ["ram", "file", "vhost-user", "vfio", "rbd", "simulated"]
    /// Device parameters and the devices that take them.
    static let deviceParameters: [String: [String]] = [
        "size": ["ram", "file"], "path": ["file"], "socket": ["vhost-user"], "pci": ["vfio"], "pool": ["rbd"],
        "image": ["rbd"], "conf": ["rbd"],
    ]
}

struct ConfigParser {
    let file: String
    let text: String
    let base: String?

    // MARK: - errors

    func error(_ kind: ConfigError.Kind, _ line: Int?, _ path: String, _ problem: String, _ fix: String) -> ConfigError
    {
        ConfigError(kind, file: file, line: line, keyPath: path, problem: problem, fix: fix)
    }

    func error(_ kind: ConfigError.Kind, _ node: Node?, _ path: String, _ problem: String, _ fix: String) -> ConfigError
    {
        error(kind, node?.mark?.line, path, problem, fix)
    }

    static func what(_ node: Node) -> String {
        switch node {
        case .scalar: return "a single value"
        case .mapping: return "a mapping (key: value lines)"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    static func child(_ path: String, _ key: String) -> String { path.isEmpty ? key : path + "." + key }

    // MARK: - structure

    struct Table {
        var node: Node
        var path: String
        var entries: [(key: String, keyNode: Node, value: Node)]
        subscript(key: String) -> Node? { entries.first { $0.key == key }?.value }
        func keyLine(_ key: String) -> Int? { entries.first { $0.key == key }?.keyNode.mark?.line }
        func path(_ key: String) -> String { ConfigParser.child(path, key) }
    }

    func table(_ node: Node, _ path: String, known: [String], example: String) throws(ConfigError) -> Table {
        guard case .mapping(let m) = node else {
            throw error(
                .wrongType, node, path, "expected a mapping (key: value lines), found \(Self.what(node))",
                "write it as \(example)")
        }
        var entries: [(key: String, keyNode: Node, value: Node)] = []
        for (k, v) in m {
            guard case .scalar(let ks) = k else {
                throw error(
                    .wrongType, k, path, "a key must be a plain word, found \(Self.what(k))",
                    "use one of: " + known.joined(separator: ", "))
            }
            guard known.contains(ks.string) else {
                throw error(
                    .unknownKey, k, Self.child(path, ks.string), "unknown key",
                    Values.hint(for: ks.string, known: known))
            }
            entries.append((ks.string, k, v))
        }
        return Table(node: node, path: path, entries: entries)
    }

    static func isNull(_ s: Node.Scalar) -> Bool {
        s.style == .plain && ["", "~", "null", "Null", "NULL"].contains(s.string)
    }

    /// The text of a scalar value; `fix` says what a good value looks like.
    func string(_ node: Node, _ path: String, fix: String) throws(ConfigError) -> String {
        guard case .scalar(let s) = node else {
            throw error(.wrongType, node, path, "expected a single value, found \(Self.what(node))", fix)
        }
        guard !Self.isNull(s) else { throw error(.missingValue, node, path, "no value", fix) }
        return s.string
    }

    func bool(_ node: Node, _ path: String) throws(ConfigError) -> Bool {
        let s = try string(node, path, fix: "write true or false")
        switch s {
        case "true", "True", "TRUE": return true
        case "false", "False", "FALSE": return false
        default: throw error(.badValue, node, path, "\(Values.quoted(s)) is not true or false", "write true or false")
        }
    }

    func int(_ node: Node, _ path: String, _ valid: ClosedRange<Int>, fix: String) throws(ConfigError) -> Int {
        let s = try string(node, path, fix: fix)
        guard s.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(s), valid.contains(n) else {
            throw error(
                .badValue, node, path,
                "\(Values.quoted(s)) is not a whole number from \(valid.lowerBound) to \(valid.upperBound)", fix)
        }
        return n
    }

    func oneOf(_ node: Node, _ path: String, _ choices: [String]) throws(ConfigError) -> String {
        let list = choices.dropLast().joined(separator: ", ") + " or " + choices.last!
        let s = try string(node, path, fix: "use " + list)
        guard choices.contains(s) else {
            let near = Values.hint(for: s, known: choices)
            throw error(
                .badValue, node, path, "\(Values.quoted(s)) is not one of \(choices.joined(separator: ", "))",
                near.hasPrefix("did") ? "use " + list + " (" + near + ")" : "use " + list)
        }
        return s
    }

    func size(_ node: Node, _ path: String) throws(ConfigError) -> UInt64 {
        let s = try string(node, path, fix: SizeProblem.howTo)
        switch ByteSizeText.parse(s) {
        case .success(let v): return v
        case .failure(let p):
            throw error(.badValue, node, path, "\(Values.quoted(s)) is not a size (\(p))", SizeProblem.howTo)
        }
    }

    func filePath(_ node: Node, _ path: String, example: String) throws(ConfigError) -> String {
        let s = try string(node, path, fix: "give a path, e.g. \(example)")
        guard !s.isEmpty else { throw error(.missingValue, node, path, "empty path", "give a path, e.g. \(example)") }
        return Values.resolve(s, against: base)
    }

    // MARK: - the document

    func compose() throws(ConfigError) -> Node? {
        do {
            return try Yams.compose(yaml: text)
        } catch let e as YamlError {
            throw translate(e)
        } catch {
            throw self.error(.syntax, nil as Int?, "", "cannot parse YAML (\(error))", "check the file's syntax")
        }
    }

    func translate(_ e: YamlError) -> ConfigError {
        func syntax(_ problem: String, _ mark: Mark, _ context: YamlError.Context?, at: Mark? = nil) -> ConfigError {
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            let line = (at ?? mark).line
            // libyaml reports a tab at the next token or the enclosing scalar; point at the tab itself.
            if let tab = lines.indices.first(where: {
                lines[$0].prefix(while: { $0 == " " || $0 == "\t" }).contains("\t")
            }), tab + 1 <= mark.line {
                return error(
                    .syntax, tab + 1, "", "a tab in the indentation", "indent with spaces only (YAML forbids tabs)")
            }
            let what = [context?.text, problem].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ": ")
            return error(
                .syntax, line, "", "YAML syntax: \(what)",
                "check the indentation, a missing \":\" or an unclosed quote on this line or the one before")
        }
        switch e {
        case .scanner(let c, let p, let m, _):
            // "while scanning a quoted scalar … end of stream": where the scalar began is the culprit.
            return syntax(p, m, c, at: c?.mark)
        case .parser(let c, let p, let m, _), .composer(let c, let p, let m, _):
            return syntax(p, m, c)
        case .duplicatedKeysInMapping(let dups, let context):
            let key = dups.first ?? "?"
            let first = context.mark.line
            let second = secondOccurrence(of: key, after: context.mark) ?? first
            return error(
                .duplicateKey, second, key, "appears twice in one mapping (first on line \(first))", "keep one of them")
        case .reader(let p, _, _, _):
            return error(.syntax, nil as Int?, "", "cannot read the text (\(p))", "save the file as UTF-8")
        default:
            return error(.syntax, nil as Int?, "", "cannot parse YAML (\(e))", "check the file's syntax")
        }
    }

    /// Yams reports the first of two equal keys; find the second at the same column of the same mapping.
    func secondOccurrence(of key: String, after mark: Mark) -> Int? {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let col = mark.column - 1
        guard mark.line >= 1, col >= 0 else { return nil }
        for i in mark.line..<lines.count {
            let l = Array(lines[i].unicodeScalars)
            guard let first = l.firstIndex(where: { $0 != " " }), l[first] != "#" else { continue }
            if first > col { continue } // deeper: a nested value
            guard first == col else { return nil } // shallower: the mapping has ended
            let rest = String(String.UnicodeScalarView(l[col...]))
            for q in ["", "\"", "'"] where rest.hasPrefix(q + key + q) {
                if rest.dropFirst(key.count + 2 * q.count).drop(while: { $0 == " " }).hasPrefix(":") { return i + 1 }
            }
        }
        return nil
    }

    // MARK: - sections

    func parse() throws(ConfigError) -> VirtNBDConfig {
        guard let root = try compose() else {
            throw error(
                .empty, nil as Int?, "", "holds no settings", "add at least an exports list (see Config/virtnbd.yaml)")
        }
        let top = try table(
            root, "", known: Keys.root,
            example: "listen:, limits:, log:, metrics:, tls: and exports: at the left margin")
        var cfg = VirtNBDConfig(source: file)
        var listenerLines: [Int?] = []

        if let node = top["listen"] {
            (cfg.listeners, listenerLines) = try listeners(node)
        }
        if let node = top["allow"] {
            cfg.allow = try allowList(node)
        }
        if let node = top["limits"] {
            try limits(node, into: &cfg.limits)
        }
        if let node = top["log"] {
            let t = try table(node, "log", known: Keys.log, example: "log: { level: info }")
            if let v = t["level"] {
                cfg.logLevel = LogLevel(rawValue: try oneOf(v, t.path("level"), LogLevel.allCases.map(\.rawValue)))!
            }
        }
        if let node = top["metrics"] {
            cfg.metrics = try metrics(node, listeners: cfg.listeners, lines: listenerLines)
        }
        var tlsLines = TLSLines()
        if let node = top["tls"] {
            tlsLines = try tls(node, into: &cfg.tls)
        }
        guard let exportsNode = top["exports"] else {
            throw error(
                .missingValue, nil as Int?, "exports", "missing: the file defines no export",
                "add an exports list, e.g. exports: [{ name: disk, device: ram, size: 64M }]")
        }
        var exportLines: [ExportLines] = []
        (cfg.exports, exportLines) = try exports(exportsNode)
        try checkCredentials(cfg, tlsLines, exportLines)
        return cfg
    }

    /// `limits:`: max-connections, handshake-timeout and keepalive.
    func limits(_ node: Node, into limits: inout VirtNBDConfig.Limits) throws(ConfigError) {
        let t = try table(
            node, "limits", known: Keys.limits, example: "limits: { max-connections: 16, handshake-timeout: 10 }")
        if let v = t["max-connections"] {
            limits.maxConnections = try int(
                v, t.path("max-connections"), 0...1_000_000,
                fix: "use 0 for no limit, or the most clients served at once")
        }
        if let v = t["handshake-timeout"] {
            limits.handshakeTimeout = try int(
                v, t.path("handshake-timeout"), 1...86400, fix: "give whole seconds, e.g. 10")
        }
        limits.keepalive = try keepalive(t)
    }

    /// The lines of the `tls:` keys, for errors found once the exports are read.
    struct TLSLines {
        var policy: Int?
        var certificates: Int?
        var psk: Int?
        var verifyPeer: Int?
    }

    /// `tls:`: policy, certificates or psk, verify-peer.
    func tls(_ node: Node, into tls: inout VirtNBDConfig.TLS) throws(ConfigError) -> TLSLines {
        var lines = TLSLines()
        let t = try table(
            node, "tls", known: Keys.tls, example: "tls: { policy: require, certificates: /etc/pki/virtnbd }")
        if let v = t["policy"] {
            tls.policy = TLSPolicy(
                rawValue: try oneOf(v, t.path("policy"), TLSPolicy.allCases.map(\.rawValue)))!
            lines.policy = v.mark?.line
        }
        if let v = t["certificates"] {
            tls.certificates = try filePath(v, t.path("certificates"), example: "/etc/pki/virtnbd")
            lines.certificates = v.mark?.line
        }
        if let v = t["psk"] {
            tls.psk = try filePath(v, t.path("psk"), example: "/etc/virtnbd/keys.psk")
            lines.psk = v.mark?.line
        }
        if let v = t["verify-peer"] {
            tls.verifyPeer = try bool(v, t.path("verify-peer"))
            lines.verifyPeer = v.mark?.line
        }
        if tls.certificates != nil && tls.psk != nil {
            throw error(
                .tlsCredentials, lines.psk, "tls.psk",
                "both tls.certificates (line \(lines.certificates ?? 0)) and tls.psk are set",
                "keep one of them: X.509 certificates or a PSK file")
        }
        return lines
    }

    /// TLS that the policy or some export asks for needs credentials; allow-lists need what
    /// identifies their clients.
    func checkCredentials(
        _ cfg: VirtNBDConfig, _ tlsLines: TLSLines, _ exportLines: [ExportLines]
    ) throws(ConfigError) {
        if cfg.tls.certificates == nil && cfg.tls.psk == nil {
            let fix =
                "set tls.certificates (a directory with server-cert.pem and server-key.pem) or tls.psk (a psktool key file)"
            if cfg.tls.policy != .off {
                throw error(
                    .tlsCredentials, tlsLines.policy, "tls.policy", "\(cfg.tls.policy.rawValue) needs TLS credentials",
                    fix)
            }
            if let i = cfg.exports.indices.first(where: { (cfg.exports[$0].tls ?? .off) != .off }) {
                throw error(
                    .tlsCredentials, exportLines[i].tls, "exports[\(i)].tls",
                    "\(cfg.exports[i].tls!.rawValue) needs TLS credentials", fix)
            }
        }
        if let p = cfg.authorisationProblem {
            let (line, key): (Int?, String)
            switch p {
            case .verifyPeerWithPSK, .verifyPeerWithoutCertificates, .verifyPeerWithoutTLS:
                (line, key) = (tlsLines.verifyPeer, "tls.verify-peer")
            case .allowDNWithoutVerifyPeer(let i): (line, key) = (exportLines[i].allowDN, "exports[\(i)].allow-dn")
            case .allowPSKWithoutPSK(let i): (line, key) = (exportLines[i].allowPSK, "exports[\(i)].allow-psk")
            }
            throw error(.tlsCredentials, line, key, p.problem, p.fix)
        }
    }

    /// The items of a list that must not be empty (`listen:`, `exports:`); with `scalarIsOne`, a
    /// single value stands for a list of one.
    func nonEmptyList(
        _ node: Node, _ key: String, of what: String, scalarIsOne: Bool, wrongTypeFix: String,
        emptyProblem: String = "an empty list", emptyFix: String
    ) throws(ConfigError) -> [Node] {
        let items: [Node]
        switch node {
        case .sequence(let s): items = Array(s)
        case .scalar where scalarIsOne: items = [node]
        default:
            throw error(.wrongType, node, key, "expected a list of \(what), found \(Self.what(node))", wrongTypeFix)
        }
        guard !items.isEmpty else { throw error(.missingValue, node, key, emptyProblem, emptyFix) }
        return items
    }

    func listeners(_ node: Node) throws(ConfigError) -> ([Listener], [Int?]) {
        let items = try nonEmptyList(
            node, "listen", of: "addresses", scalarIsOne: true,
            wrongTypeFix: "write listen: [127.0.0.1:10809, /run/virtnbd/nbd.sock]",
            emptyFix: "add an address such as 127.0.0.1:10809, or leave listen out for that default")
        var out: [Listener] = []
        var lines: [Int?] = []
        for (i, item) in items.enumerated() {
            let path = "listen[\(i)]"
            let l = try listener(item, path)
            for (j, other) in out.enumerated() where Values.collide(l, other) {
                throw error(
                    .listenerCollision, item, path, "\(l) collides with listen[\(j)] (\(other), line \(lines[j] ?? 0))",
                    "use another port or path, or remove one of them")
            }
            out.append(l)
            lines.append(item.mark?.line)
        }
        return (out, lines)
    }

    func listener(_ node: Node, _ path: String) throws(ConfigError) -> Listener {
        let fix = "write host:port (e.g. 127.0.0.1:10809 or [::1]:10809) or an absolute path for a Unix socket"
        let s = try string(node, path, fix: fix)
        if s.hasPrefix("/") {
            guard s.utf8.count <= 107 else {
                throw error(
                    .badValue, node, path,
                    "a Unix socket path of \(s.utf8.count) bytes is longer than the 107 the kernel allows",
                    "choose a shorter path, e.g. under /run")
            }
            return .unix(path: s)
        }
        return .tcp(host: try hostPort(s, node, path), port: try port(s, node, path))
    }

    /// `allow-dn:` / `allow-psk:`: a list of names, or one as a single value; each converted by `item`.
    func allowItems(
        _ node: Node, _ path: String, example: String,
        _ item: (String, Node, String) throws(ConfigError) -> String
    ) throws(ConfigError) -> [String] {
        let items = try nonEmptyList(
            node, path, of: "client names", scalarIsOne: true, wrongTypeFix: "write \(example)",
            emptyProblem: "an empty list would refuse every client",
            emptyFix: "list the clients allowed, e.g. \(example), or leave the key out to allow every client")
        var out: [String] = []
        for (i, n) in items.enumerated() {
            let p = "\(path)[\(i)]"
            let v = try item(try string(n, p, fix: "write \(example)"), n, p)
            if !out.contains(v) { out.append(v) }
        }
        return out
    }

    /// `allow: [10.0.0.0/8, ::1/128]` or one network as a single value.
    func allowList(_ node: Node) throws(ConfigError) -> AccessList {
        let example = "allow: [127.0.0.0/8, ::1/128]"
        let items = try nonEmptyList(
            node, "allow", of: "networks", scalarIsOne: true, wrongTypeFix: "write \(example)",
            emptyProblem: "an empty list would refuse every TCP client",
            emptyFix: "list the networks allowed, e.g. \(example), or leave allow out to allow everyone")
        var out: [IPNetwork] = []
        for (i, item) in items.enumerated() {
            let path = "allow[\(i)]"
            let s = try string(item, path, fix: "write a network in CIDR notation, e.g. 10.0.0.0/8 or ::1/128")
            do { out.append(try IPNetwork(parsing: s)) } catch {
                throw self.error(.badValue, item, path, error.problem, error.fix)
            }
        }
        return AccessList(out)
    }

    private func parsedHostPort(_ s: String, _ node: Node, _ path: String) throws(ConfigError) -> (
        host: String, port: Int
    ) {
        let fix = "write host:port (e.g. 127.0.0.1:10809 or [::1]:10809) or an absolute path for a Unix socket"
        switch Values.hostPort(s) {
        case .success(let hp): return hp
        case .failure(.noPort): throw error(.badValue, node, path, "\(Values.quoted(s)) has no port", fix)
        case .failure(.badPort):
            throw error(
                .badValue, node, path, "\(Values.quoted(s)) has no valid port",
                "use a port from 1 to 65535, e.g. 127.0.0.1:10809")
        case .failure(.unbracketedIPv6):
            throw error(
                .badValue, node, path, "\(Values.quoted(s)) is ambiguous",
                "put IPv6 addresses in brackets, e.g. [::1]:10809")
        case .failure(.emptyHost):
            throw error(
                .badValue, node, path, "\(Values.quoted(s)) has no host",
                "name the address to bind, e.g. 0.0.0.0:\(s.split(separator: ":").last ?? "10809") for every IPv4 address"
            )
        case .failure(.spaces): throw error(.badValue, node, path, "\(Values.quoted(s)) contains spaces", fix)
        }
    }
    private func hostPort(_ s: String, _ node: Node, _ path: String) throws(ConfigError) -> String {
        try parsedHostPort(s, node, path).host
    }
    private func port(_ s: String, _ node: Node, _ path: String) throws(ConfigError) -> Int {
        try parsedHostPort(s, node, path).port
    }

    /// `limits.keepalive` and its timings. Timings under `keepalive: false` would be ignored, so they are refused.
    func keepalive(_ t: Table) throws(ConfigError) -> VirtNBDConfig.Keepalive {
        var k = VirtNBDConfig.Keepalive()
        if let v = t["keepalive"] { k.enabled = try bool(v, t.path("keepalive")) }
        let enabled = k.enabled
        func timing(_ key: String, _ range: ClosedRange<Int>, fix: String) throws(ConfigError) -> Int? {
            guard let v = t[key] else { return nil }
            let n = try int(v, t.path(key), range, fix: fix)
            guard enabled else {
                throw error(
                    .badValue, t.keyLine(key), t.path(key),
                    "has no effect while keepalive is false (line \(t.keyLine("keepalive") ?? 0))",
                    "remove it, or set keepalive: true")
            }
            return n
        }
        let seconds = VirtNBDConfig.Keepalive.secondsRange
        k.idle =
            try timing("keepalive-idle", seconds, fix: "give whole seconds before the first probe, e.g. 60") ?? k.idle
        k.interval =
            try timing("keepalive-interval", seconds, fix: "give whole seconds between probes, e.g. 10") ?? k.interval
        k.count =
            try timing(
                "keepalive-count", VirtNBDConfig.Keepalive.countRange,
                fix: "give how many unanswered probes close the connection, e.g. 6") ?? k.count
        return k
    }

    func metrics(_ node: Node, listeners: [Listener], lines: [Int?]) throws(ConfigError) -> String {
        let s = try string(node, "metrics", fix: "write host:port, e.g. 127.0.0.1:9100")
        let hp = try parsedHostPort(s, node, "metrics")
        let l = Listener.tcp(host: hp.host, port: hp.port)
        if let j = listeners.firstIndex(where: { Values.collide(l, $0) }) {
            let other =
                lines.indices.contains(j)
                ? "listen[\(j)] (\(listeners[j]), line \(lines[j] ?? 0))" : "the default listener \(listeners[j])"
            throw error(
                .listenerCollision, node, "metrics", "\(l) collides with \(other)",
                "give metrics its own port, e.g. 127.0.0.1:9100")
        }
        return l.description
    }

    struct ExportLines {
        var node: Int?
        var name: Int?
        var device: Int?
        var tls: Int?
        var allowDN: Int?
        var allowPSK: Int?
    }

    func exports(_ node: Node) throws(ConfigError) -> ([ExportConfig], [ExportLines]) {
        let seq = try nonEmptyList(
            node, "exports", of: "exports", scalarIsOne: false,
            wrongTypeFix: "start each export with \"- name: …\" under exports:",
            emptyFix: "add at least one export, e.g. - { name: disk, device: ram, size: 64M }")
        var out: [ExportConfig] = []
        var lines: [ExportLines] = []
        for (i, item) in seq.enumerated() {
            let (e, l) = try export(item, "exports[\(i)]")
            if let j = out.firstIndex(where: { $0.name == e.name }) {
                throw error(
                    .duplicateExport, l.name, "exports[\(i)].name",
                    "\(Values.quoted(e.name)) is already the name of exports[\(j)] (line \(lines[j].name ?? 0))",
                    "give every export its own name")
            }
            if let j = out.firstIndex(where: { Self.conflict($0, e) }) {
                let (what, rule): (String, String)
                switch e.device {
                case .file(let p, _): (what, rule) = (p, "two exports may share a file only if both are read-only")
                case .vhostUser(let s):
                    (what, rule) = (s, "a vhost-user backend serves one front end; start another backend")
                case .vfio(let a): (what, rule) = (a, "a PCI device can be driven by one export only")
                case .rbd(let p, let i, _):
                    (what, rule) = ("\(p)/\(i)", "two exports may share an RBD image only if both are read-only")
                default: (what, rule) = ("", "")
                }
                let key =
                    ["file": "path", "vhost-user": "socket", "vfio": "pci", "rbd": "image"][e.device.kind] ?? "device"
                throw error(
                    .sharedDevice, l.device, "exports[\(i)].\(key)",
                    "\(what) is also served by exports[\(j)] (line \(lines[j].device ?? 0))", rule)
            }
            out.append(e)
            lines.append(l)
        }
        return (out, lines)
    }

    /// Two exports that must not drive the same backing store.
    static func conflict(_ a: ExportConfig, _ b: ExportConfig) -> Bool {
        switch (a.device, b.device) {
        case (.file(let p, _), .file(let q, _)):
            return Values.normalisePath(p) == Values.normalisePath(q) && !(a.readOnly && b.readOnly)
        case (.vhostUser(let p), .vhostUser(let q)): return Values.normalisePath(p) == Values.normalisePath(q)
        case (.vfio(let p), .vfio(let q)): return p == q
        case (.rbd(let p, let i, _), .rbd(let q, let j, _)): return p == q && i == j && !(a.readOnly && b.readOnly)
        default: return false
        }
    }

    func export(_ node: Node, _ path: String) throws(ConfigError) -> (ExportConfig, ExportLines) {
        let t = try table(node, path, known: Keys.export, example: "- name: disk\n  device: ram\n  size: 64M")
        var lines = ExportLines(node: node.mark?.line)
        guard let nameNode = t["name"] else {
            throw error(
                .missingValue, node, t.path("name"), "missing", "add name: disk (name: \"\" is the default export)")
        }
        let name = try string(nameNode, t.path("name"), fix: "write name: disk (name: \"\" is the default export)")
        guard name.utf8.count <= 4096 else {
            throw error(.badValue, nameNode, t.path("name"), "longer than 4096 bytes", "shorten it (the NBD limit)")
        }
        lines.name = nameNode.mark?.line

        var e = ExportConfig(name: name, device: .simulated)
        try exportSettings(t, into: &e, lines: &lines)
        try exportAllowLists(t, into: &e, lines: &lines)
        try exportRing(t, into: &e)
        try exportDevice(t, node, path, into: &e, lines: &lines)
        return (e, lines)
    }

    /// An export's description, read-only and tls.
    func exportSettings(_ t: Table, into e: inout ExportConfig, lines: inout ExportLines) throws(ConfigError) {
        if let v = t["description"] {
            e.description = try string(
                v, t.path("description"), fix: "write description: \"text shown by nbdinfo --list\"")
            guard e.description.utf8.count <= 4096 else {
                throw error(.badValue, v, t.path("description"), "longer than 4096 bytes", "shorten it (the NBD limit)")
            }
        }
        if let v = t["read-only"] { e.readOnly = try bool(v, t.path("read-only")) }
        if let v = t["snapshot"] { e.snapshot = try bool(v, t.path("snapshot")) }
        if let v = t["snapshot-overlay"] {
            let choices = ExportConfig.SnapshotStorage.allCases.map(\.rawValue)
            e.snapshotOverlay = ExportConfig.SnapshotStorage(
                rawValue: try oneOf(v, t.path("snapshot-overlay"), choices))!
            e.snapshot = true
        }
        try exportBitmaps(t, into: &e)
        if let v = t["tls"] {
            e.tls = TLSPolicy(rawValue: try oneOf(v, t.path("tls"), TLSPolicy.allCases.map(\.rawValue)))!
            lines.tls = v.mark?.line
        }
    }

    /// An export's bitmaps and bitmap-granularity.
    func exportBitmaps(_ t: Table, into e: inout ExportConfig) throws(ConfigError) {
        if let v = t["bitmaps"] {
            let items: [Node]
            switch v {
            case .sequence(let s): items = Array(s)
            case .scalar: items = [v]
            default:
                throw error(
                    .wrongType, v, t.path("bitmaps"), "expected a list of bitmap names, found \(Self.what(v))",
                    "write bitmaps: [backup]")
            }
            for (i, n) in items.enumerated() {
                let p = "\(t.path("bitmaps"))[\(i)]"
                let name = try string(n, p, fix: "write bitmaps: [backup]")
                if let problem = ExportConfig.bitmapNameProblem(name) {
                    throw error(.badValue, n, p, problem, "name it with 1 to 4078 printable bytes, e.g. backup")
                }
                guard !e.bitmaps.contains(name) else {
                    throw error(.badValue, n, p, "bitmap \(Values.quoted(name)) is listed twice", "list it once")
                }
                e.bitmaps.append(name)
            }
        }
        if let v = t["bitmap-granularity"] {
            let g = try size(v, t.path("bitmap-granularity"))
            if let problem = ExportConfig.granularityProblem(g) {
                throw error(.badValue, v, t.path("bitmap-granularity"), problem, "use e.g. 64K (the default)")
            }
            e.bitmapGranularity = g
        }
    }

    /// An export's allow-dn and allow-psk: the TLS clients that may use it.
    func exportAllowLists(_ t: Table, into e: inout ExportConfig, lines: inout ExportLines) throws(ConfigError) {
        if let v = t["allow-dn"] {
            e.allowDN = try allowItems(v, t.path("allow-dn"), example: "allow-dn: [\"CN=alice,O=Example\"]") {
                (s, node, path) throws(ConfigError) in
                do throws(DistinguishedNameError) { return try DistinguishedName(parsing: s).description } catch {
                    throw self.error(.badValue, node, path, error.problem, error.fix)
                }
            }
            lines.allowDN = v.mark?.line
        }
        if let v = t["allow-psk"] {
            e.allowPSK = try allowItems(v, t.path("allow-psk"), example: "allow-psk: [alice]") {
                (s, node, path) throws(ConfigError) in
                guard !s.isEmpty else {
                    throw self.error(
                        .missingValue, node, path, "an empty PSK identity",
                        "write the identity as in the psktool file (the part before \":\")")
                }
                return s
            }
            lines.allowPSK = v.mark?.line
        }
    }

    /// An export's queue-size and max-payload.
    func exportRing(_ t: Table, into e: inout ExportConfig) throws(ConfigError) {
        if let v = t["queue-size"] {
            // A power of two for split rings (the default), checked with the ring format in `merged(with:)`.
            e.queueSize = try int(
                v, t.path("queue-size"), 1...32768,
                fix: "use a power of two from 1 to 32768, e.g. 256 (with --ring packed any size from 2)")
        }
        if let v = t["max-payload"] {
            let n = try size(v, t.path("max-payload"))
            guard ExportConfig.maxPayloadRange.contains(n) else {
                throw error(
                    .badValue, v, t.path("max-payload"), "\(n) bytes is not from 4K to 1G", "use e.g. 64M (the default)"
                )
            }
            e.maxPayload = UInt32(n)
        }
    }

    /// An export's device and the keys that device takes (and no others).
    func exportDevice(
        _ t: Table, _ node: Node, _ path: String, into e: inout ExportConfig, lines: inout ExportLines
    ) throws(ConfigError) {
        guard let deviceNode = t["device"] else {
            throw error(
                .missingDevice, node, path, "no device", "add device: ram, file, vhost-user, vfio, rbd or simulated")
        }
        let kind = try oneOf(deviceNode, t.path("device"), Keys.devices)
        lines.device = deviceNode.mark?.line
        for (key, users) in Keys.deviceParameters.sorted(by: { $0.key < $1.key }) where !users.contains(kind) {
            if let v = t[key] {
                throw error(
                    .badValue, t.entries.first { $0.key == key }?.keyNode ?? v, t.path(key),
                    "not used by device: \(kind)",
                    "remove it (only device: \(users.joined(separator: " or ")) takes \(key))")
            }
        }
        func required(_ key: String, _ example: String) throws(ConfigError) -> Node {
            guard let v = t[key] else {
                throw error(
                    .missingValue, deviceNode, t.path(key), "device: \(kind) needs \(key)", "add \(key): \(example)")
            }
            return v
        }
        switch kind {
        case "ram":
            e.device = .ram(size: try size(try required("size", "64M"), t.path("size")))
        case "file":
            let p = try required("path", "/var/lib/virtnbd/disk.img")
            e.device = .file(
                path: try filePath(p, t.path("path"), example: "/var/lib/virtnbd/disk.img"),
                size: try t["size"].map { (v) throws(ConfigError) in try size(v, t.path("size")) })
            lines.device = p.mark?.line
        case "vhost-user":
            let s = try required("socket", "/run/qsd/vhost-blk.sock")
            e.device = .vhostUser(socket: try filePath(s, t.path("socket"), example: "/run/qsd/vhost-blk.sock"))
            lines.device = s.mark?.line
            if let v = t["queue-size"], e.queueSize > 1024 {
                throw error(
                    .badValue, v, t.path("queue-size"), "\(e.queueSize) is more than the 1024 a vhost-user ring holds",
                    "use 1024 or less")
            }
        case "vfio":
            let a = try required("pci", "0000:00:05.0")
            let s = try string(a, t.path("pci"), fix: "write the PCI address, e.g. pci: 0000:00:05.0")
            guard let full = Values.pciAddress(s) else {
                throw error(
                    .badValue, a, t.path("pci"), "\(Values.quoted(s)) is not a PCI address",
                    "write domain:bus:device.function as lspci -D shows it, e.g. 0000:00:05.0")
            }
            e.device = .vfio(pciAddress: full)
            lines.device = a.mark?.line
        case "rbd":
            try rbdDevice(t, required: required, into: &e, lines: &lines)
        default:
            e.device = .simulated
        }
    }

    /// `device: rbd` with `pool`, `image` and optionally `conf` (a ceph.conf).
    func rbdDevice(
        _ t: Table, required: (String, String) throws(ConfigError) -> Node, into e: inout ExportConfig,
        lines: inout ExportLines
    ) throws(ConfigError) {
        let p = try required("pool", "rbd")
        let i = try required("image", "disk1")
        let pool = try string(p, t.path("pool"), fix: "write the pool's name, e.g. pool: rbd")
        let image = try string(i, t.path("image"), fix: "write the image's name, e.g. image: disk1")
        let conf = try t["conf"].map { (c) throws(ConfigError) in
            try filePath(c, t.path("conf"), example: "/etc/ceph/ceph.conf")
        }
        for (name, node, key) in [(pool, p, "pool"), (image, i, "image")] where !Values.rbdName(Substring(name)) {
            throw error(
                .badValue, node, t.path(key), "\(Values.quoted(name)) is not an RBD \(key) name",
                "write a name without \"/\", \"@\" or control characters")
        }
        e.device = .rbd(pool: pool, image: image, conf: conf)
        lines.device = i.mark?.line
        if let v = t["queue-size"], e.queueSize > 1024 {
            throw error(
                .badValue, v, t.path("queue-size"), "\(e.queueSize) is more than the 1024 a vhost-user ring holds",
                "use 1024 or less (an rbd device is reached over vhost-user)")
        }
    }
}
