import AccessControl
import ArgumentParser
import Dispatch
import Foundation
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import NIOPosix
import ServerConfig

@main
struct VirtNBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtnbd",
        abstract: "An NBD server that exports a virtio-blk disk.",
        discussion: "With neither --size nor --file it serves a simulated 512 KiB disk.",
        subcommands: [Serve.self],
        defaultSubcommand: Serve.self)
}

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
    @Option(name: .long, help: "Virtqueue size, a power of two up to 32768.") var queueSize: Int = 256
    @Option(name: .long, help: "The virtio-blk device: emulator (default), vhost-user:SOCKET, or vfio:PCI-ADDRESS.") var device: String = "emulator"

    @Flag(name: [.short, .long], help: "Serve one client on stdin/stdout (for nbd_connect_command / nbdsh).") var stdio = false
    @Option(name: .long, help: "Run CMD with $uri, $unixsocket, $port set, then stop the server and exit with CMD's status.") var run: String?
    @Option(name: .long, help: "Refuse clients beyond this many at once (0 = no limit).") var maxConnections: Int = 0
    @Option(name: .long, help: "Drop clients that have not finished negotiating after this many seconds.") var handshakeTimeout: Int = 10
    @Option(name: .long, help: "TLS: off, on (offer STARTTLS) or require (refuse plaintext).") var tls: NBDTLSPolicy = .off
    @Option(name: .long, help: "Directory with ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit/qemu).") var tlsCertificates: String?
    @Option(name: .long, help: "PSK key file in psktool format (identity:hexkey lines).") var tlsPsk: String?
    @Option(name: .long, help: "YAML config file with listeners, limits, TLS and several exports (see Config/virtnbd.yaml). Flags override it.") var config: String?
    @Flag(name: [.short, .long], help: "Debug logging.") var verbose = false

    func validate() throws {
        guard queueSize > 0, queueSize <= 32768, queueSize & (queueSize - 1) == 0 else {
            throw ValidationError("--queue-size must be a power of two between 1 and 32768, not \(queueSize)")
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
        do { _ = try allowList() } catch { throw ValidationError("--allow: \(error)") }
    }

    /// `--allow`, every occurrence and comma-separated item; nil when not given.
    func allowList() throws(IPNetworkError) -> AccessList? {
        guard !allow.isEmpty else { return nil }
        return try AccessList(parsing: allow.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) })
    }

    /// One export to open: its name, description, device and read-only flag.
    struct ExportPlan {
        var name: String
        var description: String
        var device: DeviceSpec
        var size: UInt64?
        var file: String?
        var readOnly: Bool
        var queueSize: Int
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
        var level: Logger.Level
    }

    func plan() throws -> Plan {
        guard let path = config else {
            var listeners: [ListenAddress] = [.tcp(host: listen, port: port ?? 10809)]
            if let u = unix { listeners = [.unix(path: u)] }
            return Plan(exports: [ExportPlan(name: exportName, description: description, device: DeviceSpec(device)!, size: size?.bytes,
                                             file: file, readOnly: readOnly, queueSize: queueSize)],
                        listeners: listeners, allow: try allowList() ?? AccessList(), maxConnections: maxConnections, handshakeTimeout: handshakeTimeout,
                        tls: tls, tlsCertificates: tlsCertificates, tlsPsk: tlsPsk, level: verbose ? .debug : .info)
        }
        // Only flags that differ from their defaults override the file (see README, "Configuration file").
        let flags = CommandLineOverrides(
            port: port, listen: listen == "127.0.0.1" ? nil : listen, unix: unix,
            maxConnections: maxConnections == 0 ? nil : maxConnections, handshakeTimeout: handshakeTimeout == 10 ? nil : handshakeTimeout,
            verbose: verbose, tls: tls == .off ? nil : TLSPolicy(rawValue: tls.rawValue), tlsCertificates: tlsCertificates, tlsPsk: tlsPsk,
            exportName: exportName.isEmpty && size == nil && file == nil && device == "emulator" ? nil : exportName,
            description: description.isEmpty ? nil : description, readOnly: readOnly, size: size?.bytes, file: file,
            device: device == "emulator" ? nil : device, queueSize: queueSize == 256 ? nil : queueSize, allow: try allowList())
        let cfg = try VirtNBDConfig.load(path: path).merged(with: flags)
        var exports: [ExportPlan] = []
        for e in cfg.exports {
            var p = ExportPlan(name: e.name, description: e.description, device: .emulator, size: nil, file: nil, readOnly: e.readOnly, queueSize: e.queueSize)
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
                    tlsCertificates: cfg.tls.certificates, tlsPsk: cfg.tls.psk,
                    level: Logger.Level(rawValue: cfg.logLevel.rawValue) ?? .info)
    }

    func run() async throws {
        let plan: Plan
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

        var disks: [ServedDisk] = []
        var exports: [NBDExport] = []
        for e in plan.exports {
            do {
                var elog = logger; elog[metadataKey: "export"] = "\(e.name)"
                let d = try e.device.open(size: e.size, file: e.file, readOnly: e.readOnly, queueSize: e.queueSize, logger: elog)
                disks.append(d)
                exports.append(NBDExport(name: e.name, description: e.description, device: d.device, forceReadOnly: e.readOnly))
            } catch {
                logger.critical("cannot start the device of export \"\(e.name)\": \(error)")
                for d in disks { d.shutdown() }
                throw ExitCode(1)
            }
        }
        let shutdownDisks = { for d in disks { d.shutdown() } }
        let summary = { disks.map(\.statsSummary).joined(separator: " | ") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        var limits = ServerLimits()
        do {
            limits.tls = try TLSSettings.load(policy: plan.tls, certificates: plan.tlsCertificates, pskFile: plan.tlsPsk)
        } catch {
            logger.critical("TLS setup failed: \(error)")
            shutdownDisks()
            throw ExitCode(1)
        }
        limits.maxConnections = plan.maxConnections
        limits.allow = plan.allow
        limits.handshakeTimeout = .seconds(Int64(plan.handshakeTimeout))
        let server = NBDServer(exports: exports, group: group, limits: limits, logger: logger)
        let finish = {
            shutdownDisks()
            try? await group.shutdownGracefully()
        }

        if stdio {
            logger.info("serving \(disks.map(\.label).joined(separator: ", ")) on stdin/stdout")
            do { try await server.serveStdio() } catch { logger.error("stdio: \(error)") }
            await server.shutdown()
            await finish()
            logger.info("client gone; \(summary())")
            return
        }

        // Where to listen: an inherited socket (systemd), a private socket for --run, or the plan's listeners.
        var addresses = plan.listeners
        var tempDir: String?
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
                await server.shutdown()
                await finish()
                throw ExitCode(1)
            }
        }
        let first = addresses[0]
        let uri = Self.uri(first, exports[0].info.name, tls: plan.tls != .off)
        for (e, d) in zip(exports, disks) {
            for a in addresses {
                logger.info("serving \(d.label) as \(Self.uri(a, e.info.name, tls: plan.tls != .off))",
                            metadata: ["size": "\(e.info.size)", "read-only": "\(e.readOnly)"])
            }
        }

        var status: Int32 = 0
        if let cmd = run {
            status = await Self.runCommand(cmd, uri: uri, address: first, logger: logger)
        } else {
            if case .boundSocket = first {} else { FileHandle.standardOutput.write(Data((uri + "\n").utf8)) }
            await Self.waitForTerminationSignal()
            logger.info("signal received: draining connections")
        }
        await server.shutdown()
        await finish()
        for a in addresses { if case .unix(let path) = a { unlink(path) } }
        if let d = tempDir { try? FileManager.default.removeItem(atPath: d) }
        logger.info("stopped; \(summary())")
        if status != 0 { throw ExitCode(status) }
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

    static func waitForTerminationSignal() async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let fired = SignalLatch(cont)
            for sig in [SIGINT, SIGTERM] {
                signal(sig, SIG_IGN)
                let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
                src.setEventHandler { fired.fire() }
                src.resume()
                SignalLatch.keep(src)
            }
        }
    }
}

/// Resumes a continuation once, whichever signal comes first.
final class SignalLatch: @unchecked Sendable {
    private var cont: CheckedContinuation<Void, Never>?
    private let lock = NSLock()
    nonisolated(unsafe) private static var sources: [DispatchSourceSignal] = []
    init(_ c: CheckedContinuation<Void, Never>) { cont = c }
    func fire() {
        lock.lock(); let c = cont; cont = nil; lock.unlock()
        c?.resume()
    }
    static func keep(_ s: DispatchSourceSignal) { sources.append(s) }
}

extension NBDTLSPolicy: ExpressibleByArgument {}
