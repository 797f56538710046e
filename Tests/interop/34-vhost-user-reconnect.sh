#!/usr/bin/env bash
# vhost-user reconnect: qemu-storage-daemon is killed with SIGKILL under a fio crc32c write load
# and started again on the same socket and image 2 s later, twice in one run. virtnbd holds what
# was in flight, reconnects (SET_OWNER .. SET_MEM_TABLE, the rings again) and resubmits: fio
# finishes with no error, its verify pass reads back every block through virtnbd, and the image
# file itself verifies afterwards. Then the window: with --reconnect-timeout 1 a held read fails
# with EIO after the window, new requests fail at once, a returning backend with a smaller image
# is refused (logged), and the right one is served again. --reconnect-timeout 0 fails at once.
. "$(dirname "$0")/lib.sh"
need_cmd qemu-storage-daemon fio nbdcopy python3

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "--device vhost-user exists only in virtnbd"
    finish
fi

img="$T/disk.img"; vsock="$T/vub.sock"
truncate -s 64M "$img"
pread() { nbdsh -u "$URI" -c "import sys; sys.stdout.buffer.write(h.pread($1, $2))"; }

# 1. Two backend restarts under a verified write load.
start_qsd "$vsock" "$img"
start_server -v --device "vhost-user:$vsock" --reconnect-timeout 30
fio --name=reconnect --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --size=64M --iodepth=8 \
    --verify=crc32c --do_verify=1 --verify_state_save=0 --rate=12m \
    --output-format=json --output="$T/fio.json" >"$T/fio.out" 2>&1 &
FIO_PID=$!; _ALL_PIDS+=("$FIO_PID")
for round in 1 2; do
    sleep 1.5
    if ! kill -0 "$FIO_PID" 2>/dev/null; then fail "fio still writing at restart $round" "$(cat "$T/fio.out")"; break; fi
    log "restart $round: SIGKILL qemu-storage-daemon, start it again 2 s later"
    kill_qsd
    sleep 2
    start_qsd "$vsock" "$img"
    expect_log "$round" 'vhost-user backend reconnected' "restart $round: virtnbd reconnected to $vsock"
done
fio_rc=0; wait "$FIO_PID" || fio_rc=$?; _forget_pid "$FIO_PID"
check_eq "fio randwrite + crc32c verify through both restarts: exit status" 0 "$fio_rc"
errs=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(j["error"], j["write"]["io_bytes"], j["read"]["io_bytes"])' "$T/fio.json" 2>&1)
check_eq "fio: no error, 64 MiB written and 64 MiB verified" "0 67108864 67108864" "$errs"
stall=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["clat_ns"]["max"]/1e6))' "$T/fio.json" 2>&1)
log "longest write completion across the restarts: $stall ms (backend away 2 s each time)"
log "$(grep -E 'device reset in|holding [0-9]+ request' "$SERVER_ERR" | sed -E 's/^.*(virtio-blk device .*)$/\1/' | tr '\n' ';')"
check_eq "two resets, each resubmitting what was held, none failed" 2 \
    "$(grep -cE 'virtio-blk device reset in .* resubmitting [0-9]+ request\(s\), 0 failed' "$SERVER_ERR")"
if grep -q 'failing every request\|did not come back' "$SERVER_ERR"; then
    fail "no request failed" "$(grep 'failing every request\|did not come back' "$SERVER_ERR" | head -3)"
else pass "no request failed"; fi
stop_server
stop_qsd
# The image itself holds what was acknowledged: fio regenerates the same write sequence and checks it.
expect_ok "the image file verifies on its own (fio --verify_only, psync on the file)" \
    fio --name=reconnect --ioengine=psync --filename="$img" --rw=randwrite --bs=4k --size=64M \
    --verify=crc32c --verify_only --verify_state_save=0

# 2. The window runs out, the backend is refused, then served again.
cp "$img" "$T/before.img"
truncate -s 32M "$T/small.img"
start_qsd "$vsock" "$img"
start_server --device "vhost-user:$vsock" --reconnect-timeout 1
expect_ok "read before the outage" pread 4096 0
kill_qsd
expect_log 1 'did not come back within 1' "after 1 s: an error line naming the socket and the fix"
check_eq "no second line for the same failure (failing every request)" 0 "$(grep -c 'failing every request' "$SERVER_ERR")"
check_match "the error line names the socket and says how to recover" "$vsock.*Restart the backend on the same socket" \
    "$(grep 'did not come back within 1' "$SERVER_ERR")"
expect_fail "a read after the window fails with EIO" 'Input/output error|EIO' pread 4096 0
start_qsd "$vsock" "$T/small.img"
expect_log 1 'came back with capacity' "a smaller returning backend is refused"
check_match "the refusal says what shrank" 'capacity 65536 sectors, was 131072; refusing it' "$(cat "$SERVER_ERR")"
expect_fail "reads still fail with EIO while the wrong backend is there" 'Input/output error|EIO' pread 4096 0
check_eq "the refused image was not written" 0 "$(tr -d '\0' <"$T/small.img" | wc -c)"
kill_qsd
start_qsd "$vsock" "$img"
expect_log 1 'device is back after' "the right backend returns: serving again"
check_eq "after the return: the data is the same" "$(head -c 1M "$T/before.img" | sha256sum | cut -d' ' -f1)" \
    "$(pread 1048576 0 | sha256sum | cut -d' ' -f1)"
stop_server
stop_qsd

# 3. --reconnect-timeout 0: today's behaviour, the first failed reset fails everything.
start_qsd "$vsock" "$img"
start_server --device "vhost-user:$vsock" --reconnect-timeout 0
expect_ok "reconnect off: read while the backend is up" pread 4096 0
kill_qsd
expect_log 1 'failing every request' "reconnect off: the device fails at once"
expect_fail "reconnect off: a read fails with EIO" 'Input/output error|EIO' pread 4096 0
stop_server
rm -f "$vsock"
finish
