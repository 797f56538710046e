import Virtio
import XCTest

@testable import VirtioEmulator

/// The emulator's parse half on its own: chains built by hand in plain shared memory, parsed with
/// no device thread, no rings and no backend.
final class BlkRequestParserTests: XCTestCase {
    static let base: UInt64 = 0x10_0000
    var mem: SharedMemory!
    var header = [UInt8](repeating: 0, count: 16)
    /// 1 MiB of capacity; every feature the parser checks.
    var parser = BlkRequestParser(
        features: [.version1, .blkFlush, .blkDiscard, .blkWriteZeroes], readOnly: false, capacityBytes: 1 << 20,
        maxDiscardSectors: 64, maxWriteZeroesSectors: 128)

    override func setUpWithError() throws {
        mem = try SharedMemory(size: 64 << 10, deviceBase: Self.base)
    }

    /// Header at 0, driver-readable extra bytes at 4K, device-writable data at 8K, status at 60K.
    func chain(
        type: UInt32, sector: UInt64 = 0, readable extra: Int = 0, writable data: Int = 0, status: Bool = true,
        headerBytes: Int = 16
    ) throws -> DescriptorChain {
        mem.store32(0, type)
        mem.store32(4, 0)
        mem.store64(8, sector)
        var c = DescriptorChain()
        c.reset(head: 0)
        try c.append(mem: mem, address: Self.base, length: UInt32(headerBytes), writable: false, index: 0)
        if extra > 0 {
            try c.append(mem: mem, address: Self.base + 4096, length: UInt32(extra), writable: false, index: 1)
        }
        if data > 0 {
            try c.append(mem: mem, address: Self.base + 8192, length: UInt32(data), writable: true, index: 2)
        }
        if status { try c.append(mem: mem, address: Self.base + 61440, length: 1, writable: true, index: 3) }
        return c
    }

    /// A discard / write-zeroes segment at 4K: `le64 sector; le32 num_sectors; le32 flags`.
    func segment(sector: UInt64, sectors: UInt32, flags: UInt32 = 0) {
        mem.store64(4096, sector)
        mem.store32(4096 + 8, sectors)
        mem.store32(4096 + 12, flags)
    }

    func parse(_ c: DescriptorChain) -> ParsedChain { parser.parse(c, mem: mem, header: &header) }

    /// A header split over two descriptors (8 + 8 bytes, the second part elsewhere in memory)
    /// parses as one in a single descriptor does (§2.7.4: the device must not assume a layout).
    func testAHeaderSplitOverTwoDescriptorsParsesTheSame() throws {
        mem.store32(0, BlkRequestType.in)
        mem.store32(4, 0)
        mem.store64(2048, 24) // the sector, in the second descriptor
        var c = DescriptorChain()
        c.reset(head: 0)
        try c.append(mem: mem, address: Self.base, length: 8, writable: false, index: 0)
        try c.append(mem: mem, address: Self.base + 2048, length: 8, writable: false, index: 1)
        try c.append(mem: mem, address: Self.base + 8192, length: 4096, writable: true, index: 2)
        try c.append(mem: mem, address: Self.base + 61440, length: 1, writable: true, index: 3)
        XCTAssertEqual(parse(c), .request(.read(sector: 24, bytes: 4096), status: 61440))
    }

