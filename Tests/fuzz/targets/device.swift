import Foundation
import Logging
import Virtio

// libFuzzer entry: the virtio-blk device side (Sources/VirtioEmulator), fed hostile shared memory.
// Compiled by Scripts/fuzz together with Sources/VirtioEmulator/*.swift as module VirtioEmulator,
// so the internal DeviceSplitQueue is reachable without @testable.
//
// Two modes, chosen by byte 0 bit 4:
//  * queue mode (synchronous): DeviceSplitQueue(init/pop/walk/pushUsed/publishUsed) directly on the
//    arena, checking that every walked segment lies inside memory and the byte counts add up.
//  * emulator mode: a real VirtioBlkEmulator, reset and configured through its virtio-mmio
//    registers for every input, kicked, and waited for until its device thread is idle again.
//    VirtioBlkEmulator.process is private and runs only on the device thread, so the harness
//    keeps three long-lived emulators (no thread per input) and detects "idle" by reading
//    /proc/self/task/<tid>/syscall: the device thread is idle when it is blocked in poll(2),
//    which happens only in EventFD.wait; every kick happens-before that check, and an eventfd
//    write makes the waiter runnable synchronously, so "blocked in poll" means "done".
//
// Input layout:
//   byte 0   bits 0-1 emulator (0: 64 KiB RAM; 1: 64 KiB file, completions published in reverse;
//            2: read-only RAM; 3: 8 KiB RAM, queues up to 256, DISCARD up to 8 sectors);
//            bit 2 device base 0x1_0000_0000 instead of 0; bit 3 queue addresses from the input;
//            bit 4 queue mode; bits 5-7 drop EVENT_IDX / FLUSH / DISCARD+WRITE_ZEROES from the
//            driver features
//   byte 1   queue size: bits 0-4 c; size = 1 << c for c < 16, else c (not a power of two);
//            bit 5 packed ring (VIRTIO_F_RING_PACKED); bit 6 indirect descriptors negotiated
//   if byte 0 bit 3: 3 × u64 little-endian: desc, avail (driver), used (device) addresses
//   rest     the arena image from offset 0 (the descriptor table sits at offset 0 by default,
//            then the avail ring, then the used ring; anything after is data)
#if FUZZ_REPLAY
    @testable import VirtioEmulator
#endif

#if canImport(Glibc)
    import Glibc
#endif

private let arenaSize = 64 << 10
private let backendSize: UInt64 = 64 << 10

private func check(_ cond: @autoclosure () -> Bool, _ msg: @autoclosure () -> String) {
    if !cond() { fatalError("device invariant violated: \(msg())") }
}

private final class Harness {
    let arenas: [SharedMemory]
    let backends: [BlockBackend]
    let emulators: [VirtioBlkEmulator]
    var attached: [Int] = [-1, -1, -1, -1]
    let deviceThreads: [String]
    let filePath: String

    init() {
        arenas = [
            try! SharedMemory(size: arenaSize, deviceBase: 0, name: "fuzz-arena0"),
            try! SharedMemory(size: arenaSize, deviceBase: 0x1_0000_0000, name: "fuzz-arena1"),
        ]
        let dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
        filePath = "\(dir)/virtnbd-fuzz-device.\(getpid()).img"
        unlink(filePath)
        let file = try! FileBackend(path: filePath, readOnly: false, createSize: backendSize)
        unlink(filePath) // the open fd keeps it alive; nothing is left behind
        backends = [
            try! RAMBackend(size: backendSize), file, try! RAMBackend(size: backendSize, readOnly: true),
            try! RAMBackend(size: 8192),
        ]
        let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        var reversed = EmulatorConfiguration()
        reversed.completionOrder = .reversed
        var small = EmulatorConfiguration()
        small.maxQueueSize = 256
        small.maxDiscardSectors = 8
        var configs = [EmulatorConfiguration(), reversed, EmulatorConfiguration(), small]
        for i in configs.indices { configs[i].queues = 1 } // one device thread each, watched below
        // Each emulator starts one device thread; find it as the task that appears with it (its
        // name "virtio-blk-emulator" is longer than the kernel's 15 bytes, so it never shows).
        func tasks() -> Set<String> {
            Set((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [])
        }
        var emus: [VirtioBlkEmulator] = []
        var threads: [String] = []
        for (b, c) in zip(backends, configs) {
            let before = tasks()
            emus.append(try! VirtioBlkEmulator(backend: b, configuration: c, logger: quiet))
            var new: Set<String> = []
            for _ in 0..<10_000 {
                new = tasks().subtracting(before)
                if new.count == 1 { break }
                usleep(1000)
            }
            guard new.count == 1 else { fatalError("cannot tell the emulator's device thread: new tasks \(new)") }
            threads.append("/proc/self/task/\(new.first!)/syscall")
        }
        emulators = emus
        deviceThreads = threads
        waitIdle()
    }

    /// True when the thread is blocked in poll(2) (x86_64 7 / ppoll 271; aarch64 has only ppoll, 73).
    private func blockedInPoll(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 8)
        let n = read(fd, &buf, 8)
        guard n > 0 else { return false }
        let s = buf.prefix(n)
        #if arch(x86_64)
            return s.starts(with: Array("7 ".utf8)) || s.starts(with: Array("271 ".utf8))
        #else
            return s.starts(with: Array("73 ".utf8))
        #endif
    }

