// TLS for NBD ("TLS support" in the NBD spec): STARTTLS upgrades a connection in the middle of
// negotiation. X.509 certificates use the directory layout nbdkit and qemu use; PSK keys use
// psktool's "identity:hexkey" file format. With --tls-verify-peer (nbdkit's flag) a client must
// present a certificate signed by ca-cert.pem; its subject DN is the client's identity for
// per-export authorisation (`allow-dn:`), as the PSK identity is with PSK (`allow-psk:`).
import AccessControl
import Foundation
import NBDProtocol
import NIOCore
import NIOSSL
import Virtio

public enum TLSSetupError: Error, CustomStringConvertible {
    case missingCredentials
    case bothCredentials
    case unreadable(path: String, what: String, underlying: String)
    case badPSKLine(path: String, line: Int)
    case emptyPSKFile(path: String)
    /// --tls-verify-peer checks X.509 client certificates; a PSK client proves itself by its key.
    case verifyPeerWithPSK
    /// --tls-verify-peer without --tls-certificates (or with --tls off).
    case verifyPeerWithoutCertificates
    /// --tls-verify-peer needs DIR/ca-cert.pem, the CA that signs client certificates.
    case missingCA(path: String)
    /// The PSK file cannot be read (missing, no permission).
    case pskUnreadable(path: String, reason: String)
    /// server-key.pem is not the key of server-cert.pem.
    case keyMismatch(certificate: String, key: String)

    public var description: String {
        switch self {
        case .missingCredentials: return "--tls on|require needs --tls-certificates DIR or --tls-psk FILE"
        case .bothCredentials: return "give either --tls-certificates or --tls-psk, not both"
        case .unreadable(let p, let w, let u):
            return
                "cannot load \(w) from \(p): \(u); the directory must hold server-cert.pem and server-key.pem (and ca-cert.pem), as for nbdkit/qemu"
        case .badPSKLine(let p, let l): return "\(p):\(l): expected \"identity:hexkey\" (the format psktool writes)"
        case .emptyPSKFile(let p): return "\(p) holds no keys; create one with: psktool -u alice -p \(p)"
        case .verifyPeerWithPSK:
            return
                "--tls-verify-peer verifies X.509 client certificates, but --tls-psk is set (a PSK client already proves itself by its key); drop --tls-verify-peer, or use --tls-certificates"
        case .verifyPeerWithoutCertificates:
            return
                "--tls-verify-peer needs --tls on|require with --tls-certificates DIR (ca-cert.pem there signs the client certificates)"
        case .missingCA(let p):
            return
                "--tls-verify-peer needs \(p), the CA certificate that client certificates must be signed by; copy the CA's certificate there (certtool/openssl PEM)"
        case .pskUnreadable(let p, let reason):
            return
                "cannot read the PSK key file \(p): \(reason); check --tls-psk, or create it with: psktool -u alice -p \(p)"
        case .keyMismatch(let c, let k):
            return
                "\(k) is not the private key of \(c) (the key does not match the certificate's public key); put the matching pair in the directory"
        }
    }
}

/// The server's TLS policy and, unless it is off, how upgraded connections are wrapped.
public struct TLSSettings: Sendable {
    public var policy: NBDTLSPolicy
    /// X.509: the context every connection shares.
    public var context: NIOSSLContext?
    /// PSK: the keys by identity. Each connection gets a context of its own, whose key callback
    /// records the identity the client used (NIOSSL's callback does not say which connection asks).
    var pskKeys: [String: [UInt8]]?
    /// Client certificates are required and verified against ca-cert.pem (`--tls-verify-peer`).
    public private(set) var verifyPeer = false

    public static let off = TLSSettings(policy: .off, context: nil)

    public init(policy: NBDTLSPolicy, context: NIOSSLContext?) {
        self.policy = policy
        self.context = context
    }

