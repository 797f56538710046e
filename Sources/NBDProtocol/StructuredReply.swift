// "Structured reply chunk message": a 20-byte header, then a type-specific payload.
import NIOCore

/// How reply chunks are framed: 20-byte structured headers, or 32-byte extended headers that
/// repeat the request's offset (extension branch, "Extended reply chunk message").
public struct ReplyFraming: Sendable, Equatable {
    public var extended: Bool
    public var requestOffset: UInt64
    public static let structured = ReplyFraming(extended: false, requestOffset: 0)
    public static func extended(offset: UInt64) -> ReplyFraming { ReplyFraming(extended: true, requestOffset: offset) }
    public init(extended: Bool, requestOffset: UInt64) {
        self.extended = extended
        self.requestOffset = requestOffset
    }
}

public enum StructuredReply {
    public static let flagDone: UInt16 = 1
    public enum ChunkType {
        public static let none: UInt16 = 0, offsetData: UInt16 = 1, offsetHole: UInt16 = 2
        public static let blockStatus: UInt16 = 5, blockStatusExt: UInt16 = 6
        public static let error: UInt16 = 0x8001, errorOffset: UInt16 = 0x8002
    }

    /// magic, flags, type, cookie, [offset,] payload length (u32, or u64 when extended).
    public static func header(
        cookie: UInt64, type: UInt16, done: Bool, length: Int, framing: ReplyFraming = .structured,
        into b: inout ByteBuffer
    ) {
        // Magic, flags and type are one big-endian u64: NIO stores each integer separately (a
        // bounds and exclusivity check each), and a header goes out with every reply.
        let flags = UInt64(done ? flagDone : 0)
        if framing.extended {
            let lead = UInt64(NBDMagic.extendedReply) << 32 | flags << 16 | UInt64(type)
            b.writeMultipleIntegers(lead, cookie, framing.requestOffset, UInt64(length))
        } else {
            let lead = UInt64(NBDMagic.structuredReply) << 32 | flags << 16 | UInt64(type)
            b.writeMultipleIntegers(lead, cookie, UInt32(length))
        }
    }

    /// NBD_REPLY_TYPE_NONE with DONE: a successful reply without payload (all a simple reply
    /// would say; with extended headers simple replies are not allowed).
    public static func none(cookie: UInt64, framing: ReplyFraming, into b: inout ByteBuffer) {
        header(cookie: cookie, type: ChunkType.none, done: true, length: 0, framing: framing, into: &b)
    }

    /// NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u32 context id, u32 count, then (u64 length, u64 flags) descriptors.
    public static func blockStatusExt(
        cookie: UInt64, context: UInt32, extents: [(length: UInt64, flags: UInt64)], done: Bool, framing: ReplyFraming,
        into b: inout ByteBuffer
    ) {
        header(
            cookie: cookie, type: ChunkType.blockStatusExt, done: done, length: 8 + 16 * extents.count,
            framing: framing, into: &b)
        b.writeInteger(context)
        b.writeInteger(UInt32(extents.count))
        for e in extents {
            b.writeInteger(e.length)
            b.writeInteger(e.flags)
        }
    }

    /// NBD_REPLY_TYPE_OFFSET_DATA header and offset; the caller writes `dataLength` bytes after it.
    public static func offsetData(
        cookie: UInt64, offset: UInt64, dataLength: Int, done: Bool, framing: ReplyFraming = .structured,
        into b: inout ByteBuffer
    ) {
        header(
            cookie: cookie, type: ChunkType.offsetData, done: done, length: 8 + dataLength, framing: framing, into: &b)
        b.writeInteger(offset)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 hole size.
    public static func offsetHole(
        cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, framing: ReplyFraming = .structured,
        into b: inout ByteBuffer
    ) {
        header(cookie: cookie, type: ChunkType.offsetHole, done: done, length: 12, framing: framing, into: &b)
        b.writeInteger(offset)
        b.writeInteger(length)
    }

    /// NBD_REPLY_TYPE_ERROR / ERROR_OFFSET: u32 error, u16 message length, message[, u64 offset]. Always final.
    public static func error(
        cookie: UInt64, error: NBDErrno, message: String, offset: UInt64? = nil, framing: ReplyFraming = .structured,
        into b: inout ByteBuffer
    ) {
        let msg = String(decoding: message.utf8.prefix(4096), as: UTF8.self)
        let n = msg.utf8.count
        header(
            cookie: cookie, type: offset == nil ? ChunkType.error : ChunkType.errorOffset, done: true,
            length: 6 + n + (offset == nil ? 0 : 8), framing: framing, into: &b)
        b.writeInteger(error.rawValue)
        b.writeInteger(UInt16(n))
        b.writeString(msg)
        if let o = offset { b.writeInteger(o) }
    }

    /// NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then (u32 length, u32 flags) descriptors.
    public static func blockStatus(
        cookie: UInt64, context: UInt32, extents: [(length: UInt32, flags: UInt32)], done: Bool,
        framing: ReplyFraming = .structured, into b: inout ByteBuffer
    ) {
        header(
            cookie: cookie, type: ChunkType.blockStatus, done: done, length: 4 + 8 * extents.count, framing: framing,
            into: &b)
        b.writeInteger(context)
        for e in extents {
            b.writeInteger(e.length)
            b.writeInteger(e.flags)
        }
    }
}
