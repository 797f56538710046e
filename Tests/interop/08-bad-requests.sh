#!/usr/bin/env bash
# Bad requests (out of range, overflowing offsets), sent with libnbd's strict
# mode off so that they reach the server: each gets the error the spec names,
# the connection keeps working, in-flight good requests are unaffected, and a
# second client does not notice.
. "$(dirname "$0")/lib.sh"

start_server --size 1M

cat >"$T/bad.py" <<'PY'
import errno, sys, nbd
uri = sys.argv[1]

def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail and not ok else ""), flush=True)

def names(s): return "/".join(errno.errorcode[e] for e in sorted(s))

def expect_err(desc, fn, allowed):
    try:
        fn()
        out(False, desc, "expected %s, the request succeeded" % names(allowed))
    except nbd.Error as e:
        out(e.errnum in allowed, desc, "expected %s, got %s (%s)" % (names(allowed), e.errno, e.string))

h = nbd.NBD()
h.set_strict_mode(0)          # let bad requests reach the server
h.connect_uri(uri)
h2 = nbd.NBD()
h2.connect_uri(uri)
size = h.get_size()
out(size == 1 << 20, "export size is 1 MiB", "got %d" % size)

A = b"\xab" * 4096
C = b"\xcd" * 4096
h.pwrite(A, 0)
h2.pwrite(C, 8192)

def still_works(what):
    got = bytes(h.pread(4096, 0))
    out(got == A, "connection still works after " + what, "read back %r..." % got[:8])

# Reads past the end: EINVAL (spec: "Error values").
expect_err("READ entirely past the end -> EINVAL", lambda: h.pread(512, size), {errno.EINVAL})
still_works("READ past the end")
expect_err("READ straddling the end -> EINVAL", lambda: h.pread(1024, size - 512), {errno.EINVAL})
still_works("READ straddling the end")
expect_err("READ of 1 byte at offset = size -> EINVAL", lambda: h.pread(1, size), {errno.EINVAL})
expect_err("READ where offset+length overflows 2^64 -> EINVAL", lambda: h.pread(4096, (1 << 64) - 2048), {errno.EINVAL})
expect_err("READ at offset 2^63 -> EINVAL", lambda: h.pread(512, 1 << 63), {errno.EINVAL})
still_works("overflowing READs")
out(bytes(h.pread(1, size - 1)) == b"\0", "READ of the very last byte works")

# Writes past the end: ENOSPC, and nothing of a straddling write lands.
expect_err("WRITE entirely past the end -> ENOSPC", lambda: h.pwrite(b"\xee" * 512, size), {errno.ENOSPC})
expect_err("WRITE straddling the end -> ENOSPC", lambda: h.pwrite(b"\xee" * 1024, size - 512), {errno.ENOSPC})
tail = bytes(h.pread(512, size - 512))
out(tail == b"\0" * 512, "a rejected straddling WRITE changed nothing in range", "last 512 bytes now start %r" % tail[:8])
expect_err("WRITE where offset+length overflows 2^64 -> ENOSPC/EINVAL", lambda: h.pwrite(b"\xee" * 4096, (1 << 64) - 2048), {errno.ENOSPC, errno.EINVAL})
still_works("WRITEs past the end")
if h.can_trim():
    expect_err("TRIM past the end -> EINVAL", lambda: h.trim(4096, size - 512), {errno.EINVAL})
if h.can_zero():
    expect_err("WRITE_ZEROES past the end -> ENOSPC", lambda: h.zero(4096, size - 512), {errno.ENOSPC})
still_works("TRIM/WRITE_ZEROES past the end")

# Pipelined: 16 bad reads interleaved with 16 good ones, all in flight at once.
good, bad = [], []
for i in range(16):
    b = nbd.Buffer(4096)
    good.append((h.aio_pread(b, 0), b))
    bad.append(h.aio_pread(nbd.Buffer(4096), size - 2048 + i))
while h.aio_in_flight() > 0:
    h.poll(-1)
ngood = 0
for c, b in good:
    try:
        h.aio_command_completed(c)
        ngood += b.to_bytearray() == A
    except nbd.Error as e:
        pass
nbad = 0
for c in bad:
    try:
        h.aio_command_completed(c)
    except nbd.Error as e:
        nbad += e.errnum == errno.EINVAL
out(ngood == 16, "16 good READs in flight with bad ones return the right data", "%d of 16 did" % ngood)
out(nbad == 16, "16 bad READs in flight all fail with EINVAL", "%d of 16 did" % nbad)
still_works("pipelined bad READs")

# The second client noticed nothing and sees the first client's data.
out(bytes(h2.pread(4096, 8192)) == C, "second client reads its own data")
out(bytes(h2.pread(4096, 0)) == A, "second client sees the first client's write")
h2.pwrite(C, 12288)
out(bytes(h.pread(4096, 12288)) == C, "first client sees the second client's later write")
h.flush() if h.can_flush() else None
h.shutdown()     # NBD_CMD_DISC; an exception here fails the checker
h2.shutdown()
PY

run_py_checks "$T/bad.py" "$URI"
expect_ok "a new client can still connect (nbdinfo)" nbdinfo --size "$URI"
stop_server
finish
