import CVirtShim
import Foundation

extension Thread {
    /// A thread (not started) that carries `name` where operators look: top, perf and
    /// /proc/PID/task/TID/comm. Linux keeps 15 bytes of it. Foundation's `name`, set before
    /// `start()`, reaches only Foundation, so the thread names itself first.
    public static func named(_ name: String, _ body: @escaping @Sendable () -> Void) -> Thread {
        let short = String(decoding: name.utf8.prefix(15), as: UTF8.self)
        let t = Thread {
            _ = vshim_set_thread_name(short)
            body()
        }
        t.name = name
        return t
    }
}
