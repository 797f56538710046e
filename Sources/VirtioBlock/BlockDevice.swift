// Byte-addressed block operations over the virtio-blk driver: what an NBD export calls.
//
// Every data transfer is split into 4 KiB-aligned virtio requests of up to
// `driver.maxPagesPerRequest` pages. A write that does not cover whole 4 KiB blocks is
// read-modify-written: the edge blocks are read, merged with the new bytes, and written back,
// all while its blocks are held exclusively in `locks`, so overlapping requests never tear.
//
// The export's byte size need not be a multiple of 4 KiB. Its last block is then partial: it is
// read and read-modify-written like any edge block, and the driver stops the device request at
// the capacity (in whole sectors), so no request goes past the device's end. Bytes of that
// block past the export's end are never handed out.
import NIOCore
import Virtio

public final class BlockDevice: Sendable {
    public static let block: UInt64 = 4096
    public let driver: VirtioBlkDriver
    public let locks = RangeLocks()
    /// The export's byte size at start (`init`'s `size`, else the device capacity), exactly.
    public let exportSize: UInt64
    /// The size at start, or less if the device has since shrunk (growth needs a restart: the
    /// allocation map and every client's view of the size were made for the old size).
    public var size: UInt64 { min(exportSize, driver.capacityBytes) }
    public var geometry: BlkGeometry { driver.geometry }

    public typealias ReadCompletion = @Sendable (Result<ByteBuffer, BlkError>) -> Void
    public typealias Completion = @Sendable (Result<Void, BlkError>) -> Void

    /// What the server knows about zeroes and holes (NBD base:allocation).
    public let allocation: AllocationMap
    /// Whether a completed DISCARD reads back as zeroes (true for the emulator's RAM and file backends).
    public let discardReadsZero: Bool

    /// - Parameters:
    ///   - size: the export's byte size, at most the device capacity (the default): a device
    ///     whose capacity is rounded up to whole sectors (the emulator's) is told its real end here.
    ///   - initial: the state of every block at start (`.holeZero` for a fresh RAM disk).
    ///   - holes: ranges known to be holes that read as zero at start (a file's holes).
    public init(
        driver: VirtioBlkDriver, size: UInt64? = nil, initial: Allocation = .data, holes: [Range<UInt64>] = [],
        discardReadsZero: Bool = false
    ) {
        self.driver = driver
        self.discardReadsZero = discardReadsZero
        let size = min(size ?? driver.geometry.capacityBytes, driver.geometry.capacityBytes)
        exportSize = size
        allocation = AllocationMap(size: size, initial: initial)
        for h in holes {
            // Whole blocks only, except that a hole reaching the end takes the partial last block.
            let lo = Self.up(h.lowerBound)
            let hi = h.upperBound >= size ? size : Self.down(h.upperBound)
            allocation.set(lo, hi, .holeZero)
        }
    }

    @inline(__always) public static func down(_ x: UInt64) -> UInt64 { x & ~(block - 1) }
    @inline(__always) public static func up(_ x: UInt64) -> UInt64 { (x + block - 1) & ~(block - 1) }
    /// The block boundary at or below `end`, or the end of the partial last block when `end` is the
    /// export's end: the whole blocks a trim or zeroing of [_, end) may cover.
    @inline(__always) private func blockEnd(_ end: UInt64) -> UInt64 { end == size ? Self.up(end) : Self.down(end) }

    func checkRange(_ offset: UInt64, _ length: UInt64) -> BlkError? {
        let (end, o) = offset.addingReportingOverflow(length)
        if o || end > size { return .outOfRange(offset: offset, length: length, size: size) }
        return nil
    }

    // MARK: read

