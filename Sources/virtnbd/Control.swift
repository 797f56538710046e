// The control socket (`--control PATH`): checkpoints and bitmap changes while clients stay
// connected. A Unix socket only, mode 0600 (bound under a temporary name, restricted, then
// renamed into place, so it is never reachable with wider permissions).
//
// Protocol: one JSON object per line each way. Requests:
//   {"command":"list", "export":"NAME"}
//   {"command":"add", "bitmap":"B", "granularity":65536}
//   {"command":"remove", "bitmap":"B"}
//   {"command":"clear", "bitmap":"B", "freeze":"OLD"}      "freeze" is optional
// "export" may be left out when the server has one export. Replies:
//   {"ok":true, "bitmaps":[{"name":…, "granularity":…, "frozen":…, "dirtyBytes":…, "persistent":…}]}
//   {"ok":false, "error":"what went wrong and what to do"}
// A clear answers once every write begun before it has finished (docs/backup.md). A line over
// 64 KiB, or input that ends without a newline, is answered with an error and the connection
// closed; any other bad request is answered with an error and the connection stays open.
import BlockLayer
import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix

struct ControlRequest: Codable, Equatable {
    var command: String
    var export: String?
    var bitmap: String?
    var granularity: UInt64?
    var freeze: String?
}

struct ControlReply: Codable, Equatable {
    var ok: Bool
    var error: String?
    var bitmaps: [BitmapInfo]?

    static func failure(_ why: String) -> ControlReply { ControlReply(ok: false, error: why) }

    /// Keys in a stable order, so that replies compare as text.
    static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }
}

final class ControlServer: Sendable {
    static let maxLine = 64 << 10
    private let channel: Channel
    let path: String

    private let claim: UnixSocketClaim?

    private init(channel: Channel, path: String, claim: UnixSocketClaim?) {
        self.channel = channel
        self.path = path
        self.claim = claim
    }

    static func start(
        path: String, group: EventLoopGroup, exports: @escaping @Sendable () -> [NBDExport], logger: Logger
    ) async throws -> ControlServer {
        // Nothing there, or a stale socket of an earlier run; never a file or a live server's socket.
        do { try await UnixSocketPath.prepare(path, group: group) } catch {
            throw ControlError("\(error); choose another --control path")
        }
        let temporary = path + ".\(getpid()).tmp"
        unlink(temporary)
        var clog = logger
        clog[metadataKey: "component"] = "control"
        let log = clog
        let channel = try await ServerBootstrap(group: group)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ControlHandler(exports: exports, logger: log))
                }
            }
            .bind(unixDomainSocketPath: temporary).get()
        guard chmod(temporary, 0o600) == 0, rename(temporary, path) == 0 else {
            let why = String(cString: strerror(errno))
            try? await channel.close()
            unlink(temporary)
            throw ControlError("cannot restrict and place the socket: \(why)")
        }
        logger.info("control socket at \(path) (virtnbd bitmap … --control \(path))")
        return ControlServer(channel: channel, path: path, claim: UnixSocketClaim(boundAt: path))
    }

    /// Stops listening; removes the socket file if the path still holds ours.
    func close() async {
        try? await channel.close()
        claim?.release()
    }

    /// Runs one request; `reply` is called once (a clear calls it when the clear completes).
    static func execute(
        _ r: ControlRequest, exports all: [NBDExport], _ reply: @escaping @Sendable (ControlReply) -> Void
    ) {
        let export: NBDExport
        if let name = r.export {
            guard let e = all.first(where: { $0.info.name == name }) else {
                return reply(.failure("no export named \"\(name)\"; the server has: \(names(all))"))
            }
            export = e
        } else {
            guard all.count == 1 else {
                return reply(.failure("the server has \(all.count) exports (\(names(all))); say which with --export"))
            }
            export = all[0]
        }
        guard let bitmaps = export.bitmaps else {
            return reply(
                .failure(
                    "export \"\(export.info.name)\" keeps no bitmaps; serve it with --bitmap NAME or --control"))
        }
        func named() -> String? {
            guard let b = r.bitmap else {
                reply(.failure("\"\(r.command)\" needs a bitmap name (\"bitmap\")"))
                return nil
            }
            return b
        }
        let done: @Sendable (Result<Void, BitmapError>) -> Void = { result in
            switch result {
            case .success: reply(ControlReply(ok: true, bitmaps: bitmaps.list()))
            case .failure(let e): reply(.failure("\(e)"))
            }
        }
        switch r.command {
        case "list":
            reply(ControlReply(ok: true, bitmaps: bitmaps.list()))
        case "add":
            guard let b = named() else { return }
            done(
                Result { () throws(BitmapError) in
                    try bitmaps.add(b, granularity: r.granularity ?? DirtyBitmaps.defaultGranularity)
                })
        case "remove":
            guard let b = named() else { return }
            done(Result { () throws(BitmapError) in try bitmaps.remove(b) })
        case "clear":
            guard let b = named() else { return }
            bitmaps.clear(b, freezing: r.freeze, done)
        default:
            reply(.failure("unknown command \"\(r.command.prefix(64))\"; use list, add, remove or clear"))
        }
    }

    private static func names(_ all: [NBDExport]) -> String {
        all.map { "\"\($0.info.name)\"" }.joined(separator: ", ")
    }
}

