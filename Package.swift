// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "virtnbd",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "virtnbd", targets: ["virtnbd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // The C shim: memfd, eventfd, poll, fixed-width volatile access and fences.
        .target(name: "CVirtShim"),
        // NBD wire formats and state machines. Pure values, no I/O.
        .target(name: "NBDProtocol", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        // DMA arena, rings, features, transport protocol.
        .target(name: "Virtio", dependencies: ["CVirtShim", .product(name: "NIOCore", package: "swift-nio")]),
        // The virtio-blk driver.
        .target(name: "VirtioBlock", dependencies: ["Virtio", .product(name: "NIOCore", package: "swift-nio"), .product(name: "Logging", package: "swift-log")]),
        // The in-process virtio-blk device (virtio-mmio register model, own thread).
        .target(name: "VirtioEmulator", dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")]),
        // The vhost-user-blk front end: a VirtioTransport over a vhost-user Unix socket.
        .target(name: "VhostUser", dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")]),
        // The VFIO virtio-pci transport: a virtio-blk PCI device bound to vfio-pci, driven from user space.
        .target(name: "VFIO", dependencies: ["Virtio", "CVirtShim", .product(name: "Logging", package: "swift-log")]),
        // Client address rules (--allow CIDR). Pure values.
        .target(name: "AccessControl"),
        // SwiftNIO glue: listeners and per-connection handlers.
        .target(name: "NBDServer", dependencies: [
            "NBDProtocol", "VirtioBlock", "AccessControl",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The operator's configuration file (YAML) and its merge with command-line flags. Pure values.
        .target(name: "ServerConfig", dependencies: ["AccessControl", .product(name: "Yams", package: "Yams")]),
        .executableTarget(name: "virtnbd", dependencies: [
            "NBDServer", "NBDProtocol", "VirtioBlock", "VirtioEmulator", "Virtio", "VhostUser", "VFIO", "ServerConfig", "AccessControl",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .systemLibrary(name: "CNBD", path: "Tests/CNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .testTarget(name: "NBDProtocolTests", dependencies: ["NBDProtocol"]),
        .testTarget(name: "ServerConfigTests", dependencies: ["ServerConfig", "AccessControl"]),
        .testTarget(name: "AccessControlTests", dependencies: ["AccessControl"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VirtioBlock", "VirtioEmulator", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "VirtioBlock", "Virtio", .product(name: "NIOCore", package: "swift-nio")]),
        .testTarget(name: "IntegrationTests", dependencies: [
            "CNBD", "NBDServer", "VirtioBlock", "VirtioEmulator",
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
