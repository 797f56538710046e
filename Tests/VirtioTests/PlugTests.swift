// Plugging (VirtioBlkDriver.plug/unplug): requests issued while plugged reach the device with one
// doorbell at the unplug, and nothing is lost or completed early. Run on the synchronous device
// (the emulator inline, completions reaped by the caller), so "completed" is exact, not timed.
import NIOCore
import TestSupport
import Virtio
import VirtioBlock
import XCTest

final class PlugTests: XCTestCase {
    func testPluggedRequestsGoOutWithOneDoorbellAtTheUnplug() throws {
        let dev = try SynchronousDevice(size: 1 << 20)
        defer { dev.shutdown() }
        let done = Locked<[Int]>([])
        let kicks0 = dev.driver.stats.kicks.load(ordering: .relaxed)
        dev.driver.plug()
        for i in 0..<5 {
            let data = ByteBuffer(repeating: UInt8(i + 1), count: 4096)
            dev.device.write(offset: UInt64(i) * 8192, data: data, fua: false) { r in
                if case .success = r { done.withLock { $0.append(i) } }
            }
        }
        XCTAssertEqual(done.withLock { $0 }, [], "plugged: the device has not been told yet")
        XCTAssertEqual(dev.driver.stats.kicks.load(ordering: .relaxed), kicks0, "no doorbell while plugged")
        dev.driver.unplug()
        XCTAssertEqual(done.withLock { $0 }, [0, 1, 2, 3, 4], "all five, in order, by the time unplug returns")
        XCTAssertEqual(dev.driver.stats.kicks.load(ordering: .relaxed), kicks0 + 1, "one doorbell for five requests")
        for i in 0..<5 {
            let got = Locked<[UInt8]>([])
            dev.device.read(offset: UInt64(i) * 8192, length: 4096) { r in
                if case .success(let b) = r { got.withLock { $0 = Array(b.readableBytesView) } }
            }
            XCTAssertEqual(got.withLock { $0 }, [UInt8](repeating: UInt8(i + 1), count: 4096), "block \(i)")
        }
    }

    func testNestedPlugsRingOnceAtTheOuterUnplug() throws {
        let dev = try SynchronousDevice(size: 1 << 20)
        defer { dev.shutdown() }
        let count = Locked(0)
        dev.driver.plug()
        dev.driver.plug()
        dev.device.flush { _ in count.withLock { $0 += 1 } }
        dev.driver.unplug()
        XCTAssertEqual(count.withLock { $0 }, 0, "an inner unplug does not ring")
        dev.driver.unplug()
        XCTAssertEqual(count.withLock { $0 }, 1)
    }

    func testAnUnplugWithNothingIssuedRingsNothing() throws {
        let dev = try SynchronousDevice(size: 1 << 20)
        defer { dev.shutdown() }
        let kicks0 = dev.driver.stats.kicks.load(ordering: .relaxed)
        dev.driver.plug()
        dev.driver.unplug()
        XCTAssertEqual(dev.driver.stats.kicks.load(ordering: .relaxed), kicks0)
    }
}
