import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Virtio
import VirtioBlock
import VirtioDisk
import XCTest

@testable import VirtioEmulator

/// The driver's recovery, with the emulator misbehaving on purpose (debug-only fault hook).
/// Runs each test twice: with completion threads (this class) and with the queues reaped by
/// the caller (`RecoveryCallerReapedTests`), as the server's event loops do.
class RecoveryTests: XCTestCase {
    var completions: CompletionDelivery { .threads }
    private var reapers: [CallerReaper] = []
    override func tearDown() {
        for r in reapers { r.stop() }
        reapers = []
    }

    func rig(timeout: Double = 30, queues: Int = 1) throws -> (VirtioBlkEmulator, VirtioBlkDriver, BlockDevice) {
        var cfg = EmulatorConfiguration()
        cfg.queues = queues
        var o = DriverOptions()
        o.queueSize = 64
        o.ioPages = 256
        o.requestTimeoutSeconds = timeout
        o.queues = queues
        o.completions = completions
        let disk = try EmulatedDisk(backend: try RAMBackend(size: 4 << 20), configuration: cfg, options: o)
        XCTAssertEqual(disk.driver.reapedByCaller, completions == .caller)
        if disk.driver.reapedByCaller { reapers.append(try CallerReaper(disk.driver)) }
        return (disk.emulator, disk.driver, disk.device)
    }

    func write(_ d: BlockDevice, _ off: UInt64, _ bytes: [UInt8]) -> Result<Void, BlkError> {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var out: Result<Void, BlkError>!
        d.write(offset: off, data: ByteBuffer(bytes: bytes), fua: false) {
            out = $0
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 60), .success, "write never completed")
        return out ?? .failure(.shutdown)
    }
    func read(_ d: BlockDevice, _ off: UInt64, _ len: Int) -> Result<[UInt8], BlkError> {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var out: Result<ByteBuffer, BlkError>!
        d.read(offset: off, length: len) {
            out = $0
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 60), .success, "read never completed")
        return (out ?? .failure(.shutdown)).map {
            var b = $0
            return b.readBytes(length: b.readableBytes)!
        }
    }

    /// A request the device swallows times out; the driver resets the device and resubmits it.
    func testTimedOutRequestIsResubmittedAfterReset() throws {
        let (emu, drv, dev) = try rig(timeout: 1)
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        XCTAssertNoThrow(try write(dev, 0, data).get())
        emu.inject(
            {
                var f = EmulatorFaults()
                f.swallow = [1]
                return f
            }())
        XCTAssertEqual(try read(dev, 0, 8192).get(), data, "the swallowed read came back after the reset")
        XCTAssertEqual(drv.stats.timeouts.load(ordering: .relaxed), 1)
        XCTAssertEqual(drv.stats.resets.load(ordering: .relaxed), 1)
        // The device works normally afterwards.
        XCTAssertNoThrow(try write(dev, 4096, [UInt8](repeating: 9, count: 4096)).get())
        XCTAssertEqual(try read(dev, 4096, 4096).get(), [UInt8](repeating: 9, count: 4096))
        drv.shutdown()
        emu.shutdown()
    }

    /// A request that is swallowed again after its resubmission fails with EIO; others go on.
    func testRequestLostTwiceFailsWithIOError() throws {
        let (emu, drv, dev) = try rig(timeout: 1)
        emu.inject(
            {
                var f = EmulatorFaults()
                f.swallow = [1, 2]
                return f
            }())
        let r = read(dev, 0, 4096)
        guard case .failure(.failedAfterReset(.read(sector: 0, pages: 1), resets: 2)) = r else {
            return XCTFail("expected failedAfterReset, got \(r)")
        }
        XCTAssertTrue("\(r)".contains("lost again after 2 device reset(s)"), "\(r)")
        XCTAssertEqual(drv.stats.resets.load(ordering: .relaxed), 2)
        XCTAssertNoThrow(try read(dev, 0, 4096).get(), "later requests work")
        drv.shutdown()
        emu.shutdown()
    }

    /// DEVICE_NEEDS_RESET in the middle of a burst: every write still lands (resubmitted), on every queue.
    func testNeedsResetMidBurstResubmitsEverything() throws {
        let (emu, drv, dev) = try rig(queues: 2)
        emu.inject(
            {
                var f = EmulatorFaults()
                f.needsResetAfter = 20
                return f
            }())
        let g = DispatchGroup()
        let failures = NIOLockedValueBox<[String]>([])
        var model = [UInt8](repeating: 0, count: 4 << 20)
        for i in 0..<64 {
            let bytes = [UInt8](repeating: UInt8(i + 1), count: 16384)
            model.replaceSubrange(i * 65536..<i * 65536 + 16384, with: bytes)
            g.enter()
            Thread {
                VirtioBlkDriver.useLane(i % 2)
                dev.write(offset: UInt64(i * 65536), data: ByteBuffer(bytes: bytes), fua: false) { r in
                    if case .failure(let e) = r { failures.withLockedValue { $0.append("\(e)") } }
                    g.leave()
                }
            }.start()
        }
        XCTAssertEqual(g.wait(timeout: .now() + 60), .success)
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertGreaterThanOrEqual(drv.stats.resets.load(ordering: .relaxed), 1)
        XCTAssertTrue(sameBytes(try read(dev, 0, 4 << 20).get(), model), "read-back differs from the model")
        drv.shutdown()
        emu.shutdown()
    }

    /// A configuration-change interrupt: the driver re-reads the capacity; the block layer
    /// refuses what lies beyond the new end.
    func testConfigChangeRereadsCapacity() throws {
        let (emu, drv, dev) = try rig()
        XCTAssertEqual(dev.size, 4 << 20)
        emu.setCapacity(bytes: 1 << 20)
        let deadline = Date().addingTimeInterval(10)
        while drv.capacityBytes != 1 << 20 && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertEqual(drv.capacityBytes, 1 << 20)
        XCTAssertEqual(drv.stats.configChanges.load(ordering: .relaxed), 1)
        XCTAssertEqual(dev.size, 1 << 20)
        guard case .failure(.outOfRange) = read(dev, 2 << 20, 4096) else {
            return XCTFail("read beyond the new end must be refused")
        }
        XCTAssertNoThrow(try read(dev, 0, 4096).get())
        drv.shutdown()
        emu.shutdown()
    }
}

