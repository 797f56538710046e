#!/bin/bash
# vfio.sh - virtnbd serving a virtio-blk PCI device through VFIO (--device vfio:BDF).
#
#   VIRTNBD=/path/to/virtnbd Tests/vm/vfio.sh        (as root)
#
# The host kernel has no VFIO, so virtnbd runs in a QEMU guest (Scripts/vmtest/vmtest.sh: Debian's
# kernel, the host's root over 9p) that has an emulated Intel IOMMU and a file-backed
# virtio-blk-pci (modern only, iommu_platform=on, num-queues=2) at 0000:00:05.0. The guest binds the device to
# vfio-pci and runs virtnbd on it; QEMU forwards 127.0.0.1:PORT on the host to the guest's 10809.
# The host then checks, as NBD client:
#   host-error  - on the host (no VFIO) `virtnbd --device vfio:...` exits non-zero with a clear error
#   guest-unbound - in the guest, before binding, it exits non-zero and says how to bind to vfio-pci
#   queues      - with num-queues=2 and --queues 2, both queues are live, each on its own MSI-X vector
#   size        - nbdinfo reports the image size
#   read        - the device's existing contents read back over NBD equal the image
#   copy        - nbdcopy of 16 MiB random data in and out again, byte-identical
#   unaligned   - qemu-io pattern writes + verifying reads at unaligned offsets/lengths
#   final-read  - the whole export equals what was written, as the server sees it
#   shutdown    - virtnbd exits 0 on SIGTERM in the guest (final flush, device reset)
#   image       - after the VM is gone, QEMU's image file holds exactly what was written
# Prints one PASS/FAIL line per check and the serial tail on failure; exits non-zero if any failed.
# Env: VIRTNBD (required), VMTEST_DIR / VMTEST_ACCEL / VMTEST_VERBOSE (see vmtest.sh),
#      VFIO_PORT (host port to forward, default: first free from 30000 + pid % 20000).
set -euo pipefail
BDF=0000:00:05.0

