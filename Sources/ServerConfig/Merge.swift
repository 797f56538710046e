// Command-line flags and the configuration file, combined by one documented rule.
//
// THE RULE (like nbdkit and qemu-nbd: the command line is the last word)
//
// Global settings. A flag that is given replaces the file's value; a flag that is absent leaves it.
//   --allow                         replaces the file's whole `allow` list.
//   -p/--port, --listen, -U/--unix  any of them replaces the file's whole `listen` list with the
//                                   addresses they describe: -U PATH; else every --listen (repeatable:
//                                   HOST, HOST:PORT, [V6]:PORT or an absolute socket path; default
//                                   127.0.0.1), each on its own port or -p's (default 10809).
//   --max-connections, --handshake-timeout  replace limits.*.
//   --keepalive, --no-keepalive     replace limits.keepalive.
//   --keepalive-idle, --keepalive-interval, --keepalive-count  replace limits.keepalive-*; without
//                                   --keepalive they also turn a file's `keepalive: false` on (a timing
//                                   on the command line means "use keepalive"). With --no-keepalive
//                                   they are refused: they would be ignored.
//   -v                              raises log.level to debug (never lowers it from trace).
//   --tls                           replaces tls.policy.
//   --tls-certificates, --tls-psk   replace the file's credentials, both kinds: a flag's credential
//                                   is the only one used. Without --tls they raise an `off` policy
//                                   to `on` (credentials on the command line mean "use TLS").
//   --tls-verify-peer               sets tls.verify-peer (no flag turns the file's off).
//   --metrics                       replaces `metrics`.
//
// Export flags select an export by -e NAME (default "").
//   With a device flag (--size, --file or --device): the flags define a whole export named NAME,
//   exactly as without --config (--file, with --size to create it; --size alone: a RAM disk;
//   --device vhost-user:SOCK, vfio:BDF or rbd:POOL/IMAGE[@CONF]; --device emulator alone: the
//   simulated disk). It replaces the file's export of that name in place, or is appended after the file's exports. Nothing of the
//   replaced export is kept.
//   Without a device flag, with -e NAME: -r, --description, --queue-size and --max-payload modify
//   the file's export NAME; it is an error if the file has none.
//   Without a device flag or -e: -r makes every export read-only, --queue-size and --max-payload
//   set every export's; --description needs -e unless the file has exactly one export.
//   -r only ever adds read-only: no flag makes a read-only export of the file writable.
//
// A flag that is given always wins, whatever its value (`--listen 127.0.0.1`, `--max-connections 0`
// are not "defaults" to be dropped): every field below is nil unless the flag was on the command
// line, and the defaults live only in `VirtNBDConfig` / `ExportConfig`.
//
// The merged configuration is validated again (listener/metrics collisions, TLS credentials, queue
// sizes for the ring format, the vhost-user queue limit, shared backing files); those errors name
// the flag, or the file's key when the value came from the file.

import AccessControl

/// The flags of `virtnbd serve`, each nil (or false) when not given on the command line.
public struct CommandLineOverrides: Sendable, Equatable {
    public var port: Int?
    /// Every `--listen`, in order (empty: not given).
    public var listen: [String]
    public var unix: String?
    /// `--allow` (already parsed, every occurrence); nil when not given.
    public var allow: AccessList?
    public var maxConnections: Int?
    public var handshakeTimeout: Int?
    /// `--keepalive` (true) or `--no-keepalive` (false); nil when neither is given.
    public var keepalive: Bool?
    /// `--keepalive-idle` in seconds.
    public var keepaliveIdle: Int?
    /// `--keepalive-interval` in seconds.
    public var keepaliveInterval: Int?
    /// `--keepalive-count`.
    public var keepaliveCount: Int?
    public var verbose = false
    public var tls: TLSPolicy?
    public var tlsCertificates: String?
    public var tlsPsk: String?
    /// `--tls-verify-peer` (true when given).
    public var tlsVerifyPeer = false
    /// `--metrics HOST:PORT`.
    public var metrics: String?

