// Process lifecycle: signals, --exit-with-parent, --pidfile. Everything that can end or change the
// running server arrives as one `ServerEvent` on one stream, handled in order by `ServeOptions.serve`.
import CVirtShim
import Dispatch
import Foundation
import Logging
import Synchronization
import Virtio

enum ServerEvent: Sendable {
    /// SIGINT or SIGTERM (also the parent-death signal of --exit-with-parent): drain and exit 0.
    case terminate(signal: Int32)
    /// SIGHUP: re-read --config.
    case reload
    /// --exit-with-parent without prctl: the parent process went away.
    case parentExited
    /// --run: the command exited with this status.
    case commandExited(Int32)
    /// --stdio: the one client disconnected.
    case clientGone
}

/// The event stream and what feeds it (signals, the parent watch, the --run command, the client).
final class ServerEvents: Sendable {
    let stream: AsyncStream<ServerEvent>
    private let continuation: AsyncStream<ServerEvent>.Continuation

    init() {
        (stream, continuation) = AsyncStream.makeStream(of: ServerEvent.self, bufferingPolicy: .unbounded)
    }

    func post(_ e: ServerEvent) { continuation.yield(e) }

    /// Set once the server drains its clients before exiting: a SIGINT or SIGTERM then exits at
    /// once (as nbdkit and qemu-nbd do on a second signal), without waiting for slow clients.
    private let draining = Atomic<Bool>(false)
    private let loggerForExit = Locked<Logger?>(nil)

    /// From now on a SIGINT or SIGTERM ends the process at once, with status 1.
    func beginDrain(logger: Logger) {
        loggerForExit.withLock { $0 = logger }
        draining.store(true, ordering: .sequentiallyConsistent)
    }

    /// Turns SIGINT and SIGTERM (and SIGHUP when `reload`) into events: a handler installed with
    /// sigaction (`vshim_signal_pipe`) writes each signal to a pipe that one thread reads. Not a
    /// DispatchSource: on Linux libdispatch reads signals from a signalfd, and one delivered to a
    /// thread that had it unblocked could stay pending there for ever (seen: `nbdinfo -- [ virtnbd ]`
    /// waiting on a virtnbd that never saw libnbd's SIGTERM). Call once, from the main task.
    func handleSignals(reload: Bool) {
        var signals = [SIGINT, SIGTERM]
        if reload { signals.append(SIGHUP) }
        var pipe: Int32 = -1
        for sig in signals { pipe = vshim_signal_pipe(sig) }
        guard pipe >= 0 else { return }
        let fd = pipe
        let t = Thread { [self] in
            var b: UInt8 = 0
            while true {
                let n = read(fd, &b, 1)
                if n < 0 && errno == EINTR { continue }
                guard n == 1 else { return }
                let sig = Int32(b)
                if sig != SIGHUP && draining.load(ordering: .sequentiallyConsistent) {
                    let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
                    loggerForExit.withLock { $0 }?.warning(
                        "\(name) again while draining: exiting now; replies still being written to clients are cut short"
                    )
                    exit(1)
                }
                post(sig == SIGHUP ? .reload : .terminate(signal: sig))
            }
        }
        t.name = "virtnbd-signals"
        t.start()
    }
}

/// Why `--exit-with-parent` cannot be honoured.
struct ParentWatchError: Error, CustomStringConvertible {
    let errno: Int32
    var description: String {
        "--exit-with-parent: prctl(PR_SET_PDEATHSIG) failed: \(String(cString: strerror(errno))); run virtnbd without --exit-with-parent, or under a supervisor that stops it"
    }
}

enum ParentWatch {
    /// `--exit-with-parent`, like nbdkit's: the kernel sends SIGTERM when the parent exits, which
    /// `ServerEvents` turns into a graceful shutdown. If the parent is already gone (we were
    /// re-parented before prctl took effect), posts `.parentExited` at once.
    static func start(events: ServerEvents, parentAtStart: pid_t, logger: Logger) throws(ParentWatchError) {
        let rc = vshim_set_parent_death_signal(SIGTERM)
        guard rc == 0 else { throw ParentWatchError(errno: -rc) }
        if getppid() != parentAtStart {
            logger.notice("--exit-with-parent: the parent process (pid \(parentAtStart)) has already exited")
            events.post(.parentExited)
        }
    }
}

/// `-P/--pidfile`: written once the server listens, removed when it exits.
struct PidFile {
    let path: String

    struct WriteError: Error, CustomStringConvertible {
        let path: String
        let reason: String
        var description: String {
            "cannot write the pid file \(path): \(reason); check that its directory exists and is writable, or drop -P/--pidfile"
        }
    }

    /// Why the pid file could not be written, checked before anything starts: its directory is
    /// missing or not writable. Nil when it looks writable.
    static func directoryProblem(_ path: String) -> WriteError? {
        let dir = (path as NSString).deletingLastPathComponent
        let d = dir.isEmpty ? "." : dir
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: d, isDirectory: &isDir), isDir.boolValue else {
            return WriteError(path: path, reason: "the directory \(d) does not exist")
        }
        guard access(d, W_OK) == 0 else {
            return WriteError(path: path, reason: "the directory \(d): \(String(cString: strerror(errno)))")
        }
        return nil
    }

    /// Writes "PID\n" to a temporary file beside `path`, then renames it: a reader sees the whole file or none.
    static func write(_ path: String) throws(WriteError) -> PidFile {
        let tmp = path + ".tmp.\(getpid())"
        let data = Data("\(getpid())\n".utf8)
        do {
            try data.write(to: URL(fileURLWithPath: tmp))
        } catch {
            let code = (error as NSError).userInfo[NSUnderlyingErrorKey].map { ($0 as? NSError)?.code ?? 0 } ?? 0
            throw WriteError(
                path: path, reason: code > 0 ? String(cString: strerror(Int32(code))) : "it cannot be written")
        }
        guard rename(tmp, path) == 0 else {
            let e = errno
            unlink(tmp)
            throw WriteError(path: path, reason: String(cString: strerror(e)))
        }
        return PidFile(path: path)
    }

    /// Removes the file if it still holds our pid (another instance may have taken the path over).
    func remove() {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
            text.trimmingCharacters(in: .whitespacesAndNewlines) == "\(getpid())"
        else { return }
        unlink(path)
    }
}

/// The descriptor limit: every client is one descriptor, so the soft RLIMIT_NOFILE (often 1024)
/// must hold --max-connections plus the server's own (the device, eventfds, listeners, logs).
enum FileLimit {
    /// Descriptors the server keeps for itself besides its clients.
    static let reserve = 256

    /// Raises the soft limit towards the hard one when `connections` need it; says so at notice,
    /// and warns when even the hard limit is too low (0 connections: no limit, raise to the hard one).
    static func ensure(connections: Int, logger: Logger) {
        var r = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &r) == 0 else { return }
        let want = connections == 0 ? r.rlim_max : rlim_t(connections + reserve)
        guard r.rlim_cur < want else { return }
        let before = r.rlim_cur
        r.rlim_cur = min(want, r.rlim_max)
        if setrlimit(resource, &r) == 0 && r.rlim_cur != before {
            logger.debug(
                "raised the open-file limit from \(before) to \(r.rlim_cur) for --max-connections \(connections)")
        }
        if r.rlim_cur < want && connections > 0 {
            logger.warning(
                "the open-file limit is \(r.rlim_cur), too low for --max-connections \(connections) (each client is a descriptor); raise it (ulimit -n, LimitNOFILE=) or lower --max-connections"
            )
        }
    }
}
