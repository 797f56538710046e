import CNBD
import Foundation
import NBDServer
// The real server (NIO listener + handler + virtio-blk driver + in-process device) driven by libnbd.
import TestSupport
import VirtioBlock
import VirtioEmulator
import XCTest

final class ServerIntegrationTests: XCTestCase {
    static let size: UInt64 = 8 << 20

    // MARK: handshake results

    func testSizeAndFlags() async throws {
        try await TestServer.with(try await TestServer.ram(size: Self.size)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            XCTAssertEqual(try c.size, Self.size)
            XCTAssertFalse(try c.flag("is_read_only", nbd_is_read_only(c.h)))
            XCTAssertTrue(try c.flag("can_flush", nbd_can_flush(c.h)))
            XCTAssertTrue(try c.flag("can_fua", nbd_can_fua(c.h)))
            XCTAssertTrue(try c.flag("can_trim", nbd_can_trim(c.h)))
            XCTAssertTrue(try c.flag("can_zero", nbd_can_zero(c.h)))
            XCTAssertTrue(try c.flag("can_multi_conn", nbd_can_multi_conn(c.h)))
            XCTAssertEqual(nbd_get_block_size(c.h, LIBNBD_SIZE_MINIMUM), 1)
            XCTAssertEqual(nbd_get_block_size(c.h, LIBNBD_SIZE_PREFERRED), 4096)
            XCTAssertEqual(nbd_get_block_size(c.h, LIBNBD_SIZE_MAXIMUM), 64 << 20)
            XCTAssertEqual(
                nbd_get_export_name(c.h).map { s in
                    defer { free(s) }
                    return String(cString: s)
                }, "disk")
            c.close()
        }
    }