    public var exportName: String?
    public var description: String?
    public var readOnly = false
    public var size: UInt64?
    public var file: String?
    /// `--device`: emulator, vhost-user:SOCKET, vfio:PCI-ADDRESS or rbd:POOL/IMAGE[@CONF].
    public var device: String?
    public var queueSize: Int?
    /// `--max-payload` in bytes.
    public var maxPayload: UInt64?
    /// `--ring packed`: queue sizes need not be powers of two.
    public var packedRing = false
    /// `--snapshot` (true when given).
    public var snapshot = false
    /// `--snapshot-overlay` (implies --snapshot).
    public var snapshotOverlay: ExportConfig.SnapshotStorage?
    /// `--bitmap NAME`, every occurrence.
    public var bitmaps: [String] = []
    /// `--bitmap-granularity` in bytes.
    public var bitmapGranularity: UInt64?

    public init(
        port: Int? = nil, listen: [String] = [], unix: String? = nil, maxConnections: Int? = nil,
        handshakeTimeout: Int? = nil, verbose: Bool = false, tls: TLSPolicy? = nil,
        tlsCertificates: String? = nil, tlsPsk: String? = nil, exportName: String? = nil,
        description: String? = nil, readOnly: Bool = false, size: UInt64? = nil, file: String? = nil,
        device: String? = nil, queueSize: Int? = nil, metrics: String? = nil, allow: AccessList? = nil,
        maxPayload: UInt64? = nil, packedRing: Bool = false
    ) {
        self.port = port
        self.listen = listen
        self.unix = unix
        self.maxConnections = maxConnections
        self.handshakeTimeout = handshakeTimeout
        self.verbose = verbose
        self.tls = tls
        self.tlsCertificates = tlsCertificates
        self.tlsPsk = tlsPsk
        self.exportName = exportName
        self.description = description
        self.readOnly = readOnly
        self.size = size
        self.file = file
        self.device = device
        self.queueSize = queueSize
        self.metrics = metrics
        self.allow = allow
        self.maxPayload = maxPayload
        self.packedRing = packedRing
    }

    var hasDeviceFlag: Bool { size != nil || file != nil || device != nil }

    /// `--device`: nil for the emulator (then --size/--file choose), else the real device.
    static func parseDevice(_ s: String) -> Device?? {
        if s == "emulator" { return .some(nil) }
        if s.hasPrefix("vhost-user:"), s.count > 11 { return .vhostUser(socket: String(s.dropFirst(11))) }
        if s.hasPrefix("vfio:"), let a = Values.pciAddress(String(s.dropFirst(5))) { return .vfio(pciAddress: a) }
        if s.hasPrefix("rbd:"), let r = Device.rbd(spec: String(s.dropFirst(4))) { return r }
        return nil
    }

    /// The export the flags define on their own (only meaningful with a device flag, or without --config).
    func flagExport() -> ExportConfig {
        let device: Device
        if let d = self.device.flatMap(Self.parseDevice), let real = d {
            device = real
        } else if let f = file {
            device = .file(path: f, size: size)
        } else if let s = size {
            device = .ram(size: s)
        } else {
            device = .simulated
        }
        var e = ExportConfig(
            name: exportName ?? "", description: description ?? "", device: device,
            readOnly: readOnly, queueSize: queueSize ?? ExportConfig.defaultQueueSize,
            maxPayload: maxPayload.map { UInt32($0) } ?? ExportConfig.defaultMaxPayload)
        e.snapshot = snapshot || snapshotOverlay != nil
        if let o = snapshotOverlay { e.snapshotOverlay = o }
        e.bitmaps = bitmaps
        e.bitmapGranularity = bitmapGranularity ?? ExportConfig.defaultBitmapGranularity
        return e
    }

    /// --snapshot, --bitmap and --bitmap-granularity over an export of the file.
    func applyLayers(to e: inout ExportConfig) {
        if snapshot { e.snapshot = true }
        if let o = snapshotOverlay {
            e.snapshot = true
            e.snapshotOverlay = o
        }
        for b in bitmaps where !e.bitmaps.contains(b) { e.bitmaps.append(b) }
        if let g = bitmapGranularity { e.bitmapGranularity = g }
    }
}

extension VirtNBDConfig {
    /// Without --config: the configuration today's flags describe (one export; the simulated disk
    /// when neither --size nor --file is given).
    public static func fromCommandLine(_ flags: CommandLineOverrides) throws(ConfigError) -> VirtNBDConfig {
        var f = flags
        if !f.hasDeviceFlag { f.device = "emulator" } // the simulated disk
        return try VirtNBDConfig(source: nil, exports: []).merged(with: f)
    }

