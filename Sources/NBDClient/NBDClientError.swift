import NBDProtocol

/// Everything that can go wrong talking to an NBD server. Each description says what happened
/// and what to do about it.
public enum NBDClientError: Error, CustomStringConvertible {
    case badURI(NBDURIError)
    case tlsNotSupported(String)
    case connectFailed(String, reason: String)
    /// Connected, but the handshake did not finish in time (not an NBD server, or a stuck one).
    case timedOut(String, seconds: Double)
    case wire(NBDClientWireError)
    case replies(NBDReplyParseError)
    case serverClosed(during: String)
    case unknownExport(String, message: String)
    case tlsRequired(String)
    case optionRefused(option: String, reply: String, message: String)
    case noExportInfo(String)
    case commandFailed(command: String, offset: UInt64, length: UInt64, errno: UInt32, message: String)
    case readOnly
    case unsupported(command: String, flag: String)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case tooLarge(length: UInt64, maximum: UInt32)
    case incompleteRead(offset: UInt64, length: UInt64, got: UInt64)
    case protocolViolation(String)
    case closed

    public var description: String {
        switch self {
        case .badURI(let e):
            return e.description
        case .tlsNotSupported(let uri):
            return "\(uri): virtnbd's client does not speak TLS yet; use nbdinfo or nbdcopy for nbds:// URIs"
        case .connectFailed(let target, let reason):
            return
                "cannot connect to \(target): \(reason); is an NBD server running there (check the host, port or socket path)?"
        case .timedOut(let target, let seconds):
            let s = seconds == seconds.rounded() ? "\(Int(seconds))" : "\(seconds)"
            return
                "\(target) accepted the connection but did not complete an NBD handshake within \(s) s; it is probably not an NBD server (check the host, port or socket path), or give it longer with --timeout"
        case .wire(let e):
            return e.description
        case .replies(let e):
            return e.description
        case .serverClosed(let during):
            return "the server closed the connection during \(during); see the server's log for why"
        case .unknownExport(let name, let message):
            let extra = message.isEmpty || message.contains("\"\(name)\"") ? "" : " (the server says: \(message))"
            return "the server has no export named \"\(name)\"\(extra); list the exports with `virtnbd info --list URI`"
        case .tlsRequired(let option):
            return
                "the server requires TLS (it refused \(option) without it); virtnbd's client does not speak TLS yet, so use nbdinfo or nbdcopy with an nbds:// URI"
        case .optionRefused(let option, let reply, let message):
            return "the server refused \(option) with \(reply)\(message.isEmpty ? "" : ": \(message)")"
        case .noExportInfo(let name):
            return
                "the server acknowledged NBD_OPT_GO for \"\(name)\" without NBD_INFO_EXPORT (size and flags), which the spec requires; the server is broken"
        case .commandFailed(let cmd, let offset, let length, let errno, let message):
            return
                "\(cmd) of \(length) bytes at offset \(offset) failed with \(NBDErrno.name(errno))\(message.isEmpty ? "" : ": \(message)")"
        case .readOnly:
            return
                "the export is read-only; writing needs a writable export (a virtnbd export without -r, and without read-only: true in a --config file)"
        case .unsupported(let cmd, let flag):
            return "the export does not support \(cmd) (\(flag) is not set)"
        case .outOfRange(let offset, let length, let size):
            return "a request for \(length) bytes at offset \(offset) goes past the end of the \(size)-byte export"
        case .tooLarge(let length, let maximum):
            return
                "a request of \(length) bytes exceeds the export's maximum payload of \(maximum) bytes; use smaller requests"
        case .incompleteRead(let offset, let length, let got):
            return
                "the server finished a READ of \(length) bytes at offset \(offset) after sending only \(got) bytes; the server is broken"
        case .protocolViolation(let what):
            return "protocol violation by the server: \(what)"
        case .closed:
            return "the connection is closed; connect again"
        }
    }
}
