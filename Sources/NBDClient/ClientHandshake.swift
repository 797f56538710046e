// Option haggling from the client's side ("Newstyle negotiation", "Option haggling",
// "NBD_OPT_INFO and NBD_OPT_GO", "Metadata querying"), written as async steps over the
// handler's exact-length reads.
import Logging
import NBDProtocol
import NIOCore

/// What the server says about one export.
public struct NBDExportDetails: Sendable, Equatable {
    public var name: String
    public var description: String = ""
    public var size: UInt64 = 0
    public var flags: NBDTransmissionFlags = []
    /// NBD_INFO_BLOCK_SIZE, if the server sent it.
    public var minimumBlockSize: UInt32?
    public var preferredBlockSize: UInt32?
    public var maximumPayload: UInt32?
    /// Meta contexts from NBD_OPT_LIST_META_CONTEXT; nil if the server does not support it.
    public var metaContexts: [String]?

    public init(name: String) { self.name = name }
}

/// How negotiation went, for `virtnbd info`.
public struct NBDNegotiation: Sendable, Equatable {
    public var handshakeFlags: UInt16 = 0
    public var structuredReplies = false
    /// NBD_OPT_GO was refused as unsupported, so NBD_OPT_EXPORT_NAME was used.
    public var usedExportName = false
}

struct ClientHandshake {
    let loop: EventLoop
    let handler: NIOLoopBound<NBDClientHandler>
    let logger: Logger
    var negotiation = NBDNegotiation()
    private var noZeroes = false

    init(loop: EventLoop, handler: NIOLoopBound<NBDClientHandler>, logger: Logger) {
        self.loop = loop
        self.handler = handler
        self.logger = logger
    }

    func send(_ b: ByteBuffer) async throws {
        let h = handler
        try await loop.flatSubmit { h.value.send(b) }.get()
    }

    func read(_ n: Int, during: String) async throws -> ByteBuffer {
        let h = handler
        return try await loop.flatSubmit { h.value.read(n, during: during) }.get()
    }

    /// Greeting and client flags.
    mutating func start() async throws {
        let g: NBDGreeting
        do { g = try NBDGreeting.parse(try await read(NBDGreeting.size, during: "the greeting")) } catch let e
            as NBDClientWireError
        { throw NBDClientError.wire(e) }
        negotiation.handshakeFlags = g.handshakeFlags
        noZeroes = g.noZeroes
        try await send(g.clientFlags())
    }

    /// Sends an option and reads one reply for it.
    func reply(_ option: NBDOption) async throws -> NBDOptionReply {
        let what = "the reply to \(option.specName)"
        let header = try await read(NBDOptionReply.headerSize, during: what)
        do {
            let h = try NBDOptionReply.parseHeader(header)
            let payload = try await read(Int(h.length), during: what)
            guard h.option == option.rawValue else {
                throw NBDClientError.protocolViolation(
                    "a reply for option \(h.option) came while \(option.specName) was outstanding")
            }
            return NBDOptionReply(option: h.option, type: h.type, payload: payload)
        } catch let e as NBDClientWireError { throw NBDClientError.wire(e) }
    }

    /// Turns an error reply into the matching typed error.
    func refusal(_ option: NBDOption, _ r: NBDOptionReply, export: String) -> NBDClientError {
        switch r.type {
        case NBDReply.errUnknown: return .unknownExport(export, message: r.message)
        case NBDReply.errTLSReqd: return .tlsRequired(option.specName)
        default: return .optionRefused(option: option.specName, reply: nbdReplyName(r.type), message: r.message)
        }
    }

    /// NBD_OPT_STRUCTURED_REPLY; false when the server declines.
    mutating func structuredReplies() async throws -> Bool {
        try await send(NBDClientOption.encode(.structuredReply))
        let r = try await reply(.structuredReply)
        if r.type == NBDReply.errTLSReqd { throw refusal(.structuredReply, r, export: "") }
        negotiation.structuredReplies = r.type == NBDReply.ack
        return negotiation.structuredReplies
    }

