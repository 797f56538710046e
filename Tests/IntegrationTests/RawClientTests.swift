// Byte-level checks against the real server over a Unix socket, for what libnbd cannot show.
import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

final class RawClientTests: XCTestCase {
    func testTransmissionAfterGoWithSimpleReplies() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            XCTAssertEqual(try c.negotiate(export: "disk"), 1 << 20)
            let payload: [UInt8] = [0xde, 0xad, 0xbe, 0xef, 0x01]
            try c.send(RawClient.request(type: 1, cookie: 0x1111_2222_3333_4444, offset: 4093, length: 5) + payload)
            let w = try c.simpleReply()
            XCTAssertEqual(w.error, 0)
            XCTAssertEqual(w.cookie, 0x1111_2222_3333_4444)
            try c.send(RawClient.request(type: 0, cookie: 7, offset: 4092, length: 7))
            let r = try c.simpleReply()
            XCTAssertEqual(r.error, 0)
            XCTAssertEqual(r.cookie, 7)
            XCTAssertEqual(try c.recv(7), [0] + payload + [0])
            // Unknown command type: EINVAL, connection stays.
            try c.send(RawClient.request(type: 0x55, cookie: 8, offset: 0, length: 0))
            XCTAssertEqual(try c.simpleReply().error, 22)
            // DISC: the server closes after it.
            try c.send(RawClient.request(type: 2, cookie: 9, offset: 0, length: 0))
            XCTAssertThrowsError(try c.recv(1), "the server closes the connection after NBD_CMD_DISC")
        }
    }

    /// A WRITE above the maximum payload is refused with EINVAL and its payload skipped. The reply
    /// must not be sent before the request (header and payload) has been received: libnbd, for
    /// one, drops the connection ("no matching cookie found for server reply, this is probably a
    /// bug in the server") when a reply arrives for a command it is still sending. nbdkit reads
    /// the whole oversized payload before replying.
    /// NBD_CMD_DISC right behind a large READ, and a client that takes its replies late: the
    /// whole reply arrives before the close. (The close used to drop NIO's queued writes: 212 KiB
    /// of the 16 MiB arrived, then EOF.)
    func testDiscAfterALargeReadDeliversTheWholeReplyFirst() async throws {
        try await TestServer.with(try await TestServer.ram(size: 32 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk")
            let n = 16 << 20
            try c.send(
                RawClient.request(type: 0, cookie: 1, offset: 0, length: UInt32(n))
                    + RawClient.request(type: 2, cookie: 2, offset: 0, length: 0))
            usleep(500_000) // the server has queued the reply and seen the DISC by now
            let r = try c.simpleReply()
            XCTAssertEqual(r.error, 0)
            XCTAssertEqual(r.cookie, 1)
            XCTAssertEqual(try c.recv(n).count, n, "the whole READ reply arrives before the close")
            XCTAssertThrowsError(try c.recv(1), "then the server closes the connection")
        }
    }

    func testOversizedWriteIsAnsweredOnlyAfterItsPayloadIsReceived() async throws {
        // Over the advertised maximum, but within the 32 MiB the spec asks every server to take:
        // drained and answered, and the connection stays in sync.
        let disk = try TestDisk.ram(size: 1 << 20)
        let spec = TestServer.ExportSpec(name: "disk", disk: disk, maximumPayload: 1 << 20)
        try await TestServer.with(try await TestServer.start([spec])) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk")
            let len = (1 << 20) + 4096 // advertised maximum payload is 1 MiB
            let chunk = [UInt8](repeating: 0x33, count: 1 << 20)
            try c.send(RawClient.request(type: 1, cookie: 42, offset: 0, length: UInt32(len)))
            try c.send(chunk) // 1 MiB of the payload so far
            XCTAssertFalse(
                c.hasData(withinMilliseconds: 300),
                "the server replied to a WRITE whose payload it has not received yet")
            var sent = chunk.count
            while sent < len {
                let n = min(chunk.count, len - sent)
                try c.send(Array(chunk.prefix(n)))
                sent += n
            }
            let r = try c.simpleReply()
            XCTAssertEqual(r.cookie, 42)
            XCTAssertEqual(r.error, 22, "EINVAL")
            // The payload was skipped, not parsed as requests, and not written.
            try c.send(RawClient.request(type: 0, cookie: 43, offset: 0, length: 8))
            let rr = try c.simpleReply()
            XCTAssertEqual(rr.cookie, 43)
            XCTAssertEqual(rr.error, 0)
            XCTAssertEqual(try c.recv(8), [UInt8](repeating: 0, count: 8))
        }
    }

    /// Over both the maximum (64 MiB here) and the 32 MiB courtesy: a hard disconnect at the header,
    /// as the spec allows, instead of draining up to 4 GiB.
    func testWriteFarOverTheMaximumEndsTheConnection() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk")
            try c.send(RawClient.request(type: 1, cookie: 42, offset: 0, length: UInt32((64 << 20) + 4096)))
            XCTAssertTrue(c.hasData(withinMilliseconds: 5000), "the server must hang up (EOF is readable)")
            XCTAssertThrowsError(try c.recv(1), "no reply, only the end of the connection")
        }
    }

    /// A READ of length 0 is answered in every reply mode: a simple reply without data, or
    /// NBD_REPLY_TYPE_NONE with DONE once structured replies are on (with DF too: no content
    /// chunk may describe zero bytes). It used to get no answer at all with structured replies.
    func testZeroLengthReadIsAnsweredInEveryMode() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let simple = try RawClient(path: s.socketPath)
            _ = try simple.negotiate(export: "disk")
            try simple.send(RawClient.request(type: 0, cookie: 1, offset: 4096, length: 0))
            XCTAssertEqual(try simple.simpleReply().cookie, 1)
            XCTAssertFalse(simple.hasData(withinMilliseconds: 50), "a zero-length READ carries no data")

            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk", structured: true)
            for (cookie, flags, offset) in [(UInt64(2), UInt16(0), UInt64(0)), (3, 4, 4096), (4, 0, 1 << 20)] {
                try c.send(RawClient.request(flags: flags, type: 0, cookie: cookie, offset: offset, length: 0))
                let ch = try c.structuredChunk()
                XCTAssertEqual(ch.cookie, cookie)
                XCTAssertEqual(ch.type, 0, "NBD_REPLY_TYPE_NONE (flags \(flags), offset \(offset))")
                XCTAssertEqual(ch.flags & 1, 1, "with NBD_REPLY_FLAG_DONE")
                XCTAssertTrue(ch.payload.isEmpty)
            }
            // Past the end, even with length 0: EINVAL as an error chunk.
            try c.send(RawClient.request(type: 0, cookie: 5, offset: (1 << 20) + 1, length: 0))
            let e = try c.structuredChunk()
            XCTAssertEqual(e.cookie, 5)
            XCTAssertEqual(e.type, 0x8001)
            XCTAssertEqual(Array(e.payload.prefix(4)), [0, 0, 0, 22])
            // The connection goes on.
            try c.send(RawClient.request(type: 0, cookie: 6, offset: 0, length: 512))
            let d = try c.structuredChunk()
            XCTAssertEqual(d.cookie, 6)
            XCTAssertTrue(d.type == 1 || d.type == 2)
        }
    }

    /// nbd-tester-client's integrityhuge trace: 48 MiB WRITEs and READs with simple replies and
    /// no block-size negotiation (above the 32 MiB virtnbd used to refuse), each larger than one
    /// device request, so split below and answered as one reply.
    func testFortyEightMebibyteSimpleRepliesRoundTrip() async throws {
        try await TestServer.with(try await TestServer.ram(size: 64 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk")
            let n = 48 << 20
            let offset: UInt64 = 8 << 20
            var data = [UInt8](repeating: 0, count: n)
            for i in stride(from: 0, to: n, by: 8) {
                var v = UInt64(i) &* 0x9E37_79B9_7F4A_7C15
                for k in 0..<8 {
                    data[i + k] = UInt8(truncatingIfNeeded: v)
                    v >>= 8
                }
            }
            try c.send(RawClient.request(type: 1, cookie: 0x48, offset: offset, length: UInt32(n)) + data)
            let w = try c.simpleReply()
            XCTAssertEqual(w.cookie, 0x48)
            XCTAssertEqual(w.error, 0, "a 48 MiB WRITE is accepted")
            try c.send(RawClient.request(type: 0, cookie: 0x49, offset: offset, length: UInt32(n)))
            let r = try c.simpleReply()
            XCTAssertEqual(r.cookie, 0x49)
            XCTAssertEqual(r.error, 0)
            let back = try c.recv(n)
            XCTAssertTrue(sameBytes(back, data), "48 MiB read back differ: \(firstDifference(back, data))")
        }
    }

    func testHandshakeUnknownClientFlagsCloseTheConnection() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.recv(18)
            try c.send([0, 0, 0, 4])
            XCTAssertThrowsError(try c.recv(1), "the server must close on unknown client flags")
        }
    }

    func testOptAbortIsAckedThenClosed() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.recv(18)
            var w = Wire()
            w.u32(1)
            w.u64(0x4948_4156_454F_5054)
            w.u32(2)
            w.u32(0)
            try c.send(w.bytes)
            var r = WireReader(try c.recv(20))
            XCTAssertEqual(r.u64(), 0x3_e889_0455_65a9)
            XCTAssertEqual(r.u32(), 2)
            XCTAssertEqual(r.u32(), 1, "NBD_REP_ACK")
            XCTAssertEqual(r.u32(), 0)
            XCTAssertThrowsError(try c.recv(1), "closed after the ACK")
        }
    }
}
