#!/usr/bin/env bash
# qemu-io pattern writes and reads at unaligned offsets and lengths, overlapping
# writes, write-zeroes and parallel aio writes; neighbours must be untouched.
# Every write is also applied to a local raw "model" image, which the export
# must equal at the end (qemu-img compare).
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io qemu-img

DISK=$((1024 * 1024))
truncate -s "$DISK" "$T/model.img"
start_server --size 1M

qio() { qemu-io -f raw "$@" "$URI"; }

# w PATTERN OFF LEN: pattern-write to the export and to the model.
w() {
    expect_ok "write -P $1 at offset $2, length $3" qio -c "write -P $1 $2 $3"
    qemu-io -f raw -c "write -P $1 $2 $3" "$T/model.img" >/dev/null 2>&1 || die "model write failed"
}
# r PATTERN OFF LEN: the export must read back PATTERN there.
r() {
    local rc=0
    _CMD_SEQ=$((_CMD_SEQ + 1)); LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    qio -c "read -P $1 $2 $3" >"$LAST_OUT" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]] && ! grep -qiE 'failed|error' "$LAST_OUT"; then
        pass "read -P $1 at offset $2, length $3"
    else
        fail "read -P $1 at offset $2, length $3" "qemu-io exit status $rc; output:" "$(_tail_of "$LAST_OUT")"
    fi
}

# The checker itself must be able to fail: a wrong pattern is reported.
r 0 0 "$DISK"     # fresh disk reads as zeroes
expect_fail "negative control: read -P 0xab of zeroes fails with 'Pattern verification failed'" \
    'Pattern verification failed' qio -c "read -P 0xab 0 4096"

# Single bytes and short unaligned runs.
w 0xab 1 1
r 0 0 1; r 0xab 1 1; r 0 2 510
w 0xcd 4097 511
r 0 4096 1; r 0xcd 4097 511; r 0 4608 1
w 0x5a 12347 4095
r 0 12346 1; r 0x5a 12347 4095; r 0 16442 1
w 0x77 65535 4097
r 0 65534 1; r 0x77 65535 4097; r 0 69632 1
w 0x3c 100001 12345
r 0 100000 1; r 0x3c 100001 12345; r 0 112346 1

# Overlapping writes: the later one wins exactly on the overlap.
w 0x11 200000 10000
w 0x22 205001 3333
r 0 199999 1; r 0x11 200000 5001; r 0x22 205001 3333; r 0x11 208334 1666; r 0 210000 1
# Overwrite a prefix and a suffix crossing sector boundaries.
w 0x33 199999 2
r 0 199998 1; r 0x33 199999 2; r 0x11 200001 4999
w 0x44 209999 3
r 0x11 208334 1665; r 0x44 209999 3; r 0 210002 1

# Write zeroes (NBD_CMD_WRITE_ZEROES when offered) inside written data, unaligned.
w 0x66 300000 8192
expect_ok "write -z at offset 301001, length 3001" qio -c "write -z 301001 3001"
qemu-io -f raw -c "write -z 301001 3001" "$T/model.img" >/dev/null 2>&1 || die "model write -z failed"
r 0x66 300000 1001; r 0 301001 3001; r 0x66 304002 4190; r 0 308192 1

# Several requests in flight at once (non-overlapping), then flush.
aio=()
for i in 0 1 2 3 4 5 6 7; do
    off=$((400000 + i * 5003)); aio+=(-c "aio_write -P $((0x80 + i)) $off 4999")
done
expect_ok "8 parallel aio_write of 4999 bytes, then aio_flush" qio "${aio[@]}" -c aio_flush
qemu-io -f raw "${aio[@]}" -c aio_flush "$T/model.img" >/dev/null 2>&1 || die "model aio writes failed"
for i in 0 1 2 3 4 5 6 7; do
    off=$((400000 + i * 5003))
    r $((0x80 + i)) "$off" 4999
    r 0 $((off + 4999)) 4
done

# The last bytes of the disk.
w 0xee $((DISK - 1)) 1
w 0xef $((DISK - 513)) 511
r 0 $((DISK - 514)) 1; r 0xef $((DISK - 513)) 511; r 0 $((DISK - 2)) 1; r 0xee $((DISK - 1)) 1

# A write-then-read inside a single connection, flush, and FUA write.
expect_ok "write, flush, read back in one connection" qio -c "write -P 0x99 500001 777" -c flush -c "read -P 0x99 500001 777"
expect_ok "FUA write (write -f) and read back" qio -c "write -f -P 0x9a 510001 1234" -c "read -P 0x9a 510001 1234"
qemu-io -f raw -c "write -P 0x99 500001 777" -c "write -P 0x9a 510001 1234" "$T/model.img" >/dev/null 2>&1 || die "model write failed"

# The whole export equals the model built from the same writes.
expect_ok "qemu-img compare: export equals the model image" qemu-img compare -f raw -F raw "$T/model.img" "$URI"

stop_server
finish
