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

    /// The maximum payload advertised unless configured (`--max-payload`): 64 MiB, as nbdkit.
    /// nbd's own tester client sends 50 MB requests without asking for block sizes.
    public static let defaultMaximumPayload: UInt32 = 64 << 20

    public init(name: String, description: String = "", size: UInt64, flags: NBDTransmissionFlags,
                minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096,
                maximumPayload: UInt32 = NBDExportInfo.defaultMaximumPayload) {
        self.name = name; self.description = description; self.size = size; self.flags = flags.union(.hasFlags)
        self.minimumBlockSize = minimumBlockSize; self.preferredBlockSize = preferredBlockSize; self.maximumPayload = maximumPayload
    }
}

/// The exports a handshake can choose from.
public struct NBDExportCatalog: Sendable {
    public var exports: [NBDExportInfo]
    public init(_ exports: [NBDExportInfo]) { self.exports = exports }
    /// Exact name match; an empty name selects the default (first) export, as nbdkit and qemu-nbd do.
    public func lookup(_ name: String) -> NBDExportInfo? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        return name.isEmpty ? exports.first : nil
    }
}
