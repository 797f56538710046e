// Completions on the submitting event loop. A driver whose queues the caller reaps
// (`DriverOptions.completions = .caller`) has one interrupt eventfd per queue; each one is
// watched by the event loop that submits to that queue (loop i uses queue i, `IOLane`), so a
// request is taken from the socket, put on the ring, reaped and answered on one thread. The
// device (the emulator's queue thread, a vhost-user backend, a VFIO device) stays where it is.
import Logging
import NIOCore
import NIOPosix
import Virtio
import VirtioBlock

#if canImport(Glibc)
    import Glibc
#endif

/// The eventfd watchers of every caller-reaped driver the server serves.
final class QueueReapers: Sendable {
    private struct Watch {
        let channel: Channel
        let tick: RepeatedTask
    }
    private let loops: [EventLoop]
    private let logger: Logger
    private let watches = Locked<[ObjectIdentifier: [Watch]]>([:])

    init(group: EventLoopGroup, logger: Logger) {
        loops = Array(group.makeIterator())
        self.logger = logger
    }

    /// Watches `driver`'s queue interrupts (queue i on loop i, modulo the loop count). A driver
    /// reaped by its own threads, or one already watched, is left alone. An interrupt raised
    /// before the watch is registered is not lost: the eventfd stays readable until read.
    func attach(_ driver: VirtioBlkDriver) {
        guard driver.reapedByCaller, !loops.isEmpty else { return }
        let key = ObjectIdentifier(driver)
        guard watches.withLock({ $0[key] == nil }) else { return }
        var made: [Watch] = []
        for (i, interrupt) in driver.queueInterrupts.enumerated() {
            let loop = loops[i % loops.count]
            let fd = dup(interrupt.fd)
            do {
                guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "dup of queue \(i)'s interrupt eventfd") }
                let channel = try NIOPipeBootstrap(group: loop)
                    .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 64))
                    .channelInitializer { ch in
                        ch.eventLoop.makeCompletedFuture {
                            try ch.pipeline.syncOperations.addHandler(QueueInterruptHandler(driver: driver, queue: i))
                        }
                    }
                    .takingOwnershipOfDescriptor(input: fd).wait()
                let tick = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
                    driver.tickQueue(i)
                }
                made.append(Watch(channel: channel, tick: tick))
            } catch {
                // Without a watcher this queue's requests would never complete: stop here, loudly.
                logger.critical(
                    "cannot watch virtqueue \(i)'s interrupt in event loop \(i % loops.count): \(error); run with --poll-us 1 to use completion threads"
                )
                preconditionFailure("virtqueue \(i) has no completion path")
            }
        }
        watches.withLock { $0[key] = made }
    }

    /// Stops watching `driver` (its export was removed and its device shut down).
    func detach(_ driver: VirtioBlkDriver) {
        let gone = watches.withLock { $0.removeValue(forKey: ObjectIdentifier(driver)) } ?? []
        for w in gone {
            w.tick.cancel()
            w.channel.close(promise: nil)
        }
    }
}

/// Reads a queue's interrupt eventfd (NIO's read clears it) and reaps the queue once per wake-up.
private final class QueueInterruptHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let driver: VirtioBlkDriver
    private let queue: Int
    init(driver: VirtioBlkDriver, queue: Int) {
        self.driver = driver
        self.queue = queue
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
    func channelReadComplete(context: ChannelHandlerContext) { driver.serviceQueue(queue) }
}
