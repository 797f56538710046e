// swift-tools-version:6.1
import PackageDescription

// The ring, driver and device code is optimised in debug builds too: the unit tests push millions
// of requests through it (ring indices wrap past 65535 in every feature combination), which takes
// minutes at -Onone. DEBUG-only test hooks stay, since -D DEBUG is separate from -O.
let ringSpeed: [SwiftSetting] = [.unsafeFlags(["-O"], .when(configuration: .debug))]

let package = Package(
    name: "virtnbd",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "virtnbd", targets: ["virtnbd"]),
        .executable(name: "virtqueue-bench", targets: ["virtqueue-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The C shim: memfd, eventfd, poll, fixed-width volatile access and fences.
        .target(name: "CVirtShim"),
        // NBD wire formats and state machines. Pure values, no I/O.
        .target(name: "NBDProtocol", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        // DMA arena, rings, features, transport protocol.
        .target(
            name: "Virtio", dependencies: ["CVirtShim", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: ringSpeed),
        // The virtio-blk driver.
        .target(
            name: "VirtioBlock",
            dependencies: [
                "Virtio", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ], swiftSettings: ringSpeed),
        // The in-process virtio-blk device (virtio-mmio register model, own thread).
        .target(
            name: "VirtioEmulator",
            dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")],
            swiftSettings: ringSpeed),
        // The emulated disk, built one way for the server and the tests: backend → emulator → driver → block layer.
        .target(
            name: "BlockLayer",
            dependencies: [
                "Virtio", "VirtioBlock", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .target(
            name: "VirtioDisk",
            dependencies: ["Virtio", "VirtioBlock", "VirtioEmulator", .product(name: "Logging", package: "swift-log")],
            swiftSettings: ringSpeed),
        // The vhost-user-blk front end: a VirtioTransport over a vhost-user Unix socket.
        .target(
            name: "VhostUser", dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")]),
        // The VFIO virtio-pci transport: a virtio-blk PCI device bound to vfio-pci, driven from user space.
        .target(name: "VFIO", dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")]),
        // Client address rules (--allow CIDR). Pure values.
        .target(name: "AccessControl"),
        // SwiftNIO glue: listeners and per-connection handlers.
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol", "VirtioBlock", "BlockLayer", "AccessControl",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]),
        // The NBD client: URI parsing, negotiation, pipelined requests (used by `virtnbd info` / `copy`).
        .target(
            name: "NBDClient",
            dependencies: [
                "NBDProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // The operator's configuration file (YAML) and its merge with command-line flags. Pure values.
        .target(name: "ServerConfig", dependencies: ["AccessControl", .product(name: "Yams", package: "Yams")]),
        // Writes the git commit `virtnbd -V` and virtnbd_build_info report (a build command that reruns when HEAD moves).
        .plugin(name: "GitCommit", capability: .buildTool()),
        .executableTarget(
            name: "virtnbd",
            dependencies: [
                "NBDServer", "NBDProtocol", "NBDClient", "BlockLayer", "VirtioBlock", "VirtioEmulator", "VirtioDisk",
                "Virtio", "VhostUser", "VFIO", "ServerConfig", "CVirtShim", "AccessControl",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ], plugins: ["GitCommit"]),
        // The virtqueue round-trip microbenchmark (driver → emulator → completion), release builds.
        .executableTarget(
            name: "virtqueue-bench",
            dependencies: [
                "Virtio", "VirtioBlock", "VirtioDisk", "VirtioEmulator", .product(name: "Logging", package: "swift-log"),
            ]),
        .systemLibrary(name: "CNBD", path: "Tests/CNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .testTarget(name: "NBDProtocolTests", dependencies: ["TestSupport", "NBDProtocol"]),
        // The fuzz targets' entry points, replaying Tests/fuzz/regressions under swift test.
        .testTarget(
            name: "FuzzRegressionTests",
            dependencies: [
                "NBDProtocol", "NBDServer", "TestSupport", "Virtio", "VirtioEmulator",
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tests/fuzz", exclude: ["corpus", "regressions", "make-seeds.py"], sources: ["targets", "replay"],
            swiftSettings: [.define("FUZZ_REPLAY")]),
        .testTarget(
            name: "NBDClientTests",
            dependencies: ["NBDClient", "NBDProtocol", .product(name: "NIOCore", package: "swift-nio")]),
        .testTarget(
            name: "BlockLayerTests",
            dependencies: [
                "TestSupport", "BlockLayer", "VirtioBlock", "VirtioDisk", "VirtioEmulator", "Virtio",
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(name: "ServerConfigTests", dependencies: ["ServerConfig", "AccessControl"]),
        .testTarget(name: "AccessControlTests", dependencies: ["AccessControl"]),
        // Shared by the test targets (a seeded generator, NBD wire bytes and replies, a blocking NBD
        // client, the synchronous device); not a product.
        .target(
            name: "TestSupport",
            dependencies: [
                "VirtioBlock", "VirtioDisk", "VirtioEmulator", .product(name: "Logging", package: "swift-log"),
            ], path: "Tests/TestSupport"),
        .testTarget(
            name: "VirtioTests",
            dependencies: [
                "TestSupport", "Virtio", "VirtioBlock", "VirtioDisk", "VirtioEmulator",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]),
        .testTarget(
            name: "VhostUserTests",
            dependencies: [
                "TestSupport", "VhostUser", "VirtioBlock", "Virtio", .product(name: "NIOCore", package: "swift-nio"),
            ]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "TestSupport", "CNBD", "NBDServer", "BlockLayer", "VirtioBlock", "VirtioEmulator", "VirtioDisk",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)
