#!/bin/bash
# kernel-client.sh - the Linux kernel NBD client (nbd-client + nbd.ko) against virtnbd.
#
#   VIRTNBD=/path/to/virtnbd Tests/vm/kernel-client.sh        (as root)
#
# The host kernel has no nbd driver, so the client runs in a QEMU guest (Scripts/vmtest/vmtest.sh:
# Debian's kernel, the host's root over 9p). The servers run here on 127.0.0.1; the guest reaches
# them as 10.0.2.2 through QEMU user networking. Two boots:
#   boot 1 - checks 1-5 and 7 against one virtnbd instance each, then check 6 part 1: ext4 on a
#            --file export, writes in flight, and the guest dies without disconnecting;
#   boot 2 - check 6 part 2: a new guest reattaches to the same (still running) server, replays the
#            journal, verifies the synced data and runs e2fsck.
# Host-side checks: check 3 compares its own read of the export, check 5 needs virtio_discard=N>0
# in the server's log after SIGTERM, check 7 needs the image unchanged, and every server must exit
# 0 on SIGTERM. Prints one line per check and exits non-zero if any failed.
# Env: VIRTNBD (required), VMTEST_DIR / VMTEST_ACCEL / VMTEST_VERBOSE (see vmtest.sh),
#      KC_PORT_BASE (first TCP port to try, default 20000 + pid % 20000).
set -euo pipefail
T0=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$HERE/../../Scripts/vmtest/vmtest.sh
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[kernel-client +$(elapsed "$T0")s] $*"; }
die() { log "ERROR: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "must run as root (QEMU, apt)"
[ -n "${VIRTNBD:-}" ] || die "set VIRTNBD to the virtnbd executable"
VIRTNBD=$(realpath "$VIRTNBD")
[ -x "$VIRTNBD" ] || die "VIRTNBD=$VIRTNBD is not executable"
"$VM" prepare
"$VM" need e2fsprogs libnbd-bin iproute2 util-linux   # mkfs.ext4 -d, nbdcopy/nbdinfo, ss, fstrim
W=$("$VM" workdir)
D=$W/data/kernel-client       # shared read-write with the guest at the same path
rm -rf "$D"; mkdir -p "$D"
cp "$VIRTNBD" "$D/virtnbd"    # a snapshot: a concurrent rebuild must not swap it mid-test

# ---- servers: one virtnbd per check, each on its own loopback port ----
declare -A PID PORT
CHECKS=(1 2 3 4 5 6 7)
port=${KC_PORT_BASE:-$((20000 + $$ % 20000))}
free_port() {
  while [ -n "$(ss -Htln "sport = :$port")" ]; do port=$((port + 1)); done
  echo $port; port=$((port + 1))
}
start_server() {  # start_server ID ARGS... ; waits for the URI on stdout
  local id=$1 p; shift
  p=$(free_port)
  "$D/virtnbd" -p "$p" --listen 127.0.0.1 "$@" > "$D/server$id.out" 2> "$D/server$id.log" &
  PID[$id]=$! PORT[$id]=$p
  for _ in $(seq 200); do
    grep -qs 'nbd://' "$D/server$id.out" && return 0
    kill -0 "${PID[$id]}" 2>/dev/null || break
    sleep 0.1
  done
  log "server $id ($*) did not print its URI; log:"; tail -20 "$D/server$id.log"
  die "server $id failed to start"
}
stop_servers() {
  local id; for id in "${!PID[@]}"; do kill "${PID[$id]}" 2>/dev/null || true; done
}
trap stop_servers EXIT

truncate -s 64M "$D/crash.img"
# read-only image, populated on the host (mkfs.ext4 -d needs no mount)
mkdir -p "$D/ro-src"; echo "read-only hello" > "$D/ro-src/hello.txt"
head -c 1M /dev/urandom > "$D/ro-src/rand.bin"
(cd "$D/ro-src" && sha256sum hello.txt rand.bin) > "$D/ro.sums"
truncate -s 16M "$D/ro.img"; mkfs.ext4 -q -F -d "$D/ro-src" "$D/ro.img"
RO_SUM=$(sha256sum < "$D/ro.img")

start_server 1 -e big --size 64M
start_server 2                         # all defaults: 512 KiB RAM disk, export name ""
start_server 3 -e unalign --size 8M
start_server 4 -e multi --size 64M
start_server 5 -e trim --size 64M
start_server 6 -e crash --file "$D/crash.img"
start_server 7 -e ro -r --file "$D/ro.img"
log "servers up: $(for id in "${CHECKS[@]}"; do printf '%s=:%s ' "$id" "${PORT[$id]}"; done)"

# ---- results: guest lines "PASS|FAIL <id> <text>", host checks may turn a PASS into a FAIL ----
declare -A ST TXT
BOOTERR=""
boot_rc() {  # boot_rc NAME RC RESULTS: the guest exits with its number of failed checks
  local want; want=$(grep -c '^FAIL' "$3" 2>/dev/null || true)
  [ "$2" = "${want:-0}" ] || BOOTERR+=" $1: rc=$2 (guest reported ${want:-0} failed checks)"
}
fail() { ST[$1]=FAIL; TXT[$1]="${TXT[$1]:+${TXT[$1]}: }$2"; log "check $1 FAILED: $2"; }
load_results() {  # load_results FILE
  local st id txt
  [ -f "$1" ] || return 0
  while read -r st id txt; do ST[$id]=$st TXT[$id]=$txt; done < "$1"
}
server_alive() {  # server_alive ID: process running and the export answers
  kill -0 "${PID[$1]}" 2>/dev/null && nbdinfo --size "nbd://127.0.0.1:${PORT[$1]}/$2" >/dev/null 2>&1
}
guest_env=(--env "D=$D")
for id in "${CHECKS[@]}"; do guest_env+=(--env "PORT_$id=${PORT[$id]}"); done

# ---- boot 1 ----
tb=$(date +%s.%N); rc1=0
"$VM" run --name kernel-client-boot1 --timeout 240 --mods nbd,ext4 "${guest_env[@]}" --env PHASE=boot1 \
  "$HERE/kernel-client.guest.sh" || rc1=$?
T_BOOT1=$(elapsed "$tb")
load_results "$D/results-boot1"; boot_rc boot1 $rc1 "$D/results-boot1"
for id in 1 2 3 4 5 6 7; do [ -n "${ST[$id]:-}" ] || fail $id "no result from boot 1 (rc=$rc1)"; done

# check 3, host side: the export must equal zeros + exactly the chunks the guest wrote
if [ "${ST[3]}" = PASS ]; then
  nbdcopy "nbd://127.0.0.1:${PORT[3]}/unalign" "$D/unalign.host.img"
  truncate -s 8M "$D/unalign.expect.img"
  while read -r off len f; do
    dd if="$f" of="$D/unalign.expect.img" bs="$len" count=1 seek="$off" oflag=seek_bytes conv=notrunc status=none
  done < "$D/unalign.list"
  cmp "$D/unalign.expect.img" "$D/unalign.host.img" || fail 3 "host-side read of the export differs from what the guest wrote"
fi
# check 6: the server must survive the guest's death
if [ "${ST[6]}" = PASS ]; then
  server_alive 6 crash || fail 6 "server died or stopped answering after the guest crashed"
fi

# ---- boot 2: reattach after the crash ----
T_BOOT2=-
if [ "${ST[6]}" = PASS ]; then
  tb=$(date +%s.%N); rc2=0
  "$VM" run --name kernel-client-boot2 --timeout 120 --mods nbd,ext4 "${guest_env[@]}" --env PHASE=boot2 \
    "$HERE/kernel-client.guest.sh" || rc2=$?
  T_BOOT2=$(elapsed "$tb")
  ST[6]=""; load_results "$D/results-boot2"; boot_rc boot2 $rc2 "$D/results-boot2"
  [ -n "${ST[6]}" ] || fail 6 "no result from boot 2 (rc=$rc2)"
fi

# ---- stop the servers: each must exit 0 on SIGTERM ----
declare -A SRC
for id in "${CHECKS[@]}"; do kill -TERM "${PID[$id]}" 2>/dev/null || true; done
for id in "${CHECKS[@]}"; do
  rc=0
  for _ in $(seq 300); do kill -0 "${PID[$id]}" 2>/dev/null || break; sleep 0.1; done
  kill -0 "${PID[$id]}" 2>/dev/null && { kill -KILL "${PID[$id]}"; SRC[$id]=hung; }
  wait "${PID[$id]}" || rc=$?
  SRC[$id]=${SRC[$id]:-$rc}
done
trap - EXIT
BAD=""
for id in "${CHECKS[@]}"; do [ "${SRC[$id]}" = 0 ] || BAD+=" server$id:${SRC[$id]}"; done

# check 5: the virtio device must have completed DISCARD requests
n=$(sed -n 's/.*virtio_discard=\([0-9]*\).*/\1/p' "$D/server5.log" | tail -1)
if [ -z "$n" ]; then fail 5 "no virtio_discard=N in the server log"
elif [ "$n" -le 0 ]; then fail 5 "virtio_discard=$n after discard + fstrim"
elif [ "${ST[5]}" = PASS ]; then TXT[5]+=", virtio_discard=$n"; fi
# check 6: after the server flushed on exit, the image file itself must be a clean ext4
if [ "${ST[6]}" = PASS ]; then
  e2fsck -f -n "$D/crash.img" >/dev/null 2>&1 || fail 6 "e2fsck of crash.img on the host after server exit is not clean"
fi
# check 7: the read-only image is untouched
[ "$(sha256sum < "$D/ro.img")" = "$RO_SUM" ] || fail 7 "ro.img changed"

# ---- summary ----
echo
echo "kernel-client summary (server: $VIRTNBD)"
nfail=0
for id in "${CHECKS[@]}"; do
  printf '  %s  %s %s\n' "${ST[$id]}" "$id" "${TXT[$id]}"
  [ "${ST[$id]}" = PASS ] || nfail=$((nfail + 1))
done
if [ -z "$BAD" ]; then echo "  PASS  servers: all 7 exited 0 on SIGTERM"
else echo "  FAIL  servers: exit status on SIGTERM:$BAD (logs: $D/server<N>.log)"; nfail=$((nfail + 1)); fi
[ -z "$BOOTERR" ] || { echo "  FAIL  VM:$BOOTERR"; nfail=$((nfail + 1)); }
for id in "${CHECKS[@]}"; do
  [ "${ST[$id]}" = PASS ] || { echo "--- server$id.log (last 15 lines)"; tail -15 "$D/server$id.log"; }
done
echo "VM boot 1: ${T_BOOT1}s, boot 2: ${T_BOOT2}s; total elapsed $(elapsed "$T0")s"
[ $nfail = 0 ] && { echo "kernel-client: OK"; exit 0; }
echo "kernel-client: $nfail FAILED (guest logs: $W/run/kernel-client-boot*/serial.log)"; exit 1
