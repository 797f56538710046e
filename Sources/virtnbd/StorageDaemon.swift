// `--device rbd:POOL/IMAGE[@CONF]`: virtnbd starts a qemu-storage-daemon that opens the RBD image
// with QEMU's rbd block driver (librbd) and exports it as vhost-user-blk on a socket in a private
// directory (mode 0700), then drives that socket as `--device vhost-user:` does. The daemon is
// supervised: when it exits, it is started again on the same socket, and the vhost-user reconnect
// path (`--reconnect-timeout`) holds and resubmits what was in flight. At exit virtnbd stops it
// (SIGTERM, then SIGKILL after 10 s) and removes the directory. The daemon is tied to the
// supervising thread with PR_SET_PDEATHSIG, so a SIGKILL of virtnbd does not leave it running.
import CVirtShim
import Foundation
import Logging
import Virtio

/// An RBD image: `rbd:POOL/IMAGE[@CONF]`.
struct RBDImage: Equatable, Sendable, CustomStringConvertible {
    var pool: String
    var image: String
    /// The ceph.conf; nil: librbd's default (/etc/ceph/ceph.conf).
    var conf: String?

    var description: String { "rbd:\(pool)/\(image)" + (conf.map { "@\($0)" } ?? "") }

    /// qemu-storage-daemon's arguments: the rbd blockdev and its vhost-user-blk export.
    func daemonArguments(socket: String, readOnly: Bool, queues: Int) -> [String] {
        // QEMU's option syntax: a comma inside a value is written as two.
        func q(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }
        // cache.direct=on turns librbd's cache off: a write is acknowledged once the OSDs have it,
        // so a daemon that is killed and restarted loses no write virtnbd saw completed.
        var blockdev = "driver=rbd,node-name=disk,pool=\(q(pool)),image=\(q(image)),cache.direct=on"
        if let c = conf { blockdev += ",conf=\(q(c))" }
        if readOnly { blockdev += ",read-only=on" }
        let export =
            "type=vhost-user-blk,id=export0,node-name=disk,addr.type=unix,addr.path=\(q(socket)),"
            + "writable=\(readOnly ? "off" : "on"),num-queues=\(max(1, queues))"
        return ["--blockdev", blockdev, "--export", export]
    }
}

/// Why the daemon of an `rbd:` export could not be started: one line that says what to do.
enum StorageDaemonError: Error, CustomStringConvertible {
    case notInstalled
    case privateDirectory(String)
    case spawnFailed(Int32)
    case exited(RBDImage, status: String, log: String)
    case noSocket(RBDImage, seconds: Int, log: String)

    var description: String {
        switch self {
        case .notInstalled:
            return
                "qemu-storage-daemon is not in PATH; install it (Debian: apt-get install qemu-system-common qemu-block-extra)"
        case .privateDirectory(let why): return "cannot make the daemon's private directory: \(why)"
        case .spawnFailed(let e): return "cannot start qemu-storage-daemon: \(String(cString: strerror(e)))"
        case .exited(let img, let status, let log):
            return
                "qemu-storage-daemon for \(img) exited (\(status)) before exporting it: \(log.isEmpty ? "no output" : log); "
                + "check the pool, the image (rbd ls POOL), the ceph.conf and its keyring, and that qemu-block-extra is installed"
        case .noSocket(let img, let seconds, let log):
            return
                "qemu-storage-daemon for \(img) did not export it within \(seconds) s\(log.isEmpty ? "" : ": \(log)"); "
                + "check that the cluster's monitors are reachable from this host (ceph -s with the same ceph.conf)"
        }
    }
}

/// A supervised qemu-storage-daemon serving one RBD image on `socketPath`.
final class StorageDaemon: Sendable {
    let image: RBDImage
    /// The private directory (0700) holding the socket and the daemon's output.
    let directory: String
    let socketPath: String
    private let logPath: String
    private let argv: [String]
    private let logger: Logger
    private let state = Locked(State())
    /// Signalled by the supervising thread when it ends.
    private let finished = DispatchSemaphore(value: 0)

    private struct State {
        var pid: pid_t = 0
        /// Set once the first daemon has made its socket: later exits are restarts, not start failures.
        var exported = false
        var stopping = false
        /// Why the first daemon ended before exporting (then the supervisor ends).
        var startFailure: String?
        var restarts = 0
    }

    /// How long the first daemon may take to connect to the cluster and export the image.
    static let startSeconds = 60

    private init(image: RBDImage, directory: String, executable: String, arguments: [String], logger: Logger) {
        self.image = image
        self.directory = directory
        self.socketPath = directory + "/vhost.sock"
        self.logPath = directory + "/qemu-storage-daemon.log"
        self.argv = [executable] + arguments
        self.logger = logger
    }

    /// Starts the daemon and waits until it has made its socket.
    static func start(_ image: RBDImage, readOnly: Bool, queues: Int, logger: Logger) throws(StorageDaemonError)
        -> StorageDaemon
    {
        guard let exe = executable() else { throw .notInstalled }
        let dir = try privateDirectory()
        let d = StorageDaemon(
            image: image, directory: dir, executable: exe,
            arguments: image.daemonArguments(socket: dir + "/vhost.sock", readOnly: readOnly, queues: queues),
            logger: logger)
        let t = Thread { d.supervise() }
        t.name = "virtnbd-qsd"
        t.start()
        do { try d.waitForSocket() } catch {
            d.stop()
            throw error
        }
        logger.info(
            "qemu-storage-daemon (pid \(d.state.withLock { $0.pid })) exports \(image) on \(d.socketPath)")
        return d
    }

