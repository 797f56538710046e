#!/usr/bin/env bash
# 21-hostile-clients: raw-socket clients that lie, stall, flood and vanish, over TCP, while a
# well-behaved libnbd client keeps doing verified writes and reads on the same server and must
# never notice (no error, no disconnect, no stall over 10 s). Each hostile case must get the
# spec's answer or a clean disconnect, and the server must stay up and keep accepting.
. "$(dirname "$0")/lib.sh"

HS_TIMEOUT=2
start_server --tcp --size 64M --handshake-timeout "$HS_TIMEOUT"
PORT_=$PORT
SPID=$SERVER_PID

# ---------------------------------------------------------------- the well-behaved client
cat >"$T/good.py" <<'PY'
# good.py URI STOPFILE: verified writes/reads in [48 MiB, 64 MiB) until STOPFILE exists.
import os, random, sys, time, nbd
uri, stop = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
rnd = random.Random(7)
ops = errors = 0
worst = 0.0
first_err = ""
shadow = {}
while not os.path.exists(stop):
    off = (48 << 20) + rnd.randrange(0, 16 << 20, 4096)
    data = rnd.randbytes(4096)
    t0 = time.monotonic()
    try:
        h.pwrite(data, off)
        got = bytes(h.pread(4096, off))
        if got != data:
            errors += 1; first_err = first_err or "read back differs at %d" % off
        shadow[off] = data
        o2 = rnd.choice(list(shadow))
        if bytes(h.pread(4096, o2)) != shadow[o2]:
            errors += 1; first_err = first_err or "older block at %d differs" % o2
    except nbd.Error as e:
        errors += 1; first_err = first_err or str(e)
        break
    worst = max(worst, time.monotonic() - t0)
    ops += 1
    time.sleep(0.002)
print("ops=%d errors=%d worst=%.3f first=%s" % (ops, errors, worst, first_err), flush=True)
PY

# ---------------------------------------------------------------- the hostile side
cat >"$T/hostile.py" <<'PY'
# hostile.py PORT SERVER_PID HS_TIMEOUT: one line per case, "ok|..." or "fail|...|detail".
import errno, os, socket, struct, sys, time
PORT, SPID, HS_TIMEOUT = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
SIZE = 64 << 20
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = b"NBDMAGIC", b"IHAVEOPT", 0x3e889045565a9
REQ, SIMPLE = 0x25609513, 0x67446698
EINVAL, ENOSPC, EOVERFLOW = 22, 28, 75

def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail and not ok else ""), flush=True)

def rss_kb():
    for line in open("/proc/%d/status" % SPID):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def nfds():
    return len(os.listdir("/proc/%d/fd" % SPID))

def conn(timeout=5):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
    g = recvn(s, 18)
    assert g[:16] == NBDMAGIC + IHAVEOPT, "greeting %r" % g
    return s

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("EOF after %d of %d bytes" % (len(b), n))
        b += c
    return b

def opt(o, payload=b"", length=None):
    return IHAVEOPT + struct.pack(">II", o, len(payload) if length is None else length) + payload

def opt_reply(s):
    magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    assert magic == REPLY_MAGIC, "bad option reply magic %x" % magic
    return o, typ, recvn(s, ln)

def go(s, name=b""):
    """OPT_GO; returns the export size. Replies until ACK."""
    s.sendall(opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
    size = None
    while True:
        o, typ, data = opt_reply(s)
        if typ == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size = struct.unpack(">Q", data[2:10])[0]
        if typ == 1:
            return size
        if typ & 0x80000000:
            raise RuntimeError("OPT_GO error 0x%x: %r" % (typ, data))

def session():
    s = conn()
    s.sendall(struct.pack(">I", 3))
    go(s)
    return s

def req(s, typ, off, ln, flags=0, cookie=1, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, ln) + payload)

def simple_reply(s, datalen=0):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert magic == SIMPLE, "bad reply magic %x" % magic
    data = recvn(s, datalen) if err == 0 and datalen else b""
    return err, cookie, data

def closed(s, within=3.0):
    """True if the server closes the connection (EOF or reset) within `within` s, reading anything first."""
    s.settimeout(within)
    end = time.monotonic() + within
    try:
        while time.monotonic() < end:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False

