// TransmissionFlow without sockets: each bound pauses parsing and reading, and the event that
// frees it resumes them; the budget's two rules (a connection with nothing in flight always
// proceeds; one over its input reserve waits for a wake-up); the shutdown's before/after line;
// the ending's steps. The limits are small made-up numbers so each bound is reached by hand.
import NBDProtocol
import XCTest

final class TransmissionFlowTests: XCTestCase {
    static let limits = TransmissionFlow.Limits(
        requests: 3, bytes: 10_000, heldBytes: 8192, bufferedInput: 5000, inputReserve: 1000)

    func open(writable: Bool = true, spent: Bool = false, unparsed: Int = 0) -> TransmissionFlow.Surroundings {
        TransmissionFlow.Surroundings(writable: writable, budgetSpent: spent, unparsed: unparsed)
    }

    func request(_ command: NBDCommand) -> NBDRequest {
        NBDRequest(flags: [], type: command.rawValue, cookie: 1, offset: 0, length: 0)
    }

    func testRequestsInFlightPauseThenACompletionResumes() {
        var f = TransmissionFlow(limits: Self.limits)
        for _ in 0..<3 {
            XCTAssertTrue(f.mayParse(open()))
            f.started(bytes: 0, held: false)
        }
        XCTAssertFalse(f.mayParse(open()), "3 requests in flight is the limit")
        XCTAssertEqual(f.readRequested(open()), .pause)
        XCTAssertTrue(f.readPaused)
        f.finished(bytes: 0)
        XCTAssertEqual(f.inFlight, 2)
        XCTAssertEqual(f.resume(open()), .read)
        XCTAssertFalse(f.readPaused)
        XCTAssertNil(f.resume(open()), "nothing held back any more")
    }

    func testBytesInFlightPause() {
        var f = TransmissionFlow(limits: Self.limits)
        f.started(bytes: 9999, held: false)
        XCTAssertTrue(f.mayParse(open()), "one byte below the bound")
        f.started(bytes: 1, held: false)
        XCTAssertFalse(f.mayParse(open()))
        f.finished(bytes: 9999)
        XCTAssertEqual(f.inFlightBytes, 1)
        XCTAssertTrue(f.mayParse(open()))
    }

    func testHeldPagesPauseUntilTheReplyIsWritten() {
        var f = TransmissionFlow(limits: Self.limits)
        f.started(bytes: 8192, held: true)
        XCTAssertTrue(f.heldFull)
        XCTAssertFalse(f.mayParse(open()))
        // The device finished, but the reply's pages are still lent to the socket.
        f.finished(bytes: 8192)
        XCTAssertFalse(f.mayParse(open()))
        XCTAssertTrue(f.released(held: 8192), "written: the bound is lifted")
        XCTAssertTrue(f.mayParse(open()))
        XCTAssertEqual(f.heldBytes, 0)
    }

    func testReleasingBelowTheBoundIsNotALift() {
        var f = TransmissionFlow(limits: Self.limits)
        f.started(bytes: 4096, held: true)
        XCTAssertFalse(f.heldFull)
        XCTAssertFalse(f.released(held: 4096), "it was never full")
    }

    func testAnUnwritableSocketPausesParsingAndReading() {
        var f = TransmissionFlow(limits: Self.limits)
        XCTAssertFalse(f.mayParse(open(writable: false)))
        XCTAssertEqual(f.readRequested(open(writable: false)), .pause)
        XCTAssertEqual(f.resume(open(writable: true)), .read)
    }

    func testUnparsedInputIsBounded() {
        var f = TransmissionFlow(limits: Self.limits)
        XCTAssertTrue(f.mayRead(open(unparsed: 4999)))
        XCTAssertFalse(f.mayRead(open(unparsed: 5000)))
        XCTAssertTrue(f.mayParse(open(unparsed: 5000)), "what is buffered is still parsed")
        XCTAssertEqual(f.readRequested(open(unparsed: 5000)), .pause)
    }

    func testASpentBudgetStopsOnlyConnectionsThatHoldSomething() {
        var f = TransmissionFlow(limits: Self.limits)
        // Nothing in flight, input within the reserve: it proceeds, so a small request is answered.
        XCTAssertTrue(f.mayParse(open(spent: true, unparsed: 1000)))
        XCTAssertEqual(f.readRequested(open(spent: true, unparsed: 1000)), .read)
        // Over the reserve: it waits for the budget, since no completion of its own will look again.
        XCTAssertEqual(f.readRequested(open(spent: true, unparsed: 1001)), .waitForBudget)
        XCTAssertEqual(f.resume(open(spent: true, unparsed: 1001)), .waitForBudget)
        XCTAssertEqual(f.resume(open(spent: false, unparsed: 1001)), .read)
        // With a request in flight it parses no more while the budget is spent; its completion looks again.
        f.started(bytes: 10, held: false)
        XCTAssertFalse(f.mayParse(open(spent: true)))
        XCTAssertEqual(f.readRequested(open(spent: true)), .pause)
        XCTAssertTrue(f.mayParse(open(spent: false)))
    }

    func testShutdownServesWhatHadArrivedAndRefusesTheRest() {
        var f = TransmissionFlow(limits: Self.limits)
        XCTAssertFalse(f.refusesAfterShutdown(request(.read), receivedBefore: false), "not shutting down")
        f.quiesce(unparsed: 60) // two 28-byte requests and part of a third
        XCTAssertTrue(f.quiescing)
        XCTAssertTrue(f.consumed(28))
        XCTAssertTrue(f.consumed(28))
        XCTAssertTrue(f.consumed(28), "its first 4 bytes had arrived: it was sent before the shutdown")
        XCTAssertFalse(f.consumed(28))
        XCTAssertTrue(f.refusesAfterShutdown(request(.read), receivedBefore: false))
        XCTAssertFalse(f.refusesAfterShutdown(request(.read), receivedBefore: true))
        XCTAssertFalse(f.refusesAfterShutdown(request(.disc), receivedBefore: false), "DISC is still honoured")
    }

    func testTheCloseWaitsForRequestsInFlightAndStartsOnce() {
        var f = TransmissionFlow(limits: Self.limits)
        f.started(bytes: 0, held: false)
        XCTAssertFalse(f.beginFlush(), "a request is still in flight")
        XCTAssertEqual(f.ending, .open)
        f.finished(bytes: 0)
        XCTAssertTrue(f.beginFlush())
        XCTAssertEqual(f.ending, .flushing)
        XCTAssertFalse(f.beginFlush(), "already flushing")
        f.flushed()
        XCTAssertEqual(f.ending, .open, "the shutdown looks again")
        XCTAssertTrue(f.beginFlush())
        f.closeOutput()
        XCTAssertEqual(f.ending, .outputClosed)
        XCTAssertTrue(f.mayRead(open(writable: false, spent: true, unparsed: 1 << 20)), "read only to see EOF")
    }

    func testTransmissionLimitsReplaceTheHandshakes() {
        var f = TransmissionFlow(
            limits: .init(requests: 3, bytes: 10, heldBytes: 0, bufferedInput: 100, inputReserve: 1000))
        XCTAssertEqual(f.readRequested(open(unparsed: 100)), .pause)
        f.limits = Self.limits
        XCTAssertEqual(f.resume(open(unparsed: 100)), .read, "a read held back while negotiating resumes")
    }
}
