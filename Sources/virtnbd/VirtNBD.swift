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
import ServerConfig
import Virtio
import VirtioBlock

struct VirtNBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtnbd",
        abstract: "An NBD server that exports a virtio-blk disk.",
        discussion: "With neither --size nor --file it serves a simulated 512 KiB disk.",
        subcommands: [Serve.self, Info.self, Copy.self],
        defaultSubcommand: Serve.self)
}

extension RingFormat: ExpressibleByArgument {}

/// Parses sizes such as 512, 64K, 64M, 1G, 2T (binary units).
struct ByteSize: ExpressibleByArgument {
    let bytes: UInt64
    init?(argument: String) {
        let s = argument.trimmingCharacters(in: .whitespaces).uppercased()
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = Substring(s), mult: UInt64 = 1
        if let last = s.last, let m = units[last] { mult = m; digits = s.dropLast() }
        else if s.hasSuffix("B"), let u = s.dropLast().last, let m = units[u] { mult = m; digits = s.dropLast(2) }
        guard let n = UInt64(digits) else { return nil }
        let (v, o) = n.multipliedReportingOverflow(by: mult)
        guard !o, v > 0 else { return nil }
        bytes = v
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve one export (the default command).")

    @Option(name: [.short, .long], help: "TCP port (default 10809).") var port: Int?
    @Option(name: .long, help: "Address to listen on.") var listen: String = "127.0.0.1"
    @Option(name: [.customShort("U"), .long], help: "Listen on this Unix socket instead of TCP.") var unix: String?
    @Option(name: .long, help: ArgumentHelp("Only TCP clients in this network may connect (CIDR, e.g. 10.0.0.0/8 or ::1/128; repeatable, or comma-separated). Default: everyone. Unix-socket clients are not filtered.", valueName: "cidr")) var allow: [String] = []
    @Option(name: [.short, .customLong("export-name")], help: "Export name.") var exportName: String = ""
    @Option(name: .long, help: "Export description (shown by nbdinfo --list).") var description: String = ""
    @Flag(name: [.short, .customLong("read-only")], help: "Export read-only.") var readOnly = false
    @Option(name: .long, help: "Size of a RAM disk (e.g. 64M), or of a --file to create.") var size: ByteSize?
    @Option(name: .long, help: "Serve this raw image file (created sparse with --size if missing).") var file: String?
    @Option(name: .long, help: "Virtqueue size, up to 32768 (a power of two for split rings).") var queueSize: Int = 256
    @Option(name: .long, help: "Virtqueue format: split or packed (packed falls back to split if the device lacks it).") var ring: RingFormat = .split
    @Option(name: .long, help: "Request virtqueues per device (VIRTIO_BLK_F_MQ; capped by the device). Default: one per event loop (one per CPU).") var queues: Int?
    @Flag(name: .customLong("no-event-idx"), help: "Do not negotiate VIRTIO_F_EVENT_IDX (use the NO_NOTIFY/NO_INTERRUPT flags).") var noEventIdx = false
    @Flag(name: .customLong("no-indirect"), help: "Do not negotiate VIRTIO_F_INDIRECT_DESC.") var noIndirect = false
    @Option(name: .customLong("poll-us"), help: "Poll the used ring this many microseconds after a completion before sleeping (0 = interrupts only).") var pollMicroseconds: Int = 0
    @Option(name: .long, help: "Reset the device and resubmit when a request takes longer than this many seconds (0 = never).") var requestTimeout: Double = 30
    @Option(name: .long, help: "The virtio-blk device: emulator (default), vhost-user:SOCKET, or vfio:PCI-ADDRESS.") var device: String = "emulator"

    @Flag(name: [.short, .long], help: "Serve one client on stdin/stdout (for nbd_connect_command / nbdsh).") var stdio = false
    @Option(name: .long, help: "Run CMD with $uri, $unixsocket, $port set, then stop the server and exit with CMD's status.") var run: String?
    @Option(name: .long, help: "Refuse clients beyond this many at once (0 = no limit).") var maxConnections: Int = 0
    @Option(name: .long, help: "Drop clients that have not finished negotiating after this many seconds.") var handshakeTimeout: Int = 10
    @Option(name: .long, help: "TLS: off, on (offer STARTTLS) or require (refuse plaintext).") var tls: NBDTLSPolicy = .off
    @Option(name: .long, help: "Directory with ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit/qemu).") var tlsCertificates: String?
    @Option(name: .long, help: "PSK key file in psktool format (identity:hexkey lines).") var tlsPsk: String?
    @Flag(name: .long, help: "Require a client certificate signed by ca-cert.pem in the --tls-certificates directory (as nbdkit); others fail the TLS handshake.") var tlsVerifyPeer = false
    @Option(name: .long, help: "YAML config file with listeners, limits, TLS and several exports (see Config/virtnbd.yaml). Flags override it. SIGHUP re-reads it.") var config: String?
    @Option(name: .long, help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics.", valueName: "host:port")) var metrics: String?
    @Option(name: [.customShort("P"), .long], help: ArgumentHelp("Write the server's pid to FILE once it listens; removed on exit.", valueName: "file")) var pidfile: String?
    @Flag(name: .long, help: "Shut down gracefully when the parent process exits (Linux PR_SET_PDEATHSIG).") var exitWithParent = false
    @Flag(name: [.short, .long], help: "Debug logging.") var verbose = false

    func validate() throws {
        do { try driverOptions(queueSize: queueSize).validate() } catch {
            throw ValidationError("\(error)".replacingOccurrences(of: "device failed: ", with: ""))
        }
        guard pollMicroseconds >= 0, pollMicroseconds <= 1_000_000, requestTimeout >= 0 else {
            throw ValidationError("--poll-us must be 0-1000000 and --request-timeout ≥ 0")
        }
        if let p = port { guard (1...65535).contains(p) else { throw ValidationError("--port must be 1-65535") } }
        guard maxConnections >= 0, handshakeTimeout > 0 else { throw ValidationError("--max-connections must be ≥ 0 and --handshake-timeout > 0") }
        guard let spec = DeviceSpec(device) else {
            throw ValidationError("--device must be emulator, vhost-user:/path/to.sock or vfio:0000:00:05.0, not \"\(device)\"")
        }
        if spec != .emulator && (size != nil || file != nil) {
            throw ValidationError("--size and --file configure the emulator; they cannot be used with --device \(device)")
        }
        guard !(stdio && (run != nil || unix != nil)) else { throw ValidationError("--stdio serves stdin/stdout; it cannot be combined with --run or --unix") }
        guard exportName.utf8.count <= 4096 else { throw ValidationError("--export-name is limited to 4096 bytes") }
        if let m = metrics {
            do { _ = try VirtNBDConfig.hostPort(m, flag: "--metrics") } catch { throw ValidationError("\(error)") }
        }
        if let p = pidfile, p.isEmpty { throw ValidationError("-P/--pidfile needs a file name") }
        do { _ = try allowList() } catch { throw ValidationError("--allow: \(error)") }
    }

    /// `--allow`, every occurrence and comma-separated item; nil when not given.
    func allowList() throws(IPNetworkError) -> AccessList? {
        guard !allow.isEmpty else { return nil }
        return try AccessList(parsing: allow.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) })
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
        /// `allow-dn` / `allow-psk`: only these TLS clients may use it (nil: everyone).
        var allowedClients: NBDClientAllowList? = nil
    }

