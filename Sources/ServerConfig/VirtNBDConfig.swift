// The operator's configuration: what virtnbd listens on, its limits, logging, TLS and every export.
// Pure values: nothing here opens a socket or a device. `VirtNBDConfig.load(path:)` reads and
// validates a YAML file (see Config/virtnbd.yaml); `merged(with:)` applies command-line flags.

import AccessControl

/// STARTTLS policy, as `--tls` (raw values match `NBDProtocol.NBDTLSPolicy`).
public enum TLSPolicy: String, Sendable, Equatable, CaseIterable, Comparable {
    case off, on, require
    public static func < (a: TLSPolicy, b: TLSPolicy) -> Bool { a.rank < b.rank }
    private var rank: Int { self == .off ? 0 : self == .on ? 1 : 2 }
}

/// Log levels with swift-log's names (`Logger.Level(rawValue:)` accepts every raw value).
public enum LogLevel: String, Sendable, Equatable, CaseIterable, Comparable {
    case trace, debug, info, notice, warning, error, critical
    public static func < (a: LogLevel, b: LogLevel) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// One place to accept clients.
public enum Listener: Sendable, Hashable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public var description: String {
        switch self {
        case .tcp(let h, let p): return h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)"
        case .unix(let p): return p
        }
    }
}

/// What an export's block device is.
public enum Device: Sendable, Equatable, CustomStringConvertible {
    /// The 512 KiB simulated disk served when nothing else is asked for.
    case simulated
    /// A RAM disk of `size` bytes.
    case ram(size: UInt64)
    /// A raw image; created sparse with `size` bytes if it does not exist and `size` is given.
    case file(path: String, size: UInt64?)
    /// A vhost-user-blk backend (e.g. qemu-storage-daemon) on this Unix socket.
    case vhostUser(socket: String)
    /// A virtio-blk PCI device bound to vfio-pci, full form `0000:00:05.0`.
    case vfio(pciAddress: String)
    /// An RBD image (Ceph), opened by a qemu-storage-daemon that virtnbd starts and supervises and
    /// reaches over vhost-user; `conf` is the ceph.conf (nil: librbd's default, /etc/ceph/ceph.conf).
    case rbd(pool: String, image: String, conf: String?)

    /// `POOL/IMAGE[@CONF]`, what follows `rbd:` in `--device`; nil when malformed.
    public static func rbd(spec: String) -> Device? {
        Values.rbdImage(spec).map { .rbd(pool: $0.pool, image: $0.image, conf: $0.conf) }
    }

    /// The value of the `device:` key.
    public var kind: String {
        switch self {
        case .simulated: return "simulated"
        case .ram: return "ram"
        case .file: return "file"
        case .vhostUser: return "vhost-user"
        case .vfio: return "vfio"
        case .rbd: return "rbd"
        }
    }

    public var description: String {
        switch self {
        case .simulated: return "simulated 512 KiB disk"
        case .ram(let s): return "RAM \(s) bytes"
        case .file(let p, let s): return s.map { "file \(p) (created with \($0) bytes if missing)" } ?? "file \(p)"
        case .vhostUser(let s): return "vhost-user \(s)"
        case .vfio(let a): return "VFIO \(a)"
        case .rbd(let p, let i, let c): return "RBD \(p)/\(i)" + (c.map { " (\($0))" } ?? "")
        }
    }
}

public struct ExportConfig: Sendable, Equatable {
    public var name: String
    public var description: String
    public var device: Device
    public var readOnly: Bool
    /// Overrides the server's TLS policy for this export; nil = `tls.policy`.
    public var tls: TLSPolicy?
    public var queueSize: Int
    /// `allow-dn`: client certificate subjects (canonical RFC 4514 text, `DistinguishedName`)
    /// that may use this export; nil = not restricted by certificate.
    public var allowDN: [String]?
    /// `allow-psk`: PSK identities that may use this export; nil = not restricted by PSK identity.
    public var allowPSK: [String]?
    /// The largest READ or WRITE payload a client may send (NBD_INFO_BLOCK_SIZE's maximum).
    public var maxPayload: UInt32
    /// `snapshot` / `--snapshot`: writes go to a private overlay, dropped at exit.
    public var snapshot = false
    /// `snapshot-overlay` / `--snapshot-overlay`: where the overlay keeps written bytes.
    public var snapshotOverlay = SnapshotStorage.ram
    /// `bitmaps` / `--bitmap`: dirty bitmaps to keep (created if missing; a file export's persist).
    public var bitmaps: [String] = []
    /// `bitmap-granularity` / `--bitmap-granularity`: bytes per bit of new bitmaps.
    public var bitmapGranularity: UInt64 = ExportConfig.defaultBitmapGranularity

    /// Where a snapshot overlay keeps written bytes: RAM, or a temporary file beside a file
    /// export's image (in TMPDIR, default /var/tmp, for other devices).
    public enum SnapshotStorage: String, CaseIterable, Sendable, Equatable {
        case ram, file
    }

