#!/usr/bin/env bash
# Full + incremental backup with a dirty bitmap (docs/backup.md), on a RAM export and on a file
# export: random data, checkpoint (bitmap clear b0), full nbdcopy, seeded unaligned writes, a trim
# and a write-zeroes, a freeze (clear b0 --freeze-as b0-1), a reference copy of the export right
# then, more writes after the freeze (into blocks b0-1 does not mark), and
# Scripts/incremental-backup from b0-1 into a copy of the full backup: it must equal the
# reference byte for byte, differ from the export's final content, and have copied only b0-1's
# dirty bytes. The frozen bitmap must not change under the later writes (nor, for the file
# export, across a SIGTERM restart). A second freeze and incremental bring the copy up to the
# final content; it is restored into a fresh server. Then the epoch rule under 32 writes in
# flight, and the backup tool's errors. BACKUP_SEED=N replays the data and the writes.
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy cmp

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "dirty bitmaps and the control socket exist only in virtnbd"
    finish
    exit 0
fi

SIZE=$((64 << 20))
G=65536
BACKUP=$REPO_ROOT/Scripts/incremental-backup
SEED=${BACKUP_SEED:-$(( (RANDOM << 15) | RANDOM ))}
log "seed $SEED (replay: BACKUP_SEED=$SEED)"

/usr/bin/python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[1])).randbytes(int(sys.argv[2])))' \
    "$SEED" "$SIZE" >"$T/fill" || die "cannot make the fill data"