    /// Everything `run` needs, from the flags alone or from `--config` merged with the flags.
    struct Plan {
        var exports: [ExportPlan]
        var listeners: [ListenAddress]
        var allow: AccessList
        var maxConnections: Int
        var handshakeTimeout: Int
        var tls: NBDTLSPolicy
        var tlsCertificates: String?
        var tlsPsk: String?
        var tlsVerifyPeer = false
        var level: Logger.Level
        /// `host:port` of the metrics endpoint.
        var metrics: String?

        /// The settings a reload cannot change (they take effect on restart), for a warning.
        var restartOnly: [String: String] {
            ["listen": listeners.map(\.description).joined(separator: ", "), "limits.max-connections": "\(maxConnections)",
             "limits.handshake-timeout": "\(handshakeTimeout)", "tls.policy": tls.rawValue, "tls.certificates": tlsCertificates ?? "-",
             "tls.psk": tlsPsk ?? "-", "tls.verify-peer": "\(tlsVerifyPeer)", "log.level": "\(level)", "metrics": metrics ?? "-"]
        }
    }

    func plan() throws -> Plan {
        guard let path = config else {
            var listeners: [ListenAddress] = [.tcp(host: listen, port: port ?? 10809)]
            if let u = unix { listeners = [.unix(path: u)] }
            return Plan(exports: [ExportPlan(name: exportName, description: description, device: DeviceSpec(device)!, size: size?.bytes,
                                             file: file, readOnly: readOnly, driver: driverOptions(queueSize: queueSize))],
                        listeners: listeners, allow: try allowList() ?? AccessList(), maxConnections: maxConnections, handshakeTimeout: handshakeTimeout,
                        tls: tls, tlsCertificates: tlsCertificates, tlsPsk: tlsPsk, tlsVerifyPeer: tlsVerifyPeer, level: verbose ? .debug : .info, metrics: metrics)
        }
        // Only flags that differ from their defaults override the file (see README, "Configuration file").
        var flags = CommandLineOverrides(
            port: port, listen: listen == "127.0.0.1" ? nil : listen, unix: unix,
            maxConnections: maxConnections == 0 ? nil : maxConnections, handshakeTimeout: handshakeTimeout == 10 ? nil : handshakeTimeout,
            verbose: verbose, tls: tls == .off ? nil : TLSPolicy(rawValue: tls.rawValue), tlsCertificates: tlsCertificates, tlsPsk: tlsPsk,
            exportName: exportName.isEmpty && size == nil && file == nil && device == "emulator" ? nil : exportName,
            description: description.isEmpty ? nil : description, readOnly: readOnly, size: size?.bytes, file: file,
            device: device == "emulator" ? nil : device, queueSize: queueSize == 256 ? nil : queueSize, metrics: metrics, allow: try allowList())
        flags.tlsVerifyPeer = tlsVerifyPeer
        let cfg = try VirtNBDConfig.load(path: path).merged(with: flags)
        var exports: [ExportPlan] = []
        for e in cfg.exports {
            var p = ExportPlan(name: e.name, description: e.description, device: .emulator, size: nil, file: nil, readOnly: e.readOnly, driver: driverOptions(queueSize: e.queueSize))
            if e.isRestricted { p.allowedClients = NBDClientAllowList(certificateDNs: Set(e.allowDN ?? []), pskIdentities: Set(e.allowPSK ?? [])) }
            switch e.device {
            case .simulated: break
            case .ram(let sz): p.size = sz
            case .file(let fp, let sz): p.file = fp; p.size = sz
            case .vhostUser(let sock): p.device = .vhostUser(path: sock)
            case .vfio(let a): p.device = .vfio(address: a)
            }
            exports.append(p)
        }
        let listeners: [ListenAddress] = cfg.listeners.map {
            switch $0 {
            case .tcp(let h, let p): return .tcp(host: h, port: p)
            case .unix(let u): return .unix(path: u)
            }
        }
        return Plan(exports: exports, listeners: listeners, allow: cfg.allow, maxConnections: cfg.limits.maxConnections,
                    handshakeTimeout: cfg.limits.handshakeTimeout, tls: NBDTLSPolicy(rawValue: cfg.serverTLSPolicy.rawValue) ?? .off,
                    tlsCertificates: cfg.tls.certificates, tlsPsk: cfg.tls.psk, tlsVerifyPeer: cfg.tls.verifyPeer,
                    level: Logger.Level(rawValue: cfg.logLevel.rawValue) ?? .info, metrics: cfg.metrics)
    }