def alive(what):
    try:
        os.kill(SPID, 0)
    except OSError:
        out(False, "server still running after " + what, "process %d is gone" % SPID); sys.exit(1)
    try:
        s = session(); req(s, 0, 0, 512, cookie=9); err, c, d = simple_reply(s, 512)
        ok = err == 0 and c == 9 and len(d) == 512
        s.close()
    except Exception as e:
        ok, d = False, str(e)
    out(ok, "server still serves a new client after " + what, str(d)[:80])

def case(name):
    def deco(fn):
        try:
            fn()
        except Exception as e:
            out(False, name, "%s: %s" % (type(e).__name__, e))
        alive(name)
        return fn
    return deco

# 1. Wrong magic.
@case("wrong option magic")
def _():
    s = conn(); s.sendall(struct.pack(">I", 3) + b"IHAVEOPX" + struct.pack(">II", 7, 0))
    out(closed(s), "wrong option magic: server disconnects")
@case("wrong request magic")
def _():
    s = session(); s.sendall(struct.pack(">IHHQQI", 0x25609514, 0, 0, 1, 0, 512))
    out(closed(s), "wrong request magic in transmission: server disconnects")

# 2. Unknown client flags.
@case("unknown client flags")
def _():
    s = conn(); s.sendall(struct.pack(">I", 0xFFFFFFFF))
    out(closed(s), "client flags 0xffffffff: server disconnects without replying")

# 3. Option lengths that lie.
@case("lying option lengths")
def _():
    s = conn(); s.sendall(struct.pack(">I", 3))
    # OPT_GO whose length is too short for its own fields.
    s.sendall(opt(7, b"\0\0", 2))
    o, typ, _ = opt_reply(s)
    out(o == 7 and typ == 0x80000003, "OPT_GO of 2 bytes -> NBD_REP_ERR_INVALID", "option %d reply 0x%x" % (o, typ))
    # OPT_GO whose name length runs past the option.
    s.sendall(opt(7, struct.pack(">I", 1000) + b"abc" + struct.pack(">H", 0)))
    o, typ, _ = opt_reply(s)
    out(typ == 0x80000003, "OPT_GO name length 1000 in a 9-byte option -> ERR_INVALID", "reply 0x%x" % typ)
    # OPT_LIST with data it must not have.
    s.sendall(opt(3, b"xyz"))
    o, typ, _ = opt_reply(s)
    out(typ == 0x80000003, "OPT_LIST with 3 bytes of data -> ERR_INVALID", "reply 0x%x" % typ)
    # SET_META_CONTEXT with a query count far beyond its data.
    s.sendall(opt(8))
    opt_reply(s)
    s.sendall(opt(10, struct.pack(">I", 0) + struct.pack(">I", 0x7FFFFFFF) + struct.pack(">I", 15) + b"base:allocation"))
    o, typ, _ = opt_reply(s)
    out(typ == 0x80000003, "SET_META_CONTEXT claiming 2^31 queries -> ERR_INVALID", "reply 0x%x" % typ)
    size = go(s)
    out(size == SIZE, "after the lies, OPT_GO on the same connection still works", "size %r" % size)
    s.close()
    # An option that announces more than it sends, then the client stalls and leaves.
    s = conn(); s.sendall(struct.pack(">I", 3) + opt(7, b"\0\0\0\0", 100))
    s.settimeout(0.5)
    try:
        got = s.recv(100)
        out(False, "option announcing 100 bytes but sending 4: server waits for the rest", "got %r" % got)
    except socket.timeout:
        out(True, "option announcing 100 bytes but sending 4: server waits for the rest")
    s.close()

