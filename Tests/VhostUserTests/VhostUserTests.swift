import Foundation
import Logging
import NIOCore
import Synchronization
// The vhost-user front end against a real backend: qemu-storage-daemon's vhost-user-blk export
// (no root needed) on a sparse temp image. Skipped when qemu-storage-daemon is not installed.
import TestSupport
import VhostUser
import Virtio
import VirtioBlock
import XCTest

#if canImport(Glibc)
    import Glibc
#endif

/// A qemu-storage-daemon serving one image as vhost-user-blk (or NBD) on a Unix socket.
final class StorageDaemon: @unchecked Sendable {
    static let binary = "/usr/bin/qemu-storage-daemon"
    static let counter = Atomic<Int>(0)
    let dir: String
    let image: String
    let socket: String
    let process = Process()

    enum Kind { case vhostUserBlk, nbd }

    /// `restarting`: a daemon that was stopped or killed; the new one serves its image on its socket.
    init(
        size: Int, kind: Kind = .vhostUserBlk, image existing: String? = nil, queues: Int = 1,
        restarting old: StorageDaemon? = nil
    ) throws {
        let n = Self.counter.add(1, ordering: .relaxed).newValue
        dir = old?.dir ?? "/tmp/vu-\(getpid())-\(n)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        image = old?.image ?? existing ?? dir + "/disk.img"
        socket = dir + "/vub.sock"
        if old != nil { try? FileManager.default.removeItem(atPath: socket) }
        if existing == nil && old == nil {
            let fd = open(image, O_CREAT | O_RDWR | O_TRUNC, 0o644)
            guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(.EIO) }
            Glibc.close(fd)
        }
        process.executableURL = URL(fileURLWithPath: Self.binary)
        let blockdev = "driver=file,node-name=disk,filename=\(image),discard=unmap"
        switch kind {
        case .vhostUserBlk:
            process.arguments = [
                "--blockdev", blockdev,
                "--export",
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path=\(socket),writable=on,num-queues=\(queues)",
            ]
        case .nbd:
            process.arguments = [
                "--blockdev", blockdev,
                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                "--export", "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
            ]
        }
        _ = FileManager.default.createFile(atPath: dir + "/qsd.log", contents: nil)
        let log = FileHandle(forWritingAtPath: dir + "/qsd.log")
        process.standardOutput = log
        process.standardError = log
        try process.run()
        // Wait for the socket to appear (bounded).
        let deadline = Date().addingTimeInterval(15)
        while !FileManager.default.fileExists(atPath: socket) {
            guard process.isRunning, Date() < deadline else {
                throw XCTSkip("qemu-storage-daemon did not create \(socket): \(daemonLog)")
            }
            usleep(20_000)
        }
    }

    var daemonLog: String { (try? String(contentsOfFile: dir + "/qsd.log", encoding: .utf8)) ?? "" }

    /// SIGTERM and wait (bounded) for it to exit.
    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        waitExit(seconds: 10)
    }
    /// SIGKILL: the backend vanishes without a word.
    func kill9() {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
        waitExit(seconds: 10)
    }
    private func waitExit(seconds: Double) {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
    }
    func cleanup() {
        stop()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// A transport that counts the driver's kicks per queue on the way to the real one.
final class KickCountingTransport: VirtioTransport, @unchecked Sendable {
    let inner: VirtioTransport
    let kicks = Locked<[Int: Int]>([:])
    init(_ inner: VirtioTransport) { self.inner = inner }

    var deviceID: UInt32 { inner.deviceID }
    var queueCount: Int { inner.queueCount }
    func attachMemory(_ memory: SharedMemory) throws { try inner.attachMemory(memory) }
    func reset() throws { try inner.reset() }
    func readStatus() -> VirtioStatus { inner.readStatus() }
    func writeStatus(_ status: VirtioStatus) throws { try inner.writeStatus(status) }
    func readDeviceFeatures() -> VirtioFeatures { inner.readDeviceFeatures() }
    func writeDriverFeatures(_ features: VirtioFeatures) throws { try inner.writeDriverFeatures(features) }
    func maxQueueSize(_ index: Int) -> Int { inner.maxQueueSize(index) }
    func readConfig(offset: Int, width: Int) -> UInt64 { inner.readConfig(offset: offset, width: width) }
    func configGeneration() -> UInt32 { inner.configGeneration() }
    func setupQueue(_ index: Int, size: Int, descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) throws
        -> QueueDoorbells
    {
        let d = try inner.setupQueue(
            index, size: size, descriptors: descriptors, driverArea: driverArea, deviceArea: deviceArea)
        let kicks = self.kicks
        return QueueDoorbells(
            kick: {
                kicks.withLock { $0[index, default: 0] += 1 }
                d.kick()
            }, interrupt: d.interrupt)
    }
}

final class VhostUserTests: XCTestCase {
    static let diskSize = 64 << 20

    var log: Logger {
        var l = Logger(label: "test.vhost-user")
        l.logLevel = ProcessInfo.processInfo.environment["VU_TEST_LOG"] != nil ? .debug : .warning
        return l
    }

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: StorageDaemon.binary) else {
            throw XCTSkip("qemu-storage-daemon is not installed")
        }
    }

    struct Rig {
        let daemon: StorageDaemon
        let transport: VhostUserTransport
        let driver: VirtioBlkDriver
        let dev: BlockDevice
    }

    func rig(queueSize: Int = 256, ioPages: Int = 4096) throws -> Rig {
        let d = try StorageDaemon(size: Self.diskSize)
        do {
            let t = try VhostUserTransport(socketPath: d.socket, logger: log)
            let drv = try VirtioBlkDriver(transport: t, queueSize: queueSize, ioPages: ioPages, logger: log)
            return Rig(daemon: d, transport: t, driver: drv, dev: BlockDevice(driver: drv))
        } catch {
            print("daemon log:", d.daemonLog)
            d.cleanup()
            throw error
        }
    }

    // MARK: blocking helpers with bounded waits

    func blocking<T: Sendable>(_ what: String, seconds: Double = 60, _ start: (@escaping @Sendable (T) -> Void) -> Void)
        throws -> T
    {
        let sem = DispatchSemaphore(value: 0)
        let box = Locked<T?>(nil)
        start { v in
            box.withLock { $0 = v }
            sem.signal()
        }
        guard sem.wait(timeout: .now() + seconds) == .success else {
            XCTFail("\(what) did not complete within \(seconds) s")
            throw BlkError.shutdown // the XCTFail above says what timed out
        }
        return box.withLock { $0! }
    }
    func read(_ d: BlockDevice, _ off: Int, _ len: Int) throws -> [UInt8] {
        var b = try blocking("read \(off)+\(len)") { d.read(offset: UInt64(off), length: len, $0) }.get()
        return b.readBytes(length: b.readableBytes)!
    }
    func write(_ d: BlockDevice, _ off: Int, _ bytes: [UInt8], fua: Bool = false) throws {
        try blocking("write \(off)+\(bytes.count)") {
            d.write(offset: UInt64(off), data: ByteBuffer(bytes: bytes), fua: fua, $0)
        }.get()
    }
    func readAll(_ d: BlockDevice) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.diskSize)
        let chunk = 4 << 20
        for off in stride(from: 0, to: Self.diskSize, by: chunk) { out += try read(d, off, chunk) }
        return out
    }

    // MARK: tests

    func testBadSocketPathGivesClearError() throws {
        let missing = "/tmp/vu-\(getpid())-does-not-exist.sock"
        XCTAssertThrowsError(try VhostUserTransport(socketPath: missing, logger: log)) { e in
            guard case VhostUserError.connectFailed(let p, let errno) = e else {
                return XCTFail("unexpected error \(e)")
            }
            XCTAssertEqual(p, missing)
            XCTAssertEqual(errno, ENOENT)
            XCTAssertTrue("\(e)".contains("is the backend"), "\(e)")
            XCTAssertTrue("\(e)".contains(missing), "\(e)")
        }
        // A regular file where the socket should be: nobody listening.
        let file = "/tmp/vu-\(getpid())-not-a-socket"
        _ = FileManager.default.createFile(atPath: file, contents: Data([1]))
        defer { unlink(file) }
        XCTAssertThrowsError(try VhostUserTransport(socketPath: file, logger: log)) { e in
            guard case VhostUserError.connectFailed = e else { return XCTFail("unexpected error \(e)") }
            XCTAssertTrue("\(e)".contains("cannot connect"), "\(e)")
        }
        let long = "/tmp/" + String(repeating: "x", count: 200)
        XCTAssertThrowsError(try VhostUserTransport(socketPath: long, logger: log)) { e in
            XCTAssertEqual(e as? VhostUserError, .badSocketPath(long))
        }
    }

    /// The negotiated shape of qemu-storage-daemon 7.2's export (see notes, "vhost-user front end").
    func testHandshakeAndGeometry() throws {
        let r = try rig()
        defer {
            r.driver.shutdown()
            r.transport.close()
            r.daemon.cleanup()
        }
        let g = r.driver.geometry
        XCTAssertEqual(g.capacityBytes, UInt64(Self.diskSize))
        XCTAssertEqual(g.segMax, 126)
        XCTAssertEqual(g.blockSize, 512)
        XCTAssertTrue(g.canFlush && g.canDiscard && g.canWriteZeroes)
        XCTAssertFalse(g.readOnly)
        XCTAssertEqual(g.maxDiscardSectors, 32768)
        XCTAssertEqual(g.maxWriteZeroesSectors, 32768)
        XCTAssertEqual(r.driver.maxPagesPerRequest, 32)
        XCTAssertTrue(r.driver.negotiated.contains([.version1, .eventIdx]))
        // VHOST_USER_F_PROTOCOL_FEATURES is the transport's business, never a virtio feature.
        XCTAssertNotEqual(r.transport.backendFeatures & (1 << 30), 0)
        XCTAssertEqual(r.transport.readDeviceFeatures().rawValue & (1 << 30), 0)
        XCTAssertEqual(r.transport.protocolFeatures & ((1 << 3) | (1 << 9)), (1 << 3) | (1 << 9))
        XCTAssertEqual(r.transport.configSpace.count, 60)
        XCTAssertEqual(r.transport.queueCount, 1)
        XCTAssertTrue(r.transport.readStatus().contains([.acknowledge, .driver, .featuresOK, .driverOK]))
        XCTAssertNil(r.transport.failureReason)
    }

    /// Concurrent random writes (aligned and not), flush, read-back; trim and write-zeroes; then the
    /// image file itself must equal the model byte for byte.
    func testConcurrentRandomIOTrimZeroesAndImageMatchesModel() throws {
        let r = try rig()
        var stopped = false
        defer {
            if !stopped {
                r.driver.shutdown()
                r.transport.close()
            }
            r.daemon.cleanup()
        }
        let seed = TestSeed.seed("VhostUserTests.testConcurrentRandomIOTrimZeroesAndImageMatchesModel")
        var rng = SplitMix(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.diskSize)
        let window = 1 << 20
        let windows = Self.diskSize / window
        for round in 0..<8 {
            // 24 disjoint windows written at once; each write random in place, length and alignment.
            let picked = Array((0..<windows).shuffled(using: &rng).prefix(24))
            let group = DispatchGroup()
            let failures = Locked<[String]>([])
            for (k, w) in picked.enumerated() {
                let aligned = k % 3 == 0
                var len = Int.random(in: 1...(300 << 10), using: &rng)
                var off = w * window + Int.random(in: 0..<(window - len), using: &rng)
                if aligned {
                    off &= ~4095
                    len = max(4096, len & ~4095)
                }
                let fill = UInt8(truncatingIfNeeded: round * 37 + k + 1)
                var bytes = [UInt8](repeating: 0, count: len)
                for i in stride(from: 0, to: len, by: 97) { bytes[i] = UInt8(truncatingIfNeeded: Int(fill) &+ i / 97) }
                for i in 0..<min(len, 64) { bytes[i] = fill }
                model.replaceSubrange(off..<(off + len), with: bytes)
                let (o, l) = (off, len)
                group.enter()
                r.dev.write(offset: UInt64(o), data: ByteBuffer(bytes: bytes), fua: k == 5) { res in
                    if case .failure(let e) = res { failures.withLock { $0.append("write \(o)+\(l): \(e)") } }
                    group.leave()
                }
            }
            XCTAssertEqual(group.wait(timeout: .now() + 60), .success, "round \(round) writes hung (seed \(seed))")
            XCTAssertEqual(failures.withLock { $0 }, [], "seed \(seed)")
            try blocking("flush") { r.dev.flush($0) }.get()
            // Spot-check each window while the next round's writes have not started.
            for w in picked {
                XCTAssertTrue(
                    sameBytes(try read(r.dev, w * window, window), Array(model[(w * window)..<((w + 1) * window)])),
                    "round \(round) window \(w), seed \(seed)")
            }
        }
        XCTAssertTrue(sameBytes(try readAll(r.dev), model), "full read-back differs from the model (seed \(seed))")

        // Trim whole blocks (qemu punches holes with discard=unmap: they read back as zeroes).
        try blocking("trim") { r.dev.trim(offset: 3 << 20, length: 2 << 20, $0) }.get()
        model.replaceSubrange((3 << 20)..<(5 << 20), with: [UInt8](repeating: 0, count: 2 << 20))
        // Write-zeroes, aligned and unaligned, with and without unmap.
        for (off, len, unmap) in [
            (10 << 20, 1 << 20, true), ((12 << 20) + 1000, 70_000, false), ((20 << 20) + 4096, 40 << 20, true),
            (5, 3, false),
        ] {
            try blocking("write-zeroes \(off)+\(len)") {
                r.dev.writeZeroes(offset: UInt64(off), length: UInt64(len), mayUnmap: unmap, fua: false, $0)
            }.get()
            model.replaceSubrange(off..<(off + len), with: [UInt8](repeating: 0, count: len))
        }
        // Some data after the zeroes, overlapping their edges.
        let tail = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try write(r.dev, (10 << 20) - 5000, tail, fua: true)
        model.replaceSubrange(((10 << 20) - 5000)..<((10 << 20) + 5000), with: tail)
        XCTAssertTrue(sameBytes(try readAll(r.dev), model), "read-back after trim/zeroes differs (seed \(seed))")

        // Shut down cleanly, stop the daemon, and compare the image file.
        r.driver.shutdown(flush: true)
        r.transport.close()
        stopped = true
        r.daemon.stop()
        let file = try Data(contentsOf: URL(fileURLWithPath: r.daemon.image))
        XCTAssertEqual(file.count, Self.diskSize)
        if file != Data(model) {
            let first = zip(file, model).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            XCTFail("image differs from the model, first at byte \(first) (seed \(seed))")
        }
    }

    /// qemu-storage-daemon with num-queues=4 and a driver with four lanes, each used by its own
    /// thread (as each NIO event loop uses its own): every queue is set up, kicked and completes
    /// requests, each thread's data reads back through its queue, and the image file matches.
    func testFourQueuesAgainstQemuStorageDaemon() throws {
        let d = try StorageDaemon(size: Self.diskSize, queues: 4)
        defer { d.cleanup() }
        let vu = try VhostUserTransport(socketPath: d.socket, logger: log)
        XCTAssertEqual(vu.queueCount, 4, "GET_QUEUE_NUM")
        let t = KickCountingTransport(vu)
        var o = DriverOptions()
        o.queues = 4
        let drv = try VirtioBlkDriver(transport: t, options: o, logger: log)
        var stopped = false
        defer {
            if !stopped {
                drv.shutdown()
                vu.close()
            }
        }
        XCTAssertEqual(drv.queueCount, 4)
        XCTAssertTrue(drv.negotiated.contains(.blkMQ), "\(drv.negotiated)")
        let dev = BlockDevice(driver: drv)

        let seed = TestSeed.seed("VhostUserTests.testFourQueuesAgainstQemuStorageDaemon")
        var rng = SplitMix(seed: seed)
        let model = rng.bytes(Self.diskSize)
        let quarter = Self.diskSize / 4
        let chunk = 256 << 10
        let failures = Locked<[String]>([])

        /// Runs `body(lane)` on four threads at once, thread `lane` submitting on queue `lane`.
        func onEveryLane(_ what: String, _ body: @escaping @Sendable (Int, DispatchGroup) -> Void) {
            let group = DispatchGroup()
            for lane in 0..<4 {
                group.enter()
                let th = Thread {
                    VirtioBlkDriver.useLane(lane)
                    body(lane, group)
                    group.leave()
                }
                th.name = "lane-\(lane)"
                th.start()
            }
            XCTAssertEqual(group.wait(timeout: .now() + 120), .success, "\(what) hung (seed \(seed))")
        }

        // Each lane writes its quarter in 256 KiB requests, all in flight at once (odd ones FUA).
        onEveryLane("writes") { lane, group in
            for off in stride(from: lane * quarter, to: (lane + 1) * quarter, by: chunk) {
                group.enter()
                let data = ByteBuffer(bytes: model[off..<(off + chunk)])
                dev.write(offset: UInt64(off), data: data, fua: (off / chunk) % 2 == 1) { r in
                    if case .failure(let e) = r { failures.withLock { $0.append("lane \(lane) write \(off): \(e)") } }
                    group.leave()
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [], "seed \(seed)")
        let afterWrites = t.kicks.withLock { $0 }
        XCTAssertEqual(afterWrites.keys.sorted(), [0, 1, 2, 3], "every queue was kicked: \(afterWrites)")

        // Each lane reads the next lane's quarter back, so no queue only sees its own writes.
        let mismatches = Locked<[String]>([])
        onEveryLane("reads") { lane, group in
            let other = (lane + 1) % 4
            for off in stride(from: other * quarter, to: (other + 1) * quarter, by: chunk) {
                group.enter()
                dev.read(offset: UInt64(off), length: chunk) { r in
                    switch r {
                    case .success(var b):
                        if b.readBytes(length: b.readableBytes) != Array(model[off..<(off + chunk)]) {
                            mismatches.withLock { $0.append("lane \(lane) read \(off)") }
                        }
                    case .failure(let e): failures.withLock { $0.append("lane \(lane) read \(off): \(e)") }
                    }
                    group.leave()
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [], "seed \(seed)")
        XCTAssertEqual(mismatches.withLock { $0 }, [], "seed \(seed)")
        let afterReads = t.kicks.withLock { $0 }
        for q in 0..<4 {
            XCTAssertGreaterThan(afterReads[q] ?? 0, afterWrites[q] ?? 0, "queue \(q) was kicked for reads too")
        }
        XCTAssertEqual(drv.stats.errors.load(ordering: .relaxed), 0)
        XCTAssertEqual(drv.stats.resets.load(ordering: .relaxed), 0)

        drv.shutdown(flush: true)
        vu.close()
        stopped = true
        d.stop()
        let file = try Data(contentsOf: URL(fileURLWithPath: d.image))
        if file != Data(model) {
            let first = zip(file, model).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            XCTFail("image differs from what the four lanes wrote, first at byte \(first) (seed \(seed))")
        }
    }

    /// kill -9 the backend with requests in flight: they and everything after fail with
    /// deviceBroken, within bounded time, and shutdown returns.
    func testBackendKilledMidRunFailsRequestsWithoutHanging() throws {
        let r = try rig()
        defer {
            r.transport.close()
            r.daemon.cleanup()
        }
        let outcomes = Locked<(ok: Int, broken: Int, other: [String])>((0, 0, []))
        let inFlight = DispatchSemaphore(value: 64)
        let group = DispatchGroup()
        let chunk = 256 << 10
        let payload = ByteBuffer(bytes: [UInt8](repeating: 0x5A, count: chunk))
        var issued = 0
        var killed = false
        let started = Date()
        while Date().timeIntervalSince(started) < 30 {
            if !killed && outcomes.withLock({ $0.ok }) >= 200 {
                r.daemon.kill9()
                killed = true
            }
            if killed && outcomes.withLock({ $0.broken }) > 0 && issued % 64 == 0 { break }
            guard inFlight.wait(timeout: .now() + 15) == .success else {
                XCTFail("requests stopped completing after the kill")
                break
            }
            group.enter()
            let off = UInt64((issued * chunk) % Self.diskSize)
            issued += 1
            r.dev.write(offset: off, data: payload, fua: false) { res in
                outcomes.withLock { o in
                    switch res {
                    case .success: o.ok += 1
                    case .failure(.deviceBroken): o.broken += 1
                    case .failure(let e): o.other.append("\(e)")
                    }
                }
                inFlight.signal()
                group.leave()
            }
        }
        XCTAssertTrue(killed, "the daemon was never killed (completions: \(outcomes.withLock { $0.ok }))")
        XCTAssertEqual(group.wait(timeout: .now() + 15), .success, "requests in flight at the kill never completed")
        let o = outcomes.withLock { $0 }
        XCTAssertGreaterThan(o.broken, 0)
        XCTAssertEqual(o.other, [], "errors other than deviceBroken")
        // The next request fails at once with the typed error.
        let next: Result<Void, BlkError> = try blocking("write after the kill", seconds: 10) {
            r.dev.write(offset: 0, data: payload, fua: false, $0)
        }
        guard case .failure(.deviceBroken) = next else { return XCTFail("expected deviceBroken, got \(next)") }
        let flushed: Result<Void, BlkError> = try blocking("flush after the kill", seconds: 10) { r.dev.flush($0) }
        guard case .failure(.deviceBroken) = flushed else { return XCTFail("expected deviceBroken, got \(flushed)") }
        XCTAssertTrue(r.transport.readStatus().contains(.deviceNeedsReset))
        XCTAssertNotNil(r.transport.failureReason)
        // Control messages now fail with a typed error instead of blocking.
        XCTAssertThrowsError(try r.transport.reset()) { e in
            guard case VhostUserError.backendFailed = e else { return XCTFail("unexpected \(e)") }
        }
        // Shutdown (final flush + reset) must return.
        let done = DispatchSemaphore(value: 0)
        let drv = r.driver
        Thread {
            drv.shutdown(flush: true)
            done.signal()
        }.start()
        XCTAssertEqual(done.wait(timeout: .now() + 15), .success, "driver shutdown hung after the backend died")
        print("kill test: \(o.ok) ok before the kill, \(o.broken) failed with deviceBroken, \(issued) issued")
    }

    /// qemu-storage-daemon is killed with SIGKILL twice under a write load and started again on the
    /// same socket and image 1 s later: with `reconnect` the driver holds what was in flight,
    /// reconnects and resubmits, so every write succeeds, and the image holds every one.
    func testBackendRestartedUnderLoadIsReconnected() throws {
        var daemon = try StorageDaemon(size: Self.diskSize)
        defer { daemon.cleanup() }
        let t = try VhostUserTransport(socketPath: daemon.socket, logger: log, reconnect: true)
        defer { t.close() }
        var o = DriverOptions()
        o.reconnectTimeoutSeconds = 30
        let drv = try VirtioBlkDriver(transport: t, options: o, logger: log)
        let dev = BlockDevice(driver: drv)
        let seed = TestSeed.seed("VhostUserTests.testBackendRestartedUnderLoadIsReconnected")
        var rng = SplitMix(seed: seed)
        let chunk = 64 << 10
        let chunks = Self.diskSize / chunk
        var model = [UInt8](repeating: 0, count: Self.diskSize)
        let outcomes = Locked<(ok: Int, failed: [String])>((0, []))
        let inFlight = DispatchSemaphore(value: 32)
        let group = DispatchGroup()
        var restarts = 0
        var issued = 0
        // Four passes over the disk in a fresh order each; a pass ends before the next begins, so
        // no two writes in flight overlap. The daemon restarts after 700 and 2,000 completions.
        var order = Array(0..<chunks)
        for _ in 0..<4 {
            order.shuffle(using: &rng)
            for c in order {
                if restarts < 2 && outcomes.withLock({ $0.ok }) >= [700, 2000][restarts] {
                    daemon.kill9()
                    let old = daemon
                    usleep(1_000_000)
                    daemon = try StorageDaemon(size: Self.diskSize, restarting: old)
                    restarts += 1
                }
                guard inFlight.wait(timeout: .now() + 60) == .success else {
                    return XCTFail("writes stopped completing after restart \(restarts) (seed \(seed))")
                }
                var bytes = [UInt8](repeating: 0, count: chunk)
                let tag = UInt64(issued) &* 0x9E37_79B9_7F4A_7C15
                for i in stride(from: 0, to: chunk, by: 8) { bytes[i] = UInt8(truncatingIfNeeded: tag >> (i % 56)) }
                model.replaceSubrange((c * chunk)..<((c + 1) * chunk), with: bytes)
                issued += 1
                group.enter()
                dev.write(offset: UInt64(c * chunk), data: ByteBuffer(bytes: bytes), fua: false) { res in
                    outcomes.withLock { o in
                        switch res {
                        case .success: o.ok += 1
                        case .failure(let e): o.failed.append("\(c): \(e)")
                        }
                    }
                    inFlight.signal()
                    group.leave()
                }
            }
            XCTAssertEqual(group.wait(timeout: .now() + 60), .success, "a pass's writes hung (seed \(seed))")
        }
        XCTAssertEqual(restarts, 2)
        XCTAssertEqual(group.wait(timeout: .now() + 60), .success, "writes in flight never completed (seed \(seed))")
        let got = outcomes.withLock { $0 }
        XCTAssertEqual(got.failed, [], "seed \(seed)")
        XCTAssertEqual(got.ok, issued)
        XCTAssertEqual(drv.stats.resets.load(ordering: .relaxed), 2, "one reset per restart")
        try blocking("flush") { dev.flush($0) }.get()
        XCTAssertTrue(sameBytes(try readAll(dev), model), "read back through the reconnected backend (seed \(seed))")
        drv.shutdown()
        daemon.stop()
        let image = try XCTUnwrap(FileManager.default.contents(atPath: daemon.image))
        XCTAssertTrue(sameBytes(Array(image), model), "the image holds every acknowledged write (seed \(seed))")
    }

    /// The backend drops the connection right after the handshake: bringing the driver up fails with a
    /// typed error naming the message, not a hang.
    func testBackendGoneBeforeDriverStarts() throws {
        let d = try StorageDaemon(size: Self.diskSize)
        defer { d.cleanup() }
        let t = try VhostUserTransport(socketPath: d.socket, logger: log)
        d.kill9()
        // Give the watch thread a moment; either way the driver must fail quickly with a typed error.
        usleep(100_000)
        XCTAssertThrowsError(try VirtioBlkDriver(transport: t, queueSize: 128, logger: log)) { e in
            XCTAssertTrue(e is VhostUserError, "\(type(of: e)): \(e)")
            XCTAssertTrue("\(e)".contains("closed"), "\(e)")
        }
        t.close()
    }
}
