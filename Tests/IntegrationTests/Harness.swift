// In-process server + libnbd client plumbing for the integration tests.
// Disks are VirtioDisk's EmulatedDisk, built as the server builds its default export:
// backend → VirtioBlkEmulator → VirtioMMIOTransport → VirtioBlkDriver → BlockDevice → NBDExport.
import BlockLayer
import CNBD
import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix
import Synchronization
import TestSupport
import Virtio
import VirtioBlock
import VirtioDisk
import VirtioEmulator
import XCTest

/// One emulated virtio-blk disk.
final class TestDisk: @unchecked Sendable {
    let disk: EmulatedDisk
    var emulator: VirtioBlkEmulator { disk.emulator }
    var driver: VirtioBlkDriver { disk.driver }
    var device: BlockDevice { disk.device }
    private var stopped = false

    /// `completions`: `.caller` (the default) for disks an NBDServer serves, whose event loops reap
    /// the queues; `.threads` for a disk used without one (the handler tests' EmbeddedChannel).
    init(backend: BlockBackend, holes: [Range<UInt64>] = [], completions: CompletionDelivery = .caller) throws {
        var log = Logger(label: "test.disk")
        log.logLevel = .warning
        // As virtnbd runs it by default: a queue per event loop, one loop per core, each queue reaped by its loop.
        var o = DriverOptions()
        o.queues = System.coreCount
        o.completions = completions
        disk = try EmulatedDisk(
            backend: backend, holes: holes, discardReadsZero: !holes.isEmpty, options: o, logger: log)
    }

    static func ram(size: UInt64, readOnly: Bool = false, completions: CompletionDelivery = .caller) throws -> TestDisk
    {
        try TestDisk(backend: try RAMBackend(size: size, readOnly: readOnly), completions: completions)
    }

    func shutdown() {
        guard !stopped else { return }
        stopped = true
        disk.shutdown()
    }
}

/// A server on a fresh Unix socket with the given exports.
final class TestServer: @unchecked Sendable {
    static let counter = Atomic<Int>(0)
    let group: MultiThreadedEventLoopGroup
    let server: NBDServer
    let socketPath: String
    let disks: [TestDisk]
    private var stopped = false

    struct ExportSpec {
        var name: String
        var description = ""
        var disk: TestDisk
        var forceReadOnly = false
        var maximumPayload: UInt32 = 64 << 20
        /// Dirty bitmaps to offer as `qemu:dirty-bitmap:NAME` (a DirtyTracking layer over the disk).
        var bitmaps: [String] = []
    }

    private init(group: MultiThreadedEventLoopGroup, server: NBDServer, socketPath: String, disks: [TestDisk]) {
        self.group = group
        self.server = server
        self.socketPath = socketPath
        self.disks = disks
    }

    static func start(_ exports: [ExportSpec]) async throws -> TestServer {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        var log = Logger(label: "test.server")
        log.logLevel = .warning
        let nbdExports = try exports.map { e in
            var bitmaps: DirtyBitmaps?
            if !e.bitmaps.isEmpty {
                let b = try DirtyBitmaps(size: e.disk.device.size, file: nil, logger: log)
                for name in e.bitmaps { try b.add(name) }
                bitmaps = b
            }
            return NBDExport(
                name: e.name, description: e.description, device: e.disk.device, forceReadOnly: e.forceReadOnly,
                maximumPayload: e.maximumPayload,
                stack: bitmaps.map { DirtyTracking(over: e.disk.device, bitmaps: $0) },
                bitmaps: bitmaps)
        }
        let server = NBDServer(exports: nbdExports, group: group, logger: log)
        let n = counter.add(1, ordering: .relaxed).newValue
        let path = "/tmp/virtnbd-it-\(getpid())-\(n).sock"
        try await server.listen(.unix(path: path))
        return TestServer(group: group, server: server, socketPath: path, disks: exports.map(\.disk))
    }

    /// One RAM export named `name`.
    static func ram(size: UInt64 = 8 << 20, name: String = "disk", readOnly: Bool = false, forceReadOnly: Bool = false)
        async throws -> TestServer
    {
        let disk = try TestDisk.ram(size: size, readOnly: readOnly)
        return try await start([ExportSpec(name: name, disk: disk, forceReadOnly: forceReadOnly)])
    }

    func stop() async {
        guard !stopped else { return }
        stopped = true
        await server.shutdown()
        for d in disks { d.shutdown() }
        try? await group.shutdownGracefully()
        unlink(socketPath)
    }

    /// Runs `body` and always stops the server.
    static func with(_ server: TestServer, _ body: (TestServer) async throws -> Void) async throws {
        do { try await body(server) } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}

struct NBDFailure: Error, CustomStringConvertible {
    var call: String
    var errno: Int32
    var message: String
    var description: String { "\(call) failed: errno \(errno): \(message)" }
}

/// A libnbd handle. libnbd handles are thread-safe; the class only carries it around.
final class NBDClient: @unchecked Sendable {
    let h: OpaquePointer
    private var closed = false

    /// Connects to `export` on `socket`; `strict: false` turns off libnbd's client-side checks so
    /// that bad requests reach the server and the server's answer is what is tested.
    init(socket: String, export: String, strict: Bool = true) throws {
        guard let h = nbd_create() else {
            throw NBDFailure(call: "nbd_create", errno: nbd_get_errno(), message: Self.lastError)
        }
        self.h = h
        try check("nbd_set_export_name", nbd_set_export_name(h, export))
        try check("nbd_set_request_block_size", nbd_set_request_block_size(h, true))
        if !strict { try check("nbd_set_strict_mode", nbd_set_strict_mode(h, 0)) }
        do { try check("nbd_connect_unix", nbd_connect_unix(h, socket)) } catch {
            nbd_close(h)
            closed = true
            throw error
        }
    }

