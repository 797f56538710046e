// Listeners: TCP and Unix sockets, each connection with its own NBDConnectionHandler.
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
    var all: [Channel] { state.withLock { Array($0.channels.values) } }
}

public enum ListenAddress: Sendable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)
    public var description: String {
        switch self {
        case .tcp(let h, let p): return "\(h):\(p)"
        case .unix(let p): return p
        }
    }
}

public final class NBDServer: Sendable {
    public let exports: [NBDExport]
    private let group: EventLoopGroup
    private let logger: Logger
    private let registry = ConnectionRegistry()
    private let listeners = Mutex<[Channel]>([])

    public init(exports: [NBDExport], group: EventLoopGroup, logger: Logger) {
        self.exports = exports
        self.group = group
        self.logger = logger
    }

    /// Binds a listener; returns the bound address (useful with port 0).
    @discardableResult
    public func listen(_ address: ListenAddress) async throws -> SocketAddress? {
        let catalog = NBDExportCatalog(exports.map(\.info))
        let byName = Dictionary(exports.map { ($0.info.name, $0) }, uniquingKeysWith: { a, _ in a })
        let registry = self.registry
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 256 << 10, maximum: 4 << 20))
            .childChannelInitializer { channel in
                let id = registry.add(channel)
                channel.closeFuture.whenComplete { _ in registry.remove(id) }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NBDConnectionHandler(catalog: catalog, exports: byName, registry: registry, id: id, logger: logger))
                }
            }
        let channel: Channel
        switch address {
        case .tcp(let host, let port): channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path): channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
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
