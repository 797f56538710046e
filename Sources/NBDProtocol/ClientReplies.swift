// The client's half of the "Transmission phase": request encoding and a reply parser for
// "Simple reply message" and "Structured reply chunk message". Pure values, no I/O.
import NIOCore

public enum NBDClientRequest {
    /// "Request message": u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length (28 bytes).
    public static func encode(
        _ command: NBDCommand, flags: NBDCommandFlags = [], cookie: UInt64, offset: UInt64, length: UInt32,
        into b: inout ByteBuffer
    ) {
        b.writeInteger(NBDMagic.request)
        b.writeInteger(flags.rawValue)
        b.writeInteger(command.rawValue)
        b.writeInteger(cookie)
        b.writeInteger(offset)
        b.writeInteger(length)
    }
}

/// What one reply chunk says.
public enum NBDChunkPayload: Sendable, Equatable {
    case none
    /// NBD_REPLY_TYPE_OFFSET_DATA: data for `offset ..< offset + data.readableBytes`.
    case offsetData(offset: UInt64, data: ByteBuffer)
    /// NBD_REPLY_TYPE_OFFSET_HOLE: `length` bytes of zeroes at `offset`.
    case offsetHole(offset: UInt64, length: UInt32)
    /// NBD_REPLY_TYPE_BLOCK_STATUS: context id and (length, flags) descriptors.
    case blockStatus(context: UInt32, extents: [NBDExtent])
    /// NBD_REPLY_TYPE_ERROR / ERROR_OFFSET, or any other type with bit 15 set ("a client MUST
    /// treat an unknown error type as an error, reading the common error fields").
    case error(code: UInt32, message: String, offset: UInt64?)
    /// A non-error type this client does not know.
    case unknown(type: UInt16)
}

public struct NBDExtent: Sendable, Equatable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// One reply from the server.
public enum NBDReplyChunk: Sendable, Equatable {
    /// "Simple reply message": error 0 means success; a successful READ carries its data.
    case simple(cookie: UInt64, error: UInt32, data: ByteBuffer?)
    /// "Structured reply chunk message"; `done` is NBD_REPLY_FLAG_DONE.
    case structured(cookie: UInt64, done: Bool, payload: NBDChunkPayload)

    public var cookie: UInt64 {
        switch self {
        case .simple(let c, _, _), .structured(let c, _, _): return c
        }
    }
    /// Whether this is the last reply for its cookie.
    public var isFinal: Bool {
        switch self {
        case .simple: return true
        case .structured(_, let done, _): return done
        }
    }
}

public enum NBDReplyParseError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case unknownCookie(UInt64)
    case chunkTooLarge(UInt32)
    case malformed(String)
    public var description: String {
        switch self {
        case .badMagic(let m):
            return
                "reply magic 0x\(String(m, radix: 16)) is neither the simple nor the structured reply magic; the server is out of sync"
        case .unknownCookie(let c): return "the server replied to cookie \(c), which no request in flight has"
        case .chunkTooLarge(let n): return "a reply chunk announces \(n) bytes, more than any request asked for"
        case .malformed(let what): return "malformed reply chunk: \(what)"
        }
    }
}

/// Splits the server's byte stream into replies. For a simple reply the parser must know how
/// many data bytes follow, which only the request says ("Simple reply message": "the client
/// MUST know the length of the data"); `dataLength(cookie)` answers that, nil for unknown cookies.
public struct NBDReplyParser {
    public static let simpleHeaderSize = 16
    public static let structuredHeaderSize = 20
    /// A chunk larger than this is refused (the largest READ this client sends is far smaller).
    public let maximumChunk: UInt32

    enum State {
        case header
        case simpleData(cookie: UInt64, length: Int)
        case chunk(cookie: UInt64, flags: UInt16, type: UInt16, length: Int)
    }
    private var state: State = .header

    public init(maximumChunk: UInt32 = 64 << 20) { self.maximumChunk = maximumChunk }

