#!/usr/bin/env bash
# Sizes that are not a multiple of 4 KiB (or of a 512-byte sector) are exported to the byte:
# --size 5000 / 1000 / 1 RAM disks, a 10,000-byte --file (its last byte reachable, the file never
# grown by writes at its tail), base:allocation ending at the exact size, and a vhost-user device
# whose 10240-byte image is whole sectors but not whole 4 KiB blocks. (qemu-img info is no check
# of the size: QEMU 7.2's NBD client rounds an export up to whole sectors, for nbdkit too; qemu-io
# does reach the exact last byte.)
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo nbdcopy qemu-io qemu-img cmp

qio() { qemu-io -f raw "$@" "$URI"; }
# qio_ok DESC ARGS...: qemu-io must exit 0 and print no failure (a failed read -P still exits 0).
qio_ok() {
    local desc=$1 rc=0; shift
    _CMD_SEQ=$((_CMD_SEQ + 1)); LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    qio "$@" >"$LAST_OUT" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]] && ! grep -qiE 'failed|error' "$LAST_OUT"; then pass "$desc"
    else fail "$desc" "qemu-io $* (exit $rc):" "$(_tail_of "$LAST_OUT")"; fi
}
# past_end SIZE: libnbd (bounds checks off, so the server answers) reads the last byte, and a
# read, write or zero running one byte past the end must fail.
past_end() {
    cat >"$T/past.py" <<'PY'
import sys, nbd
uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(uri)
def check(desc, f):
    try: f(); print("fail|%s|it succeeded" % desc)
    except nbd.Error as e: print("ok|%s (%s)" % (desc, e.string.split(":")[-1].strip() if e.string else e.errno))
try: h.pread(1, size - 1); print("ok|the last byte reads")
except nbd.Error as e: print("fail|the last byte reads|%s" % e)
check("a read running one byte past the end is refused by the server", lambda: h.pread(2, size - 1))
check("a write starting at the end is refused by the server", lambda: h.pwrite(b"x", size))
check("a write-zeroes running past the end is refused by the server", lambda: h.zero(2, size - 1))
h.shutdown()
PY
    run_py_checks "$T/past.py" "$URI" "$1"
}
# map_end: where nbdinfo --map's last extent ends; map_total: the sum of its lengths.
map_end() { nbdinfo --map "$URI" | awk 'END { print $1 + $2 }'; }
map_total() { nbdinfo --map "$URI" | awk '{ s += $2 } END { print s }'; }

# --- RAM disks of 5000, 1000 and 1 bytes.
start_server --size 5000
check_eq "--size 5000: nbdinfo --size" 5000 "$(nbdinfo --size "$URI" 2>&1)"
check_eq "--size 5000: nbdinfo --map covers the export" 5000 "$(map_total)"
check_eq "--size 5000: the last extent ends at the exact size" 5000 "$(map_end)"
qio_ok "--size 5000: the whole export reads as zero" -c "read -P 0 0 5000"
qio_ok "--size 5000: write and read back the last byte" -c "write -P 0x5a 4999 1" -c "read -P 0x5a 4999 1" -c "read -P 0 0 4999"
qio_ok "--size 5000: an unaligned write across the 4 KiB boundary into the tail" \
    -c "write -P 0x6b 4000 1000" -c "read -P 0x6b 4000 1000" -c "read -P 0 0 4000"
expect_fail "negative control: a wrong pattern at the tail is reported" 'Pattern verification failed' \
    qio -c "read -P 0x5a 4999 1"
past_end 5000
qio_ok "--size 5000: write-zeroes and trim to the end" -c "write -z 4096 904" -c "read -P 0 4096 904" -c "discard 4096 904" \
    -c "read -P 0 4096 904" -c "read -P 0x6b 4000 96"
check_eq "--size 5000: the map still ends at the exact size after zeroing the tail" 5000 "$(map_end)"
stop_server

start_server --size 1000
check_eq "--size 1000: nbdinfo --size" 1000 "$(nbdinfo --size "$URI" 2>&1)"
qio_ok "--size 1000: read, write and read back all 1000 bytes" -c "read -P 0 0 1000" -c "write -P 0x33 0 1000" -c "read -P 0x33 0 1000"
check_eq "--size 1000: the last extent ends at 1000" 1000 "$(map_end)"
stop_server

start_server --size 1
check_eq "--size 1: nbdinfo --size" 1 "$(nbdinfo --size "$URI" 2>&1)"
past_end 1
qio_ok "--size 1: the one byte reads, writes and reads back" -c "read -P 0 0 1" -c "write -P 0x5a 0 1" -c "read -P 0x5a 0 1"
stop_server