    /// NBD_OPT_LIST: every export's name and description.
    func list() async throws -> [NBDServerEntry] {
        try await send(NBDClientOption.encode(.list))
        var out: [NBDServerEntry] = []
        while true {
            let r = try await reply(.list)
            switch r.type {
            case NBDReply.ack: return out
            case NBDReply.server:
                do { out.append(try NBDServerEntry.parse(r.payload)) } catch { throw NBDClientError.wire(error) }
            default:
                if r.isError { throw refusal(.list, r, export: "") }
                logger.debug("ignoring \(nbdReplyName(r.type)) to NBD_OPT_LIST")
            }
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT; no queries lists all. Nil when the server does not support it.
    func listMetaContexts(export: String, queries: [String] = []) async throws -> [String]? {
        try await send(NBDClientOption.metaContext(.listMetaContext, exportName: export, queries: queries))
        var out: [String] = []
        while true {
            let r = try await reply(.listMetaContext)
            switch r.type {
            case NBDReply.ack: return out
            case NBDReply.metaContext:
                do { out.append(try NBDMetaContextEntry.parse(r.payload).name) } catch {
                    throw NBDClientError.wire(error)
                }
            case NBDReply.errUnsup, NBDReply.errPolicy:
                return nil
            default:
                if r.isError { throw refusal(.listMetaContext, r, export: export) }
            }
        }
    }

    /// NBD_OPT_INFO or NBD_OPT_GO with INFO_NAME, INFO_DESCRIPTION and INFO_BLOCK_SIZE requested.
    /// Returns nil when the server answers NBD_REP_ERR_UNSUP (it predates these options).
    func info(_ option: NBDOption, export: String) async throws -> NBDExportDetails? {
        try await send(
            NBDClientOption.info(
                option, exportName: export, requests: [NBDInfo.name, NBDInfo.description, NBDInfo.blockSize]))
        var d = NBDExportDetails(name: export)
        var sawExport = false
        while true {
            let r = try await reply(option)
            switch r.type {
            case NBDReply.ack:
                guard sawExport else { throw NBDClientError.noExportInfo(export) }
                return d
            case NBDReply.info:
                let i: NBDInfoReply
                do { i = try NBDInfoReply.parse(r.payload) } catch { throw NBDClientError.wire(error) }
                switch i {
                case .export(let size, let flags):
                    d.size = size
                    d.flags = flags
                    sawExport = true
                case .name(let n): d.name = n
                case .description(let s): d.description = s
                case .blockSize(let a, let b, let c):
                    d.minimumBlockSize = a
                    d.preferredBlockSize = b
                    d.maximumPayload = c
                case .unknown(let t): logger.debug("ignoring unknown NBD_INFO type \(t)")
                }
            case NBDReply.errUnsup:
                return nil
            default:
                if r.isError { throw refusal(option, r, export: export) }
                logger.debug("ignoring \(nbdReplyName(r.type)) to \(option.specName)")
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO: the server answers with size and
    /// flags (and 124 zero bytes unless NO_ZEROES), or closes the connection for an unknown name.
    mutating func exportName(_ export: String) async throws -> NBDExportDetails {
        var p = ByteBuffer()
        p.writeString(export)
        try await send(NBDClientOption.encode(.exportName, payload: p))
        let n = 10 + (noZeroes ? 0 : 124)
        var b: ByteBuffer
        do { b = try await read(n, during: "NBD_OPT_EXPORT_NAME") } catch NBDClientError.serverClosed {
            throw NBDClientError.unknownExport(
                export, message: "the server closed the connection on NBD_OPT_EXPORT_NAME")
        }
        var d = NBDExportDetails(name: export)
        d.size = b.readInteger()!
        d.flags = NBDTransmissionFlags(rawValue: b.readInteger()!)
        negotiation.usedExportName = true
        return d
    }

    /// NBD_OPT_ABORT: ends negotiation politely. The server's ACK is optional to wait for.
    func abort() async {
        try? await send(NBDClientOption.encode(.abort))
        _ = try? await reply(.abort)
    }
}

extension NBDOption {
    /// The spec's name, e.g. NBD_OPT_GO.
    public var specName: String {
        switch self {
        case .exportName: return "NBD_OPT_EXPORT_NAME"
        case .abort: return "NBD_OPT_ABORT"
        case .list: return "NBD_OPT_LIST"
        case .peekExport: return "NBD_OPT_PEEK_EXPORT"
        case .startTLS: return "NBD_OPT_STARTTLS"
        case .info: return "NBD_OPT_INFO"
        case .go: return "NBD_OPT_GO"
        case .structuredReply: return "NBD_OPT_STRUCTURED_REPLY"
        case .listMetaContext: return "NBD_OPT_LIST_META_CONTEXT"
        case .setMetaContext: return "NBD_OPT_SET_META_CONTEXT"
        case .extendedHeaders: return "NBD_OPT_EXTENDED_HEADERS"
        }
    }
}
