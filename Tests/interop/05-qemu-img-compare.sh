#!/usr/bin/env bash
# qemu-img convert a local raw image (random data with zero and sparse regions)
# onto the export, then qemu-img compare them; a one-byte change must be seen.
. "$(dirname "$0")/lib.sh"
need_cmd qemu-img qemu-io cmp

MiB=1048576
# 32 MiB image: 8 MiB random, 8 MiB hole, 4 MiB explicit zeroes, 12 MiB random.
img="$T/local.img"
truncate -s $((32 * MiB)) "$img"
head -c $((8 * MiB)) /dev/urandom | dd of="$img" bs=1M seek=0 conv=notrunc status=none
head -c $((4 * MiB)) /dev/zero | dd of="$img" bs=1M seek=16 conv=notrunc status=none
head -c $((12 * MiB)) /dev/urandom | dd of="$img" bs=1M seek=20 conv=notrunc status=none

start_server --size 32M
# Dirty the region that must become zero, so a skipped zero-write is caught.
expect_ok "pre-fill 8-16 MiB of the export with 0xff" qemu-io -f raw -c "write -P 0xff 8M 8M" "$URI"

expect_ok "qemu-img convert -n local raw -> nbd" qemu-img convert -n -f raw -O raw "$img" "$URI"
expect_ok "qemu-img compare local raw vs export: identical" qemu-img compare -f raw -F raw "$img" "$URI"
if grep -q 'Images are identical' "$LAST_OUT"; then pass "qemu-img compare says 'Images are identical'"; else fail "qemu-img compare says 'Images are identical'" "$(cat "$LAST_OUT")"; fi

expect_ok "qemu-img convert nbd -> new local raw" qemu-img convert -f raw -O raw "$URI" "$T/back.img"
if cmp "$img" "$T/back.img" >"$T/cmp.out" 2>&1; then pass "cmp local image vs image converted back"; else fail "cmp local image vs image converted back" "$(cat "$T/cmp.out")"; fi

# Negative control: change one byte on the export; compare must report it.
orig=$(od -An -tu1 -j 20971521 -N 1 "$img" | tr -d ' ')
flipped=$((orig ^ 0xff))
expect_ok "qemu-io: change the byte at offset 20971521 ($orig -> $flipped)" qemu-io -f raw -c "write -P $flipped 20971521 1" "$URI"
rc=0
qemu-img compare -f raw -F raw "$img" "$URI" >"$T/cmp2.out" 2>&1 || rc=$?
# qemu-img compare exit status: 0 identical, 1 different, 2+ error.
if [[ $rc -eq 1 ]] && grep -q 'Content mismatch at offset 20971520' "$T/cmp2.out"; then
    pass "qemu-img compare detects the changed byte (exit 1, mismatch at 20971520)"
else
    fail "qemu-img compare detects the changed byte" "expected exit 1 and 'Content mismatch at offset 20971520'" "got exit $rc: $(cat "$T/cmp2.out")"
fi

stop_server
finish
