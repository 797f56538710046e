// NBDConnectionHandler on NIO's EmbeddedChannel (as swift-nio-ssh tests its handlers): bytes in,
// bytes out, no sockets and no threads of the test's own. Only requests answered on the event
// loop without device I/O are driven here (refusals, zero-length requests, CACHE, BLOCK_STATUS),
// since the device completes on threads of its own; device I/O is covered over real sockets.
import Logging
import NIOCore
import NIOEmbedded
import TestSupport
import XCTest

@testable import NBDServer

final class HandlerTests: XCTestCase {
    var disk: TestDisk!
    var channel: EmbeddedChannel!

    override func setUpWithError() throws {
        disk = try TestDisk.ram(size: 1 << 20, completions: .threads) // no event loop reaps here
        let export = NBDExport(name: "disk", description: "", device: disk.device)
        var log = Logger(label: "test.handler")
        log.logLevel = .critical
        let handler = NBDConnectionHandler(
            directory: ExportDirectory([export]), id: 1, handshakeTimeout: .seconds(60),
            tls: .off, logger: log)
        channel = EmbeddedChannel(handler: handler)
        // connect() makes the channel active (channelActive sends the greeting).
        try channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
    }

    override func tearDownWithError() throws {
        _ = try? channel.finish()
        disk.shutdown()
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
    }

    func request(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
        RawClient.request(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
    }

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
        try send(request(type: 1, cookie: 8, offset: 1 << 20, length: 1) + [0x42])
        r = WireReader(try sent())
        XCTAssertEqual(r.u32(), 0x6744_6698)
        XCTAssertEqual(r.u32(), 28)
        XCTAssertEqual(r.u64(), 8)
        try send(request(type: 0, cookie: 9, offset: 1 << 20, length: 1))
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
