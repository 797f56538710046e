// The server's side of the transmission phase, parsed from the bytes it sent (NBD protocol,
// "Simple reply message", "Structured reply chunk message", and the extension branch's "Extended
// reply chunk message"), written from the spec with every constant spelled out, sharing nothing
// with the server's encoders. Used by the handler tests and the `handler` fuzz target.

/// Replies, as they complete: a simple reply, or a structured / extended reply's chunks up to the
/// one with NBD_REPLY_FLAG_DONE. Feed it bytes as they arrive.
public struct ReplyReader {
    public enum Framing: Sendable { case simple, structured, extended }

    public struct Reply: Equatable, Sendable {
        public var cookie: UInt64
        /// The error of a simple reply or of the first error chunk (0: none).
        public var error: UInt32 = 0
        /// A simple reply (as opposed to structured chunks ending in DONE).
        public var simple = false
        /// Chunk types in order (empty for a simple reply).
        public var chunkTypes: [UInt16] = []
        /// READ data: (offset, bytes) of NBD_REPLY_TYPE_OFFSET_DATA chunks, or the simple reply's data at offset 0.
        public var data: [(offset: UInt64, bytes: [UInt8])] = []
        /// NBD_REPLY_TYPE_OFFSET_HOLE chunks.
        public var holes: [(offset: UInt64, length: UInt64)] = []

        public static func == (a: Reply, b: Reply) -> Bool {
            a.cookie == b.cookie && a.error == b.error && a.simple == b.simple && a.chunkTypes == b.chunkTypes
                && a.data.map(\.offset) == b.data.map(\.offset) && a.data.map(\.bytes) == b.data.map(\.bytes)
                && a.holes.map(\.offset) == b.holes.map(\.offset) && a.holes.map(\.length) == b.holes.map(\.length)
        }

        /// The bytes of a READ of `length` bytes at `offset`, assembled from data and holes; nil
        /// if they do not cover it exactly once.
        public func readBytes(offset: UInt64, length: Int) -> [UInt8]? {
            // (start, length, bytes or nil for a hole), in offset order; they must tile the range.
            var pieces: [(UInt64, UInt64, [UInt8]?)] = data.map {
                (simple ? offset : $0.offset, UInt64($0.bytes.count), $0.bytes)
            }
            pieces += holes.map { ($0.offset, $0.length, nil) }
            pieces.sort { $0.0 < $1.0 }
            var out: [UInt8] = []
            out.reserveCapacity(length)
            var at = offset
            for (start, n, bytes) in pieces {
                guard start == at, n > 0 else { return nil }
                if let b = bytes { out += b } else { out += repeatElement(0, count: Int(n)) }
                at += n
            }
            return at == offset + UInt64(length) ? out : nil
        }
    }

    public struct Malformed: Error, CustomStringConvertible {
        public var description: String
    }

    public let framing: Framing
    /// The data length a successful simple reply to `cookie` carries (its READ's length), or nil.
    private let readLength: (UInt64) -> Int?
    private var buffer: [UInt8] = []
    /// Structured replies whose DONE chunk has not come yet.
    public private(set) var partial: [UInt64: Reply] = [:]

    public init(framing: Framing, readLength: @escaping (UInt64) -> Int?) {
        self.framing = framing
        self.readLength = readLength
    }

    /// Bytes received and not yet a whole reply or chunk.
    public var pendingBytes: Int { buffer.count }

    /// Adds bytes; returns the replies they complete, in order.
    public mutating func feed(_ bytes: [UInt8]) throws(Malformed) -> [Reply] {
        buffer += bytes
        var out: [Reply] = []
        var at = 0
        defer { buffer.removeFirst(at) }
        while true {
            guard let (used, reply) = try next(at) else { return out }
            at += used
            if let r = reply { out.append(r) }
        }
    }

    private func be(_ at: Int, _ width: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<width { v = v << 8 | UInt64(buffer[at + i]) }
        return v
    }

    /// One simple reply or one chunk at `at`: bytes used and the reply it completes; nil if incomplete.
    private mutating func next(_ at: Int) throws(Malformed) -> (Int, Reply?)? {
        let have = buffer.count - at
        guard have >= 4 else { return nil }
        let magic = UInt32(be(at, 4))
        switch magic {
        case 0x6744_6698:
            guard framing != .extended else { throw Malformed(description: "a simple reply with extended headers") }
            guard have >= 16 else { return nil }
            let error = UInt32(be(at + 4, 4))
            let cookie = be(at + 8, 8)
            var n = 0
            if error == 0, framing == .simple, let len = readLength(cookie) { n = len }
            guard have >= 16 + n else { return nil }
            var r = Reply(cookie: cookie, error: error, simple: true)
            if n > 0 { r.data = [(0, Array(buffer[at + 16..<at + 16 + n]))] }
            return (16 + n, r)
        case 0x668e_33ef, 0x6e8a_278c:
            let extended = magic == 0x6e8a_278c
            guard extended == (framing == .extended) else {
                throw Malformed(description: "chunk magic \(magic) with framing \(framing)")
            }
            let headerSize = extended ? 32 : 20
            guard have >= headerSize else { return nil }
            let flags = UInt16(be(at + 4, 2))
            let type = UInt16(be(at + 6, 2))
            let cookie = be(at + 8, 8)
            let length = extended ? be(at + 24, 8) : be(at + 16, 4)
            guard length <= 1 << 31 else { throw Malformed(description: "chunk of \(length) bytes") }
            guard have >= headerSize + Int(length) else { return nil }
            let p = at + headerSize
            let n = Int(length)
            var r = partial[cookie] ?? Reply(cookie: cookie)
            r.chunkTypes.append(type)
            switch type {
            case 0: guard n == 0 else { throw Malformed(description: "NONE chunk of \(n) bytes") }
            case 1:
                guard n >= 8 else { throw Malformed(description: "OFFSET_DATA chunk of \(n) bytes") }
                r.data.append((be(p, 8), Array(buffer[p + 8..<p + n])))
            case 2:
                guard n == 12 || n == 16 else { throw Malformed(description: "OFFSET_HOLE chunk of \(n) bytes") }
                r.holes.append((be(p, 8), be(p + 8, n - 8)))
            case 5, 6: break // block status: descriptors are checked by the tests that ask for them
            case 0x8001, 0x8002:
                guard n >= 6, n >= 6 + Int(be(p + 4, 2)) + (type == 0x8002 ? 8 : 0) else {
                    throw Malformed(description: "error chunk of \(n) bytes")
                }
                let e = UInt32(be(p, 4))
                guard e != 0 else { throw Malformed(description: "error chunk with error 0") }
                if r.error == 0 { r.error = e }
            default: throw Malformed(description: "chunk type \(type)")
            }
            if flags & 1 != 0 {
                partial[cookie] = nil
                return (headerSize + n, r)
            }
            partial[cookie] = r
            return (headerSize + n, nil)
        default:
            throw Malformed(description: "reply magic \(magic) after \(at) bytes")
        }
    }
}
