// The transmission rules ("Transmission phase", "Request types", "Command flags", "Structured
// reply chunk message"): what a request means, whether it is valid, which errno answers it, and
// how its reply is framed. Pure values, no I/O: the connection handler runs what `decide` says
// and frames what comes back with `ReplyEncoder`.
import NIOCore

/// Why the parser refused a request before it reached `decide` (the payload, if any, has
/// already been drained).
public enum RequestRejection: Sendable, Equatable {
    /// A compact WRITE longer than the maximum payload ("Maximum payload").
    case payloadTooLarge(length: UInt64, maximum: Int)
    /// An extended-header WRITE without NBD_CMD_FLAG_PAYLOAD_LEN (extension: "MUST use the flag").
    case writeWithoutPayloadLength
    /// NBD_CMD_FLAG_PAYLOAD_LEN on a command that takes no payload (extension: the server
    /// "gracefully consumes" it and answers EINVAL).
    case unexpectedPayload(type: UInt16, length: UInt64)
    /// A filtered BLOCK_STATUS payload longer than an effect length and every negotiated context
    /// id once: it repeats or invents ids ("duplicate or unknown metacontext ids": EINVAL).
    case blockStatusPayloadTooLong(length: UInt64, maximum: Int)

    public var errno: NBDErrno { .inval }

    public var message: String {
        switch self {
        case .payloadTooLarge(let n, let max):
            return "WRITE of \(n) bytes exceeds the maximum payload of \(max) bytes; split it"
        case .writeWithoutPayloadLength:
            return "extended-header WRITE without NBD_CMD_FLAG_PAYLOAD_LEN"
        case .unexpectedPayload(let t, let n):
            return
                "command \(NBDCommand(rawValue: t).map { "\($0)" } ?? "\(t)") takes no payload, but \(n) bytes were sent"
        case .blockStatusPayloadTooLong(let n, let max):
            return
                "BLOCK_STATUS payload of \(n) bytes is longer than an effect length and each negotiated context id once (\(max) bytes): an id is repeated or unknown"
        }
    }
}

/// What the rules need to know about the export, as this connection sees it.
public struct ExportFacts: Sendable, Equatable {
    public var size: UInt64
    /// The transmission flags this client was given (`NBDSession.export.flags`).
    public var flags: NBDTransmissionFlags
    public var maximumPayload: UInt64
    /// WRITE_ZEROES without writing every byte (virtio-blk WRITE_ZEROES): FAST_ZERO can succeed.
    public var canFastZero: Bool
    /// The answer to a write on a read-only export.
    public static let readOnlyMessage = "export is read-only"

    public init(size: UInt64, flags: NBDTransmissionFlags, maximumPayload: UInt64, canFastZero: Bool) {
        self.size = size
        self.flags = flags
        self.maximumPayload = maximumPayload
        self.canFastZero = canFastZero
    }

    public var readOnly: Bool { flags.contains(.readOnly) }
}

/// How a successful READ is answered.
public enum ReadReplyShape: Sendable, Equatable {
    /// Simple reply: header, then `length` bytes.
    case simple
    /// Structured, NBD_CMD_FLAG_DF: exactly one OFFSET_DATA chunk ("at most one content chunk";
    /// holes are sent as explicit zeroes).
    case contiguous
    /// Structured without DF: OFFSET_DATA and OFFSET_HOLE chunks; holes cost no device I/O.
    case sparse
}

/// A valid request, as the operation the device must run.
public enum TransmissionOperation: Sendable, Equatable {
    case read(offset: UInt64, length: UInt64, reply: ReadReplyShape)
    case write(offset: UInt64, length: UInt64, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt64, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt64, fua: Bool, mayUnmap: Bool)
    /// One chunk per selected context, in `contexts` order.
    case blockStatus(offset: UInt64, length: UInt64, contexts: [NBDMetaContextID], reqOne: Bool)
}

/// What to do with one request.
public enum RequestDecision: Sendable, Equatable {
    case run(TransmissionOperation)
    /// Valid, with nothing for the device to do (a zero-length READ, WRITE, TRIM or
    /// WRITE_ZEROES, and CACHE): answered with success at once.
    case succeed
    case fail(NBDErrno, String)
    /// NBD_CMD_DISC: no reply; close once everything in flight is answered.
    case disconnect
}

