// `--snapshot`: writes, trims and zeroes go to a private overlay, at 4 KiB blocks; reads merge
// the overlay over the device. The device below is never written, so the overlay is dropped at
// exit and the image is as it was (qemu-nbd -s, nbdkit's cow filter).
//
// The overlay's bytes live in RAM (`.ram`), or for large writes in a temporary file
// (`.file(directory:)`, `--snapshot-overlay file`): a sparse file the export's size, block i at
// offset i·4096, unlinked as soon as it is open so that nothing is left behind even after
// kill -9. Only the map of which blocks are overlaid stays in RAM.
//
// Because the device never changes, a partial-block write can read its block's old contents
// from the device without holding anything: if another write put the block in the overlay
// meanwhile, its bytes are merged over the overlay's copy instead, under the lock.
import Foundation
import NIOCore
import Virtio
import VirtioBlock

public final class SnapshotOverlay: BlockLayer {
    public static let block: UInt64 = 4096
    public let inner: BlockLayer
    public func plug() { inner.plug() }
    public func unplug() { inner.unplug() }

    /// Where overlaid bytes are kept.
    public enum Storage: Sendable, Equatable {
        case ram
        /// A temporary file in this directory (unlinked at once).
        case file(directory: String)
    }

    enum Slot {
        /// The block's bytes (always 4096; past the export's end they are never handed out).
        case data([UInt8])
        /// The block's bytes are in the overlay file, at its own offset.
        case stored
        /// Trimmed or zeroed: reads as zero.
        case zero
    }
    /// The map and, with a file, the file itself (every file access is under this lock).
    private struct State {
        var blocks: [UInt64: Slot] = [:]
        var file: FileHandle?
    }
    private let state: Locked<State>

    /// Why the overlay file cannot be made.
    public struct StorageError: Error, CustomStringConvertible {
        public let directory: String
        public let why: String
        public var description: String {
            "cannot create the snapshot overlay file in \(directory): \(why); make it writable, choose another place (TMPDIR), or use --snapshot-overlay ram"
        }
    }

