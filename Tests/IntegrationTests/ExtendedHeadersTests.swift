// NBD_OPT_EXTENDED_HEADERS against the real server. No packaged client speaks them yet
// (libnbd 1.14, qemu 7.2), so this client is written here straight from the extension branch
// text ("Request message", "Extended reply chunk message", "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"),
// with every constant spelled out, sharing nothing with the server's encoders.
import Foundation
import TestSupport
import VirtioEmulator
import XCTest

/// One extended reply chunk: magic 0x6e8a278c, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
struct ExtChunk {
    var flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, payload: [UInt8]
    var done: Bool { flags & 1 != 0 }
}

extension RawClient {
    /// Greeting, client flags, then `options` in order; returns (option, reply type, data) for each reply.
    func extOption(_ option: UInt32, _ data: [UInt8] = []) throws -> [(UInt32, [UInt8])] {
        var w = Wire()
        w.u64(0x4948_4156_454F_5054)
        w.u32(option)
        w.u32(UInt32(data.count))
        w.raw(data)
        try send(w.bytes)
        var replies: [(UInt32, [UInt8])] = []
        while true {
            var h = WireReader(try recv(20))
            guard h.u64() == 0x3_e889_0455_65a9, h.u32() == option, let type = h.u32(), let len = h.u32() else {
                throw POSIXError(.EPROTO)
            }
            let d = try recv(Int(len))
            replies.append((type, d))
            if type == 1 || type >= 0x8000_0000 { return replies }
        }
    }

    func sendExtRequest(
        flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64, payload: [UInt8] = []
    ) throws {
        try send(
            extendedRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length, payload: payload))
    }

    func readExtChunk() throws -> ExtChunk {
        var h = WireReader(try recv(32))
        guard h.u32() == 0x6e8a_278c else { throw POSIXError(.EPROTO) }
        let flags = h.u16()!
        let type = h.u16()!
        let cookie = h.u64()!
        let offset = h.u64()!
        let len = h.u64()!
        return ExtChunk(flags: flags, type: type, cookie: cookie, offset: offset, payload: try recv(Int(len)))
    }

    /// Chunks until DONE.
    func readExtReply() throws -> [ExtChunk] {
        var out: [ExtChunk] = []
        repeat { out.append(try readExtChunk()) } while !out.last!.done
        return out
    }
}

final class ExtendedHeadersTests: XCTestCase {
    static let size: UInt64 = 8 << 30 // 8 GiB sparse RAM export: effect lengths beyond 32 bits
    static let payloadLen: UInt16 = 1 << 5, reqOne: UInt16 = 1 << 3
    static let cmdRead: UInt16 = 0, cmdWrite: UInt16 = 1, cmdFlush: UInt16 = 3, cmdTrim: UInt16 = 4,
        cmdBlockStatus: UInt16 = 7

    func withServer(_ body: (TestServer) async throws -> Void) async throws {
        let disk = try TestDisk(backend: try RAMBackend(size: Self.size), holes: [0..<Self.size])
        try await TestServer.with(try await TestServer.start([.init(name: "disk", disk: disk)]), body)
    }

    /// Negotiates extended headers, base:allocation, then GO; returns the client and the context id.
    func connect(_ s: TestServer) throws -> (RawClient, UInt32) {
        let c = try RawClient(path: s.socketPath)
        var g = WireReader(try c.recv(18))
        XCTAssertEqual(g.u64(), 0x4e42_444d_4147_4943)
        try c.send([0, 0, 0, 3])
        let eh = try c.extOption(11)
        XCTAssertEqual(eh.map(\.0), [1], "NBD_OPT_EXTENDED_HEADERS acknowledged")
        var q = Wire()
        q.u32(4)
        q.str("disk")
        q.u32(1)
        q.u32(15)
        q.str("base:allocation")
        let meta = try c.extOption(10, q.bytes)
        XCTAssertEqual(meta.map(\.0), [4, 1])
        var m = WireReader(meta[0].1)
        let ctx = try XCTUnwrap(m.u32())
        XCTAssertEqual(try Self.go(c).size, Self.size)
        return (c, ctx)
    }

