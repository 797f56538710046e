import Foundation
import XCTest

@testable import ServerConfig

/// `limits.keepalive*` in the file, `--keepalive`, `--no-keepalive` and `--keepalive-*` on the command line.
final class KeepaliveConfigTests: XCTestCase {
    private func parse(_ limits: String) throws -> VirtNBDConfig {
        try VirtNBDConfig.parse("limits:\n\(limits)\nexports: [{ name: a, device: simulated }]")
    }

    private func fileError(_ limits: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        do {
            let c = try parse(limits)
            XCTFail("expected an error, got \(c.limits)", file: file, line: line)
            return ""
        } catch { return "\(error)" }
    }

    private func flagError(_ flags: CommandLineOverrides, file: StaticString = #filePath, line: UInt = #line)
        -> String
    {
        do {
            let c = try VirtNBDConfig.fromCommandLine(flags)
            XCTFail("expected an error, got \(c.limits)", file: file, line: line)
            return ""
        } catch { return "\(error)" }
    }

    func testOnByDefaultWithTwoMinutes() throws {
        let k = try VirtNBDConfig.fromCommandLine(.init()).limits.keepalive
        XCTAssertEqual(k, .init(enabled: true, idle: 60, interval: 10, count: 6))
        XCTAssertEqual(k.deadline, 120)
        XCTAssertEqual(try VirtNBDConfig.parse("exports: [{ name: a, device: simulated }]").limits.keepalive, k)
        XCTAssertEqual(
            "\(k)", "on (idle 60 s, interval 10 s, count 6: a vanished TCP client is closed after 120 s)")
        XCTAssertEqual("\(VirtNBDConfig.Keepalive(enabled: false))", "off")
    }

    func testFileKeys() throws {
        XCTAssertEqual(
            try parse("  keepalive: true\n  keepalive-idle: 30\n  keepalive-interval: 5\n  keepalive-count: 4")
                .limits.keepalive,
            .init(enabled: true, idle: 30, interval: 5, count: 4))
        XCTAssertEqual(try parse("  keepalive-idle: 7").limits.keepalive, .init(idle: 7))
        XCTAssertEqual(try parse("  keepalive: false").limits.keepalive.enabled, false)
        XCTAssertEqual(
            try parse("  keepalive: false").limits.maxConnections, VirtNBDConfig.Limits.defaultMaxConnections,
            "other limits keep their defaults")
    }

    func testFileErrorsNameTheLine() {
        XCTAssertEqual(
            fileError("  keepalive: off"),
            #"virtnbd.yaml:2: limits.keepalive: "off" is not true or false; write true or false"#)
        XCTAssertEqual(
            fileError("  keepalive-idle: 0"),
            #"virtnbd.yaml:2: limits.keepalive-idle: "0" is not a whole number from 1 to 32767; give whole seconds before the first probe, e.g. 60"#
        )
        XCTAssertEqual(
            fileError("  keepalive-count: 200"),
            #"virtnbd.yaml:2: limits.keepalive-count: "200" is not a whole number from 1 to 127; give how many unanswered probes close the connection, e.g. 6"#
        )
        XCTAssertEqual(
            fileError("  keepalive: false\n  max-connections: 4\n  keepalive-interval: 5"),
            "virtnbd.yaml:4: limits.keepalive-interval: has no effect while keepalive is false (line 2); remove it, or set keepalive: true"
        )
        XCTAssertEqual(
            fileError("  keep-alive: true"),
            #"virtnbd.yaml:2: limits.keep-alive: unknown key; did you mean "keepalive"?"#)
    }

    func testFlagsWinOverTheFile() throws {
        let off = try parse("  keepalive: false")
        let on = try parse("  keepalive-idle: 30")
        var flags = CommandLineOverrides()
        flags.keepalive = true
        XCTAssertEqual(try off.merged(with: flags).limits.keepalive, .init(enabled: true))
        flags.keepalive = false
        XCTAssertEqual(try on.merged(with: flags).limits.keepalive, .init(enabled: false, idle: 30))
        XCTAssertEqual(try on.merged(with: .init()).limits.keepalive, on.limits.keepalive, "no flag keeps the file's")

        var timing = CommandLineOverrides()
        timing.keepaliveInterval = 2
        XCTAssertEqual(
            try off.merged(with: timing).limits.keepalive, .init(enabled: true, interval: 2),
            "a timing flag turns the file's keepalive: false on")
        timing.keepaliveIdle = 5
        timing.keepaliveCount = 3
        XCTAssertEqual(
            try on.merged(with: timing).limits.keepalive, .init(enabled: true, idle: 5, interval: 2, count: 3))
        XCTAssertEqual(try VirtNBDConfig.fromCommandLine(timing).limits.keepalive.deadline, 11)
    }

    func testFlagErrors() {
        var flags = CommandLineOverrides()
        flags.keepalive = false
        flags.keepaliveIdle = 5
        XCTAssertEqual(
            flagError(flags),
            "command line: --keepalive-idle: has no effect with --no-keepalive; drop --keepalive-idle, or drop --no-keepalive"
        )
        flags = CommandLineOverrides()
        flags.keepaliveIdle = 0
        XCTAssertEqual(flagError(flags), "command line: --keepalive-idle: 0 is not from 1 to 32767; use e.g. 60")
        flags = CommandLineOverrides()
        flags.keepaliveCount = 128
        XCTAssertEqual(flagError(flags), "command line: --keepalive-count: 128 is not from 1 to 127; use e.g. 6")
    }
}
