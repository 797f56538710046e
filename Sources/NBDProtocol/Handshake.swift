// The server side of fixed newstyle negotiation ("Newstyle negotiation", "Option haggling"),
// as a pure state machine: bytes in, actions out. No I/O.
import NIOCore

public enum HandshakeAction: Equatable {
    /// Write these bytes to the client.
    case send(ByteBuffer)
    /// Close the connection (after writing anything already queued).
    case close(reason: String)
    /// Nothing to do on the wire: a fact for the server's log (a client asked for an export that
    /// does not exist), so that the operator can see why a client failed.
    case report(String)
    /// Negotiation finished; transmission starts with this session.
    case startTransmission(NBDSession)
    /// STARTTLS was acknowledged: after the queued bytes go out, wrap the connection in TLS and
    /// continue with a fresh state machine (`HandshakeStateMachine(afterTLS:)`).
    case startTLS
}

/// "TLS support": whether the server offers, requires or refuses STARTTLS.
public enum NBDTLSPolicy: String, Sendable {
    case off, on, require
}

/// The result of negotiation: what transmission must honour.
public struct NBDSession: Sendable, Equatable {
    public var export: NBDExportInfo
    /// NBD_OPT_STRUCTURED_REPLY (or EXTENDED_HEADERS) was acknowledged ("Structured reply chunk message").
    public var structuredReplies: Bool
    /// NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests and replies, no simple replies
    /// (extension branch, "Extended reply chunk message").
    public var extendedHeaders: Bool = false
    /// The context id of `base:allocation` if SET_META_CONTEXT selected it.
    public var allocationContext: UInt32?
    /// The server's other contexts SET_META_CONTEXT selected (`qemu:dirty-bitmap:NAME`), in id order.
    public var otherContexts: [NBDMetaContextID] = []

    public init(
        export: NBDExportInfo, structuredReplies: Bool, extendedHeaders: Bool = false, allocationContext: UInt32? = nil,
        otherContexts: [NBDMetaContextID] = []
    ) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.extendedHeaders = extendedHeaders
        self.allocationContext = allocationContext
        self.otherContexts = otherContexts
    }

    /// Every selected context, base:allocation first.
    public var contexts: [NBDMetaContextID] {
        (allocationContext.map { [NBDMetaContextID(id: $0, name: NBDMetaContext.baseAllocation)] } ?? [])
            + otherContexts
    }
}

/// A metadata context a session selected: the id its BLOCK_STATUS chunks carry, and its name.
public struct NBDMetaContextID: Sendable, Equatable {
    public var id: UInt32
    public var name: String
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }
}

/// Metadata contexts the server offers ("Metadata querying").
public enum NBDMetaContext {
    public static let baseAllocation = "base:allocation"
    public static let baseAllocationID: UInt32 = 1
    /// QEMU's namespace for dirty bitmaps: `qemu:dirty-bitmap:NAME`, flag bit 0 = dirty.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"
    /// QEMU 5.2's `qemu:allocation-depth`: 0 unallocated, 1 in the top layer, 2 in the one below.
    public static let allocationDepth = "qemu:allocation-depth"

    /// Whether a LIST query names `context`: exactly, or as its namespace ("base:", "qemu:") or,
    /// for QEMU's, a leading part ending in ':' ("qemu:dirty-bitmap:") — "the server SHOULD
    /// reply with a list of all contexts in that namespace" ("NBD_OPT_LIST_META_CONTEXT").
    static func listQuery(_ query: String, matches context: String) -> Bool {
        query == context || (query.hasSuffix(":") && context.hasPrefix(query) && !query.dropLast().contains(":"))
            || (query == dirtyBitmapPrefix && context.hasPrefix(dirtyBitmapPrefix))
    }
}

