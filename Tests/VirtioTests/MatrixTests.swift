import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Virtio
import VirtioBlock
import VirtioDisk
import XCTest

@testable import VirtioEmulator

/// Every combination of ring format × EVENT_IDX × indirect descriptors × queue count runs the same
/// data-verifying workload against the emulator, then sends 3 × 256 + 77 requests through every
/// queue (a packed ring's wrap counters flip six times each) and runs the workload again. The
/// 16-bit index wraps (2 × 65536 + 777 requests per queue, for the same sixteen cells) run
/// release-built in `virtqueue-bench --check-wraps` (Sources/virtqueue-bench/WrapCheck.swift),
/// which Scripts/test's unit stage runs after swift test: under AddressSanitizer they took four
/// minutes of the suite; release-built they take seconds.
final class MatrixTests: XCTestCase {
    struct Cell: CustomStringConvertible {
        var ring: RingFormat, eventIdx: Bool, indirect: Bool, queues: Int
        var description: String { "\(ring) event-idx=\(eventIdx) indirect=\(indirect) queues=\(queues)" }
    }
    static let diskSize = 8 << 20

    static var cells: [Cell] {
        var out: [Cell] = []
        for ring in RingFormat.allCases {
            for e in [true, false] {
                for i in [true, false] {
                    for q in [1, 4] { out.append(Cell(ring: ring, eventIdx: e, indirect: i, queues: q)) }
                }
            }
        }
        return out
    }

    func makeRig(
        _ c: Cell, queueSize: Int = 256, inline: Bool = false, completions: CompletionDelivery? = nil
    ) throws -> EmulatedDisk {
        var cfg = EmulatorConfiguration()
        cfg.inline = inline
        cfg.completionOrder = .reversed
        cfg.queues = 4
        var o = DriverOptions()
        o.ring = c.ring
        o.eventIndex = c.eventIdx
        o.indirect = c.indirect
        o.queues = c.queues
        o.queueSize = queueSize
        o.ioPages = 1024
        if let c = completions { o.completions = c }
        let disk = try EmulatedDisk(
            backend: try RAMBackend(size: UInt64(Self.diskSize)), configuration: cfg, options: o)
        let drv = disk.driver
        XCTAssertEqual(drv.queueCount, c.queues, "\(c)")
        XCTAssertEqual(drv.ring, c.ring, "\(c)")
        XCTAssertEqual(drv.negotiated.contains(.eventIdx), c.eventIdx, "\(c)")
        XCTAssertEqual(drv.negotiated.contains(.indirectDesc), c.indirect, "\(c)")
        XCTAssertEqual(drv.negotiated.contains(.blkMQ), c.queues > 1, "\(c)")
        return disk
    }

    func testMatrix() throws {
        for c in Self.cells {
            try exercise(try makeRig(c), cell: c, seedName: "MatrixTests \(c)")
        }
    }

    /// The workload, the index wraps, the workload again (the data is still right after all
    /// that), no bad chain and no error; then the disk is shut down.
    func exercise(_ disk: EmulatedDisk, cell c: Cell, seedName: String) throws {
        try randomWorkload(disk.device, cell: c, seed: TestSeed.seed(seedName))
        try wrapIndices(disk.driver, cell: c, requests: 3 * 256 + 77)
        try randomWorkload(disk.device, cell: c, seed: 7)
        XCTAssertEqual(disk.emulator.stats.badChains.load(ordering: .relaxed), 0, "\(c)")
        XCTAssertEqual(disk.driver.stats.errors.load(ordering: .relaxed), 0, "\(c)")
        disk.shutdown()
    }

    /// The device run to completion on the notifying thread (`--device-inline`), with completion
    /// threads and with the caller reaping: in the second, no reaper runs at all, so every
    /// request completes only because the driver reaps right after its kick.
    func testMatrixWithTheDeviceInline() throws {
        for c in Self.cells where c.indirect && c.eventIdx {
            for completions in [CompletionDelivery.threads, .caller] {
                try exercise(
                    try makeRig(c, inline: true, completions: completions), cell: c,
                    seedName: "MatrixTests inline \(completions) \(c)")
            }
        }
    }