    func testDefaultExportByEmptyName() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20, name: "only")) { s in
            let c = try NBDClient(socket: s.socketPath, export: "")
            XCTAssertEqual(try c.size, 1 << 20)
            c.close()
        }
    }

    func testUnknownExportNameFailsToConnect() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            XCTAssertThrowsError(try NBDClient(socket: s.socketPath, export: "no-such-export")) { e in
                XCTAssertEqual((e as? NBDFailure)?.call, "nbd_connect_unix", "\(e)")
            }
            // The server still serves the right name afterwards.
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            XCTAssertEqual(try c.size, 1 << 20)
            c.close()
        }
    }

    func testSeveralExportsAreListedAndSelectable() async throws {
        let a = try TestDisk.ram(size: 1 << 20)
        let b = try TestDisk.ram(size: 2 << 20)
        let server = try await TestServer.start([
            .init(name: "a", description: "disk A", disk: a), .init(name: "b", disk: b, forceReadOnly: true),
        ])
        try await TestServer.with(server) { s in
            let ca = try NBDClient(socket: s.socketPath, export: "a")
            let cb = try NBDClient(socket: s.socketPath, export: "b")
            XCTAssertEqual(try ca.size, 1 << 20)
            XCTAssertEqual(try cb.size, 2 << 20)
            XCTAssertFalse(try ca.flag("is_read_only", nbd_is_read_only(ca.h)))
            XCTAssertTrue(try cb.flag("is_read_only", nbd_is_read_only(cb.h)))
            try ca.pwrite([1, 2, 3], at: 0)
            XCTAssertEqual(try cb.pread(3, at: 0), [0, 0, 0], "exports are separate disks")
            ca.close()
            cb.close()
        }
    }

    // MARK: data

    func testReadWriteRoundTripAlignedAndUnaligned() async throws {
        try await TestServer.with(try await TestServer.ram(size: Self.size)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: Int(Self.size))
            var rng = SplitMix(seed: 1)
            let cases: [(UInt64, Int)] = [
                (0, 1), (4095, 1), (4096, 1), (1, 511), (513, 511), (4095, 2), (8191, 4095), (12_345, 4097),
                (0, 4096), (4096, 4097), (3 << 20 | 1, 100 << 10), (5 << 20 + 4093, 100 << 10 + 7),
                (Self.size - 1, 1), (Self.size - 4097, 4097), (1 << 20, 1 << 20),
            ]
            for (off, len) in cases {
                let data = rng.bytes(len)
                try c.pwrite(data, at: off)
                model.write(data, at: off)
                assertBytes(try c.pread(len, at: off), data, "read back \(len)@\(off)")
            }
            // Reads at other alignments, spanning neighbouring writes.
            for (off, len) in [(UInt64(0), 20_000), (4000, 9000), (3 << 20, 200 << 10), (Self.size - 8192, 8192)] {
                assertBytes(try c.pread(len, at: off), model.read(len, at: off), "re-read \(len)@\(off)")
            }
            assertBytes(try c.pread(Int(Self.size), at: 0), model.bytes, "whole disk")
            c.close()
        }
    }

    func testManyConcurrentWritesThenReadsMatchTheModel() async throws {
        try await TestServer.with(try await TestServer.ram(size: Self.size)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: Int(Self.size))
            var rng = SplitMix(seed: 2)
            func randomOp() -> (UInt64, Int) {
                let len = Int.random(in: 4096...65_536, using: &rng)
                return (UInt64.random(in: 0...(Self.size - UInt64(len)), using: &rng), len)
            }
            var writes: [NBDClient.Op] = []
            for _ in 0..<64 {
                let (off, len) = randomOp()
                let d = rng.bytes(len)
                writes.append(.write(offset: off, data: d))
                model.write(d, at: off) // in wire order; the server serializes overlaps in arrival order
            }
            _ = try c.aioBatch(writes)
            var reads: [(UInt64, Int)] = []
            for _ in 0..<64 { reads.append(randomOp()) }
            let got = try c.aioBatch(reads.map { .read(offset: $0.0, count: $0.1) })
            for (i, (off, len)) in reads.enumerated() {
                assertBytes(got[i] ?? [], model.read(len, at: off), "concurrent read \(i): \(len)@\(off)")
            }
            assertBytes(try c.pread(Int(Self.size), at: 0), model.bytes, "whole disk")
            c.close()
        }
    }

    /// Overlapping, unaligned writes all in flight at once. NBD lets a server reorder them, but this
    /// server documents (RangeLocks) that overlapping requests are applied whole and in arrival order,
    /// so the result must equal applying them one after the other.
    func testOverlappingUnalignedWritesInFlightApplyInOrderWithoutTearing() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: 1 << 20)
            var rng = SplitMix(seed: 3)
            var ops: [NBDClient.Op] = []
            for _ in 0..<64 {
                // All inside a 48 KiB window, so almost every write overlaps several others.
                let len = Int.random(in: 1...20_000, using: &rng)
                let off = UInt64.random(in: 100_000...(100_000 + 49_152 - UInt64(len)), using: &rng)
                let d = rng.bytes(len)
                ops.append(.write(offset: off, data: d))
                model.write(d, at: off)
            }
            _ = try c.aioBatch(ops)
            assertBytes(try c.pread(1 << 20, at: 0), model.bytes, "after overlapping writes")
            c.close()
        }
    }

    /// Reads and writes mixed in one batch: each read must see exactly the writes sent before it.
    func testMixedReadsAndWritesInFlightSeeEarlierWrites() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: 1 << 20)
            var rng = SplitMix(seed: 4)
            var ops: [NBDClient.Op] = []
            var expected: [Int: [UInt8]] = [:]
            for i in 0..<96 {
                let len = Int.random(in: 1...16_384, using: &rng)
                let off = UInt64.random(in: 0...(65_536 - UInt64(len)), using: &rng)
                if i % 3 == 2 {
                    ops.append(.read(offset: off, count: len))
                    expected[i] = model.read(len, at: off)
                } else {
                    let d = rng.bytes(len)
                    ops.append(.write(offset: off, data: d))
                    model.write(d, at: off)
                }
            }
            let got = try c.aioBatch(ops)
            for (i, want) in expected.sorted(by: { $0.key < $1.key }) {
                assertBytes(got[i] ?? [], want, "read op \(i)")
            }
            c.close()
        }
    }

    func testFlushAndFUAWrites() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            let flushesBefore = s.disks[0].emulator.stats.flushes.load(ordering: .relaxed)
            try c.pwrite([UInt8](repeating: 7, count: 5000), at: 3, fua: true)
            try c.flush()
            try c.pwrite([UInt8](repeating: 8, count: 4096), at: 8192, fua: true)
            XCTAssertEqual(try c.pread(5000, at: 3), [UInt8](repeating: 7, count: 5000))
            XCTAssertEqual(try c.pread(4096, at: 8192), [UInt8](repeating: 8, count: 4096))
            XCTAssertGreaterThanOrEqual(
                s.disks[0].emulator.stats.flushes.load(ordering: .relaxed) - flushesBefore, 3,
                "FLUSH and each FUA write must reach the device as a flush")
            c.close()
        }
    }

    func testTrimThenRangeIsReadable() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            let data = SplitMix(seed: 5).bytesOf(65_536)
            try c.pwrite(data, at: 0)
            try c.trim(40_000, at: 1000) // unaligned edges: whole blocks inside may be discarded
            let after = try c.pread(65_536, at: 0)
            assertBytes(Array(after[0..<1000]), Array(data[0..<1000]), "before the trimmed range")
            assertBytes(Array(after[41_000...]), Array(data[41_000...]), "after the trimmed range")
            for i in 1000..<41_000 where after[i] != data[i] && after[i] != 0 {
                XCTFail("trimmed byte \(i) is neither old data nor zero")
                break
            }
            try c.trim(8192, at: 0, fua: true)
            _ = try c.pread(8192, at: 0)
            // Writes after a trim land normally.
            try c.pwrite([1, 2, 3], at: 4096)
            XCTAssertEqual(try c.pread(3, at: 4096), [1, 2, 3])
            c.close()
        }
    }

    func testZeroWithAndWithoutNoHoleIncludingUnalignedEdges() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: 1 << 20)
            var rng = SplitMix(seed: 6)
            let fill = rng.bytes(1 << 20)
            try c.pwrite(fill, at: 0)
            model.write(fill, at: 0)
            let ranges: [(UInt64, UInt64, Bool)] = [
                (4096, 8192, false), // aligned
                (20_000, 30_000, false), // unaligned both ends, spans whole blocks
                (65_537, 100, true), // inside one block
                (70_000, 5000, true), // crosses one block boundary, no whole block
                (131_072 - 1, 4098, false), // 1 byte, a whole block, 1 byte
                (200_001, 150_000, true), // big, unaligned, NO_HOLE
                (1_048_576 - 3000, 3000, false), // to the end
            ]
            for (off, len, noHole) in ranges {
                try c.zero(len, at: off, noHole: noHole, fua: off == 4096)
                model.zero(len, at: off)
                XCTAssertEqual(
                    try c.pread(Int(len), at: off), [UInt8](repeating: 0, count: Int(len)),
                    "zero \(len)@\(off) noHole=\(noHole)")
            }
            assertBytes(try c.pread(1 << 20, at: 0), model.bytes, "neighbours of zeroed ranges are untouched")
            c.close()
        }
    }

    /// The advertised maximum payload (64 MiB) works for READ and WRITE, and WRITE_ZEROES / TRIM
    /// may cover more than the maximum payload ("Size constraints").
    func testMaximumPayloadTransfersAndLargeZeroAndTrim() async throws {
        let size: UInt64 = 96 << 20
        try await TestServer.with(try await TestServer.ram(size: size)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            let maxPayload = Int(nbd_get_block_size(c.h, LIBNBD_SIZE_MAXIMUM))
            XCTAssertEqual(maxPayload, 64 << 20)
            let data = SplitMix(seed: 11).bytesOf(maxPayload)
            try c.pwrite(data, at: 4097)
            assertBytes(try c.pread(maxPayload, at: 4097), data, "64 MiB read back")
            // Zero 24 MiB from byte 1000 (NO_HOLE): the data just past it survives.
            try c.zero(24 << 20, at: 1000, noHole: true)
            let past = (24 << 20) + 1000
            assertBytes(
                try c.pread(4096, at: UInt64(past)), Array(data[(past - 4097)..<(past - 4097 + 4096)]),
                "just past the zeroed range")
            XCTAssertEqual(
                try c.pread(8192, at: (24 << 20) + 1000 - 8192), [UInt8](repeating: 0, count: 8192),
                "end of the zeroed range")
            // 36 MiB (more than the maximum payload) of zeroes over [28 MiB, 64 MiB).
            try c.zero(36 << 20, at: 28 << 20)
            for (off, len) in [(28 << 20, 4096), (40 << 20, 1 << 20), ((64 << 20) - 4096, 4096)] {
                XCTAssertEqual(
                    try c.pread(len, at: UInt64(off)), [UInt8](repeating: 0, count: len), "large zero at \(off)")
            }
            assertBytes(
                try c.pread(4096, at: (28 << 20) - 4096), Array(data[((28 << 20) - 4096 - 4097)..<((28 << 20) - 4097)]),
                "before the large zero")
            try c.trim(size, at: 0)
            _ = try c.pread(4096, at: 0)
            c.close()
        }
    }

    // MARK: errors

    func testReadPastEndIsEINVALAndConnectionSurvives() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
            try c.pwrite([9, 9, 9, 9], at: 100)
            assertNBDError(EINVAL, "read crossing the end") { _ = try c.pread(4096, at: (1 << 20) - 2048) }
            assertNBDError(EINVAL, "read wholly past the end") { _ = try c.pread(512, at: 1 << 21) }
            assertNBDError(EINVAL, "read whose end overflows u64") { _ = try c.pread(512, at: UInt64.max - 100) }
            assertNBDError(EINVAL, "trim past the end") { try c.trim(8192, at: (1 << 20) - 4096) }
            XCTAssertEqual(try c.pread(4, at: 100), [9, 9, 9, 9], "the connection still works")
            XCTAssertEqual(try c.pread(1, at: (1 << 20) - 1), [0], "the last byte is readable")
            c.close()
        }
    }

    func testWritePastEndIsENOSPC() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
            assertNBDError(ENOSPC, "write crossing the end") {
                try c.pwrite([UInt8](repeating: 1, count: 4096), at: (1 << 20) - 1)
            }
            assertNBDError(ENOSPC, "write wholly past the end") { try c.pwrite([1], at: 1 << 21) }
            assertNBDError(ENOSPC, "write zeroes past the end") { try c.zero(4096, at: (1 << 20) - 100) }
            XCTAssertEqual(try c.pread(1, at: (1 << 20) - 1), [0], "a failed write changes nothing")
            try c.pwrite([5], at: (1 << 20) - 1)
            XCTAssertEqual(try c.pread(1, at: (1 << 20) - 1), [5])
            c.close()
        }
    }

    func testReadOnlyExportRefusesModificationsWithEPERM() async throws {
        // Both ways of being read-only: a read-only device, and a writable device exported read-only.
        for (deviceRO, forceRO) in [(true, false), (false, true)] {
            try await TestServer.with(
                try await TestServer.ram(size: 1 << 20, readOnly: deviceRO, forceReadOnly: forceRO)
            ) { s in
                let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
                let what = "device read-only \(deviceRO), export forced \(forceRO)"
                XCTAssertTrue(try c.flag("is_read_only", nbd_is_read_only(c.h)), what)
                XCTAssertFalse(try c.flag("can_trim", nbd_can_trim(c.h)), what)
                XCTAssertFalse(try c.flag("can_zero", nbd_can_zero(c.h)), what)
                assertNBDError(EPERM, "write, \(what)") { try c.pwrite([1, 2, 3], at: 0) }
                assertNBDError(EPERM, "trim, \(what)") { try c.trim(4096, at: 0) }
                assertNBDError(EPERM, "zero, \(what)") { try c.zero(4096, at: 0) }
                XCTAssertEqual(try c.pread(4096, at: 0), [UInt8](repeating: 0, count: 4096), what)
                try c.flush()
                c.close()
            }
        }
    }

    /// "NBD_CMD_FLAG_FUA ... is valid for all commands, provided NBD_FLAG_SEND_FUA has been
    /// negotiated, in which case the server MUST accept all commands with this bit set (even by
    /// ignoring the bit) ... existing clients are known to set this bit on other commands."
    func testFUAIsAcceptedOnEveryCommand() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
            XCTAssertTrue(try c.flag("can_fua", nbd_can_fua(c.h)))
            try c.pwrite([4, 5, 6], at: 10)
            let fua = UInt32(LIBNBD_CMD_FLAG_FUA)
            var buf = [UInt8](repeating: 0, count: 3)
            let r = buf.withUnsafeMutableBytes { nbd_pread(c.h, $0.baseAddress, 3, 10, fua) }
            XCTAssertEqual(r, 0, "READ with FUA: \(r < 0 ? NBDClient.lastError : "")")
            if r == 0 { XCTAssertEqual(buf, [4, 5, 6]) }
            let f = nbd_flush(c.h, fua)
            XCTAssertEqual(f, 0, "FLUSH with FUA: \(f < 0 ? NBDClient.lastError : "")")
            XCTAssertEqual(try c.pread(3, at: 10), [4, 5, 6], "the connection still works")
            c.close()
        }
    }

    func testUnadvertisedFlagsAndUnknownCommandsAreEINVAL() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
            // NO_HOLE is only valid on WRITE_ZEROES.
            assertNBDError(EINVAL, "WRITE with NO_HOLE") {
                let d: [UInt8] = [1]
                try d.withUnsafeBytes {
                    _ = try c.check(
                        "nbd_pwrite", nbd_pwrite(c.h, $0.baseAddress, 1, 0, UInt32(LIBNBD_CMD_FLAG_NO_HOLE)))
                }
            }
            // REQ_ONE is only valid on BLOCK_STATUS; FAST_ZERO only on WRITE_ZEROES.
            assertNBDError(EINVAL, "READ with REQ_ONE") {
                var b = [UInt8](repeating: 0, count: 1)
                try b.withUnsafeMutableBytes {
                    _ = try c.check("nbd_pread", nbd_pread(c.h, $0.baseAddress, 1, 0, UInt32(LIBNBD_CMD_FLAG_REQ_ONE)))
                }
            }
            assertNBDError(EINVAL, "TRIM with FAST_ZERO") {
                _ = try c.check("nbd_trim", nbd_trim(c.h, 4096, 0, UInt32(LIBNBD_CMD_FLAG_FAST_ZERO)))
            }
            // CACHE is advertised and accepted; past the end it is EINVAL.
            XCTAssertEqual(nbd_cache(c.h, 4096, 0, 0), 0, "CACHE: \(NBDClient.lastError)")
            assertNBDError(EINVAL, "CACHE past the end") {
                _ = try c.check("nbd_cache", nbd_cache(c.h, 4096, (1 << 20) - 100, 0))
            }
            XCTAssertEqual(try c.pread(1, at: 0), [0], "the connection still works")
            c.close()
        }
    }

    /// The same check as RawClientTests.testOversizedWriteIsAnsweredOnlyAfterItsPayloadIsReceived,
    /// through libnbd: the EINVAL must reach libnbd as an error of this command, and the handle must
    /// stay usable.
    func testWriteAboveMaximumPayloadIsRejectedAndConnectionSurvives() async throws {
        // libnbd sends nothing above 64 MiB (its own limit), so this export advertises 256 KiB.
        let disk = try TestDisk.ram(size: 1 << 20)
        try await TestServer.with(
            try await TestServer.start([.init(name: "disk", disk: disk, maximumPayload: 256 << 10)])
        ) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk", strict: false)
            XCTAssertEqual(nbd_get_block_size(c.h, LIBNBD_SIZE_MAXIMUM), 256 << 10)
            let big = [UInt8](repeating: 0x77, count: (256 << 10) + 4096)
            assertNBDError(EINVAL, "WRITE of more than the 256 KiB maximum payload") { try c.pwrite(big, at: 0) }
            XCTAssertEqual(
                try c.pread(4096, at: 0), [UInt8](repeating: 0, count: 4096), "nothing written; the payload was drained"
            )
            try c.pwrite([1, 2], at: 0)
            XCTAssertEqual(try c.pread(2, at: 0), [1, 2])
            c.close()
        }
    }

    /// 600 requests sent at once, more than the handler's in-flight limit (128): the server holds
    /// many at a time (its own in-flight gauge peaks near the limit, never above it), and
    /// backpressure does not stall the rest.
    func testHundredsOfRequestsInFlight() async throws {
        let peaks = InFlightPeaks.shared
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let c = try NBDClient(socket: s.socketPath, export: "disk")
            var model = DiskModel(size: 1 << 20)
            var rng = SplitMix(seed: 10)
            var ops: [NBDClient.Op] = []
            var expected: [Int: [UInt8]] = [:]
            for i in 0..<600 {
                let len = Int.random(in: 1...8192, using: &rng)
                let off = UInt64.random(in: 0...((1 << 20) - UInt64(len)), using: &rng)
                if i % 2 == 0 {
                    let d = rng.bytes(len)
                    ops.append(.write(offset: off, data: d))
                    model.write(d, at: off)
                } else {
                    ops.append(.read(offset: off, count: len))
                    expected[i] = model.read(len, at: off)
                }
            }
            let got = try c.aioBatch(ops)
            for (i, want) in expected.sorted(by: { $0.key < $1.key }) {
                assertBytes(got[i] ?? [], want, "read op \(i)")
            }
            assertBytes(try c.pread(1 << 20, at: 0), model.bytes, "whole disk")
            c.close()
            let peak = try XCTUnwrap(peaks.peak(export: "disk"), "the server made no in-flight gauge")
            XCTAssertGreaterThanOrEqual(peak, 64, "requests the server held at once")
            XCTAssertLessThanOrEqual(peak, 128, "the per-connection limit (NBDConnectionHandler.maxInFlight)")
        }
    }

    // MARK: files and several clients

    func testFileBackedExportPersistsDataToTheFile() async throws {
        let path = NSTemporaryDirectory() + "virtnbd-it-\(getpid())-\(UUID().uuidString).img"
        defer { unlink(path) }
        let fileSize: UInt64 = 1 << 20
        let disk = try TestDisk(backend: try FileBackend(path: path, readOnly: false, createSize: fileSize))
        var model = DiskModel(size: Int(fileSize))
        var rng = SplitMix(seed: 7)
        let server = try await TestServer.start([.init(name: "file", disk: disk)])
        try await TestServer.with(server) { s in
            let c = try NBDClient(socket: s.socketPath, export: "file")
            XCTAssertEqual(try c.size, fileSize)
            for (off, len) in [(UInt64(0), 4096), (5000, 10_000), (fileSize - 333, 333), (300_000, 65_536)] {
                let d = rng.bytes(len)
                try c.pwrite(d, at: off)
                model.write(d, at: off)
            }
            try c.zero(1000, at: 6000)
            model.zero(1000, at: 6000)
            try c.flush()
            c.close()
        }
        // After shutdown, the bytes are in the file.
        let contents = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        assertBytes(contents, model.bytes, "file contents after shutdown")
    }

    func testTwoClientsSeeEachOthersFlushedWrites() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let a = try NBDClient(socket: s.socketPath, export: "disk")
            let b = try NBDClient(socket: s.socketPath, export: "disk")
            XCTAssertTrue(try a.flag("can_multi_conn", nbd_can_multi_conn(a.h)))
            var rng = SplitMix(seed: 8)
            for round in 0..<10 {
                let (w, r) = round % 2 == 0 ? (a, b) : (b, a)
                let off = UInt64(round) * 7777 + 13
                let d = rng.bytes(3000 + round)
                try w.pwrite(d, at: off)
                try w.flush()
                assertBytes(
                    try r.pread(d.count, at: off), d, "round \(round): the other client reads the flushed write")
            }
            // Concurrent batches from both clients on disjoint halves.
            let da = rng.bytes(200_000)
            let db = rng.bytes(200_000)
            _ = try a.aioBatch([.write(offset: 0, data: da)])
            _ = try b.aioBatch([.write(offset: 500_000, data: db)])
            try a.flush()
            try b.flush()
            assertBytes(try b.pread(200_000, at: 0), da, "b reads a's batch")
            assertBytes(try a.pread(200_000, at: 500_000), db, "a reads b's batch")
            a.close()
            b.close()
        }
    }

    func testDisconnectAndReconnectKeepsData() async throws {
        try await TestServer.with(try await TestServer.ram(size: 1 << 20)) { s in
            let d = SplitMix(seed: 9).bytesOf(10_000)
            do {
                let c = try NBDClient(socket: s.socketPath, export: "disk")
                try c.pwrite(d, at: 12_345)
                c.close()
            }
            let c2 = try NBDClient(socket: s.socketPath, export: "disk")
            assertBytes(try c2.pread(10_000, at: 12_345), d, "after reconnecting")
            c2.close()
        }
    }
}

extension SplitMix {
    func bytesOf(_ n: Int) -> [UInt8] {
        var g = self
        return g.bytes(n)
    }
}