# ---------------------------------------------------------------- guest side
if [ "${VFIO_GUEST:-0}" = 1 ]; then
  # shellcheck source=/dev/null
  . "$VMTEST_LIB"
  fail() { vm_log "FAIL: $*"; echo "$*" > "$D/failed"; exit 1; }
  S=/sys/bus/pci/devices/$BDF
  [ -e "$S" ] || fail "no PCI device $BDF in the guest"
  [ -e "$S/iommu_group" ] || fail "$BDF has no iommu_group (is intel_iommu=on in effect?)"
  cp "$VIRTNBD" /tmp/virtnbd    # one read over 9p; the guest's /tmp is tmpfs

  vm_step "virtnbd on a device not bound to vfio-pci"
  rc=0; /tmp/virtnbd --device "vfio:$BDF" -p 10809 > /dev/null 2> "$D/unbound.log" || rc=$?
  if [ $rc != 0 ] && grep -q 'not vfio-pci; bind it with' "$D/unbound.log"; then
    echo "PASS guest-unbound rc=$rc, '$(grep -o 'VFIO: [^;]*' "$D/unbound.log" | head -1)'" >> "$D/guest-results"
  else
    echo "FAIL guest-unbound rc=$rc; stderr: $(tail -2 "$D/unbound.log" | tr '\n' ' ')" >> "$D/guest-results"
  fi

  vm_step "bind $BDF to vfio-pci"
  if [ -e "$S/driver" ]; then echo "$BDF" > "$S/driver/unbind"; fi
  echo vfio-pci > "$S/driver_override"
  echo "$BDF" > /sys/bus/pci/drivers_probe
  drv=$(readlink "$S/driver" 2>/dev/null || true)
  [ "${drv##*/}" = vfio-pci ] || fail "$BDF is bound to '${drv##*/}', not vfio-pci"
  grp=$(readlink "$S/iommu_group"); grp=${grp##*/}
  [ -c "/dev/vfio/$grp" ] || fail "/dev/vfio/$grp missing"
  vm_log "$BDF bound to vfio-pci, IOMMU group $grp"

  vm_step "start virtnbd --device vfio:$BDF"
  /tmp/virtnbd --device "vfio:$BDF" --queues 2 -v --listen 0.0.0.0 -p 10809 > "$D/server.out" 2> "$D/server.log" &
  spid=$!
  for _ in $(seq 600); do
    grep -qs 'nbd://' "$D/server.out" && break
    kill -0 $spid 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -qs 'nbd://' "$D/server.out"; then
    cat "$D/server.log"; fail "virtnbd did not start (see server.log)"
  fi
  vm_log "virtnbd up: $(cat "$D/server.out")"
  # Two queues, each on its own MSI-X vector (so each event loop reaps its own queue).
  if grep -q 'queues=2 .*virtio-blk ready' "$D/server.log" && grep -q 'queue 1 size .* MSI-X vector 1' "$D/server.log" \
     && grep -q 'queue 0 size .* MSI-X vector 0' "$D/server.log"; then
    echo "PASS queues --queues 2 on num-queues=2: 2 queues live, MSI-X vectors 0 and 1" >> "$D/guest-results"
  else
    echo "FAIL queues $(grep -E 'virtio-blk ready|VFIO: queue' "$D/server.log" | tr '\n' ' ')" >> "$D/guest-results"
  fi
  touch "$D/ready"

  vm_step "serve until the host is done"
  for _ in $(seq 1500); do
    [ -e "$D/done" ] && break
    kill -0 $spid 2>/dev/null || break
    sleep 0.1
  done
  [ -e "$D/done" ] || { cat "$D/server.log"; fail "virtnbd died or the host never finished"; }

  vm_step "stop virtnbd (SIGTERM)"
  kill -TERM $spid
  rc=0; wait $spid || rc=$?
  echo $rc > "$D/server.rc"
  tail -5 "$D/server.log"
  [ $rc = 0 ] || fail "virtnbd exited $rc on SIGTERM"
  sync
  exit 0
fi

# ---------------------------------------------------------------- host side
T0=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM=$HERE/../../Scripts/vmtest/vmtest.sh
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[vfio +$(elapsed "$T0")s] $*"; }
die() { log "ERROR: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "must run as root (QEMU, apt)"
[ -n "${VIRTNBD:-}" ] || die "set VIRTNBD to the virtnbd executable"
VIRTNBD=$(realpath "$VIRTNBD")
[ -x "$VIRTNBD" ] || die "VIRTNBD=$VIRTNBD is not executable"
"$VM" prepare
"$VM" need libnbd-bin qemu-utils iproute2
W=$("$VM" workdir)
D=$W/data/vfio               # shared read-write with the guest at the same path
rm -rf "$D"; mkdir -p "$D"
cp "$VIRTNBD" "$D/virtnbd"   # a snapshot: a concurrent rebuild must not swap it mid-test

declare -a ORDER=()
declare -A ST TXT
result() {  # result NAME PASS|FAIL TEXT
  ORDER+=("$1"); ST[$1]=$2; TXT[$1]=$3
  log "$2 $1: $3"
}
ck() {  # ck NAME TEXT CMD...: PASS if CMD succeeds
  local n=$1 t=$2 ts; shift 2; ts=$(date +%s.%N)
  if "$@" > "$D/$n.out" 2>&1; then result "$n" PASS "$t ($(elapsed "$ts")s)"
  else result "$n" FAIL "$t: $(tail -3 "$D/$n.out" | tr '\n' ' ')"; fi
}

# ---- host-error: no VFIO on this host → a clear error and a non-zero exit ----
ts=$(date +%s.%N); hrc=0
timeout 30 "$D/virtnbd" --device "vfio:$BDF" -p 1 --listen 127.0.0.1 > "$D/host-error.out" 2> "$D/host-error.log" || hrc=$?
if [ -e /dev/vfio/vfio ]; then
  result host-error PASS "skipped: this host has /dev/vfio/vfio (rc=$hrc)"
elif [ $hrc != 0 ] && [ $hrc != 124 ] && grep -q 'VFIO: cannot open /dev/vfio/vfio' "$D/host-error.log"; then
  result host-error PASS "rc=$hrc, '$(grep -o 'VFIO: cannot open /dev/vfio/vfio[^:]*:' "$D/host-error.log" | head -1)...' ($(elapsed "$ts")s)"
else
  result host-error FAIL "rc=$hrc; stderr: $(tail -3 "$D/host-error.log" | tr '\n' ' ')"
fi

# ---- the disk: 24 MiB of random data the device starts with ----
SIZE=$((24 << 20))
IMG=$D/disk.img
head -c $SIZE /dev/urandom > "$IMG"
cp "$IMG" "$D/expect.img"    # what the image must hold at the end
head -c $((16 << 20)) /dev/urandom > "$D/rand16.bin"

port=${VFIO_PORT:-$((30000 + $$ % 20000))}
while [ -n "$(ss -Htln "sport = :$port")" ]; do port=$((port + 1)); done
URI=nbd://127.0.0.1:$port

# ---- boot: the guest binds the device and serves it ----
tb=$(date +%s.%N)
"$VM" run --name vfio --timeout 170 --append "intel_iommu=on iommu=pt" \
  --mods vfio,vfio_iommu_type1,vfio-pci,virtio_blk \
  --net-opts "hostfwd=tcp:127.0.0.1:$port-:10809" \
  --env VFIO_GUEST=1 --env "D=$D" --env "VIRTNBD=$D/virtnbd" \
  "$0" -- \
  -device intel-iommu \
  -drive "file=$IMG,if=none,id=vb,format=raw" \
  -device virtio-blk-pci,drive=vb,addr=05.0,disable-legacy=on,iommu_platform=on,num-queues=2 \
  > "$D/vm.log" 2>&1 &
vpid=$!
trap 'kill $vpid 2>/dev/null || true' EXIT
for _ in $(seq 1500); do
  [ -e "$D/ready" ] || [ -e "$D/failed" ] && break
  kill -0 $vpid 2>/dev/null || break
  sleep 0.1
done
T_READY=$(elapsed "$tb")

while read -r st n txt; do result "$n" "$st" "$txt"; done < <(cat "$D/guest-results" 2>/dev/null)
if [ -e "$D/ready" ]; then
  log "guest serving $URI after ${T_READY}s"
  # size
  got=$(nbdinfo --size "$URI" 2>"$D/size.out" || true)
  if [ "$got" = $SIZE ]; then result size PASS "nbdinfo --size = $got"; else result size FAIL "nbdinfo --size = '$got', want $SIZE"; fi
  # read: the device's own contents
  ck read "24 MiB read back equals the image" sh -c "nbdcopy '$URI' '$D/initial.read' && cmp '$IMG' '$D/initial.read'"
  # copy: 16 MiB random in at offset 0, out again
  dd if="$D/rand16.bin" of="$D/expect.img" conv=notrunc status=none
  ck copy "nbdcopy 16 MiB in and out, identical" sh -c "nbdcopy '$D/rand16.bin' '$URI' && nbdcopy '$URI' '$D/copy.read' && cmp -n $((16 << 20)) '$D/rand16.bin' '$D/copy.read'"
  # unaligned: qemu-io pattern writes, each verified, applied to the expected image too
  cmds=()
  # offset length pattern: straddling 4 KiB pages, sectors, the 16 MiB boundary, the last byte
  for spec in "1 1 0x11" "511 2 0x22" "4095 4098 0x33" "12345 100000 0x44" "$(( (16 << 20) - 777 )) 5555 0x55" \
              "$(( (20 << 20) + 3 )) $(( (1 << 20) + 13 )) 0x66" "$((SIZE - 1)) 1 0x77" "$((SIZE - 70001)) 70000 0x88"; do
    read -r off len pat <<< "$spec"
    cmds+=(-c "write -P $pat $off $len" -c "read -P $pat $off $len")
    head -c "$len" /dev/zero | tr '\0' "\\$(printf %03o "$pat")" |
      dd of="$D/expect.img" bs="$len" count=1 seek="$off" oflag=seek_bytes iflag=fullblock conv=notrunc status=none
  done
  # qemu-io may exit 0 after a failed command: its output must show no failure either
  # shellcheck disable=SC2016  # $@ / $out belong to the inner sh
  ck unaligned "8 qemu-io pattern writes + reads at unaligned offsets" \
    sh -c 'out=$(qemu-io -f raw "$@" 2>&1); rc=$?; echo "$out"; [ $rc = 0 ] && ! echo "$out" | grep -qi "fail"' qio "$URI" "${cmds[@]}"
  # final-read: the whole export as the server sees it
  ck final-read "whole export equals what was written" sh -c "nbdcopy '$URI' '$D/final.read' && cmp '$D/expect.img' '$D/final.read'"
else
  why=$(cat "$D/failed" 2>/dev/null || echo "the VM exited before the guest was ready")
  result guest FAIL "guest never served: $why"
fi

# ---- done: the guest stops virtnbd and powers off ----
touch "$D/done"
vrc=0; wait $vpid || vrc=$?
trap - EXIT
T_VM=$(elapsed "$tb")
if [ -e "$D/ready" ]; then
  src=$(cat "$D/server.rc" 2>/dev/null || echo none)
  if [ "$src" = 0 ] && [ $vrc = 0 ]; then result shutdown PASS "virtnbd exited 0 on SIGTERM; VM rc 0"
  else result shutdown FAIL "virtnbd rc=$src, VM rc=$vrc"; fi
  # image: QEMU's file after the VM is gone
  if cmp "$D/expect.img" "$IMG" > "$D/image.out" 2>&1; then result image PASS "disk.img equals every write, at its offset"
  else result image FAIL "$(head -1 "$D/image.out")"; fi
fi

# ---- summary ----
echo
echo "vfio summary (server: $VIRTNBD)"
nfail=0
for n in "${ORDER[@]}"; do
  printf '  %s  %-10s %s\n' "${ST[$n]}" "$n" "${TXT[$n]}"
  [ "${ST[$n]}" = PASS ] || nfail=$((nfail + 1))
done
if [ $nfail != 0 ] || [ $vrc != 0 ]; then
  echo "--- vmtest output"; cat "$D/vm.log"
  [ -s "$D/server.log" ] && { echo "--- guest virtnbd log (last 20 lines)"; tail -20 "$D/server.log"; }
  # vmtest.sh already printed the serial tail if the guest script failed
  if [ $vrc = 0 ] && [ -f "$W/run/vfio/serial.log" ]; then
    echo "--- serial tail"; tail -30 "$W/run/vfio/serial.log" | sed 's/\r$//'
  fi
fi
echo "VM ready after ${T_READY}s, VM total ${T_VM}s; total elapsed $(elapsed "$T0")s"
[ $nfail = 0 ] && [ $vrc = 0 ] && { echo "vfio: OK"; exit 0; }
echo "vfio: FAILED (guest log: $W/run/vfio/serial.log)"; exit 1