final class RecoveryCallerReapedTests: RecoveryTests {
    override var completions: CompletionDelivery { .caller }
    // Linux XCTest discovers only the methods a class declares itself.
    override func testTimedOutRequestIsResubmittedAfterReset() throws {
        try super.testTimedOutRequestIsResubmittedAfterReset()
    }
    override func testRequestLostTwiceFailsWithIOError() throws { try super.testRequestLostTwiceFailsWithIOError() }
    override func testNeedsResetMidBurstResubmitsEverything() throws {
        try super.testNeedsResetMidBurstResubmitsEverything()
    }
    override func testConfigChangeRereadsCapacity() throws { try super.testConfigChangeRereadsCapacity() }
}

/// Stands in for the server's event loops (NBDServer.QueueReapers): one thread per queue that
/// sleeps on the queue's interrupt, clears it and calls `serviceQueue`, and `tickQueue` each second.
final class CallerReaper: @unchecked Sendable {
    private let stopFD: EventFD
    private let done = DispatchGroup()
    init(_ driver: VirtioBlkDriver) throws {
        stopFD = try EventFD()
        for (i, interrupt) in driver.queueInterrupts.enumerated() {
            done.enter()
            Thread { [stopFD, done] in
                var nextTick = Date().addingTimeInterval(1)
                while true {
                    let (fired, stop) = interrupt.wait(orUntil: stopFD, timeoutMilliseconds: 100)
                    if stop { break }
                    if fired {
                        interrupt.drain()
                        driver.serviceQueue(i)
                    }
                    if Date() >= nextTick {
                        driver.tickQueue(i)
                        nextTick = Date().addingTimeInterval(1)
                    }
                }
                done.leave()
            }.start()
        }
    }
    func stop() {
        stopFD.signal()
        done.wait()
    }
}
