#!/usr/bin/env bash
# 35-dirty-bitmaps: --bitmap, qemu:dirty-bitmap:NAME, checkpoints over --control, --snapshot.
#
#   1. nbdinfo --map and libnbd block_status show exactly the chunks that seeded unaligned
#      writes, trims and zeroes touched (rounded out to the granularity), against a model;
#      qemu-img map with x-dirty-bitmap reads the same map (dirty chunks are its "data": false).
#   2. Two clients keep writes in flight while five checkpoints (clear --freeze-as) are taken:
#      every write is in exactly one epoch's bitmap, a write acknowledged before a clear was sent
#      is in an earlier epoch, one sent after the clear answered is in a later one.
#   3. kill -9 during writes on a --file export: after the restart every acknowledged write's
#      chunk is still dirty (and, same boot, the bitmap was kept, not marked all dirty).
#   4. Bad input: empty, over-long and duplicate names on the command line; malformed, truncated
#      and unknown control requests; clear/remove of an unknown bitmap; a second clear while one
#      waits for a write held in a stopped qemu-storage-daemon. Each gets an error and the
#      bitmaps are as they were.
#   5. --snapshot: a --file image and a qemu-storage-daemon image are byte for byte unchanged
#      after writes the client reads back.
# Random parts print their seed; replay with BITMAP_SEED=N.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-img qemu-storage-daemon sha256sum

