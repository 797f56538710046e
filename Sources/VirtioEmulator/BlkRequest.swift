// The parse half of the device: a walked descriptor chain becomes a typed virtio-blk request, a
// typed refusal or a typed fault (VIRTIO 1.2 §5.2.6), checked against the negotiated features and
// the capacity, before anything touches the backend (as rust-vmm's `Request::parse` stands apart
// from its executor). `VirtioBlkEmulator.execute` is the other half.
import Virtio

/// A request the device will run. Its data buffers stay in the chain: a read fills the
/// device-writable bytes before the status byte, a write takes the readable bytes after the header.
enum BlkRequest: Equatable {
    /// VIRTIO_BLK_T_IN: `bytes` (whole sectors) from `sector`.
    case read(sector: UInt64, bytes: Int)
    /// VIRTIO_BLK_T_OUT: `bytes` (whole sectors) to `sector`.
    case write(sector: UInt64, bytes: Int)
    case flush
    /// VIRTIO_BLK_T_GET_ID: the serial into the first 20 device-writable bytes.
    case getID
    /// VIRTIO_BLK_T_DISCARD with its one segment.
    case discard(sector: UInt64, sectors: UInt64)
    /// VIRTIO_BLK_T_WRITE_ZEROES with its one segment.
    case writeZeroes(sector: UInt64, sectors: UInt64, unmap: Bool)
}

/// Why a chain that carries a request is answered without running it.
enum BlkRefusal: Equatable {
    /// IOERR: data buffers that do not fit the type (direction, whole sectors, GET_ID's 20 bytes).
    case badLayout
    /// IOERR: past the capacity, or sector arithmetic that overflows.
    case outOfRange
    /// IOERR: a write, discard or write-zeroes to a read-only backend.
    case readOnly
    /// IOERR: a discard or write-zeroes segment above max_discard_sectors / max_write_zeroes_sectors.
    case tooManySectors
    /// UNSUPP: FLUSH, DISCARD or WRITE_ZEROES without its feature bit negotiated.
    case notNegotiated(type: UInt32)
    /// UNSUPP: not exactly one discard / write-zeroes segment.
    case badSegments
    /// UNSUPP: unknown segment flag bits, or unmap on a DISCARD (§5.2.6.2).
    case badFlags(UInt32)
    /// UNSUPP: a request type this device does not know.
    case unknownType(UInt32)

    /// The status byte the device writes for it.
    var status: UInt8 {
        switch self {
        case .badLayout, .outOfRange, .readOnly, .tooManySectors: return BlkStatus.ioErr
        case .notNegotiated, .badSegments, .badFlags, .unknownType: return BlkStatus.unsupp
        }
    }
}

/// A chain that cannot be answered as a request at all.
enum BlkChainFault: Equatable {
    /// The queue's walk found it unusable: IOERR in its last writable byte, if it has one.
    case invalid(ChainFault)
    /// No device-writable status byte: completed with length 0, nothing written.
    case noStatusByte
    /// Fewer than 16 driver-readable bytes for the header: IOERR in the status byte.
    case shortHeader(status: Int)
}

/// What the parse half makes of one chain. `status` is the arena offset of the status byte.
enum ParsedChain: Equatable {
    case request(BlkRequest, status: Int)
    case refused(BlkRefusal, status: Int)
    case fault(BlkChainFault)
}

/// Parses chains against what the driver negotiated and what the backend allows. A value: the
/// device thread makes one per chain, with the capacity as it is then.
struct BlkRequestParser {
    var features: VirtioFeatures
    var readOnly: Bool
    /// The bytes a request may reach (the device's current capacity).
    var capacityBytes: UInt64
    var maxDiscardSectors: UInt32
    var maxWriteZeroesSectors: UInt32

