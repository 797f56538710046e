import BlockLayer
import Logging
import NBDProtocol
import Virtio
import VirtioBlock

/// One named export: its handshake description, the device behind it and the block layers
/// between them.
public final class NBDExport: Sendable {
    /// What the handshake shows: the transmission facts, fixed for the export's life, and its
    /// presentation, which a reload may change under connected clients (`present`).
    public var info: NBDExportInfo {
        var i = base
        let p = presentation.withLock { $0 }
        i.description = p.description
        i.allowedClients = p.allowedClients
        i.requiresTLS = p.requiresTLS
        return i
    }
    /// NBD_INFO_BLOCK_SIZE's maximum payload (read per request, so not behind the lock).
    public let maximumPayload: UInt32
    private let base: NBDExportInfo
    private let presentation: Locked<Presentation>

    /// What only new handshakes see: changing it touches neither the device nor the clients in transmission.
    public struct Presentation: Sendable, Equatable {
        public var description: String
        public var allowedClients: NBDClientAllowList?
        public var requiresTLS: Bool
        public init(description: String, allowedClients: NBDClientAllowList?, requiresTLS: Bool) {
            self.description = description
            self.allowedClients = allowedClients
            self.requiresTLS = requiresTLS
        }
    }

    /// Changes the description and who may negotiate the export from now on (configuration reload).
    public func present(_ p: Presentation) { presentation.withLock { $0 = p } }

    public let device: BlockDevice
    /// What requests run on: the top of the export's block layers, or the device itself.
    public let stack: BlockLayer
    /// The dirty bitmaps a `DirtyTracking` layer keeps, offered as `qemu:dirty-bitmap:NAME`.
    public let bitmaps: DirtyBitmaps?
    /// This export's series (label `export="NAME"`).
    public let metrics: ExportMetrics

    /// Derives the transmission flags from what the virtio device offers ("Transmission flags").
    /// `allowedClients`: only these TLS clients may use the export (nil: every client).
    public init(
        name: String, description: String, device: BlockDevice, forceReadOnly: Bool = false,
        maximumPayload: UInt32 = NBDExportInfo.defaultMaximumPayload, allowedClients: NBDClientAllowList? = nil,
        requiresTLS: Bool = false, stack: BlockLayer? = nil, bitmaps: DirtyBitmaps? = nil
    ) {
        let stack = stack ?? device
        let c = stack.capabilities
        // Every connection shares one stack whose completions are write-through to it, and a FLUSH
        // on any connection flushes the device: multi-conn is safe ("NBD_FLAG_CAN_MULTI_CONN").
        var flags: NBDTransmissionFlags = [
            .hasFlags, .sendWriteZeroes, .sendFastZero, .canMultiConn, .sendCache, .sendDF,
        ]
        if c.readOnly || forceReadOnly { flags.insert(.readOnly) }
        if c.canFlush { flags.formUnion([.sendFlush, .sendFUA]) }
        if c.canTrim { flags.insert(.sendTrim) }
        if flags.contains(.readOnly) { flags.subtract([.sendWriteZeroes, .sendTrim, .sendFastZero]) }
        var info = NBDExportInfo(
            name: name, description: description, size: stack.size, flags: flags,
            minimumBlockSize: 1, preferredBlockSize: 4096, maximumPayload: maximumPayload,
            allowedClients: allowedClients)
        info.requiresTLS = requiresTLS
        self.base = info
        self.maximumPayload = maximumPayload
        presentation = Locked(
            Presentation(description: description, allowedClients: allowedClients, requiresTLS: requiresTLS))
        self.device = device
        self.stack = stack
        self.bitmaps = bitmaps
        metrics = ExportMetrics(export: name)
    }

    public var readOnly: Bool { info.flags.contains(.readOnly) }
}

extension BlkError {
    /// The NBD error a failed block operation is reported as ("Error values").
    var nbdErrno: NBDErrno {
        switch self {
        case .ioError, .noStatus, .failedAfterReset, .deviceBroken, .unsupported, .layerStorage: return .io
        case .shutdown: return .shutdown
        case .outOfRange: return .inval
        case .readOnly: return .perm
        }
    }
}