/// The rules for one connection: what the session negotiated and the export's facts. Only the
/// scalars the rules read are kept (no names or descriptions): the value is captured by every
/// request's completion.
public struct TransmissionRules: Sendable, Equatable {
    /// Structured replies (NBD_OPT_STRUCTURED_REPLY, or implied by extended headers).
    public let structuredReplies: Bool
    public let extendedHeaders: Bool
    /// The base:allocation context id, if SET_META_CONTEXT selected it for this export.
    public let allocationContext: UInt32?
    /// Every context SET_META_CONTEXT selected for this export, base:allocation first.
    public let contexts: [NBDMetaContextID]
    public let export: ExportFacts

    public init(session: NBDSession, export: ExportFacts) {
        structuredReplies = session.structuredReplies || session.extendedHeaders
        extendedHeaders = session.extendedHeaders
        allocationContext = session.allocationContext
        contexts = session.contexts
        self.export = export
    }

    /// Flags each command may carry ("Command flags"). FUA "is valid for all commands" once
    /// SEND_FUA is advertised (on READ, FLUSH, CACHE and BLOCK_STATUS it changes nothing); DF
    /// only on READ and only when SEND_DF was given (which needs structured replies); NO_HOLE
    /// and FAST_ZERO only on WRITE_ZEROES (a read-only export, which advertises neither
    /// WRITE_ZEROES nor FAST_ZERO, still answers EPERM rather than EINVAL for them, as nbdkit
    /// does); REQ_ONE only on BLOCK_STATUS.
    public func allowedFlags(_ command: NBDCommand) -> NBDCommandFlags {
        var allowed: NBDCommandFlags = export.flags.contains(.sendFUA) ? [.fua] : []
        switch command {
        case .read where export.flags.contains(.sendDF): allowed.insert(.df)
        case .writeZeroes: allowed.formUnion([.noHole, .fastZero])
        case .blockStatus: allowed.insert(.reqOne)
        default: break
        }
        return allowed
    }

    /// The decision for a request the parser accepted (WRITE's payload, if any, is complete).
    public func decide(_ r: NBDRequest) -> RequestDecision {
        guard let cmd = r.command else { return .fail(.inval, "unknown command \(r.type)") }
        if cmd == .disc { return .disconnect }
        guard r.flags.isSubset(of: allowedFlags(cmd)) else {
            return .fail(.inval, "flags 0x\(String(r.flags.rawValue, radix: 16)) are not valid for \(cmd)")
        }
        let (end, overflow) = r.offset.addingReportingOverflow(r.length)
        let inRange = !overflow && end <= export.size
        func rangeError() -> String { "range \(r.offset)+\(r.length) exceeds the export size \(export.size)" }
        let fua = r.flags.contains(.fua)
        switch cmd {
        case .read:
            if r.length > export.maximumPayload {
                // Structured replies: "permitted to reject large read requests up front with
                // NBD_EOVERFLOW"; simple replies: the client "MUST NOT" ask, EINVAL.
                let e: NBDErrno = structuredReplies ? .overflow : .inval
                return .fail(
                    e, "READ of \(r.length) bytes exceeds the maximum payload of \(export.maximumPayload) bytes")
            }
            guard inRange else { return .fail(.inval, rangeError()) }
            // A zero-length READ reads nothing, successfully. With structured replies it is answered
            // NBD_REPLY_TYPE_NONE with DONE ("always acceptable as the final chunk", "valid as a
            // reply to any request"): a content chunk "MUST describe at least one byte", so there
            // is none to send. qemu-nbd answers the same way.
            if r.length == 0 { return .succeed }
            let shape: ReadReplyShape = !structuredReplies ? .simple : (r.flags.contains(.df) ? .contiguous : .sparse)
            return .run(.read(offset: r.offset, length: r.length, reply: shape))
        case .write:
            guard !export.readOnly else { return .fail(.perm, ExportFacts.readOnlyMessage) }
            guard inRange else { return .fail(.nospc, rangeError()) }
            if r.length == 0 { return .succeed }
            return .run(.write(offset: r.offset, length: r.length, fua: fua))
        case .flush:
            return .run(.flush)
        case .trim:
            guard !export.readOnly else { return .fail(.perm, ExportFacts.readOnlyMessage) }
            guard inRange else { return .fail(.inval, rangeError()) }
            if r.length == 0 { return .succeed }
            return .run(.trim(offset: r.offset, length: r.length, fua: fua))
        case .writeZeroes:
            guard !export.readOnly else { return .fail(.perm, ExportFacts.readOnlyMessage) }
            guard inRange else { return .fail(.nospc, rangeError()) }
            // FAST_ZERO: "the server MUST fail quickly ... with NBD_ENOTSUP" when zeroing would
            // mean writing every byte. Checked before the length: the answer must not depend on it.
            if r.flags.contains(.fastZero) && !export.canFastZero {
                return .fail(.notsup, "the device has no WRITE_ZEROES; zeroing would be slow")
            }
            if r.length == 0 { return .succeed }
            return .run(
                .writeZeroes(offset: r.offset, length: r.length, fua: fua, mayUnmap: !r.flags.contains(.noHole)))
        case .cache:
            // Advertised as SEND_CACHE: the device is local memory or a local file; nothing to prefetch.
            guard inRange else { return .fail(.inval, rangeError()) }
            return .succeed
        case .blockStatus:
            guard !contexts.isEmpty else {
                return .fail(.inval, "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)")
            }
            // "The client SHOULD NOT request a status length of 0"; a reply needs "at least one
            // status descriptor" of non-zero length, so there is nothing valid to answer but an error.
            guard r.length > 0 else { return .fail(.inval, "BLOCK_STATUS of length 0") }
            guard inRange else { return .fail(.inval, rangeError()) }
            return .run(
                .blockStatus(
                    offset: r.offset, length: r.length, contexts: contexts, reqOne: r.flags.contains(.reqOne)))
        case .disc:
            return .disconnect
        case .resize:
            return .fail(.inval, "RESIZE is not supported")
        }
    }

