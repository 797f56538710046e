// The vhost-user front end: a `VirtioTransport` whose device is a vhost-user backend (for example
// qemu-storage-daemon's vhost-user-blk export) on a Unix socket.
//
// The mapping of virtio transport steps onto vhost-user messages:
//   init            SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG (cached)
//   status          local (vhost-user has no status register); FEATURES_OK sends SET_FEATURES
//   attachMemory    SET_MEM_TABLE with the arena memfd (one region)
//   setupQueue      SET_VRING_NUM, SET_VRING_BASE(0), SET_VRING_ADDR (user addresses),
//                   SET_VRING_KICK, SET_VRING_CALL (eventfds), SET_VRING_ENABLE(1)
//   kick / irq      the kick eventfd / the call eventfd
//   reset           SET_VRING_ENABLE(0) + GET_VRING_BASE for every live queue (stops the rings)
// With REPLY_ACK negotiated every message without a reply of its own asks for an ack, so a refusal
// surfaces at the message that caused it.
//
// A backend that goes away (EOF/HUP on the socket) is noticed by a small watch thread: the transport
// is marked failed, readStatus() then reports DEVICE_NEEDS_RESET, and the call eventfds are signalled
// so the driver wakes, finds no completions, reads the status and resets. Made with `reconnect`, the
// transport's reset() then connects to the socket again and repeats the connect-time negotiation and
// SET_MEM_TABLE (the driver's setup replays the rest, with the same call eventfds); a returning
// backend that offers fewer features, less capacity or fewer queues is refused. Without it (or while
// the backend is still away) reset() throws and the driver fails, or holds, what was in flight.
import CVirtShim
import Foundation
import Logging
import Virtio

#if canImport(Glibc)
    import Glibc
#endif

public final class VhostUserTransport: VirtioTransport, @unchecked Sendable {
    public let deviceID: UInt32
    public let socketPath: String
    /// Features the backend offered in GET_FEATURES (including VHOST_USER_F_PROTOCOL_FEATURES).
    public private(set) var backendFeatures: UInt64 = 0
    /// Protocol features in effect after SET_PROTOCOL_FEATURES.
    public private(set) var protocolFeatures: UInt64 = 0
    /// The 60-byte virtio-blk config space read once at connect time.
    public private(set) var configSpace: [UInt8] = []
    private var queues: Int = 1
    private let maxQueue: Int
    private let replyTimeoutMilliseconds: Int32
    /// reset() reconnects to a backend that went away (`canReconnect`).
    private let reconnect: Bool
    private var sock: Int32
    private let logger: Logger

    private struct LiveQueue {
        let size: Int
        let kick: EventFD
        let call: EventFD
    }

    /// Socket traffic and ring setup; held across a request and its reply.
    private let control = NSLock()
    private var driverFeatures: VirtioFeatures = []
    /// What SET_FEATURES last accepted: a returning backend must offer at least these.
    private var acceptedFeatures: UInt64 = 0
    /// The refusal last logged, so a backend that keeps coming back short is logged once.
    private var lastRefusal: String?
    private var memory: SharedMemory?
    private var live: [Int: LiveQueue] = [:]
    /// Each queue's call eventfd, made at its first setup and reused after every reset.
    private var callFDs: [Int: EventFD] = [:]
    private var closed = false

    /// What the completion thread reads without waiting on socket traffic.
    private struct Health {
        var status: VirtioStatus = []
        var failure: String?
        var calls: [Int: EventFD] = [:]
    }
    private let health = Locked(Health())
    private var watch: HangupWatch?

