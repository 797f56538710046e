/// Feature bits (VIRTIO 1.2 §6 "Reserved Feature Bits", §5.2.3 for blk).
public struct VirtioFeatures: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inline(__always) static func bit(_ n: UInt64) -> VirtioFeatures { VirtioFeatures(rawValue: 1 << n) }

    // Device-independent
    public static let indirectDesc = bit(28)
    public static let eventIdx = bit(29)
    public static let version1 = bit(32)
    public static let accessPlatform = bit(33)
    public static let ringPacked = bit(34)
    public static let inOrder = bit(35)

    // virtio-blk (§5.2.3)
    public static let blkSizeMax = bit(1)
    public static let blkSegMax = bit(2)
    public static let blkGeometry = bit(4)
    public static let blkRO = bit(5)
    public static let blkBlkSize = bit(6)
    public static let blkFlush = bit(9)
    public static let blkTopology = bit(10)
    public static let blkConfigWCE = bit(11)
    public static let blkMQ = bit(12)
    public static let blkDiscard = bit(13)
    public static let blkWriteZeroes = bit(14)

    public var description: String {
        let names: [(VirtioFeatures, String)] = [
            (.blkSizeMax, "SIZE_MAX"), (.blkSegMax, "SEG_MAX"), (.blkGeometry, "GEOMETRY"), (.blkRO, "RO"),
            (.blkBlkSize, "BLK_SIZE"), (.blkFlush, "FLUSH"), (.blkTopology, "TOPOLOGY"), (.blkConfigWCE, "CONFIG_WCE"),
            (.blkMQ, "MQ"), (.blkDiscard, "DISCARD"), (.blkWriteZeroes, "WRITE_ZEROES"),
            (.indirectDesc, "INDIRECT_DESC"), (.eventIdx, "EVENT_IDX"), (.version1, "VERSION_1"),
            (.accessPlatform, "ACCESS_PLATFORM"), (.ringPacked, "RING_PACKED"), (.inOrder, "IN_ORDER"),
        ]
        let known = names.filter { contains($0.0) }.map(\.1)
        let rest = rawValue & ~names.reduce(0) { $0 | $1.0.rawValue }
        return (known + (rest != 0 ? ["0x" + String(rest, radix: 16)] : [])).joined(separator: "|")
    }
}

/// Device status bits (§2.1).
public struct VirtioStatus: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let acknowledge = VirtioStatus(rawValue: 1)
    public static let driver = VirtioStatus(rawValue: 2)
    public static let driverOK = VirtioStatus(rawValue: 4)
    public static let featuresOK = VirtioStatus(rawValue: 8)
    public static let deviceNeedsReset = VirtioStatus(rawValue: 64)
    public static let failed = VirtioStatus(rawValue: 128)
}
