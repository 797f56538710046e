// An export's dirty bitmaps: which chunks were written since each bitmap was created or last
// cleared, for incremental backup through the `qemu:dirty-bitmap:NAME` meta context.
//
// Order of events for every write, trim and zeroing (`begin` … `end`):
//   1. `begin` marks its chunks in every active bitmap and, for a file export, writes the changed
//      words to IMAGE.bitmaps, before the request goes to the device;
//   2. the device runs it;
//   3. `end` runs before the reply is sent.
// So an acknowledged write is always in the bitmap, on disk too once the kernel has the page.
//
// Checkpoints (`clear NAME`, optionally `freezing: OLD`): under the lock, the bits move to a new
// frozen bitmap OLD (or are dropped) and NAME starts empty; every write that begins after that
// is in the new epoch. The clear then waits for the writes that began before it (they are in
// OLD) to finish, and only then answers: every write acknowledged before the answer is in OLD,
// every write acknowledged after it began after the clear, so it is in NAME. A second clear
// of NAME while one waits is refused (`busy`).
//
// Unclean stops: the file records the host's boot id and "open". Opened again after a stop
// that was not clean:
//   - same boot id: only the server died (kill -9, a crash). Every mark reached the kernel's
//     page cache before its write went to the device, so the bitmaps are complete (they may
//     over-report writes that never reached the device) and are kept as they are;
//   - another boot id: the host went down, and page-cache writes of the image may have reached
//     the disk while the bitmap's did not. Active bitmaps are marked all dirty (the next backup
//     is a full one); frozen ones were synced when frozen and are kept.
import Foundation
import Logging
import Virtio
import VirtioBlock

public enum BitmapError: Error, Equatable, CustomStringConvertible {
    case badName(String, String)
    case exists(String)
    case noSuchBitmap(String, known: [String])
    case busy(String)
    case frozen(String)
    case badGranularity(UInt64)
    case persistence(path: String, String)
    case corrupt(path: String, String)
    case sizeMismatch(path: String, file: UInt64, export: UInt64)

    public var description: String {
        switch self {
        case .badName(let n, let why): return "bitmap name \(Self.quoted(n)) \(why)"
        case .exists(let n): return "a bitmap named \(Self.quoted(n)) already exists; choose another name or remove it"
        case .noSuchBitmap(let n, let known):
            return "no bitmap named \(Self.quoted(n)) (this export has: "
                + (known.isEmpty ? "none" : known.map(Self.quoted).joined(separator: ", ")) + ")"
        case .busy(let n):
            return
                "a clear of bitmap \(Self.quoted(n)) is in progress (waiting for writes begun before it); retry when it answers"
        case .frozen(let n):
            return "bitmap \(Self.quoted(n)) is frozen (a finished checkpoint); it cannot be cleared: remove it instead"
        case .badGranularity(let g):
            return "bitmap granularity \(g) is not a power of two from 4K to 2G; use e.g. 64K"
        case .persistence(let p, let why): return "bitmap file \(p): \(why)"
        case .corrupt(let p, let why):
            return "bitmap file \(p) is damaged (\(why)); move it away to start with no bitmaps"
        case .sizeMismatch(let p, let f, let e):
            return "bitmap file \(p) was made for a \(f)-byte image but the export is \(e) bytes; "
                + "restore the image's size or move the file away"
        }
    }

    static func quoted(_ s: String) -> String { "\"\(s.prefix(64))\(s.count > 64 ? "…" : "")\"" }
}

/// What `list` reports for one bitmap.
public struct BitmapInfo: Sendable, Equatable, Codable {
    public var name: String
    public var granularity: UInt64
    public var frozen: Bool
    public var dirtyBytes: UInt64
    public var persistent: Bool
}