struct ControlError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// One control connection: lines in, one reply line per request, in order.
final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private var input = ByteBuffer()
    private let exports: @Sendable () -> [NBDExport]
    private let logger: Logger
    /// A request is running (a clear may wait): further lines wait their turn.
    private var busy = false
    private var closing = false
    /// The client half-closed: once every complete line is answered, the connection closes.
    private var inputClosed = false

    init(exports: @escaping @Sendable () -> [NBDExport], logger: Logger) {
        self.exports = exports
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        input.writeBuffer(&b)
        next(context)
    }

    private func next(_ context: ChannelHandlerContext) {
        guard !busy, !closing else { return }
        guard let nl = input.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if inputClosed {
                // Every complete request is answered; what is left has no newline.
                if input.readableBytes > 0 {
                    finish(context, .failure("truncated request (no newline before the end of input)"))
                } else {
                    closing = true
                    context.close(promise: nil)
                }
            } else if input.readableBytes > ControlServer.maxLine {
                finish(
                    context,
                    .failure("request longer than \(ControlServer.maxLine) bytes; send one JSON object per line"))
            }
            return
        }
        let line = input.readSlice(length: nl - input.readerIndex)!
        input.moveReaderIndex(forwardBy: 1)
        guard line.readableBytes <= ControlServer.maxLine else {
            return finish(
                context,
                .failure("request longer than \(ControlServer.maxLine) bytes; send one JSON object per line"))
        }
        let request: ControlRequest
        do { request = try JSONDecoder().decode(ControlRequest.self, from: Data(line.readableBytesView)) } catch {
            send(
                context,
                .failure(
                    "malformed request (\(Self.reason(error))); send one JSON object per line, e.g. {\"command\":\"list\"}"
                ))
            return next(context)
        }
        logger.debug(
            "control request", metadata: ["command": "\(request.command)", "bitmap": "\(request.bitmap ?? "-")"])
        busy = true
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let loop = context.eventLoop
        ControlServer.execute(request, exports: exports()) { reply in
            loop.execute {
                let (this, ctx) = bound.value
                this.busy = false
                this.send(ctx, reply)
                this.next(ctx)
            }
        }
    }

    private static func reason(_ e: Error) -> String {
        switch e {
        case DecodingError.keyNotFound(let k, _): return "no \"\(k.stringValue)\""
        case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
            return "wrong type at \(c.codingPath.map(\.stringValue).joined(separator: "."))"
        default: return "not JSON"
        }
    }

    private func send(_ context: ChannelHandlerContext, _ reply: ControlReply) {
        guard context.channel.isActive, var data = try? ControlReply.encoder.encode(reply) else { return }
        data.append(UInt8(ascii: "\n"))
        var b = context.channel.allocator.buffer(capacity: data.count)
        b.writeBytes(data)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
    }

    private func finish(_ context: ChannelHandlerContext, _ reply: ControlReply) {
        closing = true
        send(context, reply)
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            // The client finished sending: answer what is complete (a running request first),
            // then a truncated rest, then close.
            inputClosed = true
            next(context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("control connection error: \(error)")
        context.close(promise: nil)
    }
}