    /// Each request refused by the parser is answered with its own reason, and the connection
    /// goes on: an extended WRITE without PAYLOAD_LEN, and a payload on FLUSH. (Both used to be
    /// answered "WRITE payload exceeds the maximum payload".)
    func testParserRejectionsSayWhatWasWrong() async throws {
        try await withServer { s in
            let (c, _) = try self.connect(s)
            try c.sendExtRequest(flags: 0, type: Self.cmdWrite, cookie: 0x10, offset: 0, length: 512)
            try c.sendExtRequest(
                flags: Self.payloadLen, type: Self.cmdFlush, cookie: 0x11, offset: 0, length: 3, payload: [1, 2, 3])
            for (cookie, want) in [(UInt64(0x10), "PAYLOAD_LEN"), (0x11, "takes no payload")] {
                let r = try c.readExtReply()
                XCTAssertEqual(r.count, 1)
                XCTAssertEqual(r[0].cookie, cookie)
                XCTAssertEqual(r[0].type, 0x8001)
                var p = WireReader(r[0].payload)
                XCTAssertEqual(p.u32(), 22)
                let len = Int(p.u16()!)
                let message = String(decoding: r[0].payload.dropFirst(6).prefix(len), as: UTF8.self)
                XCTAssertTrue(message.contains(want), "cookie \(cookie): \(message)")
                XCTAssertFalse(message.contains("exceeds the maximum"), message)
            }
            try c.sendExtRequest(flags: 0, type: Self.cmdRead, cookie: 0x12, offset: 0, length: 0)
            let z = try c.readExtReply()
            XCTAssertEqual(z.map(\.type), [0], "a zero-length READ is NONE with DONE")
            XCTAssertEqual(z.first?.cookie, 0x12)
        }
    }

    func testExtendedRequestsAndReplies() async throws {
        try await withServer { s in
            let (c, ctx) = try self.connect(s)
            // WRITE must carry PAYLOAD_LEN; success is NONE with DONE, echoing cookie and offset.
            let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            try c.sendExtRequest(
                flags: Self.payloadLen, type: Self.cmdWrite, cookie: 0x1111, offset: 4096, length: 8192, payload: data)
            var r = try c.readExtReply()
            XCTAssertEqual(r.count, 1)
            XCTAssertEqual(r[0].type, 0)
            XCTAssertEqual(r[0].cookie, 0x1111)
            XCTAssertEqual(r[0].offset, 4096)
            XCTAssertTrue(r[0].payload.isEmpty)

            // READ across hole, data, hole: OFFSET_HOLE / OFFSET_DATA chunks, every header offset = request offset.
            try c.sendExtRequest(flags: 0, type: Self.cmdRead, cookie: 0x2222, offset: 0, length: 16384)
            r = try c.readExtReply()
            XCTAssertTrue(r.allSatisfy { $0.cookie == 0x2222 && $0.offset == 0 })
            var image = [UInt8](repeating: 0xEE, count: 16384)
            for ch in r {
                var p = WireReader(ch.payload)
                let off = Int(p.u64()!)
                switch ch.type {
                case 1: image.replaceSubrange(off..<off + ch.payload.count - 8, with: ch.payload[8...])
                case 2:
                    let n = Int(p.u32()!)
                    image.replaceSubrange(off..<off + n, with: [UInt8](repeating: 0, count: n))
                default: XCTFail("unexpected chunk type \(ch.type)")
                }
            }
            XCTAssertEqual(Set(r.map(\.type)), [1, 2], "holes come back as OFFSET_HOLE")
            XCTAssertEqual(image, [UInt8](repeating: 0, count: 4096) + data + [UInt8](repeating: 0, count: 4096))

            // BLOCK_STATUS over all 8 GiB (a 64-bit effect length) → BLOCK_STATUS_EXT with 64-bit lengths.
            try c.sendExtRequest(flags: 0, type: Self.cmdBlockStatus, cookie: 0x3333, offset: 0, length: Self.size)
            r = try c.readExtReply()
            XCTAssertEqual(r.count, 1)
            XCTAssertEqual(r[0].type, 6)
            var bs = WireReader(r[0].payload)
            XCTAssertEqual(bs.u32(), ctx)
            XCTAssertEqual(bs.u32(), 3, "descriptor count")
            let ext = (0..<3).map { _ in (bs.u64()!, bs.u64()!) }
            XCTAssertEqual(ext.map(\.0), [4096, 8192, Self.size - 12288])
            XCTAssertEqual(ext.map(\.1), [3, 0, 3])
            XCTAssertGreaterThan(ext[2].0, UInt64(UInt32.max), "an extent longer than 32 bits")
            XCTAssertEqual(r[0].payload.count, 8 + 16 * 3)

            // REQ_ONE: one descriptor.
            try c.sendExtRequest(
                flags: Self.reqOne, type: Self.cmdBlockStatus, cookie: 0x3334, offset: 4096, length: 1 << 20)
            r = try c.readExtReply()
            var one = WireReader(r[0].payload)
            _ = one.u32()
            XCTAssertEqual(one.u32(), 1)
            XCTAssertEqual(one.u64(), 8192)
            XCTAssertEqual(one.u64(), 0)

            // TRIM with an effect length over 32 bits.
            try c.sendExtRequest(flags: 0, type: Self.cmdTrim, cookie: 0x4444, offset: 0, length: 5 << 30)
            r = try c.readExtReply()
            XCTAssertEqual(r.map(\.type), [0])

            // Errors are ERROR chunks (never simple replies), and the connection goes on.
            try c.sendExtRequest(flags: 0, type: Self.cmdRead, cookie: 0x5555, offset: Self.size - 10, length: 20)
            r = try c.readExtReply()
            XCTAssertEqual(r.map(\.type), [0x8001])
            XCTAssertEqual(r[0].offset, Self.size - 10)
            var e = WireReader(r[0].payload)
            XCTAssertEqual(e.u32(), 22)
            // A WRITE without PAYLOAD_LEN has no payload: EINVAL.
            try c.sendExtRequest(flags: 0, type: Self.cmdWrite, cookie: 0x6666, offset: 0, length: 512)
            r = try c.readExtReply()
            XCTAssertEqual(r.map(\.type), [0x8001])
            // A payload on FLUSH is consumed, then refused; the next request parses.
            try c.sendExtRequest(
                flags: Self.payloadLen, type: Self.cmdFlush, cookie: 0x7777, offset: 0, length: 10,
                payload: [UInt8](repeating: 9, count: 10))
            r = try c.readExtReply()
            XCTAssertEqual(r.map(\.type), [0x8001])
            XCTAssertEqual(r[0].cookie, 0x7777)
            try c.sendExtRequest(flags: 0, type: Self.cmdFlush, cookie: 0x8888, offset: 0, length: 0)
            r = try c.readExtReply()
            XCTAssertEqual(r.map(\.type), [0])
            XCTAssertEqual(r[0].cookie, 0x8888)

            // A compact request after extended headers is out of sync: hard disconnect.
            var w = Wire()
            w.u32(0x2560_9513)
            w.u16(0)
            w.u16(0)
            w.u64(9)
            w.u64(0)
            w.u32(512)
            try c.send(w.bytes)
            XCTAssertThrowsError(try c.recv(1), "the server drops a client that sends a compact request")
        }
    }

