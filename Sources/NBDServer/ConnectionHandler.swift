import BlockLayer
import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import NIOTLS
// One client connection: feeds bytes to the pure handshake and transmission state machines of
// NBDProtocol and turns requests into BlockDevice calls. Replies go out in completion order.
import Virtio
import VirtioBlock

final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Requests in flight before the handler stops reading the socket (backpressure).
    static let maxInFlight = 128
    /// Bytes of request payload and reply data in flight before parsing pauses (at least one
    /// maximum payload: a request is never split to fit).
    static let maxInFlightBytes = 64 << 20

    /// The bounds while negotiating: 1 MiB of unparsed input (options are at most 16 KiB;
    /// longer ones are drained).
    static let handshakeLimits = TransmissionFlow.Limits(
        requests: maxInFlight, bytes: maxInFlightBytes, heldBytes: 0, bufferedInput: 1 << 20,
        inputReserve: ByteBudget.reserve)

    /// The bounds in transmission: at least one maximum payload in flight, one maximum request
    /// (its header and payload) of unparsed input, and the stack's share of device pages held.
    static func transmissionLimits(_ e: NBDExport) -> TransmissionFlow.Limits {
        TransmissionFlow.Limits(
            requests: maxInFlight, bytes: max(maxInFlightBytes, Int(e.maximumPayload)),
            heldBytes: e.stack.heldReadLimit, bufferedInput: Int(e.info.maximumPayload) + 64,
            inputReserve: ByteBudget.reserve)
    }

    private enum Phase {
        case handshake(HandshakeStateMachine)
        /// STARTTLS acknowledged, TLS handshake under way: input is buffered, not parsed, until the
        /// handshake completes and the client's identity (for allow-listed exports) is known.
        case awaitingTLS(HandshakeStateMachine, identity: () -> NBDPeerIdentity)
        /// Requests are parsed (`parser`) and served on `attached` under `sessionRules`.
        case transmission
        case closing
    }
    // The connection's state is touched on its event loop only, through this handler (NIO calls a
    // handler on its channel's loop, and completions reach it through `CompletionSink`'s
    // `loop.execute`), so the properties passed inout on every request skip the runtime's
    // dynamic exclusivity checks (about 80 instructions each, 1,400 per request with them).
    @exclusivity(unchecked) private var phase: Phase
    @exclusivity(unchecked) private var input = ByteBuffer()
    /// The transmission phase's parser, parsing `input` in place (set when transmission starts).
    @exclusivity(unchecked) private var parser = TransmissionParser(maximumPayload: 0)
    /// Requests and bytes in flight, held READ pages, paused reads and the ending (NBDProtocol).
    @exclusivity(unchecked) private var flow = TransmissionFlow(limits: handshakeLimits)
    private let directory: ExportDirectory
    /// The export this connection is attached to, once transmission starts.
    private var attached: NBDExport?
    private var logger: Logger
    private let id: Int
    private let handshakeTimeout: TimeAmount
    private var handshakeTimer: Scheduled<Void>?
    private let tls: TLSSettings
    /// Where the device's completions go (made at the first device request; dropped when the
    /// handler is removed, which breaks its reference back to the handler).
    private var sink: CompletionSink?
    /// The requests the device is working on, by slot.
    @exclusivity(unchecked) private var inFlightTable = InFlightTable()
    /// The batch of completions being answered (its storage is kept between batches).
    @exclusivity(unchecked) private var completed: [CompletionSink.Completed] = []
    /// The transmission rules of the session, once transmission starts (replies are framed by them).
    private var sessionRules: TransmissionRules?
    /// A completion batch is being answered: replies go into `batchOut`, one flush at the end.
    private var batching = false
    private var needsFlush = false
    /// The replies of the current completion batch not yet written, and the capacity a fresh one gets.
    @exclusivity(unchecked) private var batchOut: ByteBuffer?
    private var batchCapacity = 0
    /// READs this long and longer are answered from the device's pages, without a copy.
    static let heldReadMinimum = 64 << 10

    /// The server-wide memory budget, shared with every other connection.
    private let budget: ByteBudget
    /// Unparsed input counted in the budget now.
    private var charged = 0
    /// A wake-up is registered with the budget.
    private var waitingForBudget = false
    /// A client silent this long with a request unfinished (`--payload-timeout`) is closed.
    private let payloadTimeout: TimeAmount
    /// When input last arrived while a request was unfinished.
    private var lastInput = NIODeadline.now()
    private var stallTimer: Scheduled<Void>?

    /// On shutdown (or the removal of its export), how long queued replies may take to reach a
    /// client that reads slowly or not at all before the connection is closed anyway.
    private let drainTimeout: TimeAmount
    /// Closes the connection if its replies are not taken within `drainTimeout`.
    private var drainTimer: Scheduled<Void>?

    init(
        directory: ExportDirectory, id: Int, handshakeTimeout: TimeAmount, tls: TLSSettings, logger: Logger,
        budget: ByteBudget = ByteBudget(), drainTimeout: TimeAmount = .seconds(30),
        payloadTimeout: TimeAmount = .seconds(30)
    ) {
        self.budget = budget
        self.payloadTimeout = payloadTimeout
        self.drainTimeout = drainTimeout
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
                this.logger.info(
                    "dropping client: handshake not finished within \(this.handshakeTimeout.nanoseconds / 1_000_000_000) s"
                )
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
        logger.debug("client disconnected", metadata: ["in-flight": "\(flow.inFlight)"])
        phase = .closing
        if let e = attached {
            directory.detach(e, connection: id)
            attached = nil
        }
        handshakeTimer?.cancel()
        drainTimer?.cancel()
        stallTimer?.cancel()
        input = Self.empty
        budget.give(charged)
        charged = 0
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        sink = nil // completions still to come hold the sink, and through it this handler, until they arrive
    }

    /// After the last reply of a shutdown, what the client had sent has now been read and
    /// dropped: the full close sends no reset.
    func channelReadComplete(context: ChannelHandlerContext) {
        if flow.ending == .outputClosed {
            context.close(promise: nil)
            return
        }
        context.fireChannelReadComplete()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if flow.ending == .outputClosed { return } // after the last reply of a shutdown: dropped
        var bytes = unwrapInboundIn(data)
        if input.readableBytes == 0 { input = bytes } else { gather(&bytes, context) }
        process(context: context)
        release()
        if input.readableBytes > 0, case .transmission = phase { watchForStall(context) }
    }

    /// A request is unfinished (its header or payload partly received): a client that sends
    /// nothing more for `payloadTimeout` while the server is reading is closed, so that it cannot
    /// keep its part of the memory budget forever. One timer per stall, not one per read.
    private func watchForStall(_ context: ChannelHandlerContext) {
        lastInput = .now()
        guard stallTimer == nil else { return }
        armStallTimer(context, in: payloadTimeout)
    }

    private func armStallTimer(_ context: ChannelHandlerContext, in delay: TimeAmount) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        stallTimer = context.eventLoop.scheduleTask(in: delay) {
            let (this, context) = bound.value
            this.stallTimer = nil
            guard context.channel.isActive, this.input.readableBytes > 0, case .transmission = this.phase else {
                return
            }
            // Waiting on the server (requests in flight, replies not taken, reading paused by a
            // per-connection bound) is not a stall. Paused by the memory budget, it is: the
            // connections that filled the budget first time out first, and give it back.
            if this.flow.inFlight > 0
                || (this.flow.readPaused && !this.flow.inputOverBudget(this.surroundings(context)))
            {
                this.lastInput = .now()
                return this.armStallTimer(context, in: this.payloadTimeout)
            }
            let silent = NIODeadline.now() - this.lastInput
            guard silent >= this.payloadTimeout else {
                return this.armStallTimer(context, in: this.payloadTimeout - silent)
            }
            this.logger.warning(
                "closing: the client sent nothing for \(this.payloadTimeout.nanoseconds / 1_000_000_000) s in the middle of a request (\(this.input.readableBytes) bytes of it received); a write it had not finished is not done (--payload-timeout)"
            )
            this.phase = .closing
            context.close(promise: nil)
        }
    }

    /// Counts the unparsed input in the server-wide budget.
    private func recharge() {
        let now = input.readableBytes
        if now > charged {
            budget.take(now - charged)
        } else if now < charged {
            budget.give(charged - now)
        }
        charged = now
    }

    /// Appends a read to unparsed input that ends in the middle of a message. Writing into
    /// `input` once requests have been parsed from it (readerIndex > 0) would copy all of it,
    /// since their payloads are slices of its storage (copy on write), and growing it would copy
    /// again; over TCP, where a payload arrives in many reads, that was most of the server's time
    /// (perf, nbdcopy file→nbd: 20 % in `discardReadBytes` faulting in fresh pages, more in
    /// `ByteBuffer.write`). Instead the unparsed rest moves once into a buffer big enough for the
    /// whole message, and later reads are appended to it in place.
    private func gather(_ bytes: inout ByteBuffer, _ context: ChannelHandlerContext) {
        if input.readerIndex == 0 && input.writableBytes >= bytes.readableBytes {
            input.writeBuffer(&bytes)
            return
        }
        var size = input.readableBytes + bytes.readableBytes
        if case .transmission = phase, let payload = parser.awaitedPayload {
            size = max(size, payload)
        }
        var fresh = context.channel.allocator.buffer(capacity: size)
        fresh.writeBuffer(&input)
        fresh.writeBuffer(&bytes)
        input = fresh
    }

    /// Lets go of NIO's receive buffer between reads, so that a connection that waits holds only
    /// what it has not parsed yet (nothing when idle, a few bytes of a message while negotiating),
    /// and NIO can reuse that buffer for the next read instead of allocating one. What an idle
    /// connection costs is mostly that buffer's size: the receive allocator starts at 4 KiB
    /// (Server.swift; at 256 KiB, 2,000 silent clients held 515 MiB, issue #31).
    private func release() {
        if input.readableBytes == 0 {
            input = Self.empty
        } else if negotiating && input.capacity > max(Self.compactAbove, 2 * input.readableBytes) {
            // A partial option (a slow or hostile client): keep its bytes, not the buffer.
            var small = ByteBufferAllocator().buffer(capacity: input.readableBytes)
            small.writeBuffer(&input)
            input = small
        }
    }

    /// One shared empty buffer: an idle connection points at it instead of owning storage.
    private static let empty = ByteBuffer()
    /// Negotiation input kept in a buffer larger than this (and than twice its bytes) is copied
    /// out: a client dripping its handshake a byte a second otherwise holds a receive buffer.
    private static let compactAbove = 256

    private func process(context: ChannelHandlerContext) {
        defer { recharge() }
        // The requests parsed from this input reach the device with one doorbell, rung when
        // parsing stops; a device that completes on the kick then answers them in one pass.
        let plugged = attached?.stack
        plugged?.plug()
        defer { plugged?.unplug() }
        while true {
            switch phase {
            case .closing, .awaitingTLS:
                return
            case .handshake(let hs):
                guard negotiate(context, hs) else { return }
            case .transmission:
                // The export and the rules are taken once per read, not once per request.
                guard let export = attached, let rules = sessionRules else {
                    preconditionFailure("transmission without an export")
                }
                while case .transmission = phase, transmit(context, export, rules) {}
                return
            }
        }
    }

    /// Feeds the input to the handshake and carries out its actions. False: wait for more input
    /// (or TLS, or the close).
    private func negotiate(_ context: ChannelHandlerContext, _ machine: HandshakeStateMachine) -> Bool {
        var hs = machine
        // The exports as they are now: a reload may have added or removed some since the last option.
        hs.catalog = directory.catalog
        let actions = hs.receive(&input)
        phase = .handshake(hs)
        // The replies to every option of this read go out as one buffer: many tiny buffers queued
        // for a client that does not read them cost far more than their bytes.
        var replies: ByteBuffer?
        for a in actions {
            if case .send(var b) = a {
                if replies == nil { replies = b } else { replies!.writeBuffer(&b) }
                continue
            }
            if let r = replies {
                context.write(wrapOutboundOut(r), promise: nil)
                replies = nil
            }
            switch a {
            case .send: break
            case .report(let fact): logger.info("\(fact)")
            case .close(let reason):
                // ABORT is how a client that only asked (nbdinfo, --list) says goodbye: nothing to report.
                logger.log(
                    level: reason == HandshakeStateMachine.abortReason ? .debug : .info,
                    "closing during handshake: \(reason)")
                phase = .closing
                context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: nil)
                context.close(promise: nil)
                return false
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
                    return false
                }
                logger.debug("STARTTLS: TLS handshake starting")
                return false
            case .startTransmission(let session):
                guard startTransmission(context, session) else { return false }
            }
        }
        if let r = replies { context.write(wrapOutboundOut(r), promise: nil) }
        context.flush()
        if case .handshake = phase { return false }
        return true
    }

    /// Attaches to the export the client chose and enters transmission; false (and closing) if a
    /// reload removed or changed it meanwhile.
    private func startTransmission(_ context: ChannelHandlerContext, _ session: NBDSession) -> Bool {
        let info = session.export
        guard let e = directory.attach(info, connection: id) else {
            // Removed or changed by a reload between the client's GO and now.
            logger.info(
                "closing: export \"\(info.name)\" was removed or changed by a configuration reload during the handshake"
            )
            phase = .closing
            context.close(promise: nil)
            return false
        }
        attached = e
        flow.limits = Self.transmissionLimits(e)
        logger[metadataKey: "export"] = "\(info.name)"
        logger.debug(
            "transmission started",
            metadata: [
                "size": "\(info.size)",
                "structured": "\(session.structuredReplies)",
                "contexts": "\(session.contexts.map(\.name))",
            ])
        let facts = ExportFacts(
            size: info.size, flags: info.flags, maximumPayload: UInt64(info.maximumPayload),
            canFastZero: e.stack.capabilities.canFastZero)
        let rules = TransmissionRules(session: session, export: facts)
        sessionRules = rules
        parser = TransmissionParser(
            maximumPayload: Int(info.maximumPayload), extendedHeaders: session.extendedHeaders,
            blockStatusPayloadLimit: rules.export.flags.contains(.blockStatusPayload)
                ? 8 + 4 * session.contexts.count : 0)
        phase = .transmission
        return true
    }

    /// Parses the next request, if the bounds allow one, and answers it. False: stop parsing for now.
    private func transmit(_ context: ChannelHandlerContext, _ export: NBDExport, _ rules: TransmissionRules) -> Bool {
        // Parse no further while requests, their bytes or unsent replies are at their bounds.
        // (Quiescing changes nothing here: what was received before is served, what comes after
        // is answered NBD_ESHUTDOWN below.)
        guard flow.mayParse(surroundings(context)) else { return false }
        let event: TransmissionEvent?
        let unparsed = input.readableBytes
        do {
            event = try parser.next(&input)
        } catch {
            logger.warning("protocol error: \(error)")
            phase = .closing
            context.close(promise: nil)
            return false
        }
        // Whether this request's bytes had arrived before a shutdown began.
        let receivedBefore = flow.consumed(unparsed - input.readableBytes)
        guard let ev = event else { return false }
        switch ev {
        case .rejected(let r, let reason):
            export.metrics.request(ExportMetrics.Op(r.command))
            logger.debug("rejecting request", metadata: ["type": "\(r.type)", "length": "\(r.length)"])
            return answer(context, r, rules.decide(reason), payload: nil, export: export, rules: rules)
        case .request(let r, let payload):
            export.metrics.request(ExportMetrics.Op(r.command))
            // Shutting down: requests received before it are served; later ones (their bytes came
            // after the quiesce) get NBD_ESHUTDOWN, as the spec asks, and touch nothing.
            if flow.refusesAfterShutdown(r, receivedBefore: receivedBefore) {
                fail(context, r, rules, .shutdown, "the server is shutting down")
                return true
            }
            return answer(context, r, rules.decide(r, payload: payload), payload: payload, export: export, rules: rules)
        }
    }

    // MARK: requests

    /// Does what the transmission rules decided for one request: every request but NBD_CMD_DISC gets
    /// exactly one reply. False after NBD_CMD_DISC: parse no further, close once the replies are out.
    private func answer(
        _ context: ChannelHandlerContext, _ r: NBDRequest, _ decision: RequestDecision, payload: ByteBuffer?,
        export: NBDExport, rules: TransmissionRules
    ) -> Bool {
        switch decision {
        case .fail(let err, let message): fail(context, r, rules, err, message)
        case .succeed: succeed(context, r, rules)
        case .run(let op): execute(context, r, op, payload: payload, export: export, rules: rules)
        case .disconnect:
            logger.debug("client sent NBD_CMD_DISC")
            phase = .closing
            closeWhenDrained(context: context)
            return false
        }
        return true
    }

    /// Runs one valid request on the device: it waits in the in-flight table, and the device's
    /// completion, posted to the sink, sends its one reply (`complete`). One closure per request.
    private func execute(
        _ context: ChannelHandlerContext, _ r: NBDRequest, _ op: TransmissionOperation, payload: ByteBuffer?,
        export: NBDExport, rules: TransmissionRules
    ) {
        let device = export.stack
        let sink = completionSink(context)
        switch op {
        case .read(let offset, let length, let shape)
        where Int(length) >= Self.heldReadMinimum && Int(length) <= flow.limits.heldBytes:
            let n = Int(length)
            let slot = admit(r, export, bytes: n, held: true)
            device.readHeld(offset: offset, length: n, sparse: shape == .sparse, allocator: ReplyBuffers.allocator) {
                sink.post(slot, .read($0, shape))
            }
        case .read(let offset, let length, .sparse):
            let slot = admit(r, export, bytes: Int(length))
            device.readExtents(offset: offset, length: Int(length), allocator: ReplyBuffers.allocator) {
                sink.post(slot, .extents($0))
            }
        case .read(let offset, let length, let shape):
            let slot = admit(r, export, bytes: Int(length))
            device.read(offset: offset, length: Int(length), allocator: ReplyBuffers.allocator) {
                sink.post(slot, .data($0, shape))
            }
        case .write(let offset, let length, let fua):
            let data = payload ?? ByteBuffer()
            precondition(data.readableBytes == Int(length), "the parser hands over exactly the announced payload")
            let slot = admit(r, export, bytes: Int(length))
            device.write(offset: offset, data: data, fua: fua) { sink.post(slot, .status($0, wrote: Int(length))) }
        case .flush:
            let slot = admit(r, export, bytes: 0)
            device.flush { sink.post(slot, .status($0, wrote: 0)) }
        case .trim(let offset, let length, let fua):
            let slot = admit(r, export, bytes: 0)
            device.trim(offset: offset, length: length) { res in
                guard fua, case .success = res else { return sink.post(slot, .status(res, wrote: 0)) }
                device.flush { sink.post(slot, .status($0, wrote: 0)) }
            }
        case .writeZeroes(let offset, let length, let fua, let mayUnmap):
            let slot = admit(r, export, bytes: 0)
            device.writeZeroes(offset: offset, length: length, mayUnmap: mayUnmap, fua: fua) {
                sink.post(slot, .status($0, wrote: 0))
            }
        case .blockStatus(let offset, let length, let contexts, let reqOne):
            replyBlockStatus(context, r, rules, export, offset, length, contexts, reqOne)
        }
    }

    /// The connection's completion sink, made when its first device request starts.
    private func completionSink(_ context: ChannelHandlerContext) -> CompletionSink {
        if let s = sink { return s }
        let s = CompletionSink(handler: self, context: context)
        sink = s
        return s
    }

    /// Counts a request in flight (against the connection's bounds and the server's budget) and
    /// gives it a slot in the table.
    private func admit(_ r: NBDRequest, _ export: NBDExport, bytes: Int, held: Bool = false) -> Int {
        flow.started(bytes: bytes, held: held)
        budget.take(bytes)
        export.metrics.started()
        return inFlightTable.admit(InFlightRequest(request: r, bytes: bytes, began: .now(), metrics: export.metrics))
    }

    /// Answers the completions that have arrived, then flushes the socket once (coalesced
    /// replies, one wake-up per batch) and reads on if the bounds allow.
    func drain(_ sink: CompletionSink, context: ChannelHandlerContext) {
        batching = true
        while sink.take(into: &completed) {
            batchCapacity = Self.batchBytes(completed)
            // Taken from the end of the reversed batch: each completion is moved out, in
            // arrival order, rather than copied and released.
            completed.reverse()
            while let c = completed.popLast() { complete(c.slot, c.outcome, context) }
        }
        writeBatch(context)
        batching = false
        if needsFlush {
            needsFlush = false
            context.flush()
        }
        afterCompletion(context: context)
    }

    /// Sends the one reply of a request the device has completed.
    private func complete(_ slot: Int, _ outcome: consuming DeviceOutcome, _ context: ChannelHandlerContext) {
        let entry = inFlightTable.remove(slot)
        let r = entry.request
        let metrics = entry.metrics
        flow.finished(bytes: entry.bytes)
        budget.give(entry.bytes)
        metrics.finished(
            ExportMetrics.Op(r.command), nanoseconds: UInt64(clamping: (NIODeadline.now() - entry.began).nanoseconds))
        guard let rules = sessionRules else { preconditionFailure("a request completed before transmission") }
        switch consume outcome {
        case .status(.success, let wrote):
            if wrote > 0 { metrics.wrote(bytes: wrote) }
            succeed(context, r, rules)
        case .data(.success(let data), let shape):
            metrics.read(bytes: data.readableBytes)
            replyData(context: context, request: r, rules: rules, shape: shape, data: data)
        case .extents(.success(let extents)):
            metrics.read(bytes: entry.bytes)
            replyExtents(context: context, request: r, rules: rules, extents: extents)
        case .read(let result, let shape):
            switch result {
            case .success(.held(let h)):
                metrics.read(bytes: entry.bytes)
                return replyHeld(context: context, request: r, rules: rules, shape: shape, held: h)
            case .success(.extents(let extents)):
                metrics.read(bytes: entry.bytes)
                replyExtents(context: context, request: r, rules: rules, extents: extents)
            case .success(.data(let data)):
                metrics.read(bytes: data.readableBytes)
                replyData(context: context, request: r, rules: rules, shape: shape, data: data)
            case .failure(let e): fail(context, r, rules, e.nbdErrno, "\(e)")
            }
            flow.released(held: entry.bytes)
        case .status(.failure(let e), _), .data(.failure(let e), _), .extents(.failure(let e)):
            fail(context, r, rules, e.nbdErrno, "\(e)")
        }
    }

    /// BLOCK_STATUS: answered from the allocation map and the bitmaps, on the event loop.
    private func replyBlockStatus(
        _ context: ChannelHandlerContext, _ r: NBDRequest, _ rules: TransmissionRules, _ export: NBDExport,
        _ offset: UInt64, _ length: UInt64, _ contexts: [NBDMetaContextID], _ reqOne: Bool
    ) {
        guard context.channel.isActive else { return }
        send(context, capacity: 64 * contexts.count) { b in
            for (i, c) in contexts.enumerated() {
                let descriptors = BlockStatusDescriptors.merge(
                    Self.statusRuns(export, c.name, offset, length), offset: offset, length: length,
                    extended: rules.extendedHeaders, reqOne: reqOne)
                rules.replies.blockStatus(
                    r, context: c.id, descriptors: descriptors, done: i == contexts.count - 1, into: &b)
            }
        }
    }

    /// One context's status over [offset, offset+length), as runs that cover it.
    private static func statusRuns(_ export: NBDExport, _ context: String, _ offset: UInt64, _ length: UInt64)
        -> [(start: UInt64, end: UInt64, flags: UInt32)]
    {
        if context == NBDMetaContext.baseAllocation {
            return export.stack.allocationRuns(BlockDevice.down(offset), BlockDevice.up(offset + length))
                .map { ($0.start, $0.end, $0.state.baseAllocationFlags) }
        }
        if context == NBDMetaContext.allocationDepth {
            return export.stack.allocationDepthRuns(BlockDevice.down(offset), BlockDevice.up(offset + length))
                .map { ($0.start, $0.end, $0.value) }
        }
        let name = String(context.dropFirst(NBDMetaContext.dirtyBitmapPrefix.count))
        // A bitmap removed since the client selected it: every block may have changed.
        return export.bitmaps?.runs(name, offset, offset + length) ?? [(offset, offset + length, 1)]
    }

    // MARK: replies
    //
    // During a completion batch the replies are encoded one after another into one buffer
    // (`batchOut`), READ data of up to `copiedReadLimit` bytes copied in after its header, and
    // the batch goes out as one write and one flush: a channel write costs more than copying
    // 4 KiB (Scripts/profile). Larger data goes out as buffers of its own, after what the batch
    // buffer holds, so replies keep their order. Outside a batch a reply is written at once.

    /// READ data up to this size is copied into the batch's buffer.
    static let copiedReadLimit = 8 << 10
    /// The batch's buffer is written out when it holds this much, and a fresh one started.
    static let batchBufferLimit = 256 << 10

    /// Encodes one reply (or part of one): into the batch's buffer, or alone and flushed.
    private func send(_ context: ChannelHandlerContext, capacity: Int, _ encode: (inout ByteBuffer) -> Void) {
        guard batching else {
            var b = context.channel.allocator.buffer(capacity: capacity)
            encode(&b)
            context.writeAndFlush(wrapOutboundOut(b), promise: nil)
            return
        }
        if batchOut == nil { batchOut = ReplyBuffers.allocator.buffer(capacity: max(capacity, batchCapacity)) }
        encode(&batchOut!)
        needsFlush = true
        if batchOut!.readableBytes >= Self.batchBufferLimit { writeBatch(context) }
    }

    /// Writes what the batch's buffer holds: before a reply's own buffers, and at the batch's end.
    private func writeBatch(_ context: ChannelHandlerContext) {
        guard let b = batchOut else { return }
        batchOut = nil
        context.write(wrapOutboundOut(b), promise: nil)
    }

    /// Writes a buffer of READ data that is not copied, after everything before it.
    private func sendUncopied(_ context: ChannelHandlerContext, _ b: ByteBuffer, promise: EventLoopPromise<Void>? = nil)
    {
        writeBatch(context)
        context.write(wrapOutboundOut(b), promise: promise)
        if batching { needsFlush = true } else { context.flush() }
    }

    /// About how many bytes the replies to `batch` take in the batch's buffer.
    private static func batchBytes(_ batch: [CompletionSink.Completed]) -> Int {
        var n = 0
        for c in batch {
            n += 48
            if case .data(.success(let d), _) = c.outcome, d.readableBytes <= copiedReadLimit { n += d.readableBytes }
            if case .extents(.success(let e)) = c.outcome {
                for case .data(_, let d) in e where d.readableBytes <= copiedReadLimit { n += d.readableBytes + 48 }
            }
        }
        return min(n, batchBufferLimit)
    }

    /// Answers a failed request, framed as the session requires (`ReplyEncoder.error`).
    private func fail(
        _ context: ChannelHandlerContext, _ r: NBDRequest, _ rules: TransmissionRules, _ err: NBDErrno,
        _ message: String
    ) {
        attached?.metrics.failed(ExportMetrics.Op(r.command))
        logger.debug(
            "request failed",
            metadata: [
                "type": "\(r.type)", "offset": "\(r.offset)", "length": "\(r.length)", "error": "\(err)",
                "why": "\(message)",
            ])
        guard context.channel.isActive else { return }
        send(context, capacity: 48 + message.utf8.count) { rules.replies.error(r, err, message: message, into: &$0) }
    }

    /// Answers a successful request without data (`ReplyEncoder.success`).
    private func succeed(_ context: ChannelHandlerContext, _ r: NBDRequest, _ rules: TransmissionRules) {
        guard context.channel.isActive else { return }
        send(context, capacity: 32) { rules.replies.success(r, into: &$0) }
    }

    /// A READ's data chunk (or simple reply) at `offset`: its header, then the data, copied after
    /// it when small.
    private func sendData(
        _ context: ChannelHandlerContext, _ r: NBDRequest, _ rules: TransmissionRules, shape: ReadReplyShape,
        offset: UInt64, _ data: ByteBuffer, done: Bool
    ) {
        let n = data.readableBytes
        let copied = n <= Self.copiedReadLimit
        send(context, capacity: 48 + (copied ? n : 0)) { b in
            rules.replies.readData(r, shape: shape, offset: offset, dataLength: n, done: done, into: &b)
            if copied { b.writeImmutableBuffer(data) }
        }
        if !copied { sendUncopied(context, data) }
    }

    /// A sparse READ as OFFSET_DATA and OFFSET_HOLE chunks; the last one carries DONE.
    private func replyExtents(
        context: ChannelHandlerContext, request r: NBDRequest, rules: TransmissionRules, extents: [BlockDevice.Extent]
    ) {
        guard context.channel.isActive else { return }
        guard !extents.isEmpty else { return succeed(context, r, rules) }
        for (i, e) in extents.enumerated() {
            let last = i == extents.count - 1
            switch e {
            case .zero(let o, let n):
                send(context, capacity: 32) { rules.replies.readHole(r, offset: o, length: n, done: last, into: &$0) }
            case .data(let o, let d):
                sendData(context, r, rules, shape: .sparse, offset: o, d, done: last)
            }
        }
    }

    /// A READ's data in one piece: a simple reply, or one OFFSET_DATA chunk with DONE.
    private func replyData(
        context: ChannelHandlerContext, request r: NBDRequest, rules: TransmissionRules, shape: ReadReplyShape,
        data: ByteBuffer
    ) {
        guard context.channel.isActive else { return }
        sendData(context, r, rules, shape: shape, offset: r.offset, data, done: true)
    }

    /// A READ answered from the device's pages: its header, then the lent buffers (one writev
    /// copies them into the socket). The flow releases its held bytes once they are written (or the write failed).
    private func replyHeld(
        context: ChannelHandlerContext, request r: NBDRequest, rules: TransmissionRules, shape: ReadReplyShape,
        held: BlockDevice.HeldRead
    ) {
        let n = held.length
        guard context.channel.isActive else {
            flow.released(held: n)
            return
        }
        send(context, capacity: 48) {
            rules.replies.readData(r, shape: shape, offset: r.offset, dataLength: n, done: true, into: &$0)
        }
        let written = context.eventLoop.makePromise(of: Void.self)
        for (i, b) in held.buffers.enumerated() {
            sendUncopied(context, b, promise: i == held.buffers.count - 1 ? written : nil)
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        written.futureResult.whenComplete { _ in
            let (this, ctx) = bound.value
            if this.flow.released(held: n) { this.afterCompletion(context: ctx) }
        }
    }

    private func afterCompletion(context: ChannelHandlerContext) {
        if case .closing = phase {
            closeWhenDrained(context: context)
            return
        }
        if flow.quiescing {
            if input.readableBytes > 0 { process(context: context) }
            closeWhenFlushed(context: context)
            return
        }
        resumeReading(context)
        // Parsing may have stopped at the in-flight limit with requests still buffered.
        if input.readableBytes > 0 { process(context: context) }
    }

    /// After NBD_CMD_DISC: every request before it is answered, and its reply written, before
    /// the close (NBD spec, "Terminating the transmission phase"). NIO's close drops writes still
    /// queued: a 16 MiB READ sent just before DISC reached a slow reader as 212 KiB and EOF. A
    /// client that does not take its replies within the drain timeout is closed anyway.
    private func closeWhenDrained(context: ChannelHandlerContext) {
        guard context.channel.isActive, flow.beginFlush() else { return }
        armDrainTimer(context, level: .notice) {
            "closing: the client sent NBD_CMD_DISC but had not taken its replies \($0) s later"
        }
        afterRepliesWritten(context) { this, context in
            this.drainTimer?.cancel()
            if context.channel.isActive { context.close(promise: nil) }
        }
    }

    /// Shutdown: the requests already received are served (later ones get NBD_ESHUTDOWN), their
    /// replies are written in full, then the connection closes. NIO's close fails writes still queued, which
    /// cut replies short (issue #31: 19 of 64 MiB, then EOF mid-reply). The flush may free the
    /// connection to parse requests it had received but held back (its replies were at their
    /// bound), so after each flush it looks again. A client that does not take its replies within
    /// the drain timeout (`--shutdown-timeout`) is closed anyway.
    private func closeWhenFlushed(context: ChannelHandlerContext) {
        guard context.channel.isActive, flow.beginFlush() else { return }
        armDrainTimer(context, level: .warning) {
            "closing: the client was still connected \($0) s after the shutdown began, its replies not all taken or its side not closed (--shutdown-timeout)"
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        afterRepliesWritten(context) { this, context in
            this.flow.flushed()
            guard context.channel.isActive else { return }
            let before = this.input.readableBytes
            if before > 0 { this.process(context: context) }
            guard this.flow.inFlight == 0 else { return } // their completions call closeWhenFlushed again
            if this.input.readableBytes == before && before >= TransmissionParser.requestSize {
                // A received request could not be parsed yet: its room (held READ pages, freed as
                // NIO releases the written buffers) is on its way back. Look again shortly.
                let loop = context.eventLoop
                loop.scheduleTask(in: .milliseconds(5)) {
                    let (this, context) = bound.value
                    this.closeWhenFlushed(context: context)
                }
            } else if this.input.readableBytes == before {
                // Nothing more could be parsed: every request received has its reply on the wire.
                // Half-close, so the client reads them all and then EOF; a full close with its
                // unread requests in our socket would send a reset, which can discard replies in
                // its receive queue. What it still sends is read and dropped until it closes (or
                // the drain timer does).
                this.flow.closeOutput()
                let channel = context.channel
                let done = context.eventLoop.makePromise(of: Void.self)
                done.futureResult.whenFailure { _ in channel.close(promise: nil) } // TLS: no half-close
                context.close(mode: .output, promise: done)
                // Then the full close, once what the client had sent is read (channelReadComplete)
                // or soon after if it sent nothing: an idle client must not hold the shutdown.
                this.drainTimer?.cancel()
                this.drainTimer = context.eventLoop.scheduleTask(in: .milliseconds(500)) { channel.close(promise: nil) }
                context.read()
            } else {
                this.closeWhenFlushed(context: context) // answered at once (errors): flush and look again
            }
        }
    }

    /// Closes the connection if it is still open `drainTimeout` after a close began (DISC or
    /// shutdown) and its replies are not all taken; `message` gets the timeout in seconds.
    private func armDrainTimer(
        _ context: ChannelHandlerContext, level: Logger.Level, _ message: @escaping @Sendable (Int64) -> String
    ) {
        guard drainTimer == nil else { return }
        let channel = context.channel
        let logger = self.logger
        let seconds = drainTimeout.nanoseconds / 1_000_000_000
        drainTimer = context.eventLoop.scheduleTask(in: drainTimeout) {
            guard channel.isActive else { return }
            logger.log(level: level, "\(message(seconds))")
            channel.close(promise: nil)
        }
    }

    /// Calls `body` once every reply queued so far has been handed to the socket. A promise on
    /// an empty write is no such signal: NIO completed it while a 16 MiB READ reply queued
    /// before it was still being written, and the half-close that followed cut that reply
    /// short (issue #31's hostile suite, a client reading at 12.5 MiB/s). Shutdown and DISC only:
    /// it looks at the channel's buffered bytes every 5 ms until they are gone.
    private func afterRepliesWritten(
        _ context: ChannelHandlerContext, _ body: @escaping (NBDConnectionHandler, ChannelHandlerContext) -> Void
    ) {
        context.flush()
        let pending = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        if pending == 0 {
            context.eventLoop.execute {
                let (this, context) = bound.value
                body(this, context)
            }
        } else {
            context.eventLoop.scheduleTask(in: .milliseconds(5)) {
                let (this, context) = bound.value
                guard context.channel.isActive else { return body(this, context) }
                this.afterRepliesWritten(context, body)
            }
        }
    }

    // MARK: backpressure and shutdown

    /// What the flow decides with: the socket's writability, the server-wide budget, the
    /// unparsed input. Backpressure: the socket is read only while requests in flight, their
    /// bytes, unparsed input and unsent replies are all bounded (`TransmissionFlow.mayRead`).
    private func surroundings(_ context: ChannelHandlerContext) -> TransmissionFlow.Surroundings {
        TransmissionFlow.Surroundings(
            writable: context.channel.isWritable, budgetSpent: budget.exhausted, unparsed: input.readableBytes)
    }

    func read(context: ChannelHandlerContext) {
        switch flow.readRequested(surroundings(context)) {
        case .read: context.read()
        case .pause: break
        case .waitForBudget: waitForBudget(context)
        }
    }

    /// Stopped by the budget with nothing in flight (no completion will look again): asks the
    /// budget to wake this connection, on its event loop, once it has room.
    private func waitForBudget(_ context: ChannelHandlerContext) {
        guard !waitingForBudget else { return }
        waitingForBudget = true
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        budget.whenAvailable {
            loop.execute {
                let (this, context) = bound.value
                this.waitingForBudget = false
                guard context.channel.isActive else { return }
                this.resumeReading(context) // or wait again: spent again meanwhile
            }
        }
    }

    /// Reads again if reading was paused and the bounds now allow it; a connection still held
    /// back by the budget waits for it.
    private func resumeReading(_ context: ChannelHandlerContext) {
        switch flow.resume(surroundings(context)) {
        case nil, .pause?: break
        case .read?:
            if stallTimer != nil { lastInput = .now() } // its silence so far was the server's doing
            context.read()
        case .waitForBudget?: waitForBudget(context)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            if input.readableBytes > 0 { process(context: context) }
            resumeReading(context)
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent, case .awaitingTLS(let hs, let identity) = phase {
            // Negotiation continues inside TLS, with who the client proved to be.
            let peer = identity()
            logger.debug(
                "TLS handshake completed",
                metadata: ["client-dn": "\(peer.certificateDN ?? "-")", "psk-identity": "\(peer.pskIdentity ?? "-")"])
            phase = .handshake(HandshakeStateMachine(afterTLS: hs, peer: peer))
            if input.readableBytes > 0 { process(context: context) }
        }
        if event is QuiesceEvent {
            flow.quiesce(unparsed: input.readableBytes)
            switch phase {
            case .transmission: closeWhenFlushed(context: context)
            case .handshake(var hs):
                // Options from now on are answered NBD_REP_ERR_SHUTDOWN, to which a client answers
                // NBD_OPT_ABORT; one that sends nothing is closed after a second.
                hs.shuttingDown = true
                phase = .handshake(hs)
                if input.readableBytes > 0 { process(context: context) }
                let channel = context.channel
                context.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
            default: context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if case .awaitingTLS = phase {
            // E.g. --tls-verify-peer and no client certificate, or one ca-cert.pem did not sign.
            logger.notice("closing: TLS handshake failed: \(TLSFailure.describe(error))")
        } else {
            logger.debug("connection error: \(error)")
        }
        context.close(promise: nil)
    }
}

/// Sent to every connection on shutdown: finish what is in flight, then close.
struct QuiesceEvent {}
