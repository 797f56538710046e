// `virtnbd info URI`: what a server says about an export, like nbdinfo, through NBDClient.
import ArgumentParser
import Foundation
import Logging
import NBDClient
import NBDProtocol
import NIOCore

struct Info: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show an export's size, flags, block sizes and meta contexts (like nbdinfo).",
        discussion: "URI is nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH.")

    @Flag(name: .long, help: "List every export the server offers (NBD_OPT_LIST).") var list = false
    @Flag(name: .long, help: "Print JSON (the keys nbdinfo --json uses).") var json = false
    @Option(name: .long, help: "Seconds to wait for the connection and, again, for the handshake (0 = forever).")
    var timeout: Double = 10
    @Flag(name: [.short, .long], help: "Debug logging on stderr.") var verbose = false
    @Argument(help: "The NBD URI.") var uri: String

    func validate() throws { try checkTimeout(timeout) }

    func run() async throws {
        let logger = bootstrapToolLogging(verbose: verbose)
        do {
            let parsed: NBDURI
            do { parsed = try NBDURI(parsing: uri) } catch { throw NBDClientError.badURI(error) }
            let (negotiation, exports) = try await NBDClient.query(
                parsed, list: list, timeout: timeAmount(timeout), logger: logger)
            let text =
                json ? Self.json(negotiation, exports, base: parsed) : Self.text(negotiation, exports, base: parsed)
            Console.out(text)
        } catch {
            throw toolFailure("info", error)
        }
    }

    /// The boolean flags nbdinfo prints, in its order.
    static func flagRows(_ f: NBDTransmissionFlags) -> [(String, Bool)] {
        [
            ("is_rotational", f.contains(.rotational)), ("is_read_only", f.contains(.readOnly)),
            ("can_cache", f.contains(.sendCache)), ("can_df", f.contains(.sendDF)),
            ("can_fast_zero", f.contains(.sendFastZero)),
            ("can_flush", f.contains(.sendFlush)), ("can_fua", f.contains(.sendFUA)),
            ("can_multi_conn", f.contains(.canMultiConn)),
            ("can_trim", f.contains(.sendTrim)), ("can_zero", f.contains(.sendWriteZeroes)),
        ]
    }

    /// "Transmission flags" by name, e.g. "has-flags flush fua".
    static func flagNames(_ f: NBDTransmissionFlags) -> String {
        let names: [(NBDTransmissionFlags, String)] = [
            (.hasFlags, "has-flags"), (.readOnly, "read-only"), (.sendFlush, "flush"), (.sendFUA, "fua"),
            (.rotational, "rotational"),
            (.sendTrim, "trim"), (.sendWriteZeroes, "zero"), (.sendDF, "df"), (.canMultiConn, "multi-conn"),
            (.sendResize, "resize"),
            (.sendCache, "cache"), (.sendFastZero, "fast-zero"), (.blockStatusPayload, "block-status-payload"),
        ]
        var out = names.filter { f.contains($0.0) }.map(\.1)
        let unknown = f.rawValue & ~names.reduce(0) { $0 | $1.0.rawValue }
        if unknown != 0 { out.append("unknown-0x\(String(unknown, radix: 16))") }
        return out.joined(separator: " ")
    }

    static func protocolLine(_ n: NBDNegotiation) -> String {
        (n.usedExportName ? "newstyle-fixed (NBD_OPT_EXPORT_NAME)" : "newstyle-fixed") + " without TLS"
            + (n.structuredReplies ? ", using structured packets" : ", using simple packets")
    }

    static func exportURI(_ base: NBDURI, _ name: String) -> String {
        NBDURI(transport: base.transport, exportName: name, tls: base.tls).text
    }

    static func text(_ n: NBDNegotiation, _ exports: [NBDExportDetails], base: NBDURI) -> String {
        var s = "protocol: \(protocolLine(n))\n"
        for e in exports {
            s += "export=\"\(e.name)\":\n"
            if !e.description.isEmpty { s += "\tdescription: \(e.description)\n" }
            s += "\texport-size: \(e.size) (\(humanSize(e.size)))\n"
            s += "\turi: \(exportURI(base, e.name))\n"
            s += "\ttransmission-flags: 0x\(String(e.flags.rawValue, radix: 16)) (\(flagNames(e.flags)))\n"
            if let contexts = e.metaContexts {
                s += "\tcontexts:\n"
                for c in contexts { s += "\t\t\(c)\n" }
            }
            for (k, v) in flagRows(e.flags) { s += "\t\(k): \(v)\n" }
            if let v = e.minimumBlockSize { s += "\tblock_size_minimum: \(v)\n" }
            if let v = e.preferredBlockSize { s += "\tblock_size_preferred: \(v)\n" }
            if let v = e.maximumPayload { s += "\tblock_size_maximum: \(v)\n" }
        }
        return s
    }

    static func json(_ n: NBDNegotiation, _ exports: [NBDExportDetails], base: NBDURI) -> String {
        var s =
            "{\n\"protocol\": \(quote(n.usedExportName ? "newstyle-fixed (NBD_OPT_EXPORT_NAME)" : "newstyle-fixed")),\n"
        s += "\"TLS\": false,\n\"structured\": \(n.structuredReplies),\n\"exports\": ["
        for (i, e) in exports.enumerated() {
            var rows: [String] = ["\"export-name\": \(quote(e.name))"]
            if !e.description.isEmpty { rows.append("\"description\": \(quote(e.description))") }
            rows.append("\"uri\": \(quote(exportURI(base, e.name)))")
            if let c = e.metaContexts { rows.append("\"contexts\": [" + c.map(quote).joined(separator: ", ") + "]") }
            rows.append("\"transmission-flags\": \(e.flags.rawValue)")
            rows += flagRows(e.flags).map { "\"\($0.0)\": \($0.1)" }
            if let v = e.minimumBlockSize { rows.append("\"block_size_minimum\": \(v)") }
            if let v = e.preferredBlockSize { rows.append("\"block_size_preferred\": \(v)") }
            if let v = e.maximumPayload { rows.append("\"block_size_maximum\": \(v)") }
            rows.append("\"export-size\": \(e.size)")
            rows.append("\"export-size-str\": \(quote(humanSize(e.size)))")
            s += (i == 0 ? "\n" : ",\n") + "\t{\n\t" + rows.joined(separator: ",\n\t") + "\n\t}"
        }
        return s + " ]\n}\n"
    }

    static func quote(_ v: String) -> String {
        var out = "\""
        for u in v.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if u.value < 0x20 { out += String(format: "\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}

/// 64M, 1G, 1536K; the exact byte count when no binary unit divides it.
func humanSize(_ n: UInt64) -> String {
    for (suffix, unit) in [
        ("E", UInt64(1) << 60), ("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10),
    ]
    where n >= unit && n % unit == 0 {
        return "\(n / unit)\(suffix)"
    }
    return "\(n)"
}

/// Logging for the client subcommands: warnings only unless -v; always on stderr.
func bootstrapToolLogging(verbose: Bool) -> Logger {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        h.logLevel = verbose ? .debug : .warning
        return h
    }
    return Logger(label: "virtnbd")
}

/// `--timeout S` of the client subcommands: positive seconds, or 0 for none.
func checkTimeout(_ t: Double) throws {
    guard t >= 0, t <= 86400 else { throw ValidationError("--timeout must be 0 (wait forever) to 86400 seconds") }
}

func timeAmount(_ seconds: Double) -> TimeAmount? {
    seconds == 0 ? nil : .nanoseconds(Int64(seconds * 1e9))
}

/// Prints `virtnbd CMD: error` on stderr; the caller throws the returned exit status 1.
func toolFailure(_ command: String, _ error: Error) -> ExitCode {
    Console.err("virtnbd \(command): \(error)\n")
    return ExitCode(1)
}
