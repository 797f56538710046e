// TransmissionRules and ReplyEncoder against "Request types", "Command flags" and "Structured
// reply chunk message", without sockets: every command × every flag × simple / structured /
// extended replies, zero and maximal lengths, ranges at and past the end. The expectations are
// written out here from the spec text, not computed with the code under test.
import NBDProtocol
import NIOCore
import TestSupport
import XCTest

final class TransmissionRulesTests: XCTestCase {
    enum Mode: CaseIterable { case simple, structured, extended }

    static let size: UInt64 = 1 << 20
    static let maxPayload: UInt64 = 64 << 20
    /// Everything a writable export of the emulator advertises.
    static let writable: NBDTransmissionFlags = [
        .hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero,
        .canMultiConn, .sendCache, .sendDF,
    ]

    func rules(
        _ mode: Mode, flags: NBDTransmissionFlags = writable, context: UInt32? = 1, canFastZero: Bool = true,
        size: UInt64 = size
    ) -> TransmissionRules {
        var f = flags
        if mode == .simple { f.remove(.sendDF) } // as the handshake does without structured replies
        let info = NBDExportInfo(name: "", size: size, flags: f)
        let session = NBDSession(
            export: info, structuredReplies: mode != .simple, extendedHeaders: mode == .extended,
            allocationContext: mode == .simple ? nil : context)
        return TransmissionRules(
            session: session,
            export: ExportFacts(
                size: size, flags: session.export.flags, maximumPayload: Self.maxPayload,
                canFastZero: canFastZero))
    }

    func request(
        _ cmd: UInt16, flags: UInt16 = 0, offset: UInt64 = 0, length: UInt64 = 4096,
        cookie: UInt64 = 0x1122_3344_5566_7788
    ) -> NBDRequest {
        NBDRequest(flags: NBDCommandFlags(rawValue: flags), type: cmd, cookie: cookie, offset: offset, length: length)
    }

    func isFailure(_ d: RequestDecision, _ errno: NBDErrno) -> Bool {
        if case .fail(let e, let m) = d { return e == errno && !m.isEmpty }
        return false
    }

    // MARK: flags

    /// "Command flags", per command (commands 0-8; FUA needs SEND_FUA, DF needs SEND_DF, which
    /// needs structured replies).
    func testEveryCommandWithEveryFlagInEveryMode() {
        let fua: UInt16 = 1
        let noHole: UInt16 = 2
        let df: UInt16 = 4
        let reqOne: UInt16 = 8
        let fastZero: UInt16 = 16
        let payloadLen: UInt16 = 32
        // command -> flags it may carry (besides FUA, valid on every command once SEND_FUA is set)
        let valid: [UInt16: UInt16] = [0: df, 1: 0, 3: 0, 4: 0, 5: 0, 6: noHole | fastZero, 7: reqOne]
        for mode in Mode.allCases {
            let r = rules(mode)
            // BLOCK_STATUS needs a context, which needs structured replies (testBlockStatusNeedsANegotiatedContext).
            for cmd: UInt16 in mode == .simple ? [0, 1, 3, 4, 5, 6] : [0, 1, 3, 4, 5, 6, 7] {
                for bit in 0..<16 {
                    let flag = UInt16(1) << bit
                    var ok = flag == fua || (valid[cmd]! & flag) != 0
                    if flag == df && mode == .simple { ok = false } // SEND_DF is not given without structured replies
                    if flag == payloadLen { ok = false } // consumed by the parser; never valid here
                    let d = r.decide(request(cmd, flags: flag))
                    if ok {
                        if case .fail(let e, let m) = d {
                            XCTFail("\(mode) cmd \(cmd) flag 0x\(String(flag, radix: 16)): failed \(e) \(m)")
                        }
                    } else {
                        XCTAssertTrue(
                            isFailure(d, .inval), "\(mode) cmd \(cmd) flag 0x\(String(flag, radix: 16)): \(d)")
                    }
                }
            }
        }
        // Without SEND_FUA, FUA is refused on every command.
        let noFUA = rules(.structured, flags: Self.writable.subtracting([.sendFUA, .sendFlush]))
        for cmd: UInt16 in [0, 1, 3, 4, 5, 6, 7] {
            XCTAssertTrue(
                isFailure(noFUA.decide(request(cmd, flags: fua)), .inval), "cmd \(cmd) with FUA but no SEND_FUA")
        }
    }