    /// Connects to a vhost-user backend and reads what a virtio-blk driver needs before negotiation.
    /// - Parameters:
    ///   - socketPath: the backend's listening Unix socket.
    ///   - deviceID: virtio device ID to report; vhost-user cannot tell, so this is an assertion by the caller (2 = block).
    ///   - maxQueueSize: largest ring offered to the driver. vhost-user has no message for it; libvhost-user
    ///     (qemu-storage-daemon) handles up to 1024.
    ///   - replyTimeout: seconds to wait for any reply before declaring the backend hung.
    ///   - reconnect: when the backend goes away, reset() connects to `socketPath` again.
    public init(
        socketPath: String, logger: Logger, deviceID: UInt32 = 2, maxQueueSize: Int = 1024, replyTimeout: Double = 10,
        reconnect: Bool = false
    ) throws {
        self.socketPath = socketPath
        self.reconnect = reconnect
        self.logger = logger
        self.deviceID = deviceID
        self.maxQueue = maxQueueSize
        self.replyTimeoutMilliseconds = Int32(max(1, min(replyTimeout * 1000, Double(Int32.max))))
        let fd = vshim_unix_connect(socketPath)
        if fd == -ENAMETOOLONG { throw VhostUserError.badSocketPath(socketPath) }
        guard fd >= 0 else { throw VhostUserError.connectFailed(path: socketPath, errno: -fd) }
        sock = fd
        do {
            control.lock()
            defer { control.unlock() }
            try handshake()
            try startWatch()
        } catch {
            close()
            throw error
        }
    }

    public var canReconnect: Bool { reconnect }

    /// Watches the current socket for the backend hanging up (callers hold `control`).
    private func startWatch() throws {
        watch = try HangupWatch(
            socket: sock,
            onHangup: { [weak self] in
                self?.markFailed(
                    "the backend closed the vhost-user connection (it exited, crashed, or dropped us after a bad request; check its log)"
                )
            },
            rewake: { [weak self] in
                self?.signalCalls()
            })
    }

    deinit { close() }

    /// Stops watching and closes the connection; the backend then drops its side of the rings.
    /// Anything still using the transport sees it as failed. Idempotent.
    public func close() {
        control.lock()
        watch?.stop()
        watch = nil
        let wasOpen = !closed
        if wasOpen {
            closed = true
            if sock >= 0 { Glibc.close(sock) }
            sock = -1
        }
        live.removeAll()
        control.unlock()
        if wasOpen { markFailed("the vhost-user connection was closed by this front end", quiet: true) }
    }

    /// Why the transport is unusable, if it is.
    public var failureReason: String? { health.withLock { $0.failure } }

    // MARK: connect-time negotiation

    /// SET_OWNER through GET_CONFIG on a fresh connection (callers hold `control`).
    private func handshake(reconnected: Bool = false) throws {
        try send(.setOwner, [], fds: [], needReply: false)
        backendFeatures = try requestU64(.getFeatures)
        guard backendFeatures & VhostUser.protocolFeaturesBit != 0 else {
            throw VhostUserError.missingFeature("VHOST_USER_F_PROTOCOL_FEATURES (needed to read the config space)")
        }
        let offered = try requestU64(.getProtocolFeatures)
        let wanted = offered & (VhostUser.protocolMQ | VhostUser.protocolReplyAck | VhostUser.protocolConfig)
        var w = WireWriter()
        w.u64(wanted)
        try send(.setProtocolFeatures, w.bytes, fds: [], needReply: false)
        protocolFeatures = wanted
        guard wanted & VhostUser.protocolConfig != 0 else {
            throw VhostUserError.missingFeature("VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG)")
        }
        if wanted & VhostUser.protocolMQ != 0 {
            let n = try requestU64(.getQueueNum)
            guard n >= 1, n <= 1024 else { throw VhostUserError.badReply(.getQueueNum, "\(n) queues") }
            queues = Int(n)
        }
        configSpace = try getConfig(size: VhostUser.blkConfigSize)
        if deviceID == 2, backendFeatures & VirtioFeatures.blkSizeMax.rawValue != 0, configSpace.le(8, 4) == 0 {
            logger.debug(
                "backend offers VIRTIO_BLK_F_SIZE_MAX with size_max 0; hiding the feature (no segment size limit)")
        }
        logger.info(
            reconnected ? "vhost-user backend reconnected" : "vhost-user backend connected",
            metadata: [
                "socket": "\(socketPath)",
                "features": "0x\(String(backendFeatures, radix: 16))",
                "protocol-features": "0x\(String(wanted, radix: 16)) of 0x\(String(offered, radix: 16))",
                "queues": "\(queues)",
                "capacity-sectors": "\(configSpace.le(0, 8))",
            ])
    }

