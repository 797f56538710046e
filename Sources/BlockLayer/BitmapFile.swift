// Persistent dirty bitmaps for a file export: one file beside the image, IMAGE.bitmaps.
//
// Layout (little-endian):
//   0   "VNBDBMAP"          8 bytes
//   8   version (1)         u32
//   12  state               u32: 0 = closed cleanly, 1 = a server has it open
//   16  boot id             48 bytes, ASCII, zero padded: /proc/sys/kernel/random/boot_id of
//                           the host that last opened it
//   64  export size         u64
//   72  bitmap count        u32, then 4 bytes reserved
//   80  per bitmap: u32 name length, name (UTF-8), u64 granularity, u32 flags (bit 0 frozen),
//       u64 offset of its words, u64 word count
//   then each bitmap's words (u64), starting on a 4 KiB boundary.
//
// A change of the set (add, remove, clear, clean close) rewrites the whole file: a temporary
// file, fsync, rename over the old one, fsync of the directory. Marking a chunk dirty writes
// the one changed word in place, before the data write it covers is sent to the device: once a
// write is acknowledged its bit is at least in the host's page cache, so `kill -9` of the
// server cannot lose it (the kernel writes the page back), and only a host crash can.
import Foundation
import NIOCore
import VirtioBlock

struct BitmapFile {
    static let magic = Array("VNBDBMAP".utf8)
    static let version: UInt32 = 1

    struct Contents {
        var cleanlyClosed: Bool
        var bootID: String
        var size: UInt64
        var bitmaps: [DirtyBitmap]
    }

    let path: String
    /// Open on the current file, for marks.
    private var handle: FileHandle?
    /// Where each bitmap's words start in the current file, by name.
    private var wordOffsets: [String: UInt64] = [:]

    init(path: String) { self.path = path }

