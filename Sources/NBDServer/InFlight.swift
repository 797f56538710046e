// A connection's requests while the device works on them: a table of values on the event loop,
// and a sink the device's completions are posted to from whichever thread completes them.
//
// A request that needs the device takes a slot in its connection's `InFlightTable` (what its
// reply needs: the request and when it began). The device is given one closure, which posts
// (slot, outcome) to the connection's `CompletionSink`; the first post of a batch schedules one
// drain on the event loop, which answers every completion that has arrived and flushes once.
// Nothing else is allocated per request on this path: no closure per stage, no join object, and
// the table, the sink's queue and the drained batch keep their storage.
import BlockLayer
import NBDProtocol
import NIOCore
import Virtio
import VirtioBlock

/// What the device answered for one request, with what its reply needs that the request alone does not say.
enum DeviceOutcome: Sendable {
    /// A command whose reply carries no data; `wrote` bytes are counted when it succeeded.
    case status(Result<Void, BlkError>, wrote: Int)
    /// A READ's bytes in one buffer.
    case data(Result<ByteBuffer, BlkError>, ReadReplyShape)
    /// A sparse READ as data and zero extents.
    case extents(Result<[BlockDevice.Extent], BlkError>)
    /// A READ that may have left its bytes in device pages (`BlockLayer.readHeld`).
    case read(Result<BlockDevice.ReadReply, BlkError>, ReadReplyShape)
}

/// One request the device is working on.
struct InFlightRequest {
    let request: NBDRequest
    /// Bytes it counts against the connection's and the server's bounds until it completes.
    let bytes: Int
    let began: NIODeadline
    /// The export's metrics (kept here: the connection may have detached when the completion arrives).
    let metrics: ExportMetrics
}

/// The connection's requests in flight, by slot; used on its event loop only. Freed slots are
/// reused, so the table is as large as the most requests ever in flight (`maxInFlight`).
struct InFlightTable {
    private var slots: [InFlightRequest?] = []
    private var free: [Int] = []

    mutating func admit(_ entry: consuming InFlightRequest) -> Int {
        if let s = free.popLast() {
            slots[s] = consume entry
            return s
        }
        slots.append(consume entry)
        return slots.count - 1
    }

    /// Takes the request out of its slot; each slot is completed once.
    mutating func remove(_ slot: Int) -> InFlightRequest {
        guard let entry = slots[slot].take() else { preconditionFailure("slot \(slot) completed twice") }
        free.append(slot)
        return entry
    }
}

/// Completions for one connection, posted from the thread that completed them (the event loop
/// reaping its own queue, a completion thread, a device thread) and answered on its event loop.
final class CompletionSink: Sendable {
    struct Completed: Sendable {
        let slot: Int
        let outcome: DeviceOutcome
    }
    private let items = Locked<[Completed]>([])
    private let loop: EventLoop
    private let drain: NIOLoopBound<(NBDConnectionHandler, ChannelHandlerContext)>

    init(handler: NBDConnectionHandler, context: ChannelHandlerContext) {
        loop = context.eventLoop
        drain = NIOLoopBound((handler, context), eventLoop: context.eventLoop)
    }

    /// Queues a completion; the first of a batch schedules the drain on the event loop.
    func post(_ slot: Int, _ outcome: DeviceOutcome) {
        let first = items.withLock { i in
            i.append(Completed(slot: slot, outcome: outcome))
            return i.count == 1
        }
        guard first else { return }
        loop.execute {
            let (handler, context) = self.drain.value
            handler.drain(self, context: context)
        }
    }

    /// Swaps what has arrived into `batch` (which the caller empties, keeping its storage);
    /// false when nothing had.
    func take(into batch: inout [Completed]) -> Bool {
        items.withLock { i in
            swap(&i, &batch)
            return !batch.isEmpty
        }
    }
}
