import TestSupport
import Virtio
import XCTest

/// The emulator's RAM backend memory: private, anonymous, hole-punched with MADV_DONTNEED.
final class PrivateMemoryTests: XCTestCase {
    /// Unaligned and page-aligned holes read back as zero exactly over their range; every other
    /// byte keeps what was written (against a byte model, seeded).
    func testPunchHoleZeroesExactlyItsRange() throws {
        var rng = TestSeed.generator("PrivateMemoryTests.testPunchHoleZeroesExactlyItsRange")
        let size = 256 * 1024
        let mem = try SharedMemory(privateSize: size)
        XCTAssertEqual(mem.fd, -1, "private memory has no fd")
        var model = rng.bytes(size)
        mem.withMutableBytes(at: 0, count: size) { $0.copyBytes(from: model) }
        var holes = [(0, 1), (4096, 4096), (100, 9000), (size - 513, 513), (12_288, 70_000), (5000, 10)]
        for _ in 0..<50 {
            let o = Int(rng.next() % UInt64(size))
            holes.append((o, Int(rng.next() % UInt64(size - o))))
        }
        for (o, n) in holes {
            mem.punchHole(o, count: n)
            for i in o..<(o + n) { model[i] = 0 }
            let got = mem.withBytes(at: 0, count: size) { Array($0) }
            XCTAssertTrue(got == model, "after the hole [\(o), \(o + n)) the memory differs from the model")
            // Written again after a hole: the pages are usable (and were zero before the write).
            let fill = rng.bytes(64)
            let at = min(o, size - 64)
            mem.withMutableBytes(at: at, count: 64) { $0.copyBytes(from: fill) }
            model.replaceSubrange(at..<(at + 64), with: fill)
        }
    }
}
