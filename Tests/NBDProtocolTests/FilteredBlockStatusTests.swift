// Filtered BLOCK_STATUS (NBD_FLAG_BLOCK_STATUS_PAYLOAD, extension branch, "NBD_CMD_BLOCK_STATUS"):
// the payload "MUST occupy 8 + n*4 bytes ... C: 64 bits, effect length / C: n * 32 bits, list of
// metacontext ids to use"; "duplicate or unknown metacontext ids" are consumed, then EINVAL. The
// parser and the rules, without sockets; the bytes are written out here from the text.
import NBDProtocol
import NIOCore
import TestSupport
import XCTest

final class FilteredBlockStatusTests: XCTestCase {
    static let cmdBlockStatus: UInt16 = 7, cmdFlush: UInt16 = 3
    static let payloadLen: UInt16 = 1 << 5, reqOne: UInt16 = 1 << 3
    static let base = NBDMetaContextID(id: 1, name: "base:allocation")
    static let dirty = NBDMetaContextID(id: 2, name: "qemu:dirty-bitmap:b0")
    static let size: UInt64 = 1 << 20

    /// "C: 64 bits, effect length", then each id as a u32.
    func payload(_ effect: UInt64, _ ids: [UInt32]) -> [UInt8] {
        var w = Wire()
        w.u64(effect)
        for i in ids { w.u32(i) }
        return w.bytes
    }