    /// Reads `length` bytes at `offset` into a new buffer.
    public func read(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator = .init(), _ done: @escaping ReadCompletion
    ) {
        if let e = checkRange(offset, UInt64(length)) { return done(.failure(e)) }
        if length == 0 { return done(.success(allocator.buffer(capacity: 0))) }
        let lo = Self.down(offset)
        let hi = Self.up(offset + UInt64(length))
        if let token = locks.tryAcquire(lo, hi, exclusive: false) {
            let pages = Int((hi - lo) / Self.block)
            if pages <= driver.maxPagesPerRequest {
                // One device request, whose completion does the rest: one closure for the whole READ.
                return driver.submit(.read(sector: lo / 512, pages: pages)) { r in
                    self.locks.release(token)
                    done(r.map { Self.copied($0, from: lo, range: offset, length, allocator) })
                }
            }
            return readLocked(offset: offset, length: length, allocator: allocator) { r in
                self.locks.release(token)
                done(r)
            }
        }
        locks.acquire(lo, hi, exclusive: false) { token in
            self.readLocked(offset: offset, length: length, allocator: allocator) { r in
                self.locks.release(token)
                done(r)
            }
        }
    }

    /// The bytes [offset, offset+length) of one device request's pages (from disk offset `lo`),
    /// copied into a new buffer.
    private static func copied(
        _ io: IOPages, from lo: UInt64, range offset: UInt64, _ length: Int, _ allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var buf = allocator.buffer(capacity: length)
        buf.moveWriterIndex(to: length)
        let pages = Int((up(offset + UInt64(length)) - lo) / block)
        copyOut(io, pages: pages, from: lo, range: offset, length, into: &buf)
        return buf
    }

    /// One piece of a sparse read.
    public enum Extent: Sendable {
        case data(offset: UInt64, ByteBuffer)
        /// Known to read as zero: no device I/O was done for it.
        case zero(offset: UInt64, length: UInt64)
    }

    /// Reads [offset, offset+length) as data and known-zero extents, in order. Known-zero ranges
    /// cost no device I/O.
    public func readExtents(
        offset: UInt64, length: Int, allocator: ByteBufferAllocator = .init(),
        _ done: @escaping @Sendable (Result<[Extent], BlkError>) -> Void
    ) {
        if let e = checkRange(offset, UInt64(length)) { return done(.failure(e)) }
        if length == 0 { return done(.success([])) }
        let lo = Self.down(offset)
        let hi = Self.up(offset + UInt64(length))
        if let token = locks.tryAcquire(lo, hi, exclusive: false) {
            readExtentsHeld(token, offset: offset, length: length, allocator: allocator, done)
        } else {
            locks.acquire(lo, hi, exclusive: false) { token in
                self.readExtentsHeld(token, offset: offset, length: length, allocator: allocator, done)
            }
        }
    }

