import NIOCore
import XCTest

@testable import NBDProtocol

/// "TLS support" (STARTTLS, ERR_TLS_REQD, state wiped by STARTTLS) and metadata-context
/// negotiation, on the pure state machine.
final class TLSAndContextTests: XCTestCase {
    static let errTLSReqd: UInt32 = 0x8000_0005
    static let optSetMeta: UInt32 = 10, optListMeta: UInt32 = 9, repMeta: UInt32 = 4

    /// "disk" advertises DF, so whether a session keeps it shows whether structured replies held.
    static let catalog = NBDExportCatalog([
        NBDExportInfo(name: "disk", size: 1 << 20, flags: [.sendFlush, .sendDF]),
        NBDExportInfo(name: "other", size: 4096, flags: [.readOnly]),
    ])

    func machine(_ tls: NBDTLSPolicy) -> Negotiation {
        var n = Negotiation(Self.catalog)
        n.sm = HandshakeStateMachine(catalog: Self.catalog, tls: tls)
        return n
    }

    static func metaQuery(export: String, _ queries: [String]) -> [UInt8] {
        var b: [UInt8] = []
        func u32(_ v: UInt32) { b += [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
        u32(UInt32(export.utf8.count))
        b += Array(export.utf8)
        u32(UInt32(queries.count))
        for q in queries {
            u32(UInt32(q.utf8.count))
            b += Array(q.utf8)
        }
        return b
    }

    func testRequireRefusesEverythingButStartTLSAbortAndExportName() {
        for opt in [Spec.optList, Spec.optInfo, Spec.optGo, Spec.optStructuredReply, 0x7654321] {
            var n = machine(.require)
            let data = opt == Spec.optGo || opt == Spec.optInfo ? Client.goData(name: "disk", infos: []) : []
            let r = decodeOptionReplies(sentBytes(n.start(Client.option(opt, data))))
            XCTAssertEqual(r.map(\.type), [Self.errTLSReqd], "option \(opt)")
            XCTAssertTrue(startedExports(n.actions).isEmpty, "no transmission without TLS")
        }
        var n = machine(.require)
        let a = n.start(Client.option(Spec.optExportName, Array("disk".utf8)))
        XCTAssertFalse(closeReasons(a).isEmpty, "EXPORT_NAME without TLS closes (it has no error reply)")
        XCTAssertTrue(startedExports(a).isEmpty)
    }

    func testStartTLSIsAckedAndTheNextMachineForgetsEarlierState() throws {
        var n = machine(.on)
        // Negotiate structured replies and a meta context in plaintext first.
        n.start(
            Client.option(Spec.optStructuredReply)
                + Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))
        let a = n.feed(Client.option(Spec.optStartTLS))
        XCTAssertEqual(decodeOptionReplies(sentBytes(a)).map(\.type), [Spec.repAck])
        XCTAssertTrue(a.contains(.startTLS))
        // The handler continues with a fresh machine: GO now yields no structured replies, no contexts.
        var after = HandshakeStateMachine(afterTLS: n.sm)
        XCTAssertTrue(after.tlsActive)
        var input = ByteBuffer(bytes: Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        let actions = after.receive(&input)
        let session = try XCTUnwrap(
            actions.compactMap { if case .startTransmission(let s) = $0 { return s } else { return nil } }.first)
        XCTAssertFalse(session.structuredReplies)
        XCTAssertNil(session.allocationContext)
        XCTAssertFalse(session.export.flags.contains(.sendDF), "DF only with structured replies")
        // A second STARTTLS inside TLS is invalid.
        var again = HandshakeStateMachine(afterTLS: n.sm)
        var b = ByteBuffer(bytes: Client.option(Spec.optStartTLS))
        XCTAssertEqual(decodeOptionReplies(sentBytes(again.receive(&b))).map(\.type), [Spec.errInvalid])
    }

    func testStartTLSWithPolicyOffIsRefused() {
        var n = machine(.off)
        let r = decodeOptionReplies(sentBytes(n.start(Client.option(Spec.optStartTLS))))
        XCTAssertEqual(r.map(\.type), [Spec.errPolicy])
    }

    func testMetaContexts() throws {
        var n = machine(.off)
        // SET before structured replies: ERR_INVALID.
        var r = decodeOptionReplies(
            sentBytes(n.start(Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))))
        XCTAssertEqual(r.map(\.type), [Spec.errInvalid])
        // LIST with no queries lists everything; "base:" names the namespace; unknown names list nothing.
        for (q, want) in [([String](), 1), (["base:"], 1), (["base:allocation"], 1), (["qemu:dirty-bitmap:x"], 0)] {
            r = decodeOptionReplies(
                sentBytes(n.feed(Client.option(Self.optListMeta, Self.metaQuery(export: "disk", q)))))
            XCTAssertEqual(r.filter { $0.type == Self.repMeta }.count, want, "LIST \(q)")
            XCTAssertEqual(r.last?.type, Spec.repAck)
        }
        r = decodeOptionReplies(sentBytes(n.feed(Client.option(Self.optListMeta, Self.metaQuery(export: "nope", [])))))
        XCTAssertEqual(r.map(\.type), [Spec.errUnknown])
        // A query length that runs past the option is ERR_INVALID.
        var bad = Self.metaQuery(export: "disk", ["base:allocation"])
        bad[15] = 0xff
        r = decodeOptionReplies(sentBytes(n.feed(Client.option(Self.optListMeta, bad))))
        XCTAssertEqual(r.map(\.type), [Spec.errInvalid])
        // SET after STRUCTURED_REPLY selects base:allocation with a non-zero id, used at GO.
        n.feed(Client.option(Spec.optStructuredReply))
        r = decodeOptionReplies(
            sentBytes(n.feed(Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))))
        XCTAssertEqual(r.map(\.type), [Self.repMeta, Spec.repAck])
        let id = r[0].data.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        XCTAssertNotEqual(id, 0)
        XCTAssertEqual(String(decoding: r[0].data.dropFirst(4), as: UTF8.self), "base:allocation")
        let go = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        let s = try XCTUnwrap(
            go.compactMap { if case .startTransmission(let s) = $0 { return s } else { return nil } }.first)
        XCTAssertEqual(s.allocationContext, id)
        XCTAssertTrue(s.structuredReplies)
        XCTAssertTrue(s.export.flags.contains(.sendDF))
    }

