import XCTest

@testable import ServerConfig

/// `tls.verify-peer` (`--tls-verify-peer`) and the per-export allow lists `allow-dn` / `allow-psk`.
final class AuthorisationConfigTests: XCTestCase {
    func error(_ yaml: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        do {
            let c = try VirtNBDConfig.parse(yaml, file: "virtnbd.yaml")
            XCTFail("expected an error, got \(c)", file: file, line: line)
            return ""
        } catch {
            return error.description
        }
    }

    static let certs = """
        tls:
          policy: require
          certificates: /etc/pki/virtnbd
          verify-peer: true
        """

    func testVerifyPeerAndAllowDNAreParsedAndNormalised() throws {
        let c = try VirtNBDConfig.parse(
            Self.certs + """

                exports:
                  - name: secret
                    device: ram
                    size: 1M
                    allow-dn:
                      - cn=alice, o=Example
                      - "CN=bob,O=Example"
                      - CN=alice,O=Example
                  - name: one
                    device: simulated
                    allow-dn: "UID=7+CN=carol"
                  - { name: open, device: simulated }
                """)
        XCTAssertTrue(c.tls.verifyPeer)
        XCTAssertEqual(
            c.exports[0].allowDN, ["CN=alice,O=Example", "CN=bob,O=Example"], "canonical, duplicates dropped")
        XCTAssertEqual(c.exports[1].allowDN, ["CN=carol+UID=7"], "a single value is a list of one")
        XCTAssertNil(c.exports[2].allowDN)
        XCTAssertNil(c.exports[0].allowPSK)
        XCTAssertTrue(c.exports[0].isRestricted)
        XCTAssertFalse(c.exports[2].isRestricted)
    }

