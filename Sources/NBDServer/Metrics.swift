import Metrics
import NBDProtocol
// Per-export metrics through swift-metrics. The handles are made once per export, so a request
// costs a counter increment (and a histogram observation for device requests), no lookup by label.
// What the virtio driver counts itself (kicks, interrupts, errors, virtqueue depth) is read at
// scrape time by `sample()`, not on the request path. Without a metrics backend bootstrapped
// (no --metrics) swift-metrics hands out no-op handlers.
import Virtio
import VirtioBlock

public final class ExportMetrics: Sendable {
    /// The names of every metric, for the endpoint's histogram buckets, the help table below and the docs.
    public enum Name {
        public static let requests = "virtnbd_requests_total"
        public static let requestErrors = "virtnbd_request_errors_total"
        public static let requestDuration = "virtnbd_request_duration_seconds"
        public static let readBytes = "virtnbd_read_bytes_total"
        public static let writtenBytes = "virtnbd_written_bytes_total"
        public static let requestsInFlight = "virtnbd_requests_in_flight"
        public static let connectionsActive = "virtnbd_connections_active"
        public static let connections = "virtnbd_connections_total"
        public static let virtqueueInFlight = "virtnbd_virtqueue_in_flight"
        public static let kicks = "virtnbd_virtqueue_kicks_total"
        public static let interrupts = "virtnbd_virtqueue_interrupts_total"
        public static let deviceErrors = "virtnbd_device_errors_total"
        /// Made by the server: clients closed before the greeting, by reason (`limit`: --max-connections).
        public static let connectionsRefused = "virtnbd_connections_refused_total"
        /// Made by the executable: SIGHUP reloads, by result.
        public static let configReloads = "virtnbd_config_reloads_total"
        /// Made by the metrics endpoint: 1, with the version, commit and compiler as labels.
        public static let buildInfo = "virtnbd_build_info"
    }

    /// The `# HELP` text of every metric, by name: the metrics backend attaches it when a metric is
    /// made. A name missing here is exported without HELP, which `promtool check metrics` reports
    /// (Tests/interop/23-metrics.sh).
    public static let help: [String: String] = [
        Name.requests: "NBD requests received in transmission, by export and command.",
        Name.requestErrors: "NBD requests answered with an error (invalid, read-only, or failed by the device).",
        Name.requestDuration: "Time from dispatch to the virtio device until the completion is taken up, in seconds.",
        Name.readBytes: "Bytes of successful NBD READs.",
        Name.writtenBytes: "Payload bytes of successful NBD WRITEs.",
        Name.requestsInFlight: "Device requests dispatched and not yet completed, over all connections.",
        Name.connectionsActive: "Clients in transmission with the export.",
        Name.connections: "Clients that entered transmission with the export.",
        Name.virtqueueInFlight: "virtio-blk requests on the export's virtqueue, sampled at scrape time.",
        Name.kicks: "Notifications the virtio-blk driver sent the device, sampled at scrape time.",
        Name.interrupts:
            "Device interrupts the virtio-blk driver's completion thread woke up for, sampled at scrape time.",
        Name.deviceErrors:
            "virtio-blk requests the device completed with IOERR, UNSUPP or no status, sampled at scrape time.",
        Name.connectionsRefused:
            "Clients closed before the greeting because --max-connections (limits.max-connections) was reached.",
        Name.configReloads: "SIGHUP reloads of the configuration file, by result (ok, error).",
        Name.buildInfo:
            "Always 1; the labels name virtnbd's version, the git commit it was built from, and the Swift compiler.",
    ]

    /// The `op` label: NBD commands by their protocol names, lower case.
    public enum Op: Int, CaseIterable, Sendable {
        case read, write, flush, trim, writeZeroes, cache, blockStatus, disc, resize, unknown

        public var label: String {
            switch self {
            case .read: return "read"
            case .write: return "write"
            case .flush: return "flush"
            case .trim: return "trim"
            case .writeZeroes: return "write_zeroes"
            case .cache: return "cache"
            case .blockStatus: return "block_status"
            case .disc: return "disc"
            case .resize: return "resize"
            case .unknown: return "unknown"
            }
        }

        /// Whether requests of this kind go to the virtio device (and have a latency).
        public var reachesDevice: Bool {
            self == .read || self == .write || self == .flush || self == .trim || self == .writeZeroes
        }

