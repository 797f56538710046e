import XCTest

@testable import ServerConfig

/// `device: rbd` in the file and `--device rbd:POOL/IMAGE[@CONF]` on the command line.
final class RBDConfigTests: XCTestCase {
    private func parse(_ yaml: String) throws(ConfigError) -> VirtNBDConfig {
        try VirtNBDConfig.parse(yaml, file: "virtnbd.yaml")
    }

    private func message(_ yaml: String) -> String {
        do {
            _ = try parse(yaml)
            return "no error"
        } catch { return error.description }
    }

    func testFileExports() throws {
        let c = try parse(
            """
            exports:
              - { name: a, device: rbd, pool: rbd, image: disk1, conf: /etc/ceph/ceph.conf }
              - { name: b, device: rbd, pool: fast, image: disk2 }
              - { name: c, device: rbd, pool: rbd, image: gold, read-only: true, conf: /etc/ceph/ceph.conf }
              - { name: d, device: rbd, pool: rbd, image: gold, read-only: true }
            """)
        XCTAssertEqual(
            c.exports.map(\.device),
            [
                .rbd(pool: "rbd", image: "disk1", conf: "/etc/ceph/ceph.conf"),
                .rbd(pool: "fast", image: "disk2", conf: nil),
                .rbd(pool: "rbd", image: "gold", conf: "/etc/ceph/ceph.conf"),
                .rbd(pool: "rbd", image: "gold", conf: nil),
            ])
        XCTAssertEqual(c.exports[0].device.kind, "rbd")
        XCTAssertEqual(c.exports[1].device.description, "RBD fast/disk2")
    }

    func testFileErrors() {
        XCTAssertEqual(
            message("exports: [{ name: a, device: rbd, pool: rbd }]"),
            "virtnbd.yaml:1: exports[0].image: device: rbd needs image; add image: disk1")
        XCTAssertEqual(
            message("exports: [{ name: a, device: rbd, pool: r/b, image: x }]"),
            #"virtnbd.yaml:1: exports[0].pool: "r/b" is not an RBD pool name; write a name without "/", "@" or control characters"#
        )
        XCTAssertEqual(
            message("exports: [{ name: a, device: ram, size: 1M, image: x }]"),
            "virtnbd.yaml:1: exports[0].image: not used by device: ram; remove it (only device: rbd takes image)")
        XCTAssertEqual(
            message("exports: [{ name: a, device: rbd, pool: p, image: x, queue-size: 2048 }]"),
            "virtnbd.yaml:1: exports[0].queue-size: 2048 is more than the 1024 a vhost-user ring holds; use 1024 or less (an rbd device is reached over vhost-user)"
        )
        XCTAssertEqual(
            message(
                """
                exports:
                  - { name: a, device: rbd, pool: p, image: x }
                  - { name: b, device: rbd, pool: p, image: x, read-only: true }
                """),
            "virtnbd.yaml:3: exports[1].image: p/x is also served by exports[0] (line 2); two exports may share an RBD image only if both are read-only"
        )
    }

    func testCommandLineSpec() throws {
        XCTAssertEqual(
            Device.rbd(spec: "rbd/disk1@/etc/ceph/ceph.conf"),
            .rbd(pool: "rbd", image: "disk1", conf: "/etc/ceph/ceph.conf"))
        XCTAssertEqual(Device.rbd(spec: "rbd/disk1"), .rbd(pool: "rbd", image: "disk1", conf: nil))
        XCTAssertEqual(Device.rbd(spec: "p/i@a@b"), .rbd(pool: "p", image: "i", conf: "a@b"))
        for bad in ["", "rbd", "rbd/", "/disk", "rbd/disk@", "a/b/c", "rbd/di\nsk"] {
            XCTAssertNil(Device.rbd(spec: bad), bad)
        }
        let c = try VirtNBDConfig.fromCommandLine(.init(device: "rbd:rbd/disk1@/c.conf"))
        XCTAssertEqual(c.exports[0].device, .rbd(pool: "rbd", image: "disk1", conf: "/c.conf"))
        XCTAssertThrowsError(try VirtNBDConfig.fromCommandLine(.init(device: "rbd:nope"))) { e in
            XCTAssertEqual(
                (e as? ConfigError)?.description,
                #"command line: --device: "rbd:nope" is not a device; use emulator, vhost-user:/path/to.sock, vfio:0000:00:05.0 or rbd:POOL/IMAGE[@/etc/ceph/ceph.conf]"#
            )
        }
    }
}
