// Export catalog behaviour and the protocol constants, each checked against doc/proto.md "Values".
import NBDProtocol
import XCTest

final class CatalogTests: XCTestCase {
    let a = NBDExportInfo(name: "a", description: "first", size: 4096, flags: [])
    let b = NBDExportInfo(name: "b", size: 8192, flags: [.readOnly])

    func testLookupByExactName() {
        let c = NBDExportCatalog([a, b])
        XCTAssertEqual(c.lookup("b"), b)
        XCTAssertEqual(c.lookup("a"), a)
        XCTAssertNil(c.lookup("B"), "names are case sensitive")
        XCTAssertNil(c.lookup("a "))
        XCTAssertNil(c.lookup("c"))
    }

    func testEmptyNameSelectsTheFirstExport() {
        XCTAssertEqual(NBDExportCatalog([a, b]).lookup(""), a)
        XCTAssertNil(NBDExportCatalog([]).lookup(""))
    }

    func testExportNamedEmptyIsPreferredForEmptyName() {
        let empty = NBDExportInfo(name: "", size: 12288, flags: [])
        XCTAssertEqual(NBDExportCatalog([a, empty]).lookup(""), empty)
    }

    func testExportInfoAlwaysHasHasFlagsAndSpecDefaults() {
        let e = NBDExportInfo(name: "x", size: 1, flags: [.sendFlush])
        XCTAssertEqual(e.flags.rawValue, 0b101)
        XCTAssertEqual(e.minimumBlockSize, 1)
        XCTAssertEqual(e.preferredBlockSize, 4096)
        XCTAssertEqual(e.maximumPayload, 64 << 20, "64 MiB, as nbdkit")
        XCTAssertEqual(e.description, "")
    }
}

final class ConstantsTests: XCTestCase {
    func testMagics() {
        XCTAssertEqual(NBDMagic.nbdmagic, 0x4e42_444d_4147_4943)
        XCTAssertEqual(NBDMagic.ihaveopt, 0x4948_4156_454F_5054)
        XCTAssertEqual(NBDMagic.optionReply, 0x3_e889_0455_65a9)
        XCTAssertEqual(NBDMagic.request, 0x2560_9513)
        XCTAssertEqual(NBDMagic.simpleReply, 0x6744_6698)
        XCTAssertEqual(NBDMagic.structuredReply, 0x668e_33ef)
        XCTAssertEqual(NBDMagic.extendedRequest, 0x21e4_1c71)
        XCTAssertEqual(NBDMagic.extendedReply, 0x6e8a_278c)
    }

    func testHandshakeFlags() {
        XCTAssertEqual(NBDHandshakeFlags.fixedNewstyle, 1)
        XCTAssertEqual(NBDHandshakeFlags.noZeroes, 2)
        XCTAssertEqual(NBDHandshakeFlags.clientFixedNewstyle, 1)
        XCTAssertEqual(NBDHandshakeFlags.clientNoZeroes, 2)
        XCTAssertEqual(NBDHandshakeFlags.knownClientFlags, 3)
    }

    func testOptionNumbers() {
        let expected: [(NBDOption, UInt32)] = [
            (.exportName, 1), (.abort, 2), (.list, 3), (.peekExport, 4), (.startTLS, 5), (.info, 6),
            (.go, 7), (.structuredReply, 8), (.listMetaContext, 9), (.setMetaContext, 10), (.extendedHeaders, 11),
        ]
        for (o, v) in expected { XCTAssertEqual(o.rawValue, v, "\(o)") }
    }

    func testOptionReplyTypes() {
        XCTAssertEqual([NBDReply.ack, NBDReply.server, NBDReply.info, NBDReply.metaContext], [1, 2, 3, 4])
        let errs = [
            NBDReply.errUnsup, NBDReply.errPolicy, NBDReply.errInvalid, NBDReply.errPlatform, NBDReply.errTLSReqd,
            NBDReply.errUnknown, NBDReply.errShutdown, NBDReply.errBlockSizeReqd, NBDReply.errTooBig,
            NBDReply.errExtHeaderReqd,
        ]
        XCTAssertEqual(errs, (1...10).map { (1 << 31) + UInt32($0) })
    }

    func testInfoTypes() {
        XCTAssertEqual([NBDInfo.export, NBDInfo.name, NBDInfo.description, NBDInfo.blockSize], [0, 1, 2, 3])
    }

    func testTransmissionFlagBits() {
        let flags: [NBDTransmissionFlags] = [
            .hasFlags, .readOnly, .sendFlush, .sendFUA, .rotational, .sendTrim, .sendWriteZeroes,
            .sendDF, .canMultiConn, .sendResize, .sendCache, .sendFastZero, .blockStatusPayload,
        ]
        for (bit, f) in flags.enumerated() { XCTAssertEqual(f.rawValue, 1 << UInt16(bit), "bit \(bit)") }
    }

    func testCommandNumbers() {
        let cmds: [NBDCommand] = [.read, .write, .disc, .flush, .trim, .cache, .writeZeroes, .blockStatus, .resize]
        for (n, c) in cmds.enumerated() { XCTAssertEqual(c.rawValue, UInt16(n), "\(c)") }
    }

    func testCommandFlagBits() {
        let flags: [NBDCommandFlags] = [.fua, .noHole, .df, .reqOne, .fastZero, .payloadLen]
        for (bit, f) in flags.enumerated() { XCTAssertEqual(f.rawValue, 1 << UInt16(bit), "bit \(bit)") }
    }

    func testErrorValues() {
        let expected: [(NBDErrno, UInt32)] = [
            (.perm, 1), (.io, 5), (.nomem, 12), (.inval, 22), (.nospc, 28), (.overflow, 75), (.notsup, 95),
            (.shutdown, 108),
        ]
        for (e, v) in expected { XCTAssertEqual(e.rawValue, v, "\(e)") }
    }

    func testSizes() {
        XCTAssertEqual(TransmissionParser.requestSize, 28)
        XCTAssertGreaterThanOrEqual(
            HandshakeStateMachine.maxOptionLength, 4096 + 6, "must hold a GO/INFO with a 4096-byte name")
    }
}