    /// The decision for a request with a payload: a WRITE's data goes to `decide(_:)` with it;
    /// a BLOCK_STATUS payload (NBD_FLAG_BLOCK_STATUS_PAYLOAD, extension branch) is "64 bits,
    /// effect length" then "n * 32 bits, list of metacontext ids to use": the reply covers those
    /// contexts only, in the client's order. "Duplicate or unknown metacontext ids" are EINVAL.
    public func decide(_ r: NBDRequest, payload: ByteBuffer?) -> RequestDecision {
        guard var p = payload, r.command == .blockStatus else { return decide(r) }
        guard export.flags.contains(.blockStatusPayload) else {
            return .fail(.inval, "BLOCK_STATUS with a payload, but NBD_FLAG_BLOCK_STATUS_PAYLOAD was not offered")
        }
        guard p.readableBytes >= 12, (p.readableBytes - 8) % 4 == 0 else {
            return .fail(
                .inval,
                "BLOCK_STATUS payload of \(p.readableBytes) bytes is not an effect length and at least one context id")
        }
        let effect: UInt64 = p.readInteger()!
        var chosen: [NBDMetaContextID] = []
        while let id: UInt32 = p.readInteger() {
            guard let c = contexts.first(where: { $0.id == id }) else {
                return .fail(.inval, "BLOCK_STATUS names context id \(id), which was not negotiated")
            }
            guard !chosen.contains(where: { $0.id == id }) else {
                return .fail(.inval, "BLOCK_STATUS names context id \(id) twice")
            }
            chosen.append(c)
        }
        var effective = r
        effective.length = effect
        let d = decide(effective)
        guard case .run(.blockStatus(let offset, let length, _, let reqOne)) = d else { return d }
        return .run(.blockStatus(offset: offset, length: length, contexts: chosen, reqOne: reqOne))
    }

    /// The decision for a request the parser refused.
    public func decide(_ rejection: RequestRejection) -> RequestDecision {
        .fail(rejection.errno, rejection.message)
    }

    public var replies: ReplyEncoder { ReplyEncoder(structured: structuredReplies, extended: extendedHeaders) }
}

/// Frames replies as the session requires: simple replies, structured chunks, or extended chunks.
public struct ReplyEncoder: Sendable {
    public let structured: Bool
    public let extended: Bool

    public init(structured: Bool, extended: Bool) {
        self.structured = structured || extended
        self.extended = extended
    }

    public func framing(_ r: NBDRequest) -> ReplyFraming {
        extended ? .extended(offset: r.offset) : .structured
    }

    /// Whether an error is an ERROR chunk: with extended headers always (no simple replies
    /// exist); with structured replies for READ and BLOCK_STATUS ("MUST result in a structured
    /// reply"); a simple reply otherwise.
    public func errorIsStructured(_ r: NBDRequest) -> Bool {
        extended || (structured && (r.command == .read || r.command == .blockStatus))
    }

    /// A failed request's whole reply.
    public func error(_ r: NBDRequest, _ err: NBDErrno, message: String, into b: inout ByteBuffer) {
        if errorIsStructured(r) {
            StructuredReply.error(cookie: r.cookie, error: err, message: message, framing: framing(r), into: &b)
        } else {
            TransmissionParser.simpleReply(cookie: r.cookie, error: err, into: &b)
        }
    }

