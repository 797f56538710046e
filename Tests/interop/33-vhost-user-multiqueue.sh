#!/usr/bin/env bash
# vhost-user with several queues: qemu-storage-daemon exports vhost-user-blk with num-queues=4,
# virtnbd --device vhost-user:SOCK --queues 4 negotiates VIRTIO_BLK_F_MQ and brings up all four
# rings (its log), then nbdcopy round trips 64 MiB (read back on 4 connections), fio verifies
# crc32c on 4 connections at once, and the backing file equals what NBD clients read. More
# queues than the backend has are capped with a notice; a one-queue backend gets one.
# (NIO submits from one lane per event loop, so on an N-CPU machine only min(N, 4) of the rings
# carry requests; VhostUserTests.testFourQueuesAgainstQemuStorageDaemon drives all four.)
. "$(dirname "$0")/lib.sh"
need_cmd qemu-storage-daemon nbdcopy fio cmp

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "--device vhost-user exists only in virtnbd"
    finish
fi

img="$T/disk.img"; vsock="$T/vub.sock"
truncate -s 64M "$img"
start_qsd "$vsock" "$img" 4
start_server -v --device "vhost-user:$vsock" --queues 4
check_match "the backend reports 4 queues (GET_QUEUE_NUM)" 'queues=4 .*vhost-user backend connected' \
    "$(grep 'vhost-user backend connected' "$SERVER_ERR")"
check_match "virtio-blk ready with MQ and queues=4" 'features=[^ ]*MQ[^ ]* .*queues=4 ' \
    "$(grep 'virtio-blk ready' "$SERVER_ERR")"
check_eq "all four rings are live (SET_VRING_* acked, enabled)" "0 1 2 3" \
    "$(grep 'vhost-user queue live' "$SERVER_ERR" | sed -E 's/.*queue=([0-9]+).*/\1/' | sort -n | tr '\n' ' ' | sed 's/ $//')"
expect_ok "multi-conn is advertised" nbdinfo --can multi-conn "$URI"

head -c 64M /dev/urandom >"$T/rand"
expect_ok "nbdcopy 64 MiB in through 4 vhost-user queues" nbdcopy "$T/rand" "$URI"
expect_ok "nbdcopy 64 MiB back out on 4 connections" nbdcopy --connections=4 "$URI" "$T/back"
check_eq "round trip matches (sha256)" "$(sha256_of "$T/rand")" "$(sha256_of "$T/back")"
expect_ok "fio randwrite + crc32c verify on 4 connections (disjoint 16 MiB regions)" \
    fio --name=mq --ioengine=nbd --uri="$URI" --numjobs=4 --offset_increment=16M --size=16M \
    --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c --do_verify=1 --verify_state_save=0 \
    --group_reporting --output-format=terse
expect_ok "fio randwrite of 4k-64k blocks + crc32c verify on 4 connections" \
    fio --name=mq2 --ioengine=nbd --uri="$URI" --numjobs=4 --offset_increment=16M --size=8M \
    --rw=randwrite --bsrange=4k-64k --iodepth=8 --verify=crc32c --do_verify=1 --verify_state_save=0 \
    --group_reporting --output-format=terse
expect_ok "dump the export through NBD" nbdcopy --connections=4 "$URI" "$T/dump"
if grep -qE 'warning|error' "$SERVER_ERR"; then fail "no warnings or errors in the server log" "$(grep -E 'warning|error' "$SERVER_ERR" | head -5)"
else pass "no warnings or errors in the server log"; fi
stop_server
stop_qsd
if cmp "$T/dump" "$img" >"$T/cmp" 2>&1; then pass "backing file equals what NBD clients see, byte for byte"
else fail "backing file vs NBD dump" "$(cat "$T/cmp")"; fi

# More queues than the backend has: capped, with a notice.
start_qsd "$vsock" "$img" 4
start_server --device "vhost-user:$vsock" --queues 8
check_match "--queues 8 on a 4-queue backend: capped with a notice" 'asked for 8 queues; the device offers 4; using 4' \
    "$(cat "$SERVER_ERR")"
check_eq "--queues 8: the data is still there" "$(sha256_of "$T/dump")" "$(nbdcopy "$URI" - | sha256sum | cut -d' ' -f1)"
stop_server
stop_qsd

# A one-queue backend (qemu-storage-daemon's default) gets one queue.
start_qsd "$vsock" "$img" 1
start_server --device "vhost-user:$vsock" --queues 4
check_match "--queues 4 on a 1-queue backend: one queue" 'queues=1 ' "$(grep 'virtio-blk ready' "$SERVER_ERR")"
check_eq "one queue: nbdinfo size" 67108864 "$(nbdinfo --size "$URI" 2>&1)"
stop_server
stop_qsd
finish