    public init(over inner: BlockLayer, storage: Storage = .ram) throws(StorageError) {
        self.inner = inner
        var s = State()
        if case .file(let dir) = storage {
            let path = (dir as NSString).appendingPathComponent(".virtnbd-snapshot-\(UUID().uuidString)")
            guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600])
            else { throw StorageError(directory: dir, why: "creating \(path) failed") }
            defer { try? FileManager.default.removeItem(atPath: path) }
            guard let h = FileHandle(forUpdatingAtPath: path) else {
                throw StorageError(directory: dir, why: "opening \(path) failed")
            }
            do { try h.truncate(atOffset: inner.size) } catch {
                throw StorageError(directory: dir, why: "\(error)")
            }
            s.file = h
        }
        state = Locked(s)
    }

    deinit { try? state.withLock { $0.file }?.close() }

    /// Where the overlay keeps its bytes.
    public var storage: String { state.withLock { $0.file == nil ? "ram" : "file" } }

    public var size: UInt64 { inner.size }
    /// Writable even over a read-only device; flush and FUA have nothing to make durable.
    public var capabilities: BlockCapabilities {
        BlockCapabilities(readOnly: false, canFlush: true, canTrim: true, canFastZero: true)
    }

    /// Bytes held by the overlay.
    public var overlayBytes: UInt64 { state.withLock { UInt64($0.blocks.count) * Self.block } }

    private func slots(_ lo: UInt64, _ hi: UInt64) -> [(UInt64, Slot)] {
        state.withLock { s in
            let b = s.blocks
            if b.isEmpty { return [] }
            if hi - lo < UInt64(b.count) {
                return (lo..<hi).compactMap { i in b[i].map { (i, $0) } }
            }
            return b.filter { $0.key >= lo && $0.key < hi }.map { ($0.key, $0.value) }
        }
    }

    private func blockRange(_ offset: UInt64, _ length: UInt64) -> (UInt64, UInt64) {
        (offset / Self.block, (offset + length + Self.block - 1) / Self.block)
    }

    // MARK: reads

    public func read(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator, _ done: @escaping BlockDevice.ReadCompletion
    ) {
        let (lo, hi) = blockRange(offset, UInt64(length))
        let overlaid = slots(lo, hi).count
        if overlaid == 0 {
            return inner.read(offset: offset, length: length, allocator: allocator, done)
        }
        if overlaid == Int(hi - lo) {
            // Every block is in the overlay: the device is not read at all (nor, for a RAM or
            // memfd device, are its pages made resident by the read).
            var buf = allocator.buffer(capacity: length)
            buf.writeRepeatingByte(0, count: length)
            do throws(BlkError) { try merge(into: &buf, at: offset, lo, hi) } catch { return done(.failure(error)) }
            return done(.success(buf))
        }
        inner.read(offset: offset, length: length, allocator: allocator) { r in
            guard case .success(var buf) = r else { return done(r) }
            // The overlay as it is now, over what the device holds.
            do throws(BlkError) { try self.merge(into: &buf, at: offset, lo, hi) } catch {
                return done(.failure(error))
            }
            done(.success(buf))
        }
    }

    /// Copies the overlay's blocks in [lo, hi) over `buf` (bytes from `offset`); with a file,
    /// a run of consecutive stored blocks is one read.
    private func merge(into buf: inout ByteBuffer, at offset: UInt64, _ lo: UInt64, _ hi: UInt64) throws(BlkError) {
        let end = offset + UInt64(buf.readableBytes)
        let failure: BlkError? = state.withLock { s in
            var i = lo
            while i < hi {
                guard let slot = s.blocks[i] else {
                    i += 1
                    continue
                }
                guard case .stored = slot, let f = s.file else {
                    Self.patch(&buf, at: offset, block: i, slot)
                    i += 1
                    continue
                }
                var j = i + 1
                while j < hi, case .stored = s.blocks[j] { j += 1 }
                let a = max(i * Self.block, offset)
                let b = min(j * Self.block, end)
                switch Self.readFile(f, a, Int(b - a)) {
                case .failure(let e): return e
                case .success(let bytes): buf.setBytes(bytes, at: buf.readerIndex + Int(a - offset))
                }
                i = j
            }
            return nil
        }
        if let failure { throw failure }
    }

    private static func readFile(_ f: FileHandle, _ at: UInt64, _ n: Int) -> Result<[UInt8], BlkError> {
        do {
            try f.seek(toOffset: at)
            var bytes = [UInt8](try f.read(upToCount: n) ?? Data())
            // A hole past the file's written end reads short: it is zero.
            if bytes.count < n { bytes += Array(repeating: 0, count: n - bytes.count) }
            return .success(bytes)
        } catch {
            return .failure(.layerStorage(LayerStorageFailure(.snapshotOverlay, .read, bytes: n, at: at, error: error)))
        }
    }

    private static func writeFile(_ f: FileHandle, _ at: UInt64, _ bytes: [UInt8]) throws(BlkError) {
        do {
            try f.seek(toOffset: at)
            try f.write(contentsOf: bytes)
        } catch {
            throw .layerStorage(LayerStorageFailure(.snapshotOverlay, .write, bytes: bytes.count, at: at, error: error))
        }
    }

    /// Copies the part of overlay block `i` inside the buffer (which holds bytes from `offset`).
    private static func patch(_ buf: inout ByteBuffer, at offset: UInt64, block i: UInt64, _ slot: Slot) {
        let end = offset + UInt64(buf.readableBytes)
        let a = max(i * block, offset)
        let b = min((i + 1) * block, end)
        guard a < b else { return }
        let at = buf.readerIndex + Int(a - offset)
        switch slot {
        case .data(let bytes):
            let from = Int(a - i * block)
            buf.setBytes(bytes[from..<from + Int(b - a)], at: at)
        case .zero:
            buf.setRepeatingByte(0, count: Int(b - a), at: at)
        case .stored:
            preconditionFailure("stored blocks are merged from the overlay file")
        }
    }

    public func readExtents(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<[BlockDevice.Extent], BlkError>) -> Void
    ) {
        let (lo, hi) = blockRange(offset, UInt64(length))
        if slots(lo, hi).isEmpty {
            return inner.readExtents(offset: offset, length: length, allocator: allocator, done)
        }
        read(offset: offset, length: length, allocator: allocator) { r in done(r.map { [.data(offset: offset, $0)] }) }
    }

    // MARK: writes

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, _ done: @escaping BlockDevice.Completion) {
        let length = UInt64(data.readableBytes)
        guard length > 0 else { return done(.success(())) }
        let end = offset + length
        let (lo, hi) = blockRange(offset, length)
        // Blocks the write covers only in part, not yet in the overlay: their old bytes come from the device.
        var partial: [UInt64] = []
        if offset % Self.block != 0 || end < lo * Self.block + Self.block { partial.append(lo) }
        if hi - 1 != lo && end % Self.block != 0 { partial.append(hi - 1) }
        let missing = state.withLock { s in partial.filter { s.blocks[$0] == nil } }
        if missing.isEmpty {
            return done(Result { () throws(BlkError) in try apply(offset: offset, data: data, base: [:]) })
        }
        let base = Locked<[UInt64: [UInt8]]>([:])
        let left = Locked(missing.count)
        for i in missing {
            let start = i * Self.block
            let n = Int(min(Self.block, size - start))
            inner.read(offset: start, length: n, allocator: .init()) { r in
                switch r {
                case .failure(let e):
                    if left.withLock({ l in
                        defer { l = -1 }
                        return l > 0
                    }) {
                        done(.failure(e))
                    }
                case .success(var b):
                    var bytes = b.readBytes(length: b.readableBytes) ?? []
                    bytes += Array(repeating: 0, count: Int(Self.block) - bytes.count)
                    base.withLock { $0[i] = bytes }
                    let last = left.withLock { l in
                        guard l > 0 else { return false }
                        l -= 1
                        return l == 0
                    }
                    if last {
                        done(
                            Result { () throws(BlkError) in
                                try self.apply(offset: offset, data: data, base: base.withLock { $0 })
                            })
                    }
                }
            }
        }
    }

    /// Puts the bytes of `data` (at `offset`) into the overlay; a block not in the overlay and not
    /// wholly covered starts from `base` (its device contents).
    private func apply(offset: UInt64, data: ByteBuffer, base: [UInt64: [UInt8]]) throws(BlkError) {
        let end = offset + UInt64(data.readableBytes)
        let (lo, hi) = blockRange(offset, UInt64(data.readableBytes))
        let failure: BlkError? = state.withLock { s in
            if let f = s.file {
                do throws(BlkError) { try Self.store(&s, f, offset: offset, data: data, base: base) } catch {
                    return error
                }
                return nil
            }
            for i in lo..<hi {
                let bs = i * Self.block
                let a = max(bs, offset)
                let e = min(bs + Self.block, end)
                var bytes: [UInt8]
                if a == bs && e == bs + Self.block {
                    bytes = []
                } else {
                    switch s.blocks[i] {
                    case .data(let old): bytes = old
                    case .zero, .stored: bytes = Array(repeating: 0, count: Int(Self.block))
                    case nil: bytes = base[i] ?? Array(repeating: 0, count: Int(Self.block))
                    }
                }
                let piece = data.getBytes(at: data.readerIndex + Int(a - offset), length: Int(e - a)) ?? []
                if bytes.isEmpty {
                    bytes = piece
                } else {
                    bytes.replaceSubrange(Int(a - bs)..<Int(e - bs), with: piece)
                }
                s.blocks[i] = .data(bytes)
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// The file overlay's write: edge blocks not yet stored get their old bytes first, then the
    /// data goes in with one write at its own offset.
    private static func store(
        _ s: inout State, _ f: FileHandle, offset: UInt64, data: ByteBuffer, base: [UInt64: [UInt8]]
    ) throws(BlkError) {
        let end = offset + UInt64(data.readableBytes)
        let lo = offset / block
        let hi = (end + block - 1) / block
        let zero = [UInt8](repeating: 0, count: Int(block))
        for i in Set([lo, hi - 1]) {
            let bs = i * block
            if bs >= offset && bs + block <= end { continue }
            switch s.blocks[i] {
            case .stored: continue
            case .data(let old): try writeFile(f, bs, old)
            case .zero: try writeFile(f, bs, zero)
            case nil: try writeFile(f, bs, base[i] ?? zero)
            }
        }
        try writeFile(f, offset, Array(data.readableBytesView))
        for i in lo..<hi { s.blocks[i] = .stored }
    }

    public func flush(_ done: @escaping BlockDevice.Completion) { done(.success(())) }

    /// Whole blocks inside the range (or reaching the export's end) read as zero from now on.
    public func trim(offset: UInt64, length: UInt64, _ done: @escaping BlockDevice.Completion) {
        zeroWholeBlocks(offset, length)
        done(.success(()))
    }

    public func writeZeroes(
        offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, _ done: @escaping BlockDevice.Completion
    ) {
        guard length > 0 else { return done(.success(())) }
        let (inner0, inner1) = zeroWholeBlocks(offset, length)
        // The unaligned edges are written as zero bytes.
        var edges: [(UInt64, UInt64)] = []
        if inner0 >= inner1 {
            edges.append((offset, offset + length))
        } else {
            if offset < inner0 { edges.append((offset, inner0)) }
            if inner1 < offset + length { edges.append((inner1, offset + length)) }
        }
        guard !edges.isEmpty else { return done(.success(())) }
        let left = Locked(edges.count)
        let failed = Locked<BlkError?>(nil)
        for (a, b) in edges {
            var z = ByteBuffer()
            z.writeRepeatingByte(0, count: Int(b - a))
            write(offset: a, data: z, fua: false) { r in
                if case .failure(let e) = r { failed.withLock { $0 = $0 ?? e } }
                if left.withLock({ l in
                    l -= 1
                    return l == 0
                }) {
                    done(failed.withLock { $0 }.map { .failure($0) } ?? .success(()))
                }
            }
        }
    }

    /// Marks the whole blocks in [offset, offset+length) zero (the partial last block of the
    /// export too, when the range reaches the end); returns that byte range.
    @discardableResult
    private func zeroWholeBlocks(_ offset: UInt64, _ length: UInt64) -> (UInt64, UInt64) {
        let end = offset + length
        let a = (offset + Self.block - 1) / Self.block
        let b = end >= size ? (size + Self.block - 1) / Self.block : end / Self.block
        guard a < b else { return (a * Self.block, a * Self.block) }
        state.withLock { s in for i in a..<b { s.blocks[i] = .zero } }
        return (a * Self.block, min(b * Self.block, size))
    }

    // MARK: block status

    /// The device's runs with the overlay painted over them: written blocks are data, trimmed
    /// and zeroed ones read as zero (hole and zero).
    public func allocationRuns(_ start: UInt64, _ end: UInt64) -> [AllocationMap.Run] {
        let base = inner.allocationRuns(start, end)
        let lo = start / Self.block
        let hi = (end + Self.block - 1) / Self.block
        let over = slots(lo, hi).sorted { $0.0 < $1.0 }
        guard !over.isEmpty else { return base }
        var paint: [AllocationMap.Run] = []
        for (i, slot) in over {
            let state: Allocation = { if case .zero = slot { return .holeZero } else { return .data } }()
            let a = max(i * Self.block, start)
            let b = min((i + 1) * Self.block, end, size)
            guard a < b else { continue }
            if let l = paint.last, l.end == a, l.state == state {
                paint[paint.count - 1].end = b
            } else {
                paint.append(AllocationMap.Run(start: a, end: b, state: state))
            }
        }
        return Self.paint(paint, over: base)
    }

    /// `qemu:allocation-depth`: blocks the overlay holds (written, trimmed or zeroed since the
    /// snapshot) are depth 1; the others are the device's: 2 where it holds data, 0 in its holes.
    public func allocationDepthRuns(_ start: UInt64, _ end: UInt64) -> [DepthRun] {
        let base = inner.allocationRuns(start, end).map {
            DepthRun(start: $0.start, end: $0.end, value: $0.state.isAllocated ? 2 : 0)
        }
        var top: [DepthRun] = []
        for (i, _) in slots(start / Self.block, (end + Self.block - 1) / Self.block).sorted(by: { $0.0 < $1.0 }) {
            let a = max(i * Self.block, start)
            let b = min((i + 1) * Self.block, end, size)
            guard a < b else { continue }
            if let l = top.last, l.end == a {
                top[top.count - 1].end = b
            } else {
                top.append(DepthRun(start: a, end: b, value: 1))
            }
        }
        return Self.paint(top, over: base)
    }
    public var allocationDepthOffered: Bool { true }

    /// `top` (disjoint, ascending) over `base` (consecutive, ascending), as consecutive runs.
    public static func paint(_ top: [AllocationMap.Run], over base: [AllocationMap.Run]) -> [AllocationMap.Run] {
        let spans = paint(
            top.map { ValueRun(start: $0.start, end: $0.end, value: $0.state) },
            over: base.map { ValueRun(start: $0.start, end: $0.end, value: $0.state) })
        return spans.map { AllocationMap.Run(start: $0.start, end: $0.end, state: $0.value) }
    }

    /// `top` (disjoint, ascending) over `base` (consecutive, ascending), as consecutive spans,
    /// neighbours of equal value merged.
    public static func paint<V>(_ top: [ValueRun<V>], over base: [ValueRun<V>]) -> [ValueRun<V>] {
        var out: [ValueRun<V>] = []
        func add(_ r: ValueRun<V>) {
            guard r.start < r.end else { return }
            if let l = out.last, l.end == r.start, l.value == r.value {
                out[out.count - 1].end = r.end
            } else {
                out.append(r)
            }
        }
        var t = 0
        for r in base {
            var at = r.start
            while at < r.end {
                while t < top.count && top[t].end <= at { t += 1 }
                if t < top.count && top[t].start <= at {
                    let e = min(top[t].end, r.end)
                    add(ValueRun(start: at, end: e, value: top[t].value))
                    at = e
                } else {
                    let e = t < top.count ? min(top[t].start, r.end) : r.end
                    add(ValueRun(start: at, end: e, value: r.value))
                    at = e
                }
            }
        }
        return out
    }
}