    public static let defaultQueueSize = 256
    public static let defaultBitmapGranularity: UInt64 = 64 << 10
    /// qemu:dirty-bitmap:NAME must fit an NBD string of 4096 bytes.
    public static let maxBitmapNameBytes = 4096 - "qemu:dirty-bitmap:".utf8.count

    /// Why `name` cannot name a bitmap, if it cannot.
    public static func bitmapNameProblem(_ name: String) -> String? {
        if name.isEmpty { return "an empty bitmap name" }
        if name.utf8.count > maxBitmapNameBytes {
            return
                "a bitmap name of \(name.utf8.count) bytes (at most \(maxBitmapNameBytes): qemu:dirty-bitmap:NAME is an NBD string of at most 4096)"
        }
        if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
            return "a bitmap name with a control character"
        }
        return nil
    }

    public static func granularityProblem(_ g: UInt64) -> String? {
        g.nonzeroBitCount == 1 && g >= 4096 && g <= 1 << 31 ? nil : "\(g) bytes is not a power of two from 4K to 2G"
    }
    public static let defaultMaxPayload: UInt32 = 64 << 20
    /// `max-payload` / `--max-payload`: 4 KiB to 1 GiB.
    public static let maxPayloadRange: ClosedRange<UInt64> = 4096...(1 << 30)

    public init(
        name: String, description: String = "", device: Device, readOnly: Bool = false,
        tls: TLSPolicy? = nil, queueSize: Int = ExportConfig.defaultQueueSize,
        allowDN: [String]? = nil, allowPSK: [String]? = nil, maxPayload: UInt32 = ExportConfig.defaultMaxPayload
    ) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly
        self.tls = tls
        self.queueSize = queueSize
        self.allowDN = allowDN
        self.allowPSK = allowPSK
        self.maxPayload = maxPayload
    }

    /// Whether only listed TLS clients may use this export (`allow-dn` or `allow-psk` is set).
    public var isRestricted: Bool { allowDN != nil || allowPSK != nil }
}

public struct VirtNBDConfig: Sendable, Equatable {
    public struct Limits: Sendable, Equatable {
        /// 0 = no limit (`--max-connections`). The default bounds what the clients together can
        /// hold (issue #31): 1024 idle or negotiating connections cost about 8 MiB; see
        /// docs/operations.md "Limits".
        public static let defaultMaxConnections = 1024
        public var maxConnections = Limits.defaultMaxConnections
        /// Seconds (`--handshake-timeout`).
        public var handshakeTimeout = 10
        /// TCP keepalive on accepted TCP connections (`--keepalive`, `limits.keepalive`).
        public var keepalive = Keepalive()
        public init(
            maxConnections: Int = Limits.defaultMaxConnections, handshakeTimeout: Int = 10,
            keepalive: Keepalive = .init()
        ) {
            self.maxConnections = maxConnections
            self.handshakeTimeout = handshakeTimeout
            self.keepalive = keepalive
        }
    }

    /// TCP keepalive for accepted TCP clients, so that a client that vanished without a FIN
    /// (power loss, a cut cable, a dropped NAT entry) gives back its connection slot: after `idle`
    /// seconds without traffic the kernel sends a probe every `interval` seconds, and closes the
    /// connection once `count` probes went unanswered. Unix-socket clients are not affected.
    public struct Keepalive: Sendable, Equatable, CustomStringConvertible {
        /// On by default: a dead client holds a `max-connections` slot and its requests otherwise.
        public var enabled = true
        /// Seconds of silence before the first probe (TCP_KEEPIDLE).
        public var idle = 60
        /// Seconds between probes (TCP_KEEPINTVL).
        public var interval = 10
        /// Unanswered probes before the connection is closed (TCP_KEEPCNT).
        public var count = 6

        /// TCP_KEEPIDLE and TCP_KEEPINTVL (Linux: 1 to 32767 s).
        public static let secondsRange = 1...32767
        /// TCP_KEEPCNT (Linux: 1 to 127).
        public static let countRange = 1...127

        public init(enabled: Bool = true, idle: Int = 60, interval: Int = 10, count: Int = 6) {
            self.enabled = enabled
            self.idle = idle
            self.interval = interval
            self.count = count
        }

        /// Seconds after which a silent, vanished client is closed: idle + interval × count.
        public var deadline: Int { idle + interval * count }

        public var description: String {
            enabled
                ? "on (idle \(idle) s, interval \(interval) s, count \(count): a vanished TCP client is closed after \(deadline) s)"
                : "off"
        }
    }

    public struct TLS: Sendable, Equatable {
        public var policy: TLSPolicy = .off
        /// Directory with server-cert.pem, server-key.pem (and ca-cert.pem), as nbdkit/qemu.
        public var certificates: String?
        /// psktool key file.
        public var psk: String?
        /// `verify-peer` (`--tls-verify-peer`, as nbdkit): clients must present a certificate
        /// signed by `certificates`/ca-cert.pem, or the TLS handshake fails.
        public var verifyPeer: Bool
        public init(policy: TLSPolicy = .off, certificates: String? = nil, psk: String? = nil, verifyPeer: Bool = false)
        {
            self.policy = policy
            self.certificates = certificates
            self.psk = psk
            self.verifyPeer = verifyPeer
        }
    }

