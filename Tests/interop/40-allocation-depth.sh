#!/usr/bin/env bash
# qemu:allocation-depth (QEMU 5.2's meta context: 0 unallocated, 1 this layer, 2 the layer below)
# on a --snapshot export of a file with data and holes, read by nbdinfo --map and by qemu-img map
# (x-dirty-bitmap=qemu:allocation-depth, as backup tools read it). A plain export does not offer
# it. Issue #34, part 2.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-img
[[ "$INTEROP_SERVER" == virtnbd ]] || { skip "40-allocation-depth tests virtnbd's --snapshot"; finish; }

img="$T/base.img"
truncate -s 1M "$img" || die "truncate"
# Data in [16K, 24K); the rest of the file is a hole.
head -c 8192 /dev/urandom >"$T/data" || die "urandom"
dd if="$T/data" of="$img" bs=4096 seek=4 conv=notrunc status=none || die "dd"

start_server --file "$img"
list=$(nbdinfo --list "$URI")
check_match "a plain export lists its contexts" 'base:allocation' "$list"
check_eq "a plain export does not offer qemu:allocation-depth" 0 "$(grep -c 'qemu:allocation-depth' <<<"$list")"
stop_server

start_server --file "$img" --snapshot
check_match "a --snapshot export offers qemu:allocation-depth" 'qemu:allocation-depth' \
    "$(nbdinfo --list "$URI" | grep -F 'qemu:allocation-depth')"

# nbdinfo --map prints: offset, length, value, description.
map() { nbdinfo --map=qemu:allocation-depth "$URI" | awk '{print $1, $2, $3}' | tr '\n' ';'; }
check_eq "before any write: the file's data is depth 2, its holes 0" \
    "0 16384 0;16384 8192 2;24576 1024000 0;" "$(map)"

# Write one block over a hole and one over the data; trim one block of hole: each is now the
# overlay's (depth 1), and the file is untouched.
nbdsh -u "$URI" -c 'h.pwrite(b"B" * 4096, 0); h.pwrite(b"C" * 4096, 16384); h.trim(4096, 40960); h.flush()' \
    || fail "nbdsh writes"
check_eq "written and trimmed blocks are depth 1, the rest as before" \
    "0 4096 1;4096 12288 0;16384 4096 1;20480 4096 2;24576 16384 0;40960 4096 1;45056 1003520 0;" "$(map)"

# qemu-img map reads the same context through x-dirty-bitmap (its JSON folds the context's value
# into its own fields), so what is compared is where it splits the export: where nbdinfo does.
qmap=$(qemu-img map --output=json --image-opts \
    "driver=nbd,server.type=unix,server.path=$SOCK,x-dirty-bitmap=qemu:allocation-depth" 2>&1 |
    grep -oE '"start": [0-9]+' | awk '{print $2}' | tr '\n' ' ')
check_eq "qemu-img map with x-dirty-bitmap=qemu:allocation-depth splits at the same offsets" \
    "0 4096 16384 20480 24576 40960 45056 " "$qmap"

stop_server
expect_ok "the file under the snapshot is unchanged" cmp "$T/data" <(dd if="$img" bs=4096 skip=4 count=2 status=none)
finish
