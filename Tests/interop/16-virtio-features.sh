#!/usr/bin/env bash
# nbdcopy round trips of 64 MiB of random data with the virtio feature switches forced each way:
# packed rings on 4 queues, a split ring with neither EVENT_IDX nor indirect descriptors, and
# driver-side and device-side polling.
# The server's "virtio-blk ready" line must show what was negotiated.
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy nbdinfo sha256sum

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "virtio feature switches exist only in virtnbd"
    finish
    exit 0
fi

size=$((64 * 1024 * 1024))
head -c "$size" /dev/urandom >"$T/src.img" || die "cannot make random data"
src_sum=$(sha256_of "$T/src.img")

# round_trip LABEL ARGS...: write, read back on 4 connections, compare.
round_trip() {
    local label=$1; shift
    start_server --size 64M "$@"
    expect_ok "$label: nbdcopy file -> nbd (64 MiB)" nbdcopy "$T/src.img" "$URI"
    expect_ok "$label: nbdcopy nbd -> file (64 MiB, 4 connections)" nbdcopy --connections=4 "$URI" "$T/back.img"
    check_eq "$label: sha256 of data read back" "$src_sum" "$(sha256_of "$T/back.img" 2>&1)"
    rm -f "$T/back.img"
    stop_server
}

round_trip "packed, 4 queues" --ring packed --queues 4
check_match "packed, 4 queues: negotiated" 'features=[^ ]*MQ[^ ]*RING_PACKED.* queues=4 .*ring=packed' "$(grep 'virtio-blk ready' "$SERVER_ERR")"

round_trip "split, no EVENT_IDX, no indirect" --ring split --no-event-idx --no-indirect
ready=$(grep 'virtio-blk ready' "$SERVER_ERR")
check_match "split without EVENT_IDX/indirect: ring" 'ring=split' "$ready"
if grep -qE 'EVENT_IDX|INDIRECT_DESC' <<<"$ready"; then fail "EVENT_IDX or INDIRECT_DESC negotiated despite the switches" "$ready"
else pass "neither EVENT_IDX nor INDIRECT_DESC negotiated"; fi

round_trip "packed, odd queue size 100, adaptive polling" --ring packed --queue-size 100 --poll-us 50
# --no-device-inline: the RAM device on a thread of its own (the default is run to completion).
round_trip "split, device thread" --no-device-inline
if grep -q 'runs to completion on the notifying thread' "$SERVER_ERR"; then fail "--no-device-inline still ran the device inline" "$(cat "$SERVER_ERR")"
else pass "--no-device-inline: the device has its own thread"; fi
round_trip "split, device thread sleeping as soon as its queue is empty" --no-device-inline --device-poll-us 0
round_trip "packed, driver and device thread both polling" --ring packed --poll-us 20 --no-device-inline --device-poll-us 50
round_trip "packed, 4 queues, device thread" --ring packed --queues 4 --no-device-inline
# The default: the RAM device runs to completion on the notifying event loop, which reaps at once.
round_trip "split, device inline (the default)"
check_match "device inline: said at start" 'runs to completion on the notifying thread' "$(cat "$SERVER_ERR")"
round_trip "split, --device-inline said explicitly" --device-inline
round_trip "one queue shared by both event loops, device inline" --queues 1
round_trip "device inline, driver completion threads" --poll-us 20

# Bad switches are refused before anything starts.
expect_fail "--queue-size 100 with a split ring is refused" 'power of two' "$VIRTNBD" --size 1M --ring split --queue-size 100 -U "$T/x.sock"
expect_fail "--queues 0 is refused" 'queues must be 1-64' "$VIRTNBD" --size 1M --queues 0 -U "$T/x.sock"
expect_fail "--ring ring-of-fire is refused" 'ring' "$VIRTNBD" --size 1M --ring ring-of-fire -U "$T/x.sock"
expect_fail "--device-poll-us -1 is refused" 'device-poll-us' "$VIRTNBD" --size 1M --device-poll-us -1 -U "$T/x.sock"
finish
