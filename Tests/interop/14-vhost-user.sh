#!/usr/bin/env bash
# --device vhost-user: virtnbd drives qemu-storage-daemon's vhost-user-blk export of a file.
# nbdcopy, qemu-io and fio through it, then the backing file is compared byte for byte.
. "$(dirname "$0")/lib.sh"
need_cmd qemu-storage-daemon nbdcopy qemu-io fio cmp

img="$T/disk.img"; vsock="$T/vub.sock"
truncate -s 64M "$img"
start_qsd() {
    qemu-storage-daemon --blockdev driver=file,node-name=disk,filename="$img",discard=unmap \
        --export type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path="$vsock",writable=on \
        >"$T/qsd.log" 2>&1 &
    QSD_PID=$!; _ALL_PIDS+=("$QSD_PID")
    for _ in $(seq 100); do [[ -S "$vsock" ]] && return 0; sleep 0.05; done
    die "qemu-storage-daemon did not create $vsock" "$(cat "$T/qsd.log")"
}
stop_qsd() { kill "$QSD_PID" 2>/dev/null; wait "$QSD_PID" 2>/dev/null; rm -f "$vsock"; }

start_qsd
start_server --device "vhost-user:$vsock"
check_eq "nbdinfo: size of the vhost-user device" 67108864 "$(nbdinfo --size "$URI" 2>&1)"
head -c 64M /dev/urandom >"$T/rand"
expect_ok "nbdcopy 64 MiB in through vhost-user" nbdcopy "$T/rand" "$URI"
expect_ok "nbdcopy 64 MiB back out" nbdcopy "$URI" "$T/back"
check_eq "round trip matches (sha256)" "$(sha256_of "$T/rand")" "$(sha256_of "$T/back")"
stop_server
stop_qsd
if cmp "$T/rand" "$img" >"$T/cmp1" 2>&1; then pass "the backing file holds the 64 MiB written through virtnbd"; else fail "backing file after nbdcopy" "$(cat "$T/cmp1")"; fi

# qemu-io patterns at unaligned offsets and fio verify, then the file must equal a dump taken through NBD.
start_qsd
start_server --device "vhost-user:$vsock"
expect_ok "qemu-io unaligned pattern writes and reads" qemu-io -f raw \
    -c "write -P 0xa1 1 4097" -c "read -P 0xa1 1 4097" -c "write -P 0xb2 12345 511" -c "read -P 0xb2 12345 511" \
    -c "write -z 1M 65537" -c "read -P 0 1M 65537" -c "write -P 0xc3 67108863 1" -c "read -P 0xc3 67108863 1" "$URI"
expect_ok "fio randwrite with crc32c verify through vhost-user" fio --name=vu --ioengine=nbd --uri="$URI" \
    --rw=randwrite --bs=4k --iodepth=16 --size=16M --offset=32M --verify=crc32c --do_verify=1 --verify_state_save=0 --output-format=terse
expect_ok "dump the export through NBD" nbdcopy "$URI" "$T/dump"
stop_server
stop_qsd
if cmp "$T/dump" "$img" >"$T/cmp2" 2>&1; then pass "backing file equals what NBD clients see, byte for byte"; else fail "backing file vs NBD dump" "$(cat "$T/cmp2")"; fi
check_eq "unaligned write landed in the file" "a1a1" "$(dd if="$img" bs=1 skip=4096 count=2 status=none | od -An -tx1 | tr -d ' \n')"

# A backend that goes away is a device error: requests fail, the server stays up and exits cleanly.
start_qsd
start_server --device "vhost-user:$vsock"
kill -9 "$QSD_PID"; wait "$QSD_PID" 2>/dev/null
expect_fail "a read after the backend died fails with an I/O error" 'Input/output|EIO|error' \
    qemu-io -f raw -c "read 0 4096" "$URI"
check_eq "the server still answers the handshake" 67108864 "$(nbdinfo --size "$URI" 2>&1)"
stop_server
finish
