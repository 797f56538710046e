import Foundation

/// Whether two byte arrays are equal, compared with memcmp. `==` on `[UInt8]` is the standard
/// library's generic element-by-element loop, with a metadata lookup per element, in a debug
/// build (half of a vhost-user test's time under ASan); Foundation's `Data` compares with memcmp.
public func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool { Data(a) == Data(b) }

/// Where two byte arrays first differ, for readable failures.
public func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
    if a.count != b.count { return "lengths \(a.count) vs \(b.count)" }
    guard let i = zip(a, b).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset else { return "equal" }
    let diffCount = zip(a, b).filter { $0 != $1 }.count
    return "first difference at +\(i): \(a[i]) vs \(b[i]) (\(diffCount) bytes differ)"
}
