// Held READ pages: the zero-copy half of the read path.
//
// A READ issued with `submitHeld` keeps its I/O pages after it completes. Its bytes go to NIO as
// ByteBuffers lent from the arena (`SharedMemory.lend`), so the socket's writev copies them out
// of the pages the device wrote, with no copy in user space. When NIO has freed the last of those
// buffers, the pages return to the lane's pool and waiting requests launch (`deinit`).
import NIOCore
import Virtio

/// One completed device READ's pages, out of the lane's pool while it or a buffer lent from it lives.
public final class HeldPages: Sendable {
    public let io: IOPages
    let lane: VirtioBlkDriver.Lane
    /// Keeps the arena alive while lent buffers point into it.
    let driver: VirtioBlkDriver

    init(io: IOPages, lane: VirtioBlkDriver.Lane, driver: VirtioBlkDriver) {
        self.io = io
        self.lane = lane
        self.driver = driver
    }

    /// Bytes [skip, skip + count) of this request's data, as buffers lent from the arena: one per
    /// run of adjacent pages, in order.
    public func lend(skip: Int, count: Int, into out: inout [ByteBuffer]) {
        let page = VirtioBlkDriver.pageSize
        var at = skip
        let end = skip + count
        while at < end {
            let start = io.offset(ofPage: at / page) + at % page
            var n = min(end, (at / page + 1) * page) - at
            // Extend over the following pages while they are adjacent in the arena.
            while at + n < end, io.offset(ofPage: (at + n) / page) == start + n {
                n += min(end - (at + n), page)
            }
            out.append(io.memory.lend(start, count: n, to: self))
            at += n
        }
    }

    deinit { driver.giveBack(lane, io.pages) }
}
