// A swift-metrics backend for the integration tests that keeps the peak of each export's
// `virtnbd_requests_in_flight` gauge (the server's own count of requests it has accepted and not
// yet answered), so a test can assert how many requests the server really held at once.
import CoreMetrics
import NBDServer
import Synchronization

final class PeakMeter: MeterHandler, Sendable {
    private let value = Mutex<(now: Double, peak: Double)>((0, 0))
    func set(_ v: Int64) { set(Double(v)) }
    func set(_ v: Double) {
        value.withLock {
            $0.now = v
            $0.peak = max($0.peak, v)
        }
    }
    func increment(by d: Double) {
        value.withLock {
            $0.now += d
            $0.peak = max($0.peak, $0.now)
        }
    }
    func decrement(by d: Double) { value.withLock { $0.now -= d } }
    var peak: Double { value.withLock { $0.peak } }
}

final class InFlightPeaks: MetricsFactory, Sendable {
    /// Bootstrapped once per test process, before the first server makes its metrics.
    static let shared: InFlightPeaks = {
        let f = InFlightPeaks()
        MetricsSystem.bootstrap(f)
        return f
    }()
    private let meters = Mutex<[String: PeakMeter]>([:])

    /// The peak in-flight count of the newest server's export `name`.
    func peak(export name: String) -> Double? { meters.withLock { $0[name]?.peak } }

    func makeMeter(label: String, dimensions: [(String, String)]) -> MeterHandler {
        guard label == ExportMetrics.Name.requestsInFlight, let e = dimensions.first(where: { $0.0 == "export" })
        else { return NOOPMetricsHandler.instance }
        let m = PeakMeter()
        meters.withLock { $0[e.1] = m }
        return m
    }
    func makeCounter(label: String, dimensions: [(String, String)]) -> CounterHandler { NOOPMetricsHandler.instance }
    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> RecorderHandler {
        NOOPMetricsHandler.instance
    }
    func makeTimer(label: String, dimensions: [(String, String)]) -> TimerHandler { NOOPMetricsHandler.instance }
    func destroyCounter(_ handler: CounterHandler) {}
    func destroyRecorder(_ handler: RecorderHandler) {}
    func destroyTimer(_ handler: TimerHandler) {}
    func destroyMeter(_ handler: MeterHandler) {}
}