    /// This (file) configuration with command-line flags applied by the rule above.
    public func merged(with flags: CommandLineOverrides) throws(ConfigError) -> VirtNBDConfig {
        let file = source ?? "command line"
        func fail(_ kind: ConfigError.Kind, _ flag: String, _ problem: String, _ fix: String) -> ConfigError {
            ConfigError(kind, file: file, line: nil, keyPath: flag, problem: problem, fix: fix)
        }
        var c = self
        try Self.mergeGlobals(flags, into: &c, file: file, fail)
        try Self.mergeExports(flags, into: &c, fail)
        try Self.validateListeners(c, flags, fail)
        try Self.validateExports(c, flags, fail)
        try Self.validateTLS(c, flags, fail)
        return c
    }
}

/// Makes the ConfigError for a flag: kind, flag, problem, fix.
private typealias FlagFailure = (ConfigError.Kind, String, String, String) -> ConfigError

extension VirtNBDConfig {
    /// Listeners, access, limits, logging, metrics and TLS from the flags.
    fileprivate static func mergeGlobals(
        _ flags: CommandLineOverrides, into c: inout VirtNBDConfig, file: String, _ fail: FlagFailure
    ) throws(ConfigError) {
        if let u = flags.unix {
            c.listeners = [.unix(path: u)]
        } else if flags.port != nil || !flags.listen.isEmpty {
            let port = flags.port ?? 10809
            guard (1...65535).contains(port) else {
                throw fail(.badValue, "--port", "\(port) is not a port", "use 1 to 65535")
            }
            var listeners: [Listener] = []
            for text in flags.listen.isEmpty ? ["127.0.0.1"] : flags.listen {
                let l = try listener(flag: text, port: flags.port, fail)
                if listeners.contains(where: { Values.collide($0, l) }) {
                    throw fail(
                        .listenerCollision, "--listen", "\(text) is given twice (or overlaps another --listen)",
                        "give each address once")
                }
                listeners.append(l)
            }
            c.listeners = listeners
        }
        if let a = flags.allow { c.allow = a }
        if let m = flags.maxConnections {
            guard m >= 0 else { throw fail(.badValue, "--max-connections", "\(m) is negative", "use 0 for no limit") }
            c.limits.maxConnections = m
        }
        if let h = flags.handshakeTimeout {
            guard h > 0 else {
                throw fail(.badValue, "--handshake-timeout", "\(h) is not positive", "give whole seconds, e.g. 10")
            }
            c.limits.handshakeTimeout = h
        }
        try Self.mergeKeepalive(flags, into: &c.limits.keepalive, fail)
        if flags.verbose && c.logLevel > .debug { c.logLevel = .debug }
        if let t = flags.tls { c.tls.policy = t }
        if let m = flags.metrics {
            let hp = try VirtNBDConfig.hostPort(m, flag: "--metrics", file: file)
            c.metrics = Listener.tcp(host: hp.host, port: hp.port).description
        }
        if flags.tlsCertificates != nil || flags.tlsPsk != nil {
            c.tls.certificates = flags.tlsCertificates
            c.tls.psk = flags.tlsPsk
            if flags.tls == nil && c.tls.policy == .off { c.tls.policy = .on }
        }
        if flags.tlsVerifyPeer { c.tls.verifyPeer = true }
    }