    private func getConfig(size: Int) throws -> [UInt8] {
        var w = WireWriter()
        w.u32(0)
        w.u32(UInt32(size))
        w.u32(0) // offset, size, flags (0 = front end)
        w.zeros(size)
        try send(.getConfig, w.bytes, fds: [], needReply: false)
        let reply = try receive(.getConfig)
        guard reply.count >= 12 else { throw VhostUserError.configUnavailable(requested: size, got: 0) }
        let got = Int(reply.le(4, 4))
        guard got > 0, got <= size, reply.count >= 12 + got else {
            throw VhostUserError.configUnavailable(requested: size, got: max(0, reply.count - 12))
        }
        var cfg = Array(reply[12..<(12 + got)])
        if cfg.count < size { cfg.append(contentsOf: repeatElement(0, count: size - cfg.count)) }
        return cfg
    }

    // MARK: VirtioTransport

    public func attachMemory(_ memory: SharedMemory) throws {
        control.lock()
        defer { control.unlock() }
        try checkUsable(.setMemTable)
        try sendMemTable(memory)
        self.memory = memory
    }

    /// SET_MEM_TABLE with the arena as the one region (callers hold `control`).
    private func sendMemTable(_ memory: SharedMemory) throws {
        var w = WireWriter()
        w.u32(1)
        w.u32(0) // one region, padding
        w.u64(memory.deviceBase) // guest_phys_addr: what descriptors carry
        w.u64(UInt64(memory.size))
        w.u64(memory.hostAddress) // userspace_addr: what ring addresses carry
        w.u64(0) // mmap_offset
        try command(.setMemTable, w.bytes, fds: [memory.fd])
        logger.debug(
            "vhost-user memory attached",
            metadata: [
                "device-base": "0x\(String(memory.deviceBase, radix: 16))", "size": "\(memory.size)",
            ])
    }

    public func reset() throws {
        control.lock()
        defer { control.unlock() }
        health.withLock { $0.status = [] }
        driverFeatures = []
        // A dead backend cannot be reset, whether or not queues are still live.
        defer {
            live.removeAll()
            health.withLock { $0.calls.removeAll() }
        }
        if reconnect, !closed, health.withLock({ $0.failure != nil }) { return try reconnectToBackend() }
        try checkUsable(.getVringBase)
        let indices = live.keys.sorted()
        for i in indices {
            var w = WireWriter()
            w.u32(UInt32(i))
            w.u32(0)
            try command(.setVringEnable, w.bytes, fds: [])
            try send(.getVringBase, w.bytes, fds: [], needReply: false)
            let r = try receive(.getVringBase)
            guard r.count >= 8 else {
                throw VhostUserError.badReply(.getVringBase, "\(r.count) payload bytes, expected 8")
            }
            logger.debug(
                "vhost-user queue stopped", metadata: ["queue": "\(r.le(0, 4))", "last-avail": "\(r.le(4, 4))"])
        }
    }

    /// A new connection to the socket after the backend went away (callers hold `control`): the
    /// connect-time negotiation, then the checks that it is the same disk, then SET_MEM_TABLE.
    /// Throws while nobody listens there yet; the transport stays failed until one succeeds.
    private func reconnectToBackend() throws {
        watch?.stop()
        watch = nil
        if sock >= 0 { Glibc.close(sock) }
        sock = -1
        let before = (features: acceptedFeatures, capacity: configSpace.le(0, 8), queues: callFDs.count)
        let fd = vshim_unix_connect(socketPath)
        guard fd >= 0 else { throw VhostUserError.connectFailed(path: socketPath, errno: -fd) }
        sock = fd
        health.withLock { $0.failure = nil }
        do {
            try handshake(reconnected: true)
            var short: [String] = []
            let missing = before.features & ~backendFeatures
            if missing != 0 { short.append("features 0x\(String(missing, radix: 16)) no longer offered") }
            let capacity = configSpace.le(0, 8)
            if capacity < before.capacity {
                short.append("capacity \(capacity) sectors, was \(before.capacity)")
            }
            if queues < before.queues { short.append("\(queues) queue(s), \(before.queues) in use") }
            if !short.isEmpty {
                let e = VhostUserError.backendShrank(path: socketPath, what: short.joined(separator: ", "))
                if lastRefusal != e.description { logger.error("\(e)") }
                lastRefusal = e.description
                throw e
            }
            lastRefusal = nil
            if capacity > before.capacity {
                logger.notice(
                    "the returning backend is larger (\(capacity) sectors, was \(before.capacity)); the export keeps its size"
                )
            }
            if let m = memory { try sendMemTable(m) }
            try startWatch()
        } catch {
            if sock >= 0 { Glibc.close(sock) }
            sock = -1
            markFailed("reconnecting failed: \(error)", quiet: true)
            throw error
        }
    }

