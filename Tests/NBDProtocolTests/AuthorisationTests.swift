import NIOCore
import XCTest

@testable import NBDProtocol

/// Per-export authorisation (`allow-dn`, `allow-psk`) on the pure state machine: the client's TLS
/// identity is given to `HandshakeStateMachine(afterTLS:peer:)`; exports with an allow list are
/// served only to TLS clients it names (others get NBD_REP_ERR_POLICY), plaintext clients get
/// NBD_REP_ERR_TLS_REQD for them, and NBD_OPT_LIST shows only what the client may use.
final class AuthorisationTests: XCTestCase {
    static let errTLSReqd: UInt32 = 0x8000_0005

    static let open = NBDExportInfo(name: "open", size: 4096, flags: [])
    static let secret = NBDExportInfo(
        name: "secret", size: 8192, flags: [],
        allowedClients: NBDClientAllowList(certificateDNs: ["CN=alice,O=Example"], pskIdentities: ["alice"]))
    static let catalog = NBDExportCatalog([open, secret])

    /// A machine inside TLS with `peer`, after client flags and STARTTLS in plaintext.
    func afterTLS(
        _ peer: NBDPeerIdentity?, tls: NBDTLSPolicy = .on, catalog: NBDExportCatalog = AuthorisationTests.catalog
    ) -> Negotiation {
        var n = Negotiation(catalog)
        n.sm = HandshakeStateMachine(catalog: catalog, tls: tls)
        let a = n.start(Client.option(Spec.optStartTLS))
        XCTAssertTrue(a.contains(.startTLS))
        var after = Negotiation(catalog)
        after.sm = HandshakeStateMachine(afterTLS: n.sm, peer: peer)
        return after
    }

    func go(_ n: inout Negotiation, _ name: String, option: UInt32 = Spec.optGo) -> (
        replies: [OptReply], started: [NBDExportInfo]
    ) {
        let a = n.feed(Client.option(option, Client.goData(name: name, infos: [])))
        return (decodeOptionReplies(sentBytes(a)), startedExports(a))
    }

