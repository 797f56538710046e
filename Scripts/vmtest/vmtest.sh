#!/bin/bash
# vmtest.sh - run a shell script inside a throw-away QEMU guest that boots Debian's own kernel and
# uses the HOST's root filesystem, shared read-only over virtio-9p, as its userspace (virtme-style).
# Every host binary (nbd-client, mkfs.ext4, a Swift build, ...) runs unchanged in the guest. This is
# how kernel-side pieces the host kernel lacks (nbd.ko, vfio, virtio_blk) get tested.
#
#   vmtest.sh prepare     install packages, fetch + unpack the kernel, build the initramfs (cached)
#   vmtest.sh workdir     print the work dir
#   vmtest.sh need PKG... apt-get install the packages that are missing (for host-side tools)
#   vmtest.sh run [options] GUEST_SCRIPT [-- EXTRA_QEMU_ARGS...]
#       --name NAME       run dir is $VMTEST_DIR/run/NAME (default: the script's basename)
#       --timeout SEC     kill the VM after SEC seconds (default 300)
#       --append ARGS     extra kernel command line, e.g. "intel_iommu=on iommu=pt"
#       --mods A,B,C      modules to modprobe before the script (e.g. nbd,ext4 or vfio-pci,virtio_blk)
#       --net-opts OPTS   appended to "-netdev user,id=n0", e.g. hostfwd=tcp:127.0.0.1:PORT-:10809
#       --env K=V         variable exported to the guest script (repeatable)
#       --copy FILE       copy FILE into the run dir (repeatable); the guest finds it at
#                         $VMTEST_RUN/<basename>. Use it for binaries: host files under /tmp are
#                         invisible in the guest (tmpfs), and CI may clone the repo under /tmp.
#     EXTRA_QEMU_ARGS go before the harness's own PCI devices, so `-device intel-iommu` may be first.
#     Exit status: the guest script's, 124 on timeout, 99 if the guest gave no result.
#
# Guest side: the script runs as root in a chroot of the host's /, with tmpfs on /tmp and /run.
# Available: $VMTEST_RUN (this run's dir, read-write), $VMTEST_DIR, $VMTEST_LIB (guest-lib.sh:
# vm_step, vm_log, vm_crash). The network is QEMU user mode: the host's 127.0.0.1 is 10.0.2.2.
#
# Environment: VMTEST_DIR   work dir, cached kernel + initramfs + runs; shared read-write with the
#                           guest at the same path (default /var/tmp/virtnbd-vmtest)
#              VMTEST_ACCEL auto|tcg|kvm (auto = KVM only if /dev/kvm is usable and not KVM-PVM,
#                           under which normal guests hang)
#              VMTEST_SMP, VMTEST_MEM  vCPUs (2) and MiB (1024)
#              VMTEST_VERBOSE=1        stream the whole serial console (default: VMTEST lines only)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=${VMTEST_DIR:-/var/tmp/virtnbd-vmtest}
T0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[vmtest +$(elapsed "$T0")s] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# Modules unpacked from the kernel .deb (paths under lib/modules/$K/kernel/). The initramfs only
# carries the 9p root's dependency closure; the rest is loaded on demand from the 9p work share.
MODULE_GLOBS=(
  'drivers/virtio/*' 'net/9p/*' 'fs/9p/*' 'fs/netfs/*' 'fs/fscache/*'          # 9p root
  drivers/net/virtio_net.ko drivers/net/net_failover.ko net/core/failover.ko   # network
  drivers/block/nbd.ko 'fs/ext4/*' 'fs/jbd2/*' fs/mbcache.ko lib/crc16.ko      # nbd + ext2/3/4
  crypto/crc32c_generic.ko 'lib/libcrc32c*'
  'fs/fat/*' 'fs/nls/*'                                                        # vfat
  'drivers/vfio/*' virt/lib/irqbypass.ko drivers/block/virtio_blk.ko           # VFIO
)
INITRD_MODULES="virtio_pci 9pnet_virtio 9p"

kernel_version() {  # the version the linux-image-amd64 metapackage points at, e.g. 6.1.0-56-amd64
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { sub("linux-image-", "", $2); print $2; exit }'
}

apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return
  log "apt-get install ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
}

