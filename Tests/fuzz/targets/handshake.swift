import NIOCore

// libFuzzer entry: HandshakeStateMachine (Sources/NBDProtocol/Handshake.swift).
// Compiled by Scripts/fuzz together with Sources/NBDProtocol/*.swift as module NBDProtocol.
//
// Input layout:
//   byte 0   config: bits 0-1 TLS policy (0 off, 1 on, 2/3 require); bit 2 start in the
//            after-STARTTLS machine; bit 3 catalog with a unicode export and a huge size;
//            bit 4 compare against an unsplit feed (differential check, on by default below).
//   byte 1   chunking: bits 0-2 log2 of the largest chunk; the rest, with byte 2, a PRNG seed.
//   byte 2   seed (high)
//   rest     what the client sends, from the client flags on.
// The bytes are fed once in one piece and once split at pseudo-random points; both feeds must
// produce the same actions. On .startTLS the feed continues with HandshakeStateMachine(afterTLS:),
// as the server does. Invariants checked: nothing happens after close/startTransmission; option
// replies are well formed; with TLS required, nothing but ERR_TLS_REQD/ACK before TLS and never
// transmission; STARTTLS is never acknowledged with TLS off or already active.
#if FUZZ_REPLAY
    @testable import NBDProtocol
#endif

private let exportA = NBDExportInfo(
    name: "disk", description: "main", size: 1 << 20,
    flags: [.sendFlush, .sendFUA, .sendTrim, .sendDF],
    minimumBlockSize: 1, preferredBlockSize: 4096, maximumPayload: 32 << 20)
private let exportB = NBDExportInfo(
    name: "émoji-✓", description: "déscription ✓", size: UInt64.max,
    flags: [.readOnly], minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 1 << 25)
private let catalog1 = NBDExportCatalog([exportA])
private let catalog2 = NBDExportCatalog([exportA, exportB, NBDExportInfo(name: "", size: 4096, flags: [])])

private enum Outcome: Equatable {
    case send([UInt8])
    case close
    case start(NBDSession)
    case startTLS
}

private struct PRNG {
    var s: UInt64
    mutating func next() -> UInt64 {
        s ^= s << 13
        s ^= s >> 7
        s ^= s << 17
        return s
    }
}

private func check(_ cond: @autoclosure () -> Bool, _ msg: @autoclosure () -> String) {
    if !cond() { fatalError("handshake invariant violated: \(msg())") }
}

