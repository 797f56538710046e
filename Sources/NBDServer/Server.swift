import AccessControl
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import Synchronization
// Listeners: TCP and Unix sockets, each connection with its own NBDConnectionHandler.
import Virtio
import VirtioBlock

/// Tracks live connections so shutdown can drain them.
final class ConnectionRegistry: Sendable {
    private let state = Locked<(next: Int, channels: [Int: Channel])>((0, [:]))
    func add(_ c: Channel) -> Int {
        state.withLock { s in
            s.next += 1
            s.channels[s.next] = c
            return s.next
        }
    }
    /// An id for a connection that is refused before it is registered (for its log line).
    func nextID() -> Int {
        state.withLock { s in
            s.next += 1
            return s.next
        }
    }
    func remove(_ id: Int) { _ = state.withLock { $0.channels.removeValue(forKey: id) } }
    var count: Int { state.withLock { $0.channels.count } }
    var all: [Channel] { state.withLock { Array($0.channels.values) } }
    func channels(_ ids: [Int]) -> [Channel] { state.withLock { s in ids.compactMap { s.channels[$0] } } }
}

public enum ListenAddress: Sendable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)
    /// An already bound and listening socket (systemd socket activation).
    case boundSocket(fd: Int32)
    public var description: String {
        switch self {
        case .tcp(let h, let p): return "\(h):\(p)"
        case .unix(let p): return p
        case .boundSocket(let fd): return "inherited socket fd \(fd)"
        }
    }
}