# Uncompressed ELF vmlinux from the bzImage's xz payload (what scripts/extract-vmlinux does).
# QEMU boots it directly (PVH), skipping in-guest decompression: about half the TCG boot time.
extract_vmlinux() {  # $1 = vmlinuz, $2 = output
  local off
  for off in $(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$1" | cut -d: -f1); do
    tail -c +$((off + 1)) "$1" | xz -dcq 2>/dev/null > "$2.part" || true
    if [ "$(head -c 4 "$2.part" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then mv "$2.part" "$2"; return 0; fi
  done
  rm -f "$2.part"; return 1
}

prepare() {
  local t; t=$(date +%s.%N)
  mkdir -p "$W"
  apt_install qemu-system-x86 busybox-static nbd-client xz-utils
  local K; K=$(kernel_version)
  if [ -z "$K" ]; then apt-get -o DPkg::Lock::Timeout=600 update -qq; K=$(kernel_version); fi
  [ -n "$K" ] || die "apt knows no linux-image-amd64"
  local KD=$W/kernel M=lib/modules/$K
  if [ ! -f "$KD/.done-$K" ]; then
    local deb; deb=$(ls "$W"/debs/linux-image-"${K}"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      log "downloading linux-image-$K"
      mkdir -p "$W/debs"
      (cd "$W/debs" && apt-get download "linux-image-$K" 2>&1 | grep -v 'unsandboxed' >&2 || true)
      deb=$(ls "$W"/debs/linux-image-"${K}"_*.deb 2>/dev/null | head -1 || true)
      [ -n "$deb" ] || die "apt-get download linux-image-$K failed"
    fi
    log "unpacking $(basename "$deb")"
    rm -rf "$KD"; mkdir -p "$KD"
    local pats=("./boot/vmlinuz-$K" "./$M/modules.order" "./$M/modules.builtin") g
    for g in "${MODULE_GLOBS[@]}"; do pats+=("./$M/kernel/$g"); done
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$KD" --wildcards "${pats[@]}"
    busybox depmod -b "$KD" "$K"
    extract_vmlinux "$KD/boot/vmlinuz-$K" "$KD/vmlinux" || log "no xz payload found; booting the bzImage"
    touch "$KD/.done-$K"
  fi
  # initramfs: busybox + init + the 9p root modules, rebuilt when init changes
  local stamp; stamp=$(cat "$HERE/init" /bin/busybox "$KD/$M/modules.dep" | sha256sum | cut -c1-16)
  if [ ! -f "$W/initrd.cpio" ] || [ "$(cat "$W/initrd.stamp" 2>/dev/null)" != "$K-$stamp" ]; then
    local S=$W/initrd-src n=0 seen=" "
    rm -rf "$S"; mkdir -p "$S"/{bin,sbin,mods,proc,sys,dev,host,tmp,lib/modules}
    cp /bin/busybox "$S/bin/busybox"; ln -s busybox "$S/bin/sh"
    ln -s ../bin/busybox "$S/sbin/modprobe"   # the kernel's request_module() helper
    add() {  # $1 = module path relative to lib/modules/$K; copies deps first
      case $seen in *" $1 "*) return;; esac
      local d; for d in $(grep "^$1:" "$KD/$M/modules.dep" | cut -d: -f2); do add "$d"; done
      seen="$seen$1 "; n=$((n + 1)); cp "$KD/$M/$1" "$S/mods/$(printf %02d $n)-$(basename "$1")"
    }
    local m; for m in $INITRD_MODULES; do add "$(grep -E "/$m\.ko:" "$KD/$M/modules.dep" | cut -d: -f1)"; done
    install -m 755 "$HERE/init" "$S/init"
    (cd "$S" && find . | busybox cpio -o -H newc 2>/dev/null) > "$W/initrd.cpio"
    echo "$K-$stamp" > "$W/initrd.stamp"
  fi
  echo "$K" > "$W/kernel.version"
  log "prepared kernel $K in $W ($(elapsed "$t")s)"
}

run() {
  local name="" timeout=300 append="" mods="" netopts="" envs=() copies=() script
  while [ $# -gt 0 ]; do case $1 in
    --name) name=$2; shift 2;;        --timeout) timeout=$2; shift 2;;
    --append) append=$2; shift 2;;    --mods) mods=$2; shift 2;;
    --net-opts) netopts=,$2; shift 2;; --env) envs+=("$2"); shift 2;;
    --copy) copies+=("$2"); shift 2;;
    -*) die "run: unknown option $1";;
    *) break;;
  esac; done
  script=${1:?run: GUEST_SCRIPT missing}; shift
  [ "${1:-}" = -- ] && shift
  [ -f "$W/initrd.cpio" ] && [ -f "$W/kernel.version" ] || prepare
  local K; K=$(cat "$W/kernel.version")
  local kernel=$W/kernel/vmlinux; [ -f "$kernel" ] || kernel=$W/kernel/boot/vmlinuz-$K

  name=${name:-$(basename "$script" .sh)}
  local RUN=$W/run/$name
  rm -rf "$RUN"; mkdir -p "$RUN"
  install -m 755 "$script" "$RUN/guest.sh"
  cp "$HERE/guest-lib.sh" "$RUN/guest-lib.sh"
  local f e
  for f in "${copies[@]}"; do cp -p "$f" "$RUN/"; done
  { echo "VMTEST_LIB=$RUN/guest-lib.sh"
    for e in "${envs[@]}"; do printf '%s=%q\n' "${e%%=*}" "${e#*=}"; done; } > "$RUN/env"

  local accel=${VMTEST_ACCEL:-auto} machine
  if [ "$accel" = auto ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then accel=kvm; else accel=tcg; fi
  fi
  # shellcheck disable=SC2054  # the commas are inside QEMU option values
  case $accel in
    kvm) machine=(-machine q35,kernel-irqchip=split -accel kvm -cpu host);;  # split: intel-iommu
    tcg) machine=(-machine q35 -accel tcg,thread=multi -cpu max);;
    *) die "VMTEST_ACCEL=$accel";;
  esac
  # shellcheck disable=SC2054
  local cmd=(qemu-system-x86_64 "${machine[@]}" -smp "${VMTEST_SMP:-2}" -m "${VMTEST_MEM:-1024}"
    -nodefaults -no-user-config -display none -no-reboot
    -serial "file:$RUN/serial.log"
    -kernel "$kernel" -initrd "$W/initrd.cpio"
    -append "console=ttyS0 panic=-1 quiet vmtest.work=$W vmtest.run=$RUN vmtest.mods=virtio_net${mods:+,$mods} $append"
    "$@"
    -netdev "user,id=n0$netopts" -device virtio-net-pci,netdev=n0
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=$W,mount_tag=work,security_model=none,multidevs=remap")
  echo "${cmd[*]}" > "$RUN/qemu.cmd"

  log "boot $name ($accel, timeout ${timeout}s)"
  local tb; tb=$(date +%s.%N)
  : > "$RUN/serial.log"
  local qrc=0
  timeout -k 5 "$timeout" "${cmd[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
  local qpid=$!
  # live progress: the guest's VMTEST lines (or everything with VMTEST_VERBOSE=1)
  if [ "${VMTEST_VERBOSE:-0}" = 1 ]; then
    tail -s 0.2 -n +1 -f --pid=$qpid "$RUN/serial.log" | sed -u 's/\r$//; s/^/  | /' >&2 &
  else
    tail -s 0.2 -n +1 -f --pid=$qpid "$RUN/serial.log" | sed -nu 's/\r$//; /^VMTEST/s/^/  | /p' >&2 &
  fi
  local tpid=$!
  wait $qpid || qrc=$?
  wait $tpid 2>/dev/null || true

  local rc reason=""
  rc=$(sed -n 's/.*VMTEST-RC=\([0-9]*\).*/\1/p' "$RUN/serial.log" | tail -1)
  if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then rc=124; reason="timed out after ${timeout}s"
  elif [ -z "$rc" ]; then rc=99; reason="no VMTEST-RC marker (qemu rc=$qrc)"
  elif [ "$(cat "$RUN/rc" 2>/dev/null)" != "$rc" ]; then reason="marker says $rc but $RUN/rc does not"; rc=99
  elif [ "$rc" != 0 ]; then reason="guest script failed"
  fi
  log "$name: rc=$rc after $(elapsed "$tb")s${reason:+ ($reason)}"
  if [ "$rc" != 0 ]; then
    log "$name FAILED at step: $(cat "$RUN/step" 2>/dev/null || echo '(none: before the guest script)')"
    [ -s "$RUN/qemu.log" ] && { log "qemu output:"; sed 's/^/  qemu| /' "$RUN/qemu.log" >&2; }
    log "last ${VMTEST_TAIL:-40} lines of $RUN/serial.log:"
    tail -n "${VMTEST_TAIL:-40}" "$RUN/serial.log" | sed 's/\r$//; s/^/  serial| /' >&2
  fi
  return "$rc"
}

case ${1:-} in
  prepare) prepare;;
  workdir) echo "$W";;
  need) shift; apt_install "$@";;
  run) shift; run "$@";;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2;;
esac