    func waitIdle() {
        for t in deviceThreads {
            var spins = 0
            while !blockedInPoll(t) {
                spins += 1
                if spins > 16 { sched_yield() }
            }
        }
    }
}

nonisolated(unsafe) private var harness: Harness?
/// FUZZ_DEVICE_DEBUG=1: print each emulator's counters after every input (to check the harness).
private let debug = ProcessInfo.processInfo.environment["FUZZ_DEVICE_DEBUG"] == "1"

private struct Input {
    var bytes: [UInt8]
    var pos: Int
    mutating func u64() -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 where pos + i < bytes.count { v |= UInt64(bytes[pos + i]) << (8 * UInt64(i)) }
        pos += 8
        return v
    }
}

#if !FUZZ_REPLAY
    @_cdecl("LLVMFuzzerTestOneInput")
#endif
public func fuzzDevice(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 2 else { return 0 }
    if harness == nil { harness = Harness() }
    let h = harness!
    var input = Input(bytes: Array(UnsafeBufferPointer(start: data, count: size)), pos: 2)
    let sel = input.bytes[0]
    let code = Int(input.bytes[1] & 31)
    let qsize = code < 16 ? 1 << code : code
    let arenaIndex = Int(sel >> 2 & 1)
    let mem = h.arenas[arenaIndex]
    let base = mem.deviceBase
    var descAddr = base
    var availAddr = base + UInt64(16 * qsize)
    var usedAddr = (availAddr + UInt64(6 + 2 * qsize) + 3) & ~3
    if sel & 8 != 0 {
        descAddr = input.u64()
        availAddr = input.u64()
        usedAddr = input.u64()
    }
    var features: VirtioFeatures = [.version1, .eventIdx, .blkFlush, .blkDiscard, .blkWriteZeroes]
    if sel & 0x20 != 0 { features.remove(.eventIdx) }
    if sel & 0x40 != 0 { features.remove(.blkFlush) }
    if sel & 0x80 != 0 {
        features.remove(.blkDiscard)
        features.remove(.blkWriteZeroes)
    }
    let packed = input.bytes[1] & 0x20 != 0
    if packed { features.insert(.ringPacked) }
    if input.bytes[1] & 0x40 != 0 { features.insert(.indirectDesc) }
    if packed && sel & 8 == 0 {
        // Packed layout: descriptor ring, then the two 4-byte event suppression structures.
        availAddr = base + UInt64(16 * qsize)
        usedAddr = availAddr + 4
    }

    // The arena image.
    let image = input.pos < input.bytes.count ? Array(input.bytes[input.pos...].prefix(arenaSize)) : []
    mem.zero(0, count: arenaSize)
    mem.write(image, at: 0)

    if sel & 0x10 != 0 {
        queueMode(
            mem: mem, size: qsize, desc: descAddr, avail: availAddr, used: usedAddr,
            eventIndex: features.contains(.eventIdx),
            packed: packed, indirect: features.contains(.indirectDesc))
        return 0
    }

    let which = Int(sel & 3)
    let emu = h.emulators[which]
    let backend = h.backends[which]
    try! backend.discard(at: 0, count: backend.size) // no state carried between inputs
    if h.attached[which] != arenaIndex {
        try! emu.attachMemory(mem)
        h.attached[which] = arenaIndex
    }
    emu.write32(MMIORegister.status, 0)
    emu.write32(MMIORegister.status, 1)
    emu.write32(MMIORegister.status, 3)
    emu.write32(MMIORegister.driverFeaturesSel, 0)
    emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue))
    emu.write32(MMIORegister.driverFeaturesSel, 1)
    emu.write32(MMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features.rawValue >> 32))
    emu.write32(MMIORegister.status, 11)
    emu.write32(MMIORegister.queueSel, 0)
    emu.write32(MMIORegister.queueNum, UInt32(qsize))
    for (r, a) in [
        (MMIORegister.queueDescLow, descAddr), (MMIORegister.queueDriverLow, availAddr),
        (MMIORegister.queueDeviceLow, usedAddr),
    ] {
        emu.write32(r, UInt32(truncatingIfNeeded: a))
        emu.write32(r + 4, UInt32(truncatingIfNeeded: a >> 32))
    }
    emu.write32(MMIORegister.queueReady, 1)
    let ready = emu.read32(MMIORegister.queueReady) == 1
    let expectReady =
        packed
        ? PackedRingLayout.isValidSize(qsize) && qsize <= (which == 3 ? 256 : 32768)
            && descAddr % 16 == 0 && availAddr % 4 == 0 && usedAddr % 4 == 0
            && mem.offset(ofDeviceAddress: descAddr, length: 16 * qsize) != nil
            && mem.offset(ofDeviceAddress: availAddr, length: 4) != nil
            && mem.offset(ofDeviceAddress: usedAddr, length: 4) != nil
            // the device-written event area must not lie in the descriptor ring
            && !(usedAddr < descAddr &+ UInt64(16 * qsize) && descAddr < usedAddr &+ 4)
        : SplitRingLayout.isValidSize(qsize) && qsize <= (which == 3 ? 256 : 32768)
            && descAddr % 16 == 0 && availAddr % 2 == 0 && usedAddr % 4 == 0
            && mem.offset(ofDeviceAddress: descAddr, length: 16 * qsize) != nil
            && mem.offset(ofDeviceAddress: availAddr, length: 6 + 2 * qsize) != nil
            && mem.offset(ofDeviceAddress: usedAddr, length: 6 + 8 * qsize) != nil
            // the device-written used ring must not overlap the descriptor table or avail ring
            && !(usedAddr < descAddr &+ UInt64(16 * qsize) && descAddr < usedAddr &+ UInt64(6 + 8 * qsize))
            && !(usedAddr < availAddr &+ UInt64(6 + 2 * qsize) && availAddr < usedAddr &+ UInt64(6 + 8 * qsize))
    check(
        ready == expectReady,
        "queue ready \(ready), expected \(expectReady) (size \(qsize) desc 0x\(String(descAddr, radix: 16)) avail 0x\(String(availAddr, radix: 16)) used 0x\(String(usedAddr, radix: 16)))"
    )
    emu.write32(MMIORegister.status, 15)
    emu.write32(MMIORegister.queueNotify, 0)
    h.waitIdle()
    if debug {
        print("emulator \(which) ready=\(ready) status=\(emu.read32(MMIORegister.status)): \(emu.stats.summary)")
    }
    // Leave the device reset and idle for the next input.
    emu.write32(MMIORegister.status, 0)
    h.waitIdle()
    emu.interrupt.drain()
    return 0
}

