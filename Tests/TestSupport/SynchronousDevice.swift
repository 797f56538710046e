// The synchronous device for tests (issue #32): a RAM virtio-blk disk, the same stack the server
// serves (RAMBackend → VirtioBlkEmulator → VirtioMMIOTransport → VirtioBlkDriver → BlockDevice,
// built by EmulatedDisk), configured so that every request completes on the thread that issues
// it: before the call that issued it returns, or, with the driver plugged (`plug()`, as the
// handler does while it parses one read's requests), before the `unplug()` returns.
//
// Two switches make it so, neither of them a test-only path:
//   - the emulator runs inline (`EmulatorConfiguration.inline`, `--device-inline`): the doorbell
//     write serves the queue on the writing thread, through the shared rings;
//   - the driver's queue is reaped by its caller (`CompletionDelivery.caller`): right after such
//     a kick it reaps the used ring on the same thread (`QueueDoorbells.completesOnKick`), so the
//     request's callback has run when `submit` returns. No completion thread, no interrupt
//     watcher (`QueueReapers`) is needed.
// A request that has to wait for pages (every page lent to READ replies that are not freed yet)
// runs when the last buffer holding them is freed, on the thread that frees it.
//
// With it, NBDConnectionHandler on NIO's EmbeddedChannel is deterministic: a request's completion
// is posted to the connection's mailbox while the request is parsed, and answered when the test
// runs the EmbeddedEventLoop. The handler tests and the `handler` fuzz target use it.
import Logging
import VirtioBlock
import VirtioDisk
import VirtioEmulator

public final class SynchronousDevice: @unchecked Sendable {
    public let disk: EmulatedDisk
    /// What an NBDExport serves.
    public var device: BlockDevice { disk.device }
    public var driver: VirtioBlkDriver { disk.driver }
    public var emulator: VirtioBlkEmulator { disk.emulator }
    private var stopped = false

    /// A fresh RAM disk of `size` bytes (all zero). The block layer is told nothing about holes,
    /// so every READ goes to the device. `ioPages` bounds the bytes in flight (and, with it, the
    /// bytes one connection may hold in READ replies: `BlockDevice.heldReadLimit`, half of them).
    public init(size: UInt64, readOnly: Bool = false, ioPages: Int = 2048) throws {
        var log = Logger(label: "test.synchronous-device")
        log.logLevel = .warning
        var o = DriverOptions()
        o.queues = 1
        o.ioPages = ioPages
        o.completions = .caller
        // Nothing sweeps for late requests (that is QueueReapers' once-a-second tick), and a
        // request here is never late: it has completed before its submit returned.
        o.requestTimeoutSeconds = 0
        disk = try EmulatedDisk(
            backend: try RAMBackend(size: size, readOnly: readOnly), holes: [], discardReadsZero: false, options: o,
            inline: true, logger: log)
        guard disk.driver.reapedByCaller, disk.emulator.completesOnNotify else {
            disk.shutdown()
            throw NotSynchronous()
        }
    }

    struct NotSynchronous: Error, CustomStringConvertible {
        var description: String { "the driver is not reaped by its caller or the device does not run inline" }
    }

    /// Requests the driver has taken and not completed (waiting for pages included). Zero
    /// whenever no READ reply's pages are still held by a buffer.
    public var inFlight: Int { driver.inFlightCount }

    /// Drains and stops the device (idempotent). Free every buffer that holds READ pages first
    /// (finish the channel, drop what was read from it): the drain waits for requests waiting for them.
    public func shutdown() {
        guard !stopped else { return }
        stopped = true
        disk.shutdown()
    }
}
