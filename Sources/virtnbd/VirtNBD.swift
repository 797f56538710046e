import ArgumentParser
import Dispatch
import Foundation
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import NIOPosix

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
    }

    func run() async throws {
        let level: Logger.Level = verbose ? .debug : .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "virtnbd")

        let disk: ServedDisk
        do {
            disk = try DeviceSpec(device)!.open(size: size?.bytes, file: file, readOnly: readOnly, queueSize: queueSize, logger: logger)
        } catch {
            logger.critical("cannot start the device: \(error)")
            throw ExitCode(1)
        }
        let export = NBDExport(name: exportName, description: description, device: disk.device, forceReadOnly: readOnly)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        var limits = ServerLimits()
        do {
            limits.tls = try TLSSettings.load(policy: tls, certificates: tlsCertificates, pskFile: tlsPsk)
        } catch {
            logger.critical("TLS setup failed: \(error)")
            disk.shutdown()
            throw ExitCode(1)
        }
        limits.maxConnections = maxConnections
        limits.handshakeTimeout = .seconds(Int64(handshakeTimeout))
        let server = NBDServer(exports: [export], group: group, limits: limits, logger: logger)
        let finish = {
            disk.shutdown()
            try? await group.shutdownGracefully()
        }

        if stdio {
            logger.info("serving \(disk.label) on stdin/stdout")
            do { try await server.serveStdio() } catch { logger.error("stdio: \(error)") }
            await server.shutdown()
            await finish()
            logger.info("client gone; \(disk.statsSummary)")
            return
        }

        // Where to listen: an inherited socket (systemd), --unix, a private socket for --run, or TCP.
        var address: ListenAddress
        var tempDir: String?
        if let fd = Self.socketActivationFD() {
            address = .boundSocket(fd: fd)
        } else if let u = unix {
            address = .unix(path: u)
        } else if run != nil && port == nil {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virtnbd-\(getpid())").path
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            tempDir = dir
            address = .unix(path: dir + "/nbd.sock")
        } else {
            address = .tcp(host: listen, port: port ?? 10809)
        }
        do {
            try await server.listen(address)
        } catch {
            logger.critical("cannot listen on \(address): \(error); is another server using it?")
            await finish()
            throw ExitCode(1)
        }
        let uri = Self.uri(address, exportName, tls: tls != .off)
        logger.info("serving \(disk.label) as \(uri)", metadata: ["size": "\(export.info.size)", "read-only": "\(export.readOnly)"])

        var status: Int32 = 0
        if let cmd = run {
            status = await Self.runCommand(cmd, uri: uri, address: address, logger: logger)
        } else {
            if case .boundSocket = address {} else { FileHandle.standardOutput.write(Data((uri + "\n").utf8)) }
            await Self.waitForTerminationSignal()
            logger.info("signal received: draining connections")
        }
        await server.shutdown()
        await finish()
        if case .unix(let path) = address { unlink(path) }
        if let d = tempDir { try? FileManager.default.removeItem(atPath: d) }
        logger.info("stopped; \(disk.statsSummary)")
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
