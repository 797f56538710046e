// The client's half of "Newstyle negotiation" and "Option haggling": what a client sends, and
// parsers for what the server answers. Pure values, no I/O.
import NIOCore

/// Why bytes from a server cannot be understood. The client disconnects on any of these.
public enum NBDClientWireError: Error, Equatable, CustomStringConvertible {
    case notNBD(magic: UInt64)
    case oldstyle
    case noFixedNewstyle(flags: UInt16)
    case badOptionReplyMagic(UInt64)
    case optionReplyTooLong(UInt32)
    case malformed(String)

    public var description: String {
        switch self {
        case .notNBD(let m):
            return
                "the server's greeting starts with 0x\(String(m, radix: 16)), not NBDMAGIC; this is not an NBD server (check the host and port)"
        case .oldstyle:
            return "the server speaks oldstyle negotiation, which has no export names or options; use a newstyle server"
        case .noFixedNewstyle(let f):
            return
                "the server does not offer fixed newstyle negotiation (handshake flags 0x\(String(f, radix: 16))); it is too old for this client"
        case .badOptionReplyMagic(let m):
            return
                "an option reply starts with 0x\(String(m, radix: 16)) instead of the option reply magic; the server is out of sync"
        case .optionReplyTooLong(let n):
            return "an option reply announces \(n) bytes, more than any valid reply; the server is misbehaving"
        case .malformed(let what):
            return "malformed reply from the server: \(what)"
        }
    }
}

/// "Newstyle negotiation": the 18-byte greeting, NBDMAGIC, IHAVEOPT, u16 handshake flags.
public struct NBDGreeting: Sendable, Equatable {
    public static let size = 18
    public var handshakeFlags: UInt16
    public var noZeroes: Bool { handshakeFlags & NBDHandshakeFlags.noZeroes != 0 }

    /// Parses the first 18 bytes a server sends. Fixed newstyle is required: without it an
    /// unknown option ends the session, so option haggling cannot be used safely.
    public static func parse(_ b: ByteBuffer) throws(NBDClientWireError) -> NBDGreeting {
        var b = b
        guard let magic: UInt64 = b.readInteger(), let second: UInt64 = b.readInteger(),
            let flags: UInt16 = b.readInteger()
        else {
            throw .malformed("greeting shorter than \(size) bytes")
        }
        guard magic == NBDMagic.nbdmagic else { throw .notNBD(magic: magic) }
        // "Oldstyle negotiation": 0x00420281861253 follows NBDMAGIC.
        guard second == NBDMagic.ihaveopt else {
            if second == 0x0042_0281_8612_53 { throw .oldstyle }
            throw .notNBD(magic: second)
        }
        guard flags & NBDHandshakeFlags.fixedNewstyle != 0 else { throw .noFixedNewstyle(flags: flags) }
        return NBDGreeting(handshakeFlags: flags)
    }

    /// "Client flags": fixed newstyle always, NO_ZEROES only when the server offered it.
    public func clientFlags() -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBDHandshakeFlags.clientFixedNewstyle | (noZeroes ? NBDHandshakeFlags.clientNoZeroes : 0))
        return b
    }
}

/// Options a client sends ("Option haggling": IHAVEOPT, u32 option, u32 length, data).
public enum NBDClientOption {
    public static func encode(_ option: NBDOption, payload: ByteBuffer? = nil) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBDMagic.ihaveopt)
        b.writeInteger(option.rawValue)
        if var p = payload {
            b.writeInteger(UInt32(p.readableBytes))
            b.writeBuffer(&p)
        } else {
            b.writeInteger(UInt32(0))
        }
        return b
    }

    /// "NBD_OPT_INFO and NBD_OPT_GO": u32 name length, name, u16 count, u16 × count info types.
    public static func info(_ option: NBDOption = .go, exportName: String, requests: [UInt16]) -> ByteBuffer {
        var p = ByteBuffer()
        p.writeInteger(UInt32(exportName.utf8.count))
        p.writeString(exportName)
        p.writeInteger(UInt16(requests.count))
        for r in requests { p.writeInteger(r) }
        return encode(option, payload: p)
    }

    /// "NBD_OPT_LIST_META_CONTEXT" / "NBD_OPT_SET_META_CONTEXT": u32 export name length, name,
    /// u32 query count, then each query as u32 length + string. No queries lists every context.
    public static func metaContext(_ option: NBDOption = .listMetaContext, exportName: String, queries: [String])
        -> ByteBuffer
    {
        var p = ByteBuffer()
        p.writeInteger(UInt32(exportName.utf8.count))
        p.writeString(exportName)
        p.writeInteger(UInt32(queries.count))
        for q in queries {
            p.writeInteger(UInt32(q.utf8.count))
            p.writeString(q)
        }
        return encode(option, payload: p)
    }
}

/// "Option reply": u64 magic, u32 option, u32 reply type, u32 length, payload.
public struct NBDOptionReply: Sendable, Equatable {
    public static let headerSize = 20
    /// Longest reply payload accepted: strings are at most 4096 bytes, so no valid reply is near this.
    public static let maximumPayload: UInt32 = 64 * 1024

    public var option: UInt32
    public var type: UInt32
    public var payload: ByteBuffer
    public var isError: Bool { type & 0x8000_0000 != 0 }
    /// An error reply's payload is a human-readable message (it "MAY" be empty).
    public var message: String { payload.getString(at: payload.readerIndex, length: payload.readableBytes) ?? "" }

