#!/usr/bin/env bash
# 20-crash-consistency: kill -9 the server under write load on a --file export, 20 times.
#
# A libnbd client (Debian's python3) keeps up to 16 writes in flight: unaligned writes of 1 B to
# 16 KiB, half of them with FUA, the rest followed by FLUSHes. Every write it issues, every
# write the server acknowledges and every FLUSH it issues and sees acknowledged goes to a
# journal. At a random moment (0.1-0.8 s in, while the client is still writing: checked) the
# server gets SIGKILL. Then the file is read directly and:
#   - every acknowledged FUA write is in the file;
#   - every write acknowledged before an acknowledged FLUSH was issued is in the file;
#   - nothing outside the ranges issued this round changed (against a copy taken before it).
# Writes of one round never overlap, so a durable write must be there byte for byte. The server
# is restarted on the same file each round; at the end the file must still hold the known
# starting pattern everywhere no round ever wrote.
. "$(dirname "$0")/lib.sh"

ROUNDS=${CRASH_ROUNDS:-20}
SIZE=$((128 << 20))   # 8192 slots of 16 KiB: the client must not run out before the kill
IMG="$T/disk.img"
/usr/bin/python3 - "$IMG" "$SIZE" <<'PY' || die "cannot create the pattern image"
import sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for blk in range(size // 4096):
        f.write((b"PATTERN-%08x-" % blk * 256)[:4096])
PY
cp "$IMG" "$T/original.img"
: >"$T/all-ranges"

cat >"$T/client.py" <<'PY'
# client.py URI JOURNAL SEED: write until the server goes away.
import random, sys, nbd
uri, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
# After issuing this many writes, create the marker file: the kill follows the load, not a clock.
marker, kill_after = sys.argv[4], int(sys.argv[5])
SLOT = 16384
rnd = random.Random(seed)
j = open(journal, "w", buffering=1)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
slots = list(range(size // SLOT))
rnd.shuffle(slots)
inflight = {}          # cookie -> ("W", id, off, len, seed, fua) | ("F", fid)
acked_plain = 0        # plain writes acknowledged since the last FLUSH was issued
wid = fid = 0
flush_inflight = False
try:
    while True:
        while len(inflight) < 16 and slots:
            if acked_plain >= 8 and not flush_inflight:
                fid += 1
                j.write("S %d\n" % fid)
                inflight[h.aio_flush()] = ("F", fid)
                flush_inflight = True
                acked_plain = 0
                continue
            slot = slots.pop()
            ln = rnd.choice([1, 7, 512, 4096, 4097, 8191, 12288, rnd.randint(1, SLOT)])
            off = slot * SLOT + rnd.randint(0, SLOT - ln)
            s = rnd.getrandbits(63)
            fua = rnd.random() < 0.5
            wid += 1
            j.write("I %d %d %d %d %d\n" % (wid, off, ln, s, fua))
            if wid == kill_after:
                open(marker, "w").close()
            data = random.Random(s).randbytes(ln)
            c = h.aio_pwrite(data, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
            inflight[c] = ("W", wid, off, ln, s, fua)
        if not inflight:
            j.write("# out of slots\n")   # the round ended before the kill: no crash under load
            break
        h.poll(-1)
        for c in list(inflight):
            if h.aio_command_completed(c):
                what = inflight.pop(c)
                if what[0] == "W":
                    j.write("A %d %d %d %d %d\n" % what[1:])
                    if not what[5]:
                        acked_plain += 1
                else:
                    j.write("F %d\n" % what[1])
                    flush_inflight = False
except nbd.Error as e:
    j.write("# client stopped: %s\n" % e)
j.close()
PY

cat >"$T/verify.py" <<'PY'
# verify.py ROUND IMG BASELINE JOURNAL ALLRANGES: prints ok|... / fail|... lines.
import random, re, sys
rnd_no, img, base, journal, allranges = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
data = open(img, "rb").read()
before = open(base, "rb").read()
issued, acked, flushes_issued, durable = {}, [], {}, set()
fua_n = flushed_n = 0
for line in open(journal):
    p = line.split()
    if not p or p[0] == "#":
        continue
    if p[0] == "I":
        issued[int(p[1])] = (int(p[2]), int(p[3]), int(p[4]))
    elif p[0] == "A":
        wid, fua = int(p[1]), p[5] == "1"
        acked.append(wid)
        if fua:
            durable.add(wid); fua_n += 1
    elif p[0] == "S":
        flushes_issued[int(p[1])] = list(acked)
    elif p[0] == "F":
        covered = flushes_issued[int(p[1])]
        flushed_n += len(set(covered) - durable)
        durable.update(covered)
bad = []
for wid in sorted(durable):
    off, ln, s = issued[wid]
    if data[off:off + ln] != random.Random(s).randbytes(ln):
        got = data[off:off + ln]
        first = next(i for i in range(ln) if got[i] != random.Random(s).randbytes(ln)[i])
        bad.append("write %d (%d+%d) differs from byte %d" % (wid, off, ln, first))
desc = "round %s: %d acknowledged FUA writes and %d writes covered by acknowledged FLUSHes are in the file" % (rnd_no, fua_n, flushed_n)
print(("fail|%s|%s" % (desc, "; ".join(bad[:5]))) if bad else "ok|" + desc)
# Outside the issued ranges nothing changed.
mask = bytearray(len(data))
with open(allranges, "a") as f:
    for off, ln, _ in issued.values():
        mask[off:off + ln] = b"\1" * ln
        f.write("%d %d\n" % (off, ln))
changed = []
if len(data) != len(before):
    changed.append("size %d, was %d" % (len(data), len(before)))
else:
    # A 4 KiB block that differs is looked at only in its runs of bytes no write covered (a byte
    # loop over every written block took most of each round's time).
    step, unwritten = 4096, re.compile(b"\0+")
    for o in range(0, len(data), step):
        if data[o:o + step] != before[o:o + step]:
            for m in unwritten.finditer(mask, o, o + step):
                a, b = m.start(), m.end()
                if data[a:b] != before[a:b]:
                    changed.append("byte %d" % next(i for i in range(a, b) if data[i] != before[i])); break
        if len(changed) >= 5:
            break
plain_present = sum(1 for w in acked if w not in durable and data[issued[w][0]:issued[w][0] + issued[w][1]] == random.Random(issued[w][2]).randbytes(issued[w][1]))
desc = "round %s: nothing outside the %d issued ranges changed" % (rnd_no, len(issued))
print(("fail|%s|%s" % (desc, "; ".join(changed))) if changed else "ok|" + desc)
print("info|round %s: %d writes issued, %d acknowledged (%d acknowledged but not yet flushed, of which %d in the file)" %
      (rnd_no, len(issued), len(acked), len(acked) - len(durable), plain_present), file=sys.stderr)
PY

cat >"$T/final.py" <<'PY'
import re, sys
data, orig = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
mask = bytearray(len(orig))
for line in open(sys.argv[3]):
    o, l = map(int, line.split()); mask[o:o + l] = b"\1" * l
# Only the runs of bytes no round wrote are compared (as in verify.py).
bad = []
for m in re.finditer(b"\0+", mask):
    a, b = m.start(), m.end()
    if data[a:b] != orig[a:b]:
        bad.append(next(i for i in range(a, b) if data[i] != orig[i]))
        if len(bad) >= 3:
            break
desc = "after all rounds, every byte no round wrote still holds the starting pattern"
print(("fail|%s|bytes %s" % (desc, bad)) if bad or len(data) != len(orig) else "ok|" + desc)
PY

total_issued=0
for ((round = 1; round <= ROUNDS; round++)); do
    cp "$IMG" "$T/baseline.img"
    start_server --file "$IMG" >/dev/null
    pid=$SERVER_PID
    # The plug is pulled once the client has issued 200 .. 4000 of its 8192 writes (it signals
    # with a marker file), so the kill finds it still writing whatever the machine's speed
    # (checked below); a clock-based delay let a fast client finish first.
    kill_after=$((200 + RANDOM % 3801))
    rm -f "$T/marker.$round"
    /usr/bin/python3 "$T/client.py" "$URI" "$T/journal.$round" "$round" "$T/marker.$round" "$kill_after" 2>"$T/client.$round.err" &
    client=$!
    for ((w = 0; w < 3000; w++)); do
        [[ -e "$T/marker.$round" ]] && break
        kill -0 "$client" 2>/dev/null || break
        sleep 0.01
    done
    if ! kill -0 "$pid" 2>/dev/null; then
        fail "round $round: server still running when the kill comes" "$(_tail_of "$SERVER_ERR")"
    fi
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    _forget_pid "$pid"
    # The client notices the dead socket and stops.
    for ((i = 0; i < 100; i++)); do kill -0 "$client" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$client" 2>/dev/null; then
        kill -KILL "$client" 2>/dev/null
        fail "round $round: client stops within 5 s of the server's death" "$(tail -n 5 "$T/client.$round.err")"
    fi
    wait "$client" 2>/dev/null
    grep -q '^A ' "$T/journal.$round" || log "round $round: no write was acknowledged before the kill"
    # The kill must find the server under load: the client still writing, requests in flight.
    issued=$(grep -c '^I ' "$T/journal.$round"); acked=$(grep -c '^A ' "$T/journal.$round")
    if grep -q '^# out of slots' "$T/journal.$round"; then
        fail "round $round: the kill came under load" "the client finished all $issued writes first (raise SIZE)"
    else
        pass "round $round: the kill came under load ($issued writes issued, $acked acknowledged, $((issued - acked)) in flight)"
    fi
    run_py_checks "$T/verify.py" "$round" "$IMG" "$T/baseline.img" "$T/journal.$round" "$T/all-ranges"
    grep '^info|' "$T/py.out" | sed 's/^info|/# /'
    total_issued=$((total_issued + $(grep -c '^I ' "$T/journal.$round")))
done
log "$total_issued writes issued over $ROUNDS rounds"
run_py_checks "$T/final.py" "$IMG" "$T/original.img" "$T/all-ranges"
finish
