import TestSupport
import VirtioBlock
import XCTest

/// The run-length allocation map behind NBD base:allocation, checked against a per-block model.
final class AllocationMapTests: XCTestCase {
    func testRandomEditsMatchAPerBlockModel() {
        let blocks = 256
        let b: UInt64 = 4096
        var rng = SplitMix(seed: 42)
        for initial in [Allocation.data, .holeZero] {
            let map = AllocationMap(size: UInt64(blocks) * b, initial: initial)
            var model = [Allocation](repeating: initial, count: blocks)
            for step in 0..<3000 {
                let lo = Int.random(in: 0..<blocks, using: &rng)
                let hi = Int.random(in: lo...min(blocks, lo + 16), using: &rng)
                let state = [Allocation.data, .hole, .zero, .holeZero].randomElement(using: &rng)!
                map.set(UInt64(lo) * b, UInt64(hi) * b, state)
                for i in lo..<hi { model[i] = state }
                // The read fast path's question, for a random range.
                let qlo = Int.random(in: 0..<blocks, using: &rng)
                let qhi = Int.random(in: (qlo + 1)...min(blocks, qlo + 8), using: &rng)
                XCTAssertEqual(
                    map.isAllData(UInt64(qlo) * b, UInt64(qhi) * b), model[qlo..<qhi].allSatisfy { $0 == .data },
                    "isAllData [\(qlo), \(qhi)) after step \(step), initial \(initial)")
                if step % 100 == 0 || step == 2999 {
                    var got = [Allocation]()
                    for run in map.extents(0, UInt64(blocks) * b) {
                        XCTAssertLessThan(run.start, run.end)
                        got += Array(repeating: run.state, count: Int((run.end - run.start) / b))
                    }
                    XCTAssertEqual(got, model, "after step \(step), initial \(initial)")
                }
            }
        }
    }

    /// Writes over data, or a state over the same state, leave the map as it was (no new runs).
    func testRepeatedStateIsANoOp() {
        let map = AllocationMap(size: 1 << 20, initial: .holeZero)
        map.set(0, 1 << 20, .data)
        XCTAssertEqual(map.runCount, 0)
        map.set(8192, 16384, .data)
        XCTAssertEqual(map.runCount, 0)
        map.set(8192, 65536, .zero)
        map.set(12288, 16384, .zero)
        XCTAssertEqual(map.runCount, 1)
        XCTAssertEqual(map.extents(0, 1 << 20).map(\.state), [.data, .zero, .data])
    }
}
