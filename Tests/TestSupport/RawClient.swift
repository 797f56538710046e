// A minimal blocking NBD client on a Unix socket, for byte-level checks against the real server
// (IntegrationTests), written from the spec like `Wire`.
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// A minimal blocking NBD client on a Unix socket, written from the spec.
public final class RawClient {
    public let fd: Int32

    public init(path: String) throws {
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

    public func send(_ bytes: [UInt8]) throws {
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

    public func recv(_ count: Int) throws -> [UInt8] {
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
    public func hasData(withinMilliseconds ms: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, ms) > 0
    }

    /// Greeting, client flags, [NBD_OPT_STRUCTURED_REPLY,] NBD_OPT_GO; returns the export size.
    public func negotiate(export: String, structured: Bool = false) throws -> UInt64 {
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

    public static func request(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32)
        -> [UInt8]
    {
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
    public func structuredChunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8]) {
        var r = WireReader(try recv(20))
        guard r.u32() == 0x668e_33ef, let f = r.u16(), let t = r.u16(), let c = r.u64(), let n = r.u32() else {
            throw POSIXError(.EPROTO)
        }
        return (f, t, c, try recv(Int(n)))
    }

    /// Reads one simple reply: (error, cookie).
    public func simpleReply() throws -> (error: UInt32, cookie: UInt64) {
        var r = WireReader(try recv(16))
        guard r.u32() == 0x6744_6698, let e = r.u32(), let c = r.u64() else { throw POSIXError(.EPROTO) }
        return (e, c)
    }
}