    /// Filtered BLOCK_STATUS (NBD_FLAG_BLOCK_STATUS_PAYLOAD): offered only with extended headers
    /// and negotiated contexts; a payload naming context ids gets chunks for those only, in its
    /// order; an unknown id is consumed and EINVAL, and the connection goes on. No packaged
    /// client sends the payload form (libnbd 1.14 has no `block_status_filter`, qemu 7.2 none).
    func testFilteredBlockStatus() async throws {
        let disk = try TestDisk.ram(size: 1 << 20)
        let spec = TestServer.ExportSpec(name: "disk", disk: disk, bitmaps: ["b0"])
        try await TestServer.with(try await TestServer.start([spec])) { s in
            // Without SET_META_CONTEXT: not offered.
            let plain = try RawClient(path: s.socketPath)
            _ = try plain.recv(18)
            try plain.send([0, 0, 0, 3])
            XCTAssertEqual(try plain.extOption(11).map(\.0), [1])
            XCTAssertEqual(try Self.go(plain).flags & (1 << 12), 0, "no contexts: BLOCK_STATUS_PAYLOAD not offered")

            let c = try RawClient(path: s.socketPath)
            _ = try c.recv(18)
            try c.send([0, 0, 0, 3])
            XCTAssertEqual(try c.extOption(11).map(\.0), [1])
            var q = Wire()
            q.u32(4)
            q.str("disk")
            q.u32(2)
            q.u32(15)
            q.str("base:allocation")
            q.u32(20)
            q.str("qemu:dirty-bitmap:b0")
            let meta = try c.extOption(10, q.bytes)
            XCTAssertEqual(meta.map(\.0), [4, 4, 1])
            var ids: [String: UInt32] = [:]
            for (_, d) in meta.dropLast() {
                var r = WireReader(d)
                let id = try XCTUnwrap(r.u32())
                ids[String(decoding: d.dropFirst(4), as: UTF8.self)] = id
            }
            let base = try XCTUnwrap(ids["base:allocation"])
            let dirty = try XCTUnwrap(ids["qemu:dirty-bitmap:b0"])
            XCTAssertNotEqual(try Self.go(c).flags & (1 << 12), 0, "extended headers and contexts: offered")

            // Dirty one block, so the bitmap's answer differs from "all clean".
            try c.sendExtRequest(
                flags: Self.payloadLen, type: Self.cmdWrite, cookie: 1, offset: 0, length: 4096,
                payload: [UInt8](repeating: 7, count: 4096))
            XCTAssertEqual(try c.readExtReply().map(\.type), [0])

            func filtered(_ cookie: UInt64, _ want: [UInt32], effect: UInt64 = 1 << 20) throws -> [ExtChunk] {
                var p = Wire()
                p.u64(effect)
                for i in want { p.u32(i) }
                try c.sendExtRequest(
                    flags: Self.payloadLen, type: Self.cmdBlockStatus, cookie: cookie, offset: 0,
                    length: UInt64(p.bytes.count), payload: p.bytes)
                return try c.readExtReply()
            }
            func contextOf(_ ch: ExtChunk) -> UInt32? {
                var r = WireReader(ch.payload)
                return r.u32()
            }
            var r = try filtered(2, [dirty])
            XCTAssertEqual(r.map(\.type), [6], "one BLOCK_STATUS_EXT chunk")
            XCTAssertEqual(r.map(contextOf), [dirty], "for the bitmap only")
            var d = WireReader(r[0].payload)
            _ = d.u32()
            let n = try XCTUnwrap(d.u32())
            XCTAssertGreaterThan(n, 0)
            XCTAssertEqual(d.u64().map { $0 > 0 }, true)
            XCTAssertEqual(d.u64(), 1, "the written block is dirty")

            r = try filtered(3, [dirty, base])
            XCTAssertEqual(r.map(contextOf), [dirty, base], "both, in the order asked")
            XCTAssertEqual(r.map(\.done), [false, true])

            r = try filtered(4, [base, 77])
            XCTAssertEqual(r.map(\.type), [0x8001], "an unknown id: an error chunk")
            var e = WireReader(r[0].payload)
            XCTAssertEqual(e.u32(), 22, "EINVAL")
            r = try filtered(5, [base, base])
            XCTAssertEqual(r.map(\.type), [0x8001], "an id twice (longer than the payload limit): EINVAL")

            // The connection goes on: an unfiltered BLOCK_STATUS answers every context.
            try c.sendExtRequest(flags: 0, type: Self.cmdBlockStatus, cookie: 6, offset: 0, length: 1 << 20)
            XCTAssertEqual(Set(try c.readExtReply().map(contextOf)), [base, dirty])
        }
    }