    /// The flags' export (--size, --file, --device) added or replacing its namesake, or the
    /// per-export flags applied to the file's exports.
    fileprivate static func mergeExports(
        _ flags: CommandLineOverrides, into c: inout VirtNBDConfig, _ fail: FlagFailure
    ) throws(ConfigError) {
        if let d = flags.device {
            guard let parsed = CommandLineOverrides.parseDevice(d) else {
                throw fail(
                    .badValue, "--device", "\(Values.quoted(d)) is not a device",
                    "use emulator, vhost-user:/path/to.sock, vfio:0000:00:05.0 or rbd:POOL/IMAGE[@/etc/ceph/ceph.conf]")
            }
            if parsed != nil && (flags.size != nil || flags.file != nil) {
                throw fail(
                    .badValue, "--device", "--size and --file configure the emulator",
                    "drop them, or use --device emulator")
            }
        }
        if let q = flags.queueSize, !(1...32768).contains(q) {
            throw fail(.badValue, "--queue-size", "\(q) is not from 1 to 32768", "use e.g. 256")
        }
        if let p = flags.maxPayload, !ExportConfig.maxPayloadRange.contains(p) {
            throw fail(.badValue, "--max-payload", "\(p) bytes is not from 4K to 1G", "use e.g. 64M (the default)")
        }
        for b in flags.bitmaps {
            if let problem = ExportConfig.bitmapNameProblem(b) {
                throw fail(.badValue, "--bitmap", problem, "name it with 1 to 4078 printable bytes, e.g. backup")
            }
        }
        if let dup = flags.bitmaps.enumerated().first(where: { flags.bitmaps.prefix($0.offset).contains($0.element) }) {
            throw fail(.badValue, "--bitmap", "bitmap \(Values.quoted(dup.element)) is given twice", "give it once")
        }
        if let g = flags.bitmapGranularity, let problem = ExportConfig.granularityProblem(g) {
            throw fail(.badValue, "--bitmap-granularity", problem, "use e.g. 64K (the default)")
        }
        if flags.hasDeviceFlag {
            let e = flags.flagExport()
            if let i = c.exports.firstIndex(where: { $0.name == e.name }) {
                c.exports[i] = e
            } else {
                c.exports.append(e)
            }
        } else if let name = flags.exportName {
            guard let i = c.exports.firstIndex(where: { $0.name == name }) else {
                let names = c.exports.map { Values.quoted($0.name) }.joined(separator: ", ")
                throw fail(
                    .noSuchExport, "--export-name", "no export \(Values.quoted(name)) (the file has \(names))",
                    "name one of those, or add --size or --file to define a new export")
            }
            if let d = flags.description { c.exports[i].description = d }
            if flags.readOnly { c.exports[i].readOnly = true }
            flags.applyLayers(to: &c.exports[i])
            if let q = flags.queueSize { c.exports[i].queueSize = q }
            if let p = flags.maxPayload { c.exports[i].maxPayload = UInt32(p) }
        } else {
            if flags.readOnly { for i in c.exports.indices { c.exports[i].readOnly = true } }
            for i in c.exports.indices { flags.applyLayers(to: &c.exports[i]) }
            if let q = flags.queueSize { for i in c.exports.indices { c.exports[i].queueSize = q } }
            if let p = flags.maxPayload { for i in c.exports.indices { c.exports[i].maxPayload = UInt32(p) } }
            if let d = flags.description {
                guard c.exports.count == 1 else {
                    throw fail(
                        .ambiguousFlag, "--description", "the file has \(c.exports.count) exports",
                        "say which one with -e NAME")
                }
                c.exports[0].description = d
            }
        }
    }

    /// One `--listen`: HOST (on -p's port), HOST:PORT, [V6]:PORT, a bare IPv6 address, or an
    /// absolute Unix socket path, as the file's `listen:` entries.
    fileprivate static func listener(flag text: String, port: Int?, _ fail: FlagFailure) throws(ConfigError)
        -> Listener
    {
        if text.hasPrefix("/") {
            if port != nil {
                throw fail(
                    .badValue, "--listen", "\(text) is a Unix socket, which has no port, but -p \(port ?? 0) was given",
                    "drop -p, or give a TCP address")
            }
            return .unix(path: text)
        }
        let fix = "write HOST, HOST:PORT or [IPv6]:PORT (e.g. 127.0.0.1, 0.0.0.0:10809, [::1]:10809)"
        switch Values.hostPort(text) {
        case .success(let hp):
            if let p = port, p != hp.port {
                throw fail(
                    .badValue, "--listen", "\(text) names port \(hp.port) but -p says \(p)",
                    "give the port once: --listen \(hp.host.contains(":") ? "[\(hp.host)]" : hp.host) -p \(p), or drop -p"
                )
            }
            return .tcp(host: hp.host, port: hp.port)
        case .failure(.noPort), .failure(.unbracketedIPv6):
            // A bare host: "127.0.0.1", "localhost", "::", "[::1]".
            var host = text.lowercased()
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty, !host.contains("[") && !host.contains("]"), !host.contains(where: \.isWhitespace)
            else { throw fail(.badValue, "--listen", "\(Values.quoted(text)) is not an address", fix) }
            return .tcp(host: host, port: port ?? 10809)
        case .failure(.badPort):
            throw fail(.badValue, "--listen", "\(Values.quoted(text)) has no valid port", "use a port from 1 to 65535")
        case .failure(.emptyHost):
            throw fail(
                .badValue, "--listen", "\(Values.quoted(text)) has no host",
                "name the address, e.g. 0.0.0.0\(text) for every IPv4 address")
        case .failure(.spaces): throw fail(.badValue, "--listen", "\(Values.quoted(text)) contains spaces", fix)
        }
    }