/// What a bitmap file holds, read without a server and without changing it
/// (`virtnbd bitmap list --file IMAGE`): offline incremental backup starts here.
public struct BitmapFileReport: Sendable, Equatable, Codable {
    public enum State: String, Sendable, Codable {
        /// The last server closed it cleanly.
        case clean
        /// A server has it open, or stopped without closing it, on this boot: every mark of an
        /// acknowledged write reached the page cache, so the bitmaps are exact.
        case openOnThisBoot = "open-this-boot"
        /// Left open, and the host has rebooted since: a write may have reached the image
        /// without its mark. A server that opens it marks every active bitmap all dirty.
        case openOnAnotherBoot = "open-other-boot"
    }
    public struct Bitmap: Sendable, Equatable, Codable {
        public var info: BitmapInfo
        /// Whether its bits can be trusted as they stand (frozen bitmaps always can: no write
        /// marks them).
        public var consistent: Bool
    }
    public var path: String
    public var state: State
    /// The export size the file was made for.
    public var size: UInt64
    public var bitmaps: [Bitmap]
}

public final class DirtyBitmaps: Sendable {
    /// Reads IMAGE.bitmaps as it is (nil if there is none): for a stopped export, or beside a
    /// running one. Nothing is written.
    public static func inspect(file path: String) throws(BitmapError) -> BitmapFileReport? {
        guard let c = try BitmapFile.load(path) else { return nil }
        let state: BitmapFileReport.State =
            c.cleanlyClosed ? .clean : (c.bootID == BitmapFile.currentBootID() ? .openOnThisBoot : .openOnAnotherBoot)
        let bitmaps = c.bitmaps.map {
            BitmapFileReport.Bitmap(
                info: BitmapInfo(
                    name: $0.name, granularity: $0.granularity, frozen: $0.frozen, dirtyBytes: $0.dirtyBytes,
                    persistent: true),
                consistent: $0.frozen || state != .openOnAnotherBoot)
        }
        return BitmapFileReport(path: path, state: state, size: c.size, bitmaps: bitmaps)
    }

    public static let contextPrefix = "qemu:dirty-bitmap:"
    /// Meta context names are NBD strings, at most 4096 bytes ("Option haggling").
    public static let maximumNameBytes = 4096 - contextPrefix.utf8.count
    public static let defaultGranularity: UInt64 = 64 << 10

    private struct PendingClear {
        let epoch: UInt64
        let name: String
        let done: @Sendable (Result<Void, BitmapError>) -> Void
    }
    private struct State {
        var bitmaps: [DirtyBitmap] = []
        var file: BitmapFile?
        /// Writes begin in the current epoch; a clear starts a new one.
        var epoch: UInt64 = 0
        var inFlight: [UInt64: Int] = [:]
        var pending: [PendingClear] = []
    }
    private let state: Locked<State>
    public let size: UInt64
    public let persistent: Bool
    private let logger: Logger

    /// - Parameter file: IMAGE.bitmaps for a file export (loaded if it exists); nil keeps the
    ///   bitmaps in memory only (RAM and device exports).
    public init(size: UInt64, file: String?, logger: Logger) throws(BitmapError) {
        self.size = size
        self.logger = logger
        persistent = file != nil
        var s = State()
        if let path = file {
            var f = BitmapFile(path: path)
            if let c = try BitmapFile.load(path) {
                guard c.size == size else { throw .sizeMismatch(path: path, file: c.size, export: size) }
                s.bitmaps = c.bitmaps
                if !c.cleanlyClosed {
                    Self.recoverUnclean(&s.bitmaps, fileBoot: c.bootID, path: path, logger: logger)
                }
            }
            try f.rewrite(s.bitmaps, size: size, open: true)
            s.file = f
        }
        state = Locked(s)
    }

