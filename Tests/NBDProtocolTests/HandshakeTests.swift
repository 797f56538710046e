// HandshakeStateMachine against the spec ("Newstyle negotiation", "Fixed newstyle negotiation",
// "Option types", "Option reply types"), with client bytes built by ClientWire.swift.
import NBDProtocol
import NIOCore
import TestSupport
import XCTest

/// Drives a state machine and keeps what it did.
struct Negotiation {
    var sm: HandshakeStateMachine
    var input = ByteBuffer()
    var actions: [HandshakeAction] = []

    init(_ catalog: NBDExportCatalog = HandshakeTests.catalog) { sm = HandshakeStateMachine(catalog: catalog) }

    @discardableResult
    mutating func feed(_ bytes: [UInt8]) -> [HandshakeAction] {
        input.writeBytes(bytes)
        let a = sm.receive(&input)
        actions += a
        return a
    }

    /// Client flags, then the given options; returns the actions of the options only.
    @discardableResult
    mutating func start(flags: UInt32 = Spec.cFixedNewstyle | Spec.cNoZeroes, _ options: [UInt8] = [])
        -> [HandshakeAction]
    {
        let a = feed(Client.flags(flags))
        precondition(a.isEmpty, "client flags alone must not produce actions")
        return feed(options)
    }
}

func sentBytes(_ actions: [HandshakeAction]) -> [UInt8] {
    actions.flatMap { a -> [UInt8] in if case .send(let b) = a { return b.allBytes } else { return [] } }
}
func closeReasons(_ actions: [HandshakeAction]) -> [String] {
    actions.compactMap { a in if case .close(let r) = a { return r } else { return nil } }
}
func startedExports(_ actions: [HandshakeAction]) -> [NBDExportInfo] {
    actions.compactMap { a in if case .startTransmission(let e) = a { return e.export } else { return nil } }
}

/// NBD_REP_INFO payloads of one reply stream, by info type.
func infos(_ replies: [OptReply]) -> [(type: UInt16, body: [UInt8])] {
    replies.filter { $0.type == Spec.repInfo }.map { r in
        (UInt16(r.data[0]) << 8 | UInt16(r.data[1]), Array(r.data.dropFirst(2)))
    }
}

final class HandshakeTests: XCTestCase {
    static let disk = NBDExportInfo(
        name: "disk", description: "the main disk", size: 0x1_2345_6000,
        flags: [.sendFlush, .sendFUA, .sendTrim],
        minimumBlockSize: 512, preferredBlockSize: 8192, maximumPayload: 1 << 25)
    /// HAS_FLAGS bit0 + SEND_FLUSH bit2 + SEND_FUA bit3 + SEND_TRIM bit5, spelled from the spec.
    static let diskWireFlags: UInt16 = 0b10_1101
    static let other = NBDExportInfo(name: "other", size: 4096, flags: [.readOnly])
    /// 7 characters, 10 UTF-8 bytes: catches lengths counted in characters.
    static let unicode = NBDExportInfo(name: "émoji-✓", description: "déscription ✓", size: 8192, flags: [])
    static let catalog = NBDExportCatalog([disk, other, unicode])

    // MARK: greeting and client flags

    func testGreetingIs18BytesWithMagicsAndFixedNewstyleNoZeroes() {
        let g = HandshakeStateMachine(catalog: Self.catalog).greeting().allBytes
        XCTAssertEqual(g.count, 18)
        var r = WireReader(g)
        XCTAssertEqual(r.u64(), Spec.nbdmagic)
        XCTAssertEqual(r.u64(), Spec.ihaveopt)
        XCTAssertEqual(r.u16(), 0b11, "FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1)")
        XCTAssertEqual(Array(g.prefix(8)), Array("NBDMAGIC".utf8))
        XCTAssertEqual(Array(g[8..<16]), Array("IHAVEOPT".utf8))
    }

