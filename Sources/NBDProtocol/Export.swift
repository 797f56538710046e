/// What the handshake tells a client about one export.
public struct NBDExportInfo: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    /// "Block size constraints": minimum, preferred, maximum payload.
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumPayload: UInt32
    /// The TLS clients that may use this export; nil = every client (within the TLS policy).
    public var allowedClients: NBDClientAllowList?
    /// Served only inside TLS (a config file export's `tls: require` while the server's policy is
    /// `on`): plaintext clients get NBD_REP_ERR_TLS_REQD for it.
    public var requiresTLS = false

    /// The maximum payload advertised unless configured (`--max-payload`): 64 MiB, as nbdkit.
    /// nbd's own tester client sends 50 MB requests without asking for block sizes.
    public static let defaultMaximumPayload: UInt32 = 64 << 20

    public init(
        name: String, description: String = "", size: UInt64, flags: NBDTransmissionFlags,
        minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096,
        maximumPayload: UInt32 = NBDExportInfo.defaultMaximumPayload, allowedClients: NBDClientAllowList? = nil
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags.union(.hasFlags)
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumPayload = maximumPayload
        self.allowedClients = allowedClients
    }
}

/// Who the client proved to be in the TLS handshake.
public struct NBDPeerIdentity: Sendable, Equatable {
    /// The subject of a client certificate the server verified against its CA, in canonical
    /// RFC 4514 form (`AccessControl.DistinguishedName`), e.g. `CN=alice,O=Example`.
    public var certificateDN: String?
    /// The PSK identity the client's key matched.
    public var pskIdentity: String?

    public init(certificateDN: String? = nil, pskIdentity: String? = nil) {
        self.certificateDN = certificateDN
        self.pskIdentity = pskIdentity
    }
}

/// Per-export authorisation (qemu's tls-authz, nbdkit's `dn:` rules): the certificate DNs and
/// PSK identities allowed. Only a TLS client whose identity is listed may use the export.
public struct NBDClientAllowList: Sendable, Equatable {
    /// Canonical RFC 4514 DNs, compared exactly.
    public var certificateDNs: Set<String>
    public var pskIdentities: Set<String>

    public init(certificateDNs: Set<String> = [], pskIdentities: Set<String> = []) {
        self.certificateDNs = certificateDNs
        self.pskIdentities = pskIdentities
    }

    public func admits(_ peer: NBDPeerIdentity?) -> Bool {
        guard let peer else { return false }
        if let dn = peer.certificateDN, certificateDNs.contains(dn) { return true }
        if let id = peer.pskIdentity, pskIdentities.contains(id) { return true }
        return false
    }
}

/// The exports a handshake can choose from.
public struct NBDExportCatalog: Sendable {
    public var exports: [NBDExportInfo]
    /// Metadata contexts beside base:allocation, by export name (`qemu:dirty-bitmap:NAME`).
    public var otherContexts: [String: [String]]
    public init(_ exports: [NBDExportInfo], otherContexts: [String: [String]] = [:]) {
        self.exports = exports
        self.otherContexts = otherContexts
    }
    public func metaContexts(of export: String) -> [String] { otherContexts[export] ?? [] }
    /// Exact name match; an empty name selects the default (first) export, as nbdkit and qemu-nbd do.
    public func lookup(_ name: String) -> NBDExportInfo? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        return name.isEmpty ? exports.first : nil
    }
}