    public static let defaultListener = Listener.tcp(host: "127.0.0.1", port: 10809)

    /// The file this configuration came from (nil when built from flags only); used in messages.
    public var source: String?
    public var listeners: [Listener]
    /// Client networks allowed to connect over TCP (`allow:`, `--allow`); empty = everyone.
    public var allow: AccessList
    public var limits: Limits
    public var logLevel: LogLevel
    /// `host:port` for a metrics endpoint; nil = none.
    public var metrics: String?
    public var tls: TLS
    public var exports: [ExportConfig]

    public init(
        source: String? = nil, listeners: [Listener] = [VirtNBDConfig.defaultListener], allow: AccessList = .init(),
        limits: Limits = .init(), logLevel: LogLevel = .info, metrics: String? = nil, tls: TLS = .init(),
        exports: [ExportConfig] = []
    ) {
        self.source = source
        self.listeners = listeners
        self.allow = allow
        self.limits = limits
        self.logLevel = logLevel
        self.metrics = metrics
        self.tls = tls
        self.exports = exports
    }

    /// The policy an export is served with: its own `tls:` or else the server's.
    public func effectiveTLS(for export: ExportConfig) -> TLSPolicy { export.tls ?? tls.policy }

    /// The policy the handshake starts with: `tls.policy`, raised to `on` (STARTTLS offered) when
    /// an export's own override asks for TLS, or an export has an allow list (`allow-dn`,
    /// `allow-psk`: served only over TLS), while the server-wide policy is off.
    public var serverTLSPolicy: TLSPolicy {
        exports.map { $0.isRestricted ? .on : effectiveTLS(for: $0) }.reduce(tls.policy) {
            max($0, $1 == .off ? .off : .on)
        }
    }

    /// What is wrong with `tls.verify-peer` and the exports' allow lists, if anything. Checked by
    /// the file parser and again after the flags are merged.
    public enum AuthorisationProblem: Sendable, Equatable {
        /// verify-peer with a PSK file: it checks X.509 client certificates only.
        case verifyPeerWithPSK
        /// verify-peer without tls.certificates (where ca-cert.pem is).
        case verifyPeerWithoutCertificates
        /// verify-peer while no TLS is offered at all.
        case verifyPeerWithoutTLS
        /// exports[i].allow-dn without verified client certificates.
        case allowDNWithoutVerifyPeer(export: Int)
        /// exports[i].allow-psk without a PSK file.
        case allowPSKWithoutPSK(export: Int)

        public var problem: String {
            switch self {
            case .verifyPeerWithPSK:
                return
                    "verify-peer checks X.509 client certificates, but the TLS credentials are a PSK file (a PSK client already proves itself by its key)"
            case .verifyPeerWithoutCertificates:
                return
                    "verify-peer needs TLS certificates: client certificates are checked against ca-cert.pem in that directory"
            case .verifyPeerWithoutTLS: return "verify-peer has no effect while TLS is off"
            case .allowDNWithoutVerifyPeer:
                return
                    "certificate names can be trusted only from verified client certificates (anyone can make a self-signed certificate with any name)"
            case .allowPSKWithoutPSK: return "PSK identities need TLS with a PSK file"
            }
        }
        public var fix: String {
            switch self {
            case .verifyPeerWithPSK:
                return
                    "drop verify-peer (use allow-psk to restrict exports by PSK identity), or use certificates instead of psk"
            case .verifyPeerWithoutCertificates:
                return "set tls.certificates (--tls-certificates DIR with ca-cert.pem, server-cert.pem, server-key.pem)"
            case .verifyPeerWithoutTLS: return "set tls.policy to on or require (--tls on|require), or drop verify-peer"
            case .allowDNWithoutVerifyPeer: return "set tls.certificates and tls.verify-peer: true (--tls-verify-peer)"
            case .allowPSKWithoutPSK: return "set tls.psk (--tls-psk FILE), or list certificate names with allow-dn"
            }
        }
    }

    public var authorisationProblem: AuthorisationProblem? {
        if tls.verifyPeer && tls.psk != nil { return .verifyPeerWithPSK }
        if tls.verifyPeer && tls.certificates == nil { return .verifyPeerWithoutCertificates }
        if tls.verifyPeer && serverTLSPolicy == .off { return .verifyPeerWithoutTLS }
        if let i = exports.firstIndex(where: { $0.allowDN != nil && !(tls.verifyPeer && tls.certificates != nil) }) {
            return .allowDNWithoutVerifyPeer(export: i)
        }
        if let i = exports.firstIndex(where: { $0.allowPSK != nil && tls.psk == nil }) {
            return .allowPSKWithoutPSK(export: i)
        }
        return nil
    }
}