    /// Builds the settings from the CLI/config options.
    public static func load(policy: NBDTLSPolicy, certificates: String?, pskFile: String?, verifyPeer: Bool = false)
        throws -> TLSSettings
    {
        if verifyPeer && pskFile != nil { throw TLSSetupError.verifyPeerWithPSK }
        if verifyPeer && (certificates == nil || policy == .off) { throw TLSSetupError.verifyPeerWithoutCertificates }
        guard policy != .off else { return .off }
        switch (certificates, pskFile) {
        case (nil, nil): throw TLSSetupError.missingCredentials
        case (.some, .some): throw TLSSetupError.bothCredentials
        case (let dir?, nil):
            let certPath = dir + "/server-cert.pem"
            let keyPath = dir + "/server-key.pem"
            let chain: [NIOSSLCertificate]
            let key: NIOSSLPrivateKey
            do { chain = try NIOSSLCertificate.fromPEMFile(certPath) } catch {
                throw TLSSetupError.unreadable(
                    path: certPath, what: "the server certificate", underlying: fileProblem(certPath, error))
            }
            do { key = try NIOSSLPrivateKey(file: keyPath, format: .pem) } catch {
                throw TLSSetupError.unreadable(
                    path: keyPath, what: "the server private key", underlying: fileProblem(keyPath, error))
            }
            var cfg = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            if verifyPeer {
                // Only ca-cert.pem is trusted (never the system's roots); a client without a
                // certificate, or with one it did not sign, fails the TLS handshake.
                let caPath = dir + "/ca-cert.pem"
                guard FileManager.default.fileExists(atPath: caPath) else {
                    throw TLSSetupError.missingCA(path: caPath)
                }
                let ca: [NIOSSLCertificate]
                do { ca = try NIOSSLCertificate.fromPEMFile(caPath) } catch {
                    throw TLSSetupError.unreadable(
                        path: caPath, what: "the CA certificate", underlying: fileProblem(caPath, error))
                }
                guard !ca.isEmpty else {
                    throw TLSSetupError.unreadable(
                        path: caPath, what: "the CA certificate", underlying: "no PEM certificate in the file")
                }
                cfg.certificateVerification = .noHostnameVerification
                cfg.trustRoots = .certificates(ca)
                cfg.sendCANameList = true
            }
            let context: NIOSSLContext
            do { context = try NIOSSLContext(configuration: cfg) } catch NIOSSLError.failedToLoadPrivateKey {
                // Both files loaded on their own: BoringSSL refuses a key that is not the certificate's.
                throw TLSSetupError.keyMismatch(certificate: certPath, key: keyPath)
            }
            var s = TLSSettings(policy: policy, context: context)
            s.verifyPeer = verifyPeer
            return s
        case (nil, let path?):
            let keys = try loadPSK(path)
            // One context now, so that a configuration NIOSSL refuses stops virtnbd at start.
            _ = try NIOSSLContext(configuration: pskConfiguration(keys, recorder: PSKIdentityRecorder()))
            var s = TLSSettings(policy: policy, context: nil)
            s.pskKeys = keys
            return s
        }
    }

    /// The TLS handler for one connection's STARTTLS, and how to read who the client proved to be
    /// once the handshake has completed (`TLSUserEvent.handshakeCompleted`).
    func makeServerHandler() throws -> (handler: NIOSSLServerHandler, identity: () -> NBDPeerIdentity) {
        if let keys = pskKeys {
            let recorder = PSKIdentityRecorder()
            let handler = NIOSSLServerHandler(
                context: try NIOSSLContext(configuration: Self.pskConfiguration(keys, recorder: recorder)))
            return (handler, { NBDPeerIdentity(pskIdentity: recorder.identity) })
        }
        guard let context else { throw TLSSetupError.missingCredentials }
        let handler = NIOSSLServerHandler(context: context)
        let verified = verifyPeer
        return (
            handler,
            {
                // A DN only from a certificate verified against ca-cert.pem: anyone can make a self-signed one.
                guard verified, let cert = handler.peerCertificate, let der = try? cert.toDERBytes(),
                    let dn = try? DistinguishedName(certificateDER: der)
                else { return NBDPeerIdentity() }
                return NBDPeerIdentity(certificateDN: dn.description)
            }
        )
    }