    /// NBD_OPT_GO for "disk"; the size and transmission flags of its NBD_INFO_EXPORT.
    static func go(_ c: RawClient) throws -> (size: UInt64, flags: UInt16) {
        var go = Wire()
        go.u32(4)
        go.str("disk")
        go.u16(0)
        let r = try c.extOption(7, go.bytes)
        XCTAssertEqual(r.last?.0, 1)
        var info = WireReader(r[0].1)
        XCTAssertEqual(info.u16(), 0, "NBD_INFO_EXPORT")
        return (try XCTUnwrap(info.u64()), try XCTUnwrap(info.u16()))
    }

    func testNegotiationRules() async throws {
        try await withServer { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.recv(18)
            try c.send([0, 0, 0, 3])
            XCTAssertEqual(
                try c.extOption(11, [1]).map(\.0), [0x8000_0003], "data with EXTENDED_HEADERS is ERR_INVALID")
            XCTAssertEqual(try c.extOption(11).map(\.0), [1])
            XCTAssertEqual(
                try c.extOption(8).map(\.0), [0x8000_000a],
                "STRUCTURED_REPLY after EXTENDED_HEADERS: ERR_EXT_HEADER_REQD")
            // EXPORT_NAME is forbidden after extended headers: the server ends the session.
            var w = Wire()
            w.u64(0x4948_4156_454F_5054)
            w.u32(1)
            w.u32(4)
            w.str("disk")
            try c.send(w.bytes)
            XCTAssertThrowsError(try c.recv(1))
        }
    }
}
