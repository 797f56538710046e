import XCTest

@testable import AccessControl

private func net(_ s: String, file: StaticString = #filePath, line: UInt = #line) -> IPNetwork? {
    do { return try IPNetwork(parsing: s) } catch {
        XCTFail("\(s): \(error)", file: file, line: line)
        return nil
    }
}

private func problem(_ s: String) -> IPNetworkError? {
    do {
        _ = try IPNetwork(parsing: s)
        return nil
    } catch { return error }
}

private func ip(_ s: String, file: StaticString = #filePath, line: UInt = #line) -> IPAddress {
    guard let a = IPAddress(s) else {
        XCTFail("\(s) is not an address", file: file, line: line)
        return IPAddress(high: 0, low: 0)
    }
    return a
}

final class IPAddressTests: XCTestCase {
    func testIPv4() {
        XCTAssertEqual(ip("127.0.0.1"), IPAddress(v4: 0x7f00_0001))
        XCTAssertEqual(ip("255.255.255.255"), IPAddress(v4: ~0))
        XCTAssertEqual(ip("0.0.0.0").description, "0.0.0.0")
        XCTAssertTrue(ip("10.1.2.3").isV4)
        for bad in [
            "256.0.0.1", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.-4", "1..2.3", "", " 1.2.3.4", "1.2.3.4:80",
            "a.b.c.d", "1.2.3.1234",
        ] {
            XCTAssertNil(IPAddress(bad), bad)
        }
    }

    func testIPv6Forms() {
        XCTAssertEqual(ip("::1"), IPAddress(high: 0, low: 1))
        XCTAssertEqual(ip("::"), IPAddress(high: 0, low: 0))
        XCTAssertEqual(ip("1::"), IPAddress(high: 1 << 48, low: 0))
        XCTAssertEqual(ip("fe80::1:2"), IPAddress(high: 0xfe80 << 48, low: 0x1_0002))
        XCTAssertEqual(ip("2001:db8:0:0:0:0:0:1"), ip("2001:DB8::1"))
        XCTAssertEqual(ip("1:2:3:4:5:6:7:8"), IPAddress(high: 0x0001_0002_0003_0004, low: 0x0005_0006_0007_0008))
        XCTAssertEqual(
            ip("1:2:3:4:5:6:7::"), IPAddress(high: 0x0001_0002_0003_0004, low: 0x0005_0006_0007_0000),
            ":: for one group")
        XCTAssertEqual(ip("::1.2.3.4"), IPAddress(high: 0, low: 0x0102_0304), "IPv4-compatible (deprecated) form")
        for bad in [
            "1:2:3:4:5:6:7:8:9", "1::2::3", ":1", "1:", "12345::", "::g", "1:2:3:4:5:6:7:8::", "[::1]", "fe80::1%eth0",
            "::1.2.3", "1.2.3.4::", "::ffff:1.2.3.4:5", ":::",
        ] {
            XCTAssertNil(IPAddress(bad), bad)
        }
    }

    func testV4MappedIsIPv4() {
        // A dual-stack listener reports IPv4 clients like this.
        XCTAssertEqual(ip("::ffff:127.0.0.1"), ip("127.0.0.1"))
        XCTAssertEqual(ip("::FFFF:7f00:1"), ip("127.0.0.1"))
        XCTAssertTrue(ip("::ffff:10.0.0.1").isV4)
        XCTAssertFalse(ip("::1").isV4)
        XCTAssertEqual(ip("::ffff:10.0.0.1").description, "10.0.0.1")
    }

    func testCanonicalText() {
        XCTAssertEqual(ip("2001:0DB8:0000:0000:0000:0000:0000:0001").description, "2001:db8::1")
        XCTAssertEqual(ip("1:0:0:2:0:0:0:3").description, "1:0:0:2::3", "the longest zero run")
        XCTAssertEqual(ip("1:0:0:2:3:0:0:4").description, "1::2:3:0:0:4", "the first of two equal runs")
        XCTAssertEqual(ip("1:0:2:3:4:5:6:7").description, "1:0:2:3:4:5:6:7", "a single zero group is not compressed")
        XCTAssertEqual(ip("::").description, "::")
        XCTAssertEqual(ip("::1").description, "::1")
        XCTAssertEqual(ip("fe80::").description, "fe80::")
    }
}

