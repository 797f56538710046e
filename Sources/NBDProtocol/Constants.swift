// Protocol constants, from doc/proto.md of the NBD project (not from nbd.h; see README).
// Section names below are headings of that document.

/// "Newstyle negotiation" and "Transmission" magics.
public enum NBDMagic {
    public static let nbdmagic: UInt64 = 0x4e42_444d_4147_4943 // "NBDMAGIC"
    public static let ihaveopt: UInt64 = 0x4948_4156_454F_5054 // "IHAVEOPT"
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    public static let extendedReply: UInt32 = 0x6e8a_278c
}

/// "Handshake flags" (server) and "Client flags".
public enum NBDHandshakeFlags {
    public static let fixedNewstyle: UInt16 = 1 << 0
    public static let noZeroes: UInt16 = 1 << 1
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1
    public static let knownClientFlags: UInt32 = clientFixedNewstyle | clientNoZeroes
}

/// "Option types".
public enum NBDOption: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// "Option reply types".
public enum NBDReply {
    public static let ack: UInt32 = 1, server: UInt32 = 2, info: UInt32 = 3, metaContext: UInt32 = 4
    public static let errUnsup: UInt32 = 0x8000_0001, errPolicy: UInt32 = 0x8000_0002, errInvalid: UInt32 = 0x8000_0003
    public static let errPlatform: UInt32 = 0x8000_0004, errTLSReqd: UInt32 = 0x8000_0005,
        errUnknown: UInt32 = 0x8000_0006
    public static let errShutdown: UInt32 = 0x8000_0007, errBlockSizeReqd: UInt32 = 0x8000_0008,
        errTooBig: UInt32 = 0x8000_0009
    public static let errExtHeaderReqd: UInt32 = 0x8000_000a
}

/// NBD_INFO_* types ("NBD_OPT_INFO and NBD_OPT_GO").
public enum NBDInfo {
    public static let export: UInt16 = 0, name: UInt16 = 1, description: UInt16 = 2, blockSize: UInt16 = 3
}

/// "Transmission flags".
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = Self(rawValue: 1 << 0)
    public static let readOnly = Self(rawValue: 1 << 1)
    public static let sendFlush = Self(rawValue: 1 << 2)
    public static let sendFUA = Self(rawValue: 1 << 3)
    public static let rotational = Self(rawValue: 1 << 4)
    public static let sendTrim = Self(rawValue: 1 << 5)
    public static let sendWriteZeroes = Self(rawValue: 1 << 6)
    public static let sendDF = Self(rawValue: 1 << 7)
    public static let canMultiConn = Self(rawValue: 1 << 8)
    public static let sendResize = Self(rawValue: 1 << 9)
    public static let sendCache = Self(rawValue: 1 << 10)
    public static let sendFastZero = Self(rawValue: 1 << 11)
    public static let blockStatusPayload = Self(rawValue: 1 << 12)
}

/// "Request types".
public enum NBDCommand: UInt16, Sendable {
    case read = 0
    case write = 1
    case disc = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
    case resize = 8
}

/// "Command flags".
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = Self(rawValue: 1 << 0)
    public static let noHole = Self(rawValue: 1 << 1)
    public static let df = Self(rawValue: 1 << 2)
    public static let reqOne = Self(rawValue: 1 << 3)
    public static let fastZero = Self(rawValue: 1 << 4)
    public static let payloadLen = Self(rawValue: 1 << 5)
}

/// "Error values".
public enum NBDErrno: UInt32, Sendable, Error {
    case perm = 1
    case io = 5
    case nomem = 12
    case inval = 22
    case nospc = 28
    case overflow = 75
    case notsup = 95
    case shutdown = 108
}