    /// `readExtents` once its range lock (`token`) is held.
    private func readExtentsHeld(
        _ token: Int, offset: UInt64, length: Int, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<[Extent], BlkError>) -> Void
    ) {
        let end = offset + UInt64(length)
        // The common case, all data: one read, no bookkeeping for pieces.
        if self.allocation.isAllData(Self.down(offset), Self.up(end)) {
            let lo = Self.down(offset)
            let pages = Int((Self.up(end) - lo) / Self.block)
            if pages <= driver.maxPagesPerRequest {
                // One device request (every 4 KiB read), whose completion does the rest.
                return driver.submit(.read(sector: lo / 512, pages: pages)) { r in
                    self.locks.release(token)
                    done(r.map { [.data(offset: offset, Self.copied($0, from: lo, range: offset, length, allocator))] })
                }
            }
            self.readLocked(offset: offset, length: length, allocator: allocator) { r in
                self.locks.release(token)
                done(r.map { [.data(offset: offset, $0)] })
            }
            return
        }
        // Coalesce into alternating data / zero pieces clipped to the request.
        var pieces: [(UInt64, UInt64, Bool)] = []
        for r in self.allocation.extents(Self.down(offset), Self.up(end)) {
            let a = max(r.start, offset)
            let b = min(r.end, end)
            guard a < b else { continue }
            let zero = r.state.readsAsZero
            if let last = pieces.last, last.2 == zero {
                pieces[pieces.count - 1].1 = b
            } else {
                pieces.append((a, b, zero))
            }
        }
        let parts = Locked<[Extent?]>(Array(repeating: nil, count: pieces.count))
        let join = Aggregate(buffer: ByteBuffer(), remaining: pieces.count)
        let finish: @Sendable (BlkError?) -> Void = { err in
            guard let r = join.finish(err) else { return }
            self.locks.release(token)
            switch r {
            case .failure(let e): done(.failure(e))
            case .success: done(.success(parts.withLock { $0.map { $0! } }))
            }
        }
        for (i, p) in pieces.enumerated() {
            if p.2 {
                parts.withLock { $0[i] = .zero(offset: p.0, length: p.1 - p.0) }
                finish(nil)
            } else {
                self.readLocked(offset: p.0, length: Int(p.1 - p.0), allocator: allocator) { r in
                    switch r {
                    case .success(let b):
                        parts.withLock { $0[i] = .data(offset: p.0, b) }
                        finish(nil)
                    case .failure(let e): finish(e)
                    }
                }
            }
        }
    }

    /// Reads with the range already held.
    func readLocked(offset: UInt64, length: Int, allocator: ByteBufferAllocator, _ done: @escaping ReadCompletion) {
        let lo = Self.down(offset)
        let hi = Self.up(offset + UInt64(length))
        let pagesTotal = Int((hi - lo) / Self.block)
        let per = driver.maxPagesPerRequest
        if pagesTotal <= per {
            // One device request (every 4 KiB read): the buffer is made and filled in its
            // completion and handed on, with no shared join state.
            driver.submit(.read(sector: lo / 512, pages: pagesTotal)) { r in
                done(r.map { Self.copied($0, from: lo, range: offset, length, allocator) })
            }
            return
        }
        let chunks = (pagesTotal + per - 1) / per
        var buf = allocator.buffer(capacity: length)
        buf.moveWriterIndex(to: length)
        let op = Aggregate(buffer: buf, remaining: chunks)
        for c in 0..<chunks {
            let firstPage = c * per
            let n = min(per, pagesTotal - firstPage)
            let chunkLo = lo + UInt64(firstPage) * Self.block
            driver.submit(.read(sector: chunkLo / 512, pages: n)) { r in
                switch r {
                case .success(let io):
                    op.withBuffer { b in Self.copyOut(io, pages: n, from: chunkLo, range: offset, length, into: &b) }
                    if let result = op.finish(nil) { done(result) }
                case .failure(let e):
                    if let result = op.finish(e) { done(result) }
                }
            }
        }
    }

    /// Copies the part of `pages` device pages, starting at disk offset `chunkLo`, that lies in
    /// [offset, offset+length) into `buffer`, which holds that range from its index 0.
    private static func copyOut(
        _ io: IOPages, pages: Int, from chunkLo: UInt64, range offset: UInt64, _ length: Int,
        into buffer: inout ByteBuffer
    ) {
        for i in 0..<pages {
            let pageLo = chunkLo + UInt64(i) * block
            let from = max(pageLo, offset)
            let to = min(pageLo + block, offset + UInt64(length))
            if from >= to { continue }
            io.memory.copyOut(
                io.offset(ofPage: i) + Int(from - pageLo), count: Int(to - from), into: &buffer, at: Int(from - offset))
        }
    }

    // MARK: write

    /// Writes the readable bytes of `data` at `offset`; with `fua`, they are on stable storage when `done` runs.
    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, _ done: @escaping Completion) {
        guard !geometry.readOnly else { return done(.failure(.readOnly)) }
        let length = UInt64(data.readableBytes)
        if let e = checkRange(offset, length) { return done(.failure(e)) }
        if length == 0 { return done(.success(())) }
        let lo = Self.down(offset)
        let hi = Self.up(offset + length)
        if let token = locks.tryAcquire(lo, hi, exclusive: true) {
            if offset == lo && offset + length == hi {
                // Whole blocks (every aligned write): the device request's completion finishes
                // the write itself, one closure fewer per request.
                return writeBlocks(
                    lo: lo, hi: hi, data: data, dataOffset: offset, head: nil, tail: nil, release: token, fua: fua, done
                )
            }
            writeLocked(offset: offset, data: data) { r in self.finishWrite(r, fua: fua, token: token, done) }
        } else {
            locks.acquire(lo, hi, exclusive: true) { token in
                self.writeLocked(offset: offset, data: data) { r in self.finishWrite(r, fua: fua, token: token, done) }
            }
        }
    }

    private func finishWrite(_ r: Result<Void, BlkError>, fua: Bool, token: Int, _ done: @escaping Completion) {
        locks.release(token)
        guard fua, case .success = r else { return done(r) }
        flush(done) // virtio-blk has no FUA bit: write, then flush (§5.2.6.1)
    }

    /// Writes with the range already held; reads the edge blocks first when unaligned.
    func writeLocked(offset: UInt64, data: ByteBuffer, _ done: @escaping Completion) {
        let length = UInt64(data.readableBytes)
        let end = offset + length
        let lo = Self.down(offset)
        let hi = Self.up(end)
        let single = hi - lo == Self.block
        let needHead = offset > lo || end < lo + Self.block
        let needTail = !single && end < hi
        if !needHead && !needTail {
            return writeBlocks(lo: lo, hi: hi, data: data, dataOffset: offset, head: nil, tail: nil, done)
        }
        // Read-modify-write: fetch the partially covered edge blocks first.
        let tailLo = hi - Self.block
        let edges = Aggregate(buffer: ByteBuffer(), remaining: (needHead ? 1 : 0) + (needTail ? 1 : 0))
        let old = Locked<(head: ByteBuffer?, tail: ByteBuffer?)>((nil, nil))
        let edgeDone: @Sendable (Bool, Result<ByteBuffer, BlkError>) -> Void = { isHead, r in
            var err: BlkError?
            switch r {
            case .success(let b): old.withLock { if isHead { $0.head = b } else { $0.tail = b } }
            case .failure(let e): err = e
            }
            guard let all = edges.finish(err) else { return }
            switch all {
            case .failure(let e): done(.failure(e))
            case .success:
                let (h, t) = old.withLock { $0 }
                self.writeBlocks(lo: lo, hi: hi, data: data, dataOffset: offset, head: h, tail: single ? h : t, done)
            }
        }
        if needHead { readLocked(offset: lo, length: Int(Self.block), allocator: .init()) { edgeDone(true, $0) } }
        if needTail { readLocked(offset: tailLo, length: Int(Self.block), allocator: .init()) { edgeDone(false, $0) } }
    }

    /// Writes whole blocks [lo, hi): the new bytes of `data` (which start at `dataOffset`) over the
    /// old contents of the edge blocks `head` / `tail` where given.
    /// With `release`, it finishes the write too (`finishWrite`: the range lock, FUA's flush).
    private func writeBlocks(
        lo: UInt64, hi: UInt64, data: ByteBuffer, dataOffset: UInt64, head: ByteBuffer?, tail: ByteBuffer?,
        release token: Int? = nil, fua: Bool = false, _ done: @escaping Completion
    ) {
        let pagesTotal = Int((hi - lo) / Self.block)
        let per = driver.maxPagesPerRequest
        if pagesTotal <= per {
            // One device request (every write up to the request size): no join object.
            driver.submit(
                .write(sector: lo / 512, pages: pagesTotal),
                fill: { io in
                    Self.fill(
                        io, pages: pagesTotal, from: lo, blocks: lo, hi, data: data, at: dataOffset, head: head,
                        tail: tail)
                },
                done: { r in
                    // Written, or possibly partly written on failure: either way no longer known zero.
                    self.allocation.set(lo, hi, .data)
                    guard let token else { return done(r.map { _ in () }) }
                    self.finishWrite(r.map { _ in () }, fua: fua, token: token, done)
                })
            return
        }
        let chunks = (pagesTotal + per - 1) / per
        let op = Aggregate(buffer: ByteBuffer(), remaining: chunks)
        for c in 0..<chunks {
            let firstPage = c * per
            let n = min(per, pagesTotal - firstPage)
            let chunkLo = lo + UInt64(firstPage) * Self.block
            driver.submit(
                .write(sector: chunkLo / 512, pages: n),
                fill: { io in
                    Self.fill(
                        io, pages: n, from: chunkLo, blocks: lo, hi, data: data, at: dataOffset, head: head, tail: tail)
                },
                done: { r in
                    let err: BlkError? = { if case .failure(let e) = r { return e } else { return nil } }()
                    if let result = op.finish(err) {
                        // Written, or possibly partly written on failure: either way no longer known zero.
                        self.allocation.set(lo, hi, .data)
                        guard let token else { return done(result.map { _ in () }) }
                        self.finishWrite(result.map { _ in () }, fua: fua, token: token, done)
                    }
                })
        }
    }

    /// Fills `pages` device pages that hold disk blocks from `chunkLo` on, for a write of blocks
    /// [lo, hi): the old `head` / `tail` edge blocks first where given, then the bytes of `data`
    /// (which start at disk offset `dataOffset`) over them.
    private static func fill(
        _ io: IOPages, pages: Int, from chunkLo: UInt64, blocks lo: UInt64, _ hi: UInt64,
        data: ByteBuffer, at dataOffset: UInt64, head: ByteBuffer?, tail: ByteBuffer?
    ) {
        let dataEnd = dataOffset + UInt64(data.readableBytes)
        for i in 0..<pages {
            let pageLo = chunkLo + UInt64(i) * block
            let page = io.offset(ofPage: i)
            if pageLo == lo, let h = head { io.memory.copyIn(from: h, skip: 0, count: Int(block), to: page) }
            if pageLo == hi - block, let t = tail { io.memory.copyIn(from: t, skip: 0, count: Int(block), to: page) }
            let from = max(pageLo, dataOffset)
            let to = min(pageLo + block, dataEnd)
            if from < to {
                io.memory.copyIn(
                    from: data, skip: Int(from - dataOffset), count: Int(to - from), to: page + Int(from - pageLo))
            }
        }
    }

    // MARK: flush, trim, zero

    public func flush(_ done: @escaping Completion) {
        guard geometry.canFlush else { return done(.success(())) }
        driver.submit(.flush) { r in done(r.map { _ in () }) }
    }

    /// Discards the whole 4 KiB blocks inside [offset, offset+length), and the partial last block
    /// when the range reaches the export's end. Other partial blocks at the edges are left as they
    /// are: TRIM is advisory (NBD spec, NBD_CMD_TRIM).
    public func trim(offset: UInt64, length: UInt64, _ done: @escaping Completion) {
        guard !geometry.readOnly else { return done(.failure(.readOnly)) }
        if let e = checkRange(offset, length) { return done(.failure(e)) }
        let lo = Self.up(offset)
        let hi = blockEnd(offset + length)
        guard geometry.canDiscard, lo < hi else { return done(.success(())) }
        locks.acquire(lo, hi, exclusive: true) { token in
            self.sectorCommands(
                lo: lo, hi: hi, max: UInt64(self.geometry.maxDiscardSectors),
                make: { .discard(sector: $0, sectors: $1) }
            ) { r in
                // A failed discard may have taken effect in part: only a full success is recorded as zero.
                let ok: Bool = { if case .success = r { return true } else { return false } }()
                self.allocation.set(lo, hi, ok ? (self.discardReadsZero ? .holeZero : .hole) : .data)
                self.locks.release(token)
                done(r)
            }
        }
    }

    /// Writes zeroes over [offset, offset+length). `mayUnmap` lets the device deallocate (no NO_HOLE).
    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, _ done: @escaping Completion) {
        guard !geometry.readOnly else { return done(.failure(.readOnly)) }
        if let e = checkRange(offset, length) { return done(.failure(e)) }
        if length == 0 { return done(.success(())) }
        let end = offset + length
        let lo = Self.down(offset)
        let hi = Self.up(end)
        locks.acquire(lo, hi, exclusive: true) { token in
            let innerLo = Self.up(offset)
            let innerHi = self.blockEnd(end)
            var parts: [(UInt64, UInt64)] = [] // unaligned pieces written as zero bytes
            if innerLo >= innerHi {
                parts.append((offset, end))
            } else {
                if offset < innerLo { parts.append((offset, innerLo)) }
                if innerHi < end { parts.append((innerHi, end)) }
            }
            let useDevice = self.geometry.canWriteZeroes && innerLo < innerHi
            let join = Aggregate(buffer: ByteBuffer(), remaining: parts.count + (innerLo < innerHi ? 1 : 0))
            let finish: @Sendable (Result<Void, BlkError>) -> Void = { r in
                let err: BlkError? = { if case .failure(let e) = r { return e } else { return nil } }()
                if let result = join.finish(err) {
                    if innerLo < innerHi {
                        let ok: Bool = { if case .success = result { return true } else { return false } }()
                        let unmapped =
                            useDevice && mayUnmap && self.geometry.writeZeroesMayUnmap && self.discardReadsZero
                        self.allocation.set(innerLo, innerHi, ok ? (unmapped ? .holeZero : .zero) : .data)
                    }
                    self.finishWrite(result.map { _ in () }, fua: fua, token: token, done)
                }
            }
            for (a, b) in parts { self.writeLocked(offset: a, data: Self.zeroes(Int(b - a)), finish) }
            if innerLo < innerHi {
                if useDevice {
                    self.sectorCommands(
                        lo: innerLo, hi: innerHi, max: UInt64(self.geometry.maxWriteZeroesSectors),
                        make: {
                            .writeZeroes(sector: $0, sectors: $1, unmap: mayUnmap && self.geometry.writeZeroesMayUnmap)
                        }, finish)
                } else {
                    self.zeroByWriting(lo: innerLo, hi: innerHi, finish)
                }
            }
        }
    }

    private static func zeroes(_ n: Int) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeRepeatingByte(0, count: n)
        return b
    }

    /// Fallback when the device has no WRITE_ZEROES: write zero pages, 1 MiB at a time.
    private func zeroByWriting(lo: UInt64, hi: UInt64, _ done: @escaping Completion) {
        let step: UInt64 = 1 << 20
        let n = min(step, hi - lo)
        writeBlocks(lo: lo, hi: lo + n, data: Self.zeroes(Int(n)), dataOffset: lo, head: nil, tail: nil) { r in
            guard case .success = r, lo + n < hi else { return done(r) }
            self.zeroByWriting(lo: lo + n, hi: hi, done)
        }
    }

    /// Issues DISCARD / WRITE_ZEROES over [lo, hi) in pieces of at most `max` sectors, stopping at
    /// the device's capacity (a partial last block ends there, in whole sectors).
    private func sectorCommands(
        lo: UInt64, hi: UInt64, max: UInt64, make: @escaping @Sendable (UInt64, UInt32) -> BlkCommand,
        _ done: @escaping Completion
    ) {
        let maxBytes = Swift.max(Self.block, Swift.min(max, UInt64(UInt32.max)) * 512 & ~(Self.block - 1))
        let cap = driver.capacityBytes
        // Past the capacity (the device shrank): whole blocks, which the device refuses.
        let hi = lo < cap ? Swift.min(hi, cap) : hi
        let count = Int((hi - lo + maxBytes - 1) / maxBytes)
        let op = Aggregate(buffer: ByteBuffer(), remaining: count)
        var at = lo
        while at < hi {
            let n = Swift.min(maxBytes, hi - at)
            driver.submit(make(at / 512, UInt32(n / 512))) { r in
                let err: BlkError? = { if case .failure(let e) = r { return e } else { return nil } }()
                if let result = op.finish(err) { done(result.map { _ in () }) }
            }
            at += n
        }
    }
}

/// Joins the pieces of one operation: counts them down, keeps the first error, owns the result buffer.
final class Aggregate: Sendable {
    private struct S {
        var buffer: ByteBuffer
        var remaining: Int
        var error: BlkError?
    }
    private let s: Locked<S>
    init(buffer: ByteBuffer, remaining: Int) { s = Locked(S(buffer: buffer, remaining: remaining)) }
    func withBuffer(_ body: (inout ByteBuffer) -> Void) { s.withLock { body(&$0.buffer) } }
    /// Returns the final result when the last piece finishes, nil before.
    func finish(_ error: BlkError?) -> Result<ByteBuffer, BlkError>? {
        s.withLock { st in
            if st.error == nil, let e = error { st.error = e }
            st.remaining -= 1
            guard st.remaining == 0 else { return nil }
            if let e = st.error { return .failure(e) }
            return .success(st.buffer)
        }
    }
}