final class IPNetworkTests: XCTestCase {
    func testParseAndDescribe() {
        XCTAssertEqual(net("127.0.0.1/32")?.description, "127.0.0.1/32")
        XCTAssertEqual(net("10.0.0.0/8")?.description, "10.0.0.0/8")
        XCTAssertEqual(net("0.0.0.0/0")?.description, "0.0.0.0/0")
        XCTAssertEqual(net("::1/128")?.description, "::1/128")
        XCTAssertEqual(net("FD00::/8")?.description, "fd00::/8")
        XCTAssertEqual(net("::/0")?.description, "::/0")
        XCTAssertEqual(net(" 192.168.1.7 ")?.description, "192.168.1.7/32", "a bare address is one host")
        XCTAssertEqual(net("fe80::1")?.description, "fe80::1/128")
        XCTAssertEqual(net("10.0.0.0/08")?.prefixLength, 8)
    }

    func testContains() {
        let ten = net("10.0.0.0/8")!
        XCTAssertTrue(ten.contains(ip("10.0.0.0")))
        XCTAssertTrue(ten.contains(ip("10.255.255.255")))
        XCTAssertFalse(ten.contains(ip("11.0.0.0")))
        XCTAssertFalse(ten.contains(ip("9.255.255.255")))
        XCTAssertFalse(ten.contains(ip("::a00:1")), "an IPv6 address is not in an IPv4 network")
        let lo = net("127.0.0.1/32")!
        XCTAssertTrue(lo.contains(ip("127.0.0.1")))
        XCTAssertFalse(lo.contains(ip("127.0.0.2")))
        let v6 = net("2001:db8::/32")!
        XCTAssertTrue(v6.contains(ip("2001:db8:ffff::1")))
        XCTAssertFalse(v6.contains(ip("2001:db9::1")))
        XCTAssertFalse(v6.contains(ip("10.0.0.1")))
        // Prefixes across the 64-bit boundary.
        let n65 = net("2001:db8:0:1:8000::/65")!
        XCTAssertTrue(n65.contains(ip("2001:db8:0:1:ffff::1")))
        XCTAssertFalse(n65.contains(ip("2001:db8:0:1:7fff::1")))
        let n63 = net("2001:db8:0:2::/63")!
        XCTAssertTrue(n63.contains(ip("2001:db8:0:3::1")))
        XCTAssertFalse(n63.contains(ip("2001:db8:0:4::1")))
        XCTAssertTrue(net("::1/128")!.contains(ip("::1")))
        XCTAssertFalse(net("::1/128")!.contains(ip("127.0.0.1")))
    }

    func testZeroPrefixes() {
        XCTAssertTrue(net("0.0.0.0/0")!.contains(ip("203.0.113.9")))
        XCTAssertFalse(net("0.0.0.0/0")!.contains(ip("2001:db8::1")), "all of IPv4 is not IPv6")
        // ::/0 is every address, IPv4 clients (held as ::ffff:a.b.c.d) included.
        XCTAssertTrue(net("::/0")!.contains(ip("2001:db8::1")))
        XCTAssertTrue(net("::/0")!.contains(ip("10.0.0.1")))
    }

    func testV4MappedNetworks() {
        let mapped = net("::ffff:10.0.0.0/104")!
        XCTAssertEqual(mapped.description, "::ffff:10.0.0.0/104")
        XCTAssertTrue(mapped.contains(ip("10.1.2.3")), "mapped network and IPv4 client")
        XCTAssertTrue(mapped.contains(ip("::ffff:10.1.2.3")))
        XCTAssertFalse(mapped.contains(ip("11.0.0.1")))
        // An IPv4 rule matches the same client arriving on a dual-stack (::) listener.
        XCTAssertTrue(net("127.0.0.0/8")!.contains(ip("::ffff:127.0.0.1")))
        XCTAssertTrue(net("::ffff:0:0/96")!.contains(ip("192.0.2.1")), "all of IPv4, written as IPv6")
    }

