// `--run CMD`, like nbdkit's: CMD runs through /bin/sh with $uri, $nbd, $unixsocket and $port set;
// when it exits, virtnbd stops and exits with its status (128 + N when signal N killed it, as
// shells report it). A SIGINT or SIGTERM sent to virtnbd is passed to the command first, so it is
// never left running without its server, and virtnbd's status is still the command's (130 after
// Ctrl-C, as nbdkit). A second signal kills the command.
import Foundation
import Logging
import NBDServer
import Synchronization

final class RunCommand: Sendable {
    let pid: pid_t
    /// Set by the waiting thread once the command is reaped (its pid may then be reused).
    private let exited = Atomic<Bool>(false)
    /// Signals passed on so far.
    private let forwarded = Atomic<Int>(0)

    private init(pid: pid_t) { self.pid = pid }

    /// Starts CMD; its exit (or a failure to start it, status 127) is posted as `.commandExited`.
    static func start(
        _ cmd: String, uri: String, address: ListenAddress, events: ServerEvents, logger: Logger
    ) -> RunCommand? {
        var env = ProcessInfo.processInfo.environment
        env["uri"] = uri
        switch address {
        case .unix(let path):
            env["unixsocket"] = path
            env["nbd"] = uri
        case .tcp(_, let port):
            env["port"] = "\(port)"
            env["nbd"] = uri
        case .boundSocket: break
        }
        let pid: pid_t
        do { pid = try spawnShell(cmd, environment: env) } catch {
            logger.error("--run: cannot start /bin/sh: \(String(cString: strerror(error.code)))")
            events.post(.commandExited(127))
            return nil
        }
        let command = RunCommand(pid: pid)
        let t = Thread {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            command.exited.store(true, ordering: .sequentiallyConsistent)
            let signal = status & 0x7f
            if signal != 0 && signal != 0x7f {
                logger.warning("--run: the command was killed by signal \(signal); exiting with \(128 + signal)")
                events.post(.commandExited(128 + signal))
            } else {
                events.post(.commandExited((status >> 8) & 0xff))
            }
        }
        t.name = "virtnbd-run-wait"
        t.start()
        return command
    }

    /// Passes `signal` to the command if it still runs (SIGKILL from the second time on). Once it
    /// has exited, its `.commandExited` is posted (or already queued) and ends the server.
    func stop(signal: Int32, reason: String, logger: Logger) {
        guard !exited.load(ordering: .sequentiallyConsistent) else { return }
        let n = forwarded.add(1, ordering: .sequentiallyConsistent).newValue
        let sig = n == 1 ? signal : SIGKILL
        logger.info(
            "\(reason): passing \(n == 1 ? "it" : "SIGKILL") to the --run command (pid \(pid)); virtnbd stops when the command exits"
        )
        // /bin/sh may have children of its own (`sh -c 'a; b'`): they get the signal too, children
        // first, so that none is left running without its server once the shell has gone.
        for p in Self.descendants(of: pid).reversed() { kill(p, sig) }
        kill(pid, sig)
    }

    /// Every process below `root`, parents before children (from /proc/PID/stat's ppid field).
    static func descendants(of root: pid_t) -> [pid_t] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        var children: [pid_t: [pid_t]] = [:]
        for name in entries {
            guard let pid = pid_t(name),
                let stat = try? String(contentsOfFile: "/proc/\(name)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { continue }
            // "PID (COMM) STATE PPID …": COMM may hold spaces and parentheses, so read after the last ")".
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 1, let ppid = pid_t(fields[1]) else { continue }
            children[ppid, default: []].append(pid)
        }
        var out: [pid_t] = []
        var queue = children[root] ?? []
        while let p = queue.first {
            queue.removeFirst()
            out.append(p)
            queue += children[p] ?? []
        }
        return out
    }

    struct SpawnError: Error { let code: Int32 }

    /// Starts `/bin/sh -c CMD` with the default action for the signals virtnbd itself ignores
    /// (SIGINT, SIGTERM and SIGHUP become events here; NIO ignores SIGPIPE): an ignored signal
    /// would stay ignored in the command, which could then neither be stopped nor end a pipeline.
    static func spawnShell(_ cmd: String, environment: [String: String]) throws(SpawnError) -> pid_t {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var unblocked = sigset_t()
        sigemptyset(&unblocked)
        posix_spawnattr_setsigmask(&attr, &unblocked)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let args: [String] = ["/bin/sh", "-c", cmd]
        let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid = pid_t()
        let rc = posix_spawn(&pid, "/bin/sh", nil, &attr, argv, envp)
        guard rc == 0 else { throw SpawnError(code: rc) }
        return pid
    }
}
