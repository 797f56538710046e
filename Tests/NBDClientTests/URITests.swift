// NBDURI against the forms of the NBD URI specification (nbd doc/uri.md) and libnbd's nbd_connect_uri.
import NBDClient
import XCTest

final class URITests: XCTestCase {
    func testTCPDefaults() throws {
        let u = try NBDURI(parsing: "nbd://example.com")
        XCTAssertEqual(u.transport, .tcp(host: "example.com", port: 10809))
        XCTAssertEqual(u.exportName, "")
        XCTAssertFalse(u.tls)
        XCTAssertEqual(try NBDURI(parsing: "nbd://").transport, .tcp(host: "localhost", port: 10809))
    }

    func testTCPPortAndExport() throws {
        let u = try NBDURI(parsing: "nbd://127.0.0.1:10810/disk")
        XCTAssertEqual(u.transport, .tcp(host: "127.0.0.1", port: 10810))
        XCTAssertEqual(u.exportName, "disk")
    }

    func testExportNameIsPercentDecodedAndKeepsSlashes() throws {
        let u = try NBDURI(parsing: "nbd://h/a%20b/c%2Fd")
        XCTAssertEqual(u.exportName, "a b/c/d")
        XCTAssertEqual(try NBDURI(parsing: "nbd://h//lead").exportName, "/lead")
        XCTAssertEqual(try NBDURI(parsing: "nbd://h/%C3%A9").exportName, "é")
    }

    func testIPv6() throws {
        XCTAssertEqual(try NBDURI(parsing: "nbd://[::1]:1234/x").transport, .tcp(host: "::1", port: 1234))
        XCTAssertEqual(try NBDURI(parsing: "nbd://[fe80::1]/").transport, .tcp(host: "fe80::1", port: 10809))
        XCTAssertThrowsError(try NBDURI(parsing: "nbd://[::1/")) {
            XCTAssertEqual($0 as? NBDURIError, .badHost("nbd://[::1/"))
        }
    }

    func testUnixSocket() throws {
        let u = try NBDURI(parsing: "nbd+unix:///disk?socket=/tmp/nbd.sock")
        XCTAssertEqual(u.transport, .unix(path: "/tmp/nbd.sock"))
        XCTAssertEqual(u.exportName, "disk")
        let v = try NBDURI(parsing: "nbd+unix:///?socket=/tmp/a%20b.sock&tls-certificates=x")
        XCTAssertEqual(v.transport, .unix(path: "/tmp/a b.sock"))
        XCTAssertEqual(v.exportName, "")
        XCTAssertEqual(try NBDURI(parsing: "nbd+unix://?socket=s").exportName, "")
    }

    func testTLSSchemes() throws {
        XCTAssertTrue(try NBDURI(parsing: "nbds://h/").tls)
        XCTAssertTrue(try NBDURI(parsing: "NBDS+UNIX:///?socket=s").tls)
    }

    func testUserInfoAndFragmentAreIgnored() throws {
        let u = try NBDURI(parsing: "nbd://user@h:99/e#frag")
        XCTAssertEqual(u.transport, .tcp(host: "h", port: 99))
        XCTAssertEqual(u.exportName, "e")
    }

    func testErrors() {
        func error(_ s: String) -> NBDURIError? {
            do {
                _ = try NBDURI(parsing: s)
                return nil
            } catch { return error }
        }
        XCTAssertEqual(error("disk.img"), .notAURI("disk.img"))
        XCTAssertEqual(error("http://h/"), .unsupportedScheme("http://h/", scheme: "http"))
        XCTAssertEqual(error("nbd+vsock://1/"), .unsupportedScheme("nbd+vsock://1/", scheme: "nbd+vsock"))
        XCTAssertEqual(error("nbd://h:0/"), .badPort("nbd://h:0/", port: "0"))
        XCTAssertEqual(error("nbd://h:x/"), .badPort("nbd://h:x/", port: "x"))
        XCTAssertEqual(error("nbd://h:65536/"), .badPort("nbd://h:65536/", port: "65536"))
        XCTAssertEqual(error("nbd+unix:///"), .missingSocket("nbd+unix:///"))
        XCTAssertEqual(error("nbd+unix://h/?socket=s"), .hostWithUnixSocket("nbd+unix://h/?socket=s"))
        XCTAssertEqual(error("nbd://h/?socket=s"), .socketWithTCP("nbd://h/?socket=s"))
        XCTAssertEqual(error("nbd://h/%zz"), .badPercentEncoding("nbd://h/%zz"))
        XCTAssertEqual(error("nbd://h/%ff"), .badPercentEncoding("nbd://h/%ff"), "not UTF-8")
        // Every message names the fix.
        XCTAssertTrue(NBDURIError.missingSocket("x").description.contains("socket="))
    }

    func testLooksLikeURI() {
        XCTAssertTrue(NBDURI.looksLikeURI("nbd://h/"))
        XCTAssertTrue(NBDURI.looksLikeURI("nbd+unix:///?socket=s"))
        XCTAssertTrue(NBDURI.looksLikeURI("NBDS://h/"))
        XCTAssertFalse(NBDURI.looksLikeURI("disk.img"))
        XCTAssertFalse(NBDURI.looksLikeURI("-"))
        XCTAssertFalse(NBDURI.looksLikeURI("http://h/"))
    }

    func testFormattingRoundTrips() throws {
        for u in [
            NBDURI(transport: .tcp(host: "::1", port: 10809), exportName: "a b"),
            NBDURI(transport: .unix(path: "/run/x y.sock"), exportName: "é/d"),
            NBDURI(transport: .tcp(host: "h", port: 1), exportName: "", tls: true),
        ] {
            let back = try NBDURI(parsing: u.text)
            XCTAssertEqual(back.transport, u.transport, u.text)
            XCTAssertEqual(back.exportName, u.exportName, u.text)
            XCTAssertEqual(back.tls, u.tls, u.text)
        }
        XCTAssertEqual(NBDURI(transport: .unix(path: "/s"), exportName: "d").text, "nbd+unix:///d?socket=/s")
    }
}