    /// `header` is scratch space of at least 16 bytes (the device thread keeps one).
    func parse(_ chain: DescriptorChain, mem: SharedMemory, header: inout [UInt8]) -> ParsedChain {
        if let fault = chain.fault { return .fault(.invalid(fault)) }
        // The status byte is the last device-writable byte (§5.2.6).
        guard let last = chain.writable.last, last.length > 0 else { return .fault(.noStatusByte) }
        let status = last.offset + last.length - 1
        let dataIn = chain.writableBytes - 1
        guard chain.readableBytes >= 16 else { return .fault(.shortHeader(status: status)) }
        let type: UInt32
        let sector: UInt64
        if let first = chain.readable.first, first.length >= 16 {
            // The usual layout, the whole header in one descriptor: two loads, not 16 byte loads.
            type = mem.load32(first.offset)
            sector = mem.load64(first.offset + 8)
        } else {
            gather(chain.readable, skip: 0, count: 16, mem: mem, into: &header)
            type = le32(header, 0)
            sector = le64(header, 8)
        }
        let dataOut = chain.readableBytes - 16
        func refuse(_ why: BlkRefusal) -> ParsedChain { .refused(why, status: status) }
        func run(_ r: BlkRequest) -> ParsedChain { .request(r, status: status) }
        switch type {
        case BlkRequestType.in:
            guard dataOut == 0, dataIn % 512 == 0 else { return refuse(.badLayout) }
            guard inRange(sector, UInt64(dataIn)) else { return refuse(.outOfRange) }
            return run(.read(sector: sector, bytes: dataIn))
        case BlkRequestType.out:
            guard !readOnly else { return refuse(.readOnly) }
            guard dataIn == 0, dataOut % 512 == 0 else { return refuse(.badLayout) }
            guard inRange(sector, UInt64(dataOut)) else { return refuse(.outOfRange) }
            return run(.write(sector: sector, bytes: dataOut))
        case BlkRequestType.flush:
            guard features.contains(.blkFlush) else { return refuse(.notNegotiated(type: type)) }
            return run(.flush)
        case BlkRequestType.getID:
            guard dataIn >= 20 else { return refuse(.badLayout) }
            return run(.getID)
        case BlkRequestType.discard, BlkRequestType.writeZeroes:
            return parseSegment(chain, mem: mem, type: type, dataOut: dataOut, status: status)
        default:
            return refuse(.unknownType(type))
        }
    }

    /// DISCARD and WRITE_ZEROES: exactly one 16-byte segment (`le64 sector; le32 num_sectors; le32 flags`).
    private func parseSegment(
        _ chain: DescriptorChain, mem: SharedMemory, type: UInt32, dataOut: Int, status: Int
    ) -> ParsedChain {
        let isDiscard = type == BlkRequestType.discard
        guard features.contains(isDiscard ? .blkDiscard : .blkWriteZeroes) else {
            return .refused(.notNegotiated(type: type), status: status)
        }
        guard !readOnly else { return .refused(.readOnly, status: status) }
        guard dataOut > 0, dataOut % 16 == 0, dataOut / 16 <= 1 else { return .refused(.badSegments, status: status) }
        var seg = [UInt8](repeating: 0, count: 16)
        gather(chain.readable, skip: 16, count: 16, mem: mem, into: &seg)
        let s = le64(seg, 0)
        let n = UInt64(le32(seg, 8))
        let flags = le32(seg, 12)
        let limit = UInt64(isDiscard ? maxDiscardSectors : maxWriteZeroesSectors)
        // §5.2.6.2: unmap must be 0 on DISCARD; unknown flag bits are UNSUPP.
        guard flags & ~1 == 0, !(isDiscard && flags & 1 != 0) else { return .refused(.badFlags(flags), status: status) }
        guard n <= limit else { return .refused(.tooManySectors, status: status) }
        guard inRange(s, n * 512) else { return .refused(.outOfRange, status: status) }
        let request: BlkRequest =
            isDiscard ? .discard(sector: s, sectors: n) : .writeZeroes(sector: s, sectors: n, unmap: flags & 1 != 0)
        return .request(request, status: status)
    }

    private func inRange(_ sector: UInt64, _ bytes: UInt64) -> Bool {
        let (start, o1) = sector.multipliedReportingOverflow(by: 512)
        let (end, o2) = start.addingReportingOverflow(bytes)
        return !o1 && !o2 && end <= capacityBytes
    }
}

/// Calls `body(offset, length)` for the pieces of `count` bytes that start `skip` bytes into `segs`.
func forEachPiece(_ segs: [MemorySegment], skip: Int, count: Int, _ body: (Int, Int) throws -> Void) rethrows {
    var skip = skip
    var left = count
    for s in segs where left > 0 {
        if skip >= s.length {
            skip -= s.length
            continue
        }
        let n = min(s.length - skip, left)
        try body(s.offset + skip, n)
        left -= n
        skip = 0
    }
}

/// Copies `count` bytes that start `skip` bytes into `segs` to the start of `out`.
func gather(_ segs: [MemorySegment], skip: Int, count: Int, mem: SharedMemory, into out: inout [UInt8]) {
    var k = 0
    forEachPiece(segs, skip: skip, count: count) { off, n in
        for i in 0..<n { out[k + i] = mem.load8(off + i) }
        k += n
    }
}

func le32(_ b: [UInt8], _ o: Int) -> UInt32 {
    (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) }
}

func le64(_ b: [UInt8], _ o: Int) -> UInt64 {
    (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) }
}