    func testBadPrefixLengths() {
        for (s, max) in [
            ("10.0.0.0/33", 32), ("10.0.0.0/-1", 32), ("10.0.0.0/", 32), ("10.0.0.0/8a", 32), ("10.0.0.0/ 8", 32),
            ("10.0.0.0/8/8", 32), ("10.0.0.0/+8", 32), ("::/129", 128), ("::1/1000", 128), ("::/0x10", 128),
        ] {
            XCTAssertEqual(problem(s)?.kind, .badPrefix(maximum: max), s)
        }
        XCTAssertEqual(
            problem("10.0.0.0/33")?.description,
            "\"10.0.0.0/33\" has no valid prefix length; after the / write a whole number from 0 to 32")
    }

    func testHostBitsSet() {
        XCTAssertEqual(problem("10.0.0.1/8")?.kind, .hostBitsSet(network: "10.0.0.0/8"))
        XCTAssertEqual(
            problem("127.0.0.1/8")?.description,
            "\"127.0.0.1/8\" has bits set after the prefix; write the network 127.0.0.0/8, or the single host with /32")
        XCTAssertEqual(problem("::1/64")?.kind, .hostBitsSet(network: "::/64"))
        XCTAssertEqual(
            problem("2001:db8::1/32")?.description,
            "\"2001:db8::1/32\" has bits set after the prefix; write the network 2001:db8::/32, or the single host with /128"
        )
        XCTAssertEqual(
            problem("2001:db8:0:1:8000::/64")?.kind, .hostBitsSet(network: "2001:db8:0:1::/64"),
            "a bit below the 64-bit boundary")
        XCTAssertEqual(problem("::ffff:10.0.0.1/104")?.kind, .hostBitsSet(network: "::ffff:10.0.0.0/104"))
        XCTAssertEqual(problem("1.2.3.4/0")?.kind, .hostBitsSet(network: "0.0.0.0/0"))
        XCTAssertNil(problem("10.0.0.1/32"))
    }

    func testBadAddresses() {
        for s in ["localhost", "10.0.0/8", "300.0.0.0/8", "[::1]/128", "::1:/128", "/8", "10.0.0.0:80", "1.2.3.4/8 5"] {
            XCTAssertNotNil(problem(s), s)
        }
        XCTAssertEqual(problem("localhost/8")?.kind, .badAddress)
        XCTAssertEqual(problem("")?.kind, .empty)
        XCTAssertEqual(problem("  ")?.kind, .empty)
        XCTAssertEqual(problem("fe80::1%eth0/128")?.kind, .zoneID)
        XCTAssertEqual(
            problem("localhost")?.description,
            "\"localhost\" is not an IPv4 or IPv6 address; write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8 (no brackets, no port, no host names)"
        )
    }
}

final class AccessListTests: XCTestCase {
    func testEmptyListIsOpen() {
        XCTAssertEqual(AccessList().decide(ip("203.0.113.9")), .open)
        XCTAssertTrue(AccessList().allowsEveryone)
        XCTAssertEqual(AccessList().description, "everyone")
    }

    func testFirstMatchingNetworkIsNamed() throws {
        let list = try AccessList(parsing: ["10.0.0.0/8", "::1/128", "10.1.0.0/16", "127.0.0.0/8"])
        XCTAssertEqual(list.decide(ip("10.1.2.3")), .allowed(by: net("10.0.0.0/8")!))
        XCTAssertEqual(list.decide(ip("::1")), .allowed(by: net("::1/128")!))
        XCTAssertEqual(list.decide(ip("::ffff:127.0.0.1")), .allowed(by: net("127.0.0.0/8")!))
        XCTAssertEqual(list.decide(ip("192.168.0.1")), .refused)
        XCTAssertEqual(list.decide(ip("::2")), .refused)
        XCTAssertEqual(list.description, "10.0.0.0/8, ::1/128, 10.1.0.0/16, 127.0.0.0/8")
    }

    func testFirstBadEntryThrows() {
        XCTAssertThrowsError(try AccessList(parsing: ["10.0.0.0/8", "10.0.0.0/99", "nope"])) { e in
            XCTAssertEqual((e as? IPNetworkError)?.text, "10.0.0.0/99")
        }
    }
}
