// "Transmission phase": request parsing and reply encoding. Pure values, no I/O.
import NIOCore

/// One request header ("Request message").
public struct NBDRequest: Sendable, Equatable {
    public var flags: NBDCommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt64
    public var command: NBDCommand? { NBDCommand(rawValue: type) }
    public init(flags: NBDCommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

public enum TransmissionEvent: Equatable {
    /// A complete request; WRITE carries its payload.
    case request(NBDRequest, payload: ByteBuffer?)
    /// A request refused while parsing (a WRITE above the maximum payload, an extended WRITE
    /// without PAYLOAD_LEN, a payload on a command that takes none). Any payload has been
    /// drained without buffering (the event comes once the last byte is consumed, so the reply
    /// never overtakes the client's upload); `TransmissionRules.decide(_:)` gives its answer.
    case rejected(NBDRequest, reason: RequestRejection)
}

public enum TransmissionError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case payloadTooLarge(UInt64)
    public var description: String {
        switch self {
        case .badMagic(let m):
            return
                "request magic 0x\(String(m, radix: 16)) is not the negotiated request magic; the client is out of sync, disconnecting"
        case .payloadTooLarge(let n):
            return
                "a request announces a \(n)-byte payload, above the maximum payload (and, for a compact request, above the 32 MiB every server accepts); disconnecting, as the spec allows"
        }
    }
}

public struct TransmissionParser {
    public static let requestSize = 28
    /// "any payload not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
    /// service attack, even if that length is larger than the advertised maximum payload size."
    public static let courtesyPayload = 1 << 25
    public static let extendedRequestSize = 32
    enum State: Equatable {
        case header
        case payload(NBDRequest)
        case discarding(NBDRequest, remaining: UInt64, reason: RequestRejection)
    }
    private var state: State = .header
    public let maximumPayload: Int
    /// 32-byte extended requests (NBD_OPT_EXTENDED_HEADERS) instead of 28-byte compact ones.
    public let extendedHeaders: Bool
    /// The longest BLOCK_STATUS payload taken (NBD_FLAG_BLOCK_STATUS_PAYLOAD: an effect length
    /// and each negotiated context id once, 8 + 4n bytes); 0: the payload form is not offered.
    /// A longer one is consumed and refused (it must repeat or invent an id).
    public let blockStatusPayloadLimit: Int

    public init(maximumPayload: Int, extendedHeaders: Bool = false, blockStatusPayloadLimit: Int = 0) {
        self.maximumPayload = maximumPayload
        self.extendedHeaders = extendedHeaders
        self.blockStatusPayloadLimit = blockStatusPayloadLimit
    }

    /// The payload length of the WRITE whose header has been parsed and whose payload is still
    /// arriving (nil otherwise): how big a buffer that payload is gathered in needs to be.
    public var awaitedPayload: Int? {
        if case .payload(let r) = state { return Int(r.length) }
        return nil
    }

