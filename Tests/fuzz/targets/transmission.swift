import NIOCore

// libFuzzer entry: TransmissionParser (Sources/NBDProtocol/Transmission.swift).
// Compiled by Scripts/fuzz together with Sources/NBDProtocol/*.swift as module NBDProtocol.
//
// Input layout:
//   byte 0   bit 0: extended headers (32-byte requests) instead of compact (28-byte);
//            bits 1-2: maximum payload (0, 1, 4096, 32 MiB);
//            bit 3: filtered BLOCK_STATUS offered (a payload of up to 16 bytes taken)
//   byte 1   chunking: bits 0-3 log2 of the largest chunk; the rest, with byte 2, a PRNG seed
//   byte 2   seed (high)
//   rest     the client's byte stream in the transmission phase
// The stream is parsed once whole and once split into chunks (as reads arrive); both must give
// the same events and the same error. Invariants: a WRITE's payload is exactly its length and at
// most the maximum payload; a BLOCK_STATUS carries one only when the filtered form is offered,
// exactly its length and at most the limit; other requests carry none; with extended headers
// PAYLOAD_LEN never reaches the handler.
#if FUZZ_REPLAY
    @testable import NBDProtocol
#endif

private enum Outcome: Equatable {
    case request(NBDRequest, payload: [UInt8]?)
    case rejected(NBDRequest, RequestRejection)
    case error(TransmissionError)
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
    if !cond() { fatalError("transmission invariant violated: \(msg())") }
}

private func run(
    _ bytes: ArraySlice<UInt8>, extended: Bool, maxPayload: Int, statusLimit: Int, maxChunk: Int?, seed: UInt64
) -> [Outcome] {
    var parser = TransmissionParser(
        maximumPayload: maxPayload, extendedHeaders: extended, blockStatusPayloadLimit: statusLimit)
    var prng = PRNG(s: seed)
    var acc = ByteBuffer()
    var out: [Outcome] = []
    var pos = bytes.startIndex
    var feeds = 0
    while true {
        let n = maxChunk.map { min(Int(prng.next() % UInt64($0 + 1)), bytes.endIndex - pos) } ?? (bytes.endIndex - pos)
        acc.writeBytes(bytes[pos..<pos + n])
        pos += n
        feeds += 1
        do {
            while let e = try parser.next(&acc) {
                switch e {
                case .request(let r, let payload):
                    // With extended headers the parser consumes PAYLOAD_LEN; in compact mode it is just
                    // a flag the handler must refuse, so it may come through.
                    if extended { check(!r.flags.contains(.payloadLen), "PAYLOAD_LEN left in flags of \(r)") }
                    if r.type == NBDCommand.write.rawValue {
                        guard let p = payload else { fatalError("WRITE without payload: \(r)") }
                        check(
                            UInt64(p.readableBytes) == r.length,
                            "WRITE payload \(p.readableBytes) bytes for length \(r.length)")
                        check(
                            p.readableBytes <= maxPayload,
                            "WRITE payload \(p.readableBytes) above maximum \(maxPayload)")
                        out.append(.request(r, payload: Array(p.readableBytesView)))
                    } else if r.type == NBDCommand.blockStatus.rawValue, let p = payload {
                        check(statusLimit > 0, "BLOCK_STATUS payload when the filtered form is not offered: \(r)")
                        check(
                            UInt64(p.readableBytes) == r.length,
                            "BLOCK_STATUS payload \(p.readableBytes) for \(r.length)")
                        check(p.readableBytes <= statusLimit, "BLOCK_STATUS payload above the limit \(statusLimit)")
                        out.append(.request(r, payload: Array(p.readableBytesView)))
                    } else {
                        check(payload == nil, "payload on \(r)")
                        out.append(.request(r, payload: nil))
                    }
                    if !extended { check(r.length <= UInt64(UInt32.max), "compact length above 32 bits") }
                case .rejected(let r, let reason):
                    check(reason.errno == .inval, "rejected with \(reason.errno)")
                    check(!reason.message.isEmpty, "a rejection without a message")
                    out.append(.rejected(r, reason))
                }
            }
        } catch {
            out.append(.error(error))
            return out
        }
        if pos == bytes.endIndex { break }
        if feeds % 8 == 0 { acc.discardReadBytes() }
    }
    return out
}

#if !FUZZ_REPLAY
    @_cdecl("LLVMFuzzerTestOneInput")
