import Logging
import NBDProtocol
import VirtioBlock

/// One named export: its handshake description and the device behind it.
public final class NBDExport: Sendable {
    public let info: NBDExportInfo
    public let device: BlockDevice
    /// This export's series (label `export="NAME"`).
    public let metrics: ExportMetrics

    /// Derives the transmission flags from what the virtio device offers ("Transmission flags").
    /// `allowedClients`: only these TLS clients may use the export (nil: every client).
    public init(
        name: String, description: String, device: BlockDevice, forceReadOnly: Bool = false,
        maximumPayload: UInt32 = NBDExportInfo.defaultMaximumPayload, allowedClients: NBDClientAllowList? = nil,
        requiresTLS: Bool = false
    ) {
        let g = device.geometry
        // Every connection shares one device whose completions are write-through to it, and a FLUSH
        // on any connection flushes the device: multi-conn is safe ("NBD_FLAG_CAN_MULTI_CONN").
        var flags: NBDTransmissionFlags = [
            .hasFlags, .sendWriteZeroes, .sendFastZero, .canMultiConn, .sendCache, .sendDF,
        ]
        if g.readOnly || forceReadOnly { flags.insert(.readOnly) }
        if g.canFlush { flags.formUnion([.sendFlush, .sendFUA]) }
        if g.canDiscard { flags.insert(.sendTrim) }
        if flags.contains(.readOnly) { flags.subtract([.sendWriteZeroes, .sendTrim, .sendFastZero]) }
        var info = NBDExportInfo(
            name: name, description: description, size: device.size, flags: flags,
            minimumBlockSize: 1, preferredBlockSize: 4096, maximumPayload: maximumPayload,
            allowedClients: allowedClients)
        info.requiresTLS = requiresTLS
        self.info = info
        self.device = device
        metrics = ExportMetrics(export: name)
    }

    public var readOnly: Bool { info.flags.contains(.readOnly) }
}

extension BlkError {
    /// The NBD error a failed block operation is reported as ("Error values").
    var nbdErrno: NBDErrno {
        switch self {
        case .ioError, .deviceBroken, .unsupported: return .io
        case .shutdown: return .shutdown
        case .invalid: return .inval
        case .readOnly: return .perm
        }
    }
}
