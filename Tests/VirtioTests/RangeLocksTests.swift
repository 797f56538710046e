import NIOConcurrencyHelpers
import VirtioBlock
import XCTest

/// The 4 KiB range locks under BlockDevice: readers share, writers exclude, waiters keep their
/// order, and `tryAcquire` (the no-closure fast path) never jumps the queue.
final class RangeLocksTests: XCTestCase {
    func testTryAcquireSharesReadsAndRefusesConflicts() {
        let l = RangeLocks()
        let r1 = l.tryAcquire(0, 8192, exclusive: false)
        let r2 = l.tryAcquire(4096, 12288, exclusive: false)
        XCTAssertNotNil(r1)
        XCTAssertNotNil(r2)
        XCTAssertNil(l.tryAcquire(0, 4096, exclusive: true), "a write over a held read range waits")
        XCTAssertNotNil(l.tryAcquire(16384, 20480, exclusive: true), "a write elsewhere goes ahead")
        XCTAssertEqual(l.heldCount, 3)
        l.release(r1!)
        l.release(r2!)
        XCTAssertNotNil(l.tryAcquire(0, 4096, exclusive: true), "free again after release")
    }

    func testTryAcquireDoesNotOvertakeAWaiter() {
        let l = RangeLocks()
        let reader = l.tryAcquire(0, 4096, exclusive: false)!
        let granted = NIOLockedValueBox<[Int]>([])
        // A writer queues behind the reader...
        l.acquire(0, 4096, exclusive: true) { t in granted.withLockedValue { $0.append(t) } }
        XCTAssertEqual(granted.withLockedValue { $0 }, [], "the writer waits for the reader")
        // ...so a new reader of the same range must not slip in ahead of it.
        XCTAssertNil(l.tryAcquire(0, 4096, exclusive: false), "tryAcquire respects the queued writer")
        l.release(reader)
        XCTAssertEqual(granted.withLockedValue { $0 }.count, 1, "the writer is granted on release")
        l.release(granted.withLockedValue { $0 }[0])
        XCTAssertEqual(l.heldCount, 0)
    }
}
