// The client-side encoders and parsers (ClientMessages.swift, ClientReplies.swift): their bytes
// checked against the spec numbers of ClientWire.swift, and run against the server's own state
// machine and reply encoders, so both halves agree.
import NBDProtocol
import NIOCore
import TestSupport
import XCTest

final class ClientCodecTests: XCTestCase {
    func testGreetingParse() throws {
        var w = Wire()
        w.u64(Spec.nbdmagic)
        w.u64(Spec.ihaveopt)
        w.u16(3)
        let g = try NBDGreeting.parse(buffer(w.bytes))
        XCTAssertTrue(g.noZeroes)
        XCTAssertEqual(g.clientFlags().allBytes, Client.flags(Spec.cFixedNewstyle | Spec.cNoZeroes))
        var w2 = Wire()
        w2.u64(Spec.nbdmagic)
        w2.u64(Spec.ihaveopt)
        w2.u16(1)
        XCTAssertEqual(
            try NBDGreeting.parse(buffer(w2.bytes)).clientFlags().allBytes, Client.flags(Spec.cFixedNewstyle))
    }

    func testGreetingErrors() {
        var old = Wire()
        old.u64(Spec.nbdmagic)
        old.u64(0x0042_0281_8612_53)
        old.u16(0)
        XCTAssertThrowsError(try NBDGreeting.parse(buffer(old.bytes))) {
            XCTAssertEqual($0 as? NBDClientWireError, .oldstyle)
        }
        var http = Wire()
        http.str("HTTP/1.1 400 Bad Req")
        XCTAssertThrowsError(try NBDGreeting.parse(buffer(http.bytes))) {
            guard case .notNBD? = $0 as? NBDClientWireError else { return XCTFail("\($0)") }
        }
        var plain = Wire()
        plain.u64(Spec.nbdmagic)
        plain.u64(Spec.ihaveopt)
        plain.u16(0)
        XCTAssertThrowsError(try NBDGreeting.parse(buffer(plain.bytes))) {
            XCTAssertEqual($0 as? NBDClientWireError, .noFixedNewstyle(flags: 0))
        }
    }

    func testOptionEncodingsMatchTheSpecBytes() {
        XCTAssertEqual(
            NBDClientOption.info(.go, exportName: "disk", requests: [Spec.infoDescription, Spec.infoBlockSize])
                .allBytes,
            Client.option(Spec.optGo, Client.goData(name: "disk", infos: [Spec.infoDescription, Spec.infoBlockSize])))
        XCTAssertEqual(NBDClientOption.encode(.list).allBytes, Client.option(Spec.optList))
        var meta = Wire()
        meta.u32(1)
        meta.str("e")
        meta.u32(1)
        meta.u32(15)
        meta.str("base:allocation")
        XCTAssertEqual(
            NBDClientOption.metaContext(.listMetaContext, exportName: "e", queries: ["base:allocation"]).allBytes,
            Client.option(9, meta.bytes))
    }

    func testRequestEncodingMatchesTheSpecBytes() {
        var b = ByteBuffer()
        NBDClientRequest.encode(.write, flags: .fua, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 512, into: &b)
        XCTAssertEqual(
            b.allBytes,
            Client.request(flags: 1, type: Spec.cmdWrite, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 512))
    }

    /// The client's GO, LIST and LIST_META_CONTEXT run through the server's state machine and
    /// the replies through the client's parsers.
    func testNegotiationAgainstTheServerStateMachine() throws {
        let catalog = NBDExportCatalog([
            NBDExportInfo(
                name: "disk", description: "a disk", size: 1 << 20, flags: [.sendFlush, .sendTrim],
                minimumBlockSize: 1, preferredBlockSize: 4096, maximumPayload: 32 << 20)
        ])
        var sm = HandshakeStateMachine(catalog: catalog)
        var input = ByteBuffer()
        let greeting = try NBDGreeting.parse(sm.greeting())
        input.writeImmutableBuffer(greeting.clientFlags())
        input.writeImmutableBuffer(NBDClientOption.encode(.list))
        input.writeImmutableBuffer(NBDClientOption.metaContext(.listMetaContext, exportName: "disk", queries: []))
        input.writeImmutableBuffer(
            NBDClientOption.info(.go, exportName: "disk", requests: [NBDInfo.description, NBDInfo.blockSize]))
        var out = ByteBuffer()
        for case .send(let b) in sm.receive(&input) { out.writeImmutableBuffer(b) }

        var replies: [NBDOptionReply] = []
        while out.readableBytes > 0 {
            let h = try NBDOptionReply.parseHeader(out.readSlice(length: NBDOptionReply.headerSize)!)
            replies.append(
                NBDOptionReply(option: h.option, type: h.type, payload: out.readSlice(length: Int(h.length))!))
        }
        XCTAssertEqual(
            replies.map(\.type),
            [
                NBDReply.server, NBDReply.ack, NBDReply.metaContext, NBDReply.ack,
                NBDReply.info, NBDReply.info, NBDReply.info, NBDReply.ack,
            ])
        XCTAssertEqual(
            try NBDServerEntry.parse(replies[0].payload), NBDServerEntry(name: "disk", description: "a disk"))
        XCTAssertEqual(try NBDMetaContextEntry.parse(replies[2].payload).name, "base:allocation")
        let infos = try replies[4...6].map { try NBDInfoReply.parse($0.payload) }
        XCTAssertEqual(
            infos,
            [
                .export(size: 1 << 20, flags: [.hasFlags, .sendFlush, .sendTrim]), .description("a disk"),
                .blockSize(minimum: 1, preferred: 4096, maximum: 32 << 20),
            ])
        XCTAssertTrue(sm.isFinished)
    }