# writes.py (run in nbdsh with seed set): unaligned writes, one trim, one write-zeroes; prints
# the bytes of the granules they touch.
cat >"$T/writes.py" <<'PY'
import random
G = 65536
rnd = random.Random(seed)
size = h.get_size()
touched = set()
def did(n, off):
    touched.update(range(off // G, (off + n - 1) // G + 1))
for _ in range(40):
    n = rnd.randint(1, 300000)
    off = rnd.randrange(size - n)
    h.pwrite(rnd.randbytes(n), off)
    did(n, off)
n = rnd.randint(1, 500000)
off = rnd.randrange(size - n)
h.trim(n, off)
did(n, off)
n = rnd.randint(1, 500000)
off = rnd.randrange(size - n)
h.zero(n, off)
did(n, off)
h.flush()
print(len(touched) * G)
PY

# postfreeze.py (in nbdsh with seed, uri, frozen set): writes into blocks the frozen bitmap does
# not mark, each inside one granule; prints the bytes of the granules it dirtied.
cat >"$T/postfreeze.py" <<'PY'
import random
import nbd
G = 65536
rnd = random.Random(seed + 1)
size = h.get_size()
ctx = "qemu:dirty-bitmap:" + frozen
b = nbd.NBD()
b.add_meta_context(ctx)
b.connect_uri(uri)
clean, off = [], 0
while off < size:
    got = []
    b.block_status(size - off, off, lambda c, o, e, err: got.append(e) or 0)
    e = got[0]
    for i in range(0, len(e), 2):
        if not e[i + 1] & 1:
            clean += range(off // G, (off + e[i]) // G)
        off += e[i]
b.shutdown()
chunks = rnd.sample(clean, 9)
for c in chunks[:8]:
    start = rnd.randrange(1, G - 1)
    n = rnd.randint(1, G - start)
    h.pwrite(rnd.randbytes(n), c * G + start)
start = rnd.randrange(0, G - 4096)
h.zero(4096, chunks[8] * G + start)
h.flush()
print(len(set(chunks)) * G)
PY

ctl_cmd() { "$VIRTNBD" bitmap "$@" --control "$CTL"; }
# listing: "name:state:dirty" per bitmap, space separated.
listing() { ctl_cmd list | awk -F'\t' '{ sub("dirty=", "", $4); printf "%s%s:%s:%s", (NR > 1 ? " " : ""), $1, $2, $4 }'; }
dirty_of() { ctl_cmd list | awk -F'\t' -v n="$1" '$1 == n { sub("dirty=", "", $4); print $4 }'; }
bmap() { nbdinfo --map="qemu:dirty-bitmap:$1" "$URI"; }

# cycle ram|file
cycle() {
    local kind=$1 d="$T/$1"
    mkdir -p "$d"
    CTL="$d/ctl.sock"
    if [[ $kind == ram ]]; then
        start_server --size 64M --bitmap b0 --control "$CTL"
    else
        truncate -s "$SIZE" "$d/disk.img"
        start_server --file "$d/disk.img" --bitmap b0 --control "$CTL"
    fi
    check_eq "$kind: the control socket is mode 0600" "600" "$(stat -c %a "$CTL")"
    expect_ok "$kind: random data written with nbdcopy" nbdcopy "$T/fill" "$URI"
    check_eq "$kind: b0 marks all of it" "b0:active:$SIZE" "$(listing)"

    expect_ok "$kind: checkpoint: bitmap clear b0" ctl_cmd clear b0
    check_eq "$kind: b0 is empty after the clear" "b0:active:0" "$(listing)"
    expect_ok "$kind: full backup with nbdcopy" nbdcopy "$URI" "$d/full.img"

    expect_ok "$kind: seeded unaligned writes, a trim and a write-zeroes (nbdsh)" \
        nbdsh -u "$URI" -c "seed = $SEED" -c "exec(open('$T/writes.py').read())"
    local marked
    marked=$(tail -n 1 "$LAST_OUT")
    check_eq "$kind: b0 marks exactly the granules they touched" "$marked" "$(dirty_of b0)"

    expect_ok "$kind: freeze: bitmap clear b0 --freeze-as b0-1" ctl_cmd clear b0 --freeze-as b0-1
    check_eq "$kind: b0-1 holds b0's bits, b0 starts empty" "b0:active:0 b0-1:frozen:$marked" "$(listing)"
    expect_ok "$kind: reference copy of the export at the freeze" nbdcopy "$URI" "$d/ref.img"
    local frozen_map
    frozen_map=$(bmap b0-1 | sha256sum)

    local later
    later=$(nbdsh -u "$URI" -c "seed = $SEED" -c "uri = '$URI'" -c "frozen = 'b0-1'" \
        -c "exec(open('$T/postfreeze.py').read())" 2>&1)
    check_match "$kind: writes after the freeze, outside b0-1's blocks" '^[0-9]+$' "$later"
    check_eq "$kind: b0 marks exactly the blocks written after the freeze" "$later" "$(dirty_of b0)"

    if [[ $kind == file ]]; then
        stop_server
        start_server --file "$d/disk.img" --control "$CTL"
        check_eq "file: after a restart (no --bitmap: disk.img.bitmaps turns tracking on) both bitmaps are back" \
            "b0:active:$later b0-1:frozen:$marked" "$(listing)"
    fi
    check_eq "$kind: b0-1's map did not change under the later writes (sha256)" "$frozen_map" "$(bmap b0-1 | sha256sum)"

    cp "$d/full.img" "$d/inc.img"
    expect_fail "$kind: the full backup alone differs from the reference" 'differ' cmp "$d/inc.img" "$d/ref.img"
    expect_ok "$kind: incremental-backup from b0-1" "$BACKUP" "$URI" b0-1 "$d/inc.img"
    local summary copied total
    summary=$(cat "$LAST_OUT")
    log "$summary"
    copied=$(sed -nE 's/^incremental-backup: copied ([0-9]+) of ([0-9]+) bytes in [0-9]+ dirty extents .*/\1/p' <<<"$summary")
    total=$(sed -nE 's/^incremental-backup: copied ([0-9]+) of ([0-9]+) bytes in [0-9]+ dirty extents .*/\2/p' <<<"$summary")
    check_eq "$kind: the summary gives the export's size" "$SIZE" "$total"
    check_eq "$kind: it copied exactly b0-1's dirty bytes" "$marked" "$copied"
    if [[ -n "$copied" && "$copied" -gt 0 && "$copied" -lt "$SIZE" ]]; then pass "$kind: fewer bytes copied than the export's size"
    else fail "$kind: fewer bytes copied than the export's size" "copied=$copied size=$SIZE"; fi
    expect_ok "$kind: full + incremental equals the export at the freeze" cmp "$d/inc.img" "$d/ref.img"
    expect_ok "$kind: read the export's final content" nbdcopy "$URI" "$d/final.img"
    expect_fail "$kind: the writes after the freeze are not in the incremental" 'differ' cmp "$d/inc.img" "$d/final.img"

    expect_ok "$kind: bitmap remove b0-1 after the backup" ctl_cmd remove b0-1
    expect_ok "$kind: freeze again: bitmap clear b0 --freeze-as b0-2" ctl_cmd clear b0 --freeze-as b0-2
    expect_ok "$kind: incremental-backup from b0-2" "$BACKUP" "$URI" b0-2 "$d/inc.img"
    check_match "$kind: it copied b0-2's bytes" "copied $later of $SIZE bytes" "$(cat "$LAST_OUT")"
    expect_ok "$kind: the second incremental equals the final content" cmp "$d/inc.img" "$d/final.img"
    expect_ok "$kind: bitmap remove b0-2" ctl_cmd remove b0-2
    check_eq "$kind: only b0 is left, empty" "b0:active:0" "$(listing)"
    stop_server
}

cycle ram
cycle file

# The epoch rule under load: 32 writes in flight, one per granule, while a clear --freeze-as runs.
# Each write must be in exactly one of old and b0; one acknowledged before the clear was sent is
# in old, one sent after the clear answered is in b0.
cat >"$T/race.py" <<'PY'
import subprocess, sys, threading, time
import nbd
uri, virtnbd, ctl = sys.argv[1:4]
G = 65536
h = nbd.NBD()
h.connect_uri(uri)
N = h.get_size() // G
buf = nbd.Buffer(4096)
sent, acked, clear = {}, {}, {}
def run_clear():
    clear["t0"] = time.monotonic()
    clear["rc"] = subprocess.run([virtnbd, "bitmap", "clear", "b0", "--freeze-as", "old", "--control", ctl]).returncode
    clear["t1"] = time.monotonic()
def ack(i):
    def f(err):
        acked[i] = time.monotonic()
        return 1
    return f
th = threading.Thread(target=run_clear)
i = 0
while i < N and not ("t1" in clear and sum(t > clear["t1"] for t in sent.values()) >= 256):
    while h.aio_in_flight() < 32 and i < N:
        sent[i] = time.monotonic()
        h.aio_pwrite(buf, i * G, completion=ack(i))
        i += 1
    h.poll(-1)
    if len(acked) >= 256 and not th.is_alive() and "t0" not in clear:
        th.start()
while h.aio_in_flight() > 0:
    h.poll(-1)
th.join()
h.shutdown()
def dirty(name):
    b = nbd.NBD()
    b.add_meta_context("qemu:dirty-bitmap:" + name)
    b.connect_uri(uri)
    out, off, size = set(), 0, b.get_size()
    while off < size:
        got = []
        b.block_status(size - off, off, lambda c, o, e, err: got.append(e) or 0)
        for k in range(0, len(got[0]), 2):
            if got[0][k + 1] & 1:
                out.update(range(off // G, (off + got[0][k]) // G))
            off += got[0][k]
    b.shutdown()
    return out
print(("ok|" if clear.get("rc") == 0 else "fail|") + "the clear --freeze-as answered during the writes|rc %s" % clear.get("rc"))
old, new = dirty("old"), dirty("b0")
before = [k for k in acked if acked[k] < clear["t0"]]
after = [k for k in sent if sent[k] > clear["t1"]]
both = [k for k in sent if (k in old) == (k in new)]
extra = (old | new) - set(sent)
print(("ok|" if not both and not extra else "fail|") + "each of %d writes is in exactly one of old (%d) and b0 (%d)|in both or neither: %s; never written: %s" % (len(sent), len(old), len(new), both[:10], sorted(extra)[:10]))
miss = [k for k in before if k not in old]
print(("ok|" if not miss else "fail|") + "the %d writes acknowledged before the clear was sent are in old|missing: %s" % (len(before), miss[:10]))
wrong = [k for k in after if k in old or k not in new]
print(("ok|" if not wrong and after else "fail|") + "the %d writes sent after the clear answered are in b0 only|wrong: %s" % (len(after), wrong[:10]))
PY
start_server --size 256M --bitmap b0 --control "$T/race.sock"
run_py_checks "$T/race.py" "$URI" "$VIRTNBD" "$T/race.sock"
stop_server

# Restore into a fresh server; errors of the backup tool.
start_server --size 64M --bitmap b0 --control "$T/r.sock"
CTL="$T/r.sock"
expect_ok "restore: nbdcopy the backup into a fresh export" nbdcopy "$T/file/inc.img" "$URI"
expect_ok "restore: read it back" nbdcopy "$URI" "$T/restored.img"
expect_ok "restore: it equals the backup" cmp "$T/restored.img" "$T/file/inc.img"
expect_fail "incremental-backup: an unknown bitmap is named, with where to look" \
    'does not offer the meta context qemu:dirty-bitmap:nope.*it offers: b0.*virtnbd bitmap list --control' \
    "$BACKUP" "$URI" nope "$T/restored.img"
expect_fail "incremental-backup: a missing target is refused" 'cannot open the target' \
    "$BACKUP" "$URI" b0 "$T/no-such.img"
truncate -s 1M "$T/small.img"
expect_fail "incremental-backup: a target of another size is refused" 'is 1048576 bytes but the export is 67108864' \
    "$BACKUP" "$URI" b0 "$T/small.img"
expect_fail "incremental-backup: wrong usage exits non-zero" 'expected URI BITMAP TARGET-FILE' "$BACKUP" "$URI"
expect_ok "incremental-backup --help" "$BACKUP" --help
stop_server

finish
