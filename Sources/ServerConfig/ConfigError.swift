/// Everything that can be wrong with a configuration, located as precisely as the source allows:
/// `FILE:LINE: KEY.PATH: what is wrong; how to fix it`, or `FILE: KEY.PATH: …` when the value has
/// no line (it came from a command-line flag, whose name is then the key path).
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, Equatable {
        case unreadable, syntax, empty
        case unknownKey, duplicateKey, wrongType, missingValue, badValue
        case missingDevice, duplicateExport, sharedDevice, listenerCollision, tlsCredentials
        case noSuchExport, ambiguousFlag
    }

    public var kind: Kind
    public var file: String
    public var line: Int?
    /// e.g. `exports[1].size`, or a flag such as `--tls`.
    public var keyPath: String
    public var problem: String
    public var fix: String

    public init(_ kind: Kind, file: String, line: Int?, keyPath: String, problem: String, fix: String) {
        self.kind = kind
        self.file = file
        self.line = line
        self.keyPath = keyPath
        self.problem = problem
        self.fix = fix
    }

    public var description: String {
        let at = line.map { "\(file):\($0)" } ?? file
        let key = keyPath.isEmpty ? "" : "\(keyPath): "
        return "\(at): \(key)\(problem); \(fix)"
    }
}