    func rules(offered: Bool = true) -> TransmissionRules {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush]
        if offered { flags.insert(.blockStatusPayload) }
        let session = NBDSession(
            export: NBDExportInfo(name: "", size: Self.size, flags: flags), structuredReplies: true,
            extendedHeaders: true, allocationContext: 1, otherContexts: [Self.dirty])
        return TransmissionRules(
            session: session,
            export: ExportFacts(size: Self.size, flags: flags, maximumPayload: 1 << 25, canFastZero: false))
    }

    func request(length: UInt64 = 0, flags: UInt16 = 0, offset: UInt64 = 4096) -> NBDRequest {
        NBDRequest(
            flags: NBDCommandFlags(rawValue: flags), type: Self.cmdBlockStatus, cookie: 9, offset: offset,
            length: length)
    }

    func parse(limit: Int, _ bytes: [UInt8]) throws -> [TransmissionEvent] {
        var p = TransmissionParser(maximumPayload: 1 << 25, extendedHeaders: true, blockStatusPayloadLimit: limit)
        var input = ByteBuffer(bytes: bytes)
        var out: [TransmissionEvent] = []
        while let e = try p.next(&input) { out.append(e) }
        XCTAssertEqual(input.readableBytes, 0, "everything consumed")
        return out
    }

    func testTheParserHandsOverAPayloadWithinTheLimit() throws {
        let body = payload(8192, [2, 1])
        let events = try parse(
            limit: 16,
            extendedRequest(
                flags: Self.payloadLen | Self.reqOne, type: Self.cmdBlockStatus, cookie: 5, offset: 4096,
                length: UInt64(body.count), payload: body))
        guard case .request(let r, let p?)? = events.first, events.count == 1 else {
            return XCTFail("expected one request with a payload, got \(events)")
        }
        XCTAssertEqual(Array(p.readableBytesView), body)
        XCTAssertEqual(r.length, 16, "the header's length is the payload's")
        XCTAssertEqual(r.flags, [.reqOne], "PAYLOAD_LEN is the parser's; REQ_ONE stays")
    }

    func testALongerPayloadIsConsumedThenRefusedAndTheNextRequestParses() throws {
        let body = payload(8192, [1, 2, 2]) // 20 bytes: an id repeated
        let events = try parse(
            limit: 16,
            extendedRequest(
                flags: Self.payloadLen, type: Self.cmdBlockStatus, cookie: 5, offset: 0, length: UInt64(body.count),
                payload: body) + extendedRequest(flags: 0, type: Self.cmdFlush, cookie: 6, offset: 0, length: 0))
        XCTAssertEqual(events.count, 2)
        guard case .rejected(let r, .blockStatusPayloadTooLong(20, 16))? = events.first else {
            return XCTFail("expected the long payload refused, got \(events)")
        }
        XCTAssertEqual(r.cookie, 5)
        guard case .request(let f, nil) = events[1] else { return XCTFail("FLUSH after it: \(events[1])") }
        XCTAssertEqual(f.cookie, 6)
    }

    func testWithoutTheFlagAPayloadIsUnexpected() throws {
        let body = payload(8192, [1])
        let events = try parse(
            limit: 0,
            extendedRequest(
                flags: Self.payloadLen, type: Self.cmdBlockStatus, cookie: 5, offset: 0, length: UInt64(body.count),
                payload: body))
        guard case .rejected(_, .unexpectedPayload(7, 12))? = events.first else {
            return XCTFail("expected EINVAL for a payload not offered, got \(events)")
        }
    }

    /// PAYLOAD_LEN with a zero length (found by the transmission fuzz target): not offered, it is
    /// an unexpected payload; offered, the empty payload reaches the rules, which refuse it.
    func testAnEmptyPayloadIsRefused() throws {
        let request = extendedRequest(
            flags: Self.payloadLen, type: Self.cmdBlockStatus, cookie: 5, offset: 0, length: 0)
        guard case .rejected(_, .unexpectedPayload(7, 0))? = try parse(limit: 0, request).first else {
            return XCTFail("not offered: expected an unexpected payload")
        }
        guard case .request(let r, let p?)? = try parse(limit: 16, request).first else {
            return XCTFail("offered: expected the request with an empty payload")
        }
        guard case .fail(.inval, _) = rules().decide(r, payload: p) else { return XCTFail("expected EINVAL") }
    }

    func testTheRepliesCoverTheNamedContextsInTheClientsOrder() {
        let r = rules()
        XCTAssertEqual(
            r.decide(request(), payload: ByteBuffer(bytes: payload(8192, [2]))),
            .run(.blockStatus(offset: 4096, length: 8192, contexts: [Self.dirty], reqOne: false)))
        XCTAssertEqual(
            r.decide(request(flags: Self.reqOne), payload: ByteBuffer(bytes: payload(512, [2, 1]))),
            .run(.blockStatus(offset: 4096, length: 512, contexts: [Self.dirty, Self.base], reqOne: true)))
        XCTAssertEqual(
            r.decide(request(length: 8192)),
            .run(.blockStatus(offset: 4096, length: 8192, contexts: [Self.base, Self.dirty], reqOne: false)),
            "without a payload: every negotiated context")
    }

    func testBadPayloadsAreEINVAL() {
        let r = rules()
        func errno(_ d: RequestDecision) -> NBDErrno? {
            if case .fail(let e, _) = d { return e }
            return nil
        }
        XCTAssertEqual(errno(r.decide(request(), payload: ByteBuffer(bytes: payload(8192, [3])))), .inval, "unknown id")
        XCTAssertEqual(errno(r.decide(request(), payload: ByteBuffer(bytes: payload(8192, [1, 1])))), .inval, "twice")
        XCTAssertEqual(errno(r.decide(request(), payload: ByteBuffer(bytes: payload(8192, [])))), .inval, "no id")
        XCTAssertEqual(
            errno(r.decide(request(), payload: ByteBuffer(bytes: payload(8192, [1]) + [0, 0]))), .inval, "ragged")
        XCTAssertEqual(errno(r.decide(request(), payload: ByteBuffer(bytes: payload(0, [1])))), .inval, "length 0")
        XCTAssertEqual(
            errno(r.decide(request(), payload: ByteBuffer(bytes: payload(Self.size, [1])))), .inval,
            "past the end (offset 4096)")
        XCTAssertEqual(
            errno(rules(offered: false).decide(request(), payload: ByteBuffer(bytes: payload(8192, [1])))), .inval,
            "not offered")
    }
}
