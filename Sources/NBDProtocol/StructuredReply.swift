// "Structured reply chunk message": a 20-byte header, then a type-specific payload.
import NIOCore

public enum StructuredReply {
    public static let flagDone: UInt16 = 1
    public enum ChunkType {
        public static let none: UInt16 = 0, offsetData: UInt16 = 1, offsetHole: UInt16 = 2
        public static let blockStatus: UInt16 = 5, blockStatusExt: UInt16 = 6
        public static let error: UInt16 = 0x8001, errorOffset: UInt16 = 0x8002
    }

    /// magic, flags, type, cookie, payload length.
    public static func header(cookie: UInt64, type: UInt16, done: Bool, length: Int, into b: inout ByteBuffer) {
        b.writeInteger(NBDMagic.structuredReply)
        b.writeInteger(done ? flagDone : 0)
        b.writeInteger(type)
        b.writeInteger(cookie)
        b.writeInteger(UInt32(length))
    }

    /// NBD_REPLY_TYPE_OFFSET_DATA header and offset; the caller writes `dataLength` bytes after it.
    public static func offsetData(cookie: UInt64, offset: UInt64, dataLength: Int, done: Bool, into b: inout ByteBuffer) {
        header(cookie: cookie, type: ChunkType.offsetData, done: done, length: 8 + dataLength, into: &b)
        b.writeInteger(offset)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 hole size.
    public static func offsetHole(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, into b: inout ByteBuffer) {
        header(cookie: cookie, type: ChunkType.offsetHole, done: done, length: 12, into: &b)
        b.writeInteger(offset)
        b.writeInteger(length)
    }

    /// NBD_REPLY_TYPE_ERROR / ERROR_OFFSET: u32 error, u16 message length, message[, u64 offset]. Always final.
    public static func error(cookie: UInt64, error: NBDErrno, message: String, offset: UInt64? = nil, into b: inout ByteBuffer) {
        let msg = String(decoding: message.utf8.prefix(4096), as: UTF8.self)
        let n = msg.utf8.count
        header(cookie: cookie, type: offset == nil ? ChunkType.error : ChunkType.errorOffset, done: true,
               length: 6 + n + (offset == nil ? 0 : 8), into: &b)
        b.writeInteger(error.rawValue)
        b.writeInteger(UInt16(n))
        b.writeString(msg)
        if let o = offset { b.writeInteger(o) }
    }

    /// NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then (u32 length, u32 flags) descriptors.
    public static func blockStatus(cookie: UInt64, context: UInt32, extents: [(length: UInt32, flags: UInt32)], done: Bool, into b: inout ByteBuffer) {
        header(cookie: cookie, type: ChunkType.blockStatus, done: done, length: 4 + 8 * extents.count, into: &b)
        b.writeInteger(context)
        for e in extents { b.writeInteger(e.length); b.writeInteger(e.flags) }
    }
}
