import AccessControl
import Foundation
import XCTest

@testable import ServerConfig

/// Parses `yaml` as virtnbd.yaml and returns the error's message.
private func message(_ yaml: String, file: StaticString = #filePath, line: UInt = #line) -> String {
    do {
        let c = try VirtNBDConfig.parse(yaml, file: "virtnbd.yaml")
        XCTFail("expected an error, got \(c)", file: file, line: line)
        return ""
    } catch {
        return error.description
    }
}

private func kind(_ yaml: String) -> ConfigError.Kind? {
    do {
        _ = try VirtNBDConfig.parse(yaml, file: "virtnbd.yaml")
        return nil
    } catch { return error.kind }
}

final class GoodConfigTests: XCTestCase {
    func testOneExportAndDefaults() throws {
        let c = try VirtNBDConfig.parse(
            """
            exports:
              - name: disk
                device: ram
                size: 64M
            """)
        XCTAssertEqual(c.listeners, [.tcp(host: "127.0.0.1", port: 10809)])
        XCTAssertEqual(c.limits, .init(maxConnections: 1024, handshakeTimeout: 10))
        XCTAssertEqual(c.logLevel, .info)
        XCTAssertNil(c.metrics)
        XCTAssertEqual(c.tls, .init())
        XCTAssertEqual(c.exports, [ExportConfig(name: "disk", device: .ram(size: 64 << 20))])
        XCTAssertEqual(c.source, "virtnbd.yaml")
    }

    func testThreeExportsRAMFileAndReadOnlyFile() throws {
        let c = try VirtNBDConfig.parse(
            """
            listen:
              - 0.0.0.0:10809
            limits:
              max-connections: 32
              handshake-timeout: 5
            log:
              level: warning
            metrics: 127.0.0.1:9100
            exports:
              - name: scratch
                description: "64 MiB of RAM, gone at exit"
                device: ram
                size: 64M
                queue-size: 1024
              - name: images
                device: file
                path: images/disk.img
                size: 1G
              - name: golden
                device: file
                path: /srv/golden.img
                read-only: true
            """, file: "/etc/virtnbd/virtnbd.yaml", baseDirectory: "/etc/virtnbd")
        XCTAssertEqual(c.listeners, [.tcp(host: "0.0.0.0", port: 10809)])
        XCTAssertEqual(c.limits, .init(maxConnections: 32, handshakeTimeout: 5))
        XCTAssertEqual(c.logLevel, .warning)
        XCTAssertEqual(c.metrics, "127.0.0.1:9100")
        XCTAssertEqual(
            c.exports,
            [
                ExportConfig(
                    name: "scratch", description: "64 MiB of RAM, gone at exit", device: .ram(size: 64 << 20),
                    queueSize: 1024),
                ExportConfig(name: "images", device: .file(path: "/etc/virtnbd/images/disk.img", size: 1 << 30)),
                ExportConfig(name: "golden", device: .file(path: "/srv/golden.img", size: nil), readOnly: true),
            ])
    }

    func testUnixAndTCPListenersAndEveryDevice() throws {
        let c = try VirtNBDConfig.parse(
            """
            listen: [127.0.0.1:10809, "[::1]:10809", /run/virtnbd/nbd.sock]
            tls:
              policy: on
              certificates: /etc/pki/virtnbd
            exports:
              - { name: "", device: simulated }
              - { name: qsd, device: vhost-user, socket: /run/qsd/vhost.sock, tls: require }
              - { name: pci, device: vfio, pci: "00:05.0", read-only: false }
            """)
        XCTAssertEqual(
            c.listeners,
            [
                .tcp(host: "127.0.0.1", port: 10809), .tcp(host: "::1", port: 10809),
                .unix(path: "/run/virtnbd/nbd.sock"),
            ])
        XCTAssertEqual(c.listeners.map(\.description), ["127.0.0.1:10809", "[::1]:10809", "/run/virtnbd/nbd.sock"])
        XCTAssertEqual(
            c.exports.map(\.device),
            [.simulated, .vhostUser(socket: "/run/qsd/vhost.sock"), .vfio(pciAddress: "0000:00:05.0")])
        XCTAssertEqual(c.effectiveTLS(for: c.exports[0]), .on)
        XCTAssertEqual(c.effectiveTLS(for: c.exports[1]), .require)
        XCTAssertEqual(c.serverTLSPolicy, .on)
    }

    func testYAML11WordsStayText() throws {
        // `off` and `no` are booleans in YAML 1.1; virtnbd reads the text as written.
        let c = try VirtNBDConfig.parse(
            """
            tls: { policy: off }
            exports:
              - { name: no, device: ram, size: 1G, tls: off }
            """)
        XCTAssertEqual(c.exports[0].name, "no")
        XCTAssertEqual(c.exports[0].tls, .off)
    }