    public func readStatus() -> VirtioStatus {
        health.withLock { h in h.failure == nil ? h.status : h.status.union(.deviceNeedsReset) }
    }

    public func writeStatus(_ status: VirtioStatus) throws {
        if status.isEmpty { return try reset() }
        control.lock()
        defer { control.unlock() }
        let old = health.withLock { $0.status }
        var new = status
        if status.contains(.featuresOK) && !old.contains(.featuresOK) {
            let offered = readDeviceFeatures().rawValue
            if driverFeatures.rawValue & ~offered != 0 {
                // As a device would: refuse by leaving FEATURES_OK clear.
                logger.error(
                    "driver accepted features the backend did not offer",
                    metadata: [
                        "offered": "0x\(String(offered, radix: 16))", "accepted": "\(driverFeatures)",
                    ])
                new.remove(.featuresOK)
            } else {
                try checkUsable(.setFeatures)
                var w = WireWriter()
                w.u64(driverFeatures.rawValue | (backendFeatures & VhostUser.protocolFeaturesBit))
                try command(.setFeatures, w.bytes, fds: [])
                acceptedFeatures = driverFeatures.rawValue
            }
        }
        health.withLock { $0.status = new }
    }

    /// The backend's virtio features, without VHOST_USER_F_PROTOCOL_FEATURES. Quirk: QEMU 7.2's
    /// vhost-user-blk export offers VIRTIO_BLK_F_SIZE_MAX but leaves size_max at 0 in the config;
    /// a zero limit means "none given", so the bit is hidden rather than passed on as "0 bytes".
    public func readDeviceFeatures() -> VirtioFeatures {
        var f = VirtioFeatures(rawValue: backendFeatures & ~VhostUser.protocolFeaturesBit)
        if deviceID == 2, f.contains(.blkSizeMax), configSpace.le(8, 4) == 0 { f.remove(.blkSizeMax) }
        return f
    }

    public func writeDriverFeatures(_ features: VirtioFeatures) throws {
        control.lock()
        defer { control.unlock() }
        driverFeatures = features
    }

    public var queueCount: Int { queues }

    public func maxQueueSize(_ index: Int) -> Int { index >= 0 && index < queues ? maxQueue : 0 }

    public func setupQueue(_ index: Int, size: Int, descriptors: UInt64, driverArea: UInt64, deviceArea: UInt64) throws
        -> QueueDoorbells
    {
        control.lock()
        defer { control.unlock() }
        guard index >= 0, index < queues else { throw VhostUserError.queueUnavailable(index: index, count: queues) }
        guard size >= 1, size <= maxQueue else {
            throw VhostUserError.queueTooLarge(index: index, requested: size, max: maxQueue)
        }
        guard live[index] == nil else { throw VhostUserError.queueAlreadyLive(index: index) }
        guard let mem = memory else { throw VhostUserError.memoryNotAttached(queue: index) }
        try checkUsable(.setVringNum)
        // vhost-user wants the front end's own (user) addresses for the rings.
        func user(_ addr: UInt64, _ length: Int, _ what: String) throws -> UInt64 {
            guard let off = mem.offset(ofDeviceAddress: addr, length: length) else {
                throw VhostUserError.addressOutsideMemory(what: what, address: addr, length: length)
            }
            return mem.hostAddress + UInt64(off)
        }
        let desc = try user(descriptors, 16 * size, "descriptor table")
        let avail = try user(driverArea, 6 + 2 * size, "available ring")
        let used = try user(deviceArea, 6 + 8 * size, "used ring")
        let kick: EventFD
        let call: EventFD
        do {
            kick = try EventFD()
            // A queue keeps its call eventfd across resets: a driver whose event loop watches it
            // (VirtioBlkDriver's caller-reaped queues) must not lose its interrupts to a new one.
            if let old = callFDs[index] {
                old.drain()
                call = old
            } else {
                call = try EventFD()
                callFDs[index] = call
            }
        } catch {
            throw VhostUserError.resourceFailed("cannot create eventfds for queue \(index): \(error)")
        }
        let q = UInt32(index)
        var w = WireWriter()
        w.u32(q)
        w.u32(UInt32(size))
        try command(.setVringNum, w.bytes, fds: [])
        w = WireWriter()
        w.u32(q)
        w.u32(0)
        try command(.setVringBase, w.bytes, fds: [])
        w = WireWriter()
        w.u32(q)
        w.u32(0) // index, flags (no logging)
        w.u64(desc)
        w.u64(used)
        w.u64(avail)
        w.u64(0)
        try command(.setVringAddr, w.bytes, fds: [])
        w = WireWriter()
        w.u64(UInt64(q))
        try command(.setVringKick, w.bytes, fds: [kick.fd])
        try command(.setVringCall, w.bytes, fds: [call.fd])
        live[index] = LiveQueue(size: size, kick: kick, call: call)
        health.withLock { $0.calls[index] = call }
        if protocolFeatures != 0 || backendFeatures & VhostUser.protocolFeaturesBit != 0 {
            // With VHOST_USER_F_PROTOCOL_FEATURES rings start disabled.
            w = WireWriter()
            w.u32(q)
            w.u32(1)
            try command(.setVringEnable, w.bytes, fds: [])
        }
        logger.debug("vhost-user queue live", metadata: ["queue": "\(index)", "size": "\(size)"])
        return QueueDoorbells(kick: { kick.signal() }, interrupt: call)
    }

