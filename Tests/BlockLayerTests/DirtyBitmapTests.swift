import BlockLayer
import Foundation
import Logging
import TestSupport
import XCTest

final class DirtyBitmapTests: XCTestCase {
    /// Random marks at unaligned offsets against a model of one Bool per chunk: the bits, the
    /// runs (which must cover the query exactly) and the dirty byte count agree with it.
    func testMarksAndRunsMatchAModel() {
        var rng = TestSeed.generator("DirtyBitmapTests.marks")
        for size: UInt64 in [1, 4096, 65536 * 64, 65536 * 64 + 1, 10_000_000] {
            for g: UInt64 in [4096, 65536] {
                var b = DirtyBitmap(name: "m", granularity: g, size: size)
                var model = Array(repeating: false, count: Int((size + g - 1) / g))
                for _ in 0..<200 {
                    let off = UInt64.random(in: 0..<size, using: &rng)
                    let len = UInt64.random(in: 1...max(1, min(size - off, g * 70)), using: &rng)
                    let changed = b.mark(off, len)
                    let first = Int(off / g)
                    let last = Int((off + len - 1) / g)
                    let wasAll = model[first...last].allSatisfy { $0 }
                    for i in first...last { model[i] = true }
                    XCTAssertEqual(changed.isEmpty, wasAll, "changed words reported iff a bit was set")
                    let qa = UInt64.random(in: 0..<size, using: &rng)
                    let qb = UInt64.random(in: qa + 1...size, using: &rng)
                    let runs = b.runs(qa, qb)
                    XCTAssertEqual(runs.first?.start, qa)
                    XCTAssertEqual(runs.last?.end, qb)
                    for (r, next) in zip(runs, runs.dropFirst()) {
                        XCTAssertEqual(r.end, next.start, "runs are consecutive")
                        XCTAssertNotEqual(r.dirty, next.dirty, "neighbours differ")
                    }
                    for r in runs {
                        for c in Int(r.start / g)...Int((r.end - 1) / g) {
                            XCTAssertEqual(model[c], r.dirty, "chunk \(c) size \(size) g \(g)")
                        }
                    }
                }
                let want = model.enumerated().reduce(UInt64(0)) { n, e in
                    e.element ? n + min(g, size - UInt64(e.offset) * g) : n
                }
                XCTAssertEqual(b.dirtyBytes, want)
            }
        }
    }

    private func bitmaps(_ size: UInt64 = 1 << 20, file: String? = nil) throws -> DirtyBitmaps {
        var log = Logger(label: "test")
        log.logLevel = .critical
        return try DirtyBitmaps(size: size, file: file, logger: log)
    }

    /// A clear waits for the writes begun before it; a second clear meanwhile is refused, and
    /// writes begun after the first clear are in the new epoch only.
    func testClearWaitsForEarlierWritesAndRefusesASecondClear() throws {
        let m = try bitmaps()
        try m.add("b", granularity: 65536)
        let early = try m.begin(0, 10).get()
        let answered = Box<Result<Void, BitmapError>?>(nil)
        m.clear("b", freezing: "b-1") { r in answered.withLock { $0 = r } }
        XCTAssertNil(answered.withLock { $0 }, "the clear waits for the write begun before it")
        let late = try m.begin(131072, 10).get()
        let second = Box<Result<Void, BitmapError>?>(nil)
        m.clear("b") { r in second.withLock { $0 = r } }
        XCTAssertEqual(second.withLock { $0 }.map { "\($0)" }, "\(Result<Void, BitmapError>.failure(.busy("b")))")
        m.end(late)
        XCTAssertNil(answered.withLock { $0 }, "a write begun after the clear does not hold it")
        m.end(early)
        XCTAssertNotNil(try answered.withLock { $0 }?.get())
        XCTAssertEqual(
            m.bitmap("b-1")?.runs(0, 1 << 20).filter(\.dirty).map(\.start), [0], "old epoch: the early write")
        XCTAssertEqual(
            m.bitmap("b")?.runs(0, 1 << 20).filter(\.dirty).map(\.start), [131072], "new epoch: the late one")
        XCTAssertEqual(m.bitmap("b-1")?.frozen, true)
        // A frozen bitmap records nothing more.
        m.end(try m.begin(0, 1 << 20).get())
        XCTAssertEqual(m.bitmap("b-1")?.dirtyBytes, 65536)
        XCTAssertEqual(m.bitmap("b")?.dirtyBytes, 1 << 20)
    }

