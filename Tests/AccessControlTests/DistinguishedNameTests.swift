import AccessControl
import Foundation
import XCTest

/// The canonical DN form of `allow-dn:` and of client certificates (RFC 4514 order).
final class DistinguishedNameTests: XCTestCase {
    func canonical(_ s: String, file: StaticString = #filePath, line: UInt = #line) -> String? {
        do { return try DistinguishedName(parsing: s).description } catch {
            XCTFail("\(s): \(error)", file: file, line: line)
            return nil
        }
    }

    func testSpellingsOfOneNameNormaliseToOneText() {
        let want = "CN=alice,O=Example,C=GB"
        for s in [
            "CN=alice,O=Example,C=GB", "cn=alice, o=Example, c=GB", " CN = alice ,O= Example,C =GB ",
            "2.5.4.3=alice,OID.2.5.4.10=Example,c=GB", "CN=\\61lice,O=Example,C=GB",
        ] {
            XCTAssertEqual(canonical(s), want, s)
        }
    }

    func testValuesAreCaseSensitiveAndRDNOrderMatters() {
        XCTAssertNotEqual(canonical("CN=Alice,O=Example"), canonical("CN=alice,O=Example"))
        XCTAssertNotEqual(canonical("O=Example,CN=alice"), canonical("CN=alice,O=Example"))
    }

    func testEscapesAndMultiValuedRDNs() {
        XCTAssertEqual(canonical("CN=Example\\, Inc.,C=GB"), "CN=Example\\, Inc.,C=GB")
        XCTAssertEqual(canonical("CN=a\\+b"), "CN=a\\+b")
        XCTAssertEqual(canonical("CN=\\#1"), "CN=\\#1")
        XCTAssertEqual(canonical("CN=\\ padded\\ "), "CN=\\ padded\\ ")
        XCTAssertEqual(canonical("CN=x=y"), "CN=x=y")
        XCTAssertEqual(canonical("CN=a\\=b"), "CN=a=b", "\\= needs no escape")
        XCTAssertEqual(canonical("CN=Zo\\C3\\AB"), "CN=Zoë", "hex escapes are UTF-8 bytes")
        // The attributes of one RDN in any order.
        XCTAssertEqual(canonical("UID=42+OU=Dev,C=GB"), "OU=Dev+UID=42,C=GB")
        XCTAssertEqual(canonical("OU=Dev+UID=42,C=GB"), "OU=Dev+UID=42,C=GB")
        XCTAssertEqual(canonical("E=a@example.com,emailAddress=b"), "EMAIL=a@example.com,EMAIL=b")
        XCTAssertEqual(canonical("2.5.4.97=VATGB-1"), "2.5.4.97=VATGB-1", "unknown types stay dotted OIDs")
    }

    func testBadTextIsRefusedWithAFix() {
        let cases: [(String, DistinguishedNameError.Kind)] = [
            ("", .empty), ("alice", .missingEquals), ("CN=alice,", .trailingSeparator), ("=alice", .missingType),
            ("XY=alice", .unknownType("XY")), ("CN=#0403616263", .hexValue("CN")), ("CN=a\\q", .badEscape),
            ("CN=a;O=b", .semicolon), ("CN=\"a\"", .quote), ("CN=a+CN=b", .repeatedType), ("CN=a\\", .badEscape),
            ("CN=\\FF", .badEscape), ("2.5..4=x", .unknownType("2.5..4")),
        ]
        for (text, kind) in cases {
            XCTAssertThrowsError(try DistinguishedName(parsing: text), text) { e in
                let err = e as! DistinguishedNameError
                XCTAssertEqual(err.kind, kind, text)
                XCTAssertFalse(err.fix.isEmpty)
            }
        }
    }

    /// `openssl req -x509 -multivalue-rdn -utf8 -subj "/C=GB/O=Example, Inc./OU=Dev+UID=42/CN=Zoë #1 <x>"`;
    /// `certtool -i` prints its subject as `CN=Zoë #1 \<x\>,OU=Dev+UID=42,O=Example\, Inc.,C=GB`.
    static let certificate =
        "MIICCjCCAbGgAwIBAgIUMz4F1BNbphkr5SW3krP9W+SbmVcwCgYIKoZIzj0EAwIwWzELMAkGA1UEBhMCR0IxFjAUBgNVBAoMDUV4YW1wbGUsIEluYy4xHjAKBgNVBAsMA0RldjAQBgoJkiaJk/IsZAEBDAI0MjEUMBIGA1UEAwwLWm/DqyAjMSA8eD4wHhcNMjYxMjAyMDE0NjQzWhcNMzYxMTI5MDE0NjQzWjBbMQswCQYDVQQGEwJHQjEWMBQGA1UECgwNRXhhbXBsZSwgSW5jLjEeMAoGA1UECwwDRGV2MBAGCgmSJomT8ixkAQEMAjQyMRQwEgYDVQQDDAtab8OrICMxIDx4PjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABIEBs2GDrtfELbA1ulhD29Z2ddDyr6s42jeb2qbzR82BL7nrq2HH3LMjl91/KrpJMvsBgfIjCSy9ZlbLThRl+e+jUzBRMB0GA1UdDgQWBBRCjIUhDgAedFDc35M6U+vNtvywfTAfBgNVHSMEGDAWgBRCjIUhDgAedFDc35M6U+vNtvywfTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIALFjhO355ByPyda/Wm0trtPLigC/0DTyrGQc22YeckUAiAy6HwMbGXt2wH7SrihzBs5VURIYQGPDdzvcopmOOjTGw=="

    func testCertificateSubjectMatchesWhatCerttoolPrints() throws {
        let der = try XCTUnwrap(Data(base64Encoded: Self.certificate))
        let dn = try DistinguishedName(certificateDER: Array(der))
        XCTAssertEqual(dn.description, "CN=Zoë #1 \\<x\\>,OU=Dev+UID=42,O=Example\\, Inc.,C=GB")
        // openssl's RFC2253 spelling (multi-valued RDN in DER order) is the same name.
        XCTAssertEqual(
            try DistinguishedName(parsing: "CN=Zo\\C3\\AB #1 \\<x\\>,UID=42+OU=Dev,O=Example\\, Inc.,C=GB"), dn)
    }

    func testNameDERWithNonStringValueIsHexAndUnmatchable() throws {
        // SEQUENCE { SET { SEQUENCE { OID 2.5.4.3, INTEGER 5 } } }
        let der: [UInt8] = [0x30, 0x0c, 0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x02, 0x01, 0x05]
        let dn = try DistinguishedName(nameDER: der)
        XCTAssertEqual(dn.description, "CN=#020105")
        XCTAssertNotEqual(try DistinguishedName(parsing: "CN=\\#020105"), dn)
        // Truncated or trailing bytes are refused.
        XCTAssertThrowsError(try DistinguishedName(nameDER: Array(der.dropLast())))
        XCTAssertThrowsError(try DistinguishedName(nameDER: der + [0]))
        XCTAssertThrowsError(try DistinguishedName(certificateDER: [0x30, 0x03, 0x30, 0x01]))
    }
}
