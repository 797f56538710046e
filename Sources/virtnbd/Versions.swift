// `virtnbd --version` / `-V`: virtnbd's version and those of the components that decide its
// behaviour, as `nbdkit --version` names its own. The package versions are the ones
// Package.resolved pins (copied here by hand when it changes; Tests/interop/31-cli.sh fails
// when they drift apart); the compiler's comes from `#if compiler`; the git commit from the
// GitCommit build tool plugin (Plugins/GitCommit), which runs before every build.
enum Versions {
    static let virtnbd = "0.1.0"
    /// The commit the binary was built from: `git rev-parse --short HEAD`, with `-dirty` when tracked
    /// files had uncommitted changes, or `unknown` when built outside a git checkout.
    static let commit = GitCommit.short
    /// Package.resolved: swift-nio.
    static let swiftNIO = "2.101.3"
    /// Package.resolved: swift-nio-ssl.
    static let swiftNIOSSL = "2.37.6"
    /// The BoringSSL revision swift-nio-ssl 2.37.6 vendors (Sources/CNIOBoringSSL/hash.txt).
    static let boringSSL = "8eb25be6fa18d475291122887a7bccd3762ff236"
    /// Package.resolved: swift-argument-parser, swift-log, yams.
    static let argumentParser = "1.8.2"
    static let swiftLog = "1.16.2"
    static let yams = "6.2.2"

    /// The Swift compiler that built this binary.
    static var swiftCompiler: String {
        #if compiler(>=6.5)
            return "6.5 or later"
        #elseif compiler(>=6.4)
            return "6.4"
        #elseif compiler(>=6.3.3)
            return "6.3.3 or a later 6.3"
        #elseif compiler(>=6.3.2)
            return "6.3.2"
        #elseif compiler(>=6.3.1)
            return "6.3.1"
        #elseif compiler(>=6.3)
            return "6.3"
        #elseif compiler(>=6.2)
            return "6.2"
        #else
            return "6.1"
        #endif
    }

    static var text: String {
        """
        virtnbd \(virtnbd)
        commit \(commit)
        swift \(swiftCompiler)
        swift-nio \(swiftNIO)
        swift-nio-ssl \(swiftNIOSSL)
        boringssl \(boringSSL)
        swift-argument-parser \(argumentParser)
        swift-log \(swiftLog)
        yams \(yams)

        """
    }
}
