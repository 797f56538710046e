// `virtqueue-bench --check-wraps`: the 16-bit index wraps of MatrixTests' sixteen cells, release-
// built so they take seconds (under AddressSanitizer they took minutes). Every ring × EVENT_IDX ×
// indirect × one-or-four-queue cell writes a pattern through every queue, pushes 2 × 65536 + 777
// flushes through every queue (each ring's 16-bit index wraps twice; a packed ring's wrap counter
// flips about a thousand times), and reads the pattern back. Exits non-zero on any failed request
// or mismatch; Scripts/test's unit stage runs it.
import Foundation
import Logging
import Synchronization
import Virtio
import VirtioBlock
import VirtioDisk
import VirtioEmulator

func checkWraps(perQueue: Int) -> Int32 {
    var bad = 0
    for ring in RingFormat.allCases {
        for eventIdx in [true, false] {
            for indirect in [true, false] {
                for queues in [1, 4] {
                    let cell = "\(ring) event-idx=\(eventIdx) indirect=\(indirect) queues=\(queues)"
                    do {
                        let problems = try wrapCell(
                            ring: ring, eventIdx: eventIdx, indirect: indirect, queues: queues, perQueue: perQueue)
                        print("\(problems.isEmpty ? "ok  " : "FAIL") \(cell)\(problems.isEmpty ? "" : ": " + problems)")
                        if !problems.isEmpty { bad += 1 }
                    } catch {
                        print("FAIL \(cell): \(error)")
                        bad += 1
                    }
                }
            }
        }
    }
    return bad == 0 ? 0 : 1
}

private func wrapCell(ring: RingFormat, eventIdx: Bool, indirect: Bool, queues: Int, perQueue: Int) throws -> String {
    var cfg = EmulatorConfiguration()
    cfg.completionOrder = .reversed
    cfg.queues = 4
    var o = DriverOptions()
    o.ring = ring
    o.eventIndex = eventIdx
    o.indirect = indirect
    o.queues = queues
    o.ioPages = 1024
    o.requestTimeoutSeconds = 0
    var log = Logger(label: "virtqueue-bench.check-wraps")
    log.logLevel = .warning
    let disk = try EmulatedDisk(backend: try RAMBackend(size: 8 << 20), configuration: cfg, options: o, logger: log)
    let drv = disk.driver
    defer { disk.shutdown(flush: false) }
    guard drv.queueCount == queues, drv.ring == ring else {
        return "negotiated \(drv.queueCount) queues, \(drv.ring)"
    }
    let tally = Tally()
    let g = DispatchGroup()
    for lane in 0..<queues {
        g.enter()
        Thread {
            wrapLane(drv, lane: lane, perQueue: perQueue, tally: tally)
            g.leave()
        }.start()
    }
    guard g.wait(timeout: .now() + 600) == .success else { return "the wrap run did not finish in 600 s" }
    var out: [String] = []
    let f = tally.failures.load(ordering: .relaxed)
    let m = tally.mismatches.load(ordering: .relaxed)
    if f > 0 { out.append("\(f) request(s) failed") }
    if m > 0 { out.append("\(m) page(s) read back wrong") }
    if disk.emulator.stats.badChains.load(ordering: .relaxed) > 0 { out.append("the device saw bad chains") }
    return out.joined(separator: ", ")
}

/// One lane's part: 8 pages of pattern at its own offset, `perQueue` flushes, the pattern read back.
private func wrapLane(_ drv: VirtioBlkDriver, lane: Int, perQueue: Int, tally: Tally) {
    VirtioBlkDriver.useLane(lane)
    let sector = UInt64(lane * 64 * 8)
    let expected = (0..<(8 * 4096)).map { i in UInt8(truncatingIfNeeded: i &* 31 &+ lane &* 7 &+ 1) }
    let step = DispatchGroup()
    step.enter()
    drv.submit(
        .write(sector: sector, pages: 8),
        fill: { io in
            for p in 0..<8 {
                io.memory.write(expected[(p * 4096)..<((p + 1) * 4096)], at: io.offset(ofPage: p))
            }
        },
        done: { r in
            if case .failure = r { tally.failures.add(1, ordering: .relaxed) }
            step.leave()
        })
    step.wait()
    var left = perQueue
    while left > 0 {
        let n = min(left, 512)
        for _ in 0..<n {
            step.enter()
            drv.submit(.flush) { r in
                if case .failure = r { tally.failures.add(1, ordering: .relaxed) }
                step.leave()
            }
        }
        step.wait()
        left -= n
    }
    step.enter()
    drv.submit(.read(sector: sector, pages: 8)) { r in
        switch r {
        case .success(let io):
            for p in 0..<8
            where io.memory.bytes(at: io.offset(ofPage: p), count: 4096)
                != Array(expected[(p * 4096)..<((p + 1) * 4096)])
            {
                tally.mismatches.add(1, ordering: .relaxed)
            }
        case .failure: tally.failures.add(1, ordering: .relaxed)
        }
        step.leave()
    }
    step.wait()
}

/// Failed requests and wrong pages, counted from the completions.
private final class Tally: Sendable {
    let failures = Atomic<Int>(0)
    let mismatches = Atomic<Int>(0)
}
