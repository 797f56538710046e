// ByteBudget: the server-wide memory budget's accounting and its wake-ups (issue #31).
import Synchronization
import XCTest

@testable import NBDServer

final class ByteBudgetTests: XCTestCase {
    func testExhaustedAtTheLimitAndNotBelow() {
        let b = ByteBudget(limit: 100)
        b.take(99)
        XCTAssertFalse(b.exhausted)
        b.take(1)
        XCTAssertTrue(b.exhausted)
        b.give(1)
        XCTAssertFalse(b.exhausted)
        XCTAssertEqual(b.held, 99)
        b.take(0)
        b.give(0)
        XCTAssertEqual(b.held, 99)
    }

    func testAWakeUpRunsAtOnceWhenTheBudgetHasRoom() {
        let b = ByteBudget(limit: 100)
        let woken = Atomic<Int>(0)
        b.whenAvailable { woken.add(1, ordering: .relaxed) }
        XCTAssertEqual(woken.load(ordering: .relaxed), 1)
    }

    func testWakeUpsWaitUntilTheBudgetFallsBelowItsLimitAndRunOnce() {
        let b = ByteBudget(limit: 100)
        b.take(150)
        let woken = Atomic<Int>(0)
        for _ in 0..<3 { b.whenAvailable { woken.add(1, ordering: .relaxed) } }
        XCTAssertEqual(woken.load(ordering: .relaxed), 0)
        b.give(40) // 110: still spent
        XCTAssertEqual(woken.load(ordering: .relaxed), 0)
        b.give(20) // 90
        XCTAssertEqual(woken.load(ordering: .relaxed), 3)
        b.give(90)
        b.take(200)
        b.give(200)
        XCTAssertEqual(woken.load(ordering: .relaxed), 3, "a wake-up runs once")
    }

    /// Gives and registrations race from several threads: no wake-up is lost (each registered one
    /// runs once the budget is back to zero).
    func testNoWakeUpIsLostWhenGivesRace() {
        for round in 0..<200 {
            let b = ByteBudget(limit: 8)
            b.take(64)
            let woken = Atomic<Int>(0)
            DispatchQueue.concurrentPerform(iterations: 16) { i in
                if i % 2 == 0 {
                    b.whenAvailable { woken.add(1, ordering: .relaxed) }
                } else {
                    b.give(8)
                }
            }
            XCTAssertEqual(b.held, 0)
            XCTAssertEqual(woken.load(ordering: .relaxed), 8, "round \(round)")
        }
    }
}
