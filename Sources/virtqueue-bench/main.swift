// virtqueue-bench: the virtqueue round trip, driver submit → emulator thread → used ring →
// completion, for 4 KiB reads from a RAM disk. No NBD, no sockets: just the virtio path.
//
//   swift run -c release virtqueue-bench [--requests N] [--ring split|packed] [--mode irq|poll]
//   swift run -c release virtqueue-bench --check-wraps     (a check, not a benchmark: WrapCheck.swift)
//
// For each ring format and completion mode it prints, at queue depth 1, the median and 99th
// percentile time per request and requests per second, and at queue depth 32 requests per second.
// Modes: irq = both sides sleep on eventfds (kick / interrupt) and the caller reaps the queue
// itself when its interrupt fires (DriverOptions.completions = .caller, as the server's loops); poll = the device polls its ring for 200 µs before sleeping, and the caller reaps
// completions itself (VirtioBlkDriver.pollCompletions, interrupts off) instead of waiting.
import Foundation
import Logging
import Synchronization
import Virtio
import VirtioBlock
import VirtioDisk
import VirtioEmulator

struct Options {
    var requests = 200_000
    var rings: [RingFormat] = RingFormat.allCases
    var modes = ["irq", "poll"]
    var checkWraps = false
}

func parse() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    while let a = args.next() {
        switch a {
        case "--requests": o.requests = Int(args.next() ?? "") ?? o.requests
        case "--ring": if let r = args.next().flatMap(RingFormat.init(rawValue:)) { o.rings = [r] }
        case "--mode": if let m = args.next(), ["irq", "poll"].contains(m) { o.modes = [m] }
        case "--check-wraps": o.checkWraps = true
        default:
            FileHandle.standardError.write(
                Data(
                    "usage: virtqueue-bench [--requests N] [--ring split|packed] [--mode irq|poll] | --check-wraps\n"
                        .utf8))
            exit(2)
        }
    }
    return o
}

final class Flag: Sendable {
    let done = Atomic<Bool>(false)
    let errors = Atomic<Int>(0)
}

/// Queue depth 32: a window of 32 requests kept full; returns requests per second.
func queueDepth32(
    _ drv: VirtioBlkDriver, sectors: [UInt64], requests: Int, flag: Flag, reap: () -> Void
) -> Double {
    let all = DispatchGroup()
    let clock = ContinuousClock()
    let t1 = clock.now
    let inFlight = Atomic<Int>(0)
    for i in 0..<requests {
        while inFlight.load(ordering: .acquiring) >= 32 { reap() }
        inFlight.add(1, ordering: .relaxed)
        all.enter()
        drv.submit(.read(sector: sectors[i & 4095], pages: 1)) { r in
            if case .failure = r { flag.errors.add(1, ordering: .relaxed) }
            inFlight.subtract(1, ordering: .releasing)
            all.leave()
        }
    }
    while inFlight.load(ordering: .acquiring) > 0 { reap() }
    all.wait()
    let total = clock.now - t1
    return Double(requests) / (Double(total.components.seconds) + Double(total.components.attoseconds) / 1e18)
}

func run(ring: RingFormat, mode: String, requests: Int) throws -> String {
    let poll = mode == "poll" ? 200 : 0
    var cfg = EmulatorConfiguration()
    cfg.queues = 1
    cfg.pollMicroseconds = poll
    let diskPages = 16384 // 64 MiB
    var o = DriverOptions()
    o.ring = ring
    o.queueSize = 256
    o.requestTimeoutSeconds = 0
    // irq: this thread sleeps on the queue's interrupt eventfd and reaps it itself, as an NBD
    // server's event loop does (no completion thread).
    o.completions = poll > 0 ? .threads : .caller
    var log = Logger(label: "virtqueue-bench")
    log.logLevel = .warning
    let disk = try EmulatedDisk(
        backend: try RAMBackend(size: UInt64(diskPages * 4096)), configuration: cfg, options: o, logger: log)
    let drv = disk.driver
    defer { disk.shutdown(flush: false) }
    var rng = SystemRandomNumberGenerator()
    let sectors = (0..<4096).map { _ in UInt64(Int.random(in: 0..<diskPages, using: &rng) * 8) }

    // Completions are taken on this thread: polled, or after sleeping on the interrupt.
    let irq = drv.queueInterrupts.first
    let never = try EventFD()
    func reap() {
        if let irq {
            _ = irq.wait(orUntil: never)
            irq.drain()
            drv.serviceQueue(0)
        } else {
            drv.pollCompletions()
        }
    }
    // Queue depth 1: one request at a time, timed one by one.
    let flag = Flag()
    func once(_ i: Int) {
        flag.done.store(false, ordering: .relaxed)
        drv.submit(.read(sector: sectors[i & 4095], pages: 1)) { r in
            if case .failure = r { flag.errors.add(1, ordering: .relaxed) }
            flag.done.store(true, ordering: .releasing)
        }
        while !flag.done.load(ordering: .acquiring) { reap() }
    }
    for i in 0..<min(20_000, requests / 10) { once(i) } // warm-up
    var samples = [Int64](repeating: 0, count: requests)
    let clock = ContinuousClock()
    let t0 = clock.now
    for i in 0..<requests {
        let s = clock.now
        once(i)
        let d = clock.now - s
        samples[i] = d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000
    }
    let qd1Total = clock.now - t0
    samples.sort()
    let median = samples[requests / 2]
    let p99 = samples[requests * 99 / 100]
    let qd1Rate =
        Double(requests) / (Double(qd1Total.components.seconds) + Double(qd1Total.components.attoseconds) / 1e18)

    let qd32Rate = queueDepth32(drv, sectors: sectors, requests: requests, flag: flag, reap: reap)
    let errors = flag.errors.load(ordering: .relaxed)
    return String(
        format: "| %-6@ | %-4@ | %9d | %9d | %11.0f | %12.0f | %6d |",
        ring.rawValue as NSString, mode as NSString, median, p99, qd1Rate, qd32Rate, errors)
}

let opts = parse()
if opts.checkWraps { exit(checkWraps(perQueue: 2 * 65536 + 777)) }
print(
    "virtqueue round trip, 4 KiB reads from a RAM-backed emulator, \(opts.requests) requests per cell, \(ProcessInfo.processInfo.activeProcessorCount) CPUs"
)
print("| ring   | mode | QD1 median ns | QD1 p99 ns | QD1 req/s | QD32 req/s | errors |")
print("|--------|------|----------:|----------:|------------:|-------------:|-------:|")
for ring in opts.rings {
    for mode in opts.modes {
        do { print(try run(ring: ring, mode: mode, requests: opts.requests)) } catch {
            FileHandle.standardError.write(Data("virtqueue-bench: \(ring) \(mode): \(error)\n".utf8))
            exit(1)
        }
    }
}