    func testOperationsCarryTheirFlags() {
        let r = rules(.structured)
        XCTAssertEqual(
            r.decide(request(1, flags: 1, offset: 8, length: 9)), .run(.write(offset: 8, length: 9, fua: true)))
        XCTAssertEqual(r.decide(request(1, offset: 8, length: 9)), .run(.write(offset: 8, length: 9, fua: false)))
        XCTAssertEqual(
            r.decide(request(4, flags: 1, offset: 0, length: 4096)), .run(.trim(offset: 0, length: 4096, fua: true)))
        XCTAssertEqual(
            r.decide(request(6, flags: 2)), .run(.writeZeroes(offset: 0, length: 4096, fua: false, mayUnmap: false)))
        XCTAssertEqual(r.decide(request(6)), .run(.writeZeroes(offset: 0, length: 4096, fua: false, mayUnmap: true)))
        XCTAssertEqual(r.decide(request(3)), .run(.flush))
        XCTAssertEqual(r.decide(request(2)), .disconnect)
        XCTAssertEqual(r.decide(request(5)), .succeed, "CACHE has nothing to prefetch")
        XCTAssertEqual(
            r.decide(request(7, flags: 8, offset: 4096, length: 100)),
            .run(
                .blockStatus(
                    offset: 4096, length: 100, contexts: [NBDMetaContextID(id: 1, name: "base:allocation")],
                    reqOne: true)))
        XCTAssertEqual(rules(.simple).decide(request(0)), .run(.read(offset: 0, length: 4096, reply: .simple)))
        XCTAssertEqual(r.decide(request(0)), .run(.read(offset: 0, length: 4096, reply: .sparse)))
        XCTAssertEqual(r.decide(request(0, flags: 4)), .run(.read(offset: 0, length: 4096, reply: .contiguous)))
        XCTAssertEqual(
            rules(.extended).decide(request(0, flags: 4)), .run(.read(offset: 0, length: 4096, reply: .contiguous)))
    }

    func testUnknownCommandsAndResize() {
        for mode in Mode.allCases {
            for t: UInt16 in [8, 9, 0x4242, 0xffff] {
                XCTAssertTrue(isFailure(rules(mode).decide(request(t)), .inval), "\(mode) type \(t)")
            }
        }
    }

    // MARK: lengths and ranges

    /// Zero-length requests succeed without device I/O (READ, WRITE, TRIM, WRITE_ZEROES, CACHE),
    /// at offset 0 and at the very end; BLOCK_STATUS of length 0 is EINVAL.
    func testZeroLengthRequests() {
        for mode in Mode.allCases {
            let r = rules(mode)
            for cmd: UInt16 in [0, 1, 4, 5, 6] {
                for offset in [0, Self.size] {
                    XCTAssertEqual(
                        r.decide(request(cmd, offset: offset, length: 0)), .succeed, "\(mode) cmd \(cmd) at \(offset)")
                }
                // DF changes nothing for a zero-length READ.
                if cmd == 0 && mode != .simple { XCTAssertEqual(r.decide(request(0, flags: 4, length: 0)), .succeed) }
            }
            if mode != .simple {
                XCTAssertTrue(isFailure(r.decide(request(7, length: 0)), .inval), "\(mode) BLOCK_STATUS length 0")
            }
        }
    }

    func testRangesAtAndPastTheEnd() {
        let end = Self.size
        for mode in Mode.allCases {
            let r = rules(mode)
            // (command, errno past the end): WRITE and WRITE_ZEROES report ENOSPC, the rest EINVAL.
            let cmds: [(UInt16, NBDErrno)] =
                [(0, .inval), (1, .nospc), (4, .inval), (5, .inval), (6, .nospc)]
                + (mode == .simple ? [] : [(7, .inval)])
            for (cmd, errno) in cmds {
                XCTAssertNil(
                    r.decide(request(cmd, offset: end - 1, length: 1)).failure,
                    "\(mode) cmd \(cmd): the last byte is in range")
                XCTAssertTrue(
                    isFailure(r.decide(request(cmd, offset: end - 1, length: 2)), errno),
                    "\(mode) cmd \(cmd): one byte past the end")
                XCTAssertTrue(
                    isFailure(r.decide(request(cmd, offset: end, length: 1)), errno), "\(mode) cmd \(cmd) at the end")
                XCTAssertTrue(
                    isFailure(r.decide(request(cmd, offset: UInt64.max, length: 2)), errno),
                    "\(mode) cmd \(cmd): offset+length overflows")
                if cmd != 7 {
                    XCTAssertTrue(
                        isFailure(r.decide(request(cmd, offset: end + 1, length: 0)), errno),
                        "\(mode) cmd \(cmd): length 0 past the end")
                }
            }
        }
    }

