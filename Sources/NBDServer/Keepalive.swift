// TCP keepalive on accepted TCP connections (`--keepalive`, on by default). A client that vanishes
// without a FIN (power loss, a cut link, a NAT entry that expired) would otherwise keep its
// connection and its `--max-connections` slot for ever: a silent socket is never read to its end,
// and nothing tells the server the peer is gone. With keepalive the kernel probes a silent
// connection and closes it when the probes go unanswered; the connection's close then frees all
// of that like any other disconnect.
import Logging
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// The kernel's keepalive timers for one TCP connection.
public struct TCPKeepalive: Sendable, Equatable {
    /// Seconds of silence before the first probe (TCP_KEEPIDLE).
    public var idle: Int
    /// Seconds between unanswered probes (TCP_KEEPINTVL).
    public var interval: Int
    /// Unanswered probes after which the connection is closed (TCP_KEEPCNT).
    public var count: Int

    public init(idle: Int, interval: Int, count: Int) {
        self.idle = idle
        self.interval = interval
        self.count = count
    }

    /// The socket options, in the order they are set.
    ///
    /// Keepalive probes only a connection with nothing unacknowledged. A client that vanishes
    /// while replies are on their way to it is closed by TCP's retransmission limit instead
    /// (net.ipv4.tcp_retries2: about 15 minutes by default). TCP_USER_TIMEOUT would shorten that,
    /// but it also closes a live client that keeps its receive window shut (stopped, or stuck
    /// writing what it read) for that long, which RFC 1122 says a server must not do while the
    /// client answers.
    var options: [(name: String, option: ChannelOptions.Types.SocketOption, value: SocketOptionValue)] {
        [
            ("SO_KEEPALIVE", .socketOption(.so_keepalive), 1),
            ("TCP_KEEPIDLE", .tcpOption(.init(rawValue: TCP_KEEPIDLE)), SocketOptionValue(idle)),
            ("TCP_KEEPINTVL", .tcpOption(.init(rawValue: TCP_KEEPINTVL)), SocketOptionValue(interval)),
            ("TCP_KEEPCNT", .tcpOption(.init(rawValue: TCP_KEEPCNT)), SocketOptionValue(count)),
        ]
    }

    /// Turns keepalive on for an accepted TCP connection (a Unix-socket one is left alone). Runs
    /// on the channel's event loop (the child channel initializer). A socket that refuses an
    /// option is still served, with a warning that says what it lacks.
    func apply(to channel: Channel, logger: Logger, metadata: Logger.Metadata) {
        switch channel.localAddress {
        case .v4?, .v6?: break
        default: return
        }
        guard let sync = channel.syncOptions else { return }
        for o in options {
            do { try sync.setOption(o.option, value: o.value) } catch {
                let consequence =
                    o.name == "SO_KEEPALIVE"
                    ? "it is served without TCP keepalive, so a vanished client holds its connection slot until the kernel gives up on it"
                    : "it is served with the kernel's default for that timer (sysctl net.ipv4.tcp_keepalive_time, _intvl, _probes)"
                logger.warning(
                    "cannot set \(o.name) on the connection of \(clientName(channel)): \(error); \(consequence)",
                    metadata: metadata)
                if o.name == "SO_KEEPALIVE" { return }
            }
        }
    }
}
