// Byte-level checks against the real server over a Unix socket, for what libnbd cannot show.
import Foundation
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// A minimal blocking NBD client on a Unix socket, written from the spec.
final class RawClient {
    let fd: Int32

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let b = Array(path.utf8)
            p.copyBytes(from: b.prefix(p.count - 1))
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard r == 0 else {
            let e = errno
            Glibc.close(fd)
            throw POSIXError(.init(rawValue: e) ?? .EIO)
        }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw POSIXError(.init(rawValue: errno) ?? .EIO)
            }
            off += n
        }
    }

    func recv(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let n = out[off...].withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { throw POSIXError(.ECONNRESET) }
            if n < 0 {
                if errno == EINTR { continue }
                throw POSIXError(.init(rawValue: errno) ?? .EIO)
            }
            off += n
        }
        return out
    }

    /// Whether any byte arrives within `ms` milliseconds.
    func hasData(withinMilliseconds ms: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, ms) > 0
    }

    /// Greeting, client flags, [NBD_OPT_STRUCTURED_REPLY,] NBD_OPT_GO; returns the export size.
    func negotiate(export: String, structured: Bool = false) throws -> UInt64 {
        var g = WireReader(try recv(18))
        guard g.u64() == 0x4e42_444d_4147_4943, g.u64() == 0x4948_4156_454F_5054 else { throw POSIXError(.EPROTO) }
        var w = Wire()
        w.u32(3) // C_FIXED_NEWSTYLE | C_NO_ZEROES
        if structured {
            w.u64(0x4948_4156_454F_5054)
            w.u32(8)
            w.u32(0)
            try send(w.bytes)
            w = Wire()
            var h = WireReader(try recv(20))
            guard h.u64() == 0x3_e889_0455_65a9, h.u32() == 8, h.u32() == 1, h.u32() == 0 else {
                throw POSIXError(.EPROTO)
            }
        }
        var data = Wire()
        data.u32(UInt32(export.utf8.count))
        data.str(export)
        data.u16(0)
        w.u64(0x4948_4156_454F_5054)
        w.u32(7)
        w.u32(UInt32(data.bytes.count))
        w.raw(data.bytes)
        try send(w.bytes)
        var size: UInt64 = 0
        while true {
            var h = WireReader(try recv(20))
            guard h.u64() == 0x3_e889_0455_65a9, h.u32() == 7, let type = h.u32(), let len = h.u32() else {
                throw POSIXError(.EPROTO)
            }
            var d = WireReader(try recv(Int(len)))
            if type == 1 { return size }
            guard type == 3 else { throw POSIXError(.ENOENT) }
            if d.u16() == 0 { size = d.u64() ?? 0 }
        }
    }

    static func request(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
        var w = Wire()
        w.u32(0x2560_9513)
        w.u16(flags)
        w.u16(type)
        w.u64(cookie)
        w.u64(offset)
        w.u32(length)
        return w.bytes
    }

    /// Reads one structured reply chunk (magic 0x668e33ef): flags, type, cookie, payload.
    func structuredChunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8]) {
        var r = WireReader(try recv(20))
        guard r.u32() == 0x668e_33ef, let f = r.u16(), let t = r.u16(), let c = r.u64(), let n = r.u32() else {
            throw POSIXError(.EPROTO)
        }
        return (f, t, c, try recv(Int(n)))
    }

    /// Reads one simple reply: (error, cookie).
    func simpleReply() throws -> (error: UInt32, cookie: UInt64) {
        var r = WireReader(try recv(16))
        guard r.u32() == 0x6744_6698, let e = r.u32(), let c = r.u64() else { throw POSIXError(.EPROTO) }
        return (e, c)
    }
}

/// Wire/WireReader are test-local copies of the NBDProtocolTests helpers (test targets cannot share code).
struct Wire {
    var bytes: [UInt8] = []
    mutating func u16(_ v: UInt16) { bytes += [UInt8(v >> 8), UInt8(v & 0xff)] }
    mutating func u32(_ v: UInt32) {
        for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) }
    }
    mutating func u64(_ v: UInt64) {
        for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) }
    }
    mutating func str(_ s: String) { bytes += Array(s.utf8) }
    mutating func raw(_ b: [UInt8]) { bytes += b }
}

struct WireReader {
    let bytes: [UInt8]
    var pos = 0
    init(_ b: [UInt8]) { bytes = b }
    mutating func uint(_ n: Int) -> UInt64? {
        guard bytes.count - pos >= n else { return nil }
        defer { pos += n }
        return bytes[pos..<pos + n].reduce(0) { ($0 << 8) | UInt64($1) }
    }
    mutating func u16() -> UInt16? { uint(2).map { UInt16($0) } }
    mutating func u32() -> UInt32? { uint(4).map { UInt32($0) } }
    mutating func u64() -> UInt64? { uint(8) }
}

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
    func testOversizedWriteIsAnsweredOnlyAfterItsPayloadIsReceived() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try RawClient(path: s.socketPath)
            _ = try c.negotiate(export: "disk")
            let len = (64 << 20) + 4096 // advertised maximum payload is 64 MiB
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
            XCTAssertTrue(back == data, "48 MiB read back differ: \(firstDifference(back, data))")
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
