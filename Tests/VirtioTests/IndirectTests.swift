import Virtio
import XCTest

@testable import VirtioEmulator

/// Indirect descriptor tables on the split ring, written by hand: good ones work, each malformed
/// one is refused as §2.7.5.3.1 requires, and the device lives on.
final class IndirectTests: XCTestCase {
    let features: VirtioFeatures = [.version1, .blkFlush, .indirectDesc]

    /// Writes a split-format table entry at data offset `table` + 16 × i.
    func entry(_ d: RawDriver, table: Int, _ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let o = d.dataOffset(table + 16 * i)
        d.mem.store64(o, addr)
        d.mem.store32(o + 8, len)
        d.mem.store16(o + 12, flags)
        d.mem.store16(o + 14, next)
    }
    func header(_ d: RawDriver, type: UInt32, sector: UInt64) {
        d.mem.store32(d.dataOffset(0), type)
        d.mem.store32(d.dataOffset(4), 0)
        d.mem.store64(d.dataOffset(8), sector)
        d.mem.store8(d.dataOffset(32), 0xFF)
    }
    var status: (RawDriver) -> UInt8 { { $0.mem.load8($0.dataOffset(32)) } }

    func testIndirectWriteThenReadRoundTrip() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20), features: features)
        // WRITE of two pages through a 4-entry table at data+1024.
        header(d, type: 1, sector: 16)
        d.mem.write([UInt8](repeating: 0xA1, count: 4096), at: d.dataOffset(8192))
        d.mem.write([UInt8](repeating: 0xB2, count: 4096), at: d.dataOffset(12288))
        entry(d, table: 1024, 0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        entry(d, table: 1024, 1, addr: d.addr(8192), len: 4096, flags: 1, next: 2)
        entry(d, table: 1024, 2, addr: d.addr(12288), len: 4096, flags: 1, next: 3)
        entry(d, table: 1024, 3, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.setDesc(0, addr: d.addr(1024), len: 64, flags: DescriptorFlags.indirect, next: 0)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(d), BlkStatus.ok)
        // READ both pages back through a table whose entries are out of order (next links).
        header(d, type: 0, sector: 16)
        entry(d, table: 2048, 0, addr: d.addr(0), len: 16, flags: 1, next: 2)
        entry(d, table: 2048, 2, addr: d.addr(16384), len: 8192, flags: 3, next: 1)
        entry(d, table: 2048, 1, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.setDesc(1, addr: d.addr(2048), len: 48, flags: DescriptorFlags.indirect, next: 0)
        d.submit([1])
        let u = d.waitUsed(1)
        XCTAssertEqual(status(d), BlkStatus.ok)
        XCTAssertEqual(u.first?.1, 8193, "used length counts the data and the status byte")
        XCTAssertEqual(d.mem.bytes(at: d.dataOffset(16384), count: 4096), [UInt8](repeating: 0xA1, count: 4096))
        XCTAssertEqual(d.mem.bytes(at: d.dataOffset(20480), count: 4096), [UInt8](repeating: 0xB2, count: 4096))
        d.emu.shutdown()
    }

    func testMalformedIndirectTablesAreRefused() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20), features: features)
        func good(table: Int) {
            entry(d, table: table, 0, addr: d.addr(0), len: 16, flags: 1, next: 1)
            entry(d, table: table, 1, addr: d.addr(4096), len: 4096, flags: 3, next: 2)
            entry(d, table: table, 2, addr: d.addr(32), len: 1, flags: 2, next: 0)
        }
        let bad0 = d.emu.stats.badChains.load(ordering: .relaxed)
        var cases = 0
        func expectRefused(_ what: String, file: StaticString = #filePath, line: UInt = #line) {
            d.submit([0])
            _ = d.waitUsed(1, file: file, line: line)
            cases += 1
            XCTAssertNotEqual(status(d), BlkStatus.ok, what, file: file, line: line)
            XCTAssertEqual(
                d.emu.stats.badChains.load(ordering: .relaxed) - bad0, cases, "\(what): counted as a bad chain",
                file: file, line: line)
        }
        // INDIRECT together with NEXT.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        d.setDesc(0, addr: d.addr(1024), len: 48, flags: DescriptorFlags.indirect | DescriptorFlags.next, next: 1)
        d.setDesc(1, addr: d.addr(32), len: 1, flags: 2, next: 0)
        expectRefused("INDIRECT with NEXT")
        // Table length not a multiple of 16, and zero.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        d.setDesc(0, addr: d.addr(1024), len: 40, flags: DescriptorFlags.indirect, next: 0)
        expectRefused("table length 40")
        d.setDesc(0, addr: d.addr(1024), len: 0, flags: DescriptorFlags.indirect, next: 0)
        expectRefused("empty table")
        // A table entry that is itself INDIRECT.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        entry(d, table: 1024, 1, addr: d.addr(2048), len: 48, flags: DescriptorFlags.indirect, next: 2)
        d.setDesc(0, addr: d.addr(1024), len: 48, flags: DescriptorFlags.indirect, next: 0)
        expectRefused("nested INDIRECT")
        // NEXT pointing outside the table.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        entry(d, table: 1024, 1, addr: d.addr(4096), len: 4096, flags: 3, next: 9)
        expectRefused("next outside the table")
        // A loop inside the table.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        entry(d, table: 1024, 2, addr: d.addr(32), len: 1, flags: 3, next: 1)
        expectRefused("loop in the table")
        // The table itself outside driver memory.
        header(d, type: 0, sector: 0)
        d.setDesc(0, addr: 0xFFFF_FFFF_FFFF_0000, len: 48, flags: DescriptorFlags.indirect, next: 0)
        expectRefused("table outside memory")
        // An entry pointing outside driver memory.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        entry(d, table: 1024, 1, addr: 0xFFFF_FFFF_FFFF_0000, len: 4096, flags: 3, next: 2)
        d.setDesc(0, addr: d.addr(1024), len: 48, flags: DescriptorFlags.indirect, next: 0)
        expectRefused("entry outside memory")
        // Readable after writable inside the table.
        header(d, type: 1, sector: 0)
        good(table: 1024)
        entry(d, table: 1024, 1, addr: d.addr(32), len: 1, flags: 3, next: 2)
        entry(d, table: 1024, 2, addr: d.addr(4096), len: 512, flags: 0, next: 0)
        expectRefused("readable after writable")
        // The device lives on: a good indirect read works.
        header(d, type: 0, sector: 0)
        good(table: 1024)
        d.setDesc(0, addr: d.addr(1024), len: 48, flags: DescriptorFlags.indirect, next: 0)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(d), BlkStatus.ok)
        d.emu.shutdown()
    }

    func testIndirectRefusedWhenNotNegotiated() throws {
        let d = try RawDriver(backend: try RAMBackend(size: 1 << 20), features: [.version1])
        header(d, type: 0, sector: 0)
        entry(d, table: 1024, 0, addr: d.addr(0), len: 16, flags: 1, next: 1)
        entry(d, table: 1024, 1, addr: d.addr(32), len: 1, flags: 2, next: 0)
        d.setDesc(0, addr: d.addr(1024), len: 32, flags: DescriptorFlags.indirect, next: 0)
        d.submit([0])
        _ = d.waitUsed(1)
        XCTAssertEqual(status(d), 0xFF, "no status written: the walk failed before any writable byte")
        XCTAssertEqual(d.emu.stats.badChains.load(ordering: .relaxed), 1)
        d.emu.shutdown()
    }
}