    /// Metrics on an NBD listener's port; Unix socket paths the kernel cannot bind.
    fileprivate static func validateListeners(
        _ c: VirtNBDConfig, _ flags: CommandLineOverrides, _ fail: FlagFailure
    ) throws(ConfigError) {
        let listenersFromFlags = flags.unix != nil || flags.port != nil || !flags.listen.isEmpty
        for (i, l) in c.listeners.enumerated() {
            if let m = c.metrics, case .success(let hp) = Values.hostPort(m),
                Values.collide(l, .tcp(host: hp.host, port: hp.port))
            {
                let listener =
                    listenersFromFlags
                    ? "the NBD listener -p/--listen (\(l))"
                    : c.source != nil && c.listeners != [VirtNBDConfig.defaultListener]
                        ? "listen[\(i)] (\(l))" : "the NBD listener \(l)"
                if flags.metrics != nil {
                    throw fail(
                        .listenerCollision, "--metrics", "\(m) collides with \(listener)",
                        "give --metrics its own port, e.g. 127.0.0.1:9100")
                }
                throw fail(
                    .listenerCollision, !flags.listen.isEmpty && flags.port == nil ? "--listen" : "--port",
                    "\(l) collides with metrics (\(m))", "choose another port with -p, or move metrics")
            }
            if case .unix(let p) = l, p.utf8.count > 107 {
                throw fail(
                    .badValue, "--unix",
                    "a Unix socket path of \(p.utf8.count) bytes is longer than the 107 the kernel allows",
                    "choose a shorter path")
            }
        }
    }

    /// Ring sizes the ring format takes, and devices two writable exports would share.
    fileprivate static func validateExports(
        _ c: VirtNBDConfig, _ flags: CommandLineOverrides, _ fail: FlagFailure
    ) throws(ConfigError) {
        for (i, e) in c.exports.enumerated() {
            // The flag's value, or the file's for an export it left alone.
            let queueKey =
                flags.queueSize == e.queueSize || (flags.hasDeviceFlag && e.name == (flags.exportName ?? ""))
                ? "--queue-size" : "exports[\(i)].queue-size"
            if let problem = Values.queueSizeProblem(e.queueSize, packed: flags.packedRing) {
                throw fail(
                    .badValue, queueKey, "\(e.queueSize) \(problem)",
                    flags.packedRing
                        ? "use e.g. 256"
                        : "use e.g. \(Values.nearestPowerOfTwo(e.queueSize)), or --ring packed, which takes any size from 2 to 32768"
                )
            }
            if ["vhost-user", "rbd"].contains(e.device.kind), e.queueSize > 1024 {
                throw fail(
                    .badValue, "--queue-size",
                    "\(e.queueSize) is more than the 1024 a vhost-user ring holds (exports[\(i)] \(Values.quoted(e.name)))",
                    "use 1024 or less")
            }
            if let j = c.exports[..<i].firstIndex(where: { ConfigParser.conflict($0, e) }) {
                throw fail(
                    .sharedDevice, "--file",
                    "\(e.device) is also served by exports[\(j)] \(Values.quoted(c.exports[j].name))",
                    "two exports may share a file only if both are read-only; add -r or use another file")
            }
        }
    }

    /// TLS credentials the policy needs, and per-export authorisation that can take effect.
    fileprivate static func validateTLS(
        _ c: VirtNBDConfig, _ flags: CommandLineOverrides, _ fail: FlagFailure
    ) throws(ConfigError) {
        if c.tls.certificates != nil && c.tls.psk != nil {
            throw fail(
                .tlsCredentials, "--tls-psk", "both --tls-certificates and --tls-psk are given", "give one of them")
        }
        if c.tls.certificates == nil && c.tls.psk == nil && c.serverTLSPolicy != .off {
            let flag = flags.tls.map { "--tls \($0.rawValue)" } ?? "tls.policy"
            let needs = c.tls.policy != .off ? c.tls.policy : .on
            throw fail(
                .tlsCredentials, flag, "\(needs.rawValue) needs TLS credentials",
                "add --tls-certificates DIR (server-cert.pem, server-key.pem) or --tls-psk FILE (psktool format)")
        }
        if let p = c.authorisationProblem {
            let key: String
            switch p {
            case .allowDNWithoutVerifyPeer(let i): key = "exports[\(i)].allow-dn"
            case .allowPSKWithoutPSK(let i): key = "exports[\(i)].allow-psk"
            default: key = flags.tlsVerifyPeer ? "--tls-verify-peer" : "tls.verify-peer"
            }
            // Flags alone (no file): say it in flags.
            if c.source == nil, let (problem, fix) = Self.flagWording(p) {
                throw fail(.tlsCredentials, key, problem, fix)
            }
            throw fail(.tlsCredentials, key, p.problem, p.fix)
        }
    }
}