    /// READ up to the maximum payload; above it EOVERFLOW with structured replies (the spec's
    /// "reject large read requests up front with NBD_EOVERFLOW"), EINVAL with simple ones.
    /// Effect lengths of TRIM and WRITE_ZEROES are not limited by it.
    func testMaximumPayload() {
        let big = rules(.simple, size: 1 << 40)
        XCTAssertEqual(
            big.decide(request(0, length: Self.maxPayload)),
            .run(.read(offset: 0, length: Self.maxPayload, reply: .simple)))
        XCTAssertTrue(isFailure(big.decide(request(0, length: Self.maxPayload + 1)), .inval))
        for mode in [Mode.structured, .extended] {
            let r = rules(mode, size: 1 << 40)
            XCTAssertEqual(
                r.decide(request(0, length: Self.maxPayload)),
                .run(.read(offset: 0, length: Self.maxPayload, reply: .sparse)))
            XCTAssertTrue(isFailure(r.decide(request(0, length: Self.maxPayload + 1)), .overflow), "\(mode)")
            XCTAssertTrue(
                isFailure(r.decide(request(0, flags: 4, length: Self.maxPayload + 1)), .overflow), "\(mode) DF")
            XCTAssertEqual(r.decide(request(4, length: 1 << 33)), .run(.trim(offset: 0, length: 1 << 33, fua: false)))
            XCTAssertEqual(
                r.decide(request(6, length: 1 << 33)),
                .run(.writeZeroes(offset: 0, length: 1 << 33, fua: false, mayUnmap: true)))
        }
    }

    // MARK: export facts

    func testReadOnlyExport() {
        for mode in Mode.allCases {
            let r = rules(mode, flags: [.hasFlags, .readOnly, .sendFlush, .sendFUA, .sendDF, .sendCache])
            for cmd: UInt16 in [1, 4, 6] {
                for flags: UInt16 in [0, 1, 2, 16, 3, 19] where cmd == 6 || flags <= 1 {
                    XCTAssertTrue(
                        isFailure(r.decide(request(cmd, flags: flags)), .perm), "\(mode) cmd \(cmd) flags \(flags)")
                }
                XCTAssertTrue(
                    isFailure(r.decide(request(cmd, length: 0)), .perm), "\(mode) cmd \(cmd) length 0 is still a write")
            }
            XCTAssertEqual(r.decide(request(3)), .run(.flush), "FLUSH on a read-only export is allowed, as in nbdkit")
            if case .fail = r.decide(request(0)) { XCTFail("READ on a read-only export") }
        }
    }

    func testFastZeroWithoutDeviceSupportFailsFast() {
        for mode in Mode.allCases {
            let r = rules(mode, canFastZero: false)
            XCTAssertTrue(isFailure(r.decide(request(6, flags: 16)), .notsup), "\(mode)")
            XCTAssertTrue(
                isFailure(r.decide(request(6, flags: 16, length: 0)), .notsup),
                "\(mode): the answer must not depend on the length")
            XCTAssertEqual(
                r.decide(request(6)), .run(.writeZeroes(offset: 0, length: 4096, fua: false, mayUnmap: true)))
        }
    }

    func testBlockStatusNeedsANegotiatedContext() {
        for mode in [Mode.structured, .extended] {
            let r = rules(mode, context: nil)
            guard case .fail(.inval, let m) = r.decide(request(7)) else { return XCTFail("\(mode)") }
            XCTAssertTrue(m.contains("SET_META_CONTEXT"), m)
        }
        XCTAssertTrue(isFailure(rules(.simple).decide(request(7)), .inval))
    }

    // MARK: parser rejections

