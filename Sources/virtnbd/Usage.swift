// Usage errors: one line on stderr, `virtnbd: WHAT; FIX`, exit status 1 (as nbdkit). ArgumentParser
// would print its message, the whole usage block and exit 64; `--help` still shows that block.
// The spellings of qemu-nbd and nbdkit users get the virtnbd equivalent, not a guess.
import ArgumentParser
import Foundation

enum Usage {
    /// Ends the process for an error out of parsing or running `command`: help and version
    /// requests as ArgumentParser prints them (exit 0); an `ExitCode` as it is; anything else as
    /// one line and exit 1.
    static func exit(_ error: Error, command: ParsableCommand.Type, arguments: [String]) -> Never {
        if let code = error as? ExitCode { Foundation.exit(code.rawValue) }
        if command.exitCode(for: error) == .success { command.exit(withError: error) }
        Console.err(line(for: error, command: command, arguments: arguments) + "\n")
        Foundation.exit(1)
    }

    /// `virtnbd: WHAT; FIX` for a usage error.
    static func line(for error: Error, command: ParsableCommand.Type, arguments: [String]) -> String {
        let name = command._commandName == "virtnbd" ? "virtnbd" : "virtnbd \(command._commandName)"
        let message = command.message(for: error)
        if let token = offendingToken(message), let hint = foreignHint(token, arguments: arguments) {
            return "\(name): \(hint)"
        }
        // ArgumentParser's message can run over several lines (a "Help:" line, a usage hint): keep the first.
        var what = message.split(separator: "\n").first.map(String.init) ?? "\(error)"
        what = what.trimmingCharacters(in: .whitespaces)
        if what.hasPrefix("Error: ") { what.removeFirst(7) }
        if what.hasSuffix(".") && !what.hasSuffix("..") { what.removeLast() }
        if what.contains(";") { return "\(name): \(what)" }
        return "\(name): \(what); see '\(name) --help'"
    }

    /// The option or argument an ArgumentParser message quotes first: `Unknown option '--export'`.
    static func offendingToken(_ message: String) -> String? {
        // "Unknown option '-t'", "Unexpected argument 'x'", "2 unexpected arguments: 'file', 'x'".
        guard message.hasPrefix("Unknown option") || message.lowercased().contains("unexpected argument"),
            let open = message.firstIndex(of: "'")
        else { return nil }
        let rest = message[message.index(after: open)...]
        guard let close = rest.firstIndex(of: "'") else { return nil }
        return String(rest[..<close])
    }

    /// What virtnbd calls what a qemu-nbd or nbdkit user typed; nil for anything else.
    static func foreignHint(_ token: String, arguments: [String]) -> String? {
        let flag = token.split(separator: "=", maxSplits: 1).first.map(String.init) ?? token
        switch flag {
        case "--export":
            return "unknown option --export; the export's name is -e/--export-name NAME"
        case "-x":
            return "unknown option -x (qemu-nbd's export name); virtnbd's is -e/--export-name NAME"
        case "-b", "--bind", "-i", "--ipaddr":
            return
                "unknown option \(flag); the address to listen on is --listen ADDRESS (HOST, HOST:PORT or [IPv6]:PORT; repeatable)"
        case "-k", "--socket":
            return "unknown option \(flag) (qemu-nbd's socket path); virtnbd's is -U/--unix PATH"
        case "-f", "--format", "--foreground":
            return
                "unknown option \(flag); virtnbd serves raw images only and always stays in the foreground, so drop it (convert other formats first: qemu-img convert -O raw IN OUT)"
        case "-t", "--persistent":
            return
                "unknown option \(flag); virtnbd always keeps serving after a client leaves, until it is stopped, so drop it"
        case "--shared":
            return
                "unknown option \(flag) (qemu-nbd's client limit); virtnbd's is --max-connections N (default 1024; 0 = no limit)"
        case "--pid-file":
            return "unknown option --pid-file; virtnbd's is -P/--pidfile FILE"
        case "--tls-creds":
            return
                "unknown option --tls-creds; give virtnbd the directory of ca-cert.pem, server-cert.pem and server-key.pem with --tls-certificates DIR"
        case "-D":
            return "unknown option -D (qemu-nbd's description); virtnbd's is --description TEXT"
        case "--fork":
            return
                "unknown option --fork; virtnbd does not daemonize: run it under systemd (virtnbd.service) or with -P/--pidfile in the background"
        case "-n", "--newstyle", "-o", "--oldstyle":
            return "unknown option \(flag); virtnbd always speaks fixed newstyle NBD, so drop it"
        default:
            break
        }
        guard !token.hasPrefix("-") else { return nil }
        // A positional argument: an image (qemu-nbd FILE) or an nbdkit plugin (nbdkit file FILE, nbdkit memory SIZE).
        let index = arguments.firstIndex(of: token)
        let next = index.flatMap { $0 + 1 < arguments.count ? arguments[$0 + 1] : nil }
        switch token {
        case "file":
            return
                "virtnbd takes no plugin name; nbdkit's \"file \(next ?? "FILE")\" is --file \(next ?? "FILE")"
        case "memory":
            return "virtnbd takes no plugin name; nbdkit's \"memory \(next ?? "SIZE")\" is --size \(next ?? "SIZE")"
        case "null":
            return "virtnbd takes no plugin name; serve a RAM disk with --size SIZE"
        default:
            return
                "unexpected argument '\(token)'; virtnbd takes no image argument: to serve a raw image, give --file \(token)"
        }
    }
}