    static func pskConfiguration(_ keys: [String: [UInt8]], recorder: PSKIdentityRecorder) -> TLSConfiguration {
        var cfg = TLSConfiguration.makePreSharedKeyConfiguration()
        // BoringSSL offers external PSKs only with TLS 1.2 PSK cipher suites.
        cfg.minimumTLSVersion = .tlsv12
        cfg.maximumTLSVersion = .tlsv12
        cfg.cipherSuites =
            "ECDHE-PSK-AES128-GCM-SHA256:ECDHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA:ECDHE-PSK-AES256-CBC-SHA:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA"
        cfg.pskServerProvider = { ctx in
            guard let k = keys[ctx.clientIdentity] else { throw NIOSSLError.unableToAllocateBoringSSLObject }
            // The identity whose key the handshake uses; a wrong key fails the handshake anyway.
            recorder.record(ctx.clientIdentity)
            var bytes = NIOSSLSecureBytes()
            bytes.append(k)
            return PSKServerIdentityResponse(key: bytes)
        }
        return cfg
    }

    /// psktool format: one "identity:hexkey" per line.
    static func loadPSK(_ path: String) throws -> [String: [UInt8]] {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw TLSSetupError.pskUnreadable(path: path, reason: fileProblem(path, error))
        }
        var keys: [String: [UInt8]] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let colon = line.lastIndex(of: ":") else { throw TLSSetupError.badPSKLine(path: path, line: i + 1) }
            let id = String(line[..<colon])
            let hex = Array(line[line.index(after: colon)...].utf8)
            guard !id.isEmpty, hex.count >= 2, hex.count % 2 == 0 else {
                throw TLSSetupError.badPSKLine(path: path, line: i + 1)
            }
            var key: [UInt8] = []
            for j in stride(from: 0, to: hex.count, by: 2) {
                guard let b = UInt8(String(decoding: hex[j..<j + 2], as: UTF8.self), radix: 16) else {
                    throw TLSSetupError.badPSKLine(path: path, line: i + 1)
                }
                key.append(b)
            }
            keys[id] = key
        }
        guard !keys.isEmpty else { throw TLSSetupError.emptyPSKFile(path: path) }
        return keys
    }
}

/// Why a credential file did not load, in one line: the OS's reason when it cannot be read at all,
/// else the loader's (not PEM, a wrong type of key).
func fileProblem(_ path: String, _ error: Error) -> String {
    if access(path, R_OK) != 0 { return String(cString: strerror(errno)) }
    if let e = error as? NIOSSLError { return "not a PEM file of the right kind (\(e))" }
    return "the file is not valid UTF-8 text or PEM"
}

/// The PSK identity one connection's TLS handshake used (set from NIOSSL's key callback).
final class PSKIdentityRecorder: Sendable {
    private let value = Locked<String?>(nil)
    func record(_ id: String) { value.withLock { $0 = id } }
    var identity: String? { value.withLock { $0 } }
}

/// A failed TLS handshake as one line for the log: BoringSSL's reason in words, without its
/// error queue dump (which carries source paths of the build).
enum TLSFailure {
    static func describe(_ error: Error) -> String {
        let text = "\(error)"
        guard let reason = boringSSLReason(text) else {
            // Not a BoringSSL error (EOF, a reset): NIO's own description is short.
            return text.split(separator: "\n").first.map(String.init) ?? text
        }
        switch reason {
        case "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client presented no certificate (--tls-verify-peer requires one signed by ca-cert.pem)"
        case "CERTIFICATE_VERIFY_FAILED":
            return "the client's certificate is not signed by ca-cert.pem (--tls-verify-peer)"
        case "WRONG_VERSION_NUMBER", "HTTP_REQUEST":
            return "the client did not speak TLS after STARTTLS"
        case "NO_SHARED_CIPHER":
            return "the client offered no cipher this server accepts (with --tls-psk: no PSK cipher suite)"
        default:
            return reason.lowercased().replacingOccurrences(of: "_", with: " ")
        }
    }

    /// The REASON of the first `error:HEX:LIBRARY:FUNCTION:REASON` in BoringSSL's text.
    static func boringSSLReason(_ text: String) -> String? {
        guard let r = text.range(of: "error:") else { return nil }
        let fields = text[r.upperBound...].split(separator: ":", maxSplits: 4, omittingEmptySubsequences: false)
        guard fields.count >= 4 else { return nil }
        let reason = fields[3].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
        return reason.isEmpty ? nil : String(reason)
    }
}
