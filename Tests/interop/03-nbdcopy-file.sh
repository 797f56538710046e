#!/usr/bin/env bash
# File-backed exports: --file PATH --size 64M creates the file (sparse), data
# written through NBD is in the file after the server exits; an existing
# file is exported with its own size and content.
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy nbdinfo sha256sum cmp

size=$((64 * 1024 * 1024))
head -c "$size" /dev/urandom >"$T/src.img" || die "cannot make random data"
src_sum=$(sha256_of "$T/src.img")

# --- 1. a new file, created by the server
disk="$T/disk.img"
start_server --file "$disk" --size 64M
if [[ -f "$disk" ]]; then pass "--file with --size created $disk"; else fail "--file with --size creates the file" "no file at $disk"; fi
check_eq "size of the created file" "$size" "$(stat -c %s "$disk" 2>&1)"
check_eq "nbdinfo --size of the file export" "$size" "$(nbdinfo --size "$URI" 2>&1)"
alloc=$(( $(stat -c %b "$disk") * $(stat -c %B "$disk") ))
if ((alloc < size / 2)); then pass "created file is sparse ($alloc bytes allocated)"; else fail "created file is sparse" "expected < $((size / 2)) bytes allocated, got $alloc"; fi

expect_ok "nbdcopy file -> nbd (64 MiB)" nbdcopy "$T/src.img" "$URI"
expect_ok "nbdcopy nbd -> file (64 MiB)" nbdcopy "$URI" "$T/back.img"
check_eq "sha256 read back through NBD" "$src_sum" "$(sha256_of "$T/back.img" 2>&1)"
rm -f "$T/back.img"
stop_server

if cmp "$T/src.img" "$disk" >"$T/cmp.out" 2>&1; then
    pass "after SIGTERM the backing file holds the data written (cmp)"
else
    fail "after SIGTERM the backing file holds the data written (cmp)" "$(cat "$T/cmp.out")"
fi

# --- 2. an existing file, no --size: exported with the file's size and content
odd=$((3 * 1024 * 1024 + 4096))
head -c "$odd" /dev/urandom >"$T/existing.img"
cp "$T/existing.img" "$T/existing.orig"
start_server --file "$T/existing.img"
check_eq "nbdinfo --size of an existing file" "$odd" "$(nbdinfo --size "$URI" 2>&1)"
expect_ok "nbdcopy nbd -> file of the existing file" nbdcopy "$URI" "$T/existing.back"
check_eq "content read through NBD equals the file" "$(sha256_of "$T/existing.orig")" "$(sha256_of "$T/existing.back" 2>&1)"
# Write a new first MiB through NBD (while the server runs).
head -c 1048576 /dev/urandom >"$T/mib"
need_cmd qemu-io
expect_ok "qemu-io write of the first MiB" qemu-io -f raw -c "write -s $T/mib 0 1M" "$URI"
stop_server
{ cat "$T/mib"; tail -c +$((1048576 + 1)) "$T/existing.orig"; } >"$T/existing.expect"
if cmp "$T/existing.expect" "$T/existing.img" >"$T/cmp.out" 2>&1; then
    pass "existing file holds the new first MiB and the old rest (cmp)"
else
    fail "existing file holds the new first MiB and the old rest (cmp)" "$(cat "$T/cmp.out")"
fi
finish
