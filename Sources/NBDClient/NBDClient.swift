// An NBD client on SwiftNIO: connect to a URI, negotiate (fixed newstyle, structured replies,
// NBD_OPT_GO), then issue requests. Many requests may be in flight; replies are matched by cookie.
import Logging
import NBDProtocol
import NIOCore
import NIOPosix

#if canImport(Glibc)
    import Glibc
#endif

public final class NBDClient: Sendable {
    public let uri: NBDURI
    public let export: NBDExportDetails
    public let negotiation: NBDNegotiation
    private let channel: Channel
    private let handler: NIOLoopBound<NBDClientHandler>

    public var size: UInt64 { export.size }
    public var flags: NBDTransmissionFlags { export.flags }
    /// The largest payload one request may carry: NBD_INFO_BLOCK_SIZE's maximum, else 32 MiB
    /// ("Block size constraints": without the information, 32 MiB is safe).
    public var maximumPayload: Int { Int(export.maximumPayload ?? (32 << 20)) }

    private init(
        uri: NBDURI, export: NBDExportDetails, negotiation: NBDNegotiation, channel: Channel,
        handler: NIOLoopBound<NBDClientHandler>
    ) {
        self.uri = uri
        self.export = export
        self.negotiation = negotiation
        self.channel = channel
        self.handler = handler
    }

    /// Connects and enters transmission with the URI's export. `timeout` bounds the connect and,
    /// separately, the handshake (a listener that never greets); nil waits forever.
    public static func connect(
        to uri: NBDURI, timeout: TimeAmount? = .seconds(10),
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger
    ) async throws -> NBDClient {
        let (channel, handler) = try await open(uri, timeout: timeout, group: group, logger: logger)
        do {
            return try await withHandshakeTimeout(timeout, channel, uri) {
                var hs = ClientHandshake(loop: channel.eventLoop, handler: handler, logger: logger)
                try await hs.start()
                _ = try await hs.structuredReplies()
                var details: NBDExportDetails
                if let d = try await hs.info(.go, export: uri.exportName) {
                    details = d
                } else {
                    logger.debug("NBD_OPT_GO unsupported; falling back to NBD_OPT_EXPORT_NAME")
                    details = try await hs.exportName(uri.exportName)
                }
                if details.name.isEmpty { details.name = uri.exportName }
                try await channel.eventLoop.submit { handler.value.startTransmission() }.get()
                logger.debug(
                    "connected",
                    metadata: [
                        "uri": "\(uri)", "size": "\(details.size)",
                        "flags": "0x\(String(details.flags.rawValue, radix: 16))",
                    ])
                return NBDClient(
                    uri: uri, export: details, negotiation: hs.negotiation, channel: channel, handler: handler)
            }
        } catch {
            try? await channel.close()
            throw error
        }
    }

    /// Negotiates without entering transmission and reports on the URI's export, or with
    /// `list` on every export the server lists (NBD_OPT_LIST, then NBD_OPT_INFO for each).
    public static func query(
        _ uri: NBDURI, list: Bool, timeout: TimeAmount? = .seconds(10),
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger
    ) async throws -> (NBDNegotiation, [NBDExportDetails]) {
        let (channel, handler) = try await open(uri, timeout: timeout, group: group, logger: logger)
        defer { channel.close(promise: nil) }
        return try await withHandshakeTimeout(timeout, channel, uri) {
            var hs = ClientHandshake(loop: channel.eventLoop, handler: handler, logger: logger)
            try await hs.start()
            _ = try await hs.structuredReplies()
            var names = [NBDServerEntry(name: uri.exportName, description: "")]
            if list { names = try await hs.list() }
            var out: [NBDExportDetails] = []
            var inTransmission = false
            for entry in names {
                // An empty query lists every context; a server that lists none that way is asked for base:allocation.
                var contexts = try await hs.listMetaContexts(export: entry.name)
                if contexts == [] {
                    contexts = try await hs.listMetaContexts(
                        export: entry.name, queries: [NBDMetaContext.baseAllocation])
                }
                var d: NBDExportDetails
                if let i = try await hs.info(.info, export: entry.name) {
                    d = i
                } else if !list, let g = try await hs.info(.go, export: entry.name) {
                    d = g // a server with GO but not INFO; this ends negotiation
                    inTransmission = true
                } else {
                    d = NBDExportDetails(name: entry.name)
                }
                // The server's own name for it (NBD_INFO_NAME, as nbdinfo shows: the default export's
                // real name for an empty one); the name asked for when the server sends none.
                if d.name.isEmpty { d.name = entry.name }
                if d.description.isEmpty { d.description = entry.description }
                d.metaContexts = contexts
                out.append(d)
            }
            if inTransmission {
                var disc = ByteBuffer()
                NBDClientRequest.encode(.disc, cookie: 0, offset: 0, length: 0, into: &disc)
                try? await hs.send(disc)
            } else {
                await hs.abort()
            }
            return (hs.negotiation, out)
        }
    }

