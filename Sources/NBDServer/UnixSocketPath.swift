import NIOCore
import NIOPosix

// Unix socket paths: what a listener may take, and what it may remove when it stops. Like nbdkit,
// virtnbd never replaces a file, a symlink or a live server's socket; only a stale socket (one
// nobody accepts on, left by a server that died) is removed before binding. On exit only the
// socket this process bound is removed: if the path now holds something else, it stays.
#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Why a Unix socket path cannot be listened on. The message says what is there; the caller adds the fix.
public enum UnixSocketPathProblem: Error, Equatable, CustomStringConvertible {
    /// Something that is not a socket: it belongs to someone, so it is never removed.
    case notASocket(path: String, what: String)
    /// A socket another server accepts connections on.
    case inUse(path: String)
    /// The path could not be examined.
    case cannotInspect(path: String, reason: String)

    public var description: String {
        switch self {
        case .notASocket(let p, let what):
            return "\(p) already exists and is \(what), not a socket; virtnbd never replaces it"
        case .inUse(let p):
            return "another server is listening on \(p) (another virtnbd, nbdkit or qemu-nbd? see ss -lxp)"
        case .cannotInspect(let p, let reason): return "cannot examine \(p): \(reason)"
        }
    }
}

/// The socket file a listener created: removed on release only if the path still holds it.
public struct UnixSocketClaim: Sendable, Equatable {
    public let path: String
    let device: UInt64
    let inode: UInt64

    /// The socket now at `path` (just bound or renamed there by this process); nil if it is not a socket.
    public init?(boundAt path: String) {
        guard let id = Self.identity(path), id.isSocket else { return nil }
        self.path = path
        device = id.device
        inode = id.inode
    }

    /// Removes the socket file if it is still the one this process bound.
    public func release() {
        guard let id = Self.identity(path), id.isSocket, id.device == device, id.inode == inode else { return }
        unlink(path)
    }

    static func identity(_ path: String) -> (device: UInt64, inode: UInt64, isSocket: Bool)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino), st.st_mode & S_IFMT == S_IFSOCK)
    }
}

public enum UnixSocketPath {
    /// Makes `path` ready to bind: nothing there, or a stale socket, which is removed. Throws,
    /// touching nothing, when the path holds anything else or a server answers on it.
    public static func prepare(_ path: String, group: EventLoopGroup) async throws(UnixSocketPathProblem) {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = errno
            if e == ENOENT { return }
            throw .cannotInspect(path: path, reason: String(cString: strerror(e)))
        }
        guard st.st_mode & S_IFMT == S_IFSOCK else { throw .notASocket(path: path, what: kind(st.st_mode)) }
        do {
            let probe = try await ClientBootstrap(group: group)
                .connectTimeout(.seconds(2))
                .connect(unixDomainSocketPath: path).get()
            try? await probe.close()
            throw UnixSocketPathProblem.inUse(path: path)
        } catch let p as UnixSocketPathProblem {
            throw p
        } catch {
            // Refused: nobody accepts on it any more. Anything else (a timeout, a full backlog,
            // no permission) may be a live server: leave it.
            guard isRefused(error) else { throw .inUse(path: path) }
        }
        unlink(path)
    }

    private static func isRefused(_ error: Error) -> Bool {
        if let e = error as? IOError { return e.errnoCode == ECONNREFUSED }
        if let e = error as? NIOConnectionError {
            return e.connectionErrors.contains { ($0.error as? IOError)?.errnoCode == ECONNREFUSED }
        }
        return false
    }

    static func kind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: return "a regular file"
        case S_IFLNK: return "a symbolic link"
        case S_IFDIR: return "a directory"
        case S_IFIFO: return "a named pipe"
        case S_IFCHR, S_IFBLK: return "a device node"
        default: return "not a socket"
        }
    }
}
