// Standard output and standard error. Foundation's `FileHandle.write(_: Data)` traps when the write
// fails (a reader that has gone away: EPIPE; a closed descriptor: EBADF), so every line virtnbd
// prints goes through here, where a failed write is reported to the caller instead.
import Foundation

enum Console {
    /// Writes `text` to stdout; returns why it could not, or nil when it was written.
    @discardableResult
    static func out(_ text: String) -> String? { write(text, to: .standardOutput) }

    /// Writes `text` to stdout as bytes (JSON).
    @discardableResult
    static func out(_ data: Data) -> String? { write(data, to: .standardOutput) }

    /// Writes `text` to stderr; a failure is ignored (there is nowhere left to say it).
    static func err(_ text: String) { _ = write(text, to: .standardError) }

    private static func write(_ text: String, to handle: FileHandle) -> String? {
        write(Data(text.utf8), to: handle)
    }

    private static func write(_ data: Data, to handle: FileHandle) -> String? {
        errno = 0
        do {
            try handle.write(contentsOf: data)
            return nil
        } catch {
            // Foundation wraps the OS's error (CocoaError 512); the errno it saw is the reason.
            let e = error as NSError
            let underlying = e.userInfo[NSUnderlyingErrorKey] as? NSError
            let code =
                e.domain == NSPOSIXErrorDomain
                ? Int32(e.code) : underlying?.domain == NSPOSIXErrorDomain ? Int32(underlying?.code ?? 0) : errno
            return code != 0 ? String(cString: strerror(code)) : "the write failed"
        }
    }
}