    func testKnownClientFlagsAreAccepted() {
        for f: UInt32 in [0, 1, 2, 3] {
            var n = Negotiation()
            let a = n.feed(Client.flags(f))
            XCTAssertEqual(a, [], "flags \(f)")
            XCTAssertEqual(n.input.readableBytes, 0)
            XCTAssertFalse(n.sm.isFinished)
            XCTAssertEqual(n.sm.clientNoZeroes, f & 2 != 0)
        }
    }

    func testUnknownClientFlagCloses() {
        for f: UInt32 in [1 << 2, 0x8000_0000, 0xffff_ffff, 0b111] {
            var n = Negotiation()
            let a = n.feed(Client.flags(f))
            XCTAssertEqual(a.count, 1, "flags 0x\(String(f, radix: 16))")
            XCTAssertEqual(closeReasons(a).count, 1)
            XCTAssertTrue(sentBytes(a).isEmpty)
            XCTAssertTrue(n.sm.isFinished)
            // Nothing after a close is processed.
            XCTAssertEqual(n.feed(Client.option(Spec.optList)), [])
        }
    }

    func testClientFlagsNeedFourBytes() {
        var n = Negotiation()
        XCTAssertEqual(n.feed([0, 0, 0]), [])
        XCTAssertEqual(n.input.readableBytes, 3, "a partial flags field must stay buffered")
        let a = n.feed([4])
        XCTAssertEqual(closeReasons(a).count, 1, "flags 0x00000004 has an unknown bit")
        XCTAssertEqual(n.input.readableBytes, 0)
    }