    func testExportOverrideRaisesServerPolicyToOn() throws {
        let c = try VirtNBDConfig.parse(
            """
            tls: { psk: keys.psk }
            exports:
              - { name: open, device: ram, size: 1M }
              - { name: secret, device: ram, size: 1M, tls: require }
            """, baseDirectory: "/etc/virtnbd")
        XCTAssertEqual(c.tls.psk, "/etc/virtnbd/keys.psk")
        XCTAssertEqual(c.serverTLSPolicy, .on)
        XCTAssertEqual(c.effectiveTLS(for: c.exports[0]), .off)
    }

    func testSharedReadOnlyFileIsAllowed() throws {
        XCTAssertNoThrow(
            try VirtNBDConfig.parse(
                """
                exports:
                  - { name: a, device: file, path: /x.img, read-only: true }
                  - { name: b, device: file, path: //x.img, read-only: true }
                """))
    }

    func testExampleConfigInRepository() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let path = root.appendingPathComponent("Config/virtnbd.yaml").path
        let c = try VirtNBDConfig.load(path: path)
        XCTAssertEqual(c.exports.map(\.name), ["scratch", "images", "golden"])
        XCTAssertEqual(c.exports.map(\.device.kind), ["ram", "file", "file"])
        XCTAssertEqual(c.exports.map(\.readOnly), [false, false, true])
    }

    func testLoadFromDiskResolvesRelativePaths() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virtnbd-cfg-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("a.yaml").path
        try "exports: [{ name: d, device: file, path: d.img }]\n".write(toFile: path, atomically: true, encoding: .utf8)
        let c = try VirtNBDConfig.load(path: path)
        XCTAssertEqual(c.exports[0].device, .file(path: dir.path + "/d.img", size: nil))
        XCTAssertEqual(c.source, path)
    }
}