    public init(option: UInt32, type: UInt32, payload: ByteBuffer) {
        self.option = option
        self.type = type
        self.payload = payload
    }

    /// The header: option, type and payload length. The caller then reads that many bytes.
    public static func parseHeader(_ b: ByteBuffer) throws(NBDClientWireError) -> (
        option: UInt32, type: UInt32, length: UInt32
    ) {
        var b = b
        guard let magic: UInt64 = b.readInteger(), let option: UInt32 = b.readInteger(),
            let type: UInt32 = b.readInteger(), let length: UInt32 = b.readInteger()
        else {
            throw .malformed("option reply header shorter than \(headerSize) bytes")
        }
        guard magic == NBDMagic.optionReply else { throw .badOptionReplyMagic(magic) }
        guard length <= maximumPayload else { throw .optionReplyTooLong(length) }
        return (option, type, length)
    }
}

/// NBD_REP_INFO payloads ("NBD_OPT_INFO and NBD_OPT_GO").
public enum NBDInfoReply: Sendable, Equatable {
    case export(size: UInt64, flags: NBDTransmissionFlags)
    case name(String)
    case description(String)
    case blockSize(minimum: UInt32, preferred: UInt32, maximum: UInt32)
    /// An information type this client does not know; "the client MUST ignore" it.
    case unknown(UInt16)

    public static func parse(_ payload: ByteBuffer) throws(NBDClientWireError) -> NBDInfoReply {
        var p = payload
        guard let type: UInt16 = p.readInteger() else { throw .malformed("NBD_REP_INFO without an information type") }
        switch type {
        case NBDInfo.export:
            guard p.readableBytes == 10, let size: UInt64 = p.readInteger(), let flags: UInt16 = p.readInteger() else {
                throw .malformed("NBD_INFO_EXPORT is \(p.readableBytes + 2) bytes, not 12")
            }
            return .export(size: size, flags: NBDTransmissionFlags(rawValue: flags))
        case NBDInfo.name, NBDInfo.description:
            let s = p.readString(length: p.readableBytes) ?? ""
            return type == NBDInfo.name ? .name(s) : .description(s)
        case NBDInfo.blockSize:
            guard p.readableBytes == 12, let a: UInt32 = p.readInteger(), let b: UInt32 = p.readInteger(),
                let c: UInt32 = p.readInteger()
            else {
                throw .malformed("NBD_INFO_BLOCK_SIZE is \(p.readableBytes + 2) bytes, not 14")
            }
            return .blockSize(minimum: a, preferred: b, maximum: c)
        default:
            return .unknown(type)
        }
    }
}

/// NBD_REP_SERVER ("NBD_OPT_LIST"): u32 name length, name, then the rest is a description.
public struct NBDServerEntry: Sendable, Equatable {
    public var name: String
    public var description: String
    public init(name: String, description: String) {
        self.name = name
        self.description = description
    }

    public static func parse(_ payload: ByteBuffer) throws(NBDClientWireError) -> NBDServerEntry {
        var p = payload
        guard let n: UInt32 = p.readInteger(), Int(n) <= p.readableBytes, let name = p.readString(length: Int(n)) else {
            throw .malformed("NBD_REP_SERVER name length exceeds the reply")
        }
        return NBDServerEntry(name: name, description: p.readString(length: p.readableBytes) ?? "")
    }
}

/// NBD_REP_META_CONTEXT ("NBD_OPT_LIST_META_CONTEXT"): u32 context id, then the context name.
public struct NBDMetaContextEntry: Sendable, Equatable {
    public var id: UInt32
    public var name: String
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }

    public static func parse(_ payload: ByteBuffer) throws(NBDClientWireError) -> NBDMetaContextEntry {
        var p = payload
        guard let id: UInt32 = p.readInteger() else { throw .malformed("NBD_REP_META_CONTEXT shorter than 4 bytes") }
        return NBDMetaContextEntry(id: id, name: p.readString(length: p.readableBytes) ?? "")
    }
}

/// Names of option reply types, for messages.
public func nbdReplyName(_ type: UInt32) -> String {
    switch type {
    case NBDReply.ack: return "NBD_REP_ACK"
    case NBDReply.server: return "NBD_REP_SERVER"
    case NBDReply.info: return "NBD_REP_INFO"
    case NBDReply.metaContext: return "NBD_REP_META_CONTEXT"
    case NBDReply.errUnsup: return "NBD_REP_ERR_UNSUP"
    case NBDReply.errPolicy: return "NBD_REP_ERR_POLICY"
    case NBDReply.errInvalid: return "NBD_REP_ERR_INVALID"
    case NBDReply.errPlatform: return "NBD_REP_ERR_PLATFORM"
    case NBDReply.errTLSReqd: return "NBD_REP_ERR_TLS_REQD"
    case NBDReply.errUnknown: return "NBD_REP_ERR_UNKNOWN"
    case NBDReply.errShutdown: return "NBD_REP_ERR_SHUTDOWN"
    case NBDReply.errBlockSizeReqd: return "NBD_REP_ERR_BLOCK_SIZE_REQD"
    case NBDReply.errTooBig: return "NBD_REP_ERR_TOO_BIG"
    case NBDReply.errExtHeaderReqd: return "NBD_REP_ERR_EXT_HEADER_REQD"
    default: return "reply type 0x\(String(type, radix: 16))"
    }
}