    func testBadOptionMagicCloses() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optList, magic: 0x4948_4156_454F_5055))
        XCTAssertEqual(closeReasons(a).count, 1)
        XCTAssertTrue(sentBytes(a).isEmpty)
        XCTAssertTrue(n.sm.isFinished)
    }

    func testOptionHeaderNeeds16Bytes() {
        var n = Negotiation()
        let opt = Client.option(Spec.optList)
        XCTAssertEqual(n.start(Array(opt.prefix(15))), [])
        XCTAssertEqual(n.input.readableBytes, 15)
        let a = n.feed(Array(opt.suffix(1)))
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)).last?.type, Spec.repAck)
    }

    // MARK: NBD_OPT_EXPORT_NAME

    func testExportNameWithoutNoZeroesSends134Bytes() {
        var n = Negotiation()
        let a = n.start(flags: Spec.cFixedNewstyle, Client.option(Spec.optExportName, Array("disk".utf8)))
        let out = sentBytes(a)
        XCTAssertEqual(out.count, 134)
        var r = WireReader(out)
        XCTAssertEqual(r.u64(), 0x1_2345_6000)
        XCTAssertEqual(r.u16(), Self.diskWireFlags)
        XCTAssertEqual(r.take(124), [UInt8](repeating: 0, count: 124))
        XCTAssertEqual(startedExports(a), [Self.disk])
        XCTAssertTrue(n.sm.isFinished)
        if case .startTransmission = a.last {
        } else {
            XCTFail("startTransmission must come after the reply bytes: \(a)")
        }
    }

    func testExportNameWithNoZeroesSends10Bytes() {
        var n = Negotiation()
        let a = n.start(
            flags: Spec.cFixedNewstyle | Spec.cNoZeroes, Client.option(Spec.optExportName, Array("other".utf8)))
        let out = sentBytes(a)
        XCTAssertEqual(out.count, 10)
        var r = WireReader(out)
        XCTAssertEqual(r.u64(), 4096)
        XCTAssertEqual(r.u16(), 0b11, "HAS_FLAGS | READ_ONLY")
        XCTAssertEqual(startedExports(a).map(\.name), ["other"])
    }

    func testExportNameEmptySelectsDefaultExport() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optExportName, []))
        XCTAssertEqual(startedExports(a).map(\.name), ["disk"])
        XCTAssertEqual(sentBytes(a).count, 10)
    }

    func testExportNameUnicodeMatchesByBytes() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optExportName, Array("émoji-✓".utf8)))
        XCTAssertEqual(startedExports(a).map(\.size), [8192])
    }

    func testExportNameUnknownCloses() {
        var n = Negotiation()
        let a = n.start(flags: Spec.cFixedNewstyle, Client.option(Spec.optExportName, Array("nope".utf8)))
        XCTAssertTrue(sentBytes(a).isEmpty, "there is no error reply to EXPORT_NAME: the session ends")
        XCTAssertEqual(closeReasons(a).count, 1)
        XCTAssertTrue(startedExports(a).isEmpty)
        XCTAssertTrue(n.sm.isFinished)
    }

    func testExportNameLeavesTransmissionBytesInTheBuffer() {
        var n = Negotiation()
        let req = Client.request(type: Spec.cmdRead, cookie: 1, offset: 0, length: 512)
        let a = n.start(Client.option(Spec.optExportName, Array("disk".utf8)) + req)
        XCTAssertEqual(startedExports(a).count, 1)
        XCTAssertEqual(n.input.allBytes, req, "pipelined transmission bytes belong to the transmission parser")
    }

    // MARK: NBD_OPT_GO / NBD_OPT_INFO

    func testGoSendsExportInfoBlockSizeAndAckThenStartsTransmission() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertTrue(replies.allSatisfy { $0.option == Spec.optGo }, "every reply echoes the option")
        XCTAssertEqual(replies.last, OptReply(option: Spec.optGo, type: Spec.repAck, data: []))
        let inf = infos(replies)
        let export = inf.filter { $0.type == Spec.infoExport }
        XCTAssertEqual(export.count, 1, "NBD_INFO_EXPORT is mandatory before ACK")
        if let e = export.first {
            XCTAssertEqual(e.body.count, 10, "length 12 including the type")
            var r = WireReader(e.body)
            XCTAssertEqual(r.u64(), 0x1_2345_6000)
            XCTAssertEqual(r.u16(), Self.diskWireFlags)
        }
        XCTAssertFalse(inf.contains { $0.type == Spec.infoName }, "NAME was not requested")
        XCTAssertFalse(inf.contains { $0.type == Spec.infoDescription }, "DESCRIPTION was not requested")
        XCTAssertEqual(startedExports(a), [Self.disk])
        if case .startTransmission = a.last {} else { XCTFail("startTransmission must follow the ACK") }
        XCTAssertTrue(n.sm.isFinished)
    }

    func testGoWithoutNoZeroesSendsNoPaddingAfterAck() {
        var n = Negotiation()
        let a = n.start(flags: Spec.cFixedNewstyle, Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        let out = sentBytes(a)
        let replies = decodeOptionReplies(out) // fails on trailing bytes that are not a reply
        let total = replies.reduce(0) { $0 + 20 + $1.data.count }
        XCTAssertEqual(out.count, total, "no zero padding follows the ACK of NBD_OPT_GO")
        XCTAssertEqual(replies.last?.type, Spec.repAck)
    }

    func testGoWithNameDescriptionAndBlockSizeRequests() {
        var n = Negotiation()
        let a = n.start(
            Client.option(
                Spec.optGo,
                Client.goData(name: "disk", infos: [Spec.infoName, Spec.infoDescription, Spec.infoBlockSize, 0x7777])))
        let replies = decodeOptionReplies(sentBytes(a))
        let inf = infos(replies)
        XCTAssertEqual(inf.filter { $0.type == Spec.infoExport }.count, 1)
        XCTAssertEqual(inf.first { $0.type == Spec.infoName }.map { String(decoding: $0.body, as: UTF8.self) }, "disk")
        XCTAssertEqual(
            inf.first { $0.type == Spec.infoDescription }.map { String(decoding: $0.body, as: UTF8.self) },
            "the main disk")
        let bs = inf.filter { $0.type == Spec.infoBlockSize }
        XCTAssertEqual(bs.count, 1)
        if let b = bs.first {
            XCTAssertEqual(b.body.count, 12, "length 14 including the type")
            var r = WireReader(b.body)
            XCTAssertEqual(r.u32(), 512, "minimum")
            XCTAssertEqual(r.u32(), 8192, "preferred")
            XCTAssertEqual(r.u32(), 1 << 25, "maximum payload")
        }
        XCTAssertFalse(inf.contains { $0.type == 0x7777 }, "unknown info requests are ignored")
        XCTAssertEqual(Set(inf.map(\.type)).count, inf.count, "each info type at most once")
        XCTAssertEqual(replies.last?.type, Spec.repAck)
        XCTAssertEqual(replies.dropLast().map(\.type), Array(repeating: Spec.repInfo, count: replies.count - 1))
        XCTAssertEqual(startedExports(a).map(\.name), ["disk"])
    }

    func testGoUnicodeNameAndDescriptionLengthsAreInBytes() {
        var n = Negotiation()
        let a = n.start(
            Client.option(Spec.optGo, Client.goData(name: "émoji-✓", infos: [Spec.infoName, Spec.infoDescription])))
        let inf = infos(decodeOptionReplies(sentBytes(a)))
        XCTAssertEqual(inf.first { $0.type == Spec.infoName }?.body, Array("émoji-✓".utf8))
        XCTAssertEqual(inf.first { $0.type == Spec.infoDescription }?.body, Array("déscription ✓".utf8))
        XCTAssertEqual(startedExports(a).map(\.size), [8192])
    }

    func testGoEmptyNameSelectsDefault() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optGo, Client.goData(name: "", infos: [Spec.infoName])))
        let inf = infos(decodeOptionReplies(sentBytes(a)))
        XCTAssertEqual(inf.first { $0.type == Spec.infoName }?.body, Array("disk".utf8))
        XCTAssertEqual(startedExports(a).map(\.name), ["disk"])
    }

    func testInfoDoesNotEndNegotiation() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optInfo, Client.goData(name: "other", infos: [Spec.infoBlockSize])))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertTrue(replies.allSatisfy { $0.option == Spec.optInfo })
        XCTAssertEqual(replies.last?.type, Spec.repAck)
        let exp = infos(replies).first { $0.type == Spec.infoExport }
        XCTAssertEqual(exp?.body, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0b11])
        XCTAssertTrue(startedExports(a).isEmpty, "INFO must not start transmission")
        XCTAssertFalse(n.sm.isFinished)
        // Negotiation goes on: a GO now works.
        let b = n.feed(Client.option(Spec.optGo, Client.goData(name: "other", infos: [])))
        XCTAssertEqual(startedExports(b).map(\.name), ["other"])
    }

    /// An option a little over the limit is drained and refused with ERR_TOO_BIG; one far over it
    /// (an announced 4 GiB) closes the connection without reading it.
    func testOverlongOptionsAreRefusedOrEndTheConnection() {
        var n = Negotiation()
        let big = HandshakeStateMachine.maxOptionLength + 1
        let a = n.start(Client.option(Spec.optList, [UInt8](repeating: 0x41, count: big)))
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)).map(\.type), [Spec.errTooBig])
        XCTAssertTrue(closeReasons(a).isEmpty)
        for length in [UInt32(HandshakeStateMachine.maxDrainedOptionLength + 1), UInt32.max] {
            var m = Negotiation()
            let b = m.start(Client.option(Spec.optInfo, lengthOverride: length))
            XCTAssertTrue(sentBytes(b).isEmpty, "nothing answered for \(length)")
            XCTAssertEqual(closeReasons(b).count, 1, "closed for \(length)")
            XCTAssertTrue(m.sm.isFinished)
        }
    }

    func testGoUnknownExportIsErrUnknownAndNegotiationContinues() {
        for opt in [Spec.optGo, Spec.optInfo] {
            var n = Negotiation()
            let a = n.start(Client.option(opt, Client.goData(name: "nope", infos: [Spec.infoName])))
            let replies = decodeOptionReplies(sentBytes(a))
            XCTAssertEqual(replies.map(\.type), [Spec.errUnknown], "no INFO replies before ERR_UNKNOWN")
            XCTAssertEqual(replies.first?.option, opt)
            XCTAssertTrue(startedExports(a).isEmpty)
            XCTAssertTrue(closeReasons(a).isEmpty)
            // The operator's log learns the name asked for and the names there are.
            let reports = a.compactMap { x in if case .report(let r) = x { return r } else { return nil } }
            XCTAssertEqual(reports.count, 1)
            XCTAssertTrue(
                reports.first?.hasPrefix("the client asked for export \"nope\" (NBD_OPT_") ?? false, "\(reports)")
            XCTAssertTrue(
                reports.first?.hasSuffix("which does not exist; exports: \"disk\", \"other\", \"émoji-✓\"") ?? false,
                "\(reports)")
            XCTAssertFalse(n.sm.isFinished)
            let b = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
            XCTAssertEqual(startedExports(b).map(\.name), ["disk"])
        }
    }

    func testMalformedGoPayloadsAreErrInvalidAndParsingContinues() {
        let malformed: [(String, [UInt8])] = [
            ("name length larger than the data", Client.goData(name: "disk", infos: [], nameLengthOverride: 5)),
            (
                "name length far larger than the data",
                Client.goData(name: "disk", infos: [], nameLengthOverride: 0xffff_fff0)
            ),
            ("name length leaves no room for the count", Client.goData(name: "disk", infos: [], nameLengthOverride: 6)),
            ("info count larger than the list", Client.goData(name: "disk", infos: [Spec.infoName], countOverride: 3)),
            (
                "info count smaller than the list",
                Client.goData(name: "disk", infos: [Spec.infoName, Spec.infoDescription], countOverride: 1)
            ),
            ("odd trailing byte", Client.goData(name: "disk", infos: [Spec.infoName]) + [0]),
            ("empty payload", []),
            ("only two bytes", [0, 0]),
            ("name length but no count", [0, 0, 0, 0]),
        ]
        for opt in [Spec.optGo, Spec.optInfo] {
            for (what, data) in malformed {
                var n = Negotiation()
                let a = n.start(Client.option(opt, data))
                let replies = decodeOptionReplies(sentBytes(a))
                XCTAssertEqual(replies.map(\.type), [Spec.errInvalid], "\(what) (option \(opt))")
                XCTAssertEqual(replies.first?.option, opt, what)
                XCTAssertTrue(startedExports(a).isEmpty, what)
                XCTAssertTrue(closeReasons(a).isEmpty, what)
                XCTAssertEqual(n.input.readableBytes, 0, "the whole option is consumed: \(what)")
                // The next option is parsed from the right place.
                let b = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
                XCTAssertEqual(startedExports(b).map(\.name), ["disk"], what)
            }
        }
    }

    // MARK: unknown and other options

    func testUnknownOptionIsErrUnsupWithOptionEchoed() {
        var n = Negotiation()
        let a = n.start(Client.option(0x7654321, [1, 2, 3, 4, 5]))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertEqual(replies.count, 1)
        XCTAssertEqual(replies.first?.option, 0x7654321)
        XCTAssertEqual(replies.first?.type, Spec.errUnsup)
        XCTAssertTrue(closeReasons(a).isEmpty)
        XCTAssertFalse(n.sm.isFinished)
        // Several unknown options in one buffer, then LIST: all answered in order.
        let b = n.feed(Client.option(0xdead_beef) + Client.option(0) + Client.option(Spec.optList))
        let r2 = decodeOptionReplies(sentBytes(b))
        XCTAssertEqual(Array(r2.prefix(2)).map(\.option), [0xdead_beef, 0])
        XCTAssertEqual(Array(r2.prefix(2)).map(\.type), [Spec.errUnsup, Spec.errUnsup])
        XCTAssertEqual(r2.last, OptReply(option: Spec.optList, type: Spec.repAck, data: []))
    }

    func testStartTLSIsRefusedAndStructuredRepliesAckedAndNegotiationContinues() {
        // "NOTLS mode": STARTTLS gets ERR_POLICY or ERR_UNSUP. STRUCTURED_REPLY with no data: ACK.
        for (opt, allowed) in [
            (Spec.optStartTLS, [Spec.errPolicy, Spec.errUnsup]), (Spec.optStructuredReply, [Spec.repAck]),
        ] {
            var n = Negotiation()
            let a = n.start(Client.option(opt))
            let replies = decodeOptionReplies(sentBytes(a))
            XCTAssertEqual(replies.count, 1)
            XCTAssertEqual(replies.first?.option, opt)
            XCTAssertTrue(
                allowed.contains(replies.first?.type ?? 0),
                "option \(opt): reply 0x\(String(replies.first?.type ?? 0, radix: 16))")
            XCTAssertFalse(n.sm.isFinished)
            let b = n.feed(Client.option(Spec.optList))
            XCTAssertEqual(decodeOptionReplies(sentBytes(b)).last?.type, Spec.repAck)
        }
    }

    func testListSendsOneServerReplyPerExportThenAck() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optList))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertTrue(replies.allSatisfy { $0.option == Spec.optList })
        XCTAssertEqual(replies.map(\.type), [Spec.repServer, Spec.repServer, Spec.repServer, Spec.repAck])
        XCTAssertEqual(replies.last?.data, [])
        var got: [(String, String)] = []
        for rep in replies where rep.type == Spec.repServer {
            var r = WireReader(rep.data)
            guard let len = r.u32() else {
                XCTFail("short SERVER reply")
                continue
            }
            XCTAssertLessThanOrEqual(Int(len), rep.data.count - 4, "name length MUST be <= reply length - 4")
            guard let name = r.take(Int(len)) else {
                XCTFail("name length \(len) overruns the reply")
                continue
            }
            got.append((String(decoding: name, as: UTF8.self), String(decoding: r.take(r.remaining)!, as: UTF8.self)))
        }
        XCTAssertEqual(got.map(\.0), ["disk", "other", "émoji-✓"])
        XCTAssertEqual(got.map(\.1), ["the main disk", "", "déscription ✓"])
        XCTAssertFalse(n.sm.isFinished)
        XCTAssertTrue(startedExports(a).isEmpty)
    }

    func testListWithEmptyCatalogIsJustAck() {
        var n = Negotiation(NBDExportCatalog([]))
        let a = n.start(Client.option(Spec.optList))
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)), [OptReply(option: Spec.optList, type: Spec.repAck, data: [])])
    }

    func testListWithDataIsErrInvalid() {
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optList, Array("x".utf8)))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertEqual(replies.map(\.type), [Spec.errInvalid])
        XCTAssertEqual(replies.first?.option, Spec.optList)
        XCTAssertFalse(n.sm.isFinished)
        let b = n.feed(Client.option(Spec.optList))
        XCTAssertEqual(decodeOptionReplies(sentBytes(b)).last?.type, Spec.repAck)
    }

    /// "Option haggling": a server being shut down "SHOULD error further options received (other
    /// than an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN"; EXPORT_NAME, without an error reply, closes.
    func testOptionsDuringShutdownGetErrShutdownAndAbortIsStillAcked() {
        let errShutdown: UInt32 = 0x8000_0007 // spelled from the spec: 2^31 + 7
        var n = Negotiation()
        n.start()
        n.sm.shuttingDown = true
        for opt in [Spec.optList, Spec.optGo, Spec.optInfo, Spec.optStructuredReply, 0x4242] {
            let data = opt == Spec.optGo || opt == Spec.optInfo ? Client.goData(name: "disk", infos: []) : []
            let a = n.feed(Client.option(opt, data))
            XCTAssertEqual(decodeOptionReplies(sentBytes(a)).map(\.type), [errShutdown], "option \(opt)")
            XCTAssertTrue(startedExports(a).isEmpty)
            XCTAssertTrue(closeReasons(a).isEmpty)
        }
        let abort = n.feed(Client.option(Spec.optAbort))
        XCTAssertEqual(decodeOptionReplies(sentBytes(abort)).map(\.type), [Spec.repAck])
        XCTAssertTrue(n.sm.isFinished)

        var e = Negotiation()
        e.start()
        e.sm.shuttingDown = true
        let a = e.feed(Client.option(Spec.optExportName, Array("disk".utf8)))
        XCTAssertTrue(sentBytes(a).isEmpty)
        XCTAssertEqual(closeReasons(a).count, 1)
        XCTAssertTrue(startedExports(a).isEmpty)
    }

    /// More options than `maxOptions` in one negotiation end it (a denial of service: "Option
    /// haggling" allows a hard disconnect); up to the limit each is answered.
    func testTooManyOptionsCloseTheNegotiation() {
        var n = Negotiation()
        n.start()
        let limit = HandshakeStateMachine.maxOptions
        let one = Client.option(0x4242)
        let under = n.feed(Array((0..<limit).map { _ in one }.joined()))
        XCTAssertEqual(decodeOptionReplies(sentBytes(under)).count, limit)
        XCTAssertTrue(closeReasons(under).isEmpty)
        let over = n.feed(one)
        XCTAssertTrue(sentBytes(over).isEmpty)
        XCTAssertEqual(closeReasons(over), ["more than \(limit) options without choosing an export"])
        XCTAssertTrue(n.sm.isFinished)
    }

    func testAbortIsAckedThenCloses() {
        for data: [UInt8] in [[], [9, 9, 9]] { // "a server SHOULD ignore any data"
            var n = Negotiation()
            let a = n.start(Client.option(Spec.optAbort, data))
            XCTAssertEqual(a.count, 2, "\(a)")
            XCTAssertEqual(
                decodeOptionReplies(sentBytes(Array(a.prefix(1)))),
                [OptReply(option: Spec.optAbort, type: Spec.repAck, data: [])])
            if case .close = a.last {} else { XCTFail("ABORT must close after the ACK: \(a)") }
            XCTAssertTrue(n.sm.isFinished)
            XCTAssertTrue(startedExports(a).isEmpty)
        }
    }

    // MARK: oversized options

    func testOversizedOptionIsDrainedWithoutBufferingThenErrTooBig() {
        let len = HandshakeStateMachine.maxOptionLength + 50_001
        var n = Negotiation()
        var w = Wire()
        w.u64(Spec.ihaveopt)
        w.u32(Spec.optGo)
        w.u32(UInt32(len))
        XCTAssertEqual(n.start(w.bytes), [])
        XCTAssertEqual(n.input.readableBytes, 0)
        var fed = 0
        let piece = [UInt8](repeating: 0xAB, count: 999)
        while fed < len {
            let k = min(piece.count, len - fed)
            let a = n.feed(Array(piece.prefix(k)))
            fed += k
            XCTAssertEqual(n.input.readableBytes, 0, "drained bytes must not be buffered (after \(fed) of \(len))")
            if fed < len {
                XCTAssertEqual(a, [], "no reply before the whole option is drained")
            } else {
                let replies = decodeOptionReplies(sentBytes(a))
                XCTAssertEqual(replies.map(\.type), [Spec.errTooBig])
                XCTAssertEqual(replies.first?.option, Spec.optGo)
            }
        }
        XCTAssertFalse(n.sm.isFinished)
        // Parsing resumes at the next option header.
        let b = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        XCTAssertEqual(startedExports(b).map(\.name), ["disk"])
    }

    func testOversizedOptionDrainedFromOneBufferWithNextOptionBehindIt() {
        let len = HandshakeStateMachine.maxOptionLength + 1
        var n = Negotiation()
        let a = n.start(Client.option(0x1234, [UInt8](repeating: 1, count: len)) + Client.option(Spec.optList))
        let replies = decodeOptionReplies(sentBytes(a))
        XCTAssertEqual(replies.first.map { [$0.option, $0.type] }, [0x1234, Spec.errTooBig])
        XCTAssertEqual(replies.last?.type, Spec.repAck)
        XCTAssertEqual(replies.last?.option, Spec.optList)
        XCTAssertEqual(n.input.readableBytes, 0)
    }

    /// "The server will reply to any option apart from NBD_OPT_EXPORT_NAME with reply packets";
    /// an EXPORT_NAME it cannot satisfy "MUST terminate the session". A client waiting for the
    /// 8-byte size would read an option reply's magic as the export size.
    func testOversizedExportNameGetsNoOptionReplyAndCloses() {
        let len = HandshakeStateMachine.maxOptionLength + 1
        var n = Negotiation()
        let a = n.start(Client.option(Spec.optExportName, [UInt8](repeating: 0x61, count: len)))
        XCTAssertEqual(sentBytes(a), [], "no option reply may answer NBD_OPT_EXPORT_NAME")
        XCTAssertEqual(closeReasons(a).count, 1, "an EXPORT_NAME that cannot be satisfied ends the session")
        XCTAssertTrue(startedExports(a).isEmpty)
    }

    func testOptionOfExactlyMaxLengthIsBuffered() {
        let len = HandshakeStateMachine.maxOptionLength
        var n = Negotiation()
        let opt = Client.option(0x1234, [UInt8](repeating: 1, count: len))
        XCTAssertEqual(n.start(Array(opt.dropLast())), [])
        XCTAssertEqual(n.input.readableBytes, len - 1, "an option within the limit is buffered until complete")
        let a = n.feed([1])
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)).map(\.type), [Spec.errUnsup])
    }

    // MARK: feeding patterns

    func testByteAtATimeGivesTheSameActionsAsAllAtOnce() {
        let session =
            Client.flags(Spec.cFixedNewstyle)
            + Client.option(0x7654321, [1, 2])
            + Client.option(Spec.optList)
            + Client.option(Spec.optList, [7])
            + Client.option(
                Spec.optInfo,
                Client.goData(name: "émoji-✓", infos: [Spec.infoName, Spec.infoDescription, Spec.infoBlockSize]))
            + Client.option(Spec.optGo, Client.goData(name: "nope", infos: []))
            + Client.option(Spec.optGo, Client.goData(name: "disk", infos: [], countOverride: 2))
            + Client.option(Spec.optGo, Client.goData(name: "disk", infos: [Spec.infoBlockSize]))
        var whole = Negotiation()
        let all = whole.feed(session)
        XCTAssertEqual(startedExports(all).map(\.name), ["disk"])
        XCTAssertEqual(whole.input.readableBytes, 0)

        var bytewise = Negotiation()
        for b in session { bytewise.feed([b]) }
        XCTAssertEqual(bytewise.actions, all)
        XCTAssertEqual(sentBytes(bytewise.actions), sentBytes(all))

        // Uneven pieces too.
        var chunked = Negotiation()
        var i = 0
        var k = 1
        while i < session.count {
            let e = min(session.count, i + k)
            chunked.feed(Array(session[i..<e]))
            i = e
            k = k % 13 + 2
        }
        XCTAssertEqual(chunked.actions, all)
    }

    func testNothingIsProcessedAfterGo() {
        var n = Negotiation()
        let trailing = Client.option(Spec.optList)
        let a = n.start(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])) + trailing)
        XCTAssertEqual(startedExports(a).count, 1)
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)).filter { $0.option == Spec.optList }, [])
        XCTAssertEqual(n.input.allBytes, trailing, "bytes after GO are left for the transmission phase")
        XCTAssertEqual(n.feed([]), [])
    }
}