SEED=${BITMAP_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed=$SEED (replay: BITMAP_SEED=$SEED)"

cat >"$T/bm.py" <<'PY'
# bm.py MODE ARGS: libnbd checks for dirty bitmaps; prints "ok|…" / "fail|…|…" lines.
import json, os, random, socket, sys, time, nbd

def ok(d): print("ok|" + d, flush=True)
def fail(d, why): print("fail|%s|%s" % (d, why), flush=True)
def check(d, cond, why=""):
    ok(d) if cond else fail(d, why)
    return cond

def connect(uri, contexts):
    h = nbd.NBD()
    for c in contexts: h.add_meta_context(c)
    h.connect_uri(uri)
    return h

def runs(h, ctx):
    """[(start, end, flags)] of meta context ctx over the whole export."""
    size, out, off = h.get_size(), [], 0
    while off < size:
        got = []
        def cb(metacontext, offset, entries, err):
            if metacontext == ctx: got.append((offset, list(entries)))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got or not got[0][1]:
            raise RuntimeError("no %s extents at %d" % (ctx, off))
        e = got[0][1]
        for i in range(0, len(e), 2):
            out.append((off, off + e[i], e[i + 1]))
            off += e[i]
    return out

def dirty_chunks(h, name, g):
    s = set()
    for a, b, f in runs(h, "qemu:dirty-bitmap:" + name):
        if f & 1: s.update(range(a // g, (b + g - 1) // g))
    return s

def control(path, req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode())
    line = s.makefile("rb").readline()
    s.close()
    return json.loads(line)

def touched(off, ln, g, size):
    return set(range(off // g, (min(off + ln, size) - 1) // g + 1)) if ln else set()

def model(uri, seed, g, out):
    """Seeded unaligned writes, trims, zeroes; prints the expected dirty runs as nbdinfo does."""
    rnd = random.Random(seed)
    h = connect(uri, [])
    size = h.get_size()
    dirty = set()
    for i in range(40):
        op = rnd.choice(["w", "w", "w", "t", "z"])
        ln = rnd.choice([1, 2, 511, 4097, g - 1, g + 1, rnd.randint(1, 3 * g)])
        off = rnd.randrange(0, size - ln)
        if op == "w": h.pwrite(rnd.randbytes(ln), off)
        elif op == "t": h.trim(ln, off)
        else: h.zero(ln, off)
        dirty |= touched(off, ln, g, size)
    h.shutdown()
    # Runs of equal state, as nbdinfo --map prints them.
    lines, n, c = [], (size + g - 1) // g, 0
    while c < n:
        d = c in dirty
        e = c
        while e < n and (e in dirty) == d: e += 1
        lines.append("%d %d %d %s" % (c * g, min(e * g, size) - c * g, 1 if d else 0, "dirty" if d else "clean"))
        c = e
    open(out, "w").write("\n".join(lines) + "\n")
    h = connect(uri, ["qemu:dirty-bitmap:b0"])
    check("libnbd block_status of qemu:dirty-bitmap:b0 shows exactly the %d chunks the model touched" % len(dirty),
          dirty_chunks(h, "b0", g) == dirty, "differs")

def epochs(uri, ctl, seed, g, rounds):
    """Two clients write while `rounds` checkpoints are taken; checks each write's epoch.

    Epoch k is bitmap e{k} (k < rounds) or b0 (k == rounds). A write sent after `answered`
    clears had answered is in epoch >= answered; one acknowledged before `sent` clears had been
    sent is in epoch <= sent."""
    rnd = random.Random(seed)
    hs = [connect(uri, []), connect(uri, [])]
    size = hs[0].get_size()
    chunks = list(range(size // g)); rnd.shuffle(chunks)
    during = 200                      # writes issued while each clear is pending
    per_round = len(chunks) // (rounds + 1) - during
    writes = []                       # [chunk, lowest epoch, highest epoch]
    inflight = [{}, {}]               # per client: cookie -> index in writes
    count = {"sent": 0, "answered": 0}
    def fill(budget):
        n = 0
        for k, h in enumerate(hs):
            while len(inflight[k]) < 16 and chunks and n < budget:
                c = chunks.pop(); n += 1
                ln = rnd.randint(1, g)
                writes.append([c, count["answered"], None])
                inflight[k][h.aio_pwrite(rnd.randbytes(ln), c * g + rnd.randint(0, g - ln))] = len(writes) - 1
        return n
    def reap():
        for k, h in enumerate(hs):
            if inflight[k]: h.poll(1)
            for ck in list(inflight[k]):
                if h.aio_command_completed(ck):
                    writes[inflight[k].pop(ck)][2] = count["sent"]
    overlapped = 0
    for r in range(rounds + 1):
        left = per_round
        while left > 0:
            left -= fill(left); reap()
        if r == rounds: break
        overlapped += sum(len(i) for i in inflight)
        s = socket.socket(socket.AF_UNIX); s.connect(ctl); s.setblocking(False)
        s.sendall((json.dumps({"command": "clear", "bitmap": "b0", "freeze": "e%d" % r}) + "\n").encode())
        count["sent"] += 1
        reply, left = b"", during
        while not reply.endswith(b"\n"):
            left -= fill(left); reap()
            try:
                got = s.recv(4096)
                if not got: break
                reply += got
            except BlockingIOError:
                pass
        s.close()
        count["answered"] += 1
        rep = json.loads(reply or b"null")
        if not check("checkpoint %d (clear b0, freezing e%d) answers ok while both clients write" % (r + 1, r),
                     rep and rep.get("ok") is True, repr(rep)):
            return
    while any(inflight): reap()
    check("writes were in flight when the clears were sent (%d in all)" % overlapped, overlapped > 0)
    h = connect(uri, ["qemu:dirty-bitmap:e%d" % r for r in range(rounds)] + ["qemu:dirty-bitmap:b0"])
    where = {}
    for r in range(rounds + 1):
        for c in dirty_chunks(h, "e%d" % r if r < rounds else "b0", g):
            where.setdefault(c, []).append(r)
    notone = [w for w in writes if len(where.get(w[0], [])) != 1]
    check("each of %d writes is in exactly one epoch's bitmap" % len(writes), not notone,
          "e.g. chunk %d in epochs %s (%d such)" % (notone[0][0], where.get(notone[0][0]), len(notone)) if notone else "")
    bad = [w for w in writes if len(where.get(w[0], [])) == 1 and not (w[1] <= where[w[0]][0] <= w[2])]
    check("each write is in an epoch its sending and acknowledgement allow", not bad,
          "e.g. chunk %d may be in epochs %d..%d, is in %d (%d such)" % (bad[0][0], bad[0][1], bad[0][2], where[bad[0][0]][0], len(bad)) if bad else "")
    extra = set(where) - {w[0] for w in writes}
    check("no chunk that was never written is dirty in any epoch", not extra, "e.g. chunks %s" % sorted(extra)[:3])

def crash_client(uri, journal, seed, marker, kill_after):
    rnd = random.Random(seed)
    j = open(journal, "w", buffering=1)
    h = nbd.NBD(); h.connect_uri(uri)
    size = h.get_size()
    inflight, n = {}, 0
    try:
        while True:
            while len(inflight) < 16:
                ln = rnd.randint(1, 20000)
                off = rnd.randrange(0, size - ln)
                n += 1
                if n == kill_after: open(marker, "w").close()
                inflight[h.aio_pwrite(rnd.randbytes(ln), off)] = (off, ln)
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    off, ln = inflight.pop(c)
                    j.write("A %d %d\n" % (off, ln))
    except nbd.Error:
        pass

def crash_check(uri, journal, g):
    h = connect(uri, ["qemu:dirty-bitmap:b0"])
    size = h.get_size()
    dirty = dirty_chunks(h, "b0", g)
    acked = [tuple(map(int, l.split()[1:])) for l in open(journal) if l.startswith("A ")]
    check("the client saw %d writes acknowledged before the kill" % len(acked), len(acked) > 0)
    missing = [(o, l) for o, l in acked if not touched(o, l, g, size) <= dirty]
    check("every acknowledged write's chunks are dirty after kill -9 and restart", not missing, "e.g. %s" % missing[:3])
    check("the bitmap was kept, not marked all dirty (%d of %d chunks dirty)" % (len(dirty), (size + g - 1) // g),
          len(dirty) < (size + g - 1) // g)

mode = sys.argv[1]
if mode == "model": model(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
elif mode == "epochs": epochs(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
elif mode == "crash-client": crash_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
elif mode == "crash-check": crash_check(sys.argv[2], sys.argv[3], int(sys.argv[4]))
PY

norm() { awk 'NF { print $1, $2, $3, $4 }'; }

# ---------------------------------------------------------------- 1. exact maps
G=65536
start_server --size 8M --bitmap b0 --bitmap-granularity 64K
check_eq "a new bitmap is all clean" "0 8388608 0 clean" "$(nbdinfo --map=qemu:dirty-bitmap:b0 "$URI" | norm)"
run_py_checks "$T/bm.py" model "$URI" "$SEED" "$G" "$T/expected.map"
check_eq "nbdinfo --map=qemu:dirty-bitmap:b0 shows exactly the touched chunks" \
    "$(cat "$T/expected.map")" "$(nbdinfo --map=qemu:dirty-bitmap:b0 "$URI" | norm)"
# qemu-img's x-dirty-bitmap reports the dirty chunks as "data": false.
qemu-img map --output=json --image-opts \
    "driver=nbd,server.type=unix,server.path=$SOCK,x-dirty-bitmap=qemu:dirty-bitmap:b0" >"$T/qemu.map" 2>&1 ||
    fail "qemu-img map with x-dirty-bitmap" "$(cat "$T/qemu.map")"
/usr/bin/python3 - "$T/qemu.map" >"$T/qemu.norm" <<'PY'
import json, sys
out = []
for e in json.load(open(sys.argv[1])):
    d = 0 if e["data"] else 1
    if out and out[-1][2] == d: out[-1][1] += e["length"]
    else: out.append([e["start"], e["length"], d])
for s, l, d in out: print(s, l, d, "dirty" if d else "clean")
PY
check_eq "qemu-img map x-dirty-bitmap=qemu:dirty-bitmap:b0 reads the same map" \
    "$(cat "$T/expected.map")" "$(cat "$T/qemu.norm")"
stop_server

# ---------------------------------------------------------------- 2. epochs under load
start_server --size 64M --bitmap b0 --bitmap-granularity 4K --control "$T/ctl1"
check_eq "the control socket is mode 0600" "600" "$(stat -c %a "$T/ctl1")"
run_py_checks "$T/bm.py" epochs "$URI" "$T/ctl1" "$SEED" 4096 5
stop_server

# ---------------------------------------------------------------- 3. kill -9 during writes
IMG="$T/crash.img"
truncate -s 64M "$IMG"
start_server --file "$IMG" --bitmap b0 --bitmap-granularity 64K
rm -f "$T/marker"
/usr/bin/python3 "$T/bm.py" crash-client "$URI" "$T/journal" "$SEED" "$T/marker" 300 &
CLIENT=$!
for _ in $(seq 600); do [[ -e "$T/marker" ]] && break; sleep 0.01; done
[[ -e "$T/marker" ]] || fail "the client started writing" "no marker"
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null; _forget_pid "$SERVER_PID"
wait "$CLIENT"
check_eq "the bitmap file is beside the image" "yes" "$([[ -s "$IMG.bitmaps" ]] && echo yes || echo no)"
# Restarted without --bitmap: the existing IMG.bitmaps turns tracking on by itself.
start_server --file "$IMG"
expect_log 1 "not closed cleanly, on this boot" "the restart reports the unclean stop and keeps the bitmaps"
run_py_checks "$T/bm.py" crash-check "$URI" "$T/journal" "$G"
stop_server

# ---------------------------------------------------------------- 4. bad input
long=$(printf 'a%.0s' $(seq 4079))
expect_fail "--bitmap '' is refused" "bitmap" "$VIRTNBD" --size 1M --bitmap "" --unix "$T/x.sock"
expect_fail "a 4079-byte --bitmap name is refused (the spec's 4096-byte string limit)" "4078" \
    "$VIRTNBD" --size 1M --bitmap "$long" --unix "$T/x.sock"
expect_fail "a duplicate --bitmap is refused" "twice" "$VIRTNBD" --size 1M --bitmap a --bitmap a --unix "$T/x.sock"
expect_fail "--bitmap-granularity 1000 is refused" "granularity" \
    "$VIRTNBD" --size 1M --bitmap a --bitmap-granularity 1000 --unix "$T/x.sock"

# The last case needs a write that stays in flight: a vhost-user device whose daemon is stopped.
QIMG="$T/qsd.img"
truncate -s 16M "$QIMG"
start_qsd "$T/vhost.sock" "$QIMG"
start_server --device "vhost-user:$T/vhost.sock" --bitmap b0 --bitmap b1 --control "$T/ctl2"
CTL=$T/ctl2
"$VIRTNBD" bitmap list --control "$CTL" --json >"$T/before.json"
cat >"$T/ctl.py" <<'PY'
# ctl.py SOCKET MODE: bad control requests; prints ok|/fail| lines.
import json, os, signal, socket, sys, time, nbd
path, mode = sys.argv[1], sys.argv[2]
def ok(d): print("ok|" + d, flush=True)
def fail(d, why): print("fail|%s|%s" % (d, why), flush=True)
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(20); return s, s.makefile("rb")
def ask(f, s, raw):
    s.sendall(raw); line = f.readline()
    return json.loads(line) if line else None
def expect_error(desc, rep, word):
    if rep and rep.get("ok") is False and word in rep.get("error", "").lower(): ok(desc)
    else: fail(desc, "reply %r" % (rep,))
if mode == "bad":
    s, f = conn()
    expect_error("malformed JSON gets an error reply", ask(f, s, b"{not json\n"), "json")
    expect_error("an unknown command gets an error reply naming it", ask(f, s, b'{"command":"frobnicate"}\n'), "frobnicate")
    expect_error("a request without a command gets an error", ask(f, s, b'{"bitmap":"b0"}\n'), "command")
    expect_error("clear of an unknown bitmap gets an error", ask(f, s, b'{"command":"clear","bitmap":"nope"}\n'), "nope")
    expect_error("remove of an unknown bitmap gets an error", ask(f, s, b'{"command":"remove","bitmap":"nope"}\n'), "nope")
    expect_error("add of an existing bitmap gets an error", ask(f, s, b'{"command":"add","bitmap":"b1"}\n'), "b1")
    expect_error("add with a bad granularity gets an error", ask(f, s, b'{"command":"add","bitmap":"z","granularity":3}\n'), "granularity")
    expect_error("an unknown export gets an error", ask(f, s, b'{"command":"list","export":"nope"}\n'), "nope")
    rep = ask(f, s, b'{"command":"list"}\n')
    ok("the connection still answers after bad requests") if rep and rep.get("ok") else fail("the connection still answers after bad requests", repr(rep))
    s.close()
    s, f = conn()
    s.sendall(b'{"command":"list"')
    s.shutdown(socket.SHUT_WR)
    rep = json.loads(f.readline() or b"null")
    expect_error("a truncated request (no newline before EOF) gets an error", rep, "truncated")
    s.close()
    s, f = conn()
    s.sendall(b'{"command":"list"}\n{"command":"list"}\n')
    s.shutdown(socket.SHUT_WR)
    lines = f.read().splitlines()   # to EOF: the server must close after answering
    ok("a half-close after two requests gets two answers, then EOF") if len(lines) == 2 and all(json.loads(l)["ok"] for l in lines) else fail("a half-close after two requests gets two answers, then EOF", repr(lines))
    s.close()
    s, f = conn()
    s.sendall(b"x" * (70 << 10) + b"\n")
    line = f.readline()
    rep = json.loads(line) if line else None
    expect_error("a request line over 64 KiB gets an error", rep, "65536")
    s.close()
elif mode == "busy":
    uri, qsd = sys.argv[3], int(sys.argv[4])
    h = nbd.NBD(); h.connect_uri(uri)
    os.kill(qsd, signal.SIGSTOP)
    try:
        c = h.aio_pwrite(b"w" * 4096, 8192)
        h.poll(0); time.sleep(0.3)   # the write reaches the (stopped) device
        s1, f1 = conn()
        s1.sendall(b'{"command":"clear","bitmap":"b0","freeze":"old"}\n')
        s1.setblocking(False); time.sleep(0.3)
        try:
            early = s1.recv(1)
        except BlockingIOError:
            early = b""
        ok("a clear waits while a write begun before it is in flight") if not early else fail("a clear waits while a write begun before it is in flight", "answered early")
        s2, f2 = conn()
        expect_error("a second clear while one is in progress gets a busy error", ask(f2, s2, b'{"command":"clear","bitmap":"b0"}\n'), "progress")
        s2.close()
    finally:
        os.kill(qsd, signal.SIGCONT)
    while not h.aio_command_completed(c): h.poll(-1)
    s1.setblocking(True); s1.settimeout(20)
    rep = json.loads(f1.readline() or b"null")
    ok("the first clear answers once the write finished") if rep and rep.get("ok") else fail("the first clear answers once the write finished", repr(rep))
PY
run_py_checks "$T/ctl.py" "$CTL" bad
"$VIRTNBD" bitmap list --control "$CTL" --json >"$T/after.json"
check_eq "the bad requests changed no bitmap" "$(cat "$T/before.json")" "$(cat "$T/after.json")"
run_py_checks "$T/ctl.py" "$CTL" busy "$URI" "$QSD_PID"
expect_ok "virtnbd bitmap list after the clears" "$VIRTNBD" bitmap list --control "$CTL"
check_eq "after the clear: b0 (empty), b1, old (frozen, the write's chunk)" \
    "b0 active 0|b1 active 65536|old frozen 65536" \
    "$(awk '{ sub("dirty=", "", $4); printf "%s%s %s %s", (NR > 1 ? "|" : ""), $1, $2, $4 }' "$LAST_OUT")"
expect_fail "virtnbd bitmap clear of an unknown bitmap exits non-zero with the server's reason" "nope" \
    "$VIRTNBD" bitmap clear nope --control "$CTL"
expect_fail "virtnbd bitmap against a socket nobody serves says so" "control" \
    "$VIRTNBD" bitmap list --control "$T/nobody.sock"
stop_server
stop_qsd

# ---------------------------------------------------------------- 5. --snapshot leaves the base alone
SIMG="$T/snap.img"
head -c 8M /dev/urandom >"$SIMG"
before=$(sha256_of "$SIMG")
start_server --file "$SIMG" --snapshot --bitmap b0
/usr/bin/python3 - "$URI" >"$T/snap.out" 2>&1 <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"S" * 10000, 12345); h.zero(70000, 1 << 20); h.trim(1 << 20, 4 << 20)
assert h.pread(10000, 12345) == b"S" * 10000, "write not read back"
assert h.pread(70000, 1 << 20) == bytes(70000), "zeroes not read back"
h.flush()
print("readback ok")
PY
check_eq "--snapshot --file: writes, zeroes and trims read back" "readback ok" "$(tail -1 "$T/snap.out")"
stop_server
check_eq "--snapshot --file: the image is byte for byte unchanged" "$before" "$(sha256_of "$SIMG")"

# --snapshot-overlay file: the overlay is an unlinked file beside the image; large writes go there.
mkdir -p "$T/big"
BIMG="$T/big/base.img"
head -c 48M /dev/urandom >"$BIMG"
head -c 32M /dev/urandom >"$T/big.data"
before=$(sha256_of "$BIMG")
start_server --file "$BIMG" --snapshot-overlay file
expect_ok "nbdcopy of 32 MiB into a --snapshot-overlay file export" \
    nbdcopy "$T/big.data" "$URI"
check_match "the overlay is an unlinked file beside the image" "$T/big/\.virtnbd-snapshot-.* \(deleted\)" \
    "$(ls -l /proc/"$SERVER_PID"/fd 2>&1)"
expect_ok "nbdcopy back out" nbdcopy "$URI" "$T/big.back"
check_eq "the first 32 MiB read back are the written ones" "$(sha256_of "$T/big.data")" \
    "$(head -c 32M "$T/big.back" | sha256sum | cut -d' ' -f1)"
check_eq "the rest reads the base image" "$(tail -c 16M "$BIMG" | sha256sum | cut -d' ' -f1)" \
    "$(tail -c 16M "$T/big.back" | sha256sum | cut -d' ' -f1)"
stop_server
check_eq "--snapshot-overlay file: the image is byte for byte unchanged" "$before" "$(sha256_of "$BIMG")"
check_eq "--snapshot-overlay file: nothing is left beside the image" "base.img" "$(ls -A "$T/big")"
expect_fail "--snapshot-overlay disk is refused" "ram" "$VIRTNBD" --size 1M --snapshot-overlay disk --unix "$T/x.sock"

head -c 16M /dev/urandom >"$QIMG"
before=$(sha256_of "$QIMG")
start_qsd "$T/vhost.sock" "$QIMG"
start_server --device "vhost-user:$T/vhost.sock" --snapshot
/usr/bin/python3 - "$URI" >"$T/snapq.out" 2>&1 <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"Q" * 100000, 4095); h.zero(5000, 9 << 20)
assert h.pread(100000, 4095) == b"Q" * 100000 and h.pread(5000, 9 << 20) == bytes(5000)
h.flush()
print("readback ok")
PY
check_eq "--snapshot over vhost-user: writes read back" "readback ok" "$(tail -1 "$T/snapq.out")"
stop_server
stop_qsd
check_eq "--snapshot over vhost-user: qemu-storage-daemon's image is byte for byte unchanged" "$before" "$(sha256_of "$QIMG")"

finish