# 4. An export name announced as 4 GiB.
@case("4 GiB export name")
def _():
    r0 = rss_kb()
    s = conn(); s.sendall(struct.pack(">I", 3) + opt(1, b"", 0xFFFFFFFF) + b"A" * 65536)
    out(closed(s), "NBD_OPT_EXPORT_NAME of 4 GiB: server disconnects")
    s = conn(); s.sendall(struct.pack(">I", 3) + opt(7, struct.pack(">I", 0xFFFFFFF0) + b"disk" + b"\0\0"))
    o, typ, _ = opt_reply(s)
    out(typ == 0x80000003, "OPT_GO naming a 4 GiB name inside a 10-byte option -> ERR_INVALID", "reply 0x%x" % typ)
    s.close()
    # An option far longer than any the server accepts is not drained: the server hangs up at once.
    s = conn(); s.sendall(struct.pack(">I", 3) + opt(6, b"", 0xFFFFFFFF))
    out(closed(s), "OPT_INFO announcing 4 GiB: server disconnects at once, without draining it")
    time.sleep(0.2)
    r1 = rss_kb()
    out(r1 - r0 < 64 * 1024, "OPT_INFO announcing 4 GiB: no buffering", "RSS %d -> %d KiB" % (r0, r1))
    # One a little over the 16 KiB limit is drained and answered ERR_TOO_BIG; negotiation goes on.
    s = conn(); s.sendall(struct.pack(">I", 3) + opt(6, b"C" * (20 << 10)))
    o, typ, _ = opt_reply(s)
    out(typ == 0x80000009, "OPT_INFO of 20 KiB (over the 16 KiB limit) -> ERR_TOO_BIG", "reply 0x%x" % typ)
    s.sendall(opt(3, b"")); o, typ, _ = opt_reply(s)
    out(o == 3 and typ in (1, 2), "... and the same connection can still LIST", "option %d reply 0x%x" % (o, typ))
    s.close()

# 5. WRITE announcing 4 GiB, then gone mid-payload; WRITE within the limit, then gone.
@case("WRITE of 4 GiB, disconnect mid-payload")
def _():
    r0 = rss_kb()
    s = session(); req(s, 1, 0, 0xFFFFFFFF, cookie=5)
    try:
        s.sendall(b"\xee" * (16 << 20))
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    s = session(); req(s, 1, 0, 16 << 20, cookie=6); s.sendall(b"\xee" * (1 << 20)); s.close()
    time.sleep(0.3)
    r1 = rss_kb()
    out(r1 - r0 < 128 * 1024, "WRITE announcing 4 GiB / 16 MiB, gone mid-payload: memory released", "RSS %d -> %d KiB" % (r0, r1))
    # The bytes that were sent must not have reached the disk.
    s = session(); req(s, 0, 0, 4096, cookie=7); err, _, d = simple_reply(s, 4096)
    out(err == 0 and d == b"\0" * 4096, "a WRITE whose payload never completed wrote nothing", "err %d data %r" % (err, d[:8]))
    # A WRITE over the maximum but within the spec's 32 MiB courtesy: drained, answered, in sync.
    # (The server advertises 64 MiB; beyond both it hangs up, as the spec allows.)
    s.close()
    s = session(); req(s, 1, 0, 0xFFFFFFFF, cookie=8)
    out(closed(s), "a WRITE announcing 4 GiB (above the 64 MiB maximum and 32 MiB): server hangs up at once")

# 6-8. Reads past the end, offset+length overflow, unknown commands and flags.
@case("bad requests")
def _():
    s = session()
    for desc, (typ, off, ln, flags), allowed in [
        ("READ past the end -> EINVAL", (0, SIZE - 100, 4096, 0), {EINVAL}),
        ("READ at offset = size -> EINVAL", (0, SIZE, 1, 0), {EINVAL}),
        ("READ where offset+length overflows 2^64 -> EINVAL", (0, (1 << 64) - 512, 4096, 0), {EINVAL, EOVERFLOW}),
        ("WRITE_ZEROES where offset+length overflows -> error", (6, (1 << 64) - 512, 4096, 0), {EINVAL, ENOSPC, EOVERFLOW}),
        ("TRIM of 4 GiB - 1 at 2^63 -> error", (4, 1 << 63, 0xFFFFFFFF, 0), {EINVAL, ENOSPC, EOVERFLOW}),
        ("unknown command 99 -> EINVAL", (99, 0, 512, 0), {EINVAL}),
        ("unknown command 0xffff -> EINVAL", (0xFFFF, 0, 0, 0), {EINVAL}),
        ("READ with unknown flag 0x8000 -> EINVAL", (0, 0, 512, 0x8000), {EINVAL}),
        ("READ with every flag bit set -> EINVAL", (0, 0, 512, 0xFFFF), {EINVAL}),
    ]:
        req(s, typ, off, ln, flags, cookie=0xC0FFEE)
        err, cookie, _ = simple_reply(s)
        out(err in allowed and cookie == 0xC0FFEE, desc, "error %d cookie %x" % (err, cookie))
    req(s, 0, 0, 512, cookie=42); err, c, d = simple_reply(s, 512)
    out(err == 0 and c == 42, "the connection still answers a good READ after them", "err %d" % err)
    # WRITE with unknown flags still has its payload consumed.
    req(s, 1, 0, 512, 0x4000, cookie=43, payload=b"\x11" * 512)
    err, c, _ = simple_reply(s)
    out(err == EINVAL and c == 43, "WRITE with unknown flag 0x4000 -> EINVAL, payload consumed", "err %d" % err)
    req(s, 0, 0, 512, cookie=44); err, c, d = simple_reply(s, 512)
    out(err == 0 and c == 44 and d == b"\0" * 512, "the stream stays in sync after it (and nothing was written)", "err %d %r" % (err, d[:4]))
    s.close()