    func testBadNamesAndDuplicatesChangeNothing() throws {
        let m = try bitmaps()
        try m.add("b")
        XCTAssertThrowsError(try m.add("")) {
            XCTAssertEqual($0 as? BitmapError, .badName("", "is empty; give 1 to 4078 bytes"))
        }
        XCTAssertThrowsError(try m.add(String(repeating: "x", count: 4079)))
        XCTAssertNoThrow(try m.add(String(repeating: "x", count: 4078)), "the longest name that fits an NBD string")
        XCTAssertThrowsError(try m.add("b")) { XCTAssertEqual($0 as? BitmapError, .exists("b")) }
        XCTAssertThrowsError(try m.add("c", granularity: 3000))
        XCTAssertThrowsError(try m.remove("nope"))
        let done = Box<Result<Void, BitmapError>?>(nil)
        m.clear("b", freezing: "b") { r in done.withLock { $0 = r } }
        XCTAssertEqual(done.withLock { $0 }.map { "\($0)" }, "\(Result<Void, BitmapError>.failure(.exists("b")))")
        XCTAssertEqual(m.names, ["b", String(repeating: "x", count: 4078)])
    }

    private func tempFile() -> String {
        let p = NSTemporaryDirectory() + "bitmaps-\(UUID().uuidString)"
        addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
        return p
    }

    /// Bits persist across a clean close, and across an unclean one on the same boot (kill -9:
    /// every mark reached the file before its write was sent).
    func testPersistsAcrossCleanAndUncleanStops() throws {
        let path = tempFile()
        do {
            let m = try bitmaps(file: path)
            try m.add("b")
            m.end(try m.begin(70000, 1).get())
            m.close()
        }
        do {
            let m = try bitmaps(file: path)
            XCTAssertEqual(m.bitmap("b")?.runs(0, 1 << 20).filter(\.dirty).map(\.start), [65536])
            m.end(try m.begin(300_000, 1).get())
            // No close: as after kill -9.
        }
        let m = try bitmaps(file: path)
        XCTAssertEqual(
            m.bitmap("b")?.runs(0, 1 << 20).filter(\.dirty).map(\.start), [65536, 262144],
            "same boot: the marks are trusted")
        XCTAssertEqual(m.list().first?.persistent, true)
    }

    /// After an unclean stop on another boot, active bitmaps are all dirty; frozen ones are kept.
    func testUncleanStopOnAnotherBootMarksActiveBitmapsAllDirty() throws {
        let path = tempFile()
        do {
            let m = try bitmaps(file: path)
            try m.add("b")
            m.end(try m.begin(0, 1).get())
            let done = Box(false)
            m.clear("b", freezing: "old") { _ in done.withLock { $0 = true } }
            XCTAssertTrue(done.withLock { $0 })
            m.end(try m.begin(200_000, 1).get())
        }
        // Another host boot: overwrite the recorded boot id.
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try h.seek(toOffset: 16)
        try h.write(contentsOf: Data(String(repeating: "0", count: 36).utf8))
        try h.close()
        let m = try bitmaps(file: path)
        XCTAssertEqual(m.bitmap("b")?.dirtyBytes, 1 << 20, "active: every block dirty")
        XCTAssertEqual(m.bitmap("old")?.runs(0, 1 << 20).filter(\.dirty).map(\.start), [0], "frozen: kept")
    }

    func testAFileForAnotherSizeIsRefused() throws {
        let path = tempFile()
        try bitmaps(file: path).close()
        XCTAssertThrowsError(try bitmaps(2 << 20, file: path)) {
            XCTAssertEqual($0 as? BitmapError, .sizeMismatch(path: path, file: 1 << 20, export: 2 << 20))
        }
        try Data("not a bitmap file".utf8).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try bitmaps(file: path)) {
            guard case .corrupt = $0 as? BitmapError else { return XCTFail("\($0)") }
        }
    }
}

/// A value behind a lock, for results set from callbacks.
final class Box<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func withLock<R>(_ body: (inout T) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