    public func readConfig(offset: Int, width: Int) -> UInt64 {
        guard offset >= 0, width >= 0, width <= 8 else { return 0 }
        return configSpace.le(offset, width)
    }

    /// The config space is read once; a backend resize is not followed.
    public func configGeneration() -> UInt32 { 0 }

    // MARK: failure

    private func markFailed(_ reason: String, quiet: Bool = false) {
        let first: Bool = health.withLock { h in
            guard h.failure == nil else { return false }
            h.failure = reason
            return true
        }
        if first && !quiet {
            logger.error("vhost-user backend failed: \(reason)", metadata: ["socket": "\(socketPath)"])
        }
        signalCalls()
    }

    /// Wakes whoever waits on the queues' interrupts.
    private func signalCalls() {
        let calls = health.withLock { Array($0.calls.values) }
        for c in calls { c.signal() }
    }

    private func checkUsable(_ request: VhostUserRequest) throws {
        if closed { throw VhostUserError.backendFailed("the connection is closed (\(request) not sent)") }
        if let f = health.withLock({ $0.failure }) { throw VhostUserError.backendFailed("\(f) (\(request) not sent)") }
    }

    // MARK: messages (callers hold `control`)

    /// Sends a message that has no reply of its own; with REPLY_ACK, waits for and checks the ack.
    private func command(_ request: VhostUserRequest, _ payload: [UInt8], fds: [Int32]) throws {
        let ack = protocolFeatures & VhostUser.protocolReplyAck != 0
        try send(request, payload, fds: fds, needReply: ack)
        guard ack else { return }
        let r = try receive(request)
        guard r.count == 8 else { throw fail(.badReply(request, "ack of \(r.count) bytes, expected 8")) }
        let status = r.le(0, 8)
        guard status == 0 else { throw VhostUserError.rejected(request, status: status) }
    }

    private func requestU64(_ request: VhostUserRequest) throws -> UInt64 {
        try send(request, [], fds: [], needReply: false)
        let r = try receive(request)
        guard r.count == 8 else { throw fail(.badReply(request, "\(r.count) payload bytes, expected 8")) }
        return r.le(0, 8)
    }

    private func send(_ request: VhostUserRequest, _ payload: [UInt8], fds: [Int32], needReply: Bool) throws {
        if closed { throw VhostUserError.backendFailed("the connection is closed (\(request) not sent)") }
        var msg = WireWriter()
        msg.u32(request.rawValue)
        msg.u32(VhostUser.flagVersion | (needReply ? VhostUser.flagNeedReply : 0))
        msg.u32(UInt32(payload.count))
        msg.bytes.append(contentsOf: payload)
        logger.trace(
            "vhost-user send", metadata: ["request": "\(request)", "size": "\(payload.count)", "fds": "\(fds.count)"])
        let rc = msg.bytes.withUnsafeBytes { b in
            fds.withUnsafeBufferPointer { f in
                vshim_send_with_fds(sock, b.baseAddress, b.count, f.baseAddress, Int32(f.count))
            }
        }
        if rc < 0 {
            let e = -rc
            if e == EPIPE || e == ECONNRESET { throw fail(.connectionClosed(request)) }
            throw fail(.sendFailed(request, errno: e))
        }
    }

