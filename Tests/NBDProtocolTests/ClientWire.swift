// A tiny client-side encoder/decoder for the tests, written from doc/proto.md
// ("Newstyle negotiation", "Option haggling", "Request message", "Simple reply message").
// It deliberately does not use the server's encoders or constants: every number is spelled out
// here from the spec text, so the tests compare the server against the spec, not against itself.
import NIOCore
import TestSupport
import XCTest

enum Spec {
    static let nbdmagic: UInt64 = 0x4e42_444d_4147_4943 // "NBDMAGIC"
    static let ihaveopt: UInt64 = 0x4948_4156_454F_5054 // "IHAVEOPT"
    static let optReplyMagic: UInt64 = 0x3_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698

    // Client flags
    static let cFixedNewstyle: UInt32 = 1
    static let cNoZeroes: UInt32 = 2

    // Options
    static let optExportName: UInt32 = 1, optAbort: UInt32 = 2, optList: UInt32 = 3, optStartTLS: UInt32 = 5
    static let optInfo: UInt32 = 6, optGo: UInt32 = 7, optStructuredReply: UInt32 = 8

    // Option replies
    static let repAck: UInt32 = 1, repServer: UInt32 = 2, repInfo: UInt32 = 3
    static let errUnsup: UInt32 = 0x8000_0001, errPolicy: UInt32 = 0x8000_0002, errInvalid: UInt32 = 0x8000_0003
    static let errUnknown: UInt32 = 0x8000_0006, errTooBig: UInt32 = 0x8000_0009

    // Info types
    static let infoExport: UInt16 = 0, infoName: UInt16 = 1, infoDescription: UInt16 = 2, infoBlockSize: UInt16 = 3

    // Commands
    static let cmdRead: UInt16 = 0, cmdWrite: UInt16 = 1, cmdDisc: UInt16 = 2, cmdFlush: UInt16 = 3, cmdTrim: UInt16 = 4
    static let cmdWriteZeroes: UInt16 = 6
}

enum Client {
    static func flags(_ f: UInt32) -> [UInt8] {
        var w = Wire()
        w.u32(f)
        return w.bytes
    }

    /// C: IHAVEOPT, option, length, data.
    static func option(
        _ opt: UInt32, _ data: [UInt8] = [], magic: UInt64 = Spec.ihaveopt, lengthOverride: UInt32? = nil
    ) -> [UInt8] {
        var w = Wire()
        w.u64(magic)
        w.u32(opt)
        w.u32(lengthOverride ?? UInt32(data.count))
        w.raw(data)
        return w.bytes
    }

    /// NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, u16 × count.
    static func goData(name: String, infos: [UInt16], nameLengthOverride: UInt32? = nil, countOverride: UInt16? = nil)
        -> [UInt8]
    {
        var w = Wire()
        w.u32(nameLengthOverride ?? UInt32(name.utf8.count))
        w.str(name)
        w.u16(countOverride ?? UInt16(infos.count))
        for i in infos { w.u16(i) }
        return w.bytes
    }

    /// "Request message": magic, flags, type, cookie, offset, length (28 bytes), then payload.
    static func request(
        flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []
    ) -> [UInt8] {
        var w = Wire()
        w.u32(Spec.requestMagic)
        w.u16(flags)
        w.u16(type)
        w.u64(cookie)
        w.u64(offset)
        w.u32(length)
        w.raw(payload)
        return w.bytes
    }
}

/// One decoded "option reply".
struct OptReply: Equatable {
    var option: UInt32
    var type: UInt32
    var data: [UInt8]
    var isError: Bool { type & 0x8000_0000 != 0 }
}

/// Decodes a stream of option replies; fails the test on a bad magic or a truncated reply.
func decodeOptionReplies(_ bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) -> [OptReply] {
    var r = WireReader(bytes)
    var out: [OptReply] = []
    while r.remaining > 0 {
        guard let magic = r.u64(), let opt = r.u32(), let type = r.u32(), let len = r.u32(), let data = r.take(Int(len))
        else {
            XCTFail("truncated option reply at byte \(r.pos) of \(bytes.count)", file: file, line: line)
            return out
        }
        XCTAssertEqual(magic, Spec.optReplyMagic, "option reply magic", file: file, line: line)
        out.append(OptReply(option: opt, type: type, data: data))
    }
    return out
}

extension ByteBuffer {
    var allBytes: [UInt8] { getBytes(at: readerIndex, length: readableBytes) ?? [] }
}

func buffer(_ bytes: [UInt8]) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeBytes(bytes)
    return b
}
