// "Transmission phase": how much a connection takes on at once, and how it ends. A pure value:
// the NIO handler (NBDServer/ConnectionHandler.swift) tells it what happened (a request parsed,
// a reply sent, the socket's writability, the server-wide budget) and does what it answers.
//
// The spec leaves the bounds to the server ("Request message": the server MAY process requests
// in any order and answer them in any order); what it does require, and this value keeps:
// - every request but NBD_CMD_DISC gets exactly one reply ("Transmission phase"), so a request
//   counted in flight is uncounted by exactly one completion;
// - after NBD_CMD_DISC the server answers the requests before it, then closes ("Terminating the
//   transmission phase");
// - a server that shuts down answers what it had received and MAY refuse later requests with
//   NBD_ESHUTDOWN ("Error values": "the server is in the process of being shut down").

/// A connection's flow control and ending in the transmission phase.
public struct TransmissionFlow: Sendable, Equatable {
    /// What one connection may hold.
    public struct Limits: Sendable, Equatable {
        /// Requests in flight before parsing (and reading) pauses.
        public var requests: Int
        /// Bytes of WRITE payload and READ data in flight before parsing pauses; at least one
        /// maximum payload, so a request is never split to fit.
        public var bytes: Int
        /// READ bytes held in device pages (in flight, or replied and not yet written).
        public var heldBytes: Int
        /// Unparsed input buffered before the socket is no longer read.
        public var bufferedInput: Int
        /// Unparsed input a connection may hold and still read while the server's budget is spent.
        public var inputReserve: Int

        public init(requests: Int, bytes: Int, heldBytes: Int, bufferedInput: Int, inputReserve: Int) {
            self.requests = requests
            self.bytes = bytes
            self.heldBytes = heldBytes
            self.bufferedInput = bufferedInput
            self.inputReserve = inputReserve
        }
    }

    /// What the connection does not hold itself, read when it decides.
    public struct Surroundings: Sendable, Equatable {
        /// The socket takes more replies (below its write-buffer high-water mark).
        public var writable: Bool
        /// The server-wide memory budget is spent.
        public var budgetSpent: Bool
        /// Bytes received and not parsed yet.
        public var unparsed: Int

        public init(writable: Bool, budgetSpent: Bool, unparsed: Int) {
            self.writable = writable
            self.budgetSpent = budgetSpent
            self.unparsed = unparsed
        }
    }

    /// How the connection is ending.
    public enum Ending: Sendable, Equatable {
        /// Serving.
        case open
        /// Waiting for the replies queued so far to reach the socket, then closing (DISC) or
        /// looking again (shutdown).
        case flushing
        /// Shutdown: every reply is written and the output half-closed; input is read only to
        /// be dropped until the client's EOF.
        case outputClosed
    }

    /// What to do with a read the channel asks for.
    public enum ReadAction: Sendable, Equatable {
        case read
        /// Not now: a completion or a write will look again.
        case pause
        /// Not now, and nothing in flight will look again: ask the budget for a wake-up.
        case waitForBudget
    }

    /// Set when transmission starts (the export's maximum payload and page share); the
    /// handshake's bounds before that.
    public var limits: Limits
    public private(set) var inFlight = 0
    public private(set) var inFlightBytes = 0
    public private(set) var heldBytes = 0
    /// A read was asked for and held back.
    public private(set) var readPaused = false
    /// The server is shutting down.
    public private(set) var quiescing = false
    public private(set) var ending = Ending.open
    /// Bytes of input that had arrived when the shutdown began: their requests are still served.
    private var receivedBeforeQuiesce = 0

    public init(limits: Limits) { self.limits = limits }

    // MARK: bounds

    /// The connection holds its share of device pages in READs not yet written.
    public var heldFull: Bool { heldBytes > 0 && heldBytes >= limits.heldBytes }

