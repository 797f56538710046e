#!/usr/bin/env bash
# Structured replies, base:allocation block status, DF, CACHE, FAST_ZERO and the multi-conn
# proof, with nbdinfo, qemu-img and libnbd's Python bindings.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io qemu-img

start_server --size 64M
flags=$(nbdinfo --json "$URI" | /usr/bin/python3 -c '
import json,sys
e=json.load(sys.stdin)["exports"][0]
print(",".join(k for k in ["can_flush","can_fua","can_trim","can_zero","can_fast_zero","can_cache","can_df","can_multi_conn"] if e.get(k) is True))')
check_eq "nbdinfo --json: every can_* is true on a writable RAM export" \
    "can_flush,can_fua,can_trim,can_zero,can_fast_zero,can_cache,can_df,can_multi_conn" "$flags"
check_match "nbdinfo reports structured replies and base:allocation" 'base:allocation' "$(nbdinfo --json "$URI")"

# A pattern of writes, trims and zero-writes; then the map must say exactly this.
expect_ok "qemu-io pattern of writes, zeroes and trims" qemu-io -f raw \
    -c "write -P 1 1M 1M" -c "write -z 4M 64k" -c "write -z -u 5M 64k" -c "write -P 2 8M 8k" \
    -c "discard 8M 4k" -c "write -P 3 10000 100" -c "write -P 4 20M 4k" -c "discard 20M 4k" "$URI"
map=$(nbdinfo --map "$URI" | awk '{print $1, $2, $3}' | tr '\n' ';')
want="0 8192 3;8192 4096 0;12288 1036288 3;1048576 1048576 0;2097152 2097152 3;4194304 65536 2;4259840 4132864 3;8392704 4096 0;8396800 58712064 3;"
check_eq "nbdinfo --map after writes, zeroes (NO_HOLE → zero; unmap → hole,zero) and trims" "$want" "$map"

# qemu-img map must agree with nbdinfo --map (zero ⇔ ZERO bit, data ⇔ not HOLE).
qmap=$(qemu-img map --output=json "$URI" | /usr/bin/python3 -c '
import json,sys
out=[]
for e in json.load(sys.stdin):
    f=(0 if e["data"] else 1)|(2 if e["zero"] else 0)
    if out and out[-1][2]==f and out[-1][0]+out[-1][1]==e["start"]: out[-1][1]+=e["length"]
    else: out.append([e["start"],e["length"],f])
print("".join("%d %d %d;"%tuple(x) for x in out))')
check_eq "qemu-img map --output=json agrees with nbdinfo --map" "$want" "$qmap"

# Reads over holes and data come back right (structured OFFSET_HOLE / OFFSET_DATA).
expect_ok "qemu-io reads the pattern back" qemu-io -f raw -c "read -P 0 0 8192" -c "read -P 1 1M 1M" -c "read -P 0 4M 128k" \
    -c "read -P 2 8392704 4k" -c "read -P 0 8M 4k" -c "read -P 3 10000 100" -c "read -P 0 20M 4k" "$URI"

cat >"$T/proto.py" <<'PY'
import errno, sys, nbd
uri = sys.argv[1]
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail else ""), flush=True)
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_strict_mode(0)
h.connect_uri(uri)
out(h.get_structured_replies_negotiated(), "structured replies negotiated")
out(h.can_meta_context("base:allocation"), "base:allocation negotiated")
# Chunks seen for a read spanning a hole and data.
seen = []
def chunk(buf, offset, status, err):
    seen.append((status, offset, len(buf)))
    return 0
buf = h.pread_structured(12288, 4096, chunk)
out(bytes(buf[:4096]) == b"\0"*4096 and bytes(buf[4096:8192]).count(b"\0") < 4096,
    "structured read over hole + data has the right bytes")
kinds = sorted(set(s for s,_,_ in seen))
out(nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, "read answered with OFFSET_HOLE and OFFSET_DATA chunks", str(seen))
seen.clear()
h.pread_structured(65536, 0, chunk, flags=nbd.CMD_FLAG_DF)
out(len(seen) == 1 and seen[0][0] == nbd.READ_DATA and seen[0][2] == 65536, "DF read is one OFFSET_DATA chunk", str(seen))
# Block status with REQ_ONE returns exactly one extent starting at the offset.
ext = []
def bs(meta, offset, entries, err):
    ext.append((meta, offset, list(entries)))
    return 0
h.block_status(1 << 20, 0, bs, flags=nbd.CMD_FLAG_REQ_ONE)
out(len(ext) == 1 and len(ext[0][2]) == 2 and ext[0][2] == [8192, 3], "BLOCK_STATUS REQ_ONE gives one extent", str(ext))
ext.clear()
h.block_status(3 * 4096, 4096, bs)
out(ext and ext[0][2] == [4096, 3, 4096, 0, 4096, 3], "BLOCK_STATUS clips to the request", str(ext))
# FAST_ZERO on a device with WRITE_ZEROES succeeds; CACHE succeeds.
h.zero(65536, 30 << 20, flags=nbd.CMD_FLAG_FAST_ZERO)
out(bytes(h.pread(65536, 30 << 20)) == b"\0"*65536, "FAST_ZERO zeroes")
h.cache(1 << 20, 0)
out(True, "CACHE accepted")
# A READ past the end gets a structured error (EINVAL) and the connection lives on.
try:
    h.pread(4096, (64 << 20) - 1024); out(False, "read past the end must fail")
except nbd.Error as e:
    out(e.errnum == errno.EINVAL, "read past the end: EINVAL in an ERROR chunk", "%s" % e)
out(bytes(h.pread(100, 10000)) == b"\3"*100, "connection still serves after the error")
h.shutdown()

# Multi-conn: write on connection 1, FLUSH on connection 2, connection 0 reads the new data.
hs = []
for i in range(3):
    c = nbd.NBD(); c.connect_uri(uri); hs.append(c)
out(all(c.can_multi_conn() for c in hs), "CAN_MULTI_CONN on every connection")
before = bytes(hs[0].pread(4096, 40 << 20))
hs[1].pwrite(b"\x5a" * 4096, 40 << 20)
hs[2].flush()
out(bytes(hs[0].pread(4096, 40 << 20)) == b"\x5a" * 4096 and before == b"\0"*4096, "multi-conn: write on 1, flush on 2, read on 0 sees it")
for c in hs: c.shutdown()

# Without structured replies a READ gets a simple reply and works too.
s = nbd.NBD(); s.set_request_structured_replies(False); s.connect_uri(uri)
out(not s.get_structured_replies_negotiated() and bytes(s.pread(100, 10000)) == b"\3"*100, "simple replies when not negotiated")
s.shutdown()
PY
run_py_checks "$T/proto.py" "$URI"
stop_server

# A sparse file: its holes are reported as holes; its data as data.
truncate -s 16M "$T/sparse.img"
dd if=/dev/urandom of="$T/sparse.img" bs=1M seek=3 count=1 conv=notrunc status=none
start_server --file "$T/sparse.img"
fmap=$(nbdinfo --map "$URI" | awk '{print $1, $2, $3}' | tr '\n' ';')
check_eq "file export: holes of the file are hole,zero" "0 3145728 3;3145728 1048576 0;4194304 12582912 3;" "$fmap"
stop_server
finish
