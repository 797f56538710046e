#!/usr/bin/env bash
# Read-only exports (-r): reads work, writes/trim/write-zeroes fail (EPERM from
# the server when the client does not stop them itself, with or without FUA,
# FAST_ZERO or NO_HOLE), FLUSH succeeds (it writes nothing), and the backing file
# is unchanged afterwards.
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io nbdcopy cmp

size=$((4 * 1024 * 1024))
head -c "$size" /dev/urandom >"$T/ro.img"
cp "$T/ro.img" "$T/ro.orig"

start_server -r --file "$T/ro.img"
ro=$(nbdinfo --json "$URI" 2>&1 | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["is_read_only"])' 2>&1)
check_eq "nbdinfo --json is_read_only" "True" "$ro"

expect_ok "nbdcopy reads the read-only export" nbdcopy "$URI" "$T/back.img"
check_eq "content read equals the file" "$(sha256_of "$T/ro.orig")" "$(sha256_of "$T/back.img" 2>&1)"
expect_ok "qemu-io -r reads 4 KiB at an odd offset" qemu-io -r -f raw -c "read 12345 4096" "$URI"

expect_fail "qemu-io write on the read-only export fails" 'read-only|Read-only|not permitted|Permission denied' \
    qemu-io -f raw -c "write -P 0xab 0 4096" "$URI"

# A client that does not check the read-only flag itself (libnbd with strict
# mode off) sends the requests; the server must refuse them.
cat >"$T/ro.py" <<'PY'
import errno, sys, nbd
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail else ""), flush=True)
def expect_err(desc, fn, allowed):
    try:
        fn()
        out(False, desc, "expected an error (%s), the request succeeded" % "/".join(errno.errorcode[e] for e in allowed))
    except nbd.Error as e:
        out(e.errnum in allowed, desc, "expected %s, got %s (%s)" % ("/".join(errno.errorcode[e] for e in allowed), e.errno, e.string))
before = bytes(h.pread(4096, 0))
expect_err("server refuses WRITE on a read-only export with EPERM", lambda: h.pwrite(b"\xab" * 4096, 0), {errno.EPERM})
# TRIM / WRITE_ZEROES: EPERM if advertised; an unadvertised command may also get EINVAL.
expect_err("server refuses TRIM on a read-only export", lambda: h.trim(4096, 0),
           {errno.EPERM} if h.can_trim() else {errno.EPERM, errno.EINVAL})
expect_err("server refuses WRITE_ZEROES on a read-only export", lambda: h.zero(4096, 0),
           {errno.EPERM} if h.can_zero() else {errno.EPERM, errno.EINVAL})
# The same commands with their flags (FUA, FAST_ZERO, NO_HOLE): still EPERM (EINVAL is also
# acceptable when the flag was not advertised).
fua = nbd.CMD_FLAG_FUA
expect_err("server refuses WRITE+FUA on a read-only export", lambda: h.pwrite(b"\xab" * 4096, 0, fua),
           {errno.EPERM} if h.can_fua() else {errno.EPERM, errno.EINVAL})
expect_err("server refuses WRITE_ZEROES+FAST_ZERO on a read-only export", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
           {errno.EPERM} if h.can_fast_zero() else {errno.EPERM, errno.EINVAL})
expect_err("server refuses WRITE_ZEROES+NO_HOLE on a read-only export", lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE),
           {errno.EPERM} if h.can_zero() else {errno.EPERM, errno.EINVAL})
# FLUSH writes nothing: the spec asks for EPERM only on writes, trims and zeroes ("Error values"),
# and nbdkit -r advertises and serves FLUSH. So do we, when advertised.
if h.can_flush():
    try:
        h.flush(); out(True, "FLUSH on a read-only export succeeds (it writes nothing; as nbdkit -r)")
    except nbd.Error as e:
        out(False, "FLUSH on a read-only export succeeds (it writes nothing; as nbdkit -r)", e.string)
else:
    out(True, "FLUSH not advertised on this read-only export (nothing to check)")
after = bytes(h.pread(4096, 0))
out(after == before, "same connection still reads, data unchanged after refused writes")
h.shutdown()
PY
run_py_checks "$T/ro.py" "$URI"

stop_server
if cmp "$T/ro.orig" "$T/ro.img" >"$T/cmp.out" 2>&1; then pass "backing file unchanged (cmp)"; else fail "backing file unchanged (cmp)" "$(cat "$T/cmp.out")"; fi

# RAM disk with -r: read-only as well.
start_server -r
check_eq "default disk with -r: nbdinfo --size" 524288 "$(nbdinfo --size "$URI" 2>&1)"
expect_fail "default disk with -r: qemu-io write fails" 'read-only|Read-only|not permitted|Permission denied' \
    qemu-io -f raw -c "write -P 0xab 0 512" "$URI"
expect_ok "default disk with -r: qemu-io -r reads zeroes" qemu-io -r -f raw -c "read -P 0 0 524288" "$URI"
stop_server
finish
