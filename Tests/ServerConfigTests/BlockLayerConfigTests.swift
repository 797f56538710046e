import Foundation
import XCTest

@testable import ServerConfig

/// `snapshot`, `snapshot-overlay`, `bitmaps` and `bitmap-granularity` in the file, and their flags.
final class BlockLayerConfigTests: XCTestCase {
    private func parse(_ export: String) throws -> ExportConfig {
        try VirtNBDConfig.parse("exports:\n  - name: a\n    device: simulated\n\(export)").exports[0]
    }

    private func fileError(_ export: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        do {
            let e = try parse(export)
            XCTFail("expected an error, got \(e)", file: file, line: line)
            return ""
        } catch { return "\(error)" }
    }

    func testDefaultsAreOff() throws {
        let e = try parse("")
        XCTAssertFalse(e.snapshot)
        XCTAssertEqual(e.snapshotOverlay, .ram)
        XCTAssertEqual(e.bitmaps, [])
        XCTAssertEqual(e.bitmapGranularity, 64 << 10)
    }

    func testFileKeys() throws {
        let e = try parse("    snapshot: true\n    bitmaps: [nightly, weekly]\n    bitmap-granularity: 1M")
        XCTAssertTrue(e.snapshot)
        XCTAssertEqual(e.bitmaps, ["nightly", "weekly"])
        XCTAssertEqual(e.bitmapGranularity, 1 << 20)
        let f = try parse("    snapshot-overlay: file")
        XCTAssertTrue(f.snapshot, "snapshot-overlay implies snapshot")
        XCTAssertEqual(f.snapshotOverlay, .file)
    }

    func testFileErrorsNameTheLineAndTheFix() {
        XCTAssertTrue(fileError("    bitmaps: [a, a]").contains("virtnbd.yaml:4"), fileError("    bitmaps: [a, a]"))
        XCTAssertTrue(fileError("    bitmaps: [\"\"]").contains("empty"), fileError("    bitmaps: [\"\"]"))
        XCTAssertTrue(
            fileError("    bitmaps: {a: 1}").contains("write bitmaps: [backup]"), fileError("    bitmaps: {a: 1}"))
        XCTAssertEqual(try parse("    bitmaps: nightly").bitmaps, ["nightly"], "one name needs no list")
        XCTAssertTrue(fileError("    bitmap-granularity: 1000").contains("granularity"))
        XCTAssertTrue(fileError("    snapshot-overlay: disk").contains("ram"), fileError("    snapshot-overlay: disk"))
        XCTAssertTrue(fileError("    snapshot: yes please").contains("true or false"))
    }

    func testFlagsAddToTheFileAndValidate() throws {
        let file = try VirtNBDConfig.parse(
            "exports:\n  - name: a\n    device: simulated\n    bitmaps: [nightly]\n    bitmap-granularity: 1M")
        var flags = CommandLineOverrides()
        flags.bitmaps = ["adhoc"]
        flags.snapshotOverlay = .file
        let e = try file.merged(with: flags).exports[0]
        XCTAssertEqual(e.bitmaps, ["nightly", "adhoc"], "--bitmap adds to the file's bitmaps")
        XCTAssertEqual(e.bitmapGranularity, 1 << 20, "no --bitmap-granularity keeps the file's")
        XCTAssertTrue(e.snapshot, "--snapshot-overlay implies --snapshot")
        XCTAssertEqual(e.snapshotOverlay, .file)

        var bad = CommandLineOverrides()
        bad.size = 1 << 20
        bad.bitmaps = ["x", "x"]
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(bad)) {
            XCTAssertTrue("\($0)".contains("twice"), "\($0)")
        }
        bad.bitmaps = [String(repeating: "n", count: 4079)]
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(bad)) {
            XCTAssertTrue("\($0)".contains("4078"), "\($0)")
        }
        bad.bitmaps = ["ok"]
        bad.bitmapGranularity = 3 << 12
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(bad)) {
            XCTAssertTrue("\($0)".contains("--bitmap-granularity"), "\($0)")
        }
    }
}