    /// Runs the handshake `body`; if it takes longer than `timeout`, closes the connection and
    /// throws `.timedOut` instead of whatever the closed connection made the handshake throw.
    private static func withHandshakeTimeout<T>(
        _ timeout: TimeAmount?, _ channel: Channel, _ uri: NBDURI,
        _ body: () async throws -> T
    ) async throws -> T {
        guard let timeout else { return try await body() }
        let timer = channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
        do {
            let result = try await body()
            timer.cancel()
            return result
        } catch {
            timer.cancel()
            if (try? await timer.futureResult.get()) != nil {
                throw NBDClientError.timedOut(uri.targetDescription, seconds: Double(timeout.nanoseconds) / 1e9)
            }
            throw error
        }
    }

    private static func open(_ uri: NBDURI, timeout: TimeAmount?, group: EventLoopGroup, logger: Logger) async throws
        -> (Channel, NIOLoopBound<NBDClientHandler>)
    {
        if uri.tls { throw NBDClientError.tlsNotSupported(uri.text) }
        var bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout ?? .hours(24 * 365))
            .channelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 256 << 10, maximum: 4 << 20)
            )
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(NBDClientHandler(eventLoop: ch.eventLoop, logger: logger))
                }
            }
        let channel: Channel
        do {
            switch uri.transport {
            case .tcp(let host, let port):
                bootstrap = bootstrap.channelOption(.tcpOption(.tcp_nodelay), value: 1)
                channel = try await bootstrap.connect(host: host, port: port).get()
            case .unix(let path):
                channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            }
        } catch {
            throw NBDClientError.connectFailed(
                uri.targetDescription, reason: connectFailureReason(error, timeout: timeout))
        }
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(
                try channel.pipeline.syncOperations.handler(type: NBDClientHandler.self), eventLoop: channel.eventLoop)
        }.get()
        return (channel, handler)
    }

    // MARK: requests

    /// Starts a request; the future completes with READ data, or nil for other commands.
    private func submit(
        _ command: NBDCommand, flags: NBDCommandFlags = [], offset: UInt64, length: Int, payload: ByteBuffer? = nil
    ) -> EventLoopFuture<ByteBuffer?> {
        let loop = channel.eventLoop
        if let e = check(command, offset: offset, length: length) { return loop.makeFailedFuture(e) }
        let promise = loop.makePromise(of: ByteBuffer?.self)
        let h = handler
        if loop.inEventLoop {
            h.value.submit(command, flags: flags, offset: offset, length: length, payload: payload, promise: promise)
        } else {
            loop.execute {
                h.value.submit(
                    command, flags: flags, offset: offset, length: length, payload: payload, promise: promise)
            }
        }
        return promise.futureResult
    }

    /// Refuses what the export's flags or size rule out before it reaches the wire.
    private func check(_ command: NBDCommand, offset: UInt64, length: Int) -> NBDClientError? {
        let writes: Set<NBDCommand> = [.write, .trim, .writeZeroes]
        if writes.contains(command) && flags.contains(.readOnly) { return .readOnly }
        switch command {
        case .flush where !flags.contains(.sendFlush):
            return .unsupported(command: command.specName, flag: "NBD_FLAG_SEND_FLUSH")
        case .trim where !flags.contains(.sendTrim):
            return .unsupported(command: command.specName, flag: "NBD_FLAG_SEND_TRIM")
        case .writeZeroes where !flags.contains(.sendWriteZeroes):
            return .unsupported(command: command.specName, flag: "NBD_FLAG_SEND_WRITE_ZEROES")
        default: break
        }
        guard command != .flush && command != .disc else { return nil }
        if offset > size || UInt64(length) > size - offset {
            return .outOfRange(offset: offset, length: UInt64(length), size: size)
        }
        if (command == .read || command == .write) && length > maximumPayload {
            return .tooLarge(length: UInt64(length), maximum: UInt32(maximumPayload))
        }
        if length > Int(UInt32.max) { return .tooLarge(length: UInt64(length), maximum: UInt32.max) }
        return nil
    }

    /// NBD_CMD_READ: `length` bytes at `offset` (holes arrive as zeroes).
    public func submitRead(offset: UInt64, length: Int) -> EventLoopFuture<ByteBuffer> {
        submit(.read, offset: offset, length: length).map { $0 ?? ByteBuffer() }
    }

    /// NBD_CMD_WRITE, with NBD_CMD_FLAG_FUA if `fua`.
    public func submitWrite(offset: UInt64, data: ByteBuffer, fua: Bool = false) -> EventLoopFuture<Void> {
        submit(.write, flags: fua ? .fua : [], offset: offset, length: data.readableBytes, payload: data).map { _ in }
    }

    /// NBD_CMD_WRITE_ZEROES; `noHole` asks the server to allocate (NBD_CMD_FLAG_NO_HOLE).
    public func submitZero(offset: UInt64, length: Int, noHole: Bool = false) -> EventLoopFuture<Void> {
        submit(.writeZeroes, flags: noHole ? .noHole : [], offset: offset, length: length).map { _ in }
    }

    public func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        try await submitRead(offset: offset, length: length).get()
    }
    public func write(offset: UInt64, data: ByteBuffer, fua: Bool = false) async throws {
        try await submitWrite(offset: offset, data: data, fua: fua).get()
    }
    public func zero(offset: UInt64, length: Int, noHole: Bool = false) async throws {
        try await submitZero(offset: offset, length: length, noHole: noHole).get()
    }
    /// NBD_CMD_TRIM: the server may discard the range.
    public func trim(offset: UInt64, length: Int) async throws {
        _ = try await submit(.trim, offset: offset, length: length).get()
    }
    /// NBD_CMD_FLUSH: everything completed so far reaches stable storage.
    public func flush() async throws { _ = try await submit(.flush, offset: 0, length: 0).get() }

    /// NBD_CMD_DISC after every request in flight has been answered, then closes the connection.
    public func disconnect() async {
        let h = handler
        try? await channel.eventLoop.flatSubmit { h.value.disconnect() }.get()
    }
}

/// The OS's words for a failed connect ("Connection refused", "No such file or directory")
/// instead of NIO's nested error descriptions.
extension NBDURI {
    /// `127.0.0.1:10809` or `Unix socket /run/nbd.sock`, for messages.
    var targetDescription: String {
        switch transport {
        case .tcp(let h, let p): return h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)"
        case .unix(let path): return "Unix socket \(path)"
        }
    }
}

func connectFailureReason(_ error: Error, timeout: TimeAmount? = nil) -> String {
    switch error {
    case let e as IOError:
        return String(cString: strerror(e.errnoCode))
    case let e as NIOConnectionError:
        if let f = e.connectionErrors.first { return connectFailureReason(f.error, timeout: timeout) }
        if let d = e.dnsAError ?? e.dnsAAAAError { return "cannot resolve \(e.host): \(d)" }
        return "no address found for \(e.host)"
    case ChannelError.connectTimeout:
        return "no answer within \(timeout.map { "\(Double($0.nanoseconds) / 1e9)" } ?? "10") s"
    default:
        return "\(error)"
    }
}
