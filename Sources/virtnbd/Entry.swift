import Dispatch

/// The process entry. `VirtNBD` is an async command; as an async `@main` it would end the main
/// thread in `dispatch_main()`, which calls `pthread_exit`, and valgrind (3.19, Debian 12) dies
/// right there, before any server starts — so no callgrind profile could be taken. Here the
/// main thread only waits while the command runs detached on the concurrency pool (nothing in
/// virtnbd runs on the main actor; signals are handled on a global queue, see Lifecycle.swift).
@main
enum Entry {
    static func main() {
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            await VirtNBD.runMain() // exits the process itself on errors and --help
            done.signal()
        }
        done.wait()
    }
}
