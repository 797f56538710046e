#!/usr/bin/env bash
# Conformance fixes seen by real clients: a zero-length READ answered in every reply mode
# (nbdsh), a failed SET_META_CONTEXT dropping the earlier selection, 48 MiB simple-reply
# requests without block-size negotiation (qemu-io and nbdsh), and the advertised maximum.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io

start_server --size 64M

check_eq "nbdinfo: block_size_maximum is 64 MiB by default" "67108864" \
    "$(nbdinfo --json "$URI" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["block_size_maximum"])')"

cat >"$T/conf.py" <<'PY'
import errno, sys, nbd
uri = sys.argv[1]
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail else ""), flush=True)

# Zero-length READ: libnbd refuses to send one unless strict mode allows it. Each mode: simple,
# structured, structured with DF. The read must complete (not hang: libnbd's poll is bounded by
# a 10 s timeout here) and the connection must go on.
for mode in ("simple", "structured", "structured+DF"):
    h = nbd.NBD()
    h.set_request_structured_replies(mode != "simple")
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ZERO_SIZE)
    h.connect_uri(uri)
    out(h.get_structured_replies_negotiated() == (mode != "simple"), "%s: reply mode as requested" % mode)
    flags = nbd.CMD_FLAG_DF if mode.endswith("DF") else 0
    chunks = []
    def chunk(buf, offset, status, err):
        chunks.append((status, offset, len(buf)))
        return 0
    if mode == "simple":
        cookie = h.aio_pread(nbd.Buffer(0), 4096)
    else:
        cookie = h.aio_pread_structured(nbd.Buffer(0), 4096, chunk, flags=flags)
    answered = False
    try:
        for _ in range(10):                      # at most ~10 s: a missing reply fails, not hangs
            if h.aio_command_completed(cookie):
                answered = True
                break
            h.poll(1000)
        out(answered, "%s: zero-length READ is answered" % mode)
        out(chunks == [], "%s: with no content chunk (each would describe at least one byte)" % mode, str(chunks))
    except nbd.Error as e:
        out(False, "%s: zero-length READ succeeds" % mode, str(e))
    out(bytes(h.pread(512, 0)) == b"\0" * 512, "%s: the connection goes on after it" % mode)
    h.shutdown()

# A failed SET_META_CONTEXT drops the contexts an earlier one selected: BLOCK_STATUS then gets
# EINVAL. libnbd 1.14 has no opt_set_meta_context, so this speaks the option by hand on a socket.
import socket, struct
path = uri.split("socket=")[1].split("&")[0] if "socket=" in uri else None
if path:
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(10)
    def recvn(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: raise EOFError
            b += c
        return b
    recvn(18); s.sendall(struct.pack(">I", 3))
    def opt(o, data=b""):
        s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
        reps = []
        while True:
            magic, oo, t, n = struct.unpack(">QIII", recvn(20)); reps.append((t, recvn(n)))
            if t == 1 or t & 0x80000000: return reps
    def meta(name, qs):
        d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs))
        for q in qs: d += struct.pack(">I", len(q)) + q
        return d
    opt(8)
    r = opt(10, meta(b"", [b"base:allocation"]))
    out([t for t, _ in r] == [4, 1], "SET_META_CONTEXT base:allocation selected", str(r))
    r = opt(10, meta(b"no-such-export", [b"base:allocation"]))
    out(r[-1][0] & 0x80000000 != 0, "SET_META_CONTEXT for an unknown export fails", str(r))
    r = opt(7, struct.pack(">I", 0) + struct.pack(">H", 0))
    out(r[-1][0] == 1, "GO after it")
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 7, 99, 0, 4096))
    magic, flags, typ, cookie, n = struct.unpack(">IHHQI", recvn(20)); payload = recvn(n)
    out(magic == 0x668e33ef and typ == 0x8001 and cookie == 99 and struct.unpack(">I", payload[:4])[0] == errno.EINVAL,
        "BLOCK_STATUS after the failed SET_META_CONTEXT gets EINVAL", "type %#x payload %r" % (typ, payload[:16]))
    s.close()

# 48 MiB simple-reply WRITE and READ without asking for block sizes (nbd-tester-client's
# integrityhuge sizes). libnbd refuses requests above 64 MiB and, in strict mode, above the
# advertised maximum, so these reach the server as they are.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_request_block_size(False) if hasattr(h, "set_request_block_size") else None
h.connect_uri(uri)
n = 48 << 20
data = bytes((i * 131 + 7) & 0xff for i in range(251)) * (n // 251) + b"\x5a" * (n % 251)
h.pwrite(data, 8 << 20)
back = h.pread(n, 8 << 20)
out(bytes(back) == data, "48 MiB simple-reply WRITE and READ round-trip")
h.shutdown()
PY
run_py_checks "$T/conf.py" "$URI"

# qemu-io sends what it is given: a 48 MiB write and read-back with a pattern.
expect_ok "qemu-io: 48 MiB write -P and read -P" qemu-io -f raw -c "write -P 0x61 4M 48M" -c "read -P 0x61 4M 48M" "$URI"

finish
