#!/usr/bin/env bash
# nbdcopy round trip of 64 MiB of random data through a RAM export (--size 64M).
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy nbdinfo sha256sum

size=$((64 * 1024 * 1024))
head -c "$size" /dev/urandom >"$T/src.img" || die "cannot make random data"
src_sum=$(sha256_of "$T/src.img")

start_server --size 64M
check_eq "nbdinfo --size of a --size 64M export" "$size" "$(nbdinfo --size "$URI" 2>&1)"

expect_ok "nbdcopy file -> nbd (64 MiB)" nbdcopy "$T/src.img" "$URI"
expect_ok "nbdcopy nbd -> file (64 MiB)" nbdcopy "$URI" "$T/back.img"
check_eq "sha256 of data read back equals sha256 of data written" "$src_sum" "$(sha256_of "$T/back.img" 2>&1)"
rm -f "$T/back.img"

# A second, independent read on a new connection with a different request
# size and parallelism.
expect_ok "nbdcopy nbd -> file again (1 connection, 4 requests of 64 KiB)" \
    nbdcopy --connections=1 --requests=4 --request-size=65536 "$URI" "$T/back2.img"
check_eq "sha256 of the second read" "$src_sum" "$(sha256_of "$T/back2.img" 2>&1)"
rm -f "$T/back2.img"

# Overwrite the first half with zeroes; nbdcopy detects zeroes and may use
# WRITE_ZEROES / trim.  Then check the whole disk.
head -c $((size / 2)) /dev/zero >"$T/mixed.img"
tail -c $((size / 2)) "$T/src.img" >>"$T/mixed.img"
expect_ok "nbdcopy of a half-zero image -> nbd" nbdcopy "$T/mixed.img" "$URI"
expect_ok "nbdcopy nbd -> file" nbdcopy "$URI" "$T/back3.img"
check_eq "sha256 after zeroing the first half" "$(sha256_of "$T/mixed.img")" "$(sha256_of "$T/back3.img" 2>&1)"

stop_server
finish