    /// The budget is spent and this connection has requests of its own in flight, whose
    /// completions will look again (one with nothing in flight always proceeds, so a small
    /// request always gets its answer and the budget cannot deadlock the server).
    public func overBudget(_ s: Surroundings) -> Bool { inFlight > 0 && s.budgetSpent }

    /// The budget is spent and this connection holds more than its reserve of unparsed input.
    public func inputOverBudget(_ s: Surroundings) -> Bool { s.unparsed > limits.inputReserve && s.budgetSpent }

    /// Another request may be parsed now. (Quiescing changes nothing here: what was received
    /// before is served, what comes after is refused.)
    public func mayParse(_ s: Surroundings) -> Bool {
        inFlight < limits.requests && inFlightBytes < limits.bytes && !overBudget(s) && !heldFull && s.writable
    }

    /// The socket may be read now: requests in flight, their bytes, unparsed input and unsent
    /// replies are all within bounds. A client that floods requests without reading replies
    /// fills its own socket buffers instead of the server's memory.
    public func mayRead(_ s: Surroundings) -> Bool {
        if ending == .outputClosed { return true } // reading only to see the client's EOF
        return mayParse(s) && !inputOverBudget(s) && s.unparsed < limits.bufferedInput
    }

    // MARK: events

    /// The channel asks to read.
    public mutating func readRequested(_ s: Surroundings) -> ReadAction {
        if mayRead(s) { return .read }
        readPaused = true
        return inputOverBudget(s) ? .waitForBudget : .pause
    }

    /// Something freed room (a completion, a write, the budget): nil if no read is held back.
    public mutating func resume(_ s: Surroundings) -> ReadAction? {
        guard readPaused else { return nil }
        if mayRead(s) {
            readPaused = false
            return .read
        }
        return inputOverBudget(s) ? .waitForBudget : .pause
    }

    /// A request went to the device with `bytes` of payload or data; `held` if its READ data
    /// stays in device pages until written.
    public mutating func started(bytes: Int, held: Bool) {
        inFlight += 1
        inFlightBytes += bytes
        if held { heldBytes += bytes }
    }

    /// A request's device work is done (its reply is being sent).
    public mutating func finished(bytes: Int) {
        precondition(inFlight > 0, "a completion without a request in flight")
        inFlight -= 1
        inFlightBytes -= bytes
    }

    /// Held READ bytes left the device's pages (written, failed, or never lent). True if that
    /// lifted the held bound, so parsing and reading may go on.
    @discardableResult
    public mutating func released(held n: Int) -> Bool {
        let wasFull = heldFull
        heldBytes -= n
        precondition(heldBytes >= 0, "more held bytes released than taken")
        return wasFull && !heldFull
    }

    /// The server begins to shut down with `unparsed` bytes received: their requests are served.
    public mutating func quiesce(unparsed: Int) {
        quiescing = true
        receivedBeforeQuiesce = unparsed
    }

    /// `n` bytes of input were parsed: whether they had arrived before the shutdown began.
    public mutating func consumed(_ n: Int) -> Bool {
        let before = receivedBeforeQuiesce > 0
        receivedBeforeQuiesce = max(0, receivedBeforeQuiesce - n)
        return before
    }

    /// Shutting down, a request whose bytes came after the quiesce is answered NBD_ESHUTDOWN and
    /// touches nothing; DISC is still honoured.
    public func refusesAfterShutdown(_ r: NBDRequest, receivedBefore: Bool) -> Bool {
        quiescing && !receivedBefore && r.command != .disc
    }

    /// The close may start waiting for the replies to be written: nothing in flight, not
    /// already waiting. True: it is now waiting.
    public mutating func beginFlush() -> Bool {
        guard inFlight == 0, ending == .open else { return false }
        ending = .flushing
        return true
    }

    /// The replies were written but the shutdown must look again (more requests were parsed).
    public mutating func flushed() {
        if ending == .flushing { ending = .open }
    }

    /// Shutdown: every received request is answered and written; the output is half-closed.
    public mutating func closeOutput() { ending = .outputClosed }
}
