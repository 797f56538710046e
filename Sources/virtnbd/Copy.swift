// `virtnbd copy SRC DST`: a local file (or - for stdin/stdout) to an export or back, with
// several requests in flight through NBDClient.
import ArgumentParser
import Foundation
import Logging
import NBDClient
import NBDProtocol
import NIOCore

struct Copy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy between a local file and an NBD export.",
        discussion: """
            One side is an NBD URI (nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH), the other a \
            local path, or - for stdin/stdout. Writing to an export ends with NBD_CMD_FLUSH; all-zero blocks become \
            NBD_CMD_WRITE_ZEROES. Reading into a regular file leaves all-zero blocks as holes.
            """)

    @Argument(help: "Source: a file, - (stdin) or an NBD URI.") var source: String
    @Argument(help: "Destination: a file, - (stdout) or an NBD URI.") var destination: String
    @Option(name: .long, help: "Requests in flight at once.") var requests: Int = 16
    @Option(name: .long, help: "Bytes per request (e.g. 256K).") var requestSize: ByteSize = ByteSize(argument: "256K")!
    @Option(name: .long, help: "Seconds to wait for the connection and, again, for the handshake (0 = forever).")
    var timeout: Double = 10
    @Flag(name: .long, help: "Never draw the progress bar (it is drawn only when stderr is a terminal).")
    var noProgress = false
    @Flag(name: [.short, .long], help: "Debug logging on stderr.") var verbose = false

    func validate() throws {
        let s = NBDURI.looksLikeURI(source)
        let d = NBDURI.looksLikeURI(destination)
        guard s != d else {
            throw ValidationError(
                s
                    ? "both SRC and DST are NBD URIs; one side must be a local file (or -)"
                    : "neither SRC nor DST is an NBD URI (nbd://… or nbd+unix://…); one side must be an export")
        }
        try checkTimeout(timeout)
        guard (1...1024).contains(requests) else { throw ValidationError("--requests must be between 1 and 1024") }
        guard requestSize.bytes <= 32 << 20 else { throw ValidationError("--request-size must be at most 32M") }
    }

    func run() async throws {
        let logger = bootstrapToolLogging(verbose: verbose)
        let toExport = NBDURI.looksLikeURI(destination)
        do {
            let uri: NBDURI
            do { uri = try NBDURI(parsing: toExport ? destination : source) } catch {
                throw NBDClientError.badURI(error)
            }
            let client = try await NBDClient.connect(to: uri, timeout: timeAmount(timeout), logger: logger)
            let progress = ProgressBar(enabled: !noProgress && isatty(2) == 1)
            do {
                let chunk = max(1, min(Int(requestSize.bytes), client.maximumPayload))
                if toExport {
                    try await upload(to: client, chunk: chunk, progress: progress, logger: logger)
                } else {
                    try await download(from: client, chunk: chunk, progress: progress)
                }
                progress.finish()
                await client.disconnect()
            } catch {
                progress.abandon()
                await client.disconnect()
                throw error
            }
        } catch {
            throw toolFailure("copy", error)
        }
    }

    /// Export → file: reads in order, `requests` in flight, written in order.
    func download(from client: NBDClient, chunk: Int, progress: ProgressBar) async throws {
        let out = try LocalFile(writing: destination)
        let size = client.size
        progress.start(total: size)
        var window: [(offset: UInt64, future: EventLoopFuture<ByteBuffer>)] = []
        var head = 0
        var next: UInt64 = 0
        while head < window.count || next < size {
            while window.count - head < requests && next < size {
                let n = Int(min(UInt64(chunk), size - next))
                window.append((next, client.submitRead(offset: next, length: n)))
                next += UInt64(n)
            }
            let (offset, f) = window[head]
            head += 1
            let data = try await f.get()
            try out.write(data, at: offset)
            progress.advance(UInt64(data.readableBytes))
            if head > 256 {
                window.removeFirst(head)
                head = 0
            }
        }
        try out.finish(size: size)
    }

    /// File → export: `requests` writes in flight, all-zero blocks as WRITE_ZEROES, then FLUSH.
    func upload(to client: NBDClient, chunk: Int, progress: ProgressBar, logger: Logger) async throws {
        guard !client.flags.contains(.readOnly) else { throw NBDClientError.readOnly }
        let input = try LocalFile(reading: source)
        let size = client.size
        if let n = input.size, n > size { throw CopyError.sourceTooLarge(source: n, export: size) }
        progress.start(total: input.size ?? size)
        let canZero = client.flags.contains(.sendWriteZeroes)
        var window: [EventLoopFuture<Void>] = []
        var head = 0
        var offset: UInt64 = 0
        while true {
            if offset == size {
                if try input.read(1) != nil { throw CopyError.sourceTooLarge(source: nil, export: size) }
                break
            }
            guard let d = try input.read(Int(min(UInt64(chunk), size - offset))) else { break }
            let n = d.readableBytes
            if canZero && d.readableBytesView.allSatisfy({ $0 == 0 }) {
                window.append(client.submitZero(offset: offset, length: n))
            } else {
                window.append(client.submitWrite(offset: offset, data: d))
            }
            offset += UInt64(n)
            if window.count - head >= requests {
                try await window[head].get()
                head += 1
                progress.advance(UInt64(n))
            }
            if head > 256 {
                window.removeFirst(head)
                head = 0
            }
        }
        for f in window[head...] { try await f.get() }
        progress.set(offset)
        if client.flags.contains(.sendFlush) { try await client.flush() }
        logger.debug("copied \(offset) bytes to \(client.uri)")
    }
}

enum CopyError: Error, CustomStringConvertible {
    case cannotOpen(String, reason: String)
    case io(String, reason: String)
    case sourceTooLarge(source: UInt64?, export: UInt64)

    var description: String {
        switch self {
        case .cannotOpen(let p, let r): return "cannot open \(p): \(r)"
        case .io(let p, let r): return "\(p): \(r)"
        case .sourceTooLarge(let s, let e):
            return
                "the source is \(s.map { "\($0) bytes" } ?? "larger than the export"), the export only \(e) bytes; use a larger export (e.g. virtnbd --size) or a smaller source"
        }
    }
}

extension ByteSize: CustomStringConvertible {
    var description: String { humanSize(bytes) }
}
