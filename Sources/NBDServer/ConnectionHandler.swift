// One client connection: feeds bytes to the pure handshake and transmission state machines of
// NBDProtocol and turns requests into BlockDevice calls. Replies go out in completion order.
import Virtio
import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import NIOTLS
import VirtioBlock

final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Requests in flight before the handler stops reading the socket (backpressure).
    static let maxInFlight = 128
    /// Bytes of request payload and reply data in flight before parsing pauses.
    static let maxInFlightBytes = 64 << 20
    /// Unparsed input buffered before the socket is no longer read (one maximum request).
    static let maxBufferedInput = (32 << 20) + 64

    private enum Phase {
        case handshake(HandshakeStateMachine)
        /// STARTTLS acknowledged, TLS handshake under way: input is buffered, not parsed, until the
        /// handshake completes and the client's identity (for allow-listed exports) is known.
        case awaitingTLS(HandshakeStateMachine, identity: () -> NBDPeerIdentity)
        case transmission(TransmissionParser, NBDExport, NBDSession)
        case closing
    }
    private var phase: Phase
    private var input = ByteBuffer()
    private var inFlight = 0
    private var readPending = false
    private var inFlightBytes = 0
    private var quiescing = false
    private let directory: ExportDirectory
    /// The export this connection is attached to, once transmission starts.
    private var attached: NBDExport?
    private var logger: Logger
    private let id: Int
    private let handshakeTimeout: TimeAmount
    private var handshakeTimer: Scheduled<Void>?
    private let tls: TLSSettings
    private let mailbox = CompletionMailbox()
    private var batching = false
    private var needsFlush = false

    init(directory: ExportDirectory, id: Int, handshakeTimeout: TimeAmount, tls: TLSSettings, logger: Logger) {
        self.handshakeTimeout = handshakeTimeout
        self.tls = tls
        self.phase = .handshake(HandshakeStateMachine(catalog: directory.catalog, tls: tls.policy))
        self.directory = directory
        self.id = id
        self.logger = logger
        self.logger[metadataKey: "conn"] = "\(id)"
    }

    func channelActive(context: ChannelHandlerContext) {
        logger.debug("client connected", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        if case .handshake(let hs) = phase { context.writeAndFlush(wrapOutboundOut(hs.greeting()), promise: nil) }
        // Slow or stalled clients must not hold a connection slot forever.
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        handshakeTimer = context.eventLoop.scheduleTask(in: handshakeTimeout) {
            let (this, ctx) = bound.value
            if this.negotiating {
                this.logger.info("dropping client: handshake not finished within \(this.handshakeTimeout.nanoseconds / 1_000_000_000) s")
                this.phase = .closing
                ctx.close(promise: nil)
            }
        }
        context.fireChannelActive()
    }

    private var negotiating: Bool {
        switch phase {
        case .handshake, .awaitingTLS: return true
        default: return false
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.debug("client disconnected", metadata: ["in-flight": "\(inFlight)"])
        phase = .closing
        if let e = attached { directory.detach(e, connection: id); attached = nil }
        handshakeTimer?.cancel()
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
            case .closing, .awaitingTLS:
                return
            case .handshake(var hs):
                // The exports as they are now: a reload may have added or removed some since the last option.
                hs.catalog = directory.catalog
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
                    case .startTLS:
                        // The ACK goes out in plaintext; everything after it is TLS. Bytes the client
                        // sent before seeing the ACK are not part of either and are dropped.
                        context.flush()
                        input.clear()
                        do {
                            let (handler, identity) = try tls.makeServerHandler()
                            try context.pipeline.syncOperations.addHandler(handler, position: .first)
                            phase = .awaitingTLS(hs, identity: identity)
                        } catch {
                            logger.error("cannot start TLS: \(error)")
                            phase = .closing
                            context.close(promise: nil)
                            return
                        }
                        logger.debug("STARTTLS: TLS handshake starting")
                        return
                    case .startTransmission(let session):
                        let info = session.export
                        guard let e = directory.attach(info, connection: id) else {
                            // Removed or changed by a reload between the client's GO and now.
                            logger.info("closing: export \"\(info.name)\" was removed or changed by a configuration reload during the handshake")
                            phase = .closing
                            context.close(promise: nil)
                            return
                        }
                        attached = e
                        logger[metadataKey: "export"] = "\(info.name)"
                        logger.debug("transmission started", metadata: ["size": "\(info.size)",
                                                                        "structured": "\(session.structuredReplies)", "base:allocation": "\(session.allocationContext != nil)"])
                        phase = .transmission(TransmissionParser(maximumPayload: Int(info.maximumPayload), extendedHeaders: session.extendedHeaders), e, session)
                    }
                }
                context.flush()
                if case .handshake = phase { return }
            case .transmission(var parser, let export, let session):
                // Parse no further while requests, their bytes or unsent replies are at their bounds.
                if quiescing || inFlight >= Self.maxInFlight || inFlightBytes >= Self.maxInFlightBytes || !context.channel.isWritable { return }
                let event: TransmissionEvent?
                do {
                    event = try parser.next(&input)
                } catch {
                    logger.warning("protocol error: \(error)")
                    phase = .closing
                    context.close(promise: nil)
                    return
                }
                phase = .transmission(parser, export, session)
                guard let ev = event else { return }
                switch ev {
                case .rejected(let r, _), .request(let r, _): export.metrics.request(ExportMetrics.Op(r.command))
                }
                switch ev {
                case .rejected(let r, let err):
                    logger.debug("rejecting request", metadata: ["type": "\(r.type)", "length": "\(r.length)"])
                    fail(context, r, session, err, "WRITE payload exceeds the maximum payload of \(export.info.maximumPayload) bytes")
                case .request(let r, let payload):
                    if r.command == .disc {
                        logger.debug("client sent NBD_CMD_DISC")
                        phase = .closing
                        closeWhenDrained(context: context)
                        return
                    }
                    dispatch(context: context, request: r, payload: payload, export: export, session: session)
                }
            }
        }
    }

    // MARK: requests

    private func dispatch(context: ChannelHandlerContext, request r: NBDRequest, payload: ByteBuffer?, export: NBDExport, session: NBDSession) {
        let metrics = export.metrics
        let size = export.info.size
        let (end, overflow) = r.offset.addingReportingOverflow(r.length)
        let inRange = !overflow && end <= size
        guard let cmd = r.command else { return fail(context, r, session, .inval, "unknown command \(r.type)") }
        // Flags each command may carry ("Command flags"). FUA "is valid for all commands" once
        // SEND_FUA is advertised; on READ, FLUSH, CACHE and BLOCK_STATUS it changes nothing.
        var allowed: NBDCommandFlags = session.export.flags.contains(.sendFUA) ? [.fua] : []
        switch cmd {
        case .read where session.export.flags.contains(.sendDF): allowed.insert(.df)
        case .writeZeroes: allowed.formUnion([.noHole, .fastZero])
        case .blockStatus: allowed.insert(.reqOne)
        default: break
        }
        guard r.flags.isSubset(of: allowed) else { return fail(context, r, session, .inval, "flags 0x\(String(r.flags.rawValue, radix: 16)) not valid for this command") }
        let device = export.device
        let cookie = r.cookie
        // Built only when a request fails (formatting it for every request cost ~7 % of a 4k read).
        func rangeError() -> String { "range \(r.offset)+\(r.length) exceeds the export size \(size)" }
        switch cmd {
        case .read:
            guard r.length <= UInt64(export.info.maximumPayload) else { return fail(context, r, session, .inval, "READ longer than the maximum payload") }
            guard inRange else { return fail(context, r, session, .inval, rangeError()) }
            if session.structuredReplies && !r.flags.contains(.df) {
                start(context, .read, bytes: Int(r.length)) { done in device.readExtents(offset: r.offset, length: Int(r.length), allocator: context.channel.allocator, done) }
                    completion: { this, ctx, result in
                        switch result {
                        case .success(let extents):
                            metrics.read(bytes: Int(r.length))
                            this.replyExtents(context: ctx, request: r, session: session, extents: extents)
                        case .failure(let e): this.fail(ctx, r, session, e.nbdErrno, "\(e)")
                        }
                    }
            } else {
                start(context, .read, bytes: Int(r.length)) { done in device.read(offset: r.offset, length: Int(r.length), allocator: context.channel.allocator, done) }
                    completion: { this, ctx, result in
                        switch result {
                        case .success(let data):
                            metrics.read(bytes: data.readableBytes)
                            if session.structuredReplies { this.replyData(context: ctx, request: r, session: session, data: data) }
                            else { this.reply(context: ctx, cookie: cookie, error: nil, data: data) }
                        case .failure(let e): this.fail(ctx, r, session, e.nbdErrno, "\(e)")
                        }
                    }
            }
        case .write:
            guard !export.readOnly else { return fail(context, r, session, .perm, "export is read-only") }
            guard inRange else { return fail(context, r, session, .nospc, rangeError()) }
            let data = payload ?? ByteBuffer()
            let fua = r.flags.contains(.fua)
            let n = data.readableBytes
            startVoid(context, r, session, bytes: n, wrote: n) { done in device.write(offset: r.offset, data: data, fua: fua, done) }
        case .flush:
            startVoid(context, r, session) { done in device.flush(done) }
        case .trim:
            guard !export.readOnly else { return fail(context, r, session, .perm, "export is read-only") }
            guard inRange else { return fail(context, r, session, .inval, rangeError()) }
            let fua = r.flags.contains(.fua)
            startVoid(context, r, session) { done in
                device.trim(offset: r.offset, length: r.length) { res in
                    guard fua, case .success = res else { return done(res) }
                    device.flush(done)
                }
            }
        case .writeZeroes:
            guard !export.readOnly else { return fail(context, r, session, .perm, "export is read-only") }
            guard inRange else { return fail(context, r, session, .nospc, rangeError()) }
            // FAST_ZERO: without device WRITE_ZEROES, zeroing means writing every byte: fail fast.
            if r.flags.contains(.fastZero) && !device.geometry.canWriteZeroes {
                return fail(context, r, session, .notsup, "the device has no WRITE_ZEROES; zeroing would be slow")
            }
            let fua = r.flags.contains(.fua), unmap = !r.flags.contains(.noHole)
            startVoid(context, r, session) { done in device.writeZeroes(offset: r.offset, length: r.length, mayUnmap: unmap, fua: fua, done) }
        case .cache:
            // Advertised as SEND_CACHE: the device is local memory or a local file; nothing to prefetch.
            guard inRange else { return fail(context, r, session, .inval, rangeError()) }
            succeed(context, r, session)
        case .blockStatus:
            guard let ctx = session.allocationContext else { return fail(context, r, session, .inval, "no metadata context was negotiated") }
            guard r.length > 0, inRange else { return fail(context, r, session, .inval, r.length == 0 ? "BLOCK_STATUS of length 0" : rangeError()) }
            replyBlockStatus(context: context, request: r, session: session, contextID: ctx, device: device)
        case .disc:
            break
        case .resize:
            fail(context, r, session, .inval, "RESIZE is not supported")
        }
    }

    // MARK: replies

    private func framing(_ r: NBDRequest, _ session: NBDSession) -> ReplyFraming {
        session.extendedHeaders ? .extended(offset: r.offset) : .structured
    }

    /// Answers a failed request: an ERROR chunk where structured replies are required (READ and
    /// BLOCK_STATUS; everything once extended headers are on), else a simple reply.
    private func fail(_ context: ChannelHandlerContext, _ r: NBDRequest, _ session: NBDSession, _ err: NBDErrno, _ message: String) {
        attached?.metrics.failed(ExportMetrics.Op(r.command))
        logger.debug("request failed", metadata: ["type": "\(r.type)", "offset": "\(r.offset)", "length": "\(r.length)", "error": "\(err)", "why": "\(message)"])
        if session.extendedHeaders || (session.structuredReplies && (r.command == .read || r.command == .blockStatus)) {
            guard context.channel.isActive else { return }
            var b = context.channel.allocator.buffer(capacity: 48 + message.utf8.count)
            StructuredReply.error(cookie: r.cookie, error: err, message: message, framing: framing(r, session), into: &b)
            emit(context, b)
        } else {
            reply(context: context, cookie: r.cookie, error: err, data: nil)
        }
    }

    /// Answers a successful request without payload: a simple reply, or NONE+DONE with extended headers.
    private func succeed(_ context: ChannelHandlerContext, _ r: NBDRequest, _ session: NBDSession) {
        guard session.extendedHeaders else { return reply(context: context, cookie: r.cookie, error: nil, data: nil) }
        guard context.channel.isActive else { return }
        var b = context.channel.allocator.buffer(capacity: 32)
        StructuredReply.none(cookie: r.cookie, framing: framing(r, session), into: &b)
        emit(context, b)
    }

    /// A READ as OFFSET_DATA and OFFSET_HOLE chunks; the last one carries DONE.
    private func replyExtents(context: ChannelHandlerContext, request r: NBDRequest, session: NBDSession, extents: [BlockDevice.Extent]) {
        guard context.channel.isActive else { return }
        let cookie = r.cookie, fr = framing(r, session)
        var header = context.channel.allocator.buffer(capacity: 32 * extents.count)
        for (i, e) in extents.enumerated() {
            let last = i == extents.count - 1
            switch e {
            case .zero(let o, let n):
                StructuredReply.offsetHole(cookie: cookie, offset: o, length: UInt32(n), done: last, framing: fr, into: &header)
            case .data(let o, let d):
                StructuredReply.offsetData(cookie: cookie, offset: o, dataLength: d.readableBytes, done: last, framing: fr, into: &header)
                context.write(wrapOutboundOut(header), promise: nil)
                context.write(wrapOutboundOut(d), promise: nil)
                if last { if batching { needsFlush = true } else { context.flush() }; return }
                header = context.channel.allocator.buffer(capacity: 32)
            }
        }
        if header.readableBytes > 0 { context.write(wrapOutboundOut(header), promise: nil) }
        if batching { needsFlush = true } else { context.flush() }
    }

    /// One OFFSET_DATA chunk with DONE (DF reads, and reads when structured replies are on).
    private func replyData(context: ChannelHandlerContext, request r: NBDRequest, session: NBDSession, data: ByteBuffer) {
        guard context.channel.isActive else { return }
        var header = context.channel.allocator.buffer(capacity: 48)
        StructuredReply.offsetData(cookie: r.cookie, offset: r.offset, dataLength: data.readableBytes, done: true, framing: framing(r, session), into: &header)
        context.write(wrapOutboundOut(header), promise: nil)
        emit(context, data)
    }

    /// base:allocation extents for [offset, offset+length), merged, clipped, REQ_ONE honoured.
    /// Compact replies carry u32 lengths; extended ones BLOCK_STATUS_EXT with u64 lengths.
    private func replyBlockStatus(context: ChannelHandlerContext, request r: NBDRequest, session: NBDSession, contextID: UInt32, device: BlockDevice) {
        let end = r.offset + r.length
        let maxPiece: UInt64 = session.extendedHeaders ? UInt64.max : UInt64(UInt32.max) & ~4095
        var extents: [(length: UInt64, flags: UInt32)] = []
        for run in device.allocation.extents(BlockDevice.down(r.offset), BlockDevice.up(end)) {
            let a = max(run.start, r.offset), b = min(run.end, end)
            guard a < b else { continue }
            let f = run.state.baseAllocationFlags
            var left = b - a
            while left > 0 {
                let n = min(left, maxPiece)
                if let l = extents.last, l.flags == f, maxPiece - l.length >= n { extents[extents.count - 1].length += n }
                else { extents.append((n, f)) }
                left -= n
            }
            // At most 2^20 descriptors per chunk ("NBD_REPLY_TYPE_BLOCK_STATUS").
            if r.flags.contains(.reqOne) || extents.count >= 1 << 20 { break }
        }
        if r.flags.contains(.reqOne) { extents = Array(extents.prefix(1)) }
        var b = context.channel.allocator.buffer(capacity: 40 + 16 * extents.count)
        if session.extendedHeaders {
            StructuredReply.blockStatusExt(cookie: r.cookie, context: contextID, extents: extents.map { ($0.length, UInt64($0.flags)) },
                                           done: true, framing: framing(r, session), into: &b)
        } else {
            StructuredReply.blockStatus(cookie: r.cookie, context: contextID, extents: extents.map { (UInt32($0.length), $0.flags) }, done: true, into: &b)
        }
        emit(context, b)
    }

    /// Runs a block operation. Its completion is posted to this connection's mailbox; the first
    /// post of a batch schedules one drain on the event loop, which answers every completion that
    /// has arrived and flushes the socket once (coalesced replies, one wakeup per batch).
    private func start<T: Sendable>(_ context: ChannelHandlerContext, _ kind: ExportMetrics.Op, bytes: Int = 0,
                                    _ op: (@escaping @Sendable (Result<T, BlkError>) -> Void) -> Void,
                                    completion: @escaping (NBDConnectionHandler, ChannelHandlerContext, Result<T, BlkError>) -> Void) {
        inFlight += 1
        inFlightBytes += bytes
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context, completion), eventLoop: loop)
        let mailbox = self.mailbox
        // Latency: from dispatch until the completion is taken up on the event loop (before the reply is written).
        let metrics = attached?.metrics
        let began = NIODeadline.now()
        metrics?.started()
        op { result in
            let first = mailbox.post {
                let (this, ctx, completion) = bound.value
                this.inFlight -= 1
                this.inFlightBytes -= bytes
                metrics?.finished(kind, nanoseconds: UInt64(clamping: (NIODeadline.now() - began).nanoseconds))
                completion(this, ctx, result)
            }
            if first {
                loop.execute {
                    let (this, ctx, _) = bound.value
                    this.drainMailbox(context: ctx)
                }
            }
        }
    }

    private func drainMailbox(context: ChannelHandlerContext) {
        batching = true
        while true {
            let items = mailbox.take()
            if items.isEmpty { break }
            for item in items { item() }
        }
        batching = false
        if needsFlush { needsFlush = false; context.flush() }
        afterCompletion(context: context)
    }

    /// Writes a reply; flushes now, or once at the end of the current completion batch.
    private func emit(_ context: ChannelHandlerContext, _ b: ByteBuffer) {
        context.write(wrapOutboundOut(b), promise: nil)
        if batching { needsFlush = true } else { context.flush() }
    }

    /// Runs a command whose reply has no data; `wrote` bytes are counted in the export's metrics
    /// when it succeeds (a count, not a closure: one allocation less per WRITE).
    private func startVoid(_ context: ChannelHandlerContext, _ r: NBDRequest, _ session: NBDSession, bytes: Int = 0,
                           wrote: Int? = nil, _ op: (@escaping @Sendable (Result<Void, BlkError>) -> Void) -> Void) {
        start(context, ExportMetrics.Op(r.command), bytes: bytes, op) { this, ctx, result in
            switch result {
            case .success:
                if let n = wrote { this.attached?.metrics.wrote(bytes: n) }
                this.succeed(ctx, r, session)
            case .failure(let e): this.fail(ctx, r, session, e.nbdErrno, "\(e)")
            }
        }
    }

    private func reply(context: ChannelHandlerContext, cookie: UInt64, error: NBDErrno?, data: ByteBuffer?) {
        guard context.channel.isActive else { return }
        var header = context.channel.allocator.buffer(capacity: 16)
        TransmissionParser.simpleReply(cookie: cookie, error: error, into: &header)
        if let d = data {
            context.write(wrapOutboundOut(header), promise: nil)
            emit(context, d)
        } else {
            emit(context, header)
        }
    }

    private func afterCompletion(context: ChannelHandlerContext) {
        if case .closing = phase { closeWhenDrained(context: context); return }
        if quiescing { closeWhenDrained(context: context); return }
        if readPending && mayRead(context) {
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

    /// Backpressure: the socket is read only while requests in flight, their bytes, unparsed
    /// input and unsent replies are all bounded. A client that floods requests without reading
    /// replies fills its own socket buffers instead of the server's memory.
    private func mayRead(_ context: ChannelHandlerContext) -> Bool {
        !quiescing && inFlight < Self.maxInFlight && inFlightBytes < Self.maxInFlightBytes
            && input.readableBytes < Self.maxBufferedInput && context.channel.isWritable
    }

    func read(context: ChannelHandlerContext) {
        guard mayRead(context) else {
            readPending = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            if input.readableBytes > 0 { process(context: context) }
            if readPending && mayRead(context) {
                readPending = false
                context.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent, case .awaitingTLS(let hs, let identity) = phase {
            // Negotiation continues inside TLS, with who the client proved to be.
            let peer = identity()
            logger.debug("TLS handshake completed", metadata: ["client-dn": "\(peer.certificateDN ?? "-")", "psk-identity": "\(peer.pskIdentity ?? "-")"])
            phase = .handshake(HandshakeStateMachine(afterTLS: hs, peer: peer))
            if input.readableBytes > 0 { process(context: context) }
        }
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
        if case .awaitingTLS = phase {
            // E.g. --tls-verify-peer and no client certificate, or one ca-cert.pem did not sign.
            logger.info("closing: TLS handshake failed: \(error)")
        } else {
            logger.debug("connection error: \(error)")
        }
        context.close(promise: nil)
    }
}

/// Sent to every connection on shutdown: finish what is in flight, then close.
struct QuiesceEvent {}

/// Completions posted from the driver's thread for one connection, drained on its event loop.
final class CompletionMailbox: Sendable {
    private let items = Locked<[@Sendable () -> Void]>([])

    /// Adds an item; returns true if the mailbox was empty (the caller schedules a drain).
    func post(_ item: @escaping @Sendable () -> Void) -> Bool {
        items.withLock { i in
            i.append(item)
            return i.count == 1
        }
    }

    func take() -> [@Sendable () -> Void] {
        items.withLock { i in
            let out = i
            i = []
            return out
        }
    }
}
