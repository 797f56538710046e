#!/usr/bin/env bash
# 02-rbd-daemon-restart: the qemu-storage-daemon behind --device rbd: is killed with SIGKILL twice
# under a fio crc32c write load. virtnbd starts it again on the same socket, the vhost-user
# reconnect path resubmits what was in flight: fio finishes with no error and its verify pass
# reads back every block; the image itself verifies afterwards (rbd export, fio --verify_only).
# The outage is the daemon's restart plus librbd taking over the exclusive lock the killed one
# held (Scripts/ceph-cluster sets osd client watch timeout = 5 s; 30 s is Ceph's default).
. "$(dirname "$0")/lib.sh"
need_cmd fio python3
SEED=${RBD_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed=$SEED (replay: RBD_SEED=$SEED)"

img=$(new_image restart 64M)
start_server -v --device "rbd:$img@$CEPH_CONF" --reconnect-timeout 90
first=$(qsd_of "$SERVER_PID")
fio --name=restart --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --size=64M --iodepth=8 \
    --verify=crc32c --do_verify=1 --verify_state_save=0 --rate=8m --randseed="$SEED" \
    --output-format=json --output="$T/fio.json" >"$T/fio.out" 2>&1 &
FIO_PID=$!; _ALL_PIDS+=("$FIO_PID")
pids=("$first")
for round in 1 2; do
    sleep 1.5
    if ! kill -0 "$FIO_PID" 2>/dev/null; then fail "fio still writing at kill $round" "$(cat "$T/fio.out")"; break; fi
    victim=$(qsd_of "$SERVER_PID")
    log "kill $round: SIGKILL qemu-storage-daemon pid $victim"
    kill -KILL "$victim"
    expect_log "$round" 'qemu-storage-daemon restarted \(pid' "kill $round: virtnbd started the daemon again"
    expect_log "$round" 'vhost-user backend reconnected' "kill $round: virtnbd reconnected to it"
    pids+=("$(qsd_of "$SERVER_PID")")
done
fio_rc=0; wait "$FIO_PID" || fio_rc=$?; _forget_pid "$FIO_PID"
check_eq "fio randwrite + crc32c verify through both kills: exit status" 0 "$fio_rc"
errs=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(j["error"], j["write"]["io_bytes"], j["read"]["io_bytes"])' "$T/fio.json" 2>&1)
check_eq "fio: no error, 64 MiB written and 64 MiB verified" "0 67108864 67108864" "$errs"
stall=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["clat_ns"]["max"]/1e6))' "$T/fio.json" 2>&1)
log "longest write completion across the kills: $stall ms"
check_eq "three different daemons served the image" 3 "$(printf '%s\n' "${pids[@]}" | sort -u | grep -c .)"
check_eq "two resets, each resubmitting what was held, none failed" 2 \
    "$(grep -cE 'virtio-blk device reset in .* resubmitting [0-9]+ request\(s\), 0 failed' "$SERVER_ERR")"
if grep -q 'failing every request\|did not come back' "$SERVER_ERR"; then
    fail "no request failed" "$(grep 'failing every request\|did not come back' "$SERVER_ERR" | head -3)"
else pass "no request failed"; fi
last=$(qsd_of "$SERVER_PID")
stop_server
check_eq "the last daemon is gone after virtnbd stops" "" "$(ps -o pid= -p "$last" 2>/dev/null | tr -d ' ')"
expect_ok "the image verifies on its own (rbd export, then fio --verify_only on the copy)" \
    bash -c "rbd export --no-progress '$img' '$T/after.raw' &&
        fio --name=restart --ioengine=psync --filename='$T/after.raw' --rw=randwrite --bs=4k --size=64M \
        --verify=crc32c --verify_only --verify_state_save=0 --randseed='$SEED'"
finish
