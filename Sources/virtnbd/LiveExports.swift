// The exports of the running server: opened at start, changed by SIGHUP (configuration reload).
// Owned by `ServeOptions.serve`'s task; reloads are handled one at a time, in the order the signals came.
import BlockLayer
import Foundation
import Logging
import NBDProtocol
import NBDServer
import VirtioBlock

/// One export being served: the plan it was opened from, its device, and its NBD side.
struct LiveExport {
    var plan: ServeOptions.ExportPlan
    let disk: ServedDisk
    let export: NBDExport
    /// Files opening it created (a new image, its new bitmap file): a start that fails removes them.
    var createdFiles: [String] = []

    /// Opens the export's device.
    static func open(_ p: ServeOptions.ExportPlan, logger: Logger) throws(ExportOpenError) -> LiveExport {
        var elog = logger
        elog[metadataKey: "export"] = "\(p.name)"
        let d: ServedDisk
        do {
            d = try p.device.open(
                size: p.size, sizeKey: p.sizeKey, file: p.file, readOnly: p.readOnly, options: p.driver,
                devicePollMicroseconds: p.devicePollMicroseconds, deviceInline: p.deviceInline, logger: elog)
        } catch { throw ExportOpenError(name: p.name, underlying: "\(error)") }
        var created = d.createdFiles
        let bitmapFile = p.file.map { $0 + ".bitmaps" }
        if let b = bitmapFile, !FileManager.default.fileExists(atPath: b) { created.append(b) }
        let layers: (BlockLayer?, DirtyBitmaps?)
        do { layers = try stack(p, over: d.device, logger: elog) } catch {
            d.shutdown()
            removeFiles(created)
            throw ExportOpenError(name: p.name, underlying: "\(error)")
        }
        return LiveExport(
            plan: p, disk: d,
            export: NBDExport(
                name: p.name, description: p.description, device: d.device, forceReadOnly: p.readOnly,
                maximumPayload: p.maxPayload, allowedClients: p.allowedClients,
                requiresTLS: p.requiresTLS, stack: layers.0, bitmaps: layers.1),
            createdFiles: created)
    }

    /// Removes what a failed start created (only paths that did not exist before it).
    static func removeFiles(_ paths: [String]) { for f in paths { unlink(f) } }

    /// The export's block layers over its device, bottom up: the snapshot overlay, then dirty
    /// tracking (so it sees every write the client makes). Nil: none, requests go to the device.
    /// Tracking is there with --bitmap, with a bitmap file beside the image, and with --control
    /// (so that `virtnbd bitmap add` can start one).
    static func stack(_ p: ServeOptions.ExportPlan, over device: BlockDevice, logger: Logger) throws(BitmapError) -> (
        BlockLayer?, DirtyBitmaps?
    ) {
        var top: BlockLayer = device
        if p.snapshot {
            do { top = try SnapshotOverlay(over: top, storage: overlayStorage(p)) } catch {
                throw .persistence(path: error.directory, error.description)
            }
        }
        guard !p.bitmaps.isEmpty || p.tracking || !p.snapshot && hasBitmapFile(p) else {
            return (p.snapshot ? top : nil, nil)
        }
        // A file export's bitmaps persist beside it, unless its writes are thrown away.
        let file = p.snapshot ? nil : p.file.map { $0 + ".bitmaps" }
        let bitmaps = try DirtyBitmaps(size: top.size, file: file, logger: logger)
        try bitmaps.ensure(p.bitmaps, granularity: p.bitmapGranularity)
        return (DirtyTracking(over: top, bitmaps: bitmaps), bitmaps)
    }

    /// A file overlay sits beside the image (the same filesystem, the same space), else in TMPDIR.
    private static func overlayStorage(_ p: ServeOptions.ExportPlan) -> SnapshotOverlay.Storage {
        guard p.snapshotOverlay == .file else { return .ram }
        if let f = p.file {
            let dir = (f as NSString).deletingLastPathComponent
            return .file(directory: dir.isEmpty ? "." : dir)
        }
        let tmp = ProcessInfo.processInfo.environment["TMPDIR"] ?? ""
        return .file(directory: tmp.isEmpty ? "/var/tmp" : tmp)
    }

    private static func hasBitmapFile(_ p: ServeOptions.ExportPlan) -> Bool {
        p.file.map { FileManager.default.fileExists(atPath: $0 + ".bitmaps") } ?? false
    }

    /// Drains, flushes and resets the device, saves the bitmaps; removes the export's metrics series.
    func close() {
        disk.shutdown()
        export.bitmaps?.close()
        export.metrics.destroy()
    }
}

struct ExportOpenError: Error, CustomStringConvertible {
    let name: String
    let underlying: String
    var description: String { "cannot start the device of export \"\(name)\": \(underlying)" }
}

/// What a reload did, for the log.
struct ReloadSummary: CustomStringConvertible {
    var added: [String] = [], removed: [String] = [], changed: [String] = [], unchanged = 0
    /// Exports whose description or client rules changed: the device and its clients stay.
    var updated: [String] = []
    /// Changed exports whose new device could not be opened: no longer served.
    var lost: [String] = []