    func run() async throws {
        let parentAtStart = getppid()
        var plan: Plan
        do { plan = try self.plan() } catch {
            FileHandle.standardError.write(Data("virtnbd: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let level = plan.level
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "virtnbd")
        // Before any export exists: each export makes its metrics through the bootstrapped factory.
        let registry = plan.metrics != nil ? MetricsBackend.bootstrap() : nil
        let reloads = (ok: Counter(label: "virtnbd_config_reloads_total", dimensions: [("result", "ok")]),
                       failed: Counter(label: "virtnbd_config_reloads_total", dimensions: [("result", "error")]))

        // Signals first: from here on SIGINT/SIGTERM drain instead of killing, and SIGHUP reloads.
        let events = ServerEvents()
        events.handleSignals(reload: true)
        if exitWithParent {
            do { try ParentWatch.start(events: events, parentAtStart: parentAtStart, logger: logger) } catch {
                logger.critical("\(error)")
                throw ExitCode(1)
            }
        }

        var exports: ExportSet
        do { exports = try ExportSet.open(plan.exports, logger: logger) } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        var limits = ServerLimits()
        do {
            limits.tls = try TLSSettings.load(policy: plan.tls, certificates: plan.tlsCertificates, pskFile: plan.tlsPsk, verifyPeer: plan.tlsVerifyPeer)
        } catch {
            logger.critical("TLS setup failed: \(error)")
            exports.closeAll()
            throw ExitCode(1)
        }
        limits.maxConnections = plan.maxConnections
        limits.allow = plan.allow
        limits.handshakeTimeout = .seconds(Int64(plan.handshakeTimeout))
        let server = NBDServer(exports: exports.exports, group: group, limits: limits, logger: logger)
        var endpoint: MetricsEndpoint?
        var addresses: [ListenAddress] = []
        var tempDir: String?
        var pid: PidFile?

        /// Stops accepting, drains every client, flushes and resets every device.
        func teardown() async {
            await server.shutdown()
            await endpoint?.close()
            exports.closeAll()
            try? await group.shutdownGracefully()
            for a in addresses { if case .unix(let path) = a { unlink(path) } }
            if let d = tempDir { try? FileManager.default.removeItem(atPath: d) }
            pid?.remove()
        }

        if let registry, let m = plan.metrics, let hp = try? VirtNBDConfig.hostPort(m, flag: "metrics") {
            do {
                endpoint = try await MetricsEndpoint.start(host: hp.host, port: hp.port, group: group, registry: registry,
                                                           beforeScrape: { for e in server.exports { e.metrics.sample(e.device) } }, logger: logger)
                logger.info("metrics at http://\(m)/metrics")
            } catch {
                logger.critical("cannot listen for metrics on \(m): \(error); is another server using it? Choose another --metrics port")
                await teardown()
                throw ExitCode(1)
            }
        }

        if stdio {
            logger.info("serving \(exports.live.map(\.disk.label).joined(separator: ", ")) on stdin/stdout")
            Task {
                do { try await server.serveStdio() } catch { logger.error("stdio: \(error)") }
                events.post(.clientGone)
            }
        } else {
            // Where to listen: an inherited socket (systemd), a private socket for --run, or the plan's listeners.
            addresses = plan.listeners
            if let fd = Self.socketActivationFD() {
                addresses = [.boundSocket(fd: fd)]
            } else if run != nil && port == nil && unix == nil && config == nil {
                let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virtnbd-\(getpid())").path
                try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                tempDir = dir
                addresses = [.unix(path: dir + "/nbd.sock")]
            }
            for address in addresses {
                do {
                    try await server.listen(address)
                } catch {
                    logger.critical("cannot listen on \(address): \(error); is another server using it?")
                    await teardown()
                    throw ExitCode(1)
                }
            }
            for l in exports.live { logServing(l, addresses, tls: plan.tls, logger) }
        }
        if let path = pidfile {
            do { pid = try PidFile.write(path) } catch {
                logger.critical("\(error)")
                await teardown()
                throw ExitCode(1)
            }
        }
        if !stdio, let first = addresses.first {
            let uri = Self.uri(first, exports.live.first?.export.info.name ?? "", tls: plan.tls != .off)
            if let cmd = run {
                Task { events.post(.commandExited(await Self.runCommand(cmd, uri: uri, address: first, logger: logger))) }
            } else if case .boundSocket = first {} else {
                FileHandle.standardOutput.write(Data((uri + "\n").utf8))
            }
        }

        var status: Int32 = 0
        loop: for await event in events.stream {
            switch event {
            case .reload:
                if let summary = await reload(&exports, &plan, server: server, logger: logger) {
                    reloads.ok.increment()
                    let new = Set(summary.added + summary.changed)
                    for l in exports.live where new.contains(l.plan.name) { logServing(l, addresses, tls: plan.tls, logger) }
                } else if config != nil {
                    reloads.failed.increment()
                }
            case .terminate(let sig):
                logger.info("\(sig == SIGINT ? "SIGINT" : "SIGTERM") received: draining connections")
                break loop
            case .parentExited:
                logger.info("parent process exited (--exit-with-parent): draining connections")
                break loop
            case .commandExited(let s):
                status = s
                break loop
            case .clientGone:
                logger.info("client gone")
                break loop
            }
        }
        await teardown()
        logger.info("stopped; \(exports.live.map(\.disk.statsSummary).joined(separator: " | "))")
        if status != 0 { throw ExitCode(status) }
    }

    private func logServing(_ l: LiveExport, _ addresses: [ListenAddress], tls: NBDTLSPolicy, _ logger: Logger) {
        for a in addresses {
            logger.info("serving \(l.disk.label) as \(Self.uri(a, l.export.info.name, tls: tls != .off))",
                        metadata: ["size": "\(l.export.info.size)", "read-only": "\(l.export.readOnly)"])
        }
    }

    /// SIGHUP: re-reads --config (merged with the flags again) and applies its exports. A file that
    /// does not parse, or an export whose device cannot be opened, leaves everything as it was.
    /// Returns what changed, or nil when the running configuration stays.
    private func reload(_ exports: inout ExportSet, _ plan: inout Plan, server: NBDServer, logger: Logger) async -> ReloadSummary? {
        guard let path = config else {
            logger.notice("SIGHUP: nothing to reload (virtnbd was started without --config)")
            return nil
        }
        logger.info("SIGHUP: reloading \(path)")
        let next: Plan
        do { next = try self.plan() } catch {
            logger.error("reload failed, the running configuration stays: \(error)")
            return nil
        }
        let before = plan.restartOnly
        for (key, value) in next.restartOnly.sorted(by: { $0.key < $1.key }) where before[key] != value {
            logger.warning("reload: \(key) changed from \(before[key] ?? "-") to \(value); that takes effect when virtnbd restarts")
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

    /// systemd socket activation (sd_listen_fds(3)): LISTEN_PID is us and LISTEN_FDS ≥ 1 → fd 3.
    static func socketActivationFD() -> Int32? {
        let env = ProcessInfo.processInfo.environment
        guard let pid = env["LISTEN_PID"].flatMap(Int32.init), pid == getpid(),
              let n = env["LISTEN_FDS"].flatMap(Int.init), n >= 1 else { return nil }
        unsetenv("LISTEN_PID"); unsetenv("LISTEN_FDS"); unsetenv("LISTEN_FDNAMES")
        return 3
    }

    /// `--run`: like nbdkit, run CMD through /bin/sh with $uri, $unixsocket and $port set.
    static func runCommand(_ cmd: String, uri: String, address: ListenAddress, logger: Logger) async -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", cmd]
        var env = ProcessInfo.processInfo.environment
        env["uri"] = uri
        switch address {
        case .unix(let path): env["unixsocket"] = path; env["nbd"] = uri
        case .tcp(_, let port): env["port"] = "\(port)"; env["nbd"] = uri
        case .boundSocket: break
        }
        p.environment = env
        return await withCheckedContinuation { (c: CheckedContinuation<Int32, Never>) in
            p.terminationHandler = { proc in c.resume(returning: proc.terminationStatus) }
            do { try p.run() } catch {
                logger.error("--run: cannot start /bin/sh: \(error)")
                p.terminationHandler = nil
                c.resume(returning: 127)
            }
        }
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
