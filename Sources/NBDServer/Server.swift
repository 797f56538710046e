// Listeners: TCP and Unix sockets, each connection with its own NBDConnectionHandler.
import AccessControl
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import Synchronization

/// Tracks live connections so shutdown can drain them.
final class ConnectionRegistry: Sendable {
    private let state = Mutex<(next: Int, channels: [Int: Channel])>((0, [:]))
    func add(_ c: Channel) -> Int {
        state.withLock { s in s.next += 1; s.channels[s.next] = c; return s.next }
    }
    func remove(_ id: Int) { _ = state.withLock { $0.channels.removeValue(forKey: id) } }
    var count: Int { state.withLock { $0.channels.count } }
    var all: [Channel] { state.withLock { Array($0.channels.values) } }
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

/// Per-connection limits.
public struct ServerLimits: Sendable {
    /// Clients beyond this many are closed before the greeting (0 = unlimited).
    public var maxConnections = 0
    /// A client that has not finished negotiating after this long is dropped.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// STARTTLS policy and credentials.
    public var tls: TLSSettings = .off
    /// TCP peers outside every network are closed before the greeting (empty = everyone may connect).
    public var allow = AccessList()
    public init() {}
}

public final class NBDServer: Sendable {
    public let exports: [NBDExport]
    private let group: EventLoopGroup
    private let logger: Logger
    private let registry = ConnectionRegistry()
    private let listeners = Mutex<[Channel]>([])

    private let limits: ServerLimits

    public init(exports: [NBDExport], group: EventLoopGroup, limits: ServerLimits = .init(), logger: Logger) {
        self.exports = exports
        self.group = group
        self.limits = limits
        self.logger = logger
    }

    private func makeHandler(id: Int) -> NBDConnectionHandler {
        let catalog = NBDExportCatalog(exports.map(\.info))
        let byName = Dictionary(exports.map { ($0.info.name, $0) }, uniquingKeysWith: { a, _ in a })
        return NBDConnectionHandler(catalog: catalog, exports: byName, id: id,
                                    handshakeTimeout: limits.handshakeTimeout, tls: limits.tls, logger: logger)
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
        let allow = limits.allow
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // Unsent replies beyond 16 MiB make the channel unwritable, which pauses reading.
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 4 << 20, high: 16 << 20))
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 256 << 10, maximum: 4 << 20))
            .childChannelInitializer { channel in
                guard allow.admits(channel.remoteAddress, logger: logger) else { return channel.close() }
                if maxConnections > 0 && registry.count >= maxConnections {
                    logger.warning("refusing \(channel.remoteAddress.map { "\($0)" } ?? "client"): --max-connections \(maxConnections) reached")
                    return channel.close()
                }
                let id = registry.add(channel)
                channel.closeFuture.whenComplete { _ in registry.remove(id) }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(self.makeHandler(id: id))
                }
            }
        let channel: Channel
        switch address {
        case .tcp(let host, let port): channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path): channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        case .boundSocket(let fd): channel = try await bootstrap.withBoundSocket(fd).get()
        }
        listeners.withLock { $0.append(channel) }
        return channel.localAddress
    }

    /// Stops accepting, lets every connection finish its in-flight requests, and waits for them to close.
    public func shutdown() async {
        let ls = listeners.withLock { l in defer { l.removeAll() }; return l }
        for l in ls { try? await l.close() }
        let conns = registry.all
        for c in conns { c.pipeline.fireUserInboundEventTriggered(QuiesceEvent()) }
        for c in conns { try? await c.closeFuture.get() }
    }
}