    func listed(_ n: inout Negotiation) -> [String] {
        let r = decodeOptionReplies(sentBytes(n.feed(Client.option(Spec.optList))))
        XCTAssertEqual(r.last?.type, Spec.repAck)
        return r.filter { $0.type == Spec.repServer }.map { rep in
            let len = Int(rep.data.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            return String(decoding: rep.data[4..<4 + len], as: UTF8.self)
        }
    }

    func testListedCertificateDNIsServed() {
        var n = afterTLS(NBDPeerIdentity(certificateDN: "CN=alice,O=Example"))
        let (r, started) = go(&n, "secret")
        XCTAssertEqual(r.last?.type, Spec.repAck)
        XCTAssertEqual(started.map(\.name), ["secret"])
    }

    func testListedPSKIdentityIsServed() {
        var n = afterTLS(NBDPeerIdentity(pskIdentity: "alice"))
        XCTAssertEqual(go(&n, "secret").started.map(\.name), ["secret"])
    }

    func testOtherIdentitiesGetPolicyForThatExportAndCanStillUseTheOthers() {
        for peer in [
            NBDPeerIdentity(certificateDN: "CN=bob,O=Example"),
            NBDPeerIdentity(certificateDN: "CN=alice,O=Example,C=GB"),
            NBDPeerIdentity(pskIdentity: "bob"), NBDPeerIdentity(pskIdentity: "CN=alice,O=Example"),
            NBDPeerIdentity(certificateDN: "alice"), NBDPeerIdentity(), nil,
        ] {
            var n = afterTLS(peer)
            for opt in [Spec.optInfo, Spec.optGo] {
                let (r, started) = go(&n, "secret", option: opt)
                XCTAssertEqual(r.map(\.type), [Spec.errPolicy], "\(String(describing: peer)) option \(opt)")
                XCTAssertTrue(started.isEmpty)
                XCTAssertTrue(String(decoding: r.first?.data ?? [], as: UTF8.self).contains("not allowed"))
            }
            XCTAssertFalse(n.sm.isFinished, "a refusal leaves negotiation open")
            XCTAssertEqual(listed(&n), ["open"], "LIST hides what the client may not use")
            // The same connection then uses an unrestricted export.
            XCTAssertEqual(go(&n, "open").started.map(\.name), ["open"])
        }
    }

    func testPolicyMessageNamesTheClient() {
        var n = afterTLS(NBDPeerIdentity(certificateDN: "CN=bob"))
        let text = String(decoding: go(&n, "secret").replies.first?.data ?? [], as: UTF8.self)
        XCTAssertTrue(text.contains("CN=bob") && text.contains("secret"), text)
    }

    func testAuthorisedClientSeesItInTheList() {
        var n = afterTLS(NBDPeerIdentity(certificateDN: "CN=alice,O=Example"))
        XCTAssertEqual(listed(&n), ["open", "secret"])
    }

    func testDefaultExportNameIsCheckedToo() {
        let cat = NBDExportCatalog([Self.secret, Self.open])
        var bob = afterTLS(NBDPeerIdentity(certificateDN: "CN=bob"), catalog: cat)
        XCTAssertEqual(go(&bob, "").replies.map(\.type), [Spec.errPolicy])
        var alice = afterTLS(NBDPeerIdentity(certificateDN: "CN=alice,O=Example"), catalog: cat)
        XCTAssertEqual(go(&alice, "").started.map(\.name), ["secret"])
    }

    func testExportNameOfARefusedExportCloses() {
        var n = afterTLS(NBDPeerIdentity(certificateDN: "CN=bob"))
        let a = n.feed(Client.option(Spec.optExportName, Array("secret".utf8)))
        XCTAssertTrue(startedExports(a).isEmpty)
        XCTAssertTrue(sentBytes(a).isEmpty, "no size or flags")
        XCTAssertFalse(closeReasons(a).isEmpty)
        var ok = afterTLS(NBDPeerIdentity(certificateDN: "CN=alice,O=Example"))
        XCTAssertEqual(
            startedExports(ok.feed(Client.option(Spec.optExportName, Array("secret".utf8)))).map(\.name), ["secret"])
    }

    func testPlaintextClientsGetTLSRequiredAndDoNotSeeIt() {
        var n = Negotiation(Self.catalog)
        n.sm = HandshakeStateMachine(catalog: Self.catalog, tls: .on)
        n.start()
        for opt in [Spec.optInfo, Spec.optGo] {
            let (r, started) = go(&n, "secret", option: opt)
            XCTAssertEqual(r.map(\.type), [Self.errTLSReqd])
            XCTAssertTrue(started.isEmpty)
        }
        XCTAssertEqual(listed(&n), ["open"])
        XCTAssertEqual(
            go(&n, "open").started.map(\.name), ["open"], "--tls on: unrestricted exports stay usable in plaintext")
        var e = Negotiation(Self.catalog)
        e.sm = HandshakeStateMachine(catalog: Self.catalog, tls: .on)
        let a = e.start(Client.option(Spec.optExportName, Array("secret".utf8)))
        XCTAssertTrue(startedExports(a).isEmpty)
        XCTAssertFalse(closeReasons(a).isEmpty)
    }

    func testWithoutTLSConfiguredTheRefusalIsPolicy() {
        var n = Negotiation(Self.catalog)
        n.sm = HandshakeStateMachine(catalog: Self.catalog, tls: .off)
        n.start()
        XCTAssertEqual(go(&n, "secret").replies.map(\.type), [Spec.errPolicy], "no STARTTLS to ask for")
    }

    func testUnrestrictedExportsNeedNoIdentity() {
        var n = afterTLS(nil, tls: .require)
        XCTAssertEqual(go(&n, "open").started.map(\.name), ["open"])
    }

    func testAllowListAdmits() {
        let l = NBDClientAllowList(certificateDNs: ["CN=a"], pskIdentities: ["p"])
        XCTAssertTrue(l.admits(NBDPeerIdentity(certificateDN: "CN=a")))
        XCTAssertTrue(l.admits(NBDPeerIdentity(pskIdentity: "p")))
        XCTAssertFalse(l.admits(NBDPeerIdentity(certificateDN: "p", pskIdentity: "CN=a")), "a DN is not a PSK identity")
        XCTAssertFalse(l.admits(nil))
        XCTAssertFalse(NBDClientAllowList().admits(NBDPeerIdentity(certificateDN: "CN=a")))
    }

    /// A config export's own `tls: require` under a server policy of `on`: plaintext clients get
    /// ERR_TLS_REQD for it (and do not see it in LIST), other exports stay usable, and inside TLS
    /// any client may use it.
    func testPerExportTLSRequire() {
        var guarded = NBDExportInfo(name: "guarded", size: 4096, flags: [])
        guarded.requiresTLS = true
        let catalog = NBDExportCatalog([Self.open, guarded])
        var plain = Negotiation(catalog)
        plain.sm = HandshakeStateMachine(catalog: catalog, tls: .on)
        _ = plain.start()
        XCTAssertEqual(listed(&plain), ["open"])
        for opt in [Spec.optInfo, Spec.optGo] {
            let (r, started) = go(&plain, "guarded", option: opt)
            XCTAssertEqual(r.map(\.type), [Self.errTLSReqd], "option \(opt)")
            XCTAssertTrue(started.isEmpty)
        }
        XCTAssertEqual(go(&plain, "open").started.map(\.name), ["open"])
        var inside = afterTLS(nil, catalog: catalog)
        XCTAssertEqual(go(&inside, "guarded").started.map(\.name), ["guarded"])
    }
}