# 9. Disconnect in the middle of a payload (and of a header).
@case("disconnect mid-payload")
def _():
    for _ in range(20):
        s = session(); req(s, 1, 8192, 65536, cookie=1); s.sendall(b"\x77" * 10000); s.close()
        s = session(); s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 1, 0, 512)[:13]); s.close()
    s = session(); req(s, 0, 8192, 4096, cookie=2); err, _, d = simple_reply(s, 4096)
    out(err == 0 and d == b"\0" * 4096, "40 connections dropped mid-payload/mid-header: nothing written", "err %d %r" % (err, d[:4]))
    s.close()

# 10. Slow loris.
@case("slow-loris handshake")
def _():
    s = conn()
    t0 = time.monotonic()
    data = struct.pack(">I", 3) + opt(7, struct.pack(">I", 0) + b"\0\0")
    dropped = None
    s.settimeout(0.25)
    for i in range(int(HS_TIMEOUT * 4) + 20):
        try:
            if i < len(data):
                s.send(data[i:i + 1])
            if s.recv(4096) == b"":
                dropped = time.monotonic() - t0; break
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            dropped = time.monotonic() - t0; break
    out(dropped is not None and dropped < HS_TIMEOUT + 2, "a client sending one byte per 0.25 s is dropped by --handshake-timeout %g" % HS_TIMEOUT,
        "dropped after %s s" % (None if dropped is None else "%.1f" % dropped))

# 11. 10,000 connections opened and dropped.
@case("10,000 connections")
def _():
    fd0 = nfds()
    t0 = time.monotonic()
    import threading
    refused = [0]
    def opener(k):
        for i in range(2500):
            try:
                s = socket.socket(); s.connect(("127.0.0.1", PORT))
                if (i + k) % 3 == 0:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
                s.close()
            except OSError:
                refused[0] += 1
    ths = [threading.Thread(target=opener, args=(k,)) for k in range(4)]
    for th in ths: th.start()
    for th in ths: th.join()
    refused = refused[0]
    dt = time.monotonic() - t0
    out(refused == 0, "10,000 connections opened and dropped in %.1f s" % dt, "%d refused" % refused)
    time.sleep(1)
    fd1 = nfds()
    out(fd1 <= fd0 + 8, "no descriptors leak (server fds %d before, %d after)" % (fd0, fd1), "%d -> %d" % (fd0, fd1))

# 11b. Clients that send their flags (or a few bytes of an option) and go silent: each costs what
# it holds, a few KiB, not NIO's first receive buffer (264 KiB each before issue #31: 2,000 such
# clients held 515 MiB).
@case("silent handshaking clients")
def _():
    r0 = rss_kb()
    held = []
    for i in range(500):
        s = socket.socket(); s.connect(("127.0.0.1", PORT)); recvn(s, 18)
        s.sendall(struct.pack(">I", 3) + (IHAVEOPT[:2] if i % 2 else b""))
        held.append(s)
    time.sleep(0.5)
    r1 = rss_kb()
    each = (r1 - r0) / len(held)
    for s in held: s.close()
    out(each < 32, "500 silent clients after their flags (half with 2 bytes of an option): %.1f KiB each (< 32)" % each,
        "RSS %d -> %d KiB" % (r0, r1))

