// vhost-user wire format, front-end side (QEMU docs/interop/vhost-user.rst).
// A message is a 12-byte header {u32 request, u32 flags, u32 size} in native byte order
// (little-endian on every host this runs on) followed by `size` payload bytes; file descriptors
// ride on the header as SCM_RIGHTS.
#if canImport(Glibc)
    import Glibc
#endif

/// Front-end request codes this front end sends.
public enum VhostUserRequest: UInt32, Sendable, CustomStringConvertible {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case setMemTable = 5
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case getConfig = 24

    public var description: String {
        switch self {
        case .getFeatures: return "GET_FEATURES"
        case .setFeatures: return "SET_FEATURES"
        case .setOwner: return "SET_OWNER"
        case .setMemTable: return "SET_MEM_TABLE"
        case .setVringNum: return "SET_VRING_NUM"
        case .setVringAddr: return "SET_VRING_ADDR"
        case .setVringBase: return "SET_VRING_BASE"
        case .getVringBase: return "GET_VRING_BASE"
        case .setVringKick: return "SET_VRING_KICK"
        case .setVringCall: return "SET_VRING_CALL"
        case .getProtocolFeatures: return "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: return "SET_PROTOCOL_FEATURES"
        case .getQueueNum: return "GET_QUEUE_NUM"
        case .setVringEnable: return "SET_VRING_ENABLE"
        case .getConfig: return "GET_CONFIG"
        }
    }
}

/// Constants of the vhost-user protocol.
public enum VhostUser {
    public static let headerSize = 12
    /// Header flags: protocol version 1 in bits 0-1, REPLY, NEED_REPLY.
    public static let flagVersion: UInt32 = 0x1
    public static let flagReply: UInt32 = 0x4
    public static let flagNeedReply: UInt32 = 0x8
    /// VHOST_USER_F_PROTOCOL_FEATURES: a transport bit carried in GET/SET_FEATURES, not a virtio feature.
    public static let protocolFeaturesBit: UInt64 = 1 << 30
    /// Protocol feature bits this front end uses.
    public static let protocolMQ: UInt64 = 1 << 0
    public static let protocolReplyAck: UInt64 = 1 << 3
    public static let protocolConfig: UInt64 = 1 << 9
    /// Bytes of virtio-blk config asked for: QEMU 7.2 answers an empty GET_CONFIG for more than 60.
    public static let blkConfigSize = 60
    /// Largest reply payload accepted (GET_CONFIG with 60 bytes is 72).
    static let maxReplyPayload = 4096
    /// SET_VRING_KICK/CALL payload bit meaning "no fd" (unused: this front end always sends one).
    static let vringNoFD: UInt64 = 0x100
}

/// Everything the vhost-user front end can fail with. Each case names the message or step and
/// says what to check.
public enum VhostUserError: Error, CustomStringConvertible, Equatable {
    /// The socket path is empty or longer than a Unix socket address holds (107 bytes).
    case badSocketPath(String)
    /// connect(2) to the backend's socket failed.
    case connectFailed(path: String, errno: Int32)
    /// Writing a message failed.
    case sendFailed(VhostUserRequest, errno: Int32)
    /// Reading a reply failed (other than the peer closing).
    case receiveFailed(VhostUserRequest, errno: Int32)
    /// The backend closed the connection while we waited for the reply to (or sent) this message.
    case connectionClosed(VhostUserRequest)
    /// No reply within the reply timeout.
    case timedOut(VhostUserRequest, seconds: Double)
    /// A reply that does not match the request (wrong code, flags or size).
    case badReply(VhostUserRequest, String)
    /// REPLY_ACK with a non-zero status: the backend refused the message.
    case rejected(VhostUserRequest, status: UInt64)
    /// The backend lacks something a virtio-blk front end needs.
    case missingFeature(String)
    /// GET_CONFIG came back empty or short.
    case configUnavailable(requested: Int, got: Int)
    /// setupQueue before attachMemory.
    case memoryNotAttached(queue: Int)
    /// A ring address the driver handed over lies outside the shared memory.
    case addressOutsideMemory(what: String, address: UInt64, length: Int)
    case queueUnavailable(index: Int, count: Int)
    case queueTooLarge(index: Int, requested: Int, max: Int)
    case queueAlreadyLive(index: Int)
    /// Creating an eventfd or a thread failed.
    case resourceFailed(String)
    /// The transport is already marked failed (backend gone, or closed by us); reconnect to recover.
    case backendFailed(String)
    /// A backend that came back offers less than the one the driver negotiated with (features,
    /// capacity or queues); serving on would change the disk under the clients.
    case backendShrank(path: String, what: String)

