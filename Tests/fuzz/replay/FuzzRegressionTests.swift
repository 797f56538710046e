// Replays every saved fuzz regression (Tests/fuzz/regressions/<target>/) through the same entry
// points the libFuzzer builds use (Tests/fuzz/targets/*.swift, compiled here with FUZZ_REPLAY),
// as swift-nio-ssh's FuzzResultTests do: a target's invariant check that fails stops the test
// process with the message, just as it crashes the fuzzer.
import Foundation
import XCTest

final class FuzzRegressionTests: XCTestCase {
    static let regressions = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("regressions")

    func inputs(_ target: String) throws -> [(String, [UInt8])] {
        let dir = Self.regressions.appendingPathComponent(target)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        return try names.map { n in (n, Array(try Data(contentsOf: dir.appendingPathComponent(n)))) }
    }

    func replay(_ target: String, _ entry: (UnsafePointer<UInt8>, Int) -> CInt) throws {
        let all = try inputs(target)
        XCTAssertFalse(all.isEmpty, "no regressions saved for \(target)")
        for (name, bytes) in all {
            let rc = bytes.withUnsafeBufferPointer { b in
                // libFuzzer never passes a null pointer, even for an empty input.
                entry(b.baseAddress ?? UnsafePointer(bitPattern: 1)!, b.count)
            }
            XCTAssertEqual(rc, 0, "\(target)/\(name)")
        }
    }

    func testTransmissionRegressions() throws { try replay("transmission", fuzzTransmission) }
    func testDeviceRegressions() throws { try replay("device", fuzzDevice) }

    /// The handler target (the real NBDConnectionHandler over the synchronous device): its
    /// corpus and regressions, and every saved transmission input read as a handler input.
    func testHandlerCorpusAndTransmissionInputs() throws {
        let root = Self.regressions.deletingLastPathComponent()
        var all: [(String, [UInt8])] = []
        for dir in ["regressions/handler", "corpus/handler", "regressions/transmission", "corpus/transmission"] {
            let d = root.appendingPathComponent(dir)
            let names = (try? FileManager.default.contentsOfDirectory(atPath: d.path).sorted()) ?? []
            for n in names { all.append(("\(dir)/\(n)", Array(try Data(contentsOf: d.appendingPathComponent(n))))) }
        }
        XCTAssertGreaterThan(all.count, 100, "the handler corpus and the transmission inputs")
        for (name, bytes) in all {
            let rc = bytes.withUnsafeBufferPointer { b in
                fuzzHandler(b.baseAddress ?? UnsafePointer(bitPattern: 1)!, b.count)
            }
            XCTAssertEqual(rc, 0, name)
        }
    }

    func testHandshakeCorpusSeeds() throws {
        // No handshake regression has been saved; replay the seed corpus instead.
        let dir = Self.regressions.deletingLastPathComponent().appendingPathComponent("corpus/handshake")
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()) ?? []
        try XCTSkipIf(names.isEmpty, "no handshake corpus")
        for n in names {
            let bytes = Array(try Data(contentsOf: dir.appendingPathComponent(n)))
            let rc = bytes.withUnsafeBufferPointer { b in
                fuzzHandshake(b.baseAddress ?? UnsafePointer(bitPattern: 1)!, b.count)
            }
            XCTAssertEqual(rc, 0, "handshake/\(n)")
        }
    }
}
