// `virtnbd bitmap list|add|remove|clear`: talks to a running server's control socket
// (`virtnbd --control PATH`). The socket's protocol is in Control.swift and docs/backup.md.
// `virtnbd bitmap list --file IMAGE` reads IMAGE.bitmaps with no server (offline backup).
import ArgumentParser
import BlockLayer
import Foundation
import NIOCore
import NIOPosix

struct BitmapCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "List, add, remove or clear a running server's dirty bitmaps (checkpoints for incremental backup).",
        discussion: """
            clear NAME starts a new checkpoint: the blocks written since the last one are dropped, or, \
            with --freeze-as OLD, kept in a new frozen bitmap OLD for a backup to read as \
            qemu:dirty-bitmap:OLD. It answers once every write begun before it has finished. \
            list --file IMAGE needs no server: it reads IMAGE.bitmaps as it is (changing nothing) and says \
            whether each bitmap is consistent. A bitmap left open by a server when the host went down \
            is not: a server that opens it will mark it all dirty. Serve the stopped disk with \
            `virtnbd -r --file IMAGE` to read its bitmaps as qemu:dirty-bitmap:NAME.
            """)

    enum Action: String, ExpressibleByArgument, CaseIterable { case list, add, remove, clear }

    @Argument(help: "list, add, remove or clear.") var action: Action
    @Argument(help: "The bitmap (not for list).") var name: String?
    @Option(name: .long, help: ArgumentHelp("The server's control socket (its --control).", valueName: "path"))
    var control: String?
    @Option(
        name: .long,
        help: ArgumentHelp("list: read IMAGE.bitmaps of a stopped file export, no server.", valueName: "image"))
    var file: String?
    @Option(name: [.short, .long], help: "The export (needed when the server has several).") var export: String?
    @Option(
        name: .long, parsing: .unconditional, help: "add: bytes per bit, 4K to 2G (default 64K).",
        transform: ByteSize.parse) var granularity: ByteSize?
    @Option(name: .long, help: ArgumentHelp("clear: keep the old bits as frozen bitmap OLD.", valueName: "old"))
    var freezeAs: String?
    @Flag(name: .long, help: "Print the server's JSON reply.") var json = false

    func validate() throws {
        if control == nil && file == nil {
            throw ValidationError("give --control PATH (a running server) or --file IMAGE")
        }
        if control != nil && file != nil { throw ValidationError("give --control or --file, not both") }
        if file != nil && action != .list {
            throw ValidationError("--file only lists; change bitmaps through --control")
        }
        if file != nil && export != nil { throw ValidationError("--export is for --control") }
        if action == .list, name != nil { throw ValidationError("list takes no bitmap name") }
        if action != .list, name == nil { throw ValidationError("\(action.rawValue) needs a bitmap name") }
        if granularity != nil, action != .add { throw ValidationError("--granularity is for add") }
        if freezeAs != nil, action != .clear { throw ValidationError("--freeze-as is for clear") }
        if let g = granularity?.bytes,
            DirtyBitmap.minimumGranularity > g || g > DirtyBitmap.maximumGranularity
                || g.nonzeroBitCount != 1
        {
            throw ValidationError("--granularity must be a power of two from 4K to 2G, e.g. 64K")
        }
    }

    func run() async throws {
        if let image = file { return try listFile(image) }
        guard let control else { throw ExitCode(2) }
        let request = ControlRequest(
            command: action.rawValue, export: export, bitmap: name, granularity: granularity?.bytes, freeze: freezeAs)
        let reply: ControlReply
        do { reply = try await Self.send(request, to: control) } catch {
            Console.err(
                "virtnbd bitmap: cannot reach the control socket \(control): \(error); is virtnbd running with --control \(control)?\n"
            )
            throw ExitCode(1)
        }
        if json {
            var d = try ControlReply.encoder.encode(reply)
            d.append(UInt8(ascii: "\n"))
            Console.out(d)
        }
        guard reply.ok else {
            Console.err("virtnbd bitmap: \(reply.error ?? "failed")\n")
            throw ExitCode(1)
        }
        if !json, action == .list {
            var out = ""
            for b in reply.bitmaps ?? [] {
                out +=
                    "\(b.name)\t\(b.frozen ? "frozen" : "active")\tgranularity=\(b.granularity)\tdirty=\(b.dirtyBytes)"
                out += b.persistent ? "\tpersistent\n" : "\n"
            }
            Console.out(out)
        }
    }

    /// `list --file IMAGE`: the bitmap file as it is, with whether each bitmap can be trusted.
    func listFile(_ image: String) throws {
        guard FileManager.default.fileExists(atPath: image) else {
            Console.err("virtnbd bitmap: \(image) does not exist; give the image a --file export serves\n")
            throw ExitCode(1)
        }
        let path = image + ".bitmaps"
        let report: BitmapFileReport?
        do { report = try DirtyBitmaps.inspect(file: path) } catch {
            Console.err("virtnbd bitmap: \(error)\n")
            throw ExitCode(1)
        }
        guard let report else {
            Console.err("virtnbd bitmap: \(image) has no dirty bitmaps (no \(path))\n")
            return
        }
        if json {
            var d = try ControlReply.encoder.encode(report)
            d.append(UInt8(ascii: "\n"))
            Console.out(d)
            return
        }
        var out = ""
        for b in report.bitmaps {
            out += "\(b.info.name)\t\(b.info.frozen ? "frozen" : "active")\tgranularity=\(b.info.granularity)"
            out += "\tdirty=\(b.info.dirtyBytes)\t\(b.consistent ? "consistent" : "inconsistent")\n"
        }
        Console.out(out)
        if report.state == .openOnAnotherBoot {
            Console.err(
                "virtnbd bitmap: \(path) was left open when the host went down: its active bitmaps may miss writes; a server that opens it marks them all dirty (the next backup from them is a full one)\n"
            )
        }
    }

    /// One request, one reply line.
    static func send(_ request: ControlRequest, to path: String) async throws -> ControlReply {
        let group = MultiThreadedEventLoopGroup.singleton
        let promise = group.next().makePromise(of: ByteBuffer.self)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(LineReader(promise)) }
            }
            .connect(unixDomainSocketPath: path).get()
        var line = try JSONEncoder().encode(request)
        line.append(UInt8(ascii: "\n"))
        var b = channel.allocator.buffer(capacity: line.count)
        b.writeBytes(line)
        try await channel.writeAndFlush(b)
        let answer = try await promise.futureResult.get()
        try? await channel.close()
        return try JSONDecoder().decode(ControlReply.self, from: Data(answer.readableBytesView))
    }

    private final class LineReader: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        private var buffer = ByteBuffer()
        private let promise: EventLoopPromise<ByteBuffer>
        private var answered = false
        init(_ p: EventLoopPromise<ByteBuffer>) { promise = p }

        private func complete(_ r: Result<ByteBuffer, Error>) {
            guard !answered else { return }
            answered = true
            promise.completeWith(r)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            buffer.writeBuffer(&b)
            if let nl = buffer.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) {
                complete(.success(buffer.getSlice(at: buffer.readerIndex, length: nl - buffer.readerIndex)!))
            }
        }
        func channelInactive(context: ChannelHandlerContext) {
            complete(.failure(ControlError("the server closed the connection without an answer")))
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            complete(.failure(error))
            context.close(promise: nil)
        }
    }
}
