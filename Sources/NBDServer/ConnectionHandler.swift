// One client connection: feeds bytes to the pure handshake and transmission state machines of
// NBDProtocol and turns requests into BlockDevice calls. Replies go out in completion order.
import Logging
import NBDProtocol
import NIOCore
import VirtioBlock

final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Requests in flight before the handler stops reading the socket (backpressure).
    static let maxInFlight = 128

    private enum Phase {
        case handshake(HandshakeStateMachine)
        case transmission(TransmissionParser, NBDExport)
        case closing
    }
    private var phase: Phase
    private var input = ByteBuffer()
    private var inFlight = 0
    private var readPending = false
    private var quiescing = false
    private let exports: [String: NBDExport]
    private var logger: Logger
    private let registry: ConnectionRegistry
    private let id: Int

    init(catalog: NBDExportCatalog, exports: [String: NBDExport], registry: ConnectionRegistry, id: Int, logger: Logger) {
        self.phase = .handshake(HandshakeStateMachine(catalog: catalog))
        self.exports = exports
        self.registry = registry
        self.id = id
        self.logger = logger
        self.logger[metadataKey: "conn"] = "\(id)"
    }

    func channelActive(context: ChannelHandlerContext) {
        logger.debug("client connected", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        if case .handshake(let hs) = phase { context.writeAndFlush(wrapOutboundOut(hs.greeting()), promise: nil) }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.debug("client disconnected", metadata: ["in-flight": "\(inFlight)"])
        phase = .closing
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if input.readableBytes == 0 { input = bytes } else { input.writeBuffer(&bytes) }
        process(context: context)
        if input.readableBytes == 0 { input.clear() } else if input.readerIndex > 1 << 20 { input.discardReadBytes() }
    }

    private func process(context: ChannelHandlerContext) {
        while true {
            switch phase {
            case .closing:
                return
            case .handshake(var hs):
                let actions = hs.receive(&input)
                phase = .handshake(hs)
                for a in actions {
                    switch a {
                    case .send(let b): context.write(wrapOutboundOut(b), promise: nil)
                    case .close(let reason):
                        logger.info("closing during handshake: \(reason)")
                        phase = .closing
                        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: nil)
                        context.close(promise: nil)
                        return
                    case .startTransmission(let info):
                        guard let e = exports[info.name] else { context.close(promise: nil); return }
                        logger.debug("transmission started", metadata: ["export": "\(info.name)", "size": "\(info.size)"])
                        phase = .transmission(TransmissionParser(maximumPayload: Int(info.maximumPayload)), e)
                    }
                }
                context.flush()
                if case .handshake = phase { return }
            case .transmission(var parser, let export):
                if quiescing || inFlight >= Self.maxInFlight { return }
                let event: TransmissionEvent?
                do {
                    event = try parser.next(&input)
                } catch {
                    logger.warning("protocol error: \(error)")
                    phase = .closing
                    context.close(promise: nil)
                    return
                }
                phase = .transmission(parser, export)
                guard let ev = event else { return }
                switch ev {
                case .rejected(let r, let err):
                    logger.debug("rejecting request", metadata: ["type": "\(r.type)", "length": "\(r.length)"])
                    reply(context: context, cookie: r.cookie, error: err, data: nil)
                case .request(let r, let payload):
                    if r.command == .disc {
                        logger.debug("client sent NBD_CMD_DISC")
                        phase = .closing
                        closeWhenDrained(context: context)
                        return
                    }
                    dispatch(context: context, request: r, payload: payload, export: export)
                }
            }
        }
    }

    // MARK: requests

    private func dispatch(context: ChannelHandlerContext, request r: NBDRequest, payload: ByteBuffer?, export: NBDExport) {
        let size = export.info.size
        let (end, overflow) = r.offset.addingReportingOverflow(r.length)
        let inRange = !overflow && end <= size
        guard let cmd = r.command else { return reply(context: context, cookie: r.cookie, error: .inval, data: nil) }
        // Flags the command may carry. FUA "is valid for all commands" once SEND_FUA is
        // advertised ("Command flags"); on READ and FLUSH it changes nothing.
        var allowed: NBDCommandFlags = export.info.flags.contains(.sendFUA) ? [.fua] : []
        if cmd == .writeZeroes { allowed.insert(.noHole) }
        guard r.flags.isSubset(of: allowed) else { return reply(context: context, cookie: r.cookie, error: .inval, data: nil) }
        let device = export.device
        let cookie = r.cookie
        switch cmd {
        case .read:
            guard r.length <= UInt64(export.info.maximumPayload) else { return reply(context: context, cookie: cookie, error: .inval, data: nil) }
            guard inRange else { return reply(context: context, cookie: cookie, error: .inval, data: nil) }
            start(context) { done in device.read(offset: r.offset, length: Int(r.length), allocator: context.channel.allocator) { done($0) } }
                completion: { this, ctx, result in
                    switch result {
                    case .success(let data): this.reply(context: ctx, cookie: cookie, error: nil, data: data)
                    case .failure(let e): this.reply(context: ctx, cookie: cookie, error: e.nbdErrno, data: nil)
                    }
                }
        case .write:
            guard !export.readOnly else { return reply(context: context, cookie: cookie, error: .perm, data: nil) }
            guard inRange else { return reply(context: context, cookie: cookie, error: .nospc, data: nil) }
            let data = payload ?? ByteBuffer()
            let fua = r.flags.contains(.fua)
            startVoid(context, cookie) { done in device.write(offset: r.offset, data: data, fua: fua, done) }
        case .flush:
            startVoid(context, cookie) { done in device.flush(done) }
        case .trim:
            guard !export.readOnly else { return reply(context: context, cookie: cookie, error: .perm, data: nil) }
            guard inRange else { return reply(context: context, cookie: cookie, error: .inval, data: nil) }
            let fua = r.flags.contains(.fua)
            startVoid(context, cookie) { done in
                device.trim(offset: r.offset, length: r.length) { res in
                    guard fua, case .success = res else { return done(res) }
                    device.flush(done)
                }
            }
        case .writeZeroes:
            guard !export.readOnly else { return reply(context: context, cookie: cookie, error: .perm, data: nil) }
            guard inRange else { return reply(context: context, cookie: cookie, error: .nospc, data: nil) }
            let fua = r.flags.contains(.fua), unmap = !r.flags.contains(.noHole)
            startVoid(context, cookie) { done in device.writeZeroes(offset: r.offset, length: r.length, mayUnmap: unmap, fua: fua, done) }
        case .disc:
            break
        case .cache, .blockStatus, .resize:
            // Not advertised for this export.
            reply(context: context, cookie: cookie, error: .inval, data: nil)
        }
    }

    /// Runs a block operation; its completion hops back to this channel's event loop.
    private func start<T: Sendable>(_ context: ChannelHandlerContext,
                                    _ op: (@escaping @Sendable (Result<T, BlkError>) -> Void) -> Void,
                                    completion: @escaping (NBDConnectionHandler, ChannelHandlerContext, Result<T, BlkError>) -> Void) {
        inFlight += 1
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context, completion), eventLoop: loop)
        op { result in
            loop.execute {
                let (this, ctx, completion) = bound.value
                this.inFlight -= 1
                completion(this, ctx, result)
                this.afterCompletion(context: ctx)
            }
        }
    }

    private func startVoid(_ context: ChannelHandlerContext, _ cookie: UInt64, _ op: (@escaping @Sendable (Result<Void, BlkError>) -> Void) -> Void) {
        start(context, op) { this, ctx, result in
            switch result {
            case .success: this.reply(context: ctx, cookie: cookie, error: nil, data: nil)
            case .failure(let e):
                this.logger.debug("request failed: \(e)")
                this.reply(context: ctx, cookie: cookie, error: e.nbdErrno, data: nil)
            }
        }
    }

    private func reply(context: ChannelHandlerContext, cookie: UInt64, error: NBDErrno?, data: ByteBuffer?) {
        guard context.channel.isActive else { return }
        var header = context.channel.allocator.buffer(capacity: 16)
        TransmissionParser.simpleReply(cookie: cookie, error: error, into: &header)
        if let d = data {
            context.write(wrapOutboundOut(header), promise: nil)
            context.writeAndFlush(wrapOutboundOut(d), promise: nil)
        } else {
            context.writeAndFlush(wrapOutboundOut(header), promise: nil)
        }
    }

    private func afterCompletion(context: ChannelHandlerContext) {
        if case .closing = phase { closeWhenDrained(context: context); return }
        if quiescing { closeWhenDrained(context: context); return }
        if readPending && inFlight < Self.maxInFlight {
            readPending = false
            context.read()
        }
        // Parsing may have stopped at the in-flight limit with requests still buffered.
        if input.readableBytes > 0 { process(context: context) }
    }

    private func closeWhenDrained(context: ChannelHandlerContext) {
        guard inFlight == 0 else { return }
        if context.channel.isActive { context.close(promise: nil) }
    }

    // MARK: backpressure and shutdown

    func read(context: ChannelHandlerContext) {
        if inFlight >= Self.maxInFlight || quiescing {
            readPending = true
            return
        }
        context.read()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is QuiesceEvent {
            quiescing = true
            switch phase {
            case .transmission: closeWhenDrained(context: context)
            default: context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("connection error: \(error)")
        context.close(promise: nil)
    }
}

/// Sent to every connection on shutdown: finish what is in flight, then close.
struct QuiesceEvent {}
