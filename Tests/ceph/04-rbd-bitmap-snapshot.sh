#!/usr/bin/env bash
# 04-rbd-bitmap-snapshot: the block layers work over an RBD export as over a file.
#   --bitmap b0: seeded unaligned writes, a zero and a trim; qemu:dirty-bitmap:b0 marks exactly
#   the 64 KiB chunks they touched (a model of the requests), and nothing else.
#   --snapshot (RAM overlay, and --snapshot-overlay file): writes, zeroes and trims read back
#   through the export, and the image (rbd export) is byte for byte what it was.
# Random data prints its seed (replay: RBD_SEED=N).
. "$(dirname "$0")/lib.sh"
need_cmd python3 sha256sum
SEED=${RBD_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed=$SEED (replay: RBD_SEED=$SEED)"
img=$(new_image bits 16M)
spec="rbd:$img@$CEPH_CONF"

cat >"$T/bm.py" <<'PY'
# bm.py URI SEED: random requests, then the dirty bitmap against the chunks they touched.
import random, sys, nbd
G = 65536
uri, seed = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.add_meta_context("qemu:dirty-bitmap:b0"); h.connect_uri(uri)
size, r, want = h.get_size(), random.Random(seed), set()
def touch(off, n): want.update(range(off // G, (off + n - 1) // G + 1))
for i in range(40):
    off, n = r.randrange(0, size - 200000), r.randrange(1, 200000)
    h.pwrite(r.randbytes(n), off); touch(off, n)
off = r.randrange(0, size - 300000); h.zero(300000, off); touch(off, 300000)
off = r.randrange(0, size - 300000) // 4096 * 4096; h.trim(262144, off); touch(off, 262144)
h.flush()
got, pos = set(), 0
while pos < size:
    seen = []
    h.block_status(size - pos, pos, lambda ctx, o, e, err: seen.append(list(e)) or 0)
    e = seen[0]
    for i in range(0, len(e), 2):
        if e[i + 1] & 1: got.update(range(pos // G, (pos + e[i]) // G))
        pos += e[i]
print(("ok|" if got == want else "fail|") + "--bitmap over rbd: qemu:dirty-bitmap:b0 marks exactly the %d chunks the requests touched|extra %s missing %s" % (len(want), sorted(got - want)[:8], sorted(want - got)[:8]))
PY

# 1. --bitmap
start_server --device "$spec" --bitmap b0 --bitmap-granularity 64K
run_py_checks "$T/bm.py" "$URI" "$SEED"
stop_server

# 2. --snapshot, RAM and file overlays.
expect_ok "rbd export before the --snapshot runs" rbd export --no-progress "$img" "$T/before.raw"
before=$(sha256_of "$T/before.raw")
for overlay in ram file; do
    start_server --device "$spec" --snapshot-overlay "$overlay"
    /usr/bin/python3 - "$URI" >"$T/snap.out" 2>&1 <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"S" * 10000, 12345); h.zero(70000, 1 << 20); h.trim(1 << 20, 4 << 20)
assert h.pread(10000, 12345) == b"S" * 10000, "write not read back"
assert h.pread(70000, 1 << 20) == bytes(70000), "zeroes not read back"
h.flush()
print("readback ok")
PY
    check_eq "--snapshot-overlay $overlay over rbd: writes, zeroes and trims read back" "readback ok" \
        "$(tail -1 "$T/snap.out")"
    stop_server
    rm -f "$T/after.raw"
    expect_ok "rbd export after the --snapshot-overlay $overlay run" rbd export --no-progress "$img" "$T/after.raw"
    check_eq "--snapshot-overlay $overlay over rbd: the image is byte for byte unchanged" "$before" \
        "$(sha256_of "$T/after.raw")"
done
finish
