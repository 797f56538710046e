import AccessControl
import ArgumentParser
import Dispatch
import Foundation
import Logging
import Metrics
import NBDProtocol
import NBDServer
import NIOCore
import NIOPosix
import Prometheus
import ServerConfig
import Virtio
import VirtioBlock

/// `virtnbd [serve] [OPTIONS]`: the root command is the server, so `virtnbd --help` lists the serve
/// options (as `nbdkit --help` does) and the subcommands; `virtnbd serve …` is the same command.
struct VirtNBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtnbd",
        abstract: "An NBD server that exports a virtio-blk disk.",
        usage: """
            virtnbd [serve] [--size SIZE | --file PATH | --device SPEC | --config FILE] [OPTIONS]
            virtnbd info [--list] [--json] [--timeout S] URI
            virtnbd copy SRC DST
            virtnbd bitmap list|add|remove|clear [NAME] --control PATH [--export NAME]
            """,
        discussion:
            "With neither --size nor --file it serves a simulated 512 KiB disk. -V/--version prints the versions.",
        subcommands: [Serve.self, Info.self, Copy.self, BitmapCommand.self])

    @OptionGroup var options: ServeOptions

    func validate() throws { try options.validate() }
    func run() async throws { try await options.serve() }

    /// Parses and runs, exiting like nbdkit: 0, 1 for usage errors and failures, or --run's status.
    static func runMain() async {
        let args = Array(CommandLine.arguments.dropFirst())
        // `virtnbd bitmap …` parses on its own: the root command's serve options include
        // --control, which would otherwise take the subcommand's --control.
        if args.first == "bitmap" {
            let rest = Array(args.dropFirst())
            do {
                let command = try BitmapCommand.parse(rest)
                try await command.run()
            } catch { Usage.exit(error, command: BitmapCommand.self, arguments: rest) }
            return
        }
        var command: ParsableCommand
        do { command = try parseAsRoot(args) } catch {
            let sub = subcommandType(args.first)
            Usage.exit(error, command: sub, arguments: args)
        }
        do {
            if var a = command as? AsyncParsableCommand { try await a.run() } else { try command.run() }
        } catch { Usage.exit(error, command: type(of: command), arguments: args) }
    }

    /// The subcommand `name` selects, for its error messages (the root command otherwise).
    private static func subcommandType(_ name: String?) -> ParsableCommand.Type {
        configuration.subcommands.first { $0.configuration.commandName == name || $0._commandName == name }
            ?? VirtNBD.self
    }
}

/// `virtnbd serve`, the same as `virtnbd` with no subcommand.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve exports (the default command; `virtnbd --help` lists the options).")
    @OptionGroup var options: ServeOptions
    func validate() throws { try options.validate() }
    func run() async throws { try await options.serve() }
}

extension RingFormat: ExpressibleByArgument {}

/// Parses sizes such as 512, 64K, 64M, 1G, 2T, 64MiB (binary units), as the configuration file.
struct ByteSize: ExpressibleByArgument {
    let bytes: UInt64
    init(bytes: UInt64) { self.bytes = bytes }
    init?(argument: String) {
        guard case .success(let v) = ByteSizeText.parse(argument) else { return nil }
        bytes = v
    }
    /// For `@Option(transform:)`: the message says what a size is.
    static func parse(_ text: String) throws -> ByteSize {
        switch ByteSizeText.parse(text) {
        case .success(let v): return ByteSize(bytes: v)
        case .failure(let p): throw ValidationError("\(p); \(SizeProblem.howTo)")
        }
    }
}

