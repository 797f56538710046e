// Held reads: a READ whose bytes the server sends from the DMA arena (see HeldPages.swift).
import NIOCore
import Synchronization
import Virtio

extension BlockDevice {
    /// What a READ answers with: bytes copied into a buffer, sparse extents, or bytes left in
    /// the arena's pages for the server to send from there.
    public enum ReadReply: Sendable {
        case data(ByteBuffer)
        case extents([Extent])
        case held(HeldRead)
    }

    /// A READ's `length` bytes, in order, as buffers lent from the arena pages the device wrote.
    /// The pages return to the pool when NIO has freed the last of them.
    public struct HeldRead: Sendable {
        public let length: Int
        public let buffers: [ByteBuffer]
    }

    /// The most bytes one connection should hold in READs not yet written to its socket: half a
    /// lane's pages, so that a client which stops reading cannot take every page of its lane.
    public var heldReadLimit: Int { driver.pagesPerLane * Int(Self.block) / 2 }

    /// Reads [offset, offset+length) and leaves the bytes in the arena (`.held`). With `sparse`,
    /// a range that is not all data is read as extents instead (`.extents`, as `readExtents`).
    public func readHeld(
        offset: UInt64, length: Int, sparse: Bool, allocator: ByteBufferAllocator,
        _ done: @escaping @Sendable (Result<ReadReply, BlkError>) -> Void
    ) {
        if let e = checkRange(offset, UInt64(length)) { return done(.failure(e)) }
        let lo = Self.down(offset)
        let hi = Self.up(offset + UInt64(length))
        if length == 0 || (sparse && !allocation.isAllData(lo, hi)) {
            // Holes or zeroes inside: the extent path (which re-checks under its range lock).
            if sparse {
                return readExtents(offset: offset, length: length, allocator: allocator) {
                    done($0.map { .extents($0) })
                }
            }
            return read(offset: offset, length: length, allocator: allocator) { done($0.map { .data($0) }) }
        }
        if let token = locks.tryAcquire(lo, hi, exclusive: false) {
            readHeldLocked(token, offset: offset, length: length, done)
        } else {
            locks.acquire(lo, hi, exclusive: false) { token in
                self.readHeldLocked(token, offset: offset, length: length, done)
            }
        }
    }

    private func readHeldLocked(
        _ token: Int, offset: UInt64, length: Int, _ done: @escaping @Sendable (Result<ReadReply, BlkError>) -> Void
    ) {
        let lo = Self.down(offset)
        let end = offset + UInt64(length)
        let pagesTotal = Int((Self.up(end) - lo) / Self.block)
        let per = driver.maxPagesPerRequest
        let chunks = (pagesTotal + per - 1) / per
        let join = HeldJoin(count: chunks)
        for c in 0..<chunks {
            let n = min(per, pagesTotal - c * per)
            let chunkLo = lo + UInt64(c * per) * Self.block
            driver.submitHeld(.read(sector: chunkLo / 512, pages: n)) { r in
                guard let all = join.finish(c, r) else { return }
                self.locks.release(token)
                switch all {
                case .failure(let e): done(.failure(e))
                case .success(let pieces):
                    var buffers: [ByteBuffer] = []
                    for (i, p) in pieces.enumerated() {
                        let cLo = lo + UInt64(i * per) * Self.block
                        let cHi = cLo + UInt64(p.io.pages.count) * Self.block
                        let from = max(offset, cLo)
                        let to = min(end, cHi)
                        p.lend(skip: Int(from - cLo), count: Int(to - from), into: &buffers)
                    }
                    done(.success(.held(HeldRead(length: length, buffers: buffers))))
                }
            }
        }
    }
}

/// The device requests of one held READ, joined: the last to finish gets every piece, or the
/// first error (the pieces that did arrive go back to the pool with the join).
final class HeldJoin: Sendable {
    private struct S {
        var pieces: [HeldPages?]
        var remaining: Int
        var error: BlkError?
    }
    private let s: Locked<S>
    init(count: Int) { s = Locked(S(pieces: Array(repeating: nil, count: count), remaining: count)) }

    func finish(_ i: Int, _ r: Result<HeldPages, BlkError>) -> Result<[HeldPages], BlkError>? {
        s.withLock { st in
            switch r {
            case .success(let p): st.pieces[i] = p
            case .failure(let e): if st.error == nil { st.error = e }
            }
            st.remaining -= 1
            guard st.remaining == 0 else { return nil }
            if let e = st.error { return .failure(e) }
            return .success(st.pieces.map { $0! })
        }
    }
}
