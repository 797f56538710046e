#!/bin/bash
# kernel-client.guest.sh - the guest half of kernel-client.sh (runs under Scripts/vmtest/vmtest.sh).
# Drives the Linux kernel NBD client (nbd-client + nbd.ko) against the virtnbd servers that the
# host started on its 127.0.0.1, reached from here as 10.0.2.2.
# Env from the host: PHASE (boot1|boot2), D (shared data dir), PORT_<check> for each server.
# Each check appends "PASS|FAIL <id> <detail>" to $D/results-$PHASE.
# shellcheck source=../../Scripts/vmtest/guest-lib.sh
. "$VMTEST_LIB"
set -u
H=10.0.2.2
R=$D/results-$PHASE
: > "$R"

# attach DEV PORT NAME [nbd-client options]; -t 60: a lost reply fails I/O instead of hanging.
attach() {
  local dev=$1 port=$2 name=$3; shift 3
  vm_step "$CHECK: nbd-client $H $port $dev -N '$name' $*"
  nbd-client "$H" "$port" "$dev" -N "$name" -t 60 "$@"
  [ "$(cat /sys/block/${dev#/dev/}/size)" != 0 ] || { echo "$dev has size 0 after nbd-client"; return 1; }
}
detach() { vm_step "$CHECK: nbd-client -d $1"; nbd-client -d "$1"; }
expect() {  # expect WHAT ACTUAL WANTED
  [ "$2" = "$3" ] || { echo "$1: got '$2', want '$3'"; return 1; }
}
fsck_clean() { vm_step "$CHECK: e2fsck -f -n $1"; e2fsck -f -n "$1"; }
# Random text for small files, cut with builtins: under TCG every process costs a few 100 ms.
POOL=$(head -c 49152 /dev/urandom | base64 -w0)   # 64 KiB of text (bash copies it per expansion)
export LC_ALL=C                                     # byte-indexed ${POOL:off:len}
# fill DIR NFILES MAXSIZE RANDMIB: a RANDMIB MiB random file plus NFILES small files in 8 subdirs
fill() {
  vm_step "$CHECK: write ${4} MiB + $2 small files"
  dd if=/dev/urandom of="$1/rand.bin" bs=1M count="$4" status=none
  mkdir -p "$1"/d{0..7}
  local i; for ((i = 0; i < $2; i++)); do
    printf '%s' "${POOL:RANDOM % 32768:RANDOM % $3 + 1}" > "$1/d$((i % 8))/f$i"
  done
}
sums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
verify() {  # verify DIR SUMFILE
  vm_step "$CHECK: verify $(wc -l < "$2") checksums"
  (cd "$1" && sha256sum --quiet -c "$2")
}

# run_check ID DESCRIPTION FUNCTION: run FUNCTION in a subshell with errexit; record the outcome.
FAILS=0
run_check() {
  CHECK=$1
  local t0 t1 _ rc=0; read -r t0 _ < /proc/uptime
  vm_step "$1: start ($2)"
  ( set -eEuo pipefail
    trap 'echo "VMTEST: check $CHECK: command failed (rc=$?): $BASH_COMMAND"' ERR
    "$3" ) || rc=$?
  read -r t1 _ < /proc/uptime
  local dt=$(( ${t1/./} - ${t0/./} )); dt=$((dt / 100)).$((dt / 10 % 10))
  if [ $rc = 0 ]; then
    echo "PASS $1 $2 (${dt}s in guest)" >> "$R"
  else
    echo "FAIL $1 $2: failed at step '$(cat "$VMTEST_RUN/step")' (rc=$rc)" >> "$R"
    FAILS=$((FAILS + 1))
    umount -l "/tmp/m$1" 2>/dev/null; nbd-client -d "/dev/nbd$1" >/dev/null 2>&1
  fi
  vm_log "$(tail -1 "$R")"
}

# 1: 64 MiB RAM export, -b 4096: ext4 with a few MiB + hundreds of files, fsck, reattach, verify.
check1() {
  local dev=/dev/nbd1 m=/tmp/m1; mkdir -p $m
  attach $dev "$PORT_1" big -b 4096
  expect "size" "$(blockdev --getsize64 $dev)" 67108864
  expect "logical block size" "$(blockdev --getss $dev)" 4096
  vm_step "1: mkfs.ext4"; mkfs.ext4 -q -F $dev
  mount -t ext4 $dev $m
  fill $m 400 16384 4
  sums $m > /tmp/sums1
  vm_step "1: sync + umount"; sync; umount $m
  fsck_clean $dev
  detach $dev
  attach $dev "$PORT_1" big -b 4096    # fresh device: everything below is read from the server
  fsck_clean $dev
  mount -t ext4 -o ro $dev $m
  verify $m /tmp/sums1
  umount $m
  detach $dev
}