    /// The boot id of this host: equal across process restarts, new after every boot.
    static func currentBootID() -> String {
        let s = (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8)) ?? ""
        return s.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Reads the file; nil when there is none.
    static func load(_ path: String) throws(BitmapError) -> Contents? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw .persistence(path: path, "cannot be read")
        }
        var b = ByteBuffer(bytes: data)
        func bad(_ why: String) -> BitmapError { .corrupt(path: path, why) }
        guard b.readBytes(length: 8) == magic else { throw bad("it does not start with VNBDBMAP") }
        guard let v: UInt32 = b.readInteger(endianness: .little), v == version else {
            throw bad("unknown version")
        }
        guard let state: UInt32 = b.readInteger(endianness: .little),
            let boot = b.readBytes(length: 48), let size: UInt64 = b.readInteger(endianness: .little),
            let count: UInt32 = b.readInteger(endianness: .little), b.readInteger(endianness: .little) as UInt32? != nil
        else { throw bad("the header is truncated") }
        var bitmaps: [DirtyBitmap] = []
        for _ in 0..<count {
            guard let n: UInt32 = b.readInteger(endianness: .little), let name = b.readString(length: Int(n)),
                let g: UInt64 = b.readInteger(endianness: .little),
                let flags: UInt32 = b.readInteger(endianness: .little),
                let at: UInt64 = b.readInteger(endianness: .little), let wc: UInt64 = b.readInteger(endianness: .little)
            else { throw bad("the bitmap directory is truncated") }
            guard g.nonzeroBitCount == 1, g >= DirtyBitmap.minimumGranularity,
                Int(wc) == DirtyBitmap.wordCount(size: size, granularity: g)
            else { throw bad("bitmap \"\(name)\" has granularity \(g) and \(wc) words for \(size) bytes") }
            guard at + wc * 8 <= UInt64(data.count) else { throw bad("bitmap \"\(name)\" is truncated") }
            var words = b.getSlice(at: Int(at), length: Int(wc) * 8) ?? ByteBuffer()
            var ws: [UInt64] = []
            ws.reserveCapacity(Int(wc))
            while let w: UInt64 = words.readInteger(endianness: .little) { ws.append(w) }
            bitmaps.append(DirtyBitmap(name: name, granularity: g, size: size, frozen: flags & 1 == 1, words: ws))
        }
        let bootID = String(decoding: boot.prefix { $0 != 0 }, as: UTF8.self)
        return Contents(cleanlyClosed: state == 0, bootID: bootID, size: size, bitmaps: bitmaps)
    }

    /// Replaces the file with `bitmaps` (atomically) and reopens it for marks.
    mutating func rewrite(_ bitmaps: [DirtyBitmap], size: UInt64, open: Bool) throws(BitmapError) {
        var b = ByteBuffer()
        b.writeBytes(Self.magic)
        b.writeInteger(Self.version, endianness: .little)
        b.writeInteger(UInt32(open ? 1 : 0), endianness: .little)
        var boot = Array(Self.currentBootID().utf8.prefix(47))
        boot += Array(repeating: 0, count: 48 - boot.count)
        b.writeBytes(boot)
        b.writeInteger(size, endianness: .little)
        b.writeInteger(UInt32(bitmaps.count), endianness: .little)
        b.writeInteger(UInt32(0), endianness: .little)
        let directory = 80 + bitmaps.reduce(0) { $0 + 4 + $1.name.utf8.count + 8 + 4 + 8 + 8 }
        var at = UInt64((directory + 4095) & ~4095)
        var offsets: [String: UInt64] = [:]
        for m in bitmaps {
            b.writeInteger(UInt32(m.name.utf8.count), endianness: .little)
            b.writeString(m.name)
            b.writeInteger(m.granularity, endianness: .little)
            b.writeInteger(UInt32(m.frozen ? 1 : 0), endianness: .little)
            b.writeInteger(at, endianness: .little)
            b.writeInteger(UInt64(m.words.count), endianness: .little)
            offsets[m.name] = at
            at += UInt64((m.words.count * 8 + 4095) & ~4095)
        }
        for m in bitmaps {
            b.writeRepeatingByte(0, count: Int(offsets[m.name]!) - b.writerIndex)
            for w in m.words { b.writeInteger(w, endianness: .little) }
        }
        let tmp = path + ".tmp"
        handle = nil
        do {
            guard FileManager.default.createFile(atPath: tmp, contents: Data(b.readableBytesView)) else {
                throw BitmapError.persistence(path: tmp, "cannot be created")
            }
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: tmp))
            try h.synchronize()
            try h.close()
            guard rename(tmp, path) == 0 else {
                throw BitmapError.persistence(path: path, "rename failed: \(String(cString: strerror(errno)))")
            }
            Self.syncDirectory(of: path)
            if open { handle = try FileHandle(forUpdating: URL(fileURLWithPath: path)) }
        } catch let e as BitmapError {
            throw e
        } catch {
            throw .persistence(path: path, "\(error)")
        }
        wordOffsets = offsets
    }

    /// Writes words `indices` of `bitmap` in place (before the data write they cover).
    func writeWords(_ bitmap: DirtyBitmap, _ indices: [Int]) throws(BlkError) {
        guard let handle, let base = wordOffsets[bitmap.name] else { return }
        for i in indices {
            var b = ByteBuffer()
            b.writeInteger(bitmap.words[i], endianness: .little)
            let at = base + UInt64(i) * 8
            do {
                try handle.seek(toOffset: at)
                try handle.write(contentsOf: Data(b.readableBytesView))
            } catch {
                throw .layerStorage(
                    LayerStorageFailure(.bitmapFile(path: path), .write, bytes: 8, at: at, error: error))
            }
        }
    }

    mutating func close() {
        try? handle?.close()
        handle = nil
    }

    private static func syncDirectory(of path: String) {
        let dir = (path as NSString).deletingLastPathComponent
        let fd = open(dir.isEmpty ? "." : dir, O_RDONLY)
        guard fd >= 0 else { return }
        fsync(fd)
        Glibc.close(fd)
    }
}