/// A device queue (split or packed) alone, on the caller's thread.
private func queueMode(
    mem: SharedMemory, size: Int, desc: UInt64, avail: UInt64, used: UInt64, eventIndex: Bool, packed: Bool,
    indirect: Bool
) {
    let made: (any DeviceVirtqueue)? =
        packed
        ? DevicePackedQueue(mem: mem, size: size, descAddr: desc, driverAddr: avail, deviceAddr: used)
        : DeviceSplitQueue(mem: mem, size: size, descAddr: desc, driverAddr: avail, deviceAddr: used)
    guard let q = made else { return }
    q.eventIndex = eventIndex
    q.indirect = indirect
    var chain = DescriptorChain()
    var pending = 0
    var pops = 0
    while pops < 70_000 {
        do { guard try q.pop(into: &chain) else { break } } catch { break }
        pops += 1
        let ok = chain.fault == nil
        check(Int(chain.head) < max(size, 1) || packed, "chain id \(chain.head) outside a split queue of \(size)")
        check(chain.ringSlots >= 1 && chain.ringSlots <= size, "chain takes \(chain.ringSlots) ring slots of \(size)")
        var r = 0
        var w = 0
        for s in chain.readable {
            check(
                s.offset >= 0 && s.length >= 0 && s.offset <= mem.size - s.length,
                "readable segment \(s) outside memory")
            r += s.length
        }
        for s in chain.writable {
            check(
                s.offset >= 0 && s.length >= 0 && s.offset <= mem.size - s.length,
                "writable segment \(s) outside memory")
            w += s.length
        }
        check(
            r == chain.readableBytes && w == chain.writableBytes,
            "byte counts \(chain.readableBytes)/\(chain.writableBytes) vs segments \(r)/\(w)")
        // An indirect table holds at most (its length / 16) entries; without one a chain fits the ring.
        check(
            indirect || chain.readable.count + chain.writable.count <= size,
            "chain of \(chain.readable.count + chain.writable.count) descriptors in a queue of \(size)")
        if ok { check(UInt64(r) + UInt64(w) <= UInt64(UInt32.max), "accepted chain of \(r + w) bytes") }
        // Touch every byte the device may use, as the request code would.
        for s in chain.readable where s.length > 0 {
            _ = mem.load8(s.offset)
            _ = mem.load8(s.offset + s.length - 1)
        }
        for s in chain.writable where s.length > 0 { mem.store8(s.offset + s.length - 1, 0xEE) }
        q.pushUsed(id: chain.head, ringSlots: chain.ringSlots, length: UInt32(truncatingIfNeeded: w))
        pending += 1
        if pending >= 64 {
            _ = q.publishUsed()
            pending = 0
        }
    }
    _ = q.publishUsed()
    q.setNotifications(enabled: true)
    _ = q.hasAvailable
}