    /// Random sizes and offsets, many in flight from several submitting threads (one lane each),
    /// completed in reverse by the device, checked against a reference image.
    func randomWorkload(_ dev: BlockDevice, cell: Cell, seed: UInt64) throws {
        var rng = SplitMix(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.diskSize)
        // Start from the device's current contents.
        model = try readAll(dev)
        for round in 0..<4 {
            // Disjoint windows of 128 KiB, each with one write of random size at a random offset.
            let windows = Array((0..<(Self.diskSize >> 17)).shuffled(using: &rng).prefix(24))
            var jobs: [(Int, [UInt8])] = []
            for w in windows {
                let off = (w << 17) + Int.random(in: 0..<8192, using: &rng)
                let len = Int.random(in: 1...(120 << 10), using: &rng)
                let bytes = rng.bytes(len)
                model.replaceSubrange(off..<off + len, with: bytes)
                jobs.append((off, bytes))
            }
            let errors = NIOLockedValueBox<[String]>([])
            let g = DispatchGroup()
            let threads = 4
            for t in 0..<threads {
                let mine = jobs.enumerated().filter { $0.offset % threads == t }.map(\.element)
                g.enter()
                Thread {
                    VirtioBlkDriver.useLane(t)
                    let inner = DispatchGroup()
                    for (off, bytes) in mine {
                        inner.enter()
                        dev.write(offset: UInt64(off), data: ByteBuffer(bytes: bytes), fua: round == 1) { r in
                            if case .failure(let e) = r { errors.withLockedValue { $0.append("\(e)") } }
                            inner.leave()
                        }
                    }
                    inner.wait()
                    g.leave()
                }.start()
            }
            XCTAssertEqual(g.wait(timeout: .now() + 60), .success, "\(cell): writes did not finish")
            XCTAssertEqual(errors.withLockedValue { $0 }, [], "\(cell)")
            // Random reads in flight together, each checked.
            let reads = (0..<32).map { _ -> (Int, Int) in
                let off = Int.random(in: 0..<(Self.diskSize - 1), using: &rng)
                return (off, Int.random(in: 1...min(200 << 10, Self.diskSize - off), using: &rng))
            }
            let bad = NIOLockedValueBox(0)
            for (k, (off, len)) in reads.enumerated() {
                g.enter()
                let expected = Array(model[off..<off + len])
                Thread {
                    VirtioBlkDriver.useLane(k)
                    dev.read(offset: UInt64(off), length: len) { r in
                        if case .success(var b) = r, let got = b.readBytes(length: len), sameBytes(got, expected) {
                        } else {
                            bad.withLockedValue { $0 += 1 }
                        }
                        g.leave()
                    }
                }.start()
            }
            XCTAssertEqual(g.wait(timeout: .now() + 60), .success, "\(cell): reads did not finish")
            XCTAssertEqual(bad.withLockedValue { $0 }, 0, "\(cell): reads differ from the reference image")
        }
        XCTAssertTrue(sameBytes(try readAll(dev), model), "\(cell): device differs from the reference image")
    }

    func readAll(_ dev: BlockDevice) throws -> [UInt8] {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var out: Result<ByteBuffer, BlkError>!
        dev.read(offset: 0, length: Self.diskSize) {
            out = $0
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 60), .success)
        var b = try out.get()
        return b.readBytes(length: b.readableBytes)!
    }

    /// Pushes `requests` small requests through every queue (flushes: two descriptors, no data),
    /// so each ring's slots are reused many times over.
    func wrapIndices(_ drv: VirtioBlkDriver, cell: Cell, requests: Int) throws {
        let g = DispatchGroup()
        let failures = NIOLockedValueBox(0)
        for lane in 0..<drv.queueCount {
            g.enter()
            Thread {
                VirtioBlkDriver.useLane(lane)
                let mine = DispatchGroup()
                var left = requests
                while left > 0 {
                    // Batches keep the waiting list short; the ring still sees many in flight.
                    let n = min(left, 512)
                    for _ in 0..<n {
                        mine.enter()
                        drv.submit(.flush) { r in
                            if case .failure = r { failures.withLockedValue { $0 += 1 } }
                            mine.leave()
                        }
                    }
                    mine.wait()
                    left -= n
                }
                g.leave()
            }.start()
        }
        XCTAssertEqual(g.wait(timeout: .now() + 600), .success, "\(cell): wrap run did not finish")
        XCTAssertEqual(failures.withLockedValue { $0 }, 0, "\(cell)")
    }
}
