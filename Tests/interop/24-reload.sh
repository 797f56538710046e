#!/usr/bin/env bash
# SIGHUP re-reads --config: exports are added and removed while a client of another export keeps
# doing verified I/O undisturbed; a removed export's client is finished and new clients of it are
# refused; a bad file is logged and the running configuration stays.
. "$(dirname "$0")/lib.sh"

S="$T/nbd.sock"
head -c 4M /dev/urandom >"$T/golden.img"
# write_config EXPORT-NAMES...: the config with these of scratch, images, golden, extra.
write_config() {
    {
        echo "listen:"
        echo "  - $S"
        echo "exports:"
        local n
        for n in "$@"; do
            case $n in
                scratch) printf '  - name: scratch\n    device: ram\n    size: 16M\n' ;;
                images)  printf '  - name: images\n    device: file\n    path: images.img\n    size: 8M\n' ;;
                golden)  printf '  - name: golden\n    device: file\n    path: golden.img\n    read-only: true\n' ;;
                extra)   printf '  - name: extra\n    description: "added by reload"\n    device: ram\n    size: 4M\n' ;;
            esac
        done
    } >"$T/virtnbd.yaml.new"
    mv "$T/virtnbd.yaml.new" "$T/virtnbd.yaml"
}
names() { nbdinfo --list --json "nbd+unix://?socket=$S" 2>/dev/null | /usr/bin/python3 -c '
import json,sys; print(" ".join(e["export-name"] for e in json.load(sys.stdin)["exports"]))'; }
# wait_names EXPECTED: poll the list until it is EXPECTED (10 s).
wait_names() { local got; for _ in $(seq 100); do got=$(names); [[ "$got" == "$1" ]] && break; sleep 0.1; done; echo "$got"; }
uri() { echo "nbd+unix:///$1?socket=$S"; }

write_config scratch images golden
"$VIRTNBD" --config "$T/virtnbd.yaml" >"$T/out" 2>"$T/err" &
pid=$!; _ALL_PIDS+=("$pid")
for _ in $(seq 100); do [[ -s "$T/out" && -S "$S" ]] && break; sleep 0.1; done
check_eq "nbdinfo --list shows the three exports" "scratch images golden" "$(names)"

# A client of scratch doing verified I/O for the whole test, against a shadow copy.
cat >"$T/busy.py" <<'PY'
import nbd, os, random, sys
uri, stop = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size(); shadow = bytearray(size); n = 0
while not os.path.exists(stop):
    length = 4096 * random.randint(1, 16)
    off = random.randrange(0, (size - length) // 512 + 1) * 512
    data = os.urandom(length)
    h.pwrite(data, off); shadow[off:off + length] = data
    got = h.pread(length, off)
    if got != data: print("fail|verified I/O on scratch|read-back mismatch at %d+%d after %d writes" % (off, length, n)); sys.exit(1)
    n += 1
h.flush()
whole = b"".join(h.pread(1 << 20, o) for o in range(0, size, 1 << 20))
h.shutdown()
if whole != bytes(shadow): print("fail|verified I/O on scratch|final image differs from the shadow copy"); sys.exit(1)
print("ok|verified I/O on scratch: %d writes, final image matches" % n)
PY
/usr/bin/python3 "$T/busy.py" "$(uri scratch)" "$T/stop" >"$T/busy.out" 2>&1 &
busy=$!
sleep 1

# An idle client of images, which the second reload removes.
cat >"$T/idle.py" <<'PY'
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print("connected", flush=True)
for _ in range(300):
    try: h.pread(512, 0)
    except nbd.Error as e: print("disconnected:", e); sys.exit(0)
    time.sleep(0.1)
print("still connected after 30 s"); sys.exit(1)
PY
/usr/bin/python3 "$T/idle.py" "$(uri images)" >"$T/idle.out" 2>&1 &
idle=$!

# Reload 1: a fourth export.
write_config scratch images golden extra
kill -HUP "$pid"
check_eq "after SIGHUP, nbdinfo --list shows four exports" "scratch images golden extra" "$(wait_names "scratch images golden extra")"
expect_ok "the new export serves I/O" nbdsh -u "$(uri extra)" -c "h.pwrite(b'\\x11' * 4096, 0); assert h.pread(4096, 0) == b'\\x11' * 4096; assert h.get_size() == 4 << 20"
check_match "the reload is logged" 'configuration reloaded: added "extra"; removed none; replaced none; updated in place none; 3 unchanged' "$(cat "$T/err")"

# Reload 2: images removed.
write_config scratch golden extra
kill -HUP "$pid"
check_eq "after SIGHUP, images is gone from the list" "scratch golden extra" "$(wait_names "scratch golden extra")"
expect_fail "a new client of images is refused" 'unknown|not found|No such|does not exist|ERR_UNKNOWN|server' nbdinfo --size "$(uri images)"
rc=0; wait "$idle" || rc=$?
check_eq "the removed export's connected client was finished" 0 "$rc"
check_match "... it was connected, then saw the disconnect" $'^connected\ndisconnected' "$(cat "$T/idle.out")"

# Reload 3: a broken file; the running configuration stays.
printf 'exports:\n  - name: x\n    device: ram\n    size: 64Q\n' >"$T/virtnbd.yaml"
kill -HUP "$pid"
for _ in $(seq 50); do grep -q 'reload failed' "$T/err" && break; sleep 0.1; done
check_match "a bad file is logged with its error" 'reload failed, the running configuration stays: .*virtnbd\.yaml:4: exports\[0\]\.size' "$(cat "$T/err")"
check_eq "... and the exports stay" "scratch golden extra" "$(names)"
if kill -0 "$pid" 2>/dev/null; then pass "the server is still running"; else fail "the server is still running"; fi

# Reload 4: a changed export (extra grows to 8M) is replaced; scratch is still untouched.
write_config scratch golden extra
sed -i 's/size: 4M/size: 8M/' "$T/virtnbd.yaml"
kill -HUP "$pid"
for _ in $(seq 50); do [[ "$(nbdinfo --size "$(uri extra)" 2>/dev/null)" == 8388608 ]] && break; sleep 0.1; done
check_eq "a changed export is reopened with its new size" 8388608 "$(nbdinfo --size "$(uri extra)" 2>&1)"

expect_ok "a client without structured replies (no SEND_DF) still reaches an export after the reloads" \
    nbdsh -c "h.set_request_structured_replies(False); h.connect_uri('$(uri golden)'); assert h.pread(512, 0) == open('$T/golden.img', 'rb').read(512)"

touch "$T/stop"
rc=0; wait "$busy" || rc=$?
check_eq "the busy client of scratch exits 0" 0 "$rc"
check_match "the busy client of scratch saw no error through four reloads" '^ok\|verified I/O on scratch: [1-9][0-9]* writes, final image matches$' "$(cat "$T/busy.out")"

kill -TERM "$pid"; rc=0; wait "$pid" || rc=$?
_forget_pid "$pid"
check_eq "SIGTERM after reloads: exit status 0" 0 "$rc"
finish