/// A client for a log line: `127.0.0.1:40120`, `[::1]:40120`, or the Unix socket it came in on.
func clientName(_ channel: Channel) -> String {
    switch channel.remoteAddress {
    case .some(.unixDomainSocket):
        return "a client of Unix socket \(channel.localAddress?.pathname ?? "?")"
    case .some(let a):
        guard let ip = a.ipAddress, let port = a.port else { return "\(a)" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    case .none:
        return "a client"
    }
}

/// Per-connection limits.
public struct ServerLimits: Sendable {
    /// Clients beyond this many are closed before the greeting (0 = unlimited).
    public var maxConnections = 1024
    /// TCP connections from one address beyond this many are closed before the greeting (0 = unlimited).
    public var maxConnectionsPerAddress = 0
    /// On shutdown, how long a client may take to read the replies already queued for it.
    public var shutdownTimeout: TimeAmount = .seconds(30)
    /// A client that has not finished negotiating after this long is dropped.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// STARTTLS policy and credentials.
    public var tls: TLSSettings = .off
    /// TCP peers outside every network are closed before the greeting (empty = everyone may connect).
    public var allow = AccessList()
    /// TCP keepalive on accepted TCP connections (nil = off); Unix-socket clients are not affected.
    /// The default is virtnbd's (`VirtNBDConfig.Keepalive`): a vanished client is closed after 120 s.
    public var keepalive: TCPKeepalive? = TCPKeepalive(idle: 60, interval: 10, count: 6)
    /// What all connections together may make the server hold (`--memory-budget`): input not yet
    /// parsed (a WRITE's payload as it arrives, a partial option) and request bytes in flight
    /// (WRITE payloads, READ data). See `ByteBudget`.
    public var memoryBudget = ByteBudget.defaultLimit
    /// A client that sends nothing for this long in the middle of a request (a WRITE's payload)
    /// is disconnected (`--payload-timeout`).
    public var payloadTimeout: TimeAmount = .seconds(30)
    public init() {}
}

/// The exports being served, swapped as a whole on reload. A connection reads the current
/// catalog before each step of its handshake and attaches to its export when transmission starts;
/// attaching and swapping hold the same lock, so once `replace` returns no new client can reach a
/// removed export, and the connections it reports are all the ones that use it.
final class ExportDirectory: Sendable {
    private struct State {
        var exports: [NBDExport]
        /// Connection ids in transmission, by export.
        var users: [ObjectIdentifier: Set<Int>] = [:]
    }
    private let state: Locked<State>

    init(_ exports: [NBDExport]) {
        state = Locked(State(exports: exports))
    }

    var exports: [NBDExport] { state.withLock { $0.exports } }
    /// The exports and their metadata contexts as they are now (bitmaps come and go at run time).
    var catalog: NBDExportCatalog {
        let exports = self.exports
        var contexts: [String: [String]] = [:]
        for e in exports {
            // Bitmaps first (their ids stay as they were), then allocation depth for a layered stack.
            let names =
                (e.bitmaps?.contextNames ?? [])
                + (e.stack.allocationDepthOffered ? [NBDMetaContext.allocationDepth] : [])
            if !names.isEmpty { contexts[e.info.name] = names }
        }
        return NBDExportCatalog(exports.map(\.info), otherContexts: contexts)
    }

    /// The export `info` names, if it is still served as negotiated; registers the connection as its user.
    /// (The handshake hides SEND_DF from clients without structured replies; that flag is not compared.)
    func attach(_ info: NBDExportInfo, connection: Int) -> NBDExport? {
        // What transmission relies on; the presentation (description, who may negotiate) may
        // have been changed by a reload meanwhile without changing the export.
        func facts(_ i: NBDExportInfo) -> [String] {
            var flags = i.flags
            flags.subtract([.sendDF, .blockStatusPayload]) // per session, not per export
            return [
                i.name, "\(i.size)", "\(flags.rawValue)", "\(i.minimumBlockSize)", "\(i.preferredBlockSize)",
                "\(i.maximumPayload)",
            ]
        }
        let negotiated = facts(info)
        let e: NBDExport? = state.withLock { s in
            guard let e = s.exports.first(where: { facts($0.info) == negotiated }) else { return nil }
            s.users[ObjectIdentifier(e), default: []].insert(connection)
            return e
        }
        e?.metrics.connected()
        return e
    }

    /// Connections in transmission on `export`.
    func userCount(_ export: NBDExport) -> Int { state.withLock { $0.users[ObjectIdentifier(export)]?.count ?? 0 } }

    func detach(_ export: NBDExport, connection: Int) {
        let removed = state.withLock { s in s.users[ObjectIdentifier(export)]?.remove(connection) != nil }
        if removed { export.metrics.disconnected() }
    }

    /// Serves `exports` from now on; returns those no longer served and the connections using them.
    func replace(with exports: [NBDExport]) -> (removed: [NBDExport], connections: [Int]) {
        state.withLock { s in
            let keep = Set(exports.map(ObjectIdentifier.init))
            let removed = s.exports.filter { !keep.contains(ObjectIdentifier($0)) }
            let conns = removed.flatMap { s.users[ObjectIdentifier($0)] ?? [] }
            s.exports = exports
            return (removed, conns)
        }
    }
}

public final class NBDServer: Sendable {
    private let directory: ExportDirectory
    private let group: EventLoopGroup
    private let logger: Logger
    private let registry = ConnectionRegistry()
    private let listeners = Locked<[Channel]>([])
    /// Clients refused at --max-connections: counted, and logged once per burst.
    private let refusals = RefusalLog()
    private let addressRefusals = RefusalLog(
        reason: "per-address", what: "connection(s) from one address (--max-connections-per-address)")
    /// Open TCP connections by client address (kept only with --max-connections-per-address).
    private let perAddress = Locked<[String: Int]>([:])
    /// The Unix socket files `listen` created, removed by `shutdown` (only if they are still ours).
    private let sockets = Locked<[UnixSocketClaim]>([])

    private let limits: ServerLimits
    private let reapers: QueueReapers
    private let budget: ByteBudget

    public init(exports: [NBDExport], group: EventLoopGroup, limits: ServerLimits = .init(), logger: Logger) {
        self.directory = ExportDirectory(exports)
        self.group = group
        self.limits = limits
        self.logger = logger
        // One virtqueue lane per event loop: a loop's requests never contend with another loop's,
        // and (for drivers the caller reaps) the loop that submits to a queue also completes it.
        for (i, loop) in group.makeIterator().enumerated() { loop.execute { VirtioBlkDriver.useLane(i) } }
        reapers = QueueReapers(group: group, logger: logger)
        budget = ByteBudget(limit: limits.memoryBudget)
        for e in exports { reapers.attach(e.device.driver) }
    }

    /// Stops completing `export`'s device requests on the event loops: call it after the device
    /// is shut down (a removed export's device; the loops must reap until its last request).
    public func release(_ export: NBDExport) { reapers.detach(export.device.driver) }

    /// The server-wide memory budget's limit, in bytes (`ServerLimits.memoryBudget`).
    public var memoryBudget: Int { budget.limit }

    /// Clients in transmission on `export` now.
    public func clientCount(of export: NBDExport) -> Int { directory.userCount(export) }

    /// The exports served now (the handshake's list, in order).
    public var exports: [NBDExport] { directory.exports }

    /// Serves `exports` from now on (configuration reload). Exports kept are the same objects as
    /// before; their clients are not disturbed. New connections see the new list at once. Clients
    /// of an export that is no longer in the list finish their in-flight requests and are
    /// disconnected; this returns the removed exports once all of those connections have closed,
    /// so that their devices can be shut down.
    public func replaceExports(_ exports: [NBDExport]) async -> [NBDExport] {
        for e in exports { reapers.attach(e.device.driver) }
        let (removed, ids) = directory.replace(with: exports)
        let channels = registry.channels(ids)
        for c in channels { c.pipeline.fireUserInboundEventTriggered(QuiesceEvent()) }
        for c in channels { try? await c.closeFuture.get() }
        if !removed.isEmpty {
            logger.info(
                "no longer served: \(removed.map { "\"\($0.info.name)\"" }.joined(separator: ", ")); \(channels.count) client(s) finished"
            )
        }
        return removed
    }

    private func makeHandler(id: Int) -> NBDConnectionHandler {
        NBDConnectionHandler(
            directory: directory, id: id, handshakeTimeout: limits.handshakeTimeout, tls: limits.tls, logger: logger,
            budget: budget, drainTimeout: limits.shutdownTimeout, payloadTimeout: limits.payloadTimeout)
    }

    /// Serves exactly one client on stdin/stdout (`-s`); returns when it disconnects.
    public func serveStdio() async throws {
        let channel = try await NIOPipeBootstrap(group: group)
            .channelInitializer { channel in
                let id = self.registry.add(channel)
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(self.makeHandler(id: id))
                }
            }
            .takingOwnershipOfDescriptors(input: 0, output: 1).get()
        try await channel.closeFuture.get()
    }

    /// Binds a listener; returns the bound address (useful with port 0).
    @discardableResult
    public func listen(_ address: ListenAddress) async throws -> SocketAddress? {
        let registry = self.registry
        let logger = self.logger
        let maxConnections = limits.maxConnections
        let refusals = self.refusals
        let addressRefusals = self.addressRefusals
        let perAddressLimit = limits.maxConnectionsPerAddress
        let perAddress = self.perAddress
        let allow = limits.allow
        let keepalive = limits.keepalive
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // At the TCP level (NIO skips it on Unix sockets): `.socketOption(.tcp_nodelay)` was
            // SOL_SOCKET option 1, SO_DEBUG, which needs CAP_NET_ADMIN, so without root every
            // accepted connection failed its options and was closed at once.
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            // Unsent replies beyond 4 MiB make the channel unwritable, which pauses reading.
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 1 << 20, high: 4 << 20))
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 4096, maximum: 4 << 20)
            )
            .childChannelInitializer { channel in
                guard allow.admits(channel.remoteAddress, logger: logger) else { return channel.close() }
                if maxConnections > 0 && registry.count >= maxConnections {
                    refusals.refused(clientName(channel), limit: maxConnections, logger: logger)
                    return channel.close()
                }
                if perAddressLimit > 0, let ip = channel.remoteAddress?.ipAddress {
                    let admitted = perAddress.withLock { counts in
                        guard counts[ip, default: 0] < perAddressLimit else { return false }
                        counts[ip, default: 0] += 1
                        return true
                    }
                    guard admitted else {
                        addressRefusals.refused(clientName(channel), limit: perAddressLimit, logger: logger)
                        return channel.close()
                    }
                    channel.closeFuture.whenComplete { _ in
                        perAddress.withLock { counts in
                            counts[ip, default: 1] -= 1
                            if counts[ip] == 0 { counts[ip] = nil }
                        }
                    }
                }
                let id = registry.add(channel)
                channel.closeFuture.whenComplete { _ in registry.remove(id) }
                keepalive?.apply(to: channel, logger: logger, metadata: ["conn": "\(id)"])
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(self.makeHandler(id: id))
                }
            }
        let channel: Channel
        switch address {
        case .tcp(let host, let port): channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            try await UnixSocketPath.prepare(path, group: group)
            channel = try await bootstrap.bind(unixDomainSocketPath: path).get()
            if let claim = UnixSocketClaim(boundAt: path) { sockets.withLock { $0.append(claim) } }
        case .boundSocket(let fd): channel = try await bootstrap.withBoundSocket(fd).get()
        }
        listeners.withLock { $0.append(channel) }
        return channel.localAddress
    }

    /// Stops accepting (removing the Unix socket files it bound), lets every connection finish its in-flight requests, and waits for them to close.
    public func shutdown() async {
        let ls = listeners.withLock { l in
            defer { l.removeAll() }
            return l
        }
        for l in ls { try? await l.close() }
        let ours = sockets.withLock { s in
            defer { s.removeAll() }
            return s
        }
        for s in ours { s.release() }
        let conns = registry.all
        for c in conns { c.pipeline.fireUserInboundEventTriggered(QuiesceEvent()) }
        for c in conns { try? await c.closeFuture.get() }
    }
}