    /// Reads the reply to `request`; any descriptors that come with it are closed.
    private func receive(_ request: VhostUserRequest) throws -> [UInt8] {
        var header = [UInt8](repeating: 0, count: VhostUser.headerSize)
        try readExactly(&header, request)
        let code = UInt32(header.le(0, 4))
        let flags = UInt32(header.le(4, 4))
        let size = Int(header.le(8, 4))
        guard code == request.rawValue else {
            throw fail(.badReply(request, "reply carries request code \(code)"))
        }
        guard flags & VhostUser.flagReply != 0, flags & 0x3 == VhostUser.flagVersion else {
            throw fail(.badReply(request, "flags 0x\(String(flags, radix: 16)) (want REPLY, version 1)"))
        }
        guard size <= VhostUser.maxReplyPayload else { throw fail(.badReply(request, "payload of \(size) bytes")) }
        var payload = [UInt8](repeating: 0, count: size)
        if size > 0 { try readExactly(&payload, request) }
        return payload
    }

    private func readExactly(_ buf: inout [UInt8], _ request: VhostUserRequest) throws {
        var fds = [Int32](repeating: -1, count: Int(VSHIM_MAX_FDS))
        var nfds: Int32 = 0
        let want = buf.count
        let n = buf.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in
                vshim_recv_with_fds(
                    sock, b.baseAddress, b.count, f.baseAddress, Int32(f.count), &nfds, replyTimeoutMilliseconds)
            }
        }
        for i in 0..<Int(nfds) { Glibc.close(fds[i]) }
        if n < 0 {
            let e = Int32(-n)
            if e == ETIMEDOUT { throw fail(.timedOut(request, seconds: Double(replyTimeoutMilliseconds) / 1000)) }
            if e == ECONNRESET { throw fail(.connectionClosed(request)) }
            throw fail(.receiveFailed(request, errno: e))
        }
        if n < want { throw fail(.connectionClosed(request)) }
    }

    /// A broken stream cannot be resynchronised: mark the transport failed and return the error to throw.
    private func fail(_ e: VhostUserError) -> VhostUserError {
        markFailed(e.description)
        return e
    }
}

/// Watches a socket for the peer hanging up, on its own small thread.
final class HangupWatch: @unchecked Sendable {
    private let stopFD: EventFD
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var stopped = false
    private var thread: Thread?

    /// `onHangup` runs once when the peer goes away; `rewake` a few times after it (20 ms .. 2 s),
    /// so a waiter that consumed the first wake-up together with real completions wakes again.
    init(socket: Int32, onHangup: @escaping @Sendable () -> Void, rewake: @escaping @Sendable () -> Void) throws {
        do { stopFD = try EventFD() } catch {
            throw VhostUserError.resourceFailed("cannot create the watch eventfd: \(error)")
        }
        let stop = stopFD
        let done = self.done
        let t = Thread {
            defer { done.signal() }
            while true {
                let r = vshim_poll_hup(socket, stop.fd, -1)
                if r < 0 { return } // poll itself failed: nothing sensible to watch
                if r & 2 != 0 { return }
                if r & 1 != 0 {
                    onHangup()
                    for ms in [20, 100, 500, 2000] as [Int32] {
                        if vshim_wait_readable(stop.fd, ms) == 1 { return }
                        rewake()
                    }
                    return
                }
            }
        }
        t.name = "vhost-user-watch"
        thread = t
        t.start()
    }

    /// Stops the thread and waits for it (unless called on it).
    func stop() {
        lock.lock()
        let first = !stopped
        stopped = true
        let t = thread
        lock.unlock()
        guard first else { return }
        stopFD.signal()
        if let t, Thread.current !== t { done.wait() }
    }

    deinit { stop() }
}