    public mutating func next(_ input: inout ByteBuffer, dataLength: (UInt64) -> Int?) throws(NBDReplyParseError)
        -> NBDReplyChunk?
    {
        while true {
            switch state {
            case .simpleData(let cookie, let length):
                guard let data = input.readSlice(length: length) else { return nil }
                state = .header
                return .simple(cookie: cookie, error: 0, data: data)
            case .chunk(let cookie, let flags, let type, let length):
                guard let payload = input.readSlice(length: length) else { return nil }
                state = .header
                return .structured(
                    cookie: cookie, done: flags & StructuredReply.flagDone != 0,
                    payload: try Self.decode(type: type, payload))
            case .header:
                guard let magic: UInt32 = input.getInteger(at: input.readerIndex) else { return nil }
                switch magic {
                case NBDMagic.simpleReply:
                    guard input.readableBytes >= Self.simpleHeaderSize else { return nil }
                    input.moveReaderIndex(forwardBy: 4)
                    let error: UInt32 = input.readInteger()!
                    let cookie: UInt64 = input.readInteger()!
                    guard let n = dataLength(cookie) else { throw .unknownCookie(cookie) }
                    if error != 0 || n == 0 { return .simple(cookie: cookie, error: error, data: nil) }
                    state = .simpleData(cookie: cookie, length: n)
                case NBDMagic.structuredReply:
                    guard input.readableBytes >= Self.structuredHeaderSize else { return nil }
                    input.moveReaderIndex(forwardBy: 4)
                    let flags: UInt16 = input.readInteger()!
                    let type: UInt16 = input.readInteger()!
                    let cookie: UInt64 = input.readInteger()!
                    let length: UInt32 = input.readInteger()!
                    guard dataLength(cookie) != nil else { throw .unknownCookie(cookie) }
                    guard length <= maximumChunk else { throw .chunkTooLarge(length) }
                    state = .chunk(cookie: cookie, flags: flags, type: type, length: Int(length))
                default:
                    throw .badMagic(magic)
                }
            }
        }
    }

    /// "Structured reply types": the payload layouts.
    static func decode(type: UInt16, _ payload: ByteBuffer) throws(NBDReplyParseError) -> NBDChunkPayload {
        var p = payload
        switch type {
        case StructuredReply.ChunkType.none:
            guard p.readableBytes == 0 else {
                throw .malformed("NBD_REPLY_TYPE_NONE with \(p.readableBytes) payload bytes")
            }
            return .none
        case StructuredReply.ChunkType.offsetData:
            guard let offset: UInt64 = p.readInteger() else {
                throw .malformed("NBD_REPLY_TYPE_OFFSET_DATA shorter than 8 bytes")
            }
            return .offsetData(offset: offset, data: p)
        case StructuredReply.ChunkType.offsetHole:
            guard p.readableBytes == 12, let offset: UInt64 = p.readInteger(), let length: UInt32 = p.readInteger()
            else {
                throw .malformed("NBD_REPLY_TYPE_OFFSET_HOLE is \(p.readableBytes) bytes, not 12")
            }
            return .offsetHole(offset: offset, length: length)
        case StructuredReply.ChunkType.blockStatus:
            guard let ctx: UInt32 = p.readInteger(), p.readableBytes % 8 == 0 else {
                throw .malformed("NBD_REPLY_TYPE_BLOCK_STATUS is not 4 + 8n bytes")
            }
            var extents: [NBDExtent] = []
            while let l: UInt32 = p.readInteger(), let f: UInt32 = p.readInteger() {
                extents.append(NBDExtent(length: l, flags: f))
            }
            return .blockStatus(context: ctx, extents: extents)
        default:
            guard type & 0x8000 != 0 else { return .unknown(type: type) }
            guard let code: UInt32 = p.readInteger(), let n: UInt16 = p.readInteger(), Int(n) <= p.readableBytes,
                let message = p.readString(length: Int(n))
            else {
                throw .malformed("error chunk 0x\(String(type, radix: 16)) shorter than its message")
            }
            if type == StructuredReply.ChunkType.errorOffset {
                guard let o: UInt64 = p.readInteger() else {
                    throw .malformed("NBD_REPLY_TYPE_ERROR_OFFSET without its offset")
                }
                return .error(code: code, message: message, offset: o)
            }
            return .error(code: code, message: message, offset: nil)
        }
    }
}

extension NBDErrno {
    /// The errno's conventional name, for messages; unknown values as numbers.
    public static func name(_ code: UInt32) -> String {
        switch NBDErrno(rawValue: code) {
        case .perm?: return "EPERM"
        case .io?: return "EIO"
        case .nomem?: return "ENOMEM"
        case .inval?: return "EINVAL"
        case .nospc?: return "ENOSPC"
        case .overflow?: return "EOVERFLOW"
        case .notsup?: return "ENOTSUP"
        case .shutdown?: return "ESHUTDOWN"
        case nil: return "error \(code)"
        }
    }
}