# --- A 10,000-byte file: every byte reachable, and the file never grows.
img="$T/ten-thousand.img"
head -c 10000 /dev/urandom >"$img"
cp "$img" "$T/model.img"
start_server --file "$img"
check_eq "10,000-byte --file: nbdinfo --size" 10000 "$(nbdinfo --size "$URI" 2>&1)"
expect_ok "10,000-byte --file: nbdcopy the export out" nbdcopy "$URI" "$T/out.img"
if cmp "$img" "$T/out.img" >"$T/cmp0" 2>&1; then pass "the export holds all 10,000 bytes of the file, the last 1,808 included"
else fail "the export equals the file" "$(cat "$T/cmp0")"; fi
qio_ok "10,000-byte --file: write and read back the last byte" -c 'write -P 0x5a 9999 1' -c 'read -P 0x5a 9999 1'
past_end 10000
writes=(-c "write -P 0x77 8000 2000" -c "write -z 9500 300" -c "write -P 0x5a 9999 1")
qio_ok "10,000-byte --file: pattern and zero writes ending at the tail" "${writes[@]}" -c flush
qemu-io -f raw -c 'write -P 0x5a 9999 1' "${writes[@]}" "$T/model.img" >/dev/null 2>&1 || die "model writes failed"
check_eq "10,000-byte --file: nbdinfo --map covers the export" 10000 "$(map_total)"
check_eq "10,000-byte --file: the last extent ends at the exact size" 10000 "$(map_end)"
expect_ok "qemu-img compare: the export equals the model" qemu-img compare -f raw -F raw "$T/model.img" "$URI"
stop_server
check_eq "the file is still 10,000 bytes after writes at its tail" 10000 "$(stat -c %s "$img")"
if cmp "$T/model.img" "$img" >"$T/cmp1" 2>&1; then pass "the file holds exactly what was written"
else fail "the file equals the model" "$(cat "$T/cmp1")"; fi
check_eq "the last byte of the file" 5a "$(tail -c 1 "$img" | od -An -tx1 | tr -d ' \n')"

# --- vhost-user: a 10240-byte image is 20 sectors, 2.5 blocks of 4 KiB.
if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "vhost-user case: virtnbd only"
elif ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    skip "vhost-user case: qemu-storage-daemon not installed (apt-get install qemu-system-common)"
else
    vimg="$T/vhost.img"; vsock="$T/vub.sock"
    head -c 10240 /dev/urandom >"$vimg"
    cp "$vimg" "$T/vmodel.img"
    qemu-storage-daemon --blockdev driver=file,node-name=disk,filename="$vimg",discard=unmap \
        --export type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path="$vsock",writable=on \
        >"$T/qsd.log" 2>&1 &
    QSD_PID=$!; _ALL_PIDS+=("$QSD_PID")
    for _ in $(seq 100); do [[ -S "$vsock" ]] && break; sleep 0.05; done
    [[ -S "$vsock" ]] || die "qemu-storage-daemon did not create $vsock" "$(cat "$T/qsd.log")"
    start_server --device "vhost-user:$vsock"
    check_eq "vhost-user 10240-byte image: nbdinfo --size" 10240 "$(nbdinfo --size "$URI" 2>&1)"
    past_end 10240
    expect_ok "vhost-user: nbdcopy the export out" nbdcopy "$URI" "$T/vout.img"
    if cmp "$vimg" "$T/vout.img" >"$T/cmp2" 2>&1; then pass "vhost-user: the export holds all 10240 bytes of the image"
    else fail "vhost-user: the export equals the image" "$(cat "$T/cmp2")"; fi
    vwrites=(-c "write -P 0x5a 10239 1" -c "write -P 0x44 8000 1000" -c "write -z 9216 512" -c "write -P 0x45 9900 10")
    qio_ok "vhost-user: unaligned writes in the partial last block, read back" "${vwrites[@]}" \
        -c "read -P 0x5a 10239 1" -c "read -P 0x44 8000 1000" -c "read -P 0 9216 512" -c "read -P 0x45 9900 10" -c flush
    qemu-io -f raw "${vwrites[@]}" "$T/vmodel.img" >/dev/null 2>&1 || die "model writes failed"
    check_eq "vhost-user: the last extent ends at 10240" 10240 "$(map_end)"
    expect_ok "vhost-user: qemu-img compare with the model" qemu-img compare -f raw -F raw "$T/vmodel.img" "$URI"
    stop_server
    kill "$QSD_PID" 2>/dev/null; wait "$QSD_PID" 2>/dev/null; _forget_pid "$QSD_PID"
    check_eq "vhost-user: the image is still 10240 bytes" 10240 "$(stat -c %s "$vimg")"
    if cmp "$T/vmodel.img" "$vimg" >"$T/cmp3" 2>&1; then pass "vhost-user: the image holds exactly what was written"
    else fail "vhost-user: the image equals the model" "$(cat "$T/cmp3")"; fi
fi
finish