#endif
public func fuzzTransmission(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let extended = bytes[0] & 1 != 0
    let maxPayload = [0, 1, 4096, 32 << 20][Int(bytes[0] >> 1 & 3)]
    let statusLimit = bytes[0] & 8 != 0 ? 16 : 0
    let maxChunk = 1 << Int(bytes[1] & 15)
    let seed = UInt64(bytes[1] >> 4) << 8 | UInt64(bytes[2]) | 0x9E37_79B9_0000_0000
    let body = bytes[3...]
    let whole = run(
        body, extended: extended, maxPayload: maxPayload, statusLimit: statusLimit, maxChunk: nil, seed: seed)
    let split = run(
        body, extended: extended, maxPayload: maxPayload, statusLimit: statusLimit, maxChunk: maxChunk, seed: seed)
    if whole != split {
        fatalError("transmission: split feed differs from whole feed\nwhole: \(whole)\nsplit: \(split)")
    }
    judge(whole, extended: extended, maxPayload: maxPayload, statusLimit: statusLimit, bits: bytes[1] ^ bytes[2])
    return 0
}

/// Every parsed request through TransmissionRules (session and export facts from `bits`), and
/// its reply framed: the decision must respect the export's bounds, and every request must get
/// exactly one well-formed reply header.
private func judge(_ outcomes: [Outcome], extended: Bool, maxPayload: Int, statusLimit: Int, bits: UInt8) {
    let structured = extended || bits & 1 != 0
    var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache]
    if bits & 2 != 0 { flags.insert(.readOnly) }
    if structured { flags.insert(.sendDF) }
    if statusLimit > 0 { flags.insert(.blockStatusPayload) }
    let size: UInt64 = bits & 4 != 0 ? 1 << 20 : 4097
    let info = NBDExportInfo(name: "", size: size, flags: flags, maximumPayload: UInt32(maxPayload))
    let session = NBDSession(
        export: info, structuredReplies: structured, extendedHeaders: extended,
        allocationContext: structured && bits & 8 != 0 ? 1 : nil)
    let rules = TransmissionRules(
        session: session,
        export: ExportFacts(
            size: size, flags: flags, maximumPayload: UInt64(maxPayload),
            canFastZero: bits & 16 != 0))
    for o in outcomes {
        let r: NBDRequest
        let d: RequestDecision
        switch o {
        case .request(let req, let payload):
            r = req
            d = rules.decide(req, payload: payload.map { ByteBuffer(bytes: $0) })
        case .rejected(let req, let why):
            r = req
            d = rules.decide(why)
        case .error: continue
        }
        var b = ByteBuffer()
        switch d {
        case .fail(_, let m):
            check(!m.isEmpty, "a failure without a message for \(r)")
            rules.replies.error(r, .inval, message: m, into: &b)
        case .succeed, .disconnect:
            rules.replies.success(r, into: &b)
        case .run(let op):
            switch op {
            case .read(let off, let len, let shape):
                check(
                    len > 0 && len <= UInt64(maxPayload) && off + len <= size,
                    "READ \(off)+\(len) run on a \(size)-byte export")
                check((shape == .simple) == !structured, "READ shape \(shape) with structured=\(structured)")
                rules.replies.readData(r, shape: shape, offset: off, dataLength: Int(len), done: true, into: &b)
            case .write(let off, let len, _), .trim(let off, let len, _), .writeZeroes(let off, let len, _, _):
                check(!flags.contains(.readOnly), "a write on a read-only export: \(op)")
                check(len > 0 && off + len <= size, "\(op) on a \(size)-byte export")
                rules.replies.success(r, into: &b)
            case .blockStatus(let off, let len, let contexts, _):
                check(len > 0 && off + len <= size && !rules.contexts.isEmpty, "\(op)")
                check(
                    !contexts.isEmpty && contexts.allSatisfy { c in rules.contexts.contains(c) },
                    "BLOCK_STATUS for contexts not negotiated: \(op)")
                rules.replies.success(r, into: &b)
            case .flush:
                rules.replies.success(r, into: &b)
            }
        }
        let magic: UInt32? = b.getInteger(at: b.readerIndex)
        let want: Set<UInt32> = extended ? [0x6e8a_278c] : structured ? [0x6744_6698, 0x668e_33ef] : [0x6744_6698]
        check(
            magic.map(want.contains) == true, "reply magic \(String(describing: magic)) for \(r) (extended \(extended))"
        )
    }
}