    func testReadAndWriteParseToTheirSectorsAndLengths() throws {
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, sector: 8, writable: 4096)),
            .request(.read(sector: 8, bytes: 4096), status: 61440))
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.out, sector: 2040, readable: 4096)),
            .request(.write(sector: 2040, bytes: 4096), status: 61440))
        XCTAssertEqual(parse(try chain(type: BlkRequestType.flush)), .request(.flush, status: 61440))
        XCTAssertEqual(parse(try chain(type: BlkRequestType.getID, writable: 20)), .request(.getID, status: 61440))
    }

    func testDataThatDoesNotFitTheTypeIsIOERR() throws {
        // A read with driver-readable data, a read of part of a sector, a write with device-writable
        // data, a GET_ID with room for fewer than 20 bytes. (The header lives at one place in
        // memory: each chain is parsed before the next is built.)
        let cases: [(type: UInt32, readable: Int, writable: Int)] = [
            (BlkRequestType.in, 512, 512), (BlkRequestType.in, 0, 100), (BlkRequestType.out, 512, 512),
            (BlkRequestType.getID, 0, 19),
        ]
        for c in cases {
            XCTAssertEqual(
                parse(try chain(type: c.type, readable: c.readable, writable: c.writable)),
                .refused(.badLayout, status: 61440), "\(c)")
        }
        XCTAssertEqual(BlkRefusal.badLayout.status, BlkStatus.ioErr)
    }

    func testPastTheCapacityAndOverflowingSectorsAreOutOfRange() throws {
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, sector: 2047, writable: 1024)),
            .refused(.outOfRange, status: 61440))
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.out, sector: UInt64.max / 256, readable: 512)),
            .refused(.outOfRange, status: 61440))
        // The last whole sector is in range; the capacity shrinking (a resize) takes it away.
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, sector: 2047, writable: 512)),
            .request(.read(sector: 2047, bytes: 512), status: 61440))
        parser.capacityBytes = 2047 * 512
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, sector: 2047, writable: 512)), .refused(.outOfRange, status: 61440)
        )
    }

    func testReadOnlyRefusesWritesDiscardsAndZeroesButNotReadsOrFlush() throws {
        parser.readOnly = true
        XCTAssertEqual(parse(try chain(type: BlkRequestType.out, readable: 512)), .refused(.readOnly, status: 61440))
        segment(sector: 0, sectors: 8)
        XCTAssertEqual(parse(try chain(type: BlkRequestType.discard, readable: 16)), .refused(.readOnly, status: 61440))
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.writeZeroes, readable: 16)), .refused(.readOnly, status: 61440))
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, writable: 512)),
            .request(.read(sector: 0, bytes: 512), status: 61440))
        XCTAssertEqual(parse(try chain(type: BlkRequestType.flush)), .request(.flush, status: 61440))
    }

    func testSegmentsParseWithTheirFlags() throws {
        segment(sector: 16, sectors: 64)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.discard, readable: 16)),
            .request(.discard(sector: 16, sectors: 64), status: 61440))
        segment(sector: 16, sectors: 128, flags: 1)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.writeZeroes, readable: 16)),
            .request(.writeZeroes(sector: 16, sectors: 128, unmap: true), status: 61440))
    }

    func testBadSegmentsAreUNSUPPOrIOERRAsTheSpecSays() throws {
        // §5.2.6.2: unmap on a DISCARD and unknown flag bits are UNSUPP.
        segment(sector: 0, sectors: 8, flags: 1)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.discard, readable: 16)), .refused(.badFlags(1), status: 61440))
        segment(sector: 0, sectors: 8, flags: 2)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.writeZeroes, readable: 16)), .refused(.badFlags(2), status: 61440))
        // No segment, part of one, two of them.
        for extra in [0, 8, 32] {
            XCTAssertEqual(
                parse(try chain(type: BlkRequestType.discard, readable: extra)), .refused(.badSegments, status: 61440),
                "\(extra) segment bytes")
        }
        // Above max_discard_sectors (64) / max_write_zeroes_sectors (128): IOERR.
        segment(sector: 0, sectors: 65)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.discard, readable: 16)), .refused(.tooManySectors, status: 61440))
        segment(sector: 2040, sectors: 16)
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.writeZeroes, readable: 16)), .refused(.outOfRange, status: 61440))
        XCTAssertEqual(BlkRefusal.tooManySectors.status, BlkStatus.ioErr)
        XCTAssertEqual(BlkRefusal.badSegments.status, BlkStatus.unsupp)
    }

    func testFeaturesNotNegotiatedAndUnknownTypesAreUNSUPP() throws {
        parser.features = [.version1]
        segment(sector: 0, sectors: 8)
        for type in [BlkRequestType.flush, BlkRequestType.discard, BlkRequestType.writeZeroes] {
            XCTAssertEqual(
                parse(try chain(type: type, readable: 16)), .refused(.notNegotiated(type: type), status: 61440))
        }
        XCTAssertEqual(parse(try chain(type: 99)), .refused(.unknownType(99), status: 61440))
        XCTAssertEqual(BlkRefusal.unknownType(99).status, BlkStatus.unsupp)
    }

    func testChainsThatAreNoRequestAreFaults() throws {
        XCTAssertEqual(parse(try chain(type: BlkRequestType.in, status: false)), .fault(.noStatusByte))
        XCTAssertEqual(
            parse(try chain(type: BlkRequestType.in, writable: 512, headerBytes: 8)),
            .fault(.shortHeader(status: 61440)))
        var c = try chain(type: BlkRequestType.in, writable: 512)
        c.fault = .loop(head: 0)
        XCTAssertEqual(parse(c), .fault(.invalid(.loop(head: 0))))
    }
}
