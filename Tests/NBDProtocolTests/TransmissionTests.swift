// TransmissionParser and the simple reply encoder against "Request message" and "Simple reply message".
import NBDProtocol
import NIOCore
import TestSupport
import XCTest

final class TransmissionTests: XCTestCase {
    /// Every next() until nil.
    func drain(_ p: inout TransmissionParser, _ input: inout ByteBuffer) throws -> [TransmissionEvent] {
        var out: [TransmissionEvent] = []
        while let e = try p.next(&input) { out.append(e) }
        return out
    }

    func testRequestHeaderDecodesBigEndianFields() throws {
        var p = TransmissionParser(maximumPayload: 1 << 20)
        // Distinct bytes in every field, so a swapped or shifted field cannot pass.
        let bytes = Client.request(
            flags: 0x0105, type: Spec.cmdRead, cookie: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788, length: 0x9abc_def0)
        XCTAssertEqual(bytes.count, 28)
        XCTAssertEqual(Array(bytes.prefix(4)), [0x25, 0x60, 0x95, 0x13])
        var input = buffer(bytes)
        let ev = try p.next(&input)
        guard case .request(let r, let payload)? = ev else {
            return XCTFail("expected a request, got \(String(describing: ev))")
        }
        XCTAssertEqual(r.flags.rawValue, 0x0105)
        XCTAssertTrue(r.flags.contains(.fua))
        XCTAssertTrue(r.flags.contains(.df))
        XCTAssertEqual(r.type, 0)
        XCTAssertEqual(r.command, .read)
        XCTAssertEqual(r.cookie, 0x0102_0304_0506_0708)
        XCTAssertEqual(r.offset, 0x1122_3344_5566_7788)
        XCTAssertEqual(r.length, 0x9abc_def0, "a READ is not limited by the payload maximum and has no payload")
        XCTAssertNil(payload)
        XCTAssertEqual(input.readableBytes, 0)
        XCTAssertNil(try p.next(&input))
    }

    func testPartialHeaderIsNotConsumed() throws {
        var p = TransmissionParser(maximumPayload: 4096)
        let bytes = Client.request(type: Spec.cmdFlush, cookie: 9, offset: 0, length: 0)
        var input = buffer(Array(bytes.prefix(27)))
        XCTAssertNil(try p.next(&input))
        XCTAssertEqual(input.readableBytes, 27)
        input.writeBytes(bytes.suffix(1))
        guard case .request(let r, nil)? = try p.next(&input) else { return XCTFail("expected FLUSH") }
        XCTAssertEqual(r.command, .flush)
        XCTAssertEqual(r.cookie, 9)
    }

    func testUnknownCommandTypeIsStillParsed() throws {
        var p = TransmissionParser(maximumPayload: 4096)
        var input = buffer(Client.request(type: 0x4242, cookie: 5, offset: 1, length: 2))
        guard case .request(let r, nil)? = try p.next(&input) else { return XCTFail("expected a request") }
        XCTAssertEqual(r.type, 0x4242)
        XCTAssertNil(r.command)
    }

    func testWritePayloadSplitAcrossManySmallReads() throws {
        var p = TransmissionParser(maximumPayload: 1 << 20)
        let payload = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let bytes = Client.request(
            flags: 1, type: Spec.cmdWrite, cookie: 77, offset: 4096, length: UInt32(payload.count), payload: payload)
        var input = ByteBuffer()
        var events: [TransmissionEvent] = []
        var i = 0
        while i < bytes.count {
            let e = min(bytes.count, i + 7)
            input.writeBytes(bytes[i..<e])
            i = e
            if let ev = try p.next(&input) { events.append(ev) }
            if i < bytes.count { XCTAssertTrue(events.isEmpty, "no event before the payload is complete (at \(i))") }
        }
        XCTAssertEqual(events.count, 1)
        guard case .request(let r, let data?)? = events.first else { return XCTFail("expected a WRITE with payload") }
        XCTAssertEqual(r.command, .write)
        XCTAssertEqual(r.cookie, 77)
        XCTAssertEqual(r.offset, 4096)
        XCTAssertEqual(r.length, 10_000)
        XCTAssertEqual(r.flags, .fua)
        XCTAssertEqual(data.allBytes, payload)
        XCTAssertEqual(input.readableBytes, 0)
    }

