// The local side of `virtnbd copy`: a file, or stdin/stdout for "-".
import Foundation
import NIOCore

final class LocalFile {
    let path: String
    private let handle: FileHandle
    private let isStdio: Bool
    /// Regular files are written with seeks, leaving all-zero blocks as holes.
    private let regular: Bool
    /// The size of a regular file being read; nil for pipes and stdin.
    let size: UInt64?

    /// Opens (creating or truncating) a file to write, or stdout for "-".
    init(writing path: String) throws(CopyError) {
        self.path = path == "-" ? "stdout" : path
        if path == "-" {
            handle = .standardOutput
            isStdio = true
            regular = false
            size = nil
            return
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw .cannotOpen(path, reason: Self.errnoText(errno) + "; check the path and permissions")
        }
        handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        isStdio = false
        regular = Self.isRegular(path)
        size = nil
    }

    /// Opens a file to read, or stdin for "-".
    init(reading path: String) throws(CopyError) {
        self.path = path == "-" ? "stdin" : path
        if path == "-" {
            handle = .standardInput
            isStdio = true
            regular = false
            size = nil
            return
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .cannotOpen(path, reason: Self.errnoText(errno) + "; check the path") }
        handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        isStdio = false
        regular = Self.isRegular(path)
        let attrs = try? FileManager.default.attributesOfItem(atPath: path)
        size = regular ? ((attrs?[.size] as? NSNumber)?.uint64Value ?? (attrs?[.size] as? UInt64)) : nil
    }

    /// Up to `count` bytes (fewer only at end of input); nil at end of input.
    func read(_ count: Int) throws(CopyError) -> ByteBuffer? {
        var b = ByteBuffer()
        b.reserveCapacity(count)
        do {
            while b.readableBytes < count {
                guard let d = try handle.read(upToCount: count - b.readableBytes), !d.isEmpty else { break }
                b.writeBytes(d)
            }
        } catch {
            throw .io(path, reason: "read failed: \(error.localizedDescription)")
        }
        return b.readableBytes == 0 ? nil : b
    }

    /// Writes `data` at `offset`. Offsets arrive in order, so stdout and pipes work too.
    func write(_ data: ByteBuffer, at offset: UInt64) throws(CopyError) {
        do {
            if regular {
                if data.readableBytesView.allSatisfy({ $0 == 0 }) { return } // stays a hole; finish() sets the size
                try handle.seek(toOffset: offset)
            }
            try handle.write(contentsOf: Data(data.readableBytesView))
        } catch {
            throw .io(path, reason: "write failed: \(error.localizedDescription); is the disk full?")
        }
    }

    /// Sets a regular file's final size (covering trailing holes) and closes it.
    func finish(size: UInt64) throws(CopyError) {
        do {
            if regular { try handle.truncate(atOffset: size) }
            if !isStdio { try handle.close() }
        } catch {
            throw .io(path, reason: "cannot finish the file: \(error.localizedDescription)")
        }
    }

    private static func isRegular(_ path: String) -> Bool {
        (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeRegular
    }

    static func errnoText(_ e: Int32) -> String { String(cString: strerror(e)) }
}

/// A one-line progress bar on stderr, drawn at most ten times a second; silent when disabled.
final class ProgressBar {
    let enabled: Bool
    private var total: UInt64 = 0
    private var done: UInt64 = 0
    private var started = Date()
    private var lastDraw = Date.distantPast

    init(enabled: Bool) { self.enabled = enabled }

    func start(total: UInt64) {
        self.total = total
        started = Date()
        draw(force: true)
    }
    func advance(_ n: UInt64) {
        done += n
        draw(force: false)
    }
    func set(_ n: UInt64) {
        done = n
        draw(force: false)
    }
    func finish() {
        guard enabled else { return }
        done = max(done, total)
        draw(force: true)
        emit("\n")
    }
    func abandon() { if enabled { emit("\n") } }

    private func draw(force: Bool) {
        guard enabled else { return }
        let now = Date()
        guard force || now.timeIntervalSince(lastDraw) >= 0.1 else { return }
        lastDraw = now
        let fraction = total == 0 ? 1 : min(1, Double(done) / Double(total))
        let width = 30
        let filled = Int(fraction * Double(width))
        let mib = { (n: UInt64) in String(format: "%.1f", Double(n) / 1_048_576) }
        let elapsed = max(now.timeIntervalSince(started), 0.001)
        let rate = Double(done) / 1_048_576 / elapsed
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        let percent = String(format: "%3d%%", Int(fraction * 100))
        emit("\r\(percent) [\(bar)] \(mib(done))/\(mib(total)) MiB \(String(format: "%.0f", rate)) MiB/s ")
    }

    private func emit(_ s: String) { Console.err(s) }
}
