// `--allow`: which TCP peers may connect. Checked in the child channel initializer, before the
// connection handler exists, so a refused client is closed without seeing the greeting.
import AccessControl
import Logging
import NIOCore

extension AccessList {
    /// Whether `peer` may connect; logs one line for a refused peer (warning) and, at debug
    /// level, the rule that admitted an allowed one. Unix-socket peers (and stdio) are not
    /// filtered: file permissions on the socket are their access control.
    func admits(_ peer: SocketAddress?, logger: Logger) -> Bool {
        guard !allowsEveryone else { return true }
        switch peer {
        case .unixDomainSocket?:
            return true
        case .v4?, .v6?:
            guard let text = peer?.ipAddress, let address = IPAddress(text) else {
                logger.warning(
                    "refusing \(peer.map { "\($0)" } ?? "a client"): cannot read its address to check --allow (\(self))"
                )
                return false
            }
            switch decide(address) {
            case .open: return true
            case .allowed(let network):
                logger.debug("accepting \(Self.describe(text, peer?.port)): allowed by --allow \(network)")
                return true
            case .refused:
                logger.warning(
                    "refusing \(Self.describe(text, peer?.port)): not in any --allow network (\(self)); closed before the greeting"
                )
                return false
            }
        case nil:
            logger.warning("refusing a client whose address is unknown: --allow is set (\(self))")
            return false
        }
    }

    /// `10.0.0.1:40000`, `[::1]:40000`
    static func describe(_ address: String, _ port: Int?) -> String {
        let host = address.contains(":") ? "[\(address)]" : address
        return port.map { "\(host):\($0)" } ?? host
    }
}
