// NBDConnectionHandler on NIO's EmbeddedChannel (as swift-nio-ssh tests its handlers): bytes in,
// bytes out, no sockets and no threads of the test's own. The export is TestSupport's
// SynchronousDevice: the real device stack, run inline, so a request's device I/O has completed
// by the time the handler has parsed it, and its reply is written when the test runs the
// EmbeddedEventLoop (`pump`). So READ, WRITE, FLUSH, FUA, pipelining, DISC and backpressure are
// driven here through the real handler, deterministically, as well as the requests answered
// without device I/O (refusals, zero-length requests, BLOCK_STATUS).
import Logging
import NIOCore
import NIOEmbedded
import TestSupport
import VirtioBlock
import XCTest

@testable import NBDServer

final class HandlerTests: XCTestCase {
    var disk: SynchronousDevice!
    var channel: EmbeddedChannel!
    var reader: ReplyReader!
    /// The length of each READ sent, by cookie (a simple reply's data length).
    var readLengths: [UInt64: Int] = [:]
    static let size: UInt64 = 4 << 20

    override func setUpWithError() throws {
        disk = try SynchronousDevice(size: Self.size)
        channel = try Self.connect(disk)
    }

    override func tearDownWithError() throws {
        // Finishing drops what the channel still holds, READ pages included, before the drain.
        _ = try? channel.finish(acceptAlreadyClosed: true)
        channel = nil
        reader = nil
        disk.shutdown()
    }

    /// A connection to one export, "disk", on `disk`; `front` handlers sit between the handler
    /// and the channel's head (the socket side).
    static func connect(_ disk: SynchronousDevice, front: [ChannelHandler] = []) throws -> EmbeddedChannel {
        let export = NBDExport(name: "disk", description: "", device: disk.device)
        var log = Logger(label: "test.handler")
        log.logLevel = .critical
        let handler = NBDConnectionHandler(
            directory: ExportDirectory([export]), id: 1, handshakeTimeout: .seconds(60),
            tls: .off, logger: log)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers(front + [handler])
        // connect() makes the channel active (channelActive sends the greeting).
        try channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        return channel
    }

    func send(_ bytes: [UInt8]) throws {
        try channel.writeInbound(ByteBuffer(bytes: bytes))
    }

    /// Everything the handler has written so far.
    func sent() throws -> [UInt8] {
        var out: [UInt8] = []
        while let b = try channel.readOutbound(as: ByteBuffer.self) { out += Array(b.readableBytesView) }
        return out
    }

    /// Runs what the completions scheduled on the event loop and parses what was written, until
    /// nothing more is (taking the replies frees the READ pages they held, which may let
    /// requests waiting for pages run).
    func pump() throws -> [ReplyReader.Reply] {
        var out: [ReplyReader.Reply] = []
        while true {
            channel.embeddedEventLoop.run()
            let bytes = try sent()
            if bytes.isEmpty { return out }
            out += try reader.feed(bytes)
        }
    }

    /// A new connection (the old one finished), on a new device if `ioPages` is given.
    func reconnect(ioPages: Int? = nil, front: [ChannelHandler] = []) throws {
        _ = try? channel.finish(acceptAlreadyClosed: true)
        if let n = ioPages {
            disk.shutdown()
            disk = try SynchronousDevice(size: Self.size, ioPages: n)
        }
        readLengths = [:]
        channel = try Self.connect(disk, front: front)
    }