public struct HandshakeStateMachine {
    /// Longest option payload the server buffers. Strings are at most 4096 bytes
    /// ("Option haggling": "NBD strings ... MUST NOT exceed 4096 bytes"); longer options are
    /// drained without buffering and answered NBD_REP_ERR_TOO_BIG.
    public static let maxOptionLength = 16 * 1024
    /// Options a little longer than `maxOptionLength` are drained and answered NBD_REP_ERR_TOO_BIG
    /// (a client may retry with less); longer ones close the connection at once.
    public static let maxDrainedOptionLength = 1 << 20
    /// Options one negotiation may send. A client needs a handful (nbdinfo --list sends a few
    /// per export); 10^5 pipelined options whose replies were never read held 29 MiB of queued
    /// replies (issue #31). Past this many the server hangs up, as "Option haggling" lets it when
    /// "a client's behaviour constitutes a denial of service" (nbdkit stops at 64).
    public static let maxOptions = 4096
    /// The close reason of NBD_OPT_ABORT, the normal end of a client that only asked (nbdinfo, --list).
    public static let abortReason = "client sent NBD_OPT_ABORT"

    /// The log line for a name no export has, with the names there are.
    func unknownExport(_ name: String, _ option: UInt32) -> String {
        let opt =
            switch NBDOption(rawValue: option) {
            case .exportName: "NBD_OPT_EXPORT_NAME"
            case .info: "NBD_OPT_INFO"
            case .go: "NBD_OPT_GO"
            case .listMetaContext: "NBD_OPT_LIST_META_CONTEXT"
            case .setMetaContext: "NBD_OPT_SET_META_CONTEXT"
            default: "option \(option)"
            }
        let names = catalog.exports.prefix(8).map { "\"\($0.name)\"" }.joined(separator: ", ")
        return
            "the client asked for export \"\(name)\" (\(opt)), which does not exist; exports: \(names)\(catalog.exports.count > 8 ? ", …" : "")"
    }

    enum State: Equatable {
        case awaitingClientFlags
        case awaitingOption
        case readingOption(option: UInt32, length: Int)
        case discardingOption(option: UInt32, remaining: UInt64)
        case finished
    }

    private(set) var state: State = .awaitingClientFlags
    /// Options received so far (`maxOptions`).
    private var optionCount = 0
    public private(set) var clientNoZeroes = false
    public private(set) var structuredReplies = false
    public private(set) var extendedHeaders = false
    /// Export and contexts chosen by the last SET_META_CONTEXT.
    private var metaExport: String?
    /// The contexts the last SET_META_CONTEXT selected, by name.
    private var selectedContexts: [NBDMetaContextID] = []
    /// The exports offered; the server may replace it between calls to `receive` (configuration reload).
    public var catalog: NBDExportCatalog
    public let tlsPolicy: NBDTLSPolicy
    /// Whether this negotiation runs inside TLS.
    public let tlsActive: Bool
    /// Who the client proved to be in the TLS handshake (nil in plaintext).
    public let peer: NBDPeerIdentity?

    public init(catalog: NBDExportCatalog, tls: NBDTLSPolicy = .off) {
        self.catalog = catalog
        self.tlsPolicy = tls
        self.tlsActive = false
        self.peer = nil
    }

    /// The state machine that continues after STARTTLS. "All negotiation state from before
    /// STARTTLS is forgotten": structured replies, meta contexts, extended headers.
    /// `peer` is the identity the TLS handshake established; exports with an allow-list
    /// (`NBDExportInfo.allowedClients`) are checked against it.
    public init(afterTLS previous: HandshakeStateMachine, peer: NBDPeerIdentity? = nil) {
        catalog = previous.catalog
        tlsPolicy = previous.tlsPolicy
        tlsActive = true
        self.peer = peer
        clientNoZeroes = previous.clientNoZeroes
        optionCount = previous.optionCount
        state = .awaitingOption
    }

    public var isFinished: Bool { state == .finished }