    func testEachRejectionSaysWhatWasWrong() throws {
        // Compact WRITE above the maximum.
        var p = TransmissionParser(maximumPayload: 16)
        var input = buffer(
            Client.request(type: 1, cookie: 1, offset: 0, length: 17, payload: [UInt8](repeating: 1, count: 17)))
        guard case .rejected(_, let tooBig)? = try p.next(&input) else { return XCTFail("expected a rejection") }
        XCTAssertEqual(tooBig, .payloadTooLarge(length: 17, maximum: 16))

        // Extended WRITE without PAYLOAD_LEN; extended FLUSH with a payload.
        var e = TransmissionParser(maximumPayload: 4096, extendedHeaders: true)
        var x = buffer(
            extendedRequest(flags: 0, type: 1, cookie: 2, offset: 0, length: 512)
                + extendedRequest(flags: 32, type: 3, cookie: 3, offset: 0, length: 5) + [1, 2, 3, 4, 5])
        guard case .rejected(let r1, let noLen)? = try e.next(&x), case .rejected(let r2, let extra)? = try e.next(&x)
        else {
            return XCTFail("expected two rejections")
        }
        XCTAssertEqual(r1.cookie, 2)
        XCTAssertEqual(noLen, .writeWithoutPayloadLength)
        XCTAssertEqual(r2.cookie, 3)
        XCTAssertEqual(extra, .unexpectedPayload(type: 3, length: 5))
        XCTAssertEqual(x.readableBytes, 0)

        let messages = [tooBig, noLen, extra].map(\.message)
        XCTAssertTrue(messages[0].contains("maximum payload"), messages[0])
        XCTAssertTrue(messages[1].contains("PAYLOAD_LEN"), messages[1])
        XCTAssertFalse(
            messages[1].contains("maximum"),
            "an extended WRITE without PAYLOAD_LEN is not a size problem: \(messages[1])")
        XCTAssertTrue(messages[2].contains("takes no payload"), messages[2])
        XCTAssertEqual(Set(messages).count, 3)
        let r = rules(.extended)
        for rej in [tooBig, noLen, extra] { XCTAssertEqual(r.decide(rej), .fail(.inval, rej.message)) }
    }

    // MARK: reply framing

    func testZeroLengthReadIsAnsweredInEveryMode() {
        for mode in Mode.allCases {
            let r = rules(mode)
            let req = request(0, length: 0, cookie: 0xc00c1e)
            XCTAssertEqual(r.decide(req), .succeed)
            var b = ByteBuffer()
            r.replies.success(req, into: &b)
            var w = WireReader(Array(b.readableBytesView))
            switch mode {
            case .simple:
                XCTAssertEqual(w.u32(), Spec.simpleReplyMagic)
                XCTAssertEqual(w.u32(), 0)
                XCTAssertEqual(w.u64(), 0xc00c1e)
            case .structured:
                // NBD_REPLY_TYPE_NONE (0) with NBD_REPLY_FLAG_DONE, length 0.
                XCTAssertEqual(w.u32(), 0x668e_33ef)
                XCTAssertEqual(w.u16(), 1)
                XCTAssertEqual(w.u16(), 0)
                XCTAssertEqual(w.u64(), 0xc00c1e)
                XCTAssertEqual(w.u32(), 0)
            case .extended:
                XCTAssertEqual(w.u32(), 0x6e8a_278c)
                XCTAssertEqual(w.u16(), 1)
                XCTAssertEqual(w.u16(), 0)
                XCTAssertEqual(w.u64(), 0xc00c1e)
                XCTAssertEqual(w.u64(), 0)
                XCTAssertEqual(w.u64(), 0)
            }
            XCTAssertEqual(w.remaining, 0, "\(mode)")
        }
    }

    func testErrorFramingPerCommandAndMode() {
        for mode in Mode.allCases {
            for cmd: UInt16 in [0, 1, 3, 4, 5, 6, 7, 0x4242] {
                let req = request(cmd, offset: 4096, cookie: 77)
                var b = ByteBuffer()
                rules(mode).replies.error(req, .inval, message: "why", into: &b)
                var w = WireReader(Array(b.readableBytesView))
                let magic = w.u32()
                let structured = mode == .extended || (mode == .structured && (cmd == 0 || cmd == 7))
                if !structured {
                    XCTAssertEqual(magic, Spec.simpleReplyMagic, "\(mode) cmd \(cmd)")
                    XCTAssertEqual(w.u32(), 22)
                    XCTAssertEqual(w.u64(), 77)
                    XCTAssertEqual(w.remaining, 0)
                    continue
                }
                XCTAssertEqual(magic, mode == .extended ? 0x6e8a_278c : 0x668e_33ef, "\(mode) cmd \(cmd)")
                XCTAssertEqual(w.u16(), 1, "an error chunk here is final")
                XCTAssertEqual(w.u16(), 0x8001)
                XCTAssertEqual(w.u64(), 77)
                if mode == .extended {
                    XCTAssertEqual(w.u64(), 4096, "extended replies repeat the offset")
                    XCTAssertEqual(w.u64(), 9)
                } else {
                    XCTAssertEqual(w.u32(), 9)
                }
                XCTAssertEqual(w.u32(), 22)
                XCTAssertEqual(w.u16(), 3)
                XCTAssertEqual(w.take(3), Array("why".utf8))
                XCTAssertEqual(w.remaining, 0)
            }
        }
    }

