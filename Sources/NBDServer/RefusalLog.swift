// Clients refused at the connection limit: every refusal is counted
// (`virtnbd_connections_refused_total`), but a flood of them makes one log line per burst, not one
// per connection: the first refusal is logged, the rest within `window` are counted and named in
// the next line.
import Logging
import Metrics
import NIOCore
import Virtio

final class RefusalLog: Sendable {
    /// Refusals within this long of the last line logged are not logged on their own.
    static let window: TimeAmount = .seconds(10)

    private struct State {
        var lastLogged: NIODeadline?
        var unlogged = 0
    }
    private let state = Locked(State())
    private let counter: Counter
    /// What was reached, for the log line: "connection(s) (--max-connections / limits.max-connections)".
    private let what: String

    /// `reason` labels the counter: "limit" (--max-connections) or "per-address".
    init(reason: String = "limit", what: String = "connection(s) (--max-connections / limits.max-connections)") {
        counter = Counter(label: ExportMetrics.Name.connectionsRefused, dimensions: [("reason", reason)])
        self.what = what
    }

    func refused(_ client: String, limit: Int, logger: Logger) {
        counter.increment()
        let now = NIODeadline.now()
        let earlier: Int? = state.withLock { s in
            if let last = s.lastLogged, now - last < Self.window {
                s.unlogged += 1
                return nil
            }
            defer {
                s.lastLogged = now
                s.unlogged = 0
            }
            return s.unlogged
        }
        guard let earlier else { return }
        logger.warning(
            "refusing \(client): the limit of \(limit) \(what) is reached; closed before the greeting\(earlier > 0 ? " (\(earlier) more refused since the last such line)" : ""); refusals in the next \(Self.window.nanoseconds / 1_000_000_000) s are counted, not logged"
        )
    }
}