final class ConfigErrorTests: XCTestCase {
    func testBadSize() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: ram
                    size: 64M
                  - name: b
                    device: ram
                    size: 64Q
                """),
            #"virtnbd.yaml:7: exports[1].size: "64Q" is not a size ("Q" is not a unit); use a whole number with K, M, G or T (binary units; KiB, MiB, GiB, TiB and KB… mean the same), e.g. 64M"#
        )
        XCTAssertEqual(
            message("exports: [{ name: a, device: ram, size: 0 }]"),
            #"virtnbd.yaml:1: exports[0].size: "0" is not a size (a size must be more than 0); use a whole number with K, M, G or T (binary units; KiB, MiB, GiB, TiB and KB… mean the same), e.g. 64M"#
        )
        XCTAssertEqual(
            message("exports: [{ name: a, device: ram, size: 99999999T }]"),
            #"virtnbd.yaml:1: exports[0].size: "99999999T" is not a size (larger than 16 EiB); use a whole number with K, M, G or T (binary units; KiB, MiB, GiB, TiB and KB… mean the same), e.g. 64M"#
        )
        XCTAssertEqual(
            message("exports: [{ name: a, device: file, path: /a, size: 1.5G }]"),
            #"virtnbd.yaml:1: exports[0].size: "1.5G" is not a size (sizes are whole numbers, e.g. 1536K rather than 1.5M); use a whole number with K, M, G or T (binary units; KiB, MiB, GiB, TiB and KB… mean the same), e.g. 64M"#
        )
        XCTAssertEqual(
            try VirtNBDConfig.parse("exports: [{ name: a, device: ram, size: 64MiB }]").exports[0].device,
            .ram(size: 64 << 20))
    }

    func testUnknownKeysWithHints() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: ram
                    sise: 1M
                """), #"virtnbd.yaml:4: exports[0].sise: unknown key; did you mean "size"?"#)
        XCTAssertEqual(
            message(
                """
                limits:
                  max-conections: 3
                exports: [{ name: a, device: simulated }]
                """), #"virtnbd.yaml:2: limits.max-conections: unknown key; did you mean "max-connections"?"#)
        XCTAssertEqual(
            message(
                """
                export:
                  - name: a
                """), #"virtnbd.yaml:1: export: unknown key; did you mean "exports"?"#)
        XCTAssertEqual(
            message(
                """
                tls:
                  policy: on
                  cert: /x
                exports: [{ name: a, device: simulated }]
                """), #"virtnbd.yaml:3: tls.cert: unknown key; known keys here: policy, certificates, psk, verify-peer"#
        )
    }

    func testDuplicateExportNames() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: disk
                    device: ram
                    size: 1M
                  - name: other
                    device: simulated
                  - name: disk
                    device: simulated
                """),
            #"virtnbd.yaml:7: exports[2].name: "disk" is already the name of exports[0] (line 2); give every export its own name"#
        )
    }

    func testDuplicateKey() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: disk
                    device: ram
                    size: 1M
                    size: 2M
                """), #"virtnbd.yaml:5: size: appears twice in one mapping (first on line 4); keep one of them"#)
    }

    func testMissingDeviceAndParameters() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: ram
                    size: 1M
                  - name: b
                    size: 1M
                """), "virtnbd.yaml:5: exports[1]: no device; add device: ram, file, vhost-user, vfio, rbd or simulated"
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: file
                """), "virtnbd.yaml:3: exports[0].path: device: file needs path; add path: /var/lib/virtnbd/disk.img")
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: ram
                """), "virtnbd.yaml:3: exports[0].size: device: ram needs size; add size: 64M")
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: ram
                    size: 1M
                    path: /x.img
                """),
            "virtnbd.yaml:5: exports[0].path: not used by device: ram; remove it (only device: file takes path)")
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: disk
                """),
            #"virtnbd.yaml:3: exports[0].device: "disk" is not one of ram, file, vhost-user, vfio, rbd, simulated; use ram, file, vhost-user, vfio, rbd or simulated"#
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - device: ram
                    size: 1M
                """), #"virtnbd.yaml:2: exports[0].name: missing; add name: disk (name: "" is the default export)"#)
        XCTAssertEqual(
            message("listen: [127.0.0.1:10809]"),
            #"virtnbd.yaml: exports: missing: the file defines no export; add an exports list, e.g. exports: [{ name: disk, device: ram, size: 64M }]"#
        )
    }

    func testListenerCollisionsAndAddresses() {
        XCTAssertEqual(
            message(
                """
                listen:
                  - 127.0.0.1:10809
                  - /run/nbd.sock
                  - 0.0.0.0:10809
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:4: listen[2]: 0.0.0.0:10809 collides with listen[0] (127.0.0.1:10809, line 2); use another port or path, or remove one of them"
        )
        XCTAssertEqual(
            message(
                """
                listen: [/run/nbd.sock, //run/./nbd.sock]
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:1: listen[1]: //run/./nbd.sock collides with listen[0] (/run/nbd.sock, line 1); use another port or path, or remove one of them"
        )
        XCTAssertEqual(
            message(
                """
                listen: ["[::]:10809", 192.168.0.1:10809]
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:1: listen[1]: 192.168.0.1:10809 collides with listen[0] ([::]:10809, line 1); use another port or path, or remove one of them"
        )
        XCTAssertEqual(
            message(
                """
                metrics: 127.0.0.1:10809
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:1: metrics: 127.0.0.1:10809 collides with the default listener 127.0.0.1:10809; give metrics its own port, e.g. 127.0.0.1:9100"
        )
        XCTAssertEqual(
            message(
                """
                listen:
                  - 127.0.0.1
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:2: listen[0]: "127.0.0.1" has no port; write host:port (e.g. 127.0.0.1:10809 or [::1]:10809) or an absolute path for a Unix socket"#
        )
        XCTAssertEqual(
            message(
                """
                listen: ["::1:10809"]
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:1: listen[0]: "::1:10809" is ambiguous; put IPv6 addresses in brackets, e.g. [::1]:10809"#)
        XCTAssertEqual(
            message(
                """
                listen: [localhost:70000]
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:1: listen[0]: "localhost:70000" has no valid port; use a port from 1 to 65535, e.g. 127.0.0.1:10809"#
        )
        XCTAssertTrue(
            message("listen: [/\(String(repeating: "s", count: 120))]\nexports: [{ name: a, device: simulated }]")
                .hasPrefix(
                    "virtnbd.yaml:1: listen[0]: a Unix socket path of 121 bytes is longer than the 107 the kernel allows"
                ))
    }

    func testTLSRequireWithoutCredentials() {
        XCTAssertEqual(
            message(
                """
                tls:
                  policy: require
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:2: tls.policy: require needs TLS credentials; set tls.certificates (a directory with server-cert.pem and server-key.pem) or tls.psk (a psktool key file)"
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: simulated
                    tls: require
                """),
            "virtnbd.yaml:4: exports[0].tls: require needs TLS credentials; set tls.certificates (a directory with server-cert.pem and server-key.pem) or tls.psk (a psktool key file)"
        )
        XCTAssertEqual(
            message(
                """
                tls:
                  certificates: /etc/pki/virtnbd
                  psk: /etc/virtnbd/keys.psk
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:3: tls.psk: both tls.certificates (line 2) and tls.psk are set; keep one of them: X.509 certificates or a PSK file"
        )
        XCTAssertEqual(
            message(
                """
                tls: { policy: maybe }
                exports: [{ name: a, device: simulated }]
                """), #"virtnbd.yaml:1: tls.policy: "maybe" is not one of off, on, require; use off, on or require"#)
    }

    func testValuesAndTypes() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: simulated
                    read-only: yes
                """), #"virtnbd.yaml:4: exports[0].read-only: "yes" is not true or false; write true or false"#)
        // A queue size that is not a power of two is a split ring's problem only: checked with the ring in merged(with:).
        let odd = try! VirtNBDConfig.parse(
            """
            exports:
              - name: a
                device: simulated
                queue-size: 100
            """)
        XCTAssertThrowsError(try odd.merged(with: .init())) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "virtnbd.yaml: exports[0].queue-size: 100 is not a power of two from 1 to 32768, which a split ring (the default) needs; use e.g. 128, or --ring packed, which takes any size from 2 to 32768"
            )
        }
        XCTAssertEqual(try odd.merged(with: .init(packedRing: true)).exports[0].queueSize, 100)
        XCTAssertEqual(
            message("exports: [{ name: a, device: simulated, queue-size: 40000 }]"),
            #"virtnbd.yaml:1: exports[0].queue-size: "40000" is not a whole number from 1 to 32768; use a power of two from 1 to 32768, e.g. 256 (with --ring packed any size from 2)"#
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - { name: q, device: vhost-user, socket: /s, queue-size: 4096 }
                """),
            "virtnbd.yaml:2: exports[0].queue-size: 4096 is more than the 1024 a vhost-user ring holds; use 1024 or less"
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - { name: p, device: vfio, pci: "0000:00:5.0" }
                """),
            #"virtnbd.yaml:2: exports[0].pci: "0000:00:5.0" is not a PCI address; write domain:bus:device.function as lspci -D shows it, e.g. 0000:00:05.0"#
        )
        XCTAssertEqual(
            message(
                """
                limits:
                  handshake-timeout: -1
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:2: limits.handshake-timeout: "-1" is not a whole number from 1 to 86400; give whole seconds, e.g. 10"#
        )
        XCTAssertEqual(
            message(
                """
                log: { level: loud }
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:1: log.level: "loud" is not one of trace, debug, info, notice, warning, error, critical; use trace, debug, info, notice, warning, error or critical"#
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  name: a
                """),
            #"virtnbd.yaml:2: exports: expected a list of exports, found a mapping (key: value lines); start each export with "- name: …" under exports:"#
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - name:
                    device: simulated
                """), #"virtnbd.yaml:2: exports[0].name: no value; write name: disk (name: "" is the default export)"#)
        XCTAssertEqual(
            message("exports: []"),
            "virtnbd.yaml:1: exports: an empty list; add at least one export, e.g. - { name: disk, device: ram, size: 64M }"
        )
        XCTAssertEqual(
            message(""), "virtnbd.yaml: holds no settings; add at least an exports list (see Config/virtnbd.yaml)")
    }

    func testSharedBackingStore() {
        XCTAssertEqual(
            message(
                """
                exports:
                  - name: a
                    device: file
                    path: /srv/a.img
                  - name: b
                    device: file
                    path: /srv/a.img
                    read-only: true
                """),
            "virtnbd.yaml:7: exports[1].path: /srv/a.img is also served by exports[0] (line 4); two exports may share a file only if both are read-only"
        )
    }

    func testSyntaxErrors() {
        XCTAssertEqual(
            message("exports:\n  - name: a\n\tdevice: ram\n"),
            "virtnbd.yaml:3: a tab in the indentation; indent with spaces only (YAML forbids tabs)")
        XCTAssertEqual(
            message("exports:\n  - name: \"a\n    device: ram\n"),
            #"virtnbd.yaml:2: YAML syntax: while scanning a quoted scalar: found unexpected end of stream; check the indentation, a missing ":" or an unclosed quote on this line or the one before"#
        )
        XCTAssertEqual(
            message("exports:\n  - name: a\n    device: ram\n  size: 1M\n"),
            #"virtnbd.yaml:4: YAML syntax: while parsing a block collection: did not find expected '-' indicator; check the indentation, a missing ":" or an unclosed quote on this line or the one before"#
        )
        XCTAssertEqual(kind("exports: [ { name: a }"), .syntax)
    }

    func testUnreadableFile() {
        do {
            _ = try VirtNBDConfig.load(path: "/nonexistent/virtnbd.yaml")
            XCTFail("expected an error")
        } catch {
            XCTAssertEqual(error.kind, .unreadable)
            XCTAssertEqual(
                error.description,
                "/nonexistent/virtnbd.yaml: no such file; check the path given to --config (an example is Config/virtnbd.yaml)"
            )
        }
    }
}

final class MergeTests: XCTestCase {
    let file = try! VirtNBDConfig.parse(
        """
        listen: [0.0.0.0:10809, /run/virtnbd/nbd.sock]
        limits: { max-connections: 8 }
        log: { level: warning }
        tls: { policy: on, certificates: /etc/pki/virtnbd }
        exports:
          - { name: scratch, device: ram, size: 64M }
          - { name: images, device: file, path: /srv/disk.img }
          - { name: golden, device: file, path: /srv/golden.img, read-only: true }
        """)

    func testNoFlagsChangeNothing() throws {
        XCTAssertEqual(try file.merged(with: .init()), file)
    }

    func testGlobalFlagsReplaceFileValues() throws {
        let m = try file.merged(
            with: .init(
                port: 10900, maxConnections: 2, handshakeTimeout: 3, verbose: true, tls: .require, tlsPsk: "/k.psk"))
        XCTAssertEqual(m.listeners, [.tcp(host: "127.0.0.1", port: 10900)], "a listener flag replaces the whole list")
        XCTAssertEqual(m.limits, .init(maxConnections: 2, handshakeTimeout: 3))
        XCTAssertEqual(m.logLevel, .debug)
        XCTAssertEqual(
            m.tls, .init(policy: .require, certificates: nil, psk: "/k.psk"),
            "a credential flag replaces both credentials")
        XCTAssertEqual(m.exports, file.exports)
        XCTAssertEqual(
            try file.merged(with: .init(port: 1, unix: "/tmp/x.sock")).listeners, [.unix(path: "/tmp/x.sock")])
        XCTAssertEqual(try file.merged(with: .init(listen: ["::"])).listeners, [.tcp(host: "::", port: 10809)])
    }

    func testVerboseNeverLowersTrace() throws {
        var c = file
        c.logLevel = .trace
        XCTAssertEqual(try c.merged(with: .init(verbose: true)).logLevel, .trace)
    }

    func testDeviceFlagsReplaceTheNamedExportInPlace() throws {
        let m = try file.merged(with: .init(exportName: "images", readOnly: true, size: 1 << 20))
        XCTAssertEqual(m.exports.map(\.name), ["scratch", "images", "golden"])
        XCTAssertEqual(m.exports[1], ExportConfig(name: "images", device: .ram(size: 1 << 20), readOnly: true))
    }

    func testDeviceFlagsAppendANewExport() throws {
        let m = try file.merged(with: .init(description: "extra", file: "/srv/new.img", queueSize: 512))
        XCTAssertEqual(m.exports.count, 4)
        XCTAssertEqual(
            m.exports[3],
            ExportConfig(name: "", description: "extra", device: .file(path: "/srv/new.img", size: nil), queueSize: 512)
        )
    }

    func testDeviceFlagDefinesAnExport() throws {
        let m = try file.merged(with: .init(exportName: "scratch", device: "vfio:0000:00:05.0", queueSize: 64))
        XCTAssertEqual(
            m.exports[0], ExportConfig(name: "scratch", device: .vfio(pciAddress: "0000:00:05.0"), queueSize: 64))
        XCTAssertThrowsError(
            try file.merged(with: .init(exportName: "q", device: "vhost-user:/q.sock", queueSize: 4096))
        ) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"virtnbd.yaml: --queue-size: 4096 is more than the 1024 a vhost-user ring holds (exports[3] "q"); use 1024 or less"#
            )
        }
    }

    func testExportNameAloneModifiesThatExport() throws {
        let m = try file.merged(with: .init(exportName: "scratch", description: "d", readOnly: true, queueSize: 64))
        XCTAssertEqual(
            m.exports[0],
            ExportConfig(name: "scratch", description: "d", device: .ram(size: 64 << 20), readOnly: true, queueSize: 64)
        )
        XCTAssertEqual(Array(m.exports[1...]), Array(file.exports[1...]))
    }

    func testFlagsWithoutNameApplyToEveryExport() throws {
        let m = try file.merged(with: .init(readOnly: true, queueSize: 128))
        XCTAssertEqual(m.exports.map(\.readOnly), [true, true, true])
        XCTAssertEqual(m.exports.map(\.queueSize), [128, 128, 128])
    }

    func testMergeErrorsNameTheFlag() {
        XCTAssertThrowsError(try file.merged(with: .init(exportName: "nope"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"virtnbd.yaml: --export-name: no export "nope" (the file has "scratch", "images", "golden"); name one of those, or add --size or --file to define a new export"#
            )
        }
        XCTAssertThrowsError(try file.merged(with: .init(description: "x"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "virtnbd.yaml: --description: the file has 3 exports; say which one with -e NAME")
        }
        XCTAssertThrowsError(try file.merged(with: .init(exportName: "again", file: "/srv/disk.img"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"virtnbd.yaml: --file: file /srv/disk.img is also served by exports[1] "images"; two exports may share a file only if both are read-only; add -r or use another file"#
            )
        }
        XCTAssertThrowsError(try file.merged(with: .init(tlsCertificates: "/c", tlsPsk: "/k"))) { e in
            XCTAssertEqual((e as? ConfigError)?.kind, .tlsCredentials)
        }
        XCTAssertThrowsError(try file.merged(with: .init(queueSize: 3))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "virtnbd.yaml: --queue-size: 3 is not a power of two from 1 to 32768, which a split ring (the default) needs; use e.g. 2, or --ring packed, which takes any size from 2 to 32768"
            )
        }
    }

    func testMetricsFlagReplacesTheFileValue() throws {
        var c = file
        c.metrics = "127.0.0.1:9100"
        XCTAssertEqual(try c.merged(with: .init()).metrics, "127.0.0.1:9100")
        let m = try c.merged(with: .init(metrics: "[::1]:9200"))
        XCTAssertEqual(m.metrics, "[::1]:9200")
        XCTAssertEqual(m.metricsEndpoint?.host, "::1")
        XCTAssertEqual(m.metricsEndpoint?.port, 9200)
        XCTAssertNil(file.metricsEndpoint)
        XCTAssertThrowsError(try file.merged(with: .init(metrics: "9100"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"virtnbd.yaml: --metrics: "9100" has no port; write host:port, e.g. 127.0.0.1:9100"#)
        }
        XCTAssertThrowsError(try file.merged(with: .init(metrics: "127.0.0.1:10809"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "virtnbd.yaml: --metrics: 127.0.0.1:10809 collides with listen[0] (0.0.0.0:10809); give --metrics its own port, e.g. 127.0.0.1:9100"
            )
        }
    }

    func testWithoutConfigFlagsDescribeOneExportAsToday() throws {
        let d = try VirtNBDConfig.fromCommandLine(.init())
        XCTAssertEqual(d, VirtNBDConfig(source: nil, exports: [ExportConfig(name: "", device: .simulated)]))
        let r = try VirtNBDConfig.fromCommandLine(
            .init(port: 10900, exportName: "disk", readOnly: true, size: 64 << 20))
        XCTAssertEqual(r.listeners, [.tcp(host: "127.0.0.1", port: 10900)])
        XCTAssertEqual(r.exports, [ExportConfig(name: "disk", device: .ram(size: 64 << 20), readOnly: true)])
        let f = try VirtNBDConfig.fromCommandLine(.init(unix: "/tmp/n.sock", size: 1 << 30, file: "new.img"))
        XCTAssertEqual(f.exports, [ExportConfig(name: "", device: .file(path: "new.img", size: 1 << 30))])
        XCTAssertEqual(
            try VirtNBDConfig.fromCommandLine(.init(device: "vhost-user:/run/qsd.sock")).exports,
            [ExportConfig(name: "", device: .vhostUser(socket: "/run/qsd.sock"))])
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(size: 1 << 20, device: "vfio:00:05.0"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "command line: --device: --size and --file configure the emulator; drop them, or use --device emulator")
        }
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(device: "vfio:nope"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"command line: --device: "vfio:nope" is not a device; use emulator, vhost-user:/path/to.sock, vfio:0000:00:05.0 or rbd:POOL/IMAGE[@/etc/ceph/ceph.conf]"#
            )
        }
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(tls: .require))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "command line: --tls require: require needs TLS credentials; add --tls-certificates DIR (server-cert.pem, server-key.pem) or --tls-psk FILE (psktool format)"
            )
        }
    }

    func testAFlagEqualToItsDefaultStillWins() throws {
        // The file narrows nothing here: every flag below has its default value, and each must still win.
        let f = try VirtNBDConfig.parse(
            """
            listen: [0.0.0.0:10809]
            limits: { max-connections: 1, handshake-timeout: 3 }
            exports:
              - { name: a, device: ram, size: 1M, queue-size: 64, max-payload: 1M }
            """)
        let m = try f.merged(
            with: .init(
                listen: ["127.0.0.1"], maxConnections: 0, handshakeTimeout: 10, queueSize: 256, maxPayload: 64 << 20))
        XCTAssertEqual(m.listeners, [.tcp(host: "127.0.0.1", port: 10809)])
        XCTAssertEqual(m.limits, .init(maxConnections: 0, handshakeTimeout: 10))
        XCTAssertEqual(m.exports[0].queueSize, 256)
        XCTAssertEqual(m.exports[0].maxPayload, 64 << 20)
        XCTAssertEqual(try f.merged(with: .init(port: 10809)).listeners, [.tcp(host: "127.0.0.1", port: 10809)])
        XCTAssertEqual(try f.merged(with: .init()), f, "no flags: the file as written")
    }

    /// `--listen` takes what the file's `listen:` takes, repeatedly, each with its own port or -p's.
    func testRepeatedListenWithPorts() throws {
        let none = VirtNBDConfig.fromCommandLine
        XCTAssertEqual(
            try none(.init(listen: ["127.0.0.1:10810", "[::1]:10811", "/run/n.sock"])).listeners,
            [.tcp(host: "127.0.0.1", port: 10810), .tcp(host: "::1", port: 10811), .unix(path: "/run/n.sock")])
        XCTAssertEqual(
            try none(.init(port: 7000, listen: ["127.0.0.1", "::2", "[::1]"])).listeners,
            [.tcp(host: "127.0.0.1", port: 7000), .tcp(host: "::2", port: 7000), .tcp(host: "::1", port: 7000)])
        XCTAssertEqual(try none(.init(listen: ["localhost"])).listeners, [.tcp(host: "localhost", port: 10809)])
        for (flags, problem) in [
            (CommandLineOverrides(listen: ["127.0.0.1", "127.0.0.1:10809"]), "given twice"),
            (CommandLineOverrides(listen: ["127.0.0.1", "::"]), "overlaps"),
            (CommandLineOverrides(port: 7000, listen: ["127.0.0.1:7001"]), "names port 7001 but -p says 7000"),
            (CommandLineOverrides(port: 7000, listen: ["/run/n.sock"]), "has no port"),
            (CommandLineOverrides(listen: ["127.0.0.1:99999"]), "no valid port"),
            (CommandLineOverrides(listen: [":10809"]), "has no host"),
        ] {
            XCTAssertThrowsError(try none(flags), "\(flags.listen)") { e in
                XCTAssertTrue("\(e)".contains(problem), "\(e)")
                XCTAssertEqual((e as? ConfigError)?.keyPath, "--listen")
            }
        }
    }

    func testSizeText() {
        XCTAssertEqual(try ByteSizeText.parse("64MiB").get(), 64 << 20)
        XCTAssertEqual(try ByteSizeText.parse("1GiB").get(), 1 << 30)
        XCTAssertEqual(try ByteSizeText.parse("64mb").get(), 64 << 20)
        XCTAssertEqual(try ByteSizeText.parse(" 2T ").get(), 2 << 40)
        XCTAssertEqual(try ByteSizeText.parse("512").get(), 512)
        XCTAssertEqual(try ByteSizeText.parse("512B").get(), 512)
        let bad: [(String, SizeProblem)] = [
            ("12Q", .unit("Q")), ("0", .zero), ("1.5M", .fraction), ("-1", .negative), ("", .empty),
            ("M", .empty), ("99999999T", .overflow), ("4BB", .unit("BB")), ("1 M", .unit(" M")),
        ]
        for (text, problem) in bad {
            XCTAssertEqual(ByteSizeText.parse(text), .failure(problem), text)
        }
    }

    func testMaxPayload() throws {
        let c = try VirtNBDConfig.parse(
            """
            exports:
              - { name: a, device: ram, size: 1M, max-payload: 2M }
              - { name: b, device: ram, size: 1M }
            """)
        XCTAssertEqual(c.exports.map(\.maxPayload), [2 << 20, ExportConfig.defaultMaxPayload])
        XCTAssertEqual(ExportConfig.defaultMaxPayload, 64 << 20)
        XCTAssertEqual(try c.merged(with: .init(maxPayload: 1 << 20)).exports.map(\.maxPayload), [1 << 20, 1 << 20])
        XCTAssertEqual(
            try c.merged(with: .init(exportName: "b", maxPayload: 4096)).exports.map(\.maxPayload), [2 << 20, 4096])
        XCTAssertEqual(
            try VirtNBDConfig.fromCommandLine(.init(size: 1 << 20, maxPayload: 1 << 30)).exports[0].maxPayload, 1 << 30)
        XCTAssertEqual(
            message("exports: [{ name: a, device: ram, size: 1M, max-payload: 2G }]"),
            "virtnbd.yaml:1: exports[0].max-payload: 2147483648 bytes is not from 4K to 1G; use e.g. 64M (the default)")
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(maxPayload: 1024))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "command line: --max-payload: 1024 bytes is not from 4K to 1G; use e.g. 64M (the default)")
        }
    }

    func testCredentialFlagsImplyTLSOn() throws {
        XCTAssertEqual(
            try VirtNBDConfig.fromCommandLine(.init(tlsCertificates: "/pki")).tls,
            .init(policy: .on, certificates: "/pki"))
        XCTAssertEqual(try VirtNBDConfig.fromCommandLine(.init(tlsPsk: "/k.psk")).tls.policy, .on)
        XCTAssertEqual(
            try VirtNBDConfig.fromCommandLine(.init(tls: .off, tlsCertificates: "/pki")).tls.policy, .off,
            "an explicit --tls off stays off")
        XCTAssertEqual(
            try VirtNBDConfig.fromCommandLine(.init(tls: .require, tlsCertificates: "/pki")).tls.policy, .require)
        XCTAssertEqual(try file.merged(with: .init(tlsPsk: "/k.psk")).tls.policy, .on, "the file's policy stays")
        var req = file
        req.tls.policy = .require
        XCTAssertEqual(try req.merged(with: .init(tlsPsk: "/k.psk")).tls.policy, .require)
    }

    func testMetricsCollisionNamesBothSides() {
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(port: 20034, metrics: "127.0.0.1:20034"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "command line: --metrics: 127.0.0.1:20034 collides with the NBD listener -p/--listen (127.0.0.1:20034); give --metrics its own port, e.g. 127.0.0.1:9100"
            )
        }
        var c = file
        c.metrics = "127.0.0.1:9100"
        XCTAssertThrowsError(try c.merged(with: .init(port: 9100))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                "virtnbd.yaml: --port: 127.0.0.1:9100 collides with metrics (127.0.0.1:9100); choose another port with -p, or move metrics"
            )
        }
    }
}

final class AllowConfigTests: XCTestCase {
    func testAllowListAndSingleValue() throws {
        let c = try VirtNBDConfig.parse(
            """
            allow:
              - 10.0.0.0/8
              - ::1/128
              - 192.168.1.7
            exports: [{ name: a, device: simulated }]
            """)
        XCTAssertEqual(c.allow.description, "10.0.0.0/8, ::1/128, 192.168.1.7/32")
        XCTAssertEqual(
            try VirtNBDConfig.parse("allow: 127.0.0.0/8\nexports: [{ name: a, device: simulated }]").allow.description,
            "127.0.0.0/8")
        XCTAssertTrue(
            try VirtNBDConfig.parse("exports: [{ name: a, device: simulated }]").allow.allowsEveryone,
            "no allow: everyone")
    }

    func testBadAllowEntriesNameTheLine() {
        XCTAssertEqual(
            message(
                """
                allow:
                  - 10.0.0.0/8
                  - 10.0.0.1/8
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:3: allow[1]: "10.0.0.1/8" has bits set after the prefix; write the network 10.0.0.0/8, or the single host with /32"#
        )
        XCTAssertEqual(
            message(
                """
                allow:
                  - ::1/129
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:2: allow[0]: "::1/129" has no valid prefix length; after the / write a whole number from 0 to 128"#
        )
        // In a flow list ([…]) YAML needs IPv6 quoted: a leading ":" is not plain text there.
        XCTAssertEqual(
            try VirtNBDConfig.parse(#"allow: ["::1/128", 10.0.0.0/8]"# + "\nexports: [{ name: a, device: simulated }]")
                .allow.description,
            "::1/128, 10.0.0.0/8")
        XCTAssertEqual(
            message(
                """
                allow: [localhost]
                exports: [{ name: a, device: simulated }]
                """),
            #"virtnbd.yaml:1: allow[0]: "localhost" is not an IPv4 or IPv6 address; write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8 (no brackets, no port, no host names)"#
        )
        XCTAssertEqual(
            message(
                """
                allow: []
                exports: [{ name: a, device: simulated }]
                """),
            "virtnbd.yaml:1: allow: an empty list would refuse every TCP client; list the networks allowed, e.g. allow: [127.0.0.0/8, ::1/128], or leave allow out to allow everyone"
        )
        XCTAssertEqual(kind("allow: { net: 10.0.0.0/8 }\nexports: [{ name: a, device: simulated }]"), .wrongType)
        XCTAssertEqual(kind("allow:\nexports: [{ name: a, device: simulated }]"), .missingValue)
    }

    func testAllowFlagReplacesTheFileList() throws {
        let file = try VirtNBDConfig.parse("allow: [10.0.0.0/8]\nexports: [{ name: a, device: simulated }]")
        XCTAssertEqual(try file.merged(with: .init()).allow, file.allow, "no --allow keeps the file's list")
        let flag = try AccessList(parsing: ["127.0.0.1", "::1/128"])
        XCTAssertEqual(try file.merged(with: .init(allow: flag)).allow, flag)
        XCTAssertEqual(try VirtNBDConfig.fromCommandLine(.init(allow: flag)).allow, flag)
    }

    func testExampleConfigAllowsLoopback() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let c = try VirtNBDConfig.load(path: root.appendingPathComponent("Config/virtnbd.yaml").path)
        XCTAssertEqual(c.allow.description, "127.0.0.0/8, ::1/128")
    }
}