    func testSeveralRequestsInOneBuffer() throws {
        var p = TransmissionParser(maximumPayload: 4096)
        let w1: [UInt8] = [1, 2, 3, 4, 5]
        let w2 = [UInt8](repeating: 0xEE, count: 4096)
        let bytes =
            Client.request(type: Spec.cmdRead, cookie: 1, offset: 0, length: 512)
            + Client.request(type: Spec.cmdWrite, cookie: 2, offset: 10, length: 5, payload: w1)
            + Client.request(type: Spec.cmdWrite, cookie: 3, offset: 8192, length: 4096, payload: w2)
            + Client.request(type: Spec.cmdFlush, cookie: 4, offset: 0, length: 0)
            + Client.request(flags: 1, type: Spec.cmdTrim, cookie: 5, offset: 4096, length: 8192)
            + Client.request(flags: 2, type: Spec.cmdWriteZeroes, cookie: 6, offset: 3, length: 9)
            + Client.request(type: Spec.cmdDisc, cookie: 7, offset: 0, length: 0)
        var input = buffer(bytes)
        let events = try drain(&p, &input)
        XCTAssertEqual(input.readableBytes, 0)
        let expected: [TransmissionEvent] = [
            .request(NBDRequest(flags: [], type: 0, cookie: 1, offset: 0, length: 512), payload: nil),
            .request(NBDRequest(flags: [], type: 1, cookie: 2, offset: 10, length: 5), payload: buffer(w1)),
            .request(NBDRequest(flags: [], type: 1, cookie: 3, offset: 8192, length: 4096), payload: buffer(w2)),
            .request(NBDRequest(flags: [], type: 3, cookie: 4, offset: 0, length: 0), payload: nil),
            .request(NBDRequest(flags: .fua, type: 4, cookie: 5, offset: 4096, length: 8192), payload: nil),
            .request(NBDRequest(flags: .noHole, type: 6, cookie: 6, offset: 3, length: 9), payload: nil),
            .request(NBDRequest(flags: [], type: 2, cookie: 7, offset: 0, length: 0), payload: nil),
        ]
        XCTAssertEqual(events, expected)
    }

    func testWriteOfExactlyMaximumPayloadIsAccepted() throws {
        var p = TransmissionParser(maximumPayload: 4096)
        let payload = [UInt8](repeating: 3, count: 4096)
        var input = buffer(Client.request(type: Spec.cmdWrite, cookie: 1, offset: 0, length: 4096, payload: payload))
        guard case .request(_, let d?)? = try p.next(&input) else { return XCTFail("expected an accepted WRITE") }
        XCTAssertEqual(d.readableBytes, 4096)
    }

    /// Beyond the maximum and the spec's 2^25 courtesy, a WRITE ends the connection instead of being
    /// drained; at 2^25 exactly it is still drained, whatever the maximum.
    func testWriteBeyondTheCourtesyPayloadDisconnects() throws {
        for (maxPayload, length, disconnects) in [
            (4096, UInt32(1 << 25), false), (4096, UInt32(1 << 25) + 1, true), (64 << 20, UInt32(64 << 20) + 1, true),
            (64 << 20, UInt32.max, true),
        ] {
            var p = TransmissionParser(maximumPayload: maxPayload)
            var input = buffer(Client.request(type: Spec.cmdWrite, cookie: 1, offset: 0, length: length))
            if disconnects {
                XCTAssertThrowsError(try p.next(&input), "max \(maxPayload), length \(length)") { e in
                    XCTAssertEqual(e as? TransmissionError, .payloadTooLarge(UInt64(length)))
                }
            } else {
                XCTAssertNil(try p.next(&input), "max \(maxPayload), length \(length): drained, not refused")
            }
        }
    }

