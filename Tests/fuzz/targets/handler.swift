import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded

// libFuzzer entry: the real NBDConnectionHandler (Sources/NBDServer/ConnectionHandler.swift) on
// NIO's EmbeddedChannel, over TestSupport's SynchronousDevice (the real device stack, run inline:
// Tests/TestSupport/SynchronousDevice.swift). Compiled by Scripts/fuzz together with
// Sources/NBDServer/*.swift and Tests/TestSupport/{SynchronousDevice,ReplyReader}.swift as module
// NBDServer, over an instrumented NBDProtocol.
//
// Input layout:
//   byte 0   bit 0: extended headers (32-byte requests, extended replies); bit 1: structured
//            replies (implied by bit 0); bit 2: the export is read-only; bit 3: base:allocation
//            selected (structured or extended only); bits 4-5: maximum payload (4 KiB, 64 KiB,
//            1 MiB, 4 MiB)
//   byte 1   chunking: bits 0-3 log2 of the largest chunk; the rest, with byte 2, a PRNG seed
//   byte 2   seed (high)
//   rest     the client's byte stream after GO (as in the transmission target)
// A fixed negotiation (client flags, the options, GO "disk"), then the stream in chunks, the event
// loop run and the replies taken after each. Every request's cookie is first rewritten to its
// number (1, 2, ...; the requests are found with the same TransmissionParser), so replies can be
// told apart. Invariants: replies are well formed for the session (TestSupport's ReplyReader);
// a reply answers a request whose bytes have all been sent, is not for NBD_CMD_DISC or anything
// after it, and comes at most once; with the stream fed, a connection that saw neither DISC nor
// a protocol error is open and has answered every request exactly once, one that saw DISC is
// closed and has answered every request before it; afterwards the device holds no request.
#if FUZZ_REPLAY
    import TestSupport
    @testable import NBDServer
#endif

private struct HandlerPRNG {
    var s: UInt64
    mutating func next() -> UInt64 {
        s ^= s << 13
        s ^= s >> 7
        s ^= s << 17
        return s
    }
}

private func expect(_ cond: @autoclosure () -> Bool, _ msg: @autoclosure () -> String) {
    if !cond() { fatalError("handler invariant violated: \(msg())") }
}

/// One device for every input (building one starts device threads and maps an arena); its
/// contents carry over, which no invariant depends on. Its size ends inside a 4 KiB page.
private let handlerFuzzDisk: SynchronousDevice = {
    do { return try SynchronousDevice(size: (1 << 20) + 3072) } catch { fatalError("handler fuzz: \(error)") }
}()

#if !FUZZ_REPLAY
    @_cdecl("LLVMFuzzerTestOneInput")