    /// A successful reply without data: a simple reply, or NONE with DONE where a structured
    /// reply is required (extended headers; any READ with structured replies).
    public func success(_ r: NBDRequest, into b: inout ByteBuffer) {
        if extended || (structured && r.command == .read) {
            StructuredReply.none(cookie: r.cookie, framing: framing(r), into: &b)
        } else {
            TransmissionParser.simpleReply(cookie: r.cookie, error: nil, into: &b)
        }
    }

    /// The header before `dataLength` bytes of READ data at `offset` (`shape` from the decision).
    /// `done` is false when more chunks follow (sparse reads).
    public func readData(
        _ r: NBDRequest, shape: ReadReplyShape, offset: UInt64, dataLength: Int, done: Bool, into b: inout ByteBuffer
    ) {
        precondition(dataLength > 0 || shape == .simple, "a content chunk describes at least one byte")
        switch shape {
        case .simple: TransmissionParser.simpleReply(cookie: r.cookie, error: nil, into: &b)
        case .contiguous, .sparse:
            StructuredReply.offsetData(
                cookie: r.cookie, offset: offset, dataLength: dataLength, done: done, framing: framing(r), into: &b)
        }
    }

    /// An OFFSET_HOLE chunk (sparse reads only; `length` ≤ the maximum payload, so it fits u32).
    public func readHole(_ r: NBDRequest, offset: UInt64, length: UInt64, done: Bool, into b: inout ByteBuffer) {
        precondition(length > 0 && length <= UInt64(UInt32.max), "a hole chunk describes 1 to 2^32-1 bytes")
        StructuredReply.offsetHole(
            cookie: r.cookie, offset: offset, length: UInt32(length), done: done, framing: framing(r), into: &b)
    }

    /// The BLOCK_STATUS reply for `descriptors` (from `BlockStatusDescriptors.merge`).
    /// `done`: the last chunk of the reply (one chunk per selected context).
    public func blockStatus(
        _ r: NBDRequest, context: UInt32, descriptors: [BlockStatusDescriptor], done: Bool = true,
        into b: inout ByteBuffer
    ) {
        if extended {
            StructuredReply.blockStatusExt(
                cookie: r.cookie, context: context, extents: descriptors.map { ($0.length, UInt64($0.flags)) },
                done: done, framing: framing(r), into: &b)
        } else {
            StructuredReply.blockStatus(
                cookie: r.cookie, context: context, extents: descriptors.map { (UInt32($0.length), $0.flags) },
                done: done, into: &b)
        }
    }
}

/// One block status descriptor: `length` bytes with these status flags.
public struct BlockStatusDescriptor: Sendable, Equatable {
    public var length: UInt64
    public var flags: UInt32
    public init(length: UInt64, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

public enum BlockStatusDescriptors {
    /// "At most 2^20 status descriptors in a single chunk" ("NBD_CMD_BLOCK_STATUS").
    public static let maximumCount = 1 << 20

    /// Descriptors for [offset, offset+length) from `runs` (consecutive, ascending ranges with
    /// their flags, covering the request; they may start before it and end after it): clipped to
    /// the request, equal neighbours merged, each at most 2^32-4096 bytes in compact replies
    /// (u32 lengths, kept 4 KiB aligned), at most `maximumCount` of them, exactly one with REQ_ONE
    /// ("MUST NOT be greater than the length of the request").
    public static func merge<S: Sequence>(_ runs: S, offset: UInt64, length: UInt64, extended: Bool, reqOne: Bool)
        -> [BlockStatusDescriptor]
    where S.Element == (start: UInt64, end: UInt64, flags: UInt32) {
        let end = offset + length
        let maxPiece: UInt64 = extended ? UInt64.max : UInt64(UInt32.max) & ~4095
        var out: [BlockStatusDescriptor] = []
        for run in runs {
            let a = max(run.start, offset)
            let b = min(run.end, end)
            guard a < b else { continue }
            var left = b - a
            while left > 0 {
                let n = min(left, maxPiece)
                if let l = out.last, l.flags == run.flags, maxPiece - l.length >= n {
                    out[out.count - 1].length += n
                } else {
                    if out.count == maximumCount || (reqOne && !out.isEmpty) { return out }
                    out.append(BlockStatusDescriptor(length: n, flags: run.flags))
                }
                left -= n
            }
        }
        return out
    }
}