    deinit { close() }

    func close() {
        guard !closed else { return }
        closed = true
        _ = nbd_shutdown(h, 0)
        nbd_close(h)
    }

    static var lastError: String { nbd_get_error().map { String(cString: $0) } ?? "?" }

    @discardableResult
    func check<T: BinaryInteger>(_ call: String, _ r: T) throws -> T {
        if r < 0 { throw NBDFailure(call: call, errno: nbd_get_errno(), message: Self.lastError) }
        return r
    }

    var size: UInt64 { get throws { UInt64(try check("nbd_get_size", nbd_get_size(h))) } }
    func flag(_ name: String, _ r: Int32) throws -> Bool { try check(name, r) == 1 }

    func pread(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { p in _ = try check("nbd_pread", nbd_pread(h, p.baseAddress, count, offset, 0))
        }
        return out
    }

    func pwrite(_ data: [UInt8], at offset: UInt64, fua: Bool = false) throws {
        try data.withUnsafeBytes { p in
            _ = try check(
                "nbd_pwrite", nbd_pwrite(h, p.baseAddress, data.count, offset, fua ? UInt32(LIBNBD_CMD_FLAG_FUA) : 0))
        }
    }

    func flush() throws { try check("nbd_flush", nbd_flush(h, 0)) }
    func trim(_ count: UInt64, at offset: UInt64, fua: Bool = false) throws {
        try check("nbd_trim", nbd_trim(h, count, offset, fua ? UInt32(LIBNBD_CMD_FLAG_FUA) : 0))
    }
    func zero(_ count: UInt64, at offset: UInt64, noHole: Bool = false, fua: Bool = false) throws {
        var f: UInt32 = 0
        if noHole { f |= UInt32(LIBNBD_CMD_FLAG_NO_HOLE) }
        if fua { f |= UInt32(LIBNBD_CMD_FLAG_FUA) }
        try check("nbd_zero", nbd_zero(h, count, offset, f))
    }

    enum Op {
        case read(offset: UInt64, count: Int)
        case write(offset: UInt64, data: [UInt8])
    }

    /// Issues every op with the asynchronous API before waiting for any (they are all in flight
    /// together, in this order on the wire), then waits for all. Returns the data of each read
    /// (nil for writes). Throws if any op failed.
    func aioBatch(_ ops: [Op]) throws -> [[UInt8]?] {
        var buffers: [UnsafeMutableRawBufferPointer] = []
        defer { for b in buffers { b.deallocate() } }
        var cookies: [Int64] = []
        for op in ops {
            switch op {
            case .read(let off, let count):
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 16)
                buffers.append(b)
                cookies.append(
                    try check(
                        "nbd_aio_pread", nbd_aio_pread(h, b.baseAddress, count, off, nbd_completion_callback(), 0)))
            case .write(let off, let data):
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: max(data.count, 1), alignment: 16)
                data.withUnsafeBytes { b.copyMemory(from: $0) }
                buffers.append(b)
                cookies.append(
                    try check(
                        "nbd_aio_pwrite",
                        nbd_aio_pwrite(h, b.baseAddress, data.count, off, nbd_completion_callback(), 0)))
            }
        }
        let deadline = Date().addingTimeInterval(10)
        while try check("nbd_aio_in_flight", nbd_aio_in_flight(h)) > 0 {
            guard Date() < deadline else {
                throw NBDFailure(call: "aioBatch", errno: 0, message: "requests still in flight after 10 s")
            }
            try check("nbd_poll", nbd_poll(h, 1000))
        }
        var out: [[UInt8]?] = []
        for (i, op) in ops.enumerated() {
            let done = try check("nbd_aio_command_completed(op \(i))", nbd_aio_command_completed(h, UInt64(cookies[i])))
            guard done == 1 else { throw NBDFailure(call: "aioBatch", errno: 0, message: "op \(i) not completed") }
            if case .read(_, let count) = op {
                out.append(Array(UnsafeRawBufferPointer(rebasing: buffers[i][0..<count])))
            } else {
                out.append(nil)
            }
        }
        return out
    }
}

/// What the disk should contain.
struct DiskModel {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }
    mutating func write(_ data: [UInt8], at offset: UInt64) {
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
    }
    mutating func zero(_ count: UInt64, at offset: UInt64) {
        write([UInt8](repeating: 0, count: Int(count)), at: offset)
    }
    func read(_ count: Int, at offset: UInt64) -> [UInt8] { Array(bytes[Int(offset)..<Int(offset) + count]) }
}

func assertBytes(_ got: [UInt8], _ want: [UInt8], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    if !sameBytes(got, want) { XCTFail("\(what): \(firstDifference(got, want))", file: file, line: line) }
}

/// Asserts that `body` fails with the given errno.
func assertNBDError(
    _ errno: Int32, _ what: String, file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void
) {
    do {
        try body()
        XCTFail("\(what): succeeded, expected errno \(errno)", file: file, line: line)
    } catch let e as NBDFailure {
        XCTAssertEqual(e.errno, errno, "\(what): \(e)", file: file, line: line)
    } catch {
        XCTFail("\(what): \(error)", file: file, line: line)
    }
}