#endif
public func fuzzHandler(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let extended = bytes[0] & 1 != 0
    let structured = extended || bytes[0] & 2 != 0
    let readOnly = bytes[0] & 4 != 0
    let allocation = structured && bytes[0] & 8 != 0
    let maxPayload = [4096, 64 << 10, 1 << 20, 4 << 20][Int(bytes[0] >> 4 & 3)]
    let maxChunk = 1 << Int(bytes[1] & 15)
    var prng = HandlerPRNG(s: UInt64(bytes[1] >> 4) << 8 | UInt64(bytes[2]) | 0x9E37_79B9_0000_0000)
    var body = Array(bytes[3...])

    // The requests, as the handler's parser will see them: cookies rewritten to their numbers.
    struct Sent {
        var end: Int
        var type: UInt16
        var length: UInt64
    }
    var requests: [Sent] = []
    var disc: Int? // number of the DISC request
    var protocolError = false
    do {
        var parser = TransmissionParser(maximumPayload: maxPayload, extendedHeaders: extended)
        var input = ByteBuffer(bytes: body)
        while disc == nil {
            let start = input.readerIndex
            guard let e = try parser.next(&input) else { break }
            let r: NBDRequest
            var accepted = false
            switch e {
            case .request(let req, _):
                r = req
                accepted = true
            case .rejected(let req, _): r = req
            }
            let n = UInt64(requests.count + 1)
            for i in 0..<8 { body[start + 8 + i] = UInt8(truncatingIfNeeded: n >> (56 - 8 * UInt64(i))) }
            requests.append(Sent(end: input.readerIndex, type: r.type, length: r.length))
            // A DISC the parser refuses (extended, with PAYLOAD_LEN: "gracefully consume" the
            // payload, then EINVAL) is answered like any refused request and disconnects nothing.
            if accepted && r.type == NBDCommand.disc.rawValue { disc = Int(n) }
        }
    } catch {
        protocolError = true
    }

    let disk = handlerFuzzDisk
    let export = NBDExport(
        name: "disk", description: "", device: disk.device, forceReadOnly: readOnly,
        maximumPayload: UInt32(maxPayload))
    var log = Logger(label: "fuzz.handler")
    log.logLevel = .critical
    let handler = NBDConnectionHandler(
        directory: ExportDirectory([export]), id: 1, handshakeTimeout: .seconds(60), tls: .off, logger: log)
    let channel = EmbeddedChannel(handler: handler)
    func take() -> [UInt8] {
        var out: [UInt8] = []
        while let b = try? channel.readOutbound(as: ByteBuffer.self) { out += b.readableBytesView }
        return out
    }
    do {
        try channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        // Negotiation: fixed newstyle, no zeroes; the options; GO "disk" with no info requests.
        var w = ByteBuffer()
        w.writeInteger(UInt32(3))
        func option(_ o: UInt32, _ data: ByteBuffer = ByteBuffer()) {
            w.writeInteger(UInt64(0x4948_4156_454F_5054))
            w.writeInteger(o)
            w.writeInteger(UInt32(data.readableBytes))
            w.writeImmutableBuffer(data)
        }
        if extended { option(11) } else if structured { option(8) }
        if allocation {
            var d = ByteBuffer()
            d.writeInteger(UInt32(4))
            d.writeString("disk")
            d.writeInteger(UInt32(1))
            d.writeInteger(UInt32(15))
            d.writeString("base:allocation")
            option(10, d)
        }
        var go = ByteBuffer()
        go.writeInteger(UInt32(4))
        go.writeString("disk")
        go.writeInteger(UInt16(0))
        option(7, go)
        try channel.writeInbound(w)
        channel.embeddedEventLoop.run()
        let hs = take()
        // The last option reply is GO's ACK: magic, option 7, type ACK (1), length 0.
        expect(
            hs.count >= 20
                && Array(hs.suffix(20)) == [
                    0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0,
                ],
            "negotiation did not end in GO's ACK")
    } catch {
        fatalError("handler fuzz: negotiation: \(error)")
    }

    var reader = ReplyReader(framing: extended ? .extended : structured ? .structured : .simple) { cookie in
        guard cookie >= 1, cookie <= UInt64(requests.count) else { return nil }
        let r = requests[Int(cookie) - 1]
        return r.type == NBDCommand.read.rawValue ? Int(r.length) : nil
    }
    var answered = [Bool](repeating: false, count: requests.count + 1)
    var fed = 0
    func collect() {
        while true {
            channel.embeddedEventLoop.run()
            let out = take()
            if out.isEmpty { return }
            let replies: [ReplyReader.Reply]
            do { replies = try reader.feed(out) } catch { fatalError("handler invariant violated: \(error)") }
            for r in replies {
                let c = Int(r.cookie)
                expect(c >= 1 && c <= requests.count, "a reply to cookie \(r.cookie), which no request has")
                expect(disc.map { c < $0 } ?? true, "a reply to request \(c), DISC being request \(disc ?? 0)")
                expect(requests[c - 1].end <= fed, "a reply to request \(c) before all its bytes were sent")
                expect(!answered[c], "request \(c) answered twice")
                answered[c] = true
            }
        }
    }
    while fed < body.count && channel.isActive {
        let n = min(Int(prng.next() % UInt64(maxChunk + 1)), body.count - fed)
        if n > 0 {
            do { try channel.writeInbound(ByteBuffer(bytes: body[fed..<fed + n])) } catch {
                fatalError("handler fuzz: writeInbound: \(error)")
            }
            fed += n
        }
        collect()
    }
    expect(reader.partial.isEmpty, "replies cut short: \(reader.partial.keys.sorted())")
    expect(reader.pendingBytes == 0, "\(reader.pendingBytes) bytes of a reply cut short")
    if let d = disc {
        expect(!channel.isActive, "open after DISC")
        if !protocolError {
            for c in 1..<d { expect(answered[c], "request \(c) before DISC unanswered") }
        }
    } else if protocolError {
        expect(!channel.isActive, "open after a protocol error")
    } else {
        expect(channel.isActive, "closed without DISC or a protocol error")
        for c in 1..<answered.count { expect(answered[c], "request \(c) of \(requests.count) unanswered") }
    }
    _ = try? channel.finish(acceptAlreadyClosed: true)
    expect(disk.inFlight == 0, "the device still has \(disk.inFlight) requests after the connection closed")
    return 0
}