    var description: String {
        func list(_ n: [String]) -> String { n.isEmpty ? "none" : n.map { "\"\($0)\"" }.joined(separator: ", ") }
        var s = "added \(list(added)); removed \(list(removed)); replaced \(list(changed))"
        s += "; updated in place \(list(updated)); \(unchanged) unchanged"
        if !lost.isEmpty { s += "; NOT SERVED (device failed to open): \(list(lost))" }
        return s
    }
}

struct ExportSet {
    private(set) var live: [LiveExport]

    init(_ live: [LiveExport]) { self.live = live }

    /// Opens every planned export, or none: on a failure the devices already opened are shut down.
    static func open(_ plans: [ServeOptions.ExportPlan], logger: Logger) throws(ExportOpenError) -> ExportSet {
        var live: [LiveExport] = []
        for p in plans {
            do { live.append(try LiveExport.open(p, logger: logger)) } catch {
                ExportSet(live).closeAll(removingCreatedFiles: true)
                throw error
            }
        }
        return ExportSet(live)
    }

    var exports: [NBDExport] { live.map(\.export) }

    /// Serves `plans` from now on, touching only exports whose plan differs:
    /// 1. the devices of new exports are opened; if one fails, nothing changes and the error is thrown;
    /// 2. the server's catalog is swapped: new exports appear, removed and changed ones disappear;
    ///    clients of those finish their in-flight requests and are disconnected, then their
    ///    devices are shut down; clients of unchanged exports are not touched;
    /// 3. the devices of changed exports are opened again (after the old one is closed, as they
    ///    may share a file) and appear in the catalog.
    mutating func reload(to plans: [ServeOptions.ExportPlan], server: NBDServer, logger: Logger)
        async throws(ExportOpenError) -> ReloadSummary
    {
        var summary = ReloadSummary()
        let old = Dictionary(live.map { ($0.plan.name, $0) }, uniquingKeysWith: { a, _ in a })
        let newNames = Set(plans.map(\.name))
        var opened: [String: LiveExport] = [:]
        for p in plans where old[p.name] == nil {
            do { opened[p.name] = try LiveExport.open(p, logger: logger) } catch {
                for o in opened.values { o.close() }
                throw error
            }
            summary.added.append(p.name)
        }
        summary.removed = live.map(\.plan.name).filter { !newNames.contains($0) }
        // A change to the description or to who may connect is made in place: same device, same clients.
        var kept = old
        for p in plans {
            guard var o = old[p.name], o.plan != p, o.plan.sameDevice(as: p) else { continue }
            o.export.present(p.presentation)
            o.plan = p
            kept[p.name] = o
            summary.updated.append(p.name)
        }
        let changed = plans.filter { p in kept[p.name].map { $0.plan != p } ?? false }
        summary.changed = changed.map(\.name)
        summary.unchanged = plans.count - summary.added.count - changed.count - summary.updated.count
        for p in changed { if let o = old[p.name] { warnReplacing(o, with: p, server: server, logger: logger) } }

        // Step 2: in the new file's order, without the changed exports for now.
        let step2 = plans.compactMap { p -> LiveExport? in
            if let o = kept[p.name] { return o.plan == p ? o : nil }
            return opened[p.name]
        }
        let retired = await server.replaceExports(step2.map(\.export))
        for l in live where retired.contains(where: { $0 === l.export }) {
            l.close()
            server.release(l.export)
        }
        live = step2

        // Step 3.
        guard !changed.isEmpty else { return summary }
        var reopened: [String: LiveExport] = [:]
        for p in changed {
            do { reopened[p.name] = try LiveExport.open(p, logger: logger) } catch {
                logger.error("\(error); the export is not served until a reload opens it")
                summary.lost.append(p.name)
            }
        }
        live = plans.compactMap { p in reopened[p.name] ?? live.first { $0.plan.name == p.name } }
        _ = await server.replaceExports(live.map(\.export))
        return summary
    }

    /// A reload that replaces a device says, at warning level, what that costs: its clients are
    /// disconnected, and a RAM disk's bytes are gone.
    private func warnReplacing(_ o: LiveExport, with p: ServeOptions.ExportPlan, server: NBDServer, logger: Logger) {
        let what = o.plan.differences(from: p).joined(separator: ", ")
        let clients = server.clientCount(of: o.export)
        var loss = "its \(clients) client(s) are disconnected"
        if o.plan.file == nil && o.plan.device == .emulator {
            loss += " and the data of its RAM disk (\(o.export.info.size) bytes) is discarded"
        }
        logger.warning("reload: export \"\(p.name)\" gets a new device (\(what)): \(loss)")
    }

    /// Shuts down every device (the server has drained its clients). After a start that failed,
    /// `removingCreatedFiles` also removes the images and bitmap files the start created, so that
    /// a configuration that cannot start leaves nothing behind.
    /// Returns the files removed.
    @discardableResult
    func closeAll(removingCreatedFiles: Bool = false) -> [String] {
        var removed: [String] = []
        for l in live {
            l.close()
            if removingCreatedFiles {
                LiveExport.removeFiles(l.createdFiles)
                removed += l.createdFiles
            }
        }
        return removed
    }
}