# 2: the default 512 KiB disk (no --size, no -e: the default export ""): ext2, write, reread.
check2() {
  local dev=/dev/nbd2 m=/tmp/m2; mkdir -p $m
  attach $dev "$PORT_2" ""
  expect "size" "$(blockdev --getsize64 $dev)" 524288
  vm_step "2: mkfs.ext2 -N 16"; mkfs.ext2 -q -F -b 1024 -N 16 -m 0 $dev
  mount -t ext2 $dev $m
  head -c 300000 /dev/urandom > $m/data.bin
  echo "hello from the 512 KiB disk" > $m/hello.txt
  sums $m > /tmp/sums2
  umount $m
  detach $dev
  attach $dev "$PORT_2" ""
  fsck_clean $dev
  mount -t ext2 $dev $m
  verify $m /tmp/sums2
  umount $m
  detach $dev
}

# 3: unaligned I/O. With -b 512, O_DIRECT writes of odd sizes at odd sector offsets (crossing
# 4 KiB and 2 MiB boundaries, the last sector) plus one 3-byte buffered write; read the whole
# device back with -b 512 and -b 4096. The host compares its own read of the export afterwards.
U_CHUNKS="512:512 3584:1536 6656:2560 2096640:1024 8388096:512 12288:4096 1048575:3"
check3() {
  local dev=/dev/nbd3 c off len f
  attach $dev "$PORT_3" unalign -b 512
  expect "logical block size" "$(blockdev --getss $dev)" 512
  : > "$D/unalign.list"
  for c in $U_CHUNKS; do
    off=${c%:*} len=${c#*:} f=$D/unalign.$off
    printf '%s' "${POOL:off % 30000:len}" > "$f"
    if [ $((off % 512)) = 0 ] && [ $((len % 512)) = 0 ]; then
      vm_step "3: O_DIRECT write $len B at byte $off (-b 512)"
      dd if="$f" of=$dev bs="$len" count=1 seek="$off" oflag=direct,seek_bytes conv=notrunc status=none
    else
      vm_step "3: buffered write $len B at byte $off (-b 512)"
      dd if="$f" of=$dev bs="$len" count=1 seek="$off" oflag=seek_bytes conv=notrunc,fsync status=none
    fi
    echo "$off $len $f" >> "$D/unalign.list"
  done
  vm_step "3: O_DIRECT read of the device (-b 512)"
  dd if=$dev of=/tmp/u512 bs=1M iflag=direct status=none
  for c in $U_CHUNKS; do
    off=${c%:*} len=${c#*:}
    vm_step "3: compare $len B at byte $off (-b 512)"
    cmp -i "$off:0" -n "$len" /tmp/u512 "$D/unalign.$off"
  done
  detach $dev
  attach $dev "$PORT_3" unalign -b 4096
  expect "logical block size" "$(blockdev --getss $dev)" 4096
  vm_step "3: O_DIRECT read of the device (-b 4096), compare with the -b 512 read"
  dd if=$dev of=/tmp/u4096 bs=1M iflag=direct status=none
  cmp /tmp/u512 /tmp/u4096
  vm_step "3: O_DIRECT write+read of 8 KiB at byte 4194304 (-b 4096)"
  printf '%s' "${POOL:4242:8192}" > "$D/unalign.4194304"
  echo "4194304 8192 $D/unalign.4194304" >> "$D/unalign.list"
  dd if="$D/unalign.4194304" of=$dev bs=8192 count=1 seek=512 oflag=direct conv=notrunc status=none
  dd if=$dev bs=8192 count=1 skip=512 iflag=direct status=none | cmp - "$D/unalign.4194304"
  detach $dev
}

# 4: multi-conn: -C 4 must give 4 TCP connections; mkfs/write/fsck/verify over them.
check4() {
  local dev=/dev/nbd4 m=/tmp/m4 n; mkdir -p $m
  attach $dev "$PORT_4" multi -b 4096 -C 4
  n=$(ss -Htn state established "( dport = :$PORT_4 )" | wc -l)
  expect "established connections" "$n" 4
  vm_step "4: mkfs.ext4"; mkfs.ext4 -q -F $dev
  mount -t ext4 $dev $m
  fill $m 200 32768 8
  sums $m > /tmp/sums4
  vm_step "4: sync + umount"; sync; umount $m
  fsck_clean $dev
  detach $dev
  attach $dev "$PORT_4" multi -b 4096 -C 4
  fsck_clean $dev
  mount -t ext4 -o ro $dev $m
  verify $m /tmp/sums4
  umount $m
  detach $dev
}

# 5: TRIM: mkfs without discard, then online discard (-o discard) and fstrim. The host checks the
# server's virtio_discard counter after it exits.
check5() {
  local dev=/dev/nbd5 m=/tmp/m5; mkdir -p $m
  attach $dev "$PORT_5" trim -b 4096
  local dmax; dmax=$(cat /sys/block/nbd5/queue/discard_max_bytes)
  [ "$dmax" -gt 0 ] || { echo "discard_max_bytes=0: the export does not advertise SEND_TRIM"; return 1; }
  vm_step "5: mkfs.ext4 -E nodiscard"; mkfs.ext4 -q -F -E nodiscard $dev
  mount -t ext4 -o discard $dev $m
  vm_step "5: write 16 MiB, delete, sync (online discard)"
  dd if=/dev/urandom of=$m/big bs=1M count=16 status=none; sync
  rm $m/big; sync
  vm_step "5: fstrim"; fstrim -v $m
  umount $m
  fsck_clean $dev
  detach $dev
}

# 7: read-only export: the device is read-only, mount -o ro works, writes fail cleanly.
check7() {
  local dev=/dev/nbd7 m=/tmp/m7; mkdir -p $m
  attach $dev "$PORT_7" ro
  expect "blockdev --getro" "$(blockdev --getro $dev)" 1
  vm_step "7: mount -o ro + read"; mount -t ext4 -o ro $dev $m
  expect "content" "$(cat $m/hello.txt)" "read-only hello"
  (cd $m && sha256sum -c --quiet "$D/ro.sums")
  vm_step "7: dd to the read-only device must fail"
  if dd if=/dev/zero of=$dev bs=4096 count=1 oflag=direct status=none; then echo "write to $dev succeeded"; return 1; fi
  vm_step "7: remount rw must fail"
  if mount -o remount,rw $m 2>/dev/null; then echo "remount rw succeeded"; return 1; fi
  vm_step "7: read after the failed writes"
  (cd $m && sha256sum -c --quiet "$D/ro.sums")
  umount $m
  detach $dev
}

# 6a: --file export: ext4 with synced data, then writes in flight and the VM dies (no nbd-client -d).
check6a() {
  local dev=/dev/nbd6 m=/tmp/m6; mkdir -p $m
  attach $dev "$PORT_6" crash -b 4096
  vm_step "6: mkfs.ext4"; mkfs.ext4 -q -F $dev
  mount -t ext4 $dev $m
  fill $m 50 8192 2
  sums $m > "$D/crash.sums"
  vm_step "6: sync"; sync
}

# 6b (second boot): reattach, journal replay by mount, synced data intact, fsck clean.
check6b() {
  local dev=/dev/nbd6 m=/tmp/m6; mkdir -p $m
  attach $dev "$PORT_6" crash -b 4096
  vm_step "6: dumpe2fs (expect needs_recovery)"
  dumpe2fs -h $dev 2>/dev/null | grep -q needs_recovery || echo "VMTEST: note: no needs_recovery flag (journal was clean)"
  vm_step "6: mount (journal replay) + umount"
  mount -t ext4 $dev $m
  verify $m "$D/crash.sums"
  umount $m
  fsck_clean $dev
  detach $dev
}

case $PHASE in
boot1)
  run_check 1 "ext4 on a 64 MiB RAM export, -b 4096" check1
  run_check 2 "default 512 KiB disk, ext2" check2
  run_check 3 "unaligned I/O with -b 512 and -b 4096" check3
  run_check 4 "multi-conn -C 4" check4
  run_check 5 "TRIM (mount -o discard, fstrim)" check5
  run_check 7 "read-only export" check7
  run_check 6 "--file export: ext4, then the guest dies with writes in flight (part 1)" check6a
  if grep -q '^PASS 6 ' "$R"; then
    vm_step "6: background writes, then the VM dies without nbd-client -d"
    ( i=0; while :; do dd if=/dev/urandom of=/tmp/m6/inflight$i bs=64k count=16 status=none; i=$((i + 1)); done ) &
    sleep 2
    vm_crash $FAILS
  fi
  exit $FAILS ;;
boot2)
  run_check 6 "--file export after the guest died: reattach, journal replay, data + fsck clean" check6b
  exit $FAILS ;;
esac
echo "unknown PHASE=$PHASE"; exit 2