    /// The server is shutting down ("Option haggling": it "SHOULD error further options received
    /// (other than an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN"; the client then disconnects).
    /// NBD_OPT_EXPORT_NAME, which has no error reply, ends the session.
    public var shuttingDown = false

    /// The 18-byte greeting the server sends first.
    public func greeting() -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBDMagic.nbdmagic)
        b.writeInteger(NBDMagic.ihaveopt)
        b.writeInteger(NBDHandshakeFlags.fixedNewstyle | NBDHandshakeFlags.noZeroes)
        return b
    }

    /// Consumes as much of `input` as forms complete messages and returns what to do.
    public mutating func receive(_ input: inout ByteBuffer) -> [HandshakeAction] {
        var out: [HandshakeAction] = []
        while true {
            switch state {
            case .finished:
                return out
            case .awaitingClientFlags:
                guard let flags: UInt32 = input.readInteger() else { return out }
                // "The server MUST NOT ... if the client sets an unknown flag: it SHOULD drop the connection."
                if flags & ~NBDHandshakeFlags.knownClientFlags != 0 {
                    state = .finished
                    return out + [.close(reason: "client sent unknown flags 0x\(String(flags, radix: 16))")]
                }
                clientNoZeroes = flags & NBDHandshakeFlags.clientNoZeroes != 0
                state = .awaitingOption
            case .awaitingOption:
                guard input.readableBytes >= 16 else { return out }
                let magic: UInt64 = input.readInteger()!
                let option: UInt32 = input.readInteger()!
                let length: UInt32 = input.readInteger()!
                guard magic == NBDMagic.ihaveopt else {
                    state = .finished
                    return out + [.close(reason: "bad option magic 0x\(String(magic, radix: 16))")]
                }
                optionCount += 1
                guard optionCount <= Self.maxOptions else {
                    state = .finished
                    return out + [
                        .close(reason: "more than \(Self.maxOptions) options without choosing an export")
                    ]
                }
                if Int(length) > Self.maxOptionLength && option == NBDOption.exportName.rawValue {
                    // EXPORT_NAME has no error reply: "the server MUST terminate the session".
                    state = .finished
                    return out + [
                        .close(reason: "NBD_OPT_EXPORT_NAME of \(length) bytes is longer than any export name")
                    ]
                }
                if Int(length) > Self.maxDrainedOptionLength {
                    // Longer than any option could usefully be: draining it (up to 4 GiB from a
                    // peer that has not even chosen an export) is work for nothing (issue #31).
                    state = .finished
                    return out + [
                        .close(
                            reason:
                                "option \(option) of \(length) bytes is far longer than any this server accepts (\(Self.maxOptionLength) bytes)"
                        )
                    ]
                }
                if Int(length) > Self.maxOptionLength {
                    state = .discardingOption(option: option, remaining: UInt64(length))
                } else {
                    state = .readingOption(option: option, length: Int(length))
                }
            case .discardingOption(let option, let remaining):
                let n = Int(min(UInt64(input.readableBytes), remaining))
                input.moveReaderIndex(forwardBy: n)
                if UInt64(n) < remaining {
                    state = .discardingOption(option: option, remaining: remaining - UInt64(n))
                    return out
                }
                state = .awaitingOption
                out.append(
                    .send(
                        Self.optionReply(
                            option, NBDReply.errTooBig, message: "option of more than \(Self.maxOptionLength) bytes")))
            case .readingOption(let option, let length):
                guard let data = input.readSlice(length: length) else { return out }
                state = .awaitingOption
                out += handle(option: option, data: data)
            }
        }
    }

    private mutating func handle(option: UInt32, data: ByteBuffer) -> [HandshakeAction] {
        if shuttingDown && option != NBDOption.abort.rawValue {
            if option == NBDOption.exportName.rawValue {
                state = .finished
                return [.close(reason: "NBD_OPT_EXPORT_NAME while the server is shutting down")]
            }
            return [.send(Self.optionReply(option, NBDReply.errShutdown, message: "the server is shutting down"))]
        }
        if let refused = refuseWithoutTLS(option) { return refused }
        guard let opt = NBDOption(rawValue: option) else {
            return [.send(Self.optionReply(option, NBDReply.errUnsup, message: "option \(option) is not supported"))]
        }
        switch opt {
        case .exportName: return exportName(data)
        case .abort:
            state = .finished
            return [.send(Self.optionReply(option, NBDReply.ack)), .close(reason: Self.abortReason)]
        case .list: return list(data)
        case .info, .go: return infoOrGo(opt, data)
        case .structuredReply: return structuredReply(data)
        case .extendedHeaders: return enableExtendedHeaders(data)
        case .listMetaContext, .setMetaContext: return metaContext(opt, data)
        case .startTLS: return startTLS(data)
        default:
            return [.send(Self.optionReply(option, NBDReply.errUnsup, message: "option \(option) is not supported"))]
        }
    }

    /// "NBD_OPT_STARTTLS": with TLS required, every option but STARTTLS, ABORT and EXPORT_NAME
    /// gets ERR_TLS_REQD until TLS is up; EXPORT_NAME cannot carry an error, so it closes. nil: go on.
    private mutating func refuseWithoutTLS(_ option: UInt32) -> [HandshakeAction]? {
        guard tlsPolicy == .require && !tlsActive else { return nil }
        switch NBDOption(rawValue: option) {
        case .startTLS?, .abort?: return nil
        case .exportName?:
            state = .finished
            return [.close(reason: "NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
        default:
            return [
                .send(
                    Self.optionReply(
                        option, NBDReply.errTLSReqd, message: "this server requires TLS: use NBD_OPT_STARTTLS first"
                    ))
            ]
        }
    }

    /// "NBD_OPT_EXPORT_NAME": the whole payload is the name; no error reply exists, so an unknown
    /// name closes the connection.
    private mutating func exportName(_ input: ByteBuffer) -> [HandshakeAction] {
        var data = input
        let name = data.readString(length: data.readableBytes) ?? ""
        state = .finished
        if extendedHeaders {
            return [.close(reason: "NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS (the client MUST NOT)")]
        }
        guard let e = catalog.lookup(name) else {
            return [.close(reason: unknownExport(name, NBDOption.exportName.rawValue))]
        }
        if let refusal = refusal(e) { return [.close(reason: "NBD_OPT_EXPORT_NAME: \(refusal.message)")] }
        var b = ByteBuffer()
        b.writeInteger(e.size)
        b.writeInteger(flags(for: e).rawValue)
        if !clientNoZeroes { b.writeRepeatingByte(0, count: 124) }
        return [.send(b), .startTransmission(session(for: e))]
    }

    /// NBD_OPT_LIST: only the exports this client may use now: an allow-listed export is listed to
    /// the clients it names, over TLS (nbdinfo --list asks for each export listed).
    private func list(_ data: ByteBuffer) -> [HandshakeAction] {
        let option = NBDOption.list.rawValue
        if let refused = Self.refuseData(option, data, "NBD_OPT_LIST") { return refused }
        var out: [HandshakeAction] = []
        for e in catalog.exports where refusal(e) == nil {
            var p = ByteBuffer()
            p.writeInteger(UInt32(e.name.utf8.count))
            p.writeString(e.name)
            p.writeString(e.description)
            out.append(.send(Self.optionReply(option, NBDReply.server, payload: p)))
        }
        out.append(.send(Self.optionReply(option, NBDReply.ack)))
        return out
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: the export's INFO replies, then (GO) transmission.
    private mutating func infoOrGo(_ opt: NBDOption, _ input: ByteBuffer) -> [HandshakeAction] {
        let option = opt.rawValue
        var data = input
        guard let nameLen: UInt32 = data.readInteger(), Int(nameLen) <= data.readableBytes - 2,
            let name = data.readString(length: Int(nameLen)),
            let count: UInt16 = data.readInteger(), data.readableBytes == 2 * Int(count)
        else {
            return [
                .send(Self.optionReply(option, NBDReply.errInvalid, message: "malformed NBD_OPT_INFO/GO payload"))
            ]
        }
        var requested: [UInt16] = []
        for _ in 0..<count { requested.append(data.readInteger()!) }
        guard let e = catalog.lookup(name) else {
            return [
                .report(unknownExport(name, option)),
                .send(Self.optionReply(option, NBDReply.errUnknown, message: "no export named \"\(name)\"")),
            ]
        }
        if let refusal = refusal(e) {
            return [.send(Self.optionReply(option, refusal.reply, message: refusal.message))]
        }
        var out: [HandshakeAction] = []
        var p = ByteBuffer()
        p.writeInteger(NBDInfo.export)
        p.writeInteger(e.size)
        p.writeInteger(flags(for: e).rawValue)
        out.append(.send(Self.optionReply(option, NBDReply.info, payload: p)))
        if requested.contains(NBDInfo.name) {
            var p = ByteBuffer()
            p.writeInteger(NBDInfo.name)
            p.writeString(e.name)
            out.append(.send(Self.optionReply(option, NBDReply.info, payload: p)))
        }
        if requested.contains(NBDInfo.description) {
            var p = ByteBuffer()
            p.writeInteger(NBDInfo.description)
            p.writeString(e.description)
            out.append(.send(Self.optionReply(option, NBDReply.info, payload: p)))
        }
        // Block sizes are always sent: clients that did not ask may ignore them.
        var bs = ByteBuffer()
        bs.writeInteger(NBDInfo.blockSize)
        bs.writeInteger(e.minimumBlockSize)
        bs.writeInteger(e.preferredBlockSize)
        bs.writeInteger(e.maximumPayload)
        out.append(.send(Self.optionReply(option, NBDReply.info, payload: bs)))
        out.append(.send(Self.optionReply(option, NBDReply.ack)))
        if opt == .go {
            state = .finished
            out.append(.startTransmission(session(for: e)))
        }
        return out
    }

    private mutating func structuredReply(_ data: ByteBuffer) -> [HandshakeAction] {
        let option = NBDOption.structuredReply.rawValue
        if let refused = Self.refuseData(option, data, "NBD_OPT_STRUCTURED_REPLY") { return refused }
        // ERR_EXT_HEADER_REQD "is also used to indicate ... STRUCTURED_REPLY if extended headers have already been negotiated".
        if extendedHeaders {
            return [
                .send(
                    Self.optionReply(
                        option, NBDReply.errExtHeaderReqd, message: "extended headers are already negotiated"))
            ]
        }
        structuredReplies = true
        return [.send(Self.optionReply(option, NBDReply.ack))]
    }

    private mutating func enableExtendedHeaders(_ data: ByteBuffer) -> [HandshakeAction] {
        let option = NBDOption.extendedHeaders.rawValue
        if let refused = Self.refuseData(option, data, "NBD_OPT_EXTENDED_HEADERS") { return refused }
        extendedHeaders = true
        structuredReplies = true
        return [.send(Self.optionReply(option, NBDReply.ack))]
    }

    private mutating func startTLS(_ data: ByteBuffer) -> [HandshakeAction] {
        let option = NBDOption.startTLS.rawValue
        guard tlsPolicy != .off else {
            return [
                .send(Self.optionReply(option, NBDReply.errPolicy, message: "TLS is not configured on this server"))
            ]
        }
        guard !tlsActive else {
            return [.send(Self.optionReply(option, NBDReply.errInvalid, message: "TLS is already active"))]
        }
        if let refused = Self.refuseData(option, data, "NBD_OPT_STARTTLS") { return refused }
        state = .finished // this machine is done; the handler continues with init(afterTLS:)
        return [.send(Self.optionReply(option, NBDReply.ack)), .startTLS]
    }

    /// ERR_INVALID for an option that takes no data but came with some; nil when it came with none.
    private static func refuseData(_ option: UInt32, _ data: ByteBuffer, _ name: String) -> [HandshakeAction]? {
        guard data.readableBytes != 0 else { return nil }
        return [.send(optionReply(option, NBDReply.errInvalid, message: "\(name) takes no data"))]
    }

    /// Why this client may not use an export with an allow-list, and the error reply for it:
    /// ERR_TLS_REQD in plaintext (STARTTLS first: "NBD_REP_ERR_TLS_REQD ... for this export"),
    /// ERR_POLICY inside TLS when the client's identity is not listed. nil: it may.
    func refusal(_ e: NBDExportInfo) -> (reply: UInt32, message: String)? {
        // "NBD_REP_ERR_TLS_REQD: The server requires the client to initiate TLS ... for this export."
        if e.requiresTLS && !tlsActive {
            return (NBDReply.errTLSReqd, "export \"\(e.name)\" is served only over TLS: use NBD_OPT_STARTTLS first")
        }
        guard let allowed = e.allowedClients else { return nil }
        guard tlsActive else {
            return tlsPolicy == .off
                ? (
                    NBDReply.errPolicy,
                    "export \"\(e.name)\" is served only to authorised TLS clients, and this server has no TLS"
                )
                : (
                    NBDReply.errTLSReqd,
                    "export \"\(e.name)\" is served only to authorised TLS clients: use NBD_OPT_STARTTLS first"
                )
        }
        if allowed.admits(peer) { return nil }
        let who =
            peer?.certificateDN.map { "certificate \"\($0)\"" } ?? peer?.pskIdentity.map { "PSK identity \"\($0)\"" }
            ?? "a client without a verified identity"
        return (NBDReply.errPolicy, "\(who) is not allowed to use export \"\(e.name)\"")
    }

    /// Transmission flags as this client may see them: DF only with structured replies
    /// ("NBD_FLAG_SEND_DF": the server MUST NOT set it unless structured replies were negotiated).
    func flags(for e: NBDExportInfo) -> NBDTransmissionFlags {
        var f = e.flags
        if !structuredReplies { f.remove(.sendDF) }
        // "NBD_FLAG_BLOCK_STATUS_PAYLOAD": "MUST NOT advertise this bit unless the client
        // successfully negotiates extended headers", "SHOULD NOT ... if the client does not
        // negotiate metacontexts" (for this export).
        f.remove(.blockStatusPayload)
        if extendedHeaders && !contexts(for: e).isEmpty { f.insert(.blockStatusPayload) }
        return f
    }

    /// The contexts SET_META_CONTEXT selected, if it named this export.
    private func contexts(for e: NBDExportInfo) -> [NBDMetaContextID] {
        // Contexts chosen for another export do not carry over ("NBD_OPT_SET_META_CONTEXT").
        metaExport.flatMap { catalog.lookup($0)?.name } == e.name ? selectedContexts : []
    }

    func session(for e: NBDExportInfo) -> NBDSession {
        let chosen = contexts(for: e)
        let ctx = chosen.first { $0.name == NBDMetaContext.baseAllocation }?.id
        let others = chosen.filter { $0.name != NBDMetaContext.baseAllocation }
        var export = e
        export.flags = flags(for: e)
        return NBDSession(
            export: export, structuredReplies: structuredReplies, extendedHeaders: extendedHeaders,
            allocationContext: ctx, otherContexts: others)
    }

    /// "NBD_OPT_LIST_META_CONTEXT" / "NBD_OPT_SET_META_CONTEXT": u32 name length, name,
    /// u32 query count, then each query as u32 length + string.
    private mutating func metaContext(_ opt: NBDOption, _ input: ByteBuffer) -> [HandshakeAction] {
        var data = input
        let option = opt.rawValue
        // SET_META_CONTEXT "replaces all previously-set metadata contexts (including when this
        // command fails)": forget the old selection before anything can fail.
        if opt == .setMetaContext {
            metaExport = nil
            selectedContexts = []
        }
        if opt == .setMetaContext && !structuredReplies {
            return [
                .send(
                    Self.optionReply(
                        option, NBDReply.errInvalid, message: "SET_META_CONTEXT needs structured replies first"))
            ]
        }
        guard let nameLen: UInt32 = data.readInteger(), Int(nameLen) <= data.readableBytes,
            let name = data.readString(length: Int(nameLen)), let count: UInt32 = data.readInteger()
        else {
            return [.send(Self.optionReply(option, NBDReply.errInvalid, message: "malformed meta context request"))]
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let l: UInt32 = data.readInteger(), Int(l) <= data.readableBytes,
                let q = data.readString(length: Int(l))
            else {
                return [
                    .send(
                        Self.optionReply(
                            option, NBDReply.errInvalid, message: "meta context query length exceeds the option"))
                ]
            }
            queries.append(q)
        }
        guard data.readableBytes == 0 else {
            return [
                .send(
                    Self.optionReply(option, NBDReply.errInvalid, message: "trailing bytes after meta context queries"))
            ]
        }
        guard catalog.lookup(name) != nil else {
            return [
                .report(unknownExport(name, option)),
                .send(Self.optionReply(option, NBDReply.errUnknown, message: "no export named \"\(name)\"")),
            ]
        }
        // A LIST with no queries lists everything; "base:" names the whole namespace. A SET
        // selects exact names only, each once.
        let export = catalog.lookup(name)!.name
        let offered = [NBDMetaContext.baseAllocation] + catalog.metaContexts(of: export)
        let matching: [String]
        if opt == .listMetaContext && queries.isEmpty {
            matching = offered
        } else if opt == .listMetaContext {
            matching = offered.filter { c in queries.contains { NBDMetaContext.listQuery($0, matches: c) } }
        } else {
            matching = offered.filter(queries.contains)
        }
        var out: [HandshakeAction] = []
        var selected: [NBDMetaContextID] = []
        for c in matching {
            // "the server MUST reply with a context id of 0" to LIST.
            let id = opt == .setMetaContext ? contextID(c, export: export) ?? 0 : 0
            selected.append(NBDMetaContextID(id: id, name: c))
            var p = ByteBuffer()
            p.writeInteger(id)
            p.writeString(c)
            out.append(.send(Self.optionReply(option, NBDReply.metaContext, payload: p)))
        }
        if opt == .setMetaContext {
            metaExport = name
            selectedContexts = selected
        }
        out.append(.send(Self.optionReply(option, NBDReply.ack)))
        return out
    }

    /// A context's id: 1 for base:allocation, 2 + its place among the export's other contexts.
    private func contextID(_ context: String, export: String) -> UInt32? {
        if context == NBDMetaContext.baseAllocation { return NBDMetaContext.baseAllocationID }
        guard let i = catalog.metaContexts(of: export).firstIndex(of: context) else { return nil }
        return UInt32(2 + i)
    }

    /// "Option reply": magic, option, type, length, payload.
    public static func optionReply(_ option: UInt32, _ type: UInt32, payload: ByteBuffer? = nil, message: String? = nil)
        -> ByteBuffer
    {
        var b = ByteBuffer()
        b.writeInteger(NBDMagic.optionReply)
        b.writeInteger(option)
        b.writeInteger(type)
        if var p = payload {
            b.writeInteger(UInt32(p.readableBytes))
            b.writeBuffer(&p)
        } else if let m = message {
            b.writeInteger(UInt32(m.utf8.count))
            b.writeString(m)
        } else {
            b.writeInteger(UInt32(0))
        }
        return b
    }
}