    func testSuccessFramingPerCommandAndMode() {
        for mode in Mode.allCases {
            for cmd: UInt16 in [1, 3, 4, 5, 6] {
                var b = ByteBuffer()
                rules(mode).replies.success(request(cmd, cookie: 5), into: &b)
                let magic = WireReader(Array(b.readableBytesView)).peekU32
                XCTAssertEqual(magic, mode == .extended ? 0x6e8a_278c : Spec.simpleReplyMagic, "\(mode) cmd \(cmd)")
                XCTAssertEqual(b.readableBytes, mode == .extended ? 32 : 16)
            }
        }
    }

    /// A DF read is one OFFSET_DATA chunk of length 8 + data (at least 9), with DONE.
    func testContiguousReadHeader() {
        let req = request(0, flags: 4, offset: 512, length: 1, cookie: 9)
        var b = ByteBuffer()
        rules(.structured).replies.readData(req, shape: .contiguous, offset: 512, dataLength: 1, done: true, into: &b)
        var w = WireReader(Array(b.readableBytesView))
        XCTAssertEqual(w.u32(), 0x668e_33ef)
        XCTAssertEqual(w.u16(), 1)
        XCTAssertEqual(w.u16(), 1)
        XCTAssertEqual(w.u64(), 9)
        XCTAssertEqual(w.u32(), 9)
        XCTAssertEqual(w.u64(), 512)
        XCTAssertEqual(w.remaining, 0)
    }

    // MARK: block status

    typealias Run = (start: UInt64, end: UInt64, flags: UInt32)

    func testBlockStatusDescriptorsAreClippedAndMerged() {
        let runs: [Run] = [(0, 4096, 0), (4096, 8192, 3), (8192, 12288, 3), (12288, 16384, 0)]
        let d = BlockStatusDescriptors.merge(runs, offset: 100, length: 16_000, extended: false, reqOne: false)
        XCTAssertEqual(
            d, [.init(length: 3996, flags: 0), .init(length: 8192, flags: 3), .init(length: 3812, flags: 0)])
        XCTAssertEqual(d.reduce(0) { $0 + $1.length }, 16_000, "descriptors cover exactly the request")
        let one = BlockStatusDescriptors.merge(runs, offset: 5000, length: 10_000, extended: false, reqOne: true)
        XCTAssertEqual(one, [.init(length: 7288, flags: 3)], "REQ_ONE: one descriptor, no longer than the request")
    }

    func testCompactDescriptorsFitThirtyTwoBits() {
        let runs: [Run] = [(0, 1 << 34, 3)]
        let compact = BlockStatusDescriptors.merge(runs, offset: 0, length: 1 << 34, extended: false, reqOne: false)
        XCTAssertTrue(compact.allSatisfy { $0.length <= UInt64(UInt32.max) && $0.length % 4096 == 0 }, "\(compact)")
        XCTAssertEqual(compact.reduce(0) { $0 + $1.length }, 1 << 34)
        XCTAssertEqual(
            BlockStatusDescriptors.merge(runs, offset: 0, length: 1 << 34, extended: true, reqOne: false),
            [.init(length: 1 << 34, flags: 3)])
    }

    func testDescriptorCountIsCapped() {
        let n = BlockStatusDescriptors.maximumCount + 10
        let runs = (0..<n).lazy.map { i -> Run in (UInt64(i) * 4096, UInt64(i + 1) * 4096, UInt32(i & 1)) }
        let d = BlockStatusDescriptors.merge(runs, offset: 0, length: UInt64(n) * 4096, extended: true, reqOne: false)
        XCTAssertEqual(
            d.count, BlockStatusDescriptors.maximumCount,
            "the server MAY return less, and SHOULD NOT send more than 2^20")
    }
}

extension RequestDecision {
    var failure: NBDErrno? { if case .fail(let e, _) = self { return e } else { return nil } }
}

extension WireReader {
    var peekU32: UInt32? {
        var c = self
        return c.u32()
    }
}