/// Feeds `bytes` in the given chunk sizes; returns the outcomes.
private func run(
    _ bytes: ArraySlice<UInt8>, policy: NBDTLSPolicy, afterTLS: Bool, catalog: NBDExportCatalog,
    chunks: (inout PRNG) -> Int, prng: inout PRNG
) -> [Outcome] {
    var sm = HandshakeStateMachine(catalog: catalog, tls: policy)
    var flagsDone = false
    if afterTLS {
        // The client flags have been read by the pre-TLS machine.
        var flags = ByteBuffer(bytes: [0, 0, 0, 3])
        check(sm.receive(&flags).isEmpty, "client flags alone produced actions")
        sm = HandshakeStateMachine(afterTLS: sm)
        flagsDone = true
    }
    _ = flagsDone
    var out: [Outcome] = []
    var acc = ByteBuffer()
    var pos = bytes.startIndex
    var done = false
    var feeds = 0
    while !done && pos <= bytes.endIndex {
        let n = min(chunks(&prng), bytes.endIndex - pos)
        acc.writeBytes(bytes[pos..<pos + n])
        pos += n
        feeds += 1
        // Repeat while the machine makes progress, like a channel handler does after a restart.
        while true {
            let before = acc.readerIndex
            let tlsBefore = sm.tlsActive
            let actions = sm.receive(&acc)
            check(acc.readerIndex >= before, "reader index moved backwards")
            var restart = false
            for (i, a) in actions.enumerated() {
                check(!done, "action after close/startTransmission: \(a)")
                switch a {
                case .send(let b):
                    let v = Array(b.readableBytesView)
                    if v.count >= 8, v.prefix(8) == [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9] {
                        check(v.count >= 20, "short option reply")
                        let len = Int(v[16]) << 24 | Int(v[17]) << 16 | Int(v[18]) << 8 | Int(v[19])
                        check(v.count == 20 + len, "option reply length \(len) but \(v.count - 20) bytes follow")
                        let type = UInt32(v[12]) << 24 | UInt32(v[13]) << 16 | UInt32(v[14]) << 8 | UInt32(v[15])
                        let opt = UInt32(v[8]) << 24 | UInt32(v[9]) << 16 | UInt32(v[10]) << 8 | UInt32(v[11])
                        if policy == .require && !tlsBefore {
                            check(
                                type == NBDReply.errTLSReqd || type == NBDReply.errTooBig
                                    || type == NBDReply.errInvalid && opt == NBDOption.startTLS.rawValue
                                    || type == NBDReply.ack
                                        && (opt == NBDOption.startTLS.rawValue || opt == NBDOption.abort.rawValue),
                                "reply type 0x\(String(type, radix: 16)) to option \(opt) before TLS with TLS required")
                        }
                        if type == NBDReply.ack && opt == NBDOption.startTLS.rawValue {
                            check(
                                policy != .off && !tlsBefore,
                                "STARTTLS acknowledged with policy \(policy), tlsActive \(tlsBefore)")
                        }
                    } else {
                        // Only NBD_OPT_EXPORT_NAME's reply lacks the magic: size, flags, maybe 124 zeroes.
                        check(v.count == 10 || v.count == 134, "send of \(v.count) bytes that is not an option reply")
                        check(i + 1 < actions.count, "export-name reply not followed by startTransmission")
                    }
                    out.append(.send(v))
                case .report(let fact):
                    // Only for a name no export has, and a reply (or the close) must follow.
                    check(fact.contains("which does not exist"), "report that is not an unknown export: \(fact)")
                    check(i + 1 < actions.count, "report not followed by the reply")
                case .close:
                    out.append(.close)
                    done = true
                case .startTransmission(let s):
                    check(!(policy == .require && !sm.tlsActive), "transmission without TLS although TLS is required")
                    check(catalog.exports.contains { $0.name == s.export.name }, "unknown export \(s.export.name)")
                    check(!s.extendedHeaders || s.structuredReplies, "extended headers without structured replies")
                    check(
                        s.structuredReplies || !s.export.flags.contains(.sendDF),
                        "DF offered without structured replies")
                    check(sm.isFinished, "transmission started but machine not finished")
                    out.append(.start(s))
                    done = true
                case .startTLS:
                    check(policy != .off && !tlsBefore, "startTLS with policy \(policy), tlsActive \(tlsBefore)")
                    check(i == actions.count - 1, "actions after startTLS")
                    check(sm.isFinished, "startTLS but machine not finished")
                    out.append(.startTLS)
                    restart = true
                }
            }
            if done { break }
            if restart {
                sm = HandshakeStateMachine(afterTLS: sm)
                check(sm.tlsActive && !sm.isFinished, "after-TLS machine state")
                continue
            }
            if sm.isFinished { break }
            if acc.readerIndex == before && actions.isEmpty { break }
        }
        if sm.isFinished && !done { break }
        if pos == bytes.endIndex { break }
        if feeds % 8 == 0 { acc.discardReadBytes() }
    }
    // A finished machine ignores further input.
    if sm.isFinished {
        var more = ByteBuffer(bytes: [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 3, 0, 0, 0, 0])
        check(sm.receive(&more).isEmpty, "finished machine produced actions")
    }
    return out
}

#if !FUZZ_REPLAY
    @_cdecl("LLVMFuzzerTestOneInput")
#endif
public func fuzzHandshake(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let cfg = bytes[0]
    let policy: NBDTLSPolicy = [.off, .on, .require, .require][Int(cfg & 3)]
    let afterTLS = cfg & 4 != 0 && policy != .off
    let catalog = cfg & 8 != 0 ? catalog2 : catalog1
    let maxChunk = 1 << Int(bytes[1] & 7)
    let seed = UInt64(bytes[1] >> 3) << 8 | UInt64(bytes[2]) | 0x9E37_79B9_0000_0000
    let body = bytes[3...]

    var p1 = PRNG(s: seed)
    let whole = run(body, policy: policy, afterTLS: afterTLS, catalog: catalog, chunks: { _ in Int.max }, prng: &p1)
    var p2 = PRNG(s: seed)
    let split = run(
        body, policy: policy, afterTLS: afterTLS, catalog: catalog,
        chunks: { p in Int(p.next() % UInt64(maxChunk + 1)) }, prng: &p2)
    if whole != split {
        fatalError("handshake: split feed differs from whole feed\nwhole: \(whole)\nsplit: \(split)")
    }
    return 0
}
