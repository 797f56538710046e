// TLS for NBD ("TLS support" in the NBD spec): STARTTLS upgrades a connection in the middle of
// negotiation. X.509 certificates use the directory layout nbdkit and qemu use; PSK keys use
// psktool's "identity:hexkey" file format.
import Foundation
import NBDProtocol
import NIOSSL

public enum TLSSetupError: Error, CustomStringConvertible {
    case missingCredentials
    case bothCredentials
    case unreadable(path: String, what: String, underlying: String)
    case badPSKLine(path: String, line: Int)
    case emptyPSKFile(path: String)

    public var description: String {
        switch self {
        case .missingCredentials: return "--tls on|require needs --tls-certificates DIR or --tls-psk FILE"
        case .bothCredentials: return "give either --tls-certificates or --tls-psk, not both"
        case .unreadable(let p, let w, let u): return "cannot load \(w) from \(p): \(u); the directory must hold server-cert.pem and server-key.pem (and ca-cert.pem), as for nbdkit/qemu"
        case .badPSKLine(let p, let l): return "\(p):\(l): expected \"identity:hexkey\" (the format psktool writes)"
        case .emptyPSKFile(let p): return "\(p) holds no keys; create one with: psktool -u alice -p \(p)"
        }
    }
}

/// The server's TLS policy and, unless it is off, the context that wraps upgraded connections.
public struct TLSSettings: Sendable {
    public var policy: NBDTLSPolicy
    public var context: NIOSSLContext?

    public static let off = TLSSettings(policy: .off, context: nil)

    public init(policy: NBDTLSPolicy, context: NIOSSLContext?) {
        self.policy = policy; self.context = context
    }

    /// Builds the settings from the CLI/config options.
    public static func load(policy: NBDTLSPolicy, certificates: String?, pskFile: String?) throws -> TLSSettings {
        guard policy != .off else { return .off }
        switch (certificates, pskFile) {
        case (nil, nil): throw TLSSetupError.missingCredentials
        case (.some, .some): throw TLSSetupError.bothCredentials
        case (let dir?, nil):
            let certPath = dir + "/server-cert.pem", keyPath = dir + "/server-key.pem"
            let chain: [NIOSSLCertificate]
            let key: NIOSSLPrivateKey
            do { chain = try NIOSSLCertificate.fromPEMFile(certPath) } catch {
                throw TLSSetupError.unreadable(path: certPath, what: "the server certificate", underlying: "\(error)")
            }
            do { key = try NIOSSLPrivateKey(file: keyPath, format: .pem) } catch {
                throw TLSSetupError.unreadable(path: keyPath, what: "the server private key", underlying: "\(error)")
            }
            let cfg = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            return TLSSettings(policy: policy, context: try NIOSSLContext(configuration: cfg))
        case (nil, let path?):
            let keys = try loadPSK(path)
            var cfg = TLSConfiguration.makePreSharedKeyConfiguration()
            // BoringSSL offers external PSKs only with TLS 1.2 PSK cipher suites.
            cfg.minimumTLSVersion = .tlsv12
            cfg.maximumTLSVersion = .tlsv12
            cfg.cipherSuites = "ECDHE-PSK-AES128-GCM-SHA256:ECDHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA:ECDHE-PSK-AES256-CBC-SHA:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA"
            cfg.pskServerProvider = { ctx in
                guard let k = keys[ctx.clientIdentity] else { throw NIOSSLError.unableToAllocateBoringSSLObject }
                var bytes = NIOSSLSecureBytes()
                bytes.append(k)
                return PSKServerIdentityResponse(key: bytes)
            }
            return TLSSettings(policy: policy, context: try NIOSSLContext(configuration: cfg))
        }
    }

    /// psktool format: one "identity:hexkey" per line.
    static func loadPSK(_ path: String) throws -> [String: [UInt8]] {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw TLSSetupError.unreadable(path: path, what: "PSK keys", underlying: "\(error)")
        }
        var keys: [String: [UInt8]] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let colon = line.lastIndex(of: ":") else { throw TLSSetupError.badPSKLine(path: path, line: i + 1) }
            let id = String(line[..<colon]), hex = Array(line[line.index(after: colon)...].utf8)
            guard !id.isEmpty, hex.count >= 2, hex.count % 2 == 0 else { throw TLSSetupError.badPSKLine(path: path, line: i + 1) }
            var key: [UInt8] = []
            for j in stride(from: 0, to: hex.count, by: 2) {
                guard let b = UInt8(String(decoding: hex[j..<j + 2], as: UTF8.self), radix: 16) else { throw TLSSetupError.badPSKLine(path: path, line: i + 1) }
                key.append(b)
            }
            keys[id] = key
        }
        guard !keys.isEmpty else { throw TLSSetupError.emptyPSKFile(path: path) }
        return keys
    }
}