    /// Parses the next event from `input`, or returns nil when more bytes are needed.
    public mutating func next(_ input: inout ByteBuffer) throws(TransmissionError) -> TransmissionEvent? {
        while true {
            switch state {
            case .discarding(let r, let remaining, let reason):
                let n = Int(min(UInt64(input.readableBytes), remaining))
                input.moveReaderIndex(forwardBy: n)
                if UInt64(n) < remaining {
                    state = .discarding(r, remaining: remaining - UInt64(n), reason: reason)
                    return nil
                }
                state = .header
                return .rejected(r, reason: reason)
            case .payload(let r):
                guard let p = input.readSlice(length: Int(r.length)) else { return nil }
                state = .header
                return .request(r, payload: p)
            case .header:
                if extendedHeaders { return try nextExtended(&input) }
                guard input.readableBytes >= Self.requestSize else { return nil }
                let magic: UInt32 = input.readInteger()!
                guard magic == NBDMagic.request else { throw .badMagic(magic) }
                let flags: UInt16 = input.readInteger()!
                let type: UInt16 = input.readInteger()!
                let cookie: UInt64 = input.readInteger()!
                let offset: UInt64 = input.readInteger()!
                let length: UInt32 = input.readInteger()!
                let r = NBDRequest(
                    flags: NBDCommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset,
                    length: UInt64(length))
                if type == NBDCommand.write.rawValue {
                    if Int(length) > maximumPayload {
                        // "Maximum payload": a payload of up to 2^25 bytes "SHOULD NOT be considered
                        // a denial of service attack" whatever the maximum, so it is drained (no
                        // memory) and answered, and the connection stays in sync. Beyond both, the
                        // spec lets the server hard-disconnect: draining 4 GiB cost an
                        // unauthenticated peer's server 0.85 s of CPU (issue #31).
                        guard Int(length) <= max(maximumPayload, Self.courtesyPayload) else {
                            throw .payloadTooLarge(UInt64(length))
                        }
                        state = .discarding(
                            r, remaining: UInt64(length),
                            reason: .payloadTooLarge(length: UInt64(length), maximum: maximumPayload))
                        continue
                    }
                    state = .payload(r)
                    continue
                }
                return .request(r, payload: nil)
            }
        }
    }

    /// Extended request: magic, flags, type, cookie, offset, u64 length; a payload follows only
    /// with NBD_CMD_FLAG_PAYLOAD_LEN (extension branch, "Request message").
    private mutating func nextExtended(_ input: inout ByteBuffer) throws(TransmissionError) -> TransmissionEvent? {
        guard input.readableBytes >= Self.extendedRequestSize else { return nil }
        let magic: UInt32 = input.readInteger()!
        guard magic == NBDMagic.extendedRequest else { throw .badMagic(magic) }
        let flags = NBDCommandFlags(rawValue: input.readInteger()!)
        let type: UInt16 = input.readInteger()!
        let cookie: UInt64 = input.readInteger()!
        let offset: UInt64 = input.readInteger()!
        let length: UInt64 = input.readInteger()!
        var r = NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
        guard flags.contains(.payloadLen) else {
            // WRITE "MUST use the flag": without it there is no payload to read; refuse the request.
            if type == NBDCommand.write.rawValue { return .rejected(r, reason: .writeWithoutPayloadLength) }
            return .request(r, payload: nil)
        }
        // "A server SHOULD initiate hard disconnect if ... PAYLOAD_LEN and a length larger than
        // the maximum payload."
        guard length <= UInt64(maximumPayload) else { throw .payloadTooLarge(length) }
        r.flags.remove(.payloadLen)
        if type == NBDCommand.write.rawValue {
            state = .payload(r)
        } else if type == NBDCommand.blockStatus.rawValue && blockStatusPayloadLimit > 0
            && length <= UInt64(blockStatusPayloadLimit)
        {
            // The filtered form (NBD_FLAG_BLOCK_STATUS_PAYLOAD): the rules read its context ids.
            state = .payload(r)
        } else if type == NBDCommand.blockStatus.rawValue && blockStatusPayloadLimit > 0 {
            state = .discarding(
                r, remaining: length,
                reason: .blockStatusPayloadTooLong(length: length, maximum: blockStatusPayloadLimit))
        } else {
            // A payload on a command that takes none: "gracefully consume" it, then EINVAL.
            state = .discarding(r, remaining: length, reason: .unexpectedPayload(type: type, length: length))
        }
        return try next(&input)
    }

    /// "Simple reply message": magic, error, cookie.
    public static func simpleReply(cookie: UInt64, error: NBDErrno?, into b: inout ByteBuffer) {
        // Magic and error as one big-endian u64 (one store fewer per reply).
        b.writeMultipleIntegers(UInt64(NBDMagic.simpleReply) << 32 | UInt64(error?.rawValue ?? 0), cookie)
    }
}