    /// Greeting, then fixed newstyle, the given options (STRUCTURED_REPLY = 8, SET_META_CONTEXT
    /// = 10 for base:allocation, EXTENDED_HEADERS = 11) and GO; the option replies are dropped.
    func negotiate(_ options: [UInt32]) throws {
        XCTAssertEqual(Array(try sent().prefix(8)), Array("NBDMAGIC".utf8))
        var w = Wire()
        w.u32(3)
        for o in options {
            var data = Wire()
            if o == 10 {
                data.u32(4)
                data.str("disk")
                data.u32(1)
                data.u32(15)
                data.str("base:allocation")
            }
            w.u64(0x4948_4156_454F_5054)
            w.u32(o)
            w.u32(UInt32(data.bytes.count))
            w.raw(data.bytes)
        }
        var go = Wire()
        go.u32(4)
        go.str("disk")
        go.u16(0)
        w.u64(0x4948_4156_454F_5054)
        w.u32(7)
        w.u32(UInt32(go.bytes.count))
        w.raw(go.bytes)
        try send(w.bytes)
        let replies = try sent()
        // The last option reply is GO's ACK: magic, option 7, type 1, length 0.
        var tail = WireReader(Array(replies.suffix(20)))
        XCTAssertEqual(tail.u64(), 0x3_e889_0455_65a9)
        XCTAssertEqual(tail.u32(), 7)
        XCTAssertEqual(tail.u32(), 1)
        let framing: ReplyReader.Framing =
            options.contains(11) ? .extended : options.contains(8) ? .structured : .simple
        reader = ReplyReader(framing: framing) { [unowned self] in self.readLengths[$0] }
    }