    func testOversizedWriteIsRejectedAndDrainedWithoutBuffering() throws {
        let maxPayload = 4096
        var p = TransmissionParser(maximumPayload: maxPayload)
        let len = 100_003
        var input = buffer(Client.request(type: Spec.cmdWrite, cookie: 0xabc, offset: 512, length: UInt32(len)))
        XCTAssertNil(try p.next(&input), "no reply may overtake the client's upload")
        var fed = 0
        let piece = [UInt8](repeating: 0x5A, count: 1000)
        while fed < len {
            let k = min(piece.count, len - fed)
            input.writeBytes(piece.prefix(k))
            fed += k
            let ev = try p.next(&input)
            if fed < len {
                XCTAssertNil(ev)
            } else {
                XCTAssertEqual(
                    ev,
                    .rejected(
                        NBDRequest(flags: [], type: 1, cookie: 0xabc, offset: 512, length: UInt64(len)),
                        reason: .payloadTooLarge(length: UInt64(len), maximum: maxPayload)),
                    "rejected once the last payload byte is drained")
            }
            XCTAssertEqual(
                input.readableBytes, 0, "the oversized payload must be discarded as it arrives (after \(fed))")
        }
        // The next request parses normally.
        input.writeBytes(Client.request(type: Spec.cmdRead, cookie: 0xdef, offset: 0, length: 4096))
        XCTAssertEqual(
            try p.next(&input),
            .request(NBDRequest(flags: [], type: 0, cookie: 0xdef, offset: 0, length: 4096), payload: nil))
    }

    func testOversizedWriteFollowedByRequestsInTheSameBuffer() throws {
        var p = TransmissionParser(maximumPayload: 16)
        let bytes =
            Client.request(
                type: Spec.cmdWrite, cookie: 1, offset: 0, length: 17, payload: [UInt8](repeating: 0x25, count: 17))
            + Client.request(
                type: Spec.cmdWrite, cookie: 2, offset: 0, length: 16, payload: [UInt8](repeating: 9, count: 16))
        var input = buffer(bytes)
        let events = try drain(&p, &input)
        XCTAssertEqual(events.count, 2)
        if case .rejected(let r, .payloadTooLarge(17, 16))? = events.first {
            XCTAssertEqual(r.cookie, 1)
        } else {
            XCTFail("\(events)")
        }
        if case .request(let r, let d?)? = events.last {
            XCTAssertEqual(r.cookie, 2)
            XCTAssertEqual(d.allBytes, [UInt8](repeating: 9, count: 16))
        } else {
            XCTFail("\(events)")
        }
    }

    func testBadMagicThrows() {
        var p = TransmissionParser(maximumPayload: 4096)
        var bytes = Client.request(type: Spec.cmdRead, cookie: 1, offset: 0, length: 1)
        bytes[0..<4] = [0x67, 0x44, 0x66, 0x98] // a reply magic where a request magic belongs
        var input = buffer(bytes)
        XCTAssertThrowsError(try p.next(&input)) { e in
            XCTAssertEqual(e as? TransmissionError, .badMagic(0x6744_6698))
        }
    }

    func testBadMagicAfterAGoodRequestThrows() throws {
        var p = TransmissionParser(maximumPayload: 4096)
        var input = buffer(
            Client.request(type: Spec.cmdFlush, cookie: 1, offset: 0, length: 0) + [UInt8](repeating: 0, count: 28))
        XCTAssertNotNil(try p.next(&input))
        XCTAssertThrowsError(try p.next(&input)) { e in XCTAssertEqual(e as? TransmissionError, .badMagic(0)) }
    }

    func testSimpleReplyEncoding() {
        var b = ByteBuffer()
        TransmissionParser.simpleReply(cookie: 0x0102_0304_0506_0708, error: nil, into: &b)
        XCTAssertEqual(b.allBytes, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        var e = ByteBuffer()
        TransmissionParser.simpleReply(cookie: 0xffff_ffff_ffff_fffe, error: .nospc, into: &e)
        XCTAssertEqual(e.readableBytes, 16)
        var r = WireReader(e.allBytes)
        XCTAssertEqual(r.u32(), Spec.simpleReplyMagic)
        XCTAssertEqual(r.u32(), 28)
        XCTAssertEqual(r.u64(), 0xffff_ffff_ffff_fffe)
        // Appends, never overwrites.
        TransmissionParser.simpleReply(cookie: 1, error: .perm, into: &e)
        XCTAssertEqual(e.readableBytes, 32)
        XCTAssertEqual(Array(e.allBytes[16..<24]), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1])
    }
}
