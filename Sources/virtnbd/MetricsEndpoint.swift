// `--metrics HOST:PORT`: Prometheus text exposition at GET /metrics, over NIOHTTP1.
import Logging
import Metrics
import NBDServer
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

enum MetricsBackend {
    /// Histogram buckets of `virtnbd_request_duration_seconds`: block requests take microseconds
    /// to milliseconds, far below swift-prometheus's default 5 ms to 10 s.
    static let durationBuckets: [Duration] = [
        .microseconds(25), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .seconds(1),
    ]

    /// Makes swift-metrics report into a new Prometheus registry, and registers `virtnbd_build_info`.
    /// Call once, before any export is created.
    static func bootstrap() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets[ExportMetrics.Name.requestDuration] = durationBuckets
        MetricsSystem.bootstrap(HelpingMetricsFactory(prometheus: factory))
        registry.makeGauge(
            descriptor: descriptor(ExportMetrics.Name.buildInfo),
            labels: [("version", Versions.virtnbd), ("commit", Versions.commit), ("swift", Versions.swiftCompiler)]
        ).set(to: 1)
        return registry
    }

    /// A metric's name with its HELP text from ExportMetrics.help (empty, so no `# HELP` line, for a
    /// name missing there). The whole name is `metricName`: swift-prometheus joins the parts with `_`.
    static func descriptor(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: ExportMetrics.help[name] ?? "")
    }
}

/// swift-metrics → Prometheus with `# HELP` lines. `PrometheusMetricsFactory` (swift-prometheus
/// 2.4.1) registers every metric with empty help, and the registry refuses (fatalError) a second
/// registration of a name with different help, so help cannot be added afterwards; this factory
/// makes the metrics through the registry's `make…(descriptor:labels:)` instead, with the help from
/// `ExportMetrics.help`, and leaves bucket choice and unregistering to `PrometheusMetricsFactory`.
struct HelpingMetricsFactory: MetricsFactory {
    let prometheus: PrometheusMetricsFactory
    private var registry: PrometheusCollectorRegistry { prometheus.registry }

    private func d(_ label: String) -> MetricNameDescriptor { MetricsBackend.descriptor(label) }

    func makeCounter(label: String, dimensions: [(String, String)]) -> CounterHandler {
        registry.makeCounter(descriptor: d(label), labels: dimensions)
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> FloatingPointCounterHandler {
        registry.makeCounter(descriptor: d(label), labels: dimensions)
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> RecorderHandler {
        guard aggregate else { return registry.makeGauge(descriptor: d(label), labels: dimensions) }
        let buckets = prometheus.valueHistogramBuckets[label] ?? prometheus.defaultValueHistogramBuckets
        return registry.makeValueHistogram(descriptor: d(label), labels: dimensions, buckets: buckets)
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> MeterHandler {
        registry.makeGauge(descriptor: d(label), labels: dimensions)
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> TimerHandler {
        let buckets = prometheus.durationHistogramBuckets[label] ?? prometheus.defaultDurationHistogramBuckets
        return registry.makeDurationHistogram(descriptor: d(label), labels: dimensions, buckets: buckets)
    }

    func destroyCounter(_ handler: CounterHandler) { prometheus.destroyCounter(handler) }
    func destroyFloatingPointCounter(_ handler: FloatingPointCounterHandler) {
        prometheus.destroyFloatingPointCounter(handler)
    }
    func destroyRecorder(_ handler: RecorderHandler) { prometheus.destroyRecorder(handler) }
    func destroyMeter(_ handler: MeterHandler) { prometheus.destroyMeter(handler) }
    func destroyTimer(_ handler: TimerHandler) { prometheus.destroyTimer(handler) }
}

/// The HTTP listener. `beforeScrape` copies sampled values (driver counters) into the registry.
final class MetricsEndpoint: Sendable {
    let channel: Channel

    private init(channel: Channel) { self.channel = channel }

    static func start(
        host: String, port: Int, group: EventLoopGroup, registry: PrometheusCollectorRegistry,
        beforeScrape: @escaping @Sendable () -> Void, logger: Logger
    ) async throws -> MetricsEndpoint {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(
                        MetricsHTTPHandler(registry: registry, beforeScrape: beforeScrape, logger: logger))
                }
            }
            .bind(host: host, port: port).get()
        return MetricsEndpoint(channel: channel)
    }

    var address: String { channel.localAddress.map { "\($0)" } ?? "?" }

    func close() async { try? await channel.close() }
}

/// GET (or HEAD) /metrics → 200 with the text format; other paths 404; other methods 405.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private let registry: PrometheusCollectorRegistry
    private let beforeScrape: @Sendable () -> Void
    private let logger: Logger
    private var head: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry, beforeScrape: @escaping @Sendable () -> Void, logger: Logger) {
        self.registry = registry
        self.beforeScrape = beforeScrape
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            respond(context, h)
        }
    }

    private func respond(_ context: ChannelHandlerContext, _ request: HTTPRequestHead) {
        let path =
            request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init)
            ?? ""
        var status = HTTPResponseStatus.ok
        var headers = HTTPHeaders()
        var body = context.channel.allocator.buffer(capacity: 0)
        if path != "/metrics" {
            status = .notFound
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            body.writeString("not found: metrics are at /metrics\n")
        } else if request.method != .GET && request.method != .HEAD {
            status = .methodNotAllowed
            headers.add(name: "Allow", value: "GET, HEAD")
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            body.writeString("use GET /metrics\n")
        } else {
            beforeScrape()
            var bytes: [UInt8] = []
            bytes.reserveCapacity(16 << 10)
            registry.emit(into: &bytes)
            headers.add(name: "Content-Type", value: Self.contentType)
            if request.method == .GET {
                body.writeBytes(bytes)
            } else {
                headers.add(name: "Content-Length", value: "\(bytes.count)")
            }
        }
        let keepAlive = request.isKeepAlive
        if request.method != .HEAD || status != .ok {
            headers.replaceOrAdd(name: "Content-Length", value: "\(body.readableBytes)")
        }
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        let head = HTTPResponseHead(version: request.version, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if body.readableBytes > 0 { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
            done.whenComplete { _ in ctx.value.close(promise: nil) }
        }
        logger.trace(
            "metrics request", metadata: ["method": "\(request.method)", "path": "\(path)", "status": "\(status.code)"])
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("metrics endpoint: connection error: \(error)")
        context.close(promise: nil)
    }
}