    func request(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
        RawClient.request(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
    }

    /// A request framed for the negotiated headers; a READ's length is noted for its simple reply.
    func req(
        _ type: UInt16, cookie: UInt64, offset: UInt64 = 0, length: Int = 0, flags: UInt16 = 0, payload: [UInt8] = []
    ) -> [UInt8] {
        if type == 0 { readLengths[cookie] = length }
        if reader.framing == .extended {
            // A WRITE's payload is announced with NBD_CMD_FLAG_PAYLOAD_LEN (0x20).
            return extendedRequest(
                flags: type == 1 ? flags | 0x20 : flags, type: type, cookie: cookie, offset: offset,
                length: UInt64(length), payload: payload)
        }
        return request(flags: flags, type: type, cookie: cookie, offset: offset, length: UInt32(length)) + payload
    }

    /// Each reply by cookie; fails on a cookie answered twice.
    func byCookie(
        _ replies: [ReplyReader.Reply], file: StaticString = #filePath, line: UInt = #line
    ) -> [UInt64: ReplyReader.Reply] {
        var out: [UInt64: ReplyReader.Reply] = [:]
        for r in replies {
            XCTAssertNil(out[r.cookie], "cookie \(r.cookie) answered twice", file: file, line: line)
            out[r.cookie] = r
        }
        return out
    }

    /// What a device read of [offset, offset+length) returns, straight from the block device
    /// (synchronous: it has completed when `read` returns).
    func deviceBytes(_ offset: UInt64, _ length: Int) throws -> [UInt8] {
        final class Box: @unchecked Sendable { var r: Result<ByteBuffer, BlkError>? }
        let got = Box()
        disk.device.read(offset: offset, length: length) { got.r = $0 }
        guard let r = got.r else {
            XCTFail("the synchronous device did not complete a READ inline")
            return []
        }
        return Array(try r.get().readableBytesView)
    }

    // MARK: device I/O through the handler

    /// WRITE then READ back, byte for byte: aligned, unaligned (read-modify-write in the block
    /// layer), and multi-page READs of 64 KiB and 1 MiB (held reads: lent from the device's pages).
    func roundTrip(_ options: [UInt32], _ name: String) throws {
        try negotiate(options)
        var rng = TestSeed.generator(name)
        var model = DiskModel(size: Int(Self.size))
        let writes: [(UInt64, Int)] = [(0, 1 << 20), (8192, 4096), (100, 5000), (3 << 20, 65536 + 17)]
        var cookie: UInt64 = 1
        for (off, n) in writes {
            let data = rng.bytes(n)
            model.write(data, at: off)
            try send(req(1, cookie: cookie, offset: off, length: n, payload: data))
            let replies = try pump()
            XCTAssertEqual(replies.map(\.cookie), [cookie], "one reply to the WRITE at \(off)")
            XCTAssertEqual(replies.first?.error, 0)
            XCTAssertEqual(replies.first?.chunkTypes.last.map { [0].contains($0) } ?? true, true)
            cookie += 1
        }
        let reads: [(UInt64, Int)] = [
            (0, 4096), (8192, 4096), (100, 5000), (0, 64 << 10), (0, 1 << 20), (3 << 20, 65536 + 17), (4095, 3),
            (Self.size - 512, 512),
        ]
        for (off, n) in reads {
            try send(req(0, cookie: cookie, offset: off, length: n))
            let replies = try pump()
            XCTAssertEqual(replies.map(\.cookie), [cookie], "one reply to the READ \(off)+\(n)")
            guard let r = replies.first else { continue }
            XCTAssertEqual(r.error, 0)
            XCTAssertEqual(r.simple, reader.framing == .simple)
            if let got = r.readBytes(offset: off, length: n) {
                assertBytes(got, model.read(n, at: off), "READ \(off)+\(n) \(options)")
            } else {
                XCTFail("READ \(off)+\(n): the reply does not cover the range once: \(r.chunkTypes)")
            }
            cookie += 1
        }
        assertBytes(try deviceBytes(0, Int(Self.size)), model.bytes, "the device after the writes")
        XCTAssertEqual(reader.pendingBytes, 0)
        XCTAssertEqual(disk.inFlight, 0)
    }

    func testWriteReadRoundTripSimpleReplies() throws { try roundTrip([], #function) }
    func testWriteReadRoundTripStructuredReplies() throws { try roundTrip([8], #function) }
    func testWriteReadRoundTripExtendedHeaders() throws { try roundTrip([11], #function) }

    /// With DF a structured READ is one OFFSET_DATA chunk; without it, a READ of a range the
    /// block layer knows to be zero may be answered as a hole (it knows nothing here: all data).
    func testStructuredReadWithDFIsOneDataChunk() throws {
        try negotiate([8])
        let data = [UInt8](repeating: 0x5A, count: 1 << 20)
        try send(req(1, cookie: 1, offset: 0, length: data.count, payload: data))
        XCTAssertEqual(try pump().map(\.error), [0])
        for (cookie, n) in [(UInt64(2), 4096), (3, 64 << 10), (4, 1 << 20)] {
            try send(req(0, cookie: cookie, offset: 0, length: n, flags: 4))
            let r = try pump()
            XCTAssertEqual(r.map(\.chunkTypes), [[1]], "one OFFSET_DATA chunk with DONE for \(n) bytes")
            XCTAssertEqual(r.first?.readBytes(offset: 0, length: n), Array(data.prefix(n)))
        }
    }

    /// FLUSH and a WRITE with FUA: each answered once, with its cookie, and each reached the
    /// device as a flush.
    func testFlushAndFUAWriteAreAnsweredOnceAndReachTheDevice() throws {
        try negotiate([])
        let flushes = disk.emulator.stats.flushes.load(ordering: .relaxed)
        try send(
            req(1, cookie: 0xF0A, offset: 4096, length: 4096, flags: 1, payload: [UInt8](repeating: 7, count: 4096)))
        XCTAssertEqual(try pump().map { [$0.cookie, UInt64($0.error)] }, [[0xF0A, 0]])
        XCTAssertEqual(
            disk.emulator.stats.flushes.load(ordering: .relaxed), flushes + 1, "FUA: a flush after the write")
        try send(req(3, cookie: 0xF1))
        XCTAssertEqual(try pump().map { [$0.cookie, UInt64($0.error)] }, [[0xF1, 0]])
        XCTAssertEqual(disk.emulator.stats.flushes.load(ordering: .relaxed), flushes + 2)
        // Both in one buffer, and once more with structured replies on a new connection.
        try send(
            req(3, cookie: 0xF2) + req(1, cookie: 0xF3, offset: 0, length: 1, flags: 1, payload: [1])
                + req(3, cookie: 0xF4))
        XCTAssertEqual(try pump().map(\.cookie), [0xF2, 0xF3, 0xF4])
        XCTAssertEqual(disk.emulator.stats.flushes.load(ordering: .relaxed), flushes + 5)
        XCTAssertEqual(try deviceBytes(0, 1), [1])
        XCTAssertEqual(try deviceBytes(4096, 4096), [UInt8](repeating: 7, count: 4096))
    }

    /// Many requests in one inbound buffer, answered in one run of the loop: every cookie exactly
    /// once, READs see the WRITEs before them (the device completes in order here), errors where
    /// the request is out of range.
    func testPipelinedRequestsInOneBufferAreEachAnsweredOnce() throws {
        for options: [UInt32] in [[], [8], [11]] {
            try reconnect(ioPages: 2048)
            try negotiate(options)
            var rng = TestSeed.generator("\(#function) \(options)")
            var model = DiskModel(size: Int(Self.size))
            var wire: [UInt8] = []
            var expected: [UInt64: (error: UInt32, read: (UInt64, [UInt8])?)] = [:]
            for cookie in UInt64(1)...200 {
                let big = rng.next() % 3 == 0
                let bound: UInt64 = big ? 200 << 10 : 9000
                let n = Int(rng.next() % bound) + 1
                let off = rng.next() % (Self.size - UInt64(n))
                switch rng.next() % 8 {
                case 0, 1, 2:
                    let data = rng.bytes(n)
                    model.write(data, at: off)
                    wire += req(1, cookie: cookie, offset: off, length: n, flags: UInt16(rng.next() % 2), payload: data)
                    expected[cookie] = (0, nil)
                case 3, 4, 5:
                    wire += req(0, cookie: cookie, offset: off, length: n)
                    expected[cookie] = (0, (off, model.read(n, at: off)))
                case 6:
                    wire += req(3, cookie: cookie)
                    expected[cookie] = (0, nil)
                default:
                    // Past the end: a WRITE is ENOSPC (28), a READ EINVAL (22); nothing changes.
                    if rng.next() % 2 == 0 {
                        wire += req(1, cookie: cookie, offset: Self.size - 1, length: 2, payload: [9, 9])
                        expected[cookie] = (28, nil)
                    } else {
                        wire += req(0, cookie: cookie, offset: Self.size, length: 1)
                        expected[cookie] = (22, nil)
                    }
                }
            }
            try send(wire)
            let replies = byCookie(try pump())
            XCTAssertEqual(Set(replies.keys), Set(expected.keys), "every cookie answered (\(options))")
            for (cookie, want) in expected {
                guard let r = replies[cookie] else { continue }
                XCTAssertEqual(r.error, want.error, "cookie \(cookie) (\(options))")
                if let (off, bytes) = want.read {
                    XCTAssertEqual(r.readBytes(offset: off, length: bytes.count), bytes, "READ \(cookie) (\(options))")
                }
            }
            XCTAssertEqual(reader.pendingBytes, 0)
            XCTAssertTrue(reader.partial.isEmpty)
            assertBytes(try deviceBytes(0, Int(Self.size)), model.bytes, "the device (\(options))")
        }
    }

    /// NBD_CMD_DISC: the requests before it are answered, then the connection closes; what
    /// follows it in the same buffer is neither answered nor done.
    func testDiscAnswersWhatCameBeforeThenCloses() throws {
        try negotiate([8])
        let data = [UInt8](repeating: 0xD1, count: 128 << 10)
        let after = [UInt8](repeating: 0xEE, count: 4096)
        try send(
            req(1, cookie: 1, offset: 0, length: data.count, payload: data)
                + req(0, cookie: 2, offset: 0, length: data.count)
                + req(0, cookie: 3, offset: 4096, length: 100)
                + req(2, cookie: 4)
                + req(1, cookie: 5, offset: 1 << 20, length: after.count, payload: after)
                + req(0, cookie: 6, offset: 0, length: 512))
        let replies = try pump()
        // In any order (the READs wait for the WRITE's range lock, and may be answered first).
        XCTAssertEqual(
            replies.map(\.cookie).sorted(), [1, 2, 3], "the requests before DISC, once each, and nothing else")
        XCTAssertEqual(replies.map(\.error), [0, 0, 0])
        XCTAssertTrue(
            replies.first { $0.cookie == 2 }?.readBytes(offset: 0, length: data.count) == data, "READ 2 sees WRITE 1")
        XCTAssertFalse(channel.isActive, "closed after the replies")
        XCTAssertEqual(reader.pendingBytes, 0)
        XCTAssertEqual(
            try deviceBytes(1 << 20, 4096), [UInt8](repeating: 0, count: 4096), "the WRITE after DISC was not done")
        XCTAssertEqual(try deviceBytes(0, 4), [0xD1, 0xD1, 0xD1, 0xD1])
    }

    /// DISC alone in its buffer, with nothing in flight: the connection closes at once, no reply.
    func testDiscWithNothingInFlightClosesWithoutReply() throws {
        try negotiate([])
        try send(req(1, cookie: 1, offset: 0, length: 3, payload: [1, 2, 3]))
        XCTAssertEqual(try pump().map(\.cookie), [1])
        try send(req(2, cookie: 2))
        XCTAssertEqual(try pump(), [])
        XCTAssertFalse(channel.isActive)
    }

    // MARK: backpressure

    /// Between the handler and the channel's head: counts the reads the handler passes on
    /// (NIO reads the socket only then) and, while closed, holds writes as a socket that the
    /// client does not drain would (their promises pending).
    final class SlowSocket: ChannelOutboundHandler {
        typealias OutboundIn = ByteBuffer
        var reads = 0
        var open = true
        var held: [(NIOAny, EventLoopPromise<Void>?)] = []
        var heldBytes: Int { held.reduce(0) { $0 + unwrapBytes($1.0) } }
        private func unwrapBytes(_ d: NIOAny) -> Int { unwrapOutboundIn(d).readableBytes }
        var flushPending = false

        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            if open { context.write(data, promise: promise) } else { held.append((data, promise)) }
        }
        func flush(context: ChannelHandlerContext) {
            if open { context.flush() } else { flushPending = true }
        }
        func drain(context: ChannelHandlerContext) {
            open = true
            let h = held
            held = []
            for (d, p) in h { context.write(d, promise: p) }
            context.flush()
        }
    }

    /// While the channel is not writable the handler parses nothing and passes no read on; once
    /// it is writable again it answers everything buffered, once each, and reads again.
    func testNotWritablePausesParsingAndReadingUntilWritable() throws {
        let probe = SlowSocket()
        try reconnect(front: [probe])
        try negotiate([])
        // Idle: a read asked for while not writable is held back, and passed on once writable
        // (nothing in flight: no completion would pass it on).
        channel.isWritable = false
        channel.pipeline.syncOperations.fireChannelWritabilityChanged()
        let idle = probe.reads
        channel.read()
        XCTAssertEqual(probe.reads, idle, "the read is held back")
        channel.isWritable = true
        channel.pipeline.syncOperations.fireChannelWritabilityChanged()
        XCTAssertEqual(probe.reads, idle + 1, "reading resumed on writability alone")
        // Requests arriving while not writable.
        channel.isWritable = false
        channel.pipeline.syncOperations.fireChannelWritabilityChanged()
        var wire: [UInt8] = []
        for cookie in UInt64(1)...20 {
            wire +=
                cookie % 2 == 0
                ? req(0, cookie: cookie, offset: cookie * 4096, length: 4096)
                : req(
                    1, cookie: cookie, offset: (cookie + 1) * 4096, length: 4096,
                    payload: [UInt8](repeating: UInt8(cookie), count: 4096))
        }
        try send(wire)
        XCTAssertEqual(try pump(), [], "nothing parsed while not writable")
        let reads = probe.reads
        channel.read()
        XCTAssertEqual(probe.reads, reads, "the read is held back")
        channel.isWritable = true
        channel.pipeline.syncOperations.fireChannelWritabilityChanged()
        let replies = byCookie(try pump())
        XCTAssertEqual(Set(replies.keys), Set(1...20))
        XCTAssertEqual(probe.reads, reads + 1, "reading resumed once")
        for cookie in stride(from: UInt64(2), through: 20, by: 2) {
            // READ cookie c reads block c, which WRITE c-1 wrote with byte c-1.
            XCTAssertEqual(replies[cookie]?.data.first?.bytes, [UInt8](repeating: UInt8(cookie - 1), count: 4096))
        }
    }

    /// A client that does not take its replies: READs held in device pages stop parsing at the
    /// stack's held-read limit, and the read is held back; once the replies are written, the
    /// rest is answered, once each.
    func testHeldReadLimitPausesUntilRepliesAreWritten() throws {
        let probe = SlowSocket()
        try reconnect(front: [probe])
        try negotiate([8])
        let limit = disk.device.heldReadLimit
        let n = 1 << 20
        XCTAssertGreaterThanOrEqual(limit, n)
        let count = limit / n + 3
        let data = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try send(req(1, cookie: 1000, offset: 0, length: n, payload: data))
        XCTAssertEqual(try pump().map(\.cookie), [1000])
        probe.open = false
        var wire: [UInt8] = []
        for cookie in 1...UInt64(count) { wire += req(0, cookie: cookie, offset: 0, length: n, flags: 4) }
        try send(wire)
        XCTAssertEqual(try pump(), [], "the replies are still in the socket")
        XCTAssertEqual(probe.heldBytes / n, limit / n, "parsing stopped at the held-read limit")
        let reads = probe.reads
        channel.read()
        XCTAssertEqual(probe.reads, reads, "the read is held back")
        probe.drain(context: try channel.pipeline.syncOperations.context(handler: probe))
        let replies = try pump()
        let byC = byCookie(replies)
        XCTAssertEqual(Set(byC.keys), Set(1...UInt64(count)))
        for (c, r) in byC { XCTAssertEqual(r.readBytes(offset: 0, length: n), data, "READ \(c)") }
        XCTAssertEqual(probe.reads, reads + 1, "reading resumed")
    }

    /// The device's pages are all lent to READ replies the client has not taken (the handler
    /// counts them as written, so its own limit is not what stops it): a further READ waits in
    /// the driver and is answered, on the thread that frees the pages, once the test takes the replies.
    func testReadWaitingForPagesIsAnsweredWhenRepliesAreFreed() throws {
        try reconnect(ioPages: 512) // 2 MiB of pages
        try negotiate([])
        let n = 512 << 10
        let data = (0..<2 * n).map { UInt8(truncatingIfNeeded: $0 / 4096 &+ $0) }
        try send(req(1, cookie: 100, offset: 0, length: data.count, payload: data))
        XCTAssertEqual(try pump().map(\.cookie), [100])
        try send(req(0, cookie: 1, offset: 0, length: n) + req(0, cookie: 2, offset: 0, length: n))
        channel.embeddedEventLoop.run()
        // Both replies sit in the channel's outbound buffer, holding 1 MiB of the 2 MiB of pages.
        try send(
            req(0, cookie: 3, offset: 0, length: n) + req(0, cookie: 4, offset: UInt64(n), length: n)
                + req(0, cookie: 5, offset: 0, length: n))
        channel.embeddedEventLoop.run()
        let pieces = n / (disk.driver.maxPagesPerRequest * 4096)
        XCTAssertEqual(disk.inFlight, pieces, "READ 5's \(pieces) device requests wait for pages")
        // Taking the replies frees their buffers: READ 5 gets pages, runs, and is answered.
        let replies = try pump()
        let byC = byCookie(replies)
        XCTAssertEqual(Set(byC.keys), Set(1...5))
        for (c, r) in byC {
            let off = c == 4 ? n : 0
            XCTAssertEqual(r.readBytes(offset: UInt64(off), length: n), Array(data[off..<off + n]), "READ \(c)")
        }
        XCTAssertEqual(disk.inFlight, 0)
    }

    // MARK: requests answered without device I/O

    /// The regression: with structured replies a zero-length READ got no reply at all.
    func testZeroLengthReadWithStructuredRepliesIsAnsweredNone() throws {
        try negotiate([8])
        try send(request(type: 0, cookie: 0xAB, offset: 4096, length: 0))
        var r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x668e_33ef)
        XCTAssertEqual(r.u16(), 1, "DONE")
        XCTAssertEqual(r.u16(), 0, "NBD_REPLY_TYPE_NONE")
        XCTAssertEqual(r.u64(), 0xAB)
        XCTAssertEqual(r.u32(), 0)
        XCTAssertNil(r.u8(), "nothing else was sent")
        // DF: the same, and no OFFSET_DATA chunk of length 8.
        try send(request(flags: 4, type: 0, cookie: 0xAC, offset: 0, length: 0))
        r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x668e_33ef)
        XCTAssertEqual(r.u16(), 1)
        XCTAssertEqual(r.u16(), 0)
        XCTAssertEqual(r.u64(), 0xAC)
        XCTAssertEqual(r.u32(), 0)
        XCTAssertNil(r.u8())
    }

    func testZeroLengthRequestsWithSimpleRepliesAreAnsweredOnce() throws {
        try negotiate([])
        for (type, cookie) in [(UInt16(0), UInt64(1)), (4, 2), (6, 3), (5, 4)] {
            try send(request(type: type, cookie: cookie, offset: 0, length: 0))
            var r = WireReader(try sent())
            XCTAssertEqual(r.u32(), 0x6744_6698)
            XCTAssertEqual(r.u32(), 0, "type \(type)")
            XCTAssertEqual(r.u64(), cookie)
            XCTAssertNil(r.u8(), "one reply and no data for type \(type)")
        }
        // A zero-length WRITE has no payload: the next header follows directly.
        try send(
            request(type: 1, cookie: 5, offset: 0, length: 0) + request(type: 0x55, cookie: 6, offset: 0, length: 0))
        var r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x6744_6698)
        XCTAssertEqual(r.u32(), 0)
        XCTAssertEqual(r.u64(), 5)
        XCTAssertEqual(r.u32(), 0x6744_6698)
        XCTAssertEqual(r.u32(), 22, "unknown command")
        XCTAssertEqual(r.u64(), 6)
    }

    func testBlockStatusAndRefusalsAreFramedForTheSession() throws {
        try negotiate([8, 10])
        // BLOCK_STATUS over a fresh RAM disk (all data as far as the server knows: 0 flags).
        try send(request(type: 7, cookie: 7, offset: 0, length: 8192))
        var r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x668e_33ef)
        XCTAssertEqual(r.u16(), 1)
        XCTAssertEqual(r.u16(), 5)
        XCTAssertEqual(r.u64(), 7)
        XCTAssertEqual(r.u32(), 12)
        XCTAssertEqual(r.u32(), 1, "context id of base:allocation")
        XCTAssertEqual(r.u32(), 8192)
        XCTAssertNotNil(r.u32())
        XCTAssertNil(r.u8())
        // A WRITE past the end (simple reply, ENOSPC), a READ past the end (error chunk, EINVAL).
        try send(request(type: 1, cookie: 8, offset: Self.size, length: 1) + [0x42])
        r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x6744_6698)
        XCTAssertEqual(r.u32(), 28)
        XCTAssertEqual(r.u64(), 8)
        try send(request(type: 0, cookie: 9, offset: Self.size, length: 1))
        r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x668e_33ef)
        XCTAssertEqual(r.u16(), 1)
        XCTAssertEqual(r.u16(), 0x8001)
        XCTAssertEqual(r.u64(), 9)
        _ = r.u32()
        XCTAssertEqual(r.u32(), 22)
    }
}

extension WireReader {
    mutating func u8() -> UInt8? { uint(1).map { UInt8($0) } }
}