        init(_ command: NBDCommand?) {
            switch command {
            case .read: self = .read
            case .write: self = .write
            case .flush: self = .flush
            case .trim: self = .trim
            case .writeZeroes: self = .writeZeroes
            case .cache: self = .cache
            case .blockStatus: self = .blockStatus
            case .disc: self = .disc
            case .resize: self = .resize
            case nil: self = .unknown
            }
        }
    }

    public let export: String
    private let requests: [Counter]
    private let errors: [Counter]
    /// Only for the ops that reach the device; nil for the others.
    private let latency: [Metrics.Timer?]
    private let bytesRead: Counter
    private let bytesWritten: Counter
    private let inFlight: Meter
    private let connectionsActive: Meter
    private let connectionsTotal: Counter
    private let queueDepth: Meter
    private let kicks: Counter
    private let interrupts: Counter
    private let deviceErrors: Counter
    /// Driver counters at the previous scrape; the Prometheus counters grow by the difference.
    private let sampled = Locked<(kicks: Int, interrupts: Int, errors: Int)>((0, 0, 0))

    public init(export: String) {
        self.export = export
        let e = [("export", export)]
        requests = Op.allCases.map { Counter(label: Name.requests, dimensions: e + [("op", $0.label)]) }
        errors = Op.allCases.map { Counter(label: Name.requestErrors, dimensions: e + [("op", $0.label)]) }
        latency = Op.allCases.map {
            $0.reachesDevice ? Metrics.Timer(label: Name.requestDuration, dimensions: e + [("op", $0.label)]) : nil
        }
        bytesRead = Counter(label: Name.readBytes, dimensions: e)
        bytesWritten = Counter(label: Name.writtenBytes, dimensions: e)
        inFlight = Meter(label: Name.requestsInFlight, dimensions: e)
        connectionsActive = Meter(label: Name.connectionsActive, dimensions: e)
        connectionsTotal = Counter(label: Name.connections, dimensions: e)
        queueDepth = Meter(label: Name.virtqueueInFlight, dimensions: e)
        kicks = Counter(label: Name.kicks, dimensions: e)
        interrupts = Counter(label: Name.interrupts, dimensions: e)
        deviceErrors = Counter(label: Name.deviceErrors, dimensions: e)
    }

    // MARK: request path (event loop threads)

    @inline(__always) func request(_ op: Op) { requests[op.rawValue].increment() }
    @inline(__always) func failed(_ op: Op) { errors[op.rawValue].increment() }
    @inline(__always) func read(bytes: Int) { bytesRead.increment(by: bytes) }
    @inline(__always) func wrote(bytes: Int) { bytesWritten.increment(by: bytes) }
    @inline(__always) func started() { inFlight.increment() }
    /// A device request finished after `nanoseconds`.
    @inline(__always) func finished(_ op: Op, nanoseconds: UInt64) {
        inFlight.decrement()
        latency[op.rawValue]?.recordNanoseconds(Int64(clamping: nanoseconds))
    }

    func connected() {
        connectionsActive.increment()
        connectionsTotal.increment()
    }
    func disconnected() { connectionsActive.decrement() }

    // MARK: scrape time

    /// Copies the driver's own counters and its virtqueue depth into the metrics (call before each scrape).
    public func sample(_ device: BlockDevice) {
        let driver = device.driver
        let now = (
            kicks: driver.stats.kicks.load(ordering: .relaxed),
            interrupts: driver.stats.interrupts.load(ordering: .relaxed),
            errors: driver.stats.errors.load(ordering: .relaxed)
        )
        let before = sampled.withLock { s in
            defer { s = now }
            return s
        }
        if now.kicks > before.kicks { kicks.increment(by: now.kicks - before.kicks) }
        if now.interrupts > before.interrupts { interrupts.increment(by: now.interrupts - before.interrupts) }
        if now.errors > before.errors { deviceErrors.increment(by: now.errors - before.errors) }
        queueDepth.set(driver.inFlightCount)
    }

    /// Removes this export's series (its export was removed and its device shut down).
    public func destroy() {
        for m in requests + errors + [bytesRead, bytesWritten, connectionsTotal, kicks, interrupts, deviceErrors] {
            m.destroy()
        }
        for t in latency { t?.destroy() }
        for m in [inFlight, connectionsActive, queueDepth] { m.destroy() }
    }
}