    private static func err(_ e: Int32) -> String { String(cString: strerror(e)) }

    public var description: String {
        switch self {
        case .badSocketPath(let p):
            return "vhost-user socket path '\(p)' is empty or longer than 107 bytes; use a shorter path"
        case .connectFailed(let p, let e):
            let hint: String
            switch e {
            case ENOENT:
                hint =
                    "no socket exists there: is the backend (e.g. qemu-storage-daemon --export type=vhost-user-blk,addr.path=\(p)) running, and is the path right?"
            case ECONNREFUSED:
                hint =
                    "the socket file exists but nobody is listening: the backend has exited (or already serves another front end); restart it"
            case EACCES, EPERM: hint = "permission denied: check the socket's owner and mode"
            case ENOTSOCK: hint = "the path is not a Unix socket"
            default: hint = "check that the vhost-user backend is running and listening on this path"
            }
            return "cannot connect to vhost-user socket \(p): \(Self.err(e)); \(hint)"
        case .sendFailed(let r, let e):
            let closed = e == EPIPE || e == ECONNRESET
            return "sending vhost-user \(r) failed: \(Self.err(e))"
                + (closed ? "; the backend closed the connection (did it exit or crash? check its log)" : "")
        case .receiveFailed(let r, let e):
            return
                "reading the reply to vhost-user \(r) failed: \(Self.err(e)); the connection is unusable, restart the backend and virtnbd"
        case .connectionClosed(let r):
            return
                "the vhost-user backend closed the connection during \(r); it rejected the request or exited: check its log"
        case .timedOut(let r, let s):
            return "no reply to vhost-user \(r) within \(s) s; the backend is hung or is not a vhost-user backend"
        case .badReply(let r, let s):
            return "malformed reply to vhost-user \(r): \(s); is this really a vhost-user-blk backend?"
        case .rejected(let r, let st):
            return "the vhost-user backend refused \(r) (status \(st)); check its log"
        case .missingFeature(let f):
            return
                "the vhost-user backend does not offer \(f), which a virtio-blk front end needs; use a newer backend (QEMU >= 4.0 qemu-storage-daemon works)"
        case .configUnavailable(let req, let got):
            return
                "GET_CONFIG for \(req) bytes returned \(got) bytes; the backend cannot provide the virtio-blk config space"
        case .memoryNotAttached(let q):
            return "queue \(q) set up before the DMA arena was attached (SET_MEM_TABLE); this is a driver bug"
        case .addressOutsideMemory(let w, let a, let l):
            return
                "\(w) at device address 0x\(String(a, radix: 16)) (\(l) bytes) lies outside the attached memory; this is a driver bug"
        case .queueUnavailable(let i, let n):
            return "queue \(i) does not exist; the backend has \(n) queue(s)"
        case .queueTooLarge(let i, let r, let m):
            return "queue \(i): size \(r) exceeds the vhost-user maximum \(m); use a smaller --queue-size"
        case .queueAlreadyLive(let i):
            return "queue \(i) is already set up; reset the transport first"
        case .resourceFailed(let s):
            return "vhost-user front end: \(s)"
        case .backendFailed(let s):
            return "vhost-user transport is unusable: \(s)"
        case .backendShrank(let p, let w):
            return
                "the vhost-user backend on \(p) came back with \(w); refusing it. Start it with the same image and export options as before"
        }
    }
}

/// Little-endian payload building and parsing.
struct WireWriter {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
}

extension Array where Element == UInt8 {
    /// Little-endian unsigned integer of `width` bytes at `offset`; bytes beyond the end read as 0.
    func le(_ offset: Int, _ width: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<width where offset + i >= 0 && offset + i < count {
            v |= UInt64(self[offset + i]) << (8 * UInt64(i))
        }
        return v
    }
}