/// The serve options, shared by `virtnbd` and `virtnbd serve`. Every option that the
/// configuration file also sets is optional: nil means "not on the command line", and the
/// defaults are applied once, after merging (ServerConfig's `VirtNBDConfig` / `ExportConfig`).
struct ServeOptions: ParsableArguments {
    @Option(name: [.short, .long], help: "TCP port (default 10809).") var port: Int?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Listen here (repeatable): HOST, HOST:PORT, [IPv6]:PORT or an absolute Unix socket path (default 127.0.0.1; -p gives the port of those without one).",
            valueName: "address")) var listen: [String] = []
    @Option(name: [.customShort("U"), .long], help: "Listen on this Unix socket instead of TCP.") var unix: String?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Only TCP clients in this network may connect (CIDR, e.g. 10.0.0.0/8 or ::1/128; repeatable, or comma-separated). Default: everyone. Unix-socket clients are not filtered.",
            valueName: "cidr")) var allow: [String] = []
    @Option(name: [.short, .customLong("export-name")], help: "Export name (default \"\").") var exportName: String?
    @Option(name: .long, help: "Export description (shown by nbdinfo --list).") var description: String?
    @Flag(name: [.short, .customLong("read-only")], help: "Export read-only.") var readOnly = false
    @Option(
        name: .long, parsing: .unconditional,
        help: "Size of a RAM disk (e.g. 64M), or of a --file to create (an existing file keeps its size).",
        transform: ByteSize.parse) var size: ByteSize?
    @Option(name: .long, help: "Serve this raw image file (created sparse with --size if missing).") var file: String?
    @Option(
        name: .long,
        help:
            "Virtqueue size (default 256): a power of two from 1 to 32768 for split rings, any size from 2 to 32768 for packed."
    ) var queueSize: Int?
    @Option(
        name: .long, parsing: .unconditional,
        help: ArgumentHelp("Largest READ or WRITE a client may send, 4K to 1G (default 64M).", valueName: "size"),
        transform: ByteSize.parse) var maxPayload: ByteSize?
    @Option(name: .long, help: "Virtqueue format: split or packed (packed falls back to split if the device lacks it).")
    var ring: RingFormat = .split
    @Option(
        name: .long,
        help:
            "Request virtqueues per device (VIRTIO_BLK_F_MQ; capped by the device). Default: one per event loop (one per CPU)."
    ) var queues: Int?
    @Flag(
        name: .customLong("no-event-idx"),
        help: "Do not negotiate VIRTIO_F_EVENT_IDX (use the NO_NOTIFY/NO_INTERRUPT flags).") var noEventIdx = false
    @Flag(name: .customLong("no-indirect"), help: "Do not negotiate VIRTIO_F_INDIRECT_DESC.") var noIndirect = false
    @Option(
        name: .customLong("poll-us"),
        help: "Poll the used ring this many microseconds after a completion before sleeping (0 = interrupts only).")
    var pollMicroseconds: Int = 0
    @Option(
        name: .customLong("device-poll-us"),
        help: ArgumentHelp(
            "With --no-device-inline or a file: the in-process device keeps polling its queue this many microseconds after the last request before it sleeps (0 = sleep at once; default 50).",
            discussion:
                "A QD1 client's next request then needs no kick and no device wake-up. The device yields the CPU between looks, and an idle server costs nothing (the window ends)."
        ))
    var devicePollMicroseconds: Int = 50
    @Flag(
        name: .long, inversion: .prefixedNo,
        help: ArgumentHelp(
            "RAM exports: the in-process device serves its queue on the event loop that notified it, run to completion (the default); --no-device-inline gives it a thread of its own that polls (--device-poll-us).",
            discussion:
                "Measured on 2 cores: 4 KiB random reads at QD32 1.8x the IOPS at 0.55x the CPU per request of the device thread. A lone QD1 client whose requests wake the server on another idle CPU waits longer than with the polling device thread, which keeps that CPU awake at the cost of CPU time. Files always keep the device thread (their I/O would block the loop)."
        ))
    var deviceInline = true
    @Option(
        name: .long,
        help: "Reset the device and resubmit when a request takes longer than this many seconds (0 = never).")
    var requestTimeout: Double = 30
    @Option(
        name: .long,
        help:
            "vhost-user: when the backend exits, hold requests and reconnect to its socket for this many seconds before failing them with EIO (0 = fail at once); it reconnects whenever the backend returns."
    ) var reconnectTimeout: Double = 30
    @Option(
        name: .long,
        help: ArgumentHelp(
            "The virtio-blk device: emulator (default), vhost-user:SOCKET, vfio:PCI-ADDRESS or rbd:POOL/IMAGE[@CEPH.CONF].",
            discussion:
                "rbd: virtnbd starts a qemu-storage-daemon that opens the Ceph RBD image (qemu-block-extra's rbd driver) and exports it over vhost-user in a private directory, restarts it if it exits, and stops it at exit."
        ))
    var device: String?
    @Flag(
        name: .long,
        help:
            "Throwaway writes (as qemu-nbd -s): writes, trims and zeroes go to a RAM overlay, dropped at exit; the device is never written."
    ) var snapshot = false
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Where --snapshot keeps written bytes: ram (default) or file, a temporary file beside the --file image (in TMPDIR, default /var/tmp, for other devices), unlinked at once. Implies --snapshot.",
            valueName: "ram|file")) var snapshotOverlay: ExportConfig.SnapshotStorage?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep a dirty bitmap NAME, offered as the meta context qemu:dirty-bitmap:NAME (repeatable). A --file export's bitmaps persist in FILE.bitmaps.",
            valueName: "name")) var bitmap: [String] = []
    @Option(
        name: .long, parsing: .unconditional,
        help: ArgumentHelp("Bytes per bit of a new --bitmap, 4K to 2G (default 64K).", valueName: "size"),
        transform: ByteSize.parse) var bitmapGranularity: ByteSize?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Open a control socket (mode 0600) for `virtnbd bitmap` at this path; never on TCP.", valueName: "path"))
    var control: String?

    @Flag(name: [.short, .long], help: "Serve one client on stdin/stdout (for nbd_connect_command / nbdsh).")
    var stdio = false
    @Option(
        name: .long, help: "Run CMD with $uri, $unixsocket, $port set, then stop the server and exit with CMD's status."
    ) var run: String?
    @Option(
        name: .long, help: "Refuse clients beyond this many at once, before the greeting (default 1024; 0 = no limit).")
    var maxConnections: Int?
    @Option(
        name: .long,
        help:
            "On SIGTERM/SIGINT, how many seconds a client may take to read the replies already queued for it before it is closed anyway (default 30)."
    ) var shutdownTimeout: Int = 30
    @Option(
        name: .long, parsing: .unconditional,
        help: ArgumentHelp(
            "What all clients together may make the server hold in unparsed input and requests in flight (default 96M); beyond it, connections holding the most stop reading.",
            valueName: "size"),
        transform: ByteSize.parse) var memoryBudget: ByteSize?
    @Option(
        name: .long,
        help:
            "Close a client that sends nothing for this many seconds in the middle of a request, e.g. a WRITE's payload (default 30)."
    ) var payloadTimeout: Int = 30
    @Option(
        name: .long,
        help:
            "Refuse a TCP client address's connections beyond this many at once, before the greeting (default 0 = only --max-connections applies)."
    ) var maxConnectionsPerAddress: Int = 0
    @Option(name: .long, help: "Drop clients that have not finished negotiating after this many seconds (default 10).")
    var handshakeTimeout: Int?
    @Flag(
        inversion: .prefixedNo,
        help:
            "TCP keepalive on TCP clients (default on): one that vanished without closing is closed after idle + interval × count seconds, freeing its slot. Unix sockets are not affected."
    ) var keepalive: Bool?
    @Option(name: .long, help: "Keepalive: seconds of silence before the first probe (default 60).")
    var keepaliveIdle: Int?
    @Option(name: .long, help: "Keepalive: seconds between probes (default 10).") var keepaliveInterval: Int?
    @Option(name: .long, help: "Keepalive: unanswered probes after which the client is closed (default 6).")
    var keepaliveCount: Int?
    @Option(
        name: .long,
        help:
            "TLS: off, on (offer STARTTLS) or require (refuse plaintext). Default off, or on with --tls-certificates/--tls-psk."
    ) var tls: NBDTLSPolicy?
    @Option(name: .long, help: "Directory with ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit/qemu).")
    var tlsCertificates: String?
    @Option(name: .long, help: "PSK key file in psktool format (identity:hexkey lines).") var tlsPsk: String?
    @Flag(
        name: .long,
        help:
            "Require a client certificate signed by ca-cert.pem in the --tls-certificates directory (as nbdkit); others fail the TLS handshake."
    ) var tlsVerifyPeer = false
    @Option(
        name: .long,
        help:
            "YAML config file with listeners, limits, TLS and several exports (see Config/virtnbd.yaml). Flags override it. SIGHUP re-reads it."
    ) var config: String?
    @Option(
        name: .long, help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics.", valueName: "host:port")
    ) var metrics: String?
    @Option(
        name: [.customShort("P"), .long],
        help: ArgumentHelp("Write the server's pid to FILE once it listens; removed on exit.", valueName: "file"))
    var pidfile: String?
    @Flag(name: .long, help: "Shut down gracefully when the parent process exits (Linux PR_SET_PDEATHSIG).")
    var exitWithParent = false
    @Flag(name: [.short, .long], help: "Debug logging (in -s/--run mode: any logging beyond warnings).") var verbose =
        false
    @Flag(
        name: [.customShort("V"), .long],
        help:
            "Print virtnbd's version, the git commit it was built from and its components' (Swift, SwiftNIO, NIOSSL/BoringSSL), and exit."
    ) var version =
        false

    func validate() throws {
        if version { return }
        // Queue sizes are checked with the ring format and the file's exports in ServerConfig's merge.
        do { try driverOptions(queueSize: 256).validate() } catch {
            throw ValidationError("\(error)")
        }
        guard pollMicroseconds >= 0, pollMicroseconds <= 1_000_000, requestTimeout >= 0 else {
            throw ValidationError("--poll-us must be 0-1000000 and --request-timeout ≥ 0")
        }
        guard devicePollMicroseconds >= 0, devicePollMicroseconds <= 1_000_000 else {
            throw ValidationError("--device-poll-us must be 0-1000000 microseconds, not \(devicePollMicroseconds)")
        }
        guard reconnectTimeout >= 0, reconnectTimeout <= 86400 else {
            throw ValidationError(
                "--reconnect-timeout must be 0 (fail at once) to 86400 seconds, not \(reconnectTimeout)")
        }
        if let p = port {
            guard (1...65535).contains(p) else { throw ValidationError("--port must be 1-65535, not \(p)") }
        }
        if let m = maxConnections, m < 0 {
            throw ValidationError("--max-connections must be 0 (no limit) or more, not \(m)")
        }
        guard (1...3600).contains(shutdownTimeout) else {
            throw ValidationError("--shutdown-timeout must be 1 to 3600 seconds, not \(shutdownTimeout)")
        }
        guard (1...86400).contains(payloadTimeout) else {
            throw ValidationError("--payload-timeout must be 1 to 86400 seconds, not \(payloadTimeout)")
        }
        if let b = memoryBudget, b.bytes < 1 << 20 {
            throw ValidationError("--memory-budget must be at least 1M, not \(b.bytes) bytes")
        }
        guard maxConnectionsPerAddress >= 0 else {
            throw ValidationError(
                "--max-connections-per-address must be 0 (no limit) or more, not \(maxConnectionsPerAddress)")
        }
        if let h = handshakeTimeout, h <= 0 {
            throw ValidationError("--handshake-timeout must be at least 1 second, not \(h)")
        }
        if let d = device {
            guard let spec = DeviceSpec(d) else {
                throw ValidationError(
                    "--device must be emulator, vhost-user:/path/to.sock, vfio:0000:00:05.0 or rbd:POOL/IMAGE[@CEPH.CONF], not \"\(d)\""
                )
            }
            if spec != .emulator && (size != nil || file != nil) {
                throw ValidationError(
                    "--size and --file configure the emulator; they cannot be used with --device \(d)")
            }
        }
        if let e = exportName, e.utf8.count > 4096 { throw ValidationError("--export-name is limited to 4096 bytes") }
        try refuseContradictions()
        if let m = metrics {
            do { _ = try VirtNBDConfig.hostPort(m, flag: "--metrics") } catch {
                throw ValidationError(Self.message(error))
            }
        }
        if let p = pidfile, p.isEmpty { throw ValidationError("-P/--pidfile needs a file name") }
        do { _ = try allowList() } catch { throw ValidationError("--allow: \(error)") }
    }

    /// Flags that ask for two different things (the configuration file refuses its own contradictions).
    func refuseContradictions() throws {
        let tcp = [port.map { "-p \($0)" }, listen.first.map { "--listen \($0)" }].compactMap { $0 }
        if unix != nil, let t = tcp.first {
            throw ValidationError(
                "-U/--unix listens on a Unix socket only, so \(t) would be ignored; give either -U or -p/--listen (several listeners: repeat --listen, which also takes socket paths)"
            )
        }
        if stdio, let other = (tcp + [unix.map { _ in "-U/--unix" }, run.map { _ in "--run" }].compactMap { $0 }).first
        {
            throw ValidationError(
                "-s/--stdio serves one client on stdin/stdout and listens nowhere, so it cannot be combined with \(other)"
            )
        }
        if Self.activationRequested(),
            let other = (tcp + [unix.map { _ in "-U/--unix" }, stdio ? "-s/--stdio" : nil].compactMap { $0 }).first
        {
            throw ValidationError(
                "virtnbd was handed a listening socket (socket activation: LISTEN_PID/LISTEN_FDS), so it cannot also follow \(other); drop \(other), or unset LISTEN_FDS"
            )
        }
    }

    /// `--allow`, every occurrence and comma-separated item; nil when not given.
    func allowList() throws(IPNetworkError) -> AccessList? {
        guard !allow.isEmpty else { return nil }
        return try AccessList(
            parsing: allow.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) })
    }

    /// The virtio policy the flags ask for (every export's driver uses it).
    func driverOptions(queueSize: Int) -> DriverOptions {
        var o = DriverOptions()
        o.ring = ring
        o.queues = queues ?? System.coreCount
        o.queueSize = queueSize
        o.eventIndex = !noEventIdx
        o.indirect = !noIndirect
        o.pollMicroseconds = pollMicroseconds
        o.requestTimeoutSeconds = requestTimeout
        o.reconnectTimeoutSeconds = reconnectTimeout
        o.completions = .caller // the event loop that submits to a queue reaps it (NBDServer.QueueReapers)
        return o
    }

    /// One export to open: its name, description, device and read-only flag.
    struct ExportPlan: Equatable {
        var name: String
        var description: String
        var device: DeviceSpec
        var size: UInt64?
        var file: String?
        var readOnly: Bool
        /// The virtio policy (ring, queues, features, queue size) of this export's driver.
        var driver: DriverOptions
        /// The emulator's poll window (`--device-poll-us`); other devices poll as they do.
        var devicePollMicroseconds = 50
        /// RAM exports: the emulator runs to completion on the notifying loop (`--device-inline`, the default).
        var deviceInline = true
        /// NBD_INFO_BLOCK_SIZE's maximum payload.
        var maxPayload: UInt32
        /// Where `size` came from, for messages: `--size` or `exports[1].size in FILE`.
        var sizeKey = "--size"
        /// `allow-dn` / `allow-psk`: only these TLS clients may use it (nil: everyone).
        var allowedClients: NBDClientAllowList? = nil
        /// The export's own `tls: require`: plaintext clients get ERR_TLS_REQD for it.
        var requiresTLS = false
        /// `--snapshot`: an overlay takes every write, in RAM or a temporary file.
        var snapshot = false
        var snapshotOverlay = ExportConfig.SnapshotStorage.ram
        /// `--bitmap`: the dirty bitmaps to keep, and the granularity of new ones.
        var bitmaps: [String] = []
        var bitmapGranularity = ExportConfig.defaultBitmapGranularity
        /// --control: dirty tracking is ready for bitmaps added at run time.
        var tracking = false

        /// What a reload changes in place, without touching the device or its clients.
        var presentation: NBDExport.Presentation {
            .init(description: description, allowedClients: allowedClients, requiresTLS: requiresTLS)
        }

        /// Whether `other` differs from this plan at most in its presentation.
        func sameDevice(as other: ExportPlan) -> Bool {
            var a = self
            a.description = other.description
            a.allowedClients = other.allowedClients
            a.requiresTLS = other.requiresTLS
            return a == other
        }

        /// The settings that differ, for a reload's warning: `size 1048576 → 2097152`.
        func differences(from o: ExportPlan) -> [String] {
            var d: [String] = []
            func note<T: Equatable>(_ key: String, _ a: T, _ b: T) { if a != b { d.append("\(key) \(a) → \(b)") } }
            note("device", "\(device)", "\(o.device)")
            note("size", size.map { "\($0)" } ?? "-", o.size.map { "\($0)" } ?? "-")
            note("file", file ?? "-", o.file ?? "-")
            note("read-only", readOnly, o.readOnly)
            note("max-payload", maxPayload, o.maxPayload)
            note("snapshot", snapshot, o.snapshot)
            note("bitmaps", bitmaps, o.bitmaps)
            if driver != o.driver || devicePollMicroseconds != o.devicePollMicroseconds
                || deviceInline != o.deviceInline
            {
                d.append("virtqueue settings")
            }
            if d.isEmpty { d.append("device settings") }
            return d
        }
    }

    /// Everything `run` needs: the flags merged over `--config` (or over nothing), defaults applied.
    struct Plan {
        var exports: [ExportPlan]
        var listeners: [ListenAddress]
        var allow: AccessList
        var maxConnections: Int
        var handshakeTimeout: Int
        var keepalive: VirtNBDConfig.Keepalive
        var tls: NBDTLSPolicy
        var tlsCertificates: String?
        var tlsPsk: String?
        var tlsVerifyPeer = false
        var level: Logger.Level
        /// `host:port` of the metrics endpoint.
        var metrics: String?

        /// The settings a reload cannot change (they take effect on restart), for a warning.
        var restartOnly: [String: String] {
            [
                "listen": listeners.map(\.description).joined(separator: ", "),
                "limits.max-connections": "\(maxConnections)",
                "limits.handshake-timeout": "\(handshakeTimeout)", "limits.keepalive": "\(keepalive)",
                "tls.policy": tls.rawValue,
                "tls.certificates": tlsCertificates ?? "-",
                "tls.psk": tlsPsk ?? "-", "tls.verify-peer": "\(tlsVerifyPeer)", "log.level": "\(level)",
                "metrics": metrics ?? "-",
            ]
        }
    }

    /// The flags exactly as given: nil (or false) for every flag not on the command line.
    func overrides() throws -> CommandLineOverrides {
        var flags = CommandLineOverrides(
            port: port, listen: listen, unix: unix.map(Self.absolutePath), maxConnections: maxConnections,
            handshakeTimeout: handshakeTimeout,
            verbose: verbose, tls: tls.map { TLSPolicy(rawValue: $0.rawValue)! }, tlsCertificates: tlsCertificates,
            tlsPsk: tlsPsk,
            exportName: exportName, description: description, readOnly: readOnly, size: size?.bytes, file: file,
            device: device, queueSize: queueSize, metrics: metrics, allow: try allowList(),
            maxPayload: maxPayload?.bytes, packedRing: ring == .packed)
        flags.tlsVerifyPeer = tlsVerifyPeer
        flags.snapshot = snapshot
        flags.snapshotOverlay = snapshotOverlay
        flags.bitmaps = bitmap
        flags.bitmapGranularity = bitmapGranularity?.bytes
        flags.keepalive = keepalive
        flags.keepaliveIdle = keepaliveIdle
        flags.keepaliveInterval = keepaliveInterval
        flags.keepaliveCount = keepaliveCount
        return flags
    }

    /// Captive modes (a client or command owns this process): quiet unless -v.
    func captive(activated: Bool) -> Bool { stdio || run != nil || (activated && config == nil) }

    func plan(activated: Bool) throws -> Plan {
        let flags = try overrides()
        let cfg =
            try config.map { (path) throws(ConfigError) in try VirtNBDConfig.load(path: path).merged(with: flags) }
            ?? VirtNBDConfig.fromCommandLine(flags)
        let flagExport = size != nil || file != nil || device != nil ? (exportName ?? "") : nil
        var exports: [ExportPlan] = []
        for (i, e) in cfg.exports.enumerated() {
            var p = ExportPlan(
                name: e.name, description: e.description, device: .emulator, size: nil, file: nil, readOnly: e.readOnly,
                driver: driverOptions(queueSize: e.queueSize), maxPayload: e.maxPayload)
            p.devicePollMicroseconds = devicePollMicroseconds
            p.deviceInline = deviceInline
            if let path = config, e.name != flagExport { p.sizeKey = "exports[\(i)].size in \(path)" }
            p.requiresTLS = cfg.effectiveTLS(for: e) == .require
            p.snapshot = e.snapshot
            p.snapshotOverlay = e.snapshotOverlay
            p.bitmaps = e.bitmaps
            p.bitmapGranularity = e.bitmapGranularity
            p.tracking = control != nil
            if e.isRestricted {
                p.allowedClients = NBDClientAllowList(
                    certificateDNs: Set(e.allowDN ?? []), pskIdentities: Set(e.allowPSK ?? []))
            }
            switch e.device {
            case .simulated: break
            case .ram(let sz): p.size = sz
            case .file(let fp, let sz):
                p.file = fp
                p.size = sz
            case .vhostUser(let sock): p.device = .vhostUser(path: sock)
            case .vfio(let a): p.device = .vfio(address: a)
            case .rbd(let pool, let image, let conf): p.device = .rbd(RBDImage(pool: pool, image: image, conf: conf))
            }
            exports.append(p)
        }
        let listeners: [ListenAddress] = cfg.listeners.map {
            switch $0 {
            case .tcp(let h, let p): return .tcp(host: h, port: p)
            case .unix(let u): return .unix(path: u)
            }
        }
        var level = Logger.Level(rawValue: cfg.logLevel.rawValue) ?? .info
        if captive(activated: activated) && !verbose && level == .info { level = .warning }
        return Plan(
            exports: exports, listeners: listeners, allow: cfg.allow, maxConnections: cfg.limits.maxConnections,
            handshakeTimeout: cfg.limits.handshakeTimeout, keepalive: cfg.limits.keepalive,
            tls: NBDTLSPolicy(rawValue: cfg.serverTLSPolicy.rawValue) ?? .off,
            tlsCertificates: cfg.tls.certificates, tlsPsk: cfg.tls.psk, tlsVerifyPeer: cfg.tls.verifyPeer, level: level,
            metrics: cfg.metrics)
    }

    /// A start that cannot go on: `virtnbd: WHAT; FIX` on stderr (not a log line, so that it reads
    /// the same as a usage error, whatever the log level), then exit status 1.
    static func startFailure(_ message: String) -> ExitCode {
        Console.err("virtnbd: \(message)\n")
        return ExitCode(1)
    }

    /// A configuration error as one line: a flag's problem without the "command line:" prefix.
    static func message(_ error: Error) -> String {
        if let c = error as? ConfigError, c.file == "command line" { return "\(c.keyPath): \(c.problem); \(c.fix)" }
        return "\(error)"
    }

    /// Where a listener came from, for the fix in a bind error.
    func listenerKey(_ index: Int, _ a: ListenAddress) -> String {
        if case .boundSocket = a { return "the .socket unit" }
        if let path = config, port == nil && listen.isEmpty && unix == nil { return "listen[\(index)] in \(path)" }
        if case .unix = a, unix != nil { return "-U" }
        if case .unix = a { return "--listen" }
        return "-p/--listen"
    }

    func serve() async throws {
        if version {
            Console.out(Versions.text)
            return
        }
        let parentAtStart = getppid()
        let activation = try inheritedSocket()
        let activated = activation != nil
        var plan: Plan
        do { plan = try self.plan(activated: activated) } catch {
            Console.err("virtnbd: \(Self.message(error))\n")
            throw ExitCode(1)
        }
        let logger = Self.bootstrapLogging(plan.level)
        FileLimit.ensure(connections: plan.maxConnections, logger: logger)
        // Before any export exists: each export makes its metrics through the bootstrapped factory.
        let registry = plan.metrics != nil ? MetricsBackend.bootstrap() : nil
        let reloads = ReloadCounters(
            ok: Counter(label: ExportMetrics.Name.configReloads, dimensions: [("result", "ok")]),
            failed: Counter(label: ExportMetrics.Name.configReloads, dimensions: [("result", "error")]))

        // Signals first: from here on SIGINT/SIGTERM drain instead of killing, and SIGHUP reloads.
        let events = ServerEvents()
        events.handleSignals(reload: true)
        if exitWithParent {
            do { try ParentWatch.start(events: events, parentAtStart: parentAtStart, logger: logger) } catch {
                throw Self.startFailure("\(error)")
            }
        }

        // What can fail without touching anything comes before the exports, which may create files.
        var limits: ServerLimits
        do { limits = try Self.serverLimits(plan) } catch {
            throw Self.startFailure("\(error)")
        }
        limits.shutdownTimeout = .seconds(Int64(shutdownTimeout))
        limits.payloadTimeout = .seconds(Int64(payloadTimeout))
        if let b = memoryBudget { limits.memoryBudget = Int(clamping: b.bytes) }
        limits.maxConnectionsPerAddress = maxConnectionsPerAddress
        if let path = pidfile, let problem = PidFile.directoryProblem(path) {
            throw Self.startFailure("\(problem)")
        }
        var exports: ExportSet
        do { exports = try ExportSet.open(plan.exports, logger: logger) } catch {
            throw Self.startFailure("\(error)")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        let server = NBDServer(exports: exports.exports, group: group, limits: limits, logger: logger)
        var running = Running(server: server, group: group)
        do {
            try await start(plan, activation: activation, registry: registry, events: events, exports, &running, logger)
        } catch {
            let removed = await running.teardown(exports, startFailed: true)
            if !removed.isEmpty {
                logger.notice("the start failed: removed what it created (\(removed.joined(separator: ", ")))")
            }
            throw error
        }
        let status = await eventLoop(
            events, &exports, &plan, running, activated: activated, reloads: reloads, logger: logger)
        events.beginDrain(logger: logger)
        await running.teardown(exports)
        logger.info("stopped; \(exports.live.map(\.disk.statsSummary).joined(separator: " | "))")
        if status != 0 { throw ExitCode(status) }
    }

    /// Refuses a `-s` without a client on stdin/stdout, and an inherited socket (systemd / libnbd
    /// socket activation: LISTEN_PID is us and LISTEN_FDS ≥ 1 → fd 3) that cannot serve. Returns
    /// the inherited socket, if any.
    private func inheritedSocket() throws -> Int32? {
        if stdio, let problem = Self.stdioProblem() {
            Console.err("virtnbd: \(problem)\n")
            throw ExitCode(1)
        }
        let activation = Self.socketActivationFD()
        if let fd = activation, let problem = Self.inheritedSocketProblem(fd) {
            Console.err("virtnbd: \(problem)\n")
            throw ExitCode(1)
        }
        return activation
    }

    /// swift-log to stderr at `level`; the logger every part of the server is given.
    private static func bootstrapLogging(_ level: Logger.Level) -> Logger {
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        return Logger(label: "virtnbd")
    }

    /// The server's limits from the plan; throws if the TLS credentials do not load.
    private static func serverLimits(_ plan: Plan) throws -> ServerLimits {
        var limits = ServerLimits()
        limits.tls = try TLSSettings.load(
            policy: plan.tls, certificates: plan.tlsCertificates, pskFile: plan.tlsPsk,
            verifyPeer: plan.tlsVerifyPeer)
        limits.maxConnections = plan.maxConnections
        limits.allow = plan.allow
        limits.handshakeTimeout = .seconds(Int64(plan.handshakeTimeout))
        let k = plan.keepalive
        limits.keepalive = k.enabled ? TCPKeepalive(idle: k.idle, interval: k.interval, count: k.count) : nil
        return limits
    }

    /// `virtnbd_config_reloads_total`, by result.
    private struct ReloadCounters {
        let ok: Metrics.Counter
        let failed: Metrics.Counter
    }

    /// What `serve` has started, for the teardown.
    private struct Running {
        let server: NBDServer
        let group: MultiThreadedEventLoopGroup
        var endpoint: MetricsEndpoint?
        var addresses: [ListenAddress] = []
        var tempDir: String?
        var pid: PidFile?
        var control: ControlServer?
        /// --run's command while it runs.
        var command: RunCommand?

        /// Stops accepting, drains every client, flushes and resets every device. After a failed
        /// start, also removes the files the start created; returns those.
        @discardableResult
        func teardown(_ exports: ExportSet, startFailed: Bool = false) async -> [String] {
            await control?.close()
            await server.shutdown()
            await endpoint?.close()
            let removed = exports.closeAll(removingCreatedFiles: startFailed)
            try? await group.shutdownGracefully()
            if let d = tempDir { try? FileManager.default.removeItem(atPath: d) }
            pid?.remove()
            return removed
        }
    }

    /// Everything between opening the exports and the event loop: the metrics endpoint, the
    /// listeners (or the stdio client), the pidfile, then --run's command or the URIs. A failure
    /// is logged here and thrown as exit status 1; the caller tears down what `running` holds.
    private func start(
        _ plan: Plan, activation: Int32?, registry: PrometheusCollectorRegistry?, events: ServerEvents,
        _ exports: ExportSet, _ running: inout Running, _ logger: Logger
    ) async throws {
        let server = running.server
        if let registry, let m = plan.metrics, let hp = try? VirtNBDConfig.hostPort(m, flag: "metrics") {
            do {
                running.endpoint = try await MetricsEndpoint.start(
                    host: hp.host, port: hp.port, group: running.group, registry: registry,
                    beforeScrape: { for e in server.exports { e.metrics.sample(e.device) } }, logger: logger)
                logger.info("metrics at http://\(m)/metrics")
            } catch {
                let key = metrics != nil ? "--metrics" : "metrics in \(config ?? "the configuration")"
                throw Self.startFailure(
                    Self.bindFailure(.tcp(host: hp.host, port: hp.port), error, key: key, what: "metrics"))
            }
        }

        if let path = control {
            do {
                running.control = try await ControlServer.start(
                    path: path, group: running.group, exports: { server.exports }, logger: logger)
            } catch {
                throw Self.startFailure("cannot open the control socket \(path) (--control): \(error)")
            }
        }
        if stdio {
            logger.info("serving \(exports.live.map(\.disk.label).joined(separator: ", ")) on stdin/stdout")
            Task {
                do { try await server.serveStdio() } catch { logger.error("stdio: \(error)") }
                events.post(.clientGone)
            }
        } else {
            try await bindListeners(plan, activation: activation, exports, &running, logger)
        }
        if let path = pidfile {
            do { running.pid = try PidFile.write(path) } catch {
                throw Self.startFailure("\(error)")
            }
        }
        announce(plan, exports, &running, events, logger)
    }

    /// Binds the listeners: an inherited socket (socket activation), a private socket for --run, or
    /// the plan's listeners.
    private func bindListeners(
        _ plan: Plan, activation: Int32?, _ exports: ExportSet, _ running: inout Running, _ logger: Logger
    ) async throws {
        running.addresses = plan.listeners
        if let fd = activation {
            running.addresses = [.boundSocket(fd: fd)]
        } else if run != nil && port == nil && listen.isEmpty && unix == nil && config == nil {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virtnbd-\(getpid())").path
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            running.tempDir = dir
            running.addresses = [.unix(path: dir + "/nbd.sock")]
        }
        for (i, address) in running.addresses.enumerated() {
            do {
                try await running.server.listen(address)
            } catch {
                throw Self.startFailure(
                    Self.bindFailure(address, error, key: listenerKey(i, address), what: "NBD clients"))
            }
        }
        logger.info(
            "limits: max-connections \(plan.maxConnections == 0 ? "0 (no limit)" : "\(plan.maxConnections)"), handshake-timeout \(plan.handshakeTimeout) s, keepalive \(plan.keepalive), memory-budget \(running.server.memoryBudget >> 20) MiB, payload-timeout \(payloadTimeout) s\(maxConnectionsPerAddress > 0 ? ", max-connections-per-address \(maxConnectionsPerAddress)" : "")"
        )
        for l in exports.live { logServing(l, exports.live, running.addresses, tls: plan.tls, logger) }
    }

    /// Starts --run's command with the default export's URI, or prints every export on every
    /// listener, in the file's order (exports, then listeners). Nothing for stdio or an inherited socket.
    private func announce(
        _ plan: Plan, _ exports: ExportSet, _ running: inout Running, _ events: ServerEvents, _ logger: Logger
    ) {
        let addresses = running.addresses
        guard !stdio, let first = addresses.first else { return }
        let tls = plan.tls != .off
        if let cmd = run {
            let uri = Self.uri(first, Self.defaultExport(exports.live)?.export.info.name ?? "", tls: tls)
            running.command = RunCommand.start(cmd, uri: uri, address: first, events: events, logger: logger)
        } else if case .boundSocket = first {
        } else {
            let lines = exports.live.flatMap { l in
                addresses.map { Self.uri($0, l.export.info.name, tls: tls) + "\n" }
            }
            if let why = Console.out(lines.joined()) {
                logger.warning(
                    "cannot print the URIs on stdout (\(why)); serving anyway: the log's \"serving\" lines name them")
            }
        }
    }

    /// Serves until a signal, the parent's exit, --run's command or the stdio client ends it; SIGHUP
    /// reloads. Returns the exit status (--run's command's, else 0).
    private func eventLoop(
        _ events: ServerEvents, _ exports: inout ExportSet, _ plan: inout Plan, _ running: Running, activated: Bool,
        reloads: ReloadCounters, logger: Logger
    ) async -> Int32 {
        for await event in events.stream {
            switch event {
            case .reload:
                let server = running.server
                if let summary = await reload(&exports, &plan, server: server, activated: activated, logger: logger) {
                    reloads.ok.increment()
                    let new = Set(summary.added + summary.changed)
                    for l in exports.live where new.contains(l.plan.name) {
                        logServing(l, exports.live, running.addresses, tls: plan.tls, logger)
                    }
                } else if config != nil {
                    reloads.failed.increment()
                }
            case .terminate(let sig):
                let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
                // With --run, the command goes first: virtnbd exits with its status once it has exited.
                // (If it has just exited, its status is on its way as the next event.)
                if let c = running.command {
                    c.stop(signal: sig, reason: "\(name) received", logger: logger)
                    continue
                }
                logger.info("\(name) received: draining connections")
                return 0
            case .parentExited:
                let reason = "the parent process exited (--exit-with-parent)"
                if let c = running.command {
                    c.stop(signal: SIGTERM, reason: reason, logger: logger)
                    continue
                }
                logger.info("\(reason): draining connections")
                return 0
            case .commandExited(let s):
                return s
            case .clientGone:
                logger.info("client gone")
                return 0
            }
        }
        return 0
    }

    /// The export an empty name reaches: the one named "", else the first (as nbdkit and qemu-nbd).
    static func defaultExport(_ live: [LiveExport]) -> LiveExport? {
        live.first { $0.export.info.name.isEmpty } ?? live.first
    }

    private func logServing(
        _ l: LiveExport, _ all: [LiveExport], _ addresses: [ListenAddress], tls: NBDTLSPolicy, _ logger: Logger
    ) {
        let isDefault = Self.defaultExport(all)?.plan.name == l.plan.name && !l.export.info.name.isEmpty
        for a in addresses {
            logger.info(
                "serving \(l.disk.label) as \(Self.uri(a, l.export.info.name, tls: tls != .off))\(isDefault ? " (the default export: \(Self.uri(a, "", tls: tls != .off)) reaches it too)" : "")",
                metadata: [
                    "size": "\(l.export.info.size)", "read-only": "\(l.export.readOnly)",
                    "max-payload": "\(l.export.info.maximumPayload)",
                ])
        }
    }

    /// SIGHUP: re-reads --config (merged with the flags again) and applies its exports. A file that
    /// does not parse, or an export whose device cannot be opened, leaves everything as it was.
    /// Returns what changed, or nil when the running configuration stays.
    private func reload(
        _ exports: inout ExportSet, _ plan: inout Plan, server: NBDServer, activated: Bool, logger: Logger
    ) async -> ReloadSummary? {
        guard let path = config else {
            logger.notice("SIGHUP: nothing to reload (virtnbd was started without --config)")
            return nil
        }
        logger.info("SIGHUP: reloading \(path)")
        let next: Plan
        do { next = try self.plan(activated: activated) } catch {
            logger.error("reload failed, the running configuration stays: \(Self.message(error))")
            return nil
        }
        let before = plan.restartOnly
        for (key, value) in next.restartOnly.sorted(by: { $0.key < $1.key }) where before[key] != value {
            logger.warning(
                "reload: \(key) changed from \(before[key] ?? "-") to \(value); that takes effect when virtnbd restarts"
            )
        }
        do {
            let summary = try await exports.reload(to: next.exports, server: server, logger: logger)
            logger.info("configuration reloaded: \(summary)")
            plan.exports = next.exports
            return summary
        } catch {
            logger.error("reload failed, the running configuration stays: \(error)")
            return nil
        }
    }

    /// Whether LISTEN_PID is us and LISTEN_FDS ≥ 1 (sd_listen_fds(3)); leaves the environment alone.
    static func activationRequested() -> Bool {
        let env = ProcessInfo.processInfo.environment
        guard let pid = env["LISTEN_PID"].flatMap(Int32.init), pid == getpid(),
            let n = env["LISTEN_FDS"].flatMap(Int.init), n >= 1
        else { return false }
        return true
    }

    /// Socket activation (systemd, or libnbd's `[ CMD ]`): fd 3, with the variables removed.
    static func socketActivationFD() -> Int32? {
        guard activationRequested() else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        return 3
    }

    /// What a descriptor is, and whether NIO can serve NBD on it (a pipe or a socket).
    static func descriptorKind(_ fd: Int32) -> (usable: Bool, what: String) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return (false, "closed") }
        switch st.st_mode & S_IFMT {
        case S_IFIFO: return (true, "a pipe")
        case S_IFSOCK: return (true, "a socket")
        case S_IFCHR: return (false, isatty(fd) == 1 ? "a terminal" : "a character device such as /dev/null")
        case S_IFREG: return (false, "a regular file")
        case S_IFDIR: return (false, "a directory")
        case S_IFBLK: return (false, "a block device")
        default: return (false, "neither a pipe nor a socket")
        }
    }

    /// `-s`: stdin and stdout must be a pipe or socket to the client (NIO cannot poll anything else).
    static func stdioProblem() -> String? {
        let i = descriptorKind(0)
        let o = descriptorKind(1)
        if i.usable && o.usable { return nil }
        let which =
            !i.usable && !o.usable
            ? (i.what == o.what ? "stdin and stdout are \(i.what)" : "stdin is \(i.what) and stdout \(o.what)")
            : !i.usable ? "stdin is \(i.what)" : "stdout is \(o.what)"
        return
            "-s/--stdio speaks NBD on stdin and stdout, which must be a pipe or socket to the client, but \(which); let the client start virtnbd (e.g. nbdsh: h.connect_command(['virtnbd', '-s', ...])), or listen with -U PATH or -p PORT"
    }

    /// Socket activation hands over fd 3; it must be a listening socket.
    static func inheritedSocketProblem(_ fd: Int32) -> String? {
        let k = descriptorKind(fd)
        var listening: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if k.what == "a socket", getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0, listening != 0 {
            return nil
        }
        let what = k.what == "a socket" ? "a socket that is not listening" : k.what
        return
            "LISTEN_PID and LISTEN_FDS hand virtnbd a listening socket as fd \(fd) (socket activation), but fd \(fd) is \(what); start virtnbd from a .socket unit or a client's [ virtnbd ... ], or unset LISTEN_FDS"
    }

    /// One line for a socket that cannot be bound: the address, the OS's reason, and the fix.
    static func bindFailure(_ a: ListenAddress, _ error: Error, key: String, what: String) -> String {
        let place: String
        switch a {
        case .tcp(let h, let p): place = h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)"
        case .unix(let p): place = "Unix socket \(p)"
        case .boundSocket(let fd): place = "the inherited socket (fd \(fd))"
        }
        let head = "cannot listen for \(what) on \(place)"
        if let p = error as? UnixSocketPathProblem {
            switch p {
            case .notASocket:
                return "\(head): \(p): remove it yourself if it is not needed, or choose another path with \(key)"
            case .inUse: return "\(head): \(p); stop that server, or choose another path with \(key)"
            case .cannotInspect:
                return "\(head): \(p); check the directory's permissions, or choose another path with \(key)"
            }
        }
        var unresolved: String?
        if let e = error as? SocketAddressError.UnknownHost { unresolved = "\(e.host) (\(e.errorDescription))" }
        if let e = error as? SocketAddressError, case .unknown(let host, _) = e { unresolved = host }
        if let host = unresolved {
            return
                "\(head): cannot resolve \(host); give an address of this host with \(key) (0.0.0.0 or :: for all of them)"
        }
        guard let code = (error as? IOError)?.errnoCode else { return "\(head): \(error); check \(key)" }
        let reason = String(cString: strerror(code))
        let fix: String
        switch (code, a) {
        case (EADDRINUSE, .tcp(_, let p)):
            fix =
                "another process is already listening on port \(p) (another virtnbd, nbdkit or qemu-nbd? see ss -ltnp); stop it, or choose another port with \(key)"
        case (EADDRNOTAVAIL, .tcp(let h, _)):
            fix =
                "\(h) is not an address of this host (see ip -brief address); with \(key) give one of its addresses, 0.0.0.0 or :: for all of them, or 127.0.0.1 for local clients only"
        case (EACCES, .tcp(_, let p)) where p < 1024:
            fix =
                "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a port from 1024 up (NBD's is 10809) with \(key)"
        case (EACCES, .unix(let p)), (EPERM, .unix(let p)):
            fix =
                "virtnbd's user may not create a file in \((p as NSString).deletingLastPathComponent); choose another path with \(key)"
        case (ENOENT, .unix(let p)):
            fix =
                "the directory \((p as NSString).deletingLastPathComponent) does not exist; create it, or choose another path with \(key)"
        case (EAFNOSUPPORT, .tcp(let h, _)):
            fix = "\(h) is an IPv6 address and this host has no IPv6; use an IPv4 address with \(key)"
        default:
            fix = "check \(key)"
        }
        return "\(head): \(reason); \(fix)"
    }

    /// A relative path made absolute against the working directory at start, so that the URI
    /// printed works from anywhere.
    static func absolutePath(_ path: String) -> String {
        guard !path.hasPrefix("/") else { return path }
        let cwd = FileManager.default.currentDirectoryPath
        return (cwd.hasSuffix("/") ? cwd : cwd + "/") + (path.hasPrefix("./") ? String(path.dropFirst(2)) : path)
    }

    static func uri(_ a: ListenAddress, _ name: String, tls: Bool = false) -> String {
        let enc = name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? name
        let scheme = tls ? "nbds" : "nbd"
        switch a {
        case .tcp(let host, let port):
            let h = host.contains(":") ? "[\(host)]" : host
            return "\(scheme)://\(h):\(port)/\(enc)"
        case .unix(let path):
            return "\(scheme)+unix:///\(enc)?socket=\(path)"
        case .boundSocket:
            return "\(scheme)+systemd-socket-activation:///\(enc)"
        }
    }
}

extension NBDTLSPolicy: ExpressibleByArgument {}

extension ExportConfig.SnapshotStorage: ExpressibleByArgument {}
