#!/usr/bin/env bash
# Offline incremental backup (issue #34, part 4): a stopped file export's persisted bitmaps.
# - `virtnbd bitmap list --file IMAGE` reads IMAGE.bitmaps with no server, changes nothing, and
#   says whether each bitmap is consistent (a file left open across a host reboot is not);
# - `virtnbd -r --file IMAGE` offers them as qemu:dirty-bitmap:NAME, read by nbdinfo --map, and
#   leaves their bits as they were.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo
[[ "$INTEROP_SERVER" == virtnbd ]] || { skip "41-offline-bitmaps tests virtnbd's bitmap files"; finish; }

img="$T/disk.img"
truncate -s 8M "$img" || die "truncate"

# A writer marks [0, 64K) and [1M, 1M+64K) in b0, then stops cleanly.
start_server --file "$img" --bitmap b0
nbdsh -u "$URI" -c 'h.pwrite(b"A" * 4096, 0); h.pwrite(b"B" * 512, 1048576 + 100); h.flush()' || fail "nbdsh writes"
stop_server

sum_before=$(md5sum <"$img.bitmaps")
expect_ok "bitmap list --file, no server" "$VIRTNBD" bitmap list --file "$img"
check_eq "it prints the bitmap, its granularity, its dirty bytes and that it is consistent" \
    "b0	active	granularity=65536	dirty=131072	consistent" "$(cat "$LAST_OUT")"
expect_ok "bitmap list --file --json" "$VIRTNBD" bitmap list --file "$img" --json
check_match "the JSON says the file was closed cleanly" '"state":"clean"' "$(cat "$LAST_OUT")"
check_eq "listing changed nothing in the file" "$sum_before" "$(md5sum <"$img.bitmaps")"

# Read-only serving of the stopped disk: the bitmap is a context, with the writer's marks.
start_server -r --file "$img"
check_match "a read-only export offers the persisted bitmap" 'qemu:dirty-bitmap:b0' "$(nbdinfo --list "$URI")"
map=$(nbdinfo --map=qemu:dirty-bitmap:b0 "$URI" | awk '{print $1, $2, $3}' | tr '\n' ';')
check_eq "nbdinfo --map reads the writer's dirty chunks" \
    "0 65536 1;65536 983040 0;1048576 65536 1;1114112 7274496 0;" "$map"
stop_server
expect_ok "bitmap list --file after the read-only server" "$VIRTNBD" bitmap list --file "$img"
check_eq "the read-only server left the bits as they were" \
    "b0	active	granularity=65536	dirty=131072	consistent" "$(cat "$LAST_OUT")"

# A file left open across a host reboot: state 1 (open) at offset 12 and another boot id at 16.
printf '\x01\x00\x00\x00' | dd of="$img.bitmaps" bs=1 seek=12 conv=notrunc status=none
printf '%-48s' "another-boot" | tr ' ' '\0' | dd of="$img.bitmaps" bs=1 seek=16 conv=notrunc status=none
expect_ok "bitmap list --file of a file left open on another boot" "$VIRTNBD" bitmap list --file "$img"
check_match "the active bitmap is reported inconsistent" 'b0	active	.*	inconsistent' "$(cat "$LAST_OUT")"
check_match "and why, in one line" 'left open when the host went down' "$(cat "$LAST_OUT")"
expect_ok "--json" "$VIRTNBD" bitmap list --file "$img" --json
check_match "the JSON names the state" '"state":"open-other-boot"' "$(cat "$LAST_OUT")"

# Usage errors and a missing image get one line each.
expect_fail "--file only lists" 'only lists' "$VIRTNBD" bitmap clear b0 --file "$img"
expect_fail "neither --control nor --file" '--control PATH .* or --file IMAGE' "$VIRTNBD" bitmap list
expect_fail "a missing image" 'does not exist' "$VIRTNBD" bitmap list --file "$T/nope.img"
truncate -s 1M "$T/plain.img"
expect_ok "an image without bitmaps" "$VIRTNBD" bitmap list --file "$T/plain.img"
check_match "says so" 'has no dirty bitmaps' "$(cat "$LAST_OUT")"
finish
