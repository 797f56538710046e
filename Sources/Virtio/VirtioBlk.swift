// virtio-blk's definitions (VIRTIO 1.2 §5.2), in one place for the driver (VirtioBlock) and the
// device (VirtioEmulator): request types and statuses, the request's memory layout, and the
// offsets of the device configuration space.

/// virtio-blk request types (§5.2.6, `VIRTIO_BLK_T_*`).
public enum BlkRequestType {
    public static let `in`: UInt32 = 0, out: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8
    public static let discard: UInt32 = 11, writeZeroes: UInt32 = 13
}

/// The status byte a device writes last (§5.2.6, `VIRTIO_BLK_S_*`).
public enum BlkStatus {
    public static let ok: UInt8 = 0, ioErr: UInt8 = 1, unsupp: UInt8 = 2
}

/// The sizes of a request's parts (§5.2.6): the driver-readable header (`le32 type; le32
/// reserved; le64 sector`), one discard / write-zeroes segment (`le64 sector; le32 num_sectors;
/// le32 flags`), the GET_ID answer and the device-writable status byte.
public enum BlkRequestLayout {
    public static let headerBytes = 16
    public static let segmentBytes = 16
    public static let deviceIDBytes = 20
    public static let statusBytes = 1
    /// The `flags` bit of a write-zeroes segment that lets the device deallocate (§5.2.6.2).
    public static let unmapFlag: UInt32 = 1
}

/// Byte offsets in `struct virtio_blk_config` (§5.2.4), little-endian.
public enum BlkConfig {
    /// le64, in 512-byte sectors.
    public static let capacity = 0
    /// le32 (VIRTIO_BLK_F_SIZE_MAX).
    public static let sizeMax = 8
    /// le32 (VIRTIO_BLK_F_SEG_MAX).
    public static let segMax = 12
    /// le32 (VIRTIO_BLK_F_BLK_SIZE).
    public static let blockSize = 20
    /// le16 (VIRTIO_BLK_F_MQ).
    public static let numQueues = 34
    /// le32 ×3 (VIRTIO_BLK_F_DISCARD): max_discard_sectors, max_discard_seg, discard_sector_alignment.
    public static let maxDiscardSectors = 36
    public static let maxDiscardSegments = 40
    public static let discardSectorAlignment = 44
    /// le32 ×2 + u8 (VIRTIO_BLK_F_WRITE_ZEROES): max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap.
    public static let maxWriteZeroesSectors = 48
    public static let maxWriteZeroesSegments = 52
    public static let writeZeroesMayUnmap = 56
    /// The bytes the emulator's configuration space has (through write_zeroes_may_unmap and padding).
    public static let size = 60
}

/// The driver's per-request slot in the arena: one 64-byte record per descriptor id that holds
/// the header, the discard / write-zeroes segment and the status byte of that id's chain.
public struct BlkRequestSlot: Sendable {
    public static let stride = 64
    public static let header = 0
    public static let segment = header + BlkRequestLayout.headerBytes
    public static let status = segment + BlkRequestLayout.segmentBytes
    /// The slot of descriptor id `id` in a region at arena offset `base` / device address `device`.
    public let offset: Int
    public let deviceAddress: UInt64
    @inline(__always) public init(id: Int, base: Int, device: UInt64) {
        offset = base + Self.stride * id
        deviceAddress = device + UInt64(Self.stride * id)
    }
}