# 12. A READ flood whose replies are never read.
@case("READ flood without reading replies")
def _():
    r0 = rss_kb()
    s = session()
    s.setblocking(False)
    one = struct.pack(">IHHQQI", REQ, 0, 0, 1, 0, 1 << 20)
    batch = b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, (i % 63) << 20, 1 << 20) for i in range(1024))
    sent = 0
    peak = r0
    t0 = time.monotonic()
    stalled_since = None
    pending = b""
    while time.monotonic() - t0 < 20 and sent < 4096 * 1024:     # at most 4M requests (4 TiB asked)
        if not pending:
            pending = batch
        try:
            n = s.send(pending)
            pending = pending[n:]
            sent += n // len(one)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            time.sleep(0.01)
            if time.monotonic() - stalled_since > 3:
                break
        peak = max(peak, rss_kb())
        if peak > 300 * 1024:
            break
    for _ in range(10):
        time.sleep(0.1); peak = max(peak, rss_kb())
    asked = sent / 1024.0
    out(peak < 300 * 1024, "%d READs of 1 MiB (%.1f GiB asked) never read: server RSS peak %d MiB (< 300)" % (sent, asked, peak // 1024),
        "RSS %d -> %d MiB" % (r0 // 1024, peak // 1024))
    out(stalled_since is not None, "the flooding client is pushed back (its sends block)", "sent %d requests in %.0f s without blocking" % (sent, time.monotonic() - t0))
    s.close()
    for _ in range(50):
        time.sleep(0.1)
        if rss_kb() < 300 * 1024: break
    print("info|after the flooding client left, server RSS is %d MiB" % (rss_kb() // 1024), flush=True)
PY

/usr/bin/python3 "$T/good.py" "$URI" "$T/stop" >"$T/good.out" 2>&1 &
GOOD=$!
sleep 0.5
run_py_checks "$T/hostile.py" "$PORT_" "$SPID" "$HS_TIMEOUT"
grep '^info|' "$T/py.out" | sed 's/^info|/# /'
touch "$T/stop"
wait "$GOOD"
good=$(tail -n 1 "$T/good.out")
check_match "the well-behaved client saw no error throughout ($good)" '^ops=[1-9][0-9]* errors=0 ' "$good"
worst=$(sed -n 's/.* worst=\([0-9.]*\).*/\1/p' <<<"$good")
if awk -v w="${worst:-99}" 'BEGIN { exit !(w < 10) }'; then pass "its slowest write+read took ${worst}s (< 10 s)"; else fail "its slowest write+read took ${worst}s (< 10 s)"; fi
stop_server "$SPID"
# --payload-timeout: a client that stops in the middle of a WRITE's payload is closed once it has
# sent nothing for that long, with a warning; the server keeps serving (issue #31).
start_server --size 8M --payload-timeout 1
got=$(/usr/bin/python3 - "${URI#*socket=}" <<'PY'
import socket, struct, sys, time
def session():
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)
    s.recv(18); s.sendall(struct.pack(">I", 3))
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        hdr = b""
        while len(hdr) < 20: hdr += s.recv(20 - len(hdr))
        magic, o, typ, ln = struct.unpack(">QIII", hdr)
        while ln: ln -= len(s.recv(ln))
        if typ == 1: return s
s = session()
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 20) + b"\7" * (1 << 19))
t0 = time.monotonic()
try:
    eof = s.recv(1) == b""
except ConnectionResetError:
    eof = True
g = session()
g.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 0, 512))
r = b""
while len(r) < 16 + 512: r += g.recv(16 + 512 - len(r))
err = struct.unpack(">IIQ", r[:16])[1]
print("closed %s, data untouched %s" % (eof, err == 0 and r[16:] == bytes(512)))
PY
)
check_eq "a WRITE stalled half-way is closed after --payload-timeout; nothing of it was written" "closed True, data untouched True" "$got"
expect_log 1 'closing: the client sent nothing for 1 s in the middle of a request \(524288 bytes of it received\)' "... with one warning that names the flag"
stop_server
finish