    /// qemu-storage-daemon from PATH (or /usr/bin).
    static func executable() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let p = "\(dir)/qemu-storage-daemon"
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }

    /// A new directory, mode 0700, `virtnbd-rbd.PID.XXXXXX` in TMPDIR (or /tmp when its path would
    /// not leave room for the socket). The directories of virtnbd processes that are gone (SIGKILL)
    /// are removed first.
    private static func privateDirectory() throws(StorageDaemonError) -> String {
        var base = ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
        if base.isEmpty || base.utf8.count > 60 { base = "/tmp" }
        removeAbandoned(in: base)
        var template = Array((base + "/virtnbd-rbd.\(getpid()).XXXXXX").utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw .privateDirectory("mkdtemp in \(base): \(String(cString: strerror(errno)))")
        }
        return String(cString: p)
    }

    /// Removes `virtnbd-rbd.PID.*` directories of ours whose virtnbd no longer runs.
    static func removeAbandoned(in base: String) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: base) else { return }
        for name in names where name.hasPrefix("virtnbd-rbd.") {
            let parts = name.split(separator: ".")
            guard parts.count == 3, let pid = pid_t(parts[1]), pid > 0, kill(pid, 0) != 0, errno == ESRCH else {
                continue
            }
            let dir = base + "/" + name
            var st = stat()
            guard lstat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, st.st_uid == getuid() else { continue }
            for f in ["vhost.sock", "qemu-storage-daemon.log"] { unlink(dir + "/" + f) }
            rmdir(dir)
        }
    }

    /// Polls for the socket; fails when the first daemon exits or the time runs out.
    private func waitForSocket() throws(StorageDaemonError) {
        let deadline = Date().addingTimeInterval(TimeInterval(Self.startSeconds))
        while Date() < deadline {
            if let why = state.withLock({ $0.startFailure }) {
                throw .exited(image, status: why, log: logTail())
            }
            var st = stat()
            if stat(socketPath, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK {
                state.withLock { $0.exported = true }
                return
            }
            usleep(20_000)
        }
        throw .noSocket(image, seconds: Self.startSeconds, log: logTail())
    }

    /// The supervising thread: starts the daemon, waits for it, starts it again when it exits (with
    /// a pause that grows while it keeps exiting soon after starting), until `stop()`.
    private func supervise() {
        defer { finished.signal() }
        var pause = 0.5
        while true {
            let logFD = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            let started = Date()
            let pid = spawn(logFD: logFD)
            if logFD >= 0 { close(logFD) }
            if pid == -ECANCELED { return } // stop() came first
            guard pid > 0 else {
                let why = "fork failed: \(String(cString: strerror(-pid)))"
                if !exported(failure: why) { return }
                logger.error("cannot restart qemu-storage-daemon for \(image): \(why); trying again")
                Thread.sleep(forTimeInterval: 5)
                continue
            }
            let status = Self.reap(pid)
            state.withLock { $0.pid = 0 } // reaped: its number may be reused
            let ran = Date().timeIntervalSince(started)
            let (stopping, wasExported) = state.withLock { ($0.stopping, $0.exported) }
            if stopping { return }
            guard wasExported else {
                _ = exported(failure: status)
                return
            }
            pause = ran > 10 ? 0.5 : min(pause * 2, 8)
            let n = state.withLock {
                $0.restarts += 1
                return $0.restarts
            }
            logger.warning(
                "qemu-storage-daemon (pid \(pid)) for \(image) exited (\(status)) after \(String(format: "%.1f", ran)) s; starting it again in \(pause) s (restart \(n)); virtnbd reconnects to \(socketPath)",
                metadata: logTail().isEmpty ? [:] : ["daemon-output": "\(logTail())"])
            unlink(socketPath)
            Thread.sleep(forTimeInterval: pause)
            if state.withLock({ $0.stopping }) { return }
        }
    }

    /// Starts one daemon and records its pid; returns it, or -errno. Nothing starts once stopping.
    private func spawn(logFD: Int32) -> pid_t {
        state.withLock { s in
            guard !s.stopping else { return -ECANCELED }
            let args: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
            defer { for a in args { free(a) } }
            let pid = args.withUnsafeBufferPointer { vshim_spawn_tied(argv[0], $0.baseAddress, logFD) }
            if pid > 0 { s.pid = pid }
            if pid > 0 && s.restarts > 0 { logger.notice("qemu-storage-daemon restarted (pid \(pid))") }
            return pid
        }
    }

    /// Records a failure before the first export; returns whether the daemon had exported (then it is restarted).
    private func exported(failure: String) -> Bool {
        state.withLock { s in
            if !s.exported { s.startFailure = failure }
            return s.exported
        }
    }

    /// Waits for the child and says how it ended.
    private static func reap(_ pid: pid_t) -> String {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let signal = status & 0x7f
        return signal != 0 ? "killed by signal \(signal)" : "exit status \((status >> 8) & 0xff)"
    }

    /// The last lines the daemon wrote, on one line.
    func logTail(lines: Int = 3) -> String {
        guard let text = try? String(contentsOfFile: logPath, encoding: .utf8) else { return "" }
        return text.split(separator: "\n").suffix(lines).joined(separator: " | ")
    }

    /// Stops the daemon (SIGTERM; SIGKILL after 10 s), waits for the supervisor, removes the directory.
    func stop() {
        let pid = state.withLock { s in
            s.stopping = true
            return s.pid
        }
        if pid > 0 { kill(pid, SIGTERM) }
        if finished.wait(timeout: .now() + 10) == .timedOut {
            logger.warning("qemu-storage-daemon (pid \(pid)) still running 10 s after SIGTERM; SIGKILL")
            kill(pid, SIGKILL)
            finished.wait()
        }
        finished.signal() // a second stop() does not wait again
        for f in [socketPath, logPath] { unlink(f) }
        rmdir(directory)
    }
}