    func testVerifyPeerDefaultsOffAndTakesBooleans() throws {
        XCTAssertFalse(
            try VirtNBDConfig.parse("tls: { policy: on, certificates: /c }\nexports: [{ name: a, device: simulated }]")
                .tls.verifyPeer)
        XCTAssertEqual(
            error("tls: { policy: on, certificates: /c, verify-peer: yes }\nexports: [{ name: a, device: simulated }]"),
            #"virtnbd.yaml:1: tls.verify-peer: "yes" is not true or false; write true or false"#)
    }

    func testAllowPSK() throws {
        let c = try VirtNBDConfig.parse(
            """
            tls: { policy: on, psk: /etc/virtnbd/keys.psk }
            exports:
              - { name: secret, device: simulated, allow-psk: [alice, bob] }
            """)
        XCTAssertEqual(c.exports[0].allowPSK, ["alice", "bob"])
        XCTAssertFalse(c.tls.verifyPeer)
    }

    func testAnAllowListOffersTLSEvenWhenThePolicyIsOff() throws {
        let c = try VirtNBDConfig.parse(
            """
            tls: { certificates: /c, verify-peer: true }
            exports: [{ name: a, device: simulated, allow-dn: CN=a }, { name: b, device: simulated }]
            """)
        XCTAssertEqual(c.tls.policy, .off)
        XCTAssertEqual(c.serverTLSPolicy, .on, "STARTTLS is offered: the allow-listed export is served only over TLS")
    }

    func testBadDNsNameTheLineAndSayWhatToWrite() {
        XCTAssertEqual(
            error(Self.certs + "\nexports: [{ name: a, device: simulated, allow-dn: [\"CN=alice;O=x\"] }]"),
            #"virtnbd.yaml:5: exports[0].allow-dn[0]: "CN=alice;O=x" has an unescaped ";"; separate RDNs with "," (RFC 4514), or escape it as \;"#
        )
        XCTAssertEqual(
            error(
                Self.certs
                    + "\nexports:\n  - name: a\n    device: simulated\n    allow-dn:\n      - CN=a\n      - XX=alice"),
            #"virtnbd.yaml:10: exports[0].allow-dn[1]: "XX=alice": "XX" is not an attribute type virtnbd knows; use CN, C, L, ST, O, OU, STREET, DC, UID, EMAIL, SERIALNUMBER, TITLE, SN, GN, DNQUALIFIER, PSEUDONYM or a dotted OID (2.5.4.3)"#
        )
        XCTAssertEqual(
            error(Self.certs + "\nexports: [{ name: a, device: simulated, allow-dn: [] }]"),
            #"virtnbd.yaml:5: exports[0].allow-dn: an empty list would refuse every client; list the clients allowed, e.g. allow-dn: ["CN=alice,O=Example"], or leave the key out to allow every client"#
        )
        XCTAssertTrue(
            error(Self.certs + "\nexports: [{ name: a, device: simulated, allow-dn: { cn: a } }]").contains(
                "exports[0].allow-dn: expected a list of client names"))
        XCTAssertTrue(
            error(Self.certs + "\nexports: [{ name: a, device: simulated, allow-dn: alice }]").contains(
                #"exports[0].allow-dn[0]: "alice" has an attribute without "=""#))
        XCTAssertTrue(
            error(Self.certs + "\nexports: [{ name: a, device: simulated, allow-dnn: [CN=a] }]").contains(
                #"exports[0].allow-dnn: unknown key; did you mean "allow-dn"?"#))
        XCTAssertTrue(
            error("tls: { psk: /k }\nexports: [{ name: a, device: simulated, allow-psk: [\"\"] }]").contains(
                "exports[0].allow-psk[0]: an empty PSK identity"))
    }

    func testVerifyPeerNeedsCertificatesAndTLS() {
        XCTAssertEqual(
            error("tls: { policy: on, psk: /k.psk, verify-peer: true }\nexports: [{ name: a, device: simulated }]"),
            "virtnbd.yaml:1: tls.verify-peer: verify-peer checks X.509 client certificates, but the TLS credentials are a PSK file (a PSK client already proves itself by its key); drop verify-peer (use allow-psk to restrict exports by PSK identity), or use certificates instead of psk"
        )
        XCTAssertTrue(
            error("tls:\n  verify-peer: true\nexports: [{ name: a, device: simulated }]")
                .hasPrefix("virtnbd.yaml:2: tls.verify-peer: verify-peer needs TLS certificates"))
        XCTAssertTrue(
            error("tls: { certificates: /c, verify-peer: true }\nexports: [{ name: a, device: simulated }]")
                .hasPrefix("virtnbd.yaml:1: tls.verify-peer: verify-peer has no effect while TLS is off"))
    }

    func testAllowListsNeedTheMatchingCredentials() {
        // A DN from an unverified certificate proves nothing.
        XCTAssertEqual(
            error(
                "tls: { policy: on, certificates: /c }\nexports:\n  - { name: a, device: simulated, allow-dn: CN=a }"),
            "virtnbd.yaml:3: exports[0].allow-dn: certificate names can be trusted only from verified client certificates (anyone can make a self-signed certificate with any name); set tls.certificates and tls.verify-peer: true (--tls-verify-peer)"
        )
        XCTAssertTrue(
            error("tls: { policy: on, psk: /k }\nexports: [{ name: a, device: simulated, allow-dn: CN=a }]").contains(
                "exports[0].allow-dn: certificate names"))
        XCTAssertTrue(
            error(
                Self.certs
                    + "\nexports: [{ name: a, device: simulated }, { name: b, device: simulated, allow-psk: alice }]"
            )
            .contains("virtnbd.yaml:5: exports[1].allow-psk: PSK identities need TLS with a PSK file"))
        // No credentials at all.
        XCTAssertEqual(
            error("exports: [{ name: a, device: simulated, allow-psk: alice }]"),
            "virtnbd.yaml:1: exports[0].allow-psk: PSK identities need TLS with a PSK file; set tls.psk (--tls-psk FILE), or list certificate names with allow-dn"
        )
    }

    func testFlag() throws {
        let file = try VirtNBDConfig.parse(
            "tls: { policy: require, certificates: /c }\nexports: [{ name: a, device: simulated }]")
        XCTAssertFalse(try file.merged(with: .init()).tls.verifyPeer)
        var flags = CommandLineOverrides()
        flags.tlsVerifyPeer = true
        XCTAssertTrue(try file.merged(with: flags).tls.verifyPeer)
        // With a PSK from the command line: a typed error naming the flag.
        flags.tlsPsk = "/k.psk"
        XCTAssertThrowsError(try file.merged(with: flags)) { e in
            let c = e as? ConfigError
            XCTAssertEqual(c?.kind, .tlsCredentials)
            XCTAssertEqual(c?.keyPath, "--tls-verify-peer")
        }
        // The file's verify-peer and a PSK flag: the file's key is named.
        let vp = try VirtNBDConfig.parse(Self.certs + "\nexports: [{ name: a, device: simulated }]")
        XCTAssertThrowsError(try vp.merged(with: .init(tlsPsk: "/k.psk"))) { e in
            XCTAssertEqual((e as? ConfigError)?.keyPath, "tls.verify-peer")
        }
        // Certificates from the flag replace the file's PSK: then allow-psk has nothing to match.
        let psk = try VirtNBDConfig.parse(
            "tls: { policy: on, psk: /k }\nexports: [{ name: a, device: simulated, allow-psk: alice }]")
        XCTAssertThrowsError(try psk.merged(with: .init(tlsCertificates: "/c"))) { e in
            XCTAssertEqual((e as? ConfigError)?.keyPath, "exports[0].allow-psk")
        }
        // Without --config.
        var only = CommandLineOverrides(tls: .require, tlsCertificates: "/c")
        only.tlsVerifyPeer = true
        XCTAssertTrue(try VirtNBDConfig.fromCommandLine(only).tls.verifyPeer)
    }

    func testExampleConfigStillLoadsAndRestrictsNothing() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let c = try VirtNBDConfig.load(path: root.appendingPathComponent("Config/virtnbd.yaml").path)
        XCTAssertFalse(c.tls.verifyPeer)
        XCTAssertTrue(c.exports.allSatisfy { !$0.isRestricted })
    }
}