    func testOptionReplyErrors() throws {
        let r = HandshakeStateMachine.optionReply(
            NBDOption.go.rawValue, NBDReply.errUnknown, message: "no export named \"x\"")
        let h = try NBDOptionReply.parseHeader(r)
        XCTAssertEqual(h.type, NBDReply.errUnknown)
        let reply = NBDOptionReply(option: h.option, type: h.type, payload: r.getSlice(at: 20, length: Int(h.length))!)
        XCTAssertTrue(reply.isError)
        XCTAssertEqual(reply.message, "no export named \"x\"")
        var bad = Wire()
        bad.u64(1)
        bad.u32(7)
        bad.u32(1)
        bad.u32(0)
        XCTAssertThrowsError(try NBDOptionReply.parseHeader(buffer(bad.bytes))) {
            XCTAssertEqual($0 as? NBDClientWireError, .badOptionReplyMagic(1))
        }
        var big = Wire()
        big.u64(Spec.optReplyMagic)
        big.u32(7)
        big.u32(1)
        big.u32(1 << 30)
        XCTAssertThrowsError(try NBDOptionReply.parseHeader(buffer(big.bytes)))
        XCTAssertThrowsError(try NBDInfoReply.parse(buffer([0, 0, 1, 2])), "short NBD_INFO_EXPORT")
        XCTAssertEqual(try NBDInfoReply.parse(buffer([0, 99])), .unknown(99))
    }

    /// Structured chunks from the server's encoders, fed byte by byte to the client's parser.
    func testReplyParserReadsServerChunks() throws {
        var wire = ByteBuffer()
        var data = ByteBuffer()
        data.writeBytes([1, 2, 3, 4])
        StructuredReply.offsetData(cookie: 7, offset: 100, dataLength: 4, done: false, into: &wire)
        wire.writeImmutableBuffer(data)
        StructuredReply.offsetHole(cookie: 7, offset: 104, length: 4096, done: false, into: &wire)
        StructuredReply.error(cookie: 8, error: .io, message: "boom", offset: 5, into: &wire)
        StructuredReply.none(cookie: 7, framing: .structured, into: &wire)
        TransmissionParser.simpleReply(cookie: 9, error: nil, into: &wire)
        wire.writeBytes([9, 9]) // simple READ data for cookie 9
        TransmissionParser.simpleReply(cookie: 10, error: .perm, into: &wire)

        let lengths: [UInt64: Int] = [7: 4100, 8: 0, 9: 2, 10: 512]
        var parser = NBDReplyParser()
        var input = ByteBuffer()
        var chunks: [NBDReplyChunk] = []
        for byte in wire.allBytes {
            input.writeInteger(byte)
            while let c = try parser.next(&input, dataLength: { lengths[$0] }) { chunks.append(c) }
        }
        var d = ByteBuffer()
        d.writeBytes([1, 2, 3, 4])
        var s = ByteBuffer()
        s.writeBytes([9, 9])
        XCTAssertEqual(
            chunks,
            [
                .structured(cookie: 7, done: false, payload: .offsetData(offset: 100, data: d)),
                .structured(cookie: 7, done: false, payload: .offsetHole(offset: 104, length: 4096)),
                .structured(
                    cookie: 8, done: true, payload: .error(code: NBDErrno.io.rawValue, message: "boom", offset: 5)),
                .structured(cookie: 7, done: true, payload: .none),
                .simple(cookie: 9, error: 0, data: s),
                .simple(cookie: 10, error: NBDErrno.perm.rawValue, data: nil),
            ])
        XCTAssertEqual(input.readableBytes, 0)
    }

    func testReplyParserErrors() {
        var parser = NBDReplyParser()
        var b = ByteBuffer()
        TransmissionParser.simpleReply(cookie: 5, error: nil, into: &b)
        XCTAssertThrowsError(try parser.next(&b, dataLength: { _ in nil })) {
            XCTAssertEqual($0 as? NBDReplyParseError, .unknownCookie(5))
        }
        var junk = buffer([0xde, 0xad, 0xbe, 0xef])
        var p2 = NBDReplyParser()
        XCTAssertThrowsError(try p2.next(&junk, dataLength: { _ in 0 })) {
            XCTAssertEqual($0 as? NBDReplyParseError, .badMagic(0xdead_beef))
        }
        var huge = ByteBuffer()
        StructuredReply.header(
            cookie: 1, type: StructuredReply.ChunkType.offsetData, done: true, length: 1 << 30, into: &huge)
        var p3 = NBDReplyParser(maximumChunk: 1 << 20)
        XCTAssertThrowsError(try p3.next(&huge, dataLength: { _ in 0 })) {
            XCTAssertEqual($0 as? NBDReplyParseError, .chunkTooLarge(1 << 30))
        }
        var hole = ByteBuffer()
        StructuredReply.header(
            cookie: 1, type: StructuredReply.ChunkType.offsetHole, done: true, length: 8, into: &hole)
        hole.writeInteger(UInt64(0))
        var p4 = NBDReplyParser()
        XCTAssertThrowsError(try p4.next(&hole, dataLength: { _ in 0 }), "OFFSET_HOLE of 8 bytes")
    }
}
