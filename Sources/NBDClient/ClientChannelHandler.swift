// The NIO side of the client: buffers what the server sends, serves exact-length reads during
// the handshake, and during transmission feeds NBDReplyParser and completes each request's
// promise by cookie. Every method runs on the channel's event loop.
import Logging
import NBDProtocol
import NIOCore

final class NBDClientHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// One request in flight.
    struct Pending {
        var command: NBDCommand
        var offset: UInt64
        var length: Int
        /// READ data as it arrives (nil until the first OFFSET_DATA or OFFSET_HOLE).
        var data: ByteBuffer?
        var received = 0
        var error: NBDClientError?
        var promise: EventLoopPromise<ByteBuffer?>
    }

    private let logger: Logger
    private var context: ChannelHandlerContext?
    private var input = ByteBuffer()
    private var waiter: (count: Int, promise: EventLoopPromise<ByteBuffer>, during: String)?
    private var transmitting = false
    private var parser = NBDReplyParser()
    private var pending: [UInt64: Pending] = [:]
    private var nextCookie: UInt64 = 1
    private var failure: NBDClientError?
    /// Set by `disconnect`: the close that follows is ours, not the server's.
    private var closing = false

    private let eventLoop: EventLoop

    init(eventLoop: EventLoop, logger: Logger) {
        self.eventLoop = eventLoop
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    // MARK: handshake

    func send(_ bytes: ByteBuffer) -> EventLoopFuture<Void> {
        guard let context, failure == nil else { return failedFuture(failure ?? .closed) }
        return context.writeAndFlush(wrapOutboundOut(bytes))
    }

    /// Exactly `count` bytes, once they have arrived.
    func read(_ count: Int, during: String) -> EventLoopFuture<ByteBuffer> {
        guard let context else { return failedFuture(failure ?? .closed) }
        precondition(waiter == nil && !transmitting, "one handshake read at a time")
        if let b = input.readSlice(length: count) { return context.eventLoop.makeSucceededFuture(b) }
        if let f = failure { return context.eventLoop.makeFailedFuture(f) }
        let p = context.eventLoop.makePromise(of: ByteBuffer.self)
        waiter = (count, p, during)
        return p.futureResult
    }

    /// Negotiation is over: from now on inbound bytes are replies.
    func startTransmission() {
        transmitting = true
        processReplies()
    }

    // MARK: transmission

    func submit(
        _ command: NBDCommand, flags: NBDCommandFlags, offset: UInt64, length: Int, payload: ByteBuffer?,
        promise: EventLoopPromise<ByteBuffer?>
    ) {
        guard let context, failure == nil, !closing else {
            promise.fail(failure ?? .closed)
            return
        }
        let cookie = nextCookie
        nextCookie &+= 1
        pending[cookie] = Pending(command: command, offset: offset, length: length, promise: promise)
        var header = context.channel.allocator.buffer(capacity: 28)
        NBDClientRequest.encode(
            command, flags: flags, cookie: cookie, offset: offset, length: UInt32(length), into: &header)
        context.write(wrapOutboundOut(header), promise: nil)
        if let p = payload { context.write(wrapOutboundOut(p), promise: nil) }
        context.flush()
    }

    /// NBD_CMD_DISC ("Terminating the transmission phase"), then close once the server has
    /// answered everything still in flight.
    func disconnect() -> EventLoopFuture<Void> {
        guard let context else { return eventLoop.makeSucceededVoidFuture() }
        closing = true
        if transmitting && failure == nil {
            var header = context.channel.allocator.buffer(capacity: 28)
            NBDClientRequest.encode(.disc, cookie: 0, offset: 0, length: 0, into: &header)
            context.writeAndFlush(wrapOutboundOut(header), promise: nil)
        }
        let futures = pending.values.map { $0.promise.futureResult }
        let loop = context.eventLoop
        let channel = context.channel
        return EventLoopFuture.whenAllComplete(futures, on: loop).flatMap { _ in channel.close() }.recover { _ in }
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if input.readableBytes == 0 {
            input = incoming
        } else {
            // Copy only the unparsed remainder, never storage that READ results still share.
            var merged = context.channel.allocator.buffer(capacity: input.readableBytes + incoming.readableBytes)
            merged.writeBuffer(&input)
            merged.writeBuffer(&incoming)
            input = merged
        }
        if transmitting {
            processReplies()
        } else if let w = waiter, let b = input.readSlice(length: w.count) {
            waiter = nil
            w.promise.succeed(b)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        let phase = transmitting ? "transmission" : (waiter?.during ?? "negotiation")
        fail(closing ? .closed : .serverClosed(during: phase))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("connection error: \(error)")
        fail(.serverClosed(during: "\(transmitting ? "transmission" : "negotiation") (\(error))"))
        context.close(promise: nil)
    }

    private func processReplies() {
        do {
            while let chunk = try parser.next(
                &input,
                dataLength: { cookie in
                    pending[cookie].map { $0.command == .read ? $0.length : 0 }
                })
            {
                handle(chunk)
                if failure != nil { return }
            }
        } catch {
            fail(.replies(error))
            context?.close(promise: nil)
        }
    }

    private func handle(_ chunk: NBDReplyChunk) {
        let cookie = chunk.cookie
        guard var p = pending[cookie] else { return }
        let name = p.command.specName
        switch chunk {
        case .simple(_, let error, let data):
            if error != 0 {
                p.error = .commandFailed(
                    command: name, offset: p.offset, length: UInt64(p.length), errno: error, message: "")
            } else if p.command == .read {
                p.data = data
                p.received = data?.readableBytes ?? 0
            }
        case .structured(_, _, let payload):
            switch payload {
            case .none:
                break
            case .offsetData(let off, let data):
                place(&p, at: off, length: data.readableBytes, data: data)
            case .offsetHole(let off, let n):
                place(&p, at: off, length: Int(n), data: nil)
            case .blockStatus:
                break // this client never asks for block status
            case .error(let code, let message, _):
                if p.error == nil {
                    p.error = .commandFailed(
                        command: name, offset: p.offset, length: UInt64(p.length), errno: code, message: message)
                }
            case .unknown(let type):
                p.error = p.error ?? .protocolViolation("unknown reply chunk type \(type) for \(name)")
            }
        }
        guard chunk.isFinal else {
            pending[cookie] = p
            return
        }
        pending.removeValue(forKey: cookie)
        if p.error == nil && p.command == .read && p.received != p.length {
            p.error = .incompleteRead(offset: p.offset, length: UInt64(p.length), got: UInt64(p.received))
        }
        if let e = p.error {
            p.promise.fail(e)
        } else if p.command == .read {
            p.promise.succeed(p.data ?? zeroes(p.length))
        } else {
            p.promise.succeed(nil)
        }
    }

    /// Puts OFFSET_DATA (or, with nil data, OFFSET_HOLE) into the READ's result. A single chunk
    /// covering the whole request is used as it is; otherwise the result starts as zeroes.
    private func place(_ p: inout Pending, at offset: UInt64, length n: Int, data: ByteBuffer?) {
        guard p.command == .read, offset >= p.offset, offset - p.offset <= UInt64(p.length),
            UInt64(n) <= UInt64(p.length) - (offset - p.offset)
        else {
            p.error =
                p.error
                ?? .protocolViolation("a read chunk at \(offset)+\(n) lies outside the request \(p.offset)+\(p.length)")
            return
        }
        let rel = Int(offset - p.offset)
        p.received += n
        guard p.received <= p.length else {
            p.error =
                p.error
                ?? .protocolViolation("read chunks overlap (\(p.received) bytes for a \(p.length)-byte request)")
            return
        }
        if p.data == nil {
            if let d = data, rel == 0, n == p.length {
                p.data = d
                return
            }
            p.data = zeroes(p.length)
        }
        if let d = data {
            let at = p.data!.readerIndex + rel
            p.data!.setBuffer(d, at: at)
        }
    }

    private func zeroes(_ n: Int) -> ByteBuffer {
        var b = context?.channel.allocator.buffer(capacity: n) ?? ByteBuffer()
        b.writeRepeatingByte(0, count: n)
        return b
    }

    private func fail(_ error: NBDClientError) {
        if failure == nil { failure = error }
        if let w = waiter {
            waiter = nil
            w.promise.fail(failure!)
        }
        let all = pending
        pending.removeAll()
        for p in all.values { p.promise.fail(failure!) }
    }

    private func failedFuture<T>(_ e: NBDClientError) -> EventLoopFuture<T> {
        eventLoop.makeFailedFuture(e)
    }
}

extension NBDCommand {
    /// The spec's name, e.g. NBD_CMD_WRITE_ZEROES.
    public var specName: String {
        switch self {
        case .read: return "NBD_CMD_READ"
        case .write: return "NBD_CMD_WRITE"
        case .disc: return "NBD_CMD_DISC"
        case .flush: return "NBD_CMD_FLUSH"
        case .trim: return "NBD_CMD_TRIM"
        case .cache: return "NBD_CMD_CACHE"
        case .writeZeroes: return "NBD_CMD_WRITE_ZEROES"
        case .blockStatus: return "NBD_CMD_BLOCK_STATUS"
        case .resize: return "NBD_CMD_RESIZE"
        }
    }
}