extension VirtNBDConfig {
    /// `--keepalive`, `--no-keepalive` and `--keepalive-idle|interval|count` over the file's `limits.keepalive*`.
    fileprivate static func mergeKeepalive(
        _ flags: CommandLineOverrides, into k: inout Keepalive, _ fail: FlagFailure
    ) throws(ConfigError) {
        let timings: [(flag: String, value: Int?, range: ClosedRange<Int>, example: String)] = [
            ("--keepalive-idle", flags.keepaliveIdle, Keepalive.secondsRange, "60"),
            ("--keepalive-interval", flags.keepaliveInterval, Keepalive.secondsRange, "10"),
            ("--keepalive-count", flags.keepaliveCount, Keepalive.countRange, "6"),
        ]
        for t in timings {
            guard let v = t.value else { continue }
            guard t.range.contains(v) else {
                throw fail(
                    .badValue, t.flag, "\(v) is not from \(t.range.lowerBound) to \(t.range.upperBound)",
                    "use e.g. \(t.example)")
            }
            if flags.keepalive == false {
                throw fail(
                    .badValue, t.flag, "has no effect with --no-keepalive", "drop \(t.flag), or drop --no-keepalive")
            }
        }
        if let on = flags.keepalive { k.enabled = on }
        if timings.contains(where: { $0.value != nil }) { k.enabled = true }
        if let v = flags.keepaliveIdle { k.idle = v }
        if let v = flags.keepaliveInterval { k.interval = v }
        if let v = flags.keepaliveCount { k.count = v }
    }

    /// An authorisation problem in the words of the flags, for a configuration made of flags only.
    static func flagWording(_ p: AuthorisationProblem) -> (String, String)? {
        switch p {
        case .verifyPeerWithPSK:
            return (
                "it verifies X.509 client certificates, but --tls-psk is set (a PSK client already proves itself by its key)",
                "drop --tls-verify-peer, or use --tls-certificates instead of --tls-psk"
            )
        case .verifyPeerWithoutCertificates:
            return (
                "it needs --tls-certificates DIR (ca-cert.pem there signs the client certificates)",
                "add --tls-certificates DIR"
            )
        case .verifyPeerWithoutTLS:
            return ("it has no effect while TLS is off", "add --tls on or --tls require, or drop --tls-verify-peer")
        default:
            return nil
        }
    }

    /// `host:port` or `[v6]:port` as a flag gives it (`--metrics`), checked like the file's values.
    public static func hostPort(_ text: String, flag: String, file: String = "command line") throws(ConfigError) -> (
        host: String, port: Int
    ) {
        func fail(_ problem: String, _ fix: String) -> ConfigError {
            ConfigError(.badValue, file: file, line: nil, keyPath: flag, problem: problem, fix: fix)
        }
        switch Values.hostPort(text) {
        case .success(let hp): return hp
        case .failure(.noPort): throw fail("\(Values.quoted(text)) has no port", "write host:port, e.g. 127.0.0.1:9100")
        case .failure(.badPort):
            throw fail("\(Values.quoted(text)) has no valid port", "use a port from 1 to 65535, e.g. 127.0.0.1:9100")
        case .failure(.unbracketedIPv6):
            throw fail("\(Values.quoted(text)) is ambiguous", "put IPv6 addresses in brackets, e.g. [::1]:9100")
        case .failure(.emptyHost):
            throw fail("\(Values.quoted(text)) has no host", "name the address to bind, e.g. 127.0.0.1:9100")
        case .failure(.spaces):
            throw fail("\(Values.quoted(text)) contains spaces", "write host:port, e.g. 127.0.0.1:9100")
        }
    }

    /// Where the metrics endpoint listens, parsed from `metrics` (nil: no endpoint).
    public var metricsEndpoint: (host: String, port: Int)? {
        guard let m = metrics, case .success(let hp) = Values.hostPort(m) else { return nil }
        return hp
    }
}