    func testContextsChosenForAnotherExportDoNotCarryOver() throws {
        var n = machine(.off)
        n.start(
            Client.option(Spec.optStructuredReply)
                + Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))
        let go = n.feed(Client.option(Spec.optGo, Client.goData(name: "other", infos: [])))
        let s = try XCTUnwrap(
            go.compactMap { if case .startTransmission(let s) = $0 { return s } else { return nil } }.first)
        XCTAssertNil(s.allocationContext)
    }

    /// "NBD_OPT_SET_META_CONTEXT ... replaces all previously-set metadata contexts (including
    /// when this command fails)": after a successful SET, every kind of failed SET leaves no
    /// context selected, so BLOCK_STATUS gets EINVAL.
    func testFailedSetMetaContextForgetsTheEarlierSelection() throws {
        var malformed = Self.metaQuery(export: "disk", ["base:allocation"])
        malformed[15] = 0xff
        let failures: [(String, [UInt8])] = [
            ("unknown export", Self.metaQuery(export: "nope", ["base:allocation"])),
            ("query length past the option", malformed),
            ("trailing bytes", Self.metaQuery(export: "disk", ["base:allocation"]) + [0]),
        ]
        for (what, payload) in failures {
            var n = machine(.off)
            n.start(Client.option(Spec.optStructuredReply))
            var r = decodeOptionReplies(
                sentBytes(n.feed(Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))))
            XCTAssertEqual(r.map(\.type), [Self.repMeta, Spec.repAck])
            r = decodeOptionReplies(sentBytes(n.feed(Client.option(Self.optSetMeta, payload))))
            XCTAssertTrue(r.allSatisfy { $0.type & 0x8000_0000 != 0 } && r.count == 1, "\(what): \(r.map(\.type))")
            let go = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
            let s = try XCTUnwrap(
                go.compactMap { if case .startTransmission(let s) = $0 { return s } else { return nil } }.first)
            XCTAssertNil(s.allocationContext, "\(what): the failed SET must drop base:allocation")
            let rules = TransmissionRules(
                session: s,
                export: ExportFacts(
                    size: s.export.size, flags: s.export.flags,
                    maximumPayload: 1 << 20, canFastZero: true))
            let bs = NBDRequest(flags: [], type: NBDCommand.blockStatus.rawValue, cookie: 1, offset: 0, length: 4096)
            guard case .fail(.inval, _) = rules.decide(bs) else {
                return XCTFail("\(what): BLOCK_STATUS after a failed SET must be EINVAL")
            }
        }
        // A successful SET that matches nothing also selects nothing.
        var n = machine(.off)
        n.start(
            Client.option(Spec.optStructuredReply)
                + Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["base:allocation"])))
        let r = decodeOptionReplies(
            sentBytes(n.feed(Client.option(Self.optSetMeta, Self.metaQuery(export: "disk", ["qemu:dirty-bitmap:x"])))))
        XCTAssertEqual(r.map(\.type), [Spec.repAck])
        let go = n.feed(Client.option(Spec.optGo, Client.goData(name: "disk", infos: [])))
        let s = try XCTUnwrap(
            go.compactMap { (a: HandshakeAction) -> NBDSession? in
                if case .startTransmission(let s) = a { return s } else { return nil }
            }.first)
        XCTAssertNil(s.allocationContext)
    }
}