    private static func recoverUnclean(_ bitmaps: inout [DirtyBitmap], fileBoot: String, path: String, logger: Logger) {
        let active = bitmaps.filter { !$0.frozen }.map(\.name)
        guard !active.isEmpty else { return }
        if fileBoot == BitmapFile.currentBootID() {
            logger.notice(
                "bitmap file \(path) was not closed cleanly, on this boot: the server stopped but the host did not, so every mark reached the page cache; bitmaps kept"
            )
        } else {
            for i in bitmaps.indices where !bitmaps[i].frozen { bitmaps[i].markAll() }
            logger.warning(
                "bitmap file \(path) was not closed cleanly and the host has rebooted since: writes may have reached the image without their marks, so bitmaps \(active.joined(separator: ", ")) now report every block dirty (the next backup from them is a full one)"
            )
        }
    }

    public static func validate(name: String) throws(BitmapError) {
        if name.isEmpty { throw .badName(name, "is empty; give 1 to \(maximumNameBytes) bytes") }
        if name.utf8.count > maximumNameBytes {
            throw .badName(
                name,
                "is \(name.utf8.count) bytes; qemu:dirty-bitmap:NAME must fit an NBD string (4096 bytes), so at most \(maximumNameBytes)"
            )
        }
        if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
            throw .badName(name, "contains a control character")
        }
    }

    public static func validate(granularity g: UInt64) throws(BitmapError) {
        guard g.nonzeroBitCount == 1, g >= DirtyBitmap.minimumGranularity, g <= DirtyBitmap.maximumGranularity else {
            throw .badGranularity(g)
        }
    }

    // MARK: the data path

    /// Marks [offset, offset+length) dirty in every active bitmap, persisting the change first;
    /// returns the epoch to pass to `end` once the device has finished the request.
    public func begin(_ offset: UInt64, _ length: UInt64) -> Result<UInt64, BlkError> {
        state.withLock { s in
            for i in s.bitmaps.indices where !s.bitmaps[i].frozen {
                let changed = s.bitmaps[i].mark(offset, length)
                if !changed.isEmpty, let f = s.file {
                    do throws(BlkError) { try f.writeWords(s.bitmaps[i], changed) } catch {
                        // Not tracked durably: the write must not happen (a backup would miss it).
                        return .failure(error)
                    }
                }
            }
            s.inFlight[s.epoch, default: 0] += 1
            return .success(s.epoch)
        }
    }

    public func end(_ epoch: UInt64) {
        let ready: [PendingClear] = state.withLock { s in
            s.inFlight[epoch]! -= 1
            if s.inFlight[epoch] == 0 { s.inFlight[epoch] = nil }
            return Self.takeReady(&s)
        }
        for p in ready { p.done(.success(())) }
    }

    /// Clears whose earlier writes have all finished.
    private static func takeReady(_ s: inout State) -> [PendingClear] {
        let oldest = s.inFlight.keys.min() ?? UInt64.max
        let ready = s.pending.filter { $0.epoch <= oldest }
        s.pending.removeAll { $0.epoch <= oldest }
        return ready
    }

    // MARK: queries

    public var names: [String] { state.withLock { $0.bitmaps.map(\.name) } }

    /// The meta context names this export offers, in creation order.
    public var contextNames: [String] { names.map { Self.contextPrefix + $0 } }

    /// Runs over [start, end) for `qemu:dirty-bitmap:NAME` (flag 1 = dirty); nil if there is no such bitmap.
    public func runs(_ name: String, _ start: UInt64, _ end: UInt64) -> [(start: UInt64, end: UInt64, flags: UInt32)]? {
        state.withLock { s in
            guard let m = s.bitmaps.first(where: { $0.name == name }) else { return nil }
            return m.runs(start, end).map { ($0.start, $0.end, $0.dirty ? 1 : 0) }
        }
    }

    public func list() -> [BitmapInfo] {
        state.withLock { s in
            s.bitmaps.map {
                BitmapInfo(
                    name: $0.name, granularity: $0.granularity, frozen: $0.frozen, dirtyBytes: $0.dirtyBytes,
                    persistent: s.file != nil)
            }
        }
    }

    /// A copy of one bitmap (tests, `list`).
    public func bitmap(_ name: String) -> DirtyBitmap? { state.withLock { s in s.bitmaps.first { $0.name == name } } }

    // MARK: changes

    /// Adds an empty bitmap that records from now on.
    public func add(_ name: String, granularity: UInt64 = defaultGranularity) throws(BitmapError) {
        try Self.validate(name: name)
        try Self.validate(granularity: granularity)
        try change { s throws(BitmapError) in
            guard !s.bitmaps.contains(where: { $0.name == name }) else { throw .exists(name) }
            s.bitmaps.append(DirtyBitmap(name: name, granularity: granularity, size: size))
        }
    }

    /// Adds the bitmaps that do not exist yet (`--bitmap` at start); existing ones keep their bits.
    public func ensure(_ names: [String], granularity: UInt64) throws(BitmapError) {
        for n in names where !self.names.contains(n) { try add(n, granularity: granularity) }
    }

    public func remove(_ name: String) throws(BitmapError) {
        try change { s throws(BitmapError) in
            guard let i = s.bitmaps.firstIndex(where: { $0.name == name }) else {
                throw .noSuchBitmap(name, known: s.bitmaps.map(\.name))
            }
            if s.pending.contains(where: { $0.name == name }) { throw .busy(name) }
            s.bitmaps.remove(at: i)
        }
    }

    /// Starts a new epoch of `name`: its bits move to a new frozen bitmap `freezing` (or are
    /// dropped), and `done` runs once every write begun before the clear has finished.
    public func clear(
        _ name: String, freezing: String? = nil, _ done: @escaping @Sendable (Result<Void, BitmapError>) -> Void
    ) {
        let result: Result<Bool, BitmapError> = state.withLock { s in
            do throws(BitmapError) {
                guard let i = s.bitmaps.firstIndex(where: { $0.name == name }) else {
                    throw .noSuchBitmap(name, known: s.bitmaps.map(\.name))
                }
                if s.bitmaps[i].frozen { throw .frozen(name) }
                if s.pending.contains(where: { $0.name == name }) { throw .busy(name) }
                if let f = freezing {
                    try Self.validate(name: f)
                    if s.bitmaps.contains(where: { $0.name == f }) { throw .exists(f) }
                }
                let before = s.bitmaps
                var old = s.bitmaps[i]
                s.bitmaps[i].clearAll()
                if let f = freezing {
                    old.name = f
                    old.frozen = true
                    s.bitmaps.append(old)
                }
                if var file = s.file {
                    do throws(BitmapError) { try file.rewrite(s.bitmaps, size: size, open: true) } catch {
                        s.bitmaps = before
                        throw error
                    }
                    s.file = file
                }
                s.epoch += 1
                guard s.inFlight.keys.contains(where: { $0 < s.epoch }) else { return .success(true) }
                s.pending.append(PendingClear(epoch: s.epoch, name: name, done: done))
                return .success(false)
            } catch {
                return .failure(error)
            }
        }
        switch result {
        case .success(true): done(.success(()))
        case .success(false): break
        case .failure(let e): done(.failure(e))
        }
    }

    /// Runs `body` on the state and persists the result; nothing changes if either fails.
    private func change(_ body: (inout State) throws(BitmapError) -> Void) throws(BitmapError) {
        let result: Result<Void, BitmapError> = state.withLock { s in
            var next = s
            do throws(BitmapError) {
                try body(&next)
                if var file = next.file {
                    try file.rewrite(next.bitmaps, size: size, open: true)
                    next.file = file
                }
            } catch {
                return .failure(error)
            }
            s = next
            return .success(())
        }
        try result.get()
    }

    /// Writes the bitmaps out marked as closed cleanly (at a graceful stop).
    public func close() {
        state.withLock { s in
            guard var f = s.file else { return }
            do {
                try f.rewrite(s.bitmaps, size: size, open: false)
            } catch {
                logger.error("cannot save the dirty bitmaps: \(error); they will be treated as after a crash")
            }
            f.close()
            s.file = nil
        }
    }
}
