#!/usr/bin/env bash
# 01-rbd-serve: --device rbd:POOL/IMAGE@CONF serves an RBD image through the qemu-storage-daemon
# virtnbd starts: nbdcopy in and out is byte-exact, qemu-img compare finds the export equal to
# `rbd export`'s copy, fio's crc32c verify passes; the daemon runs in a private 0700 directory,
# gets writable=off under -r (where a write fails), and is gone with the directory when virtnbd
# stops. The config file's device: rbd works; a missing daemon, a missing image and a malformed
# spec each give one error line. Random data prints its seed (replay: RBD_SEED=N).
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy fio qemu-img
SEED=${RBD_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed=$SEED (replay: RBD_SEED=$SEED)"

img=$(new_image serve 64M)
spec="rbd:$img@$CEPH_CONF"

# 1. Serve it; the daemon and its directory.
start_server --device "$spec"
qsd=$(qsd_of "$SERVER_PID")
check_match "virtnbd started a qemu-storage-daemon for the image" "driver=rbd,.*pool=rbd,image=${img#rbd/},.*conf=$CEPH_CONF" \
    "$(tr '\0' ' ' <"/proc/$qsd/cmdline" 2>&1)"
sockdir=$(tr '\0' '\n' <"/proc/$qsd/cmdline" | sed -nE 's/.*addr\.path=([^,]*)\/vhost\.sock.*/\1/p')
check_eq "the vhost-user socket is in a private directory (mode 700)" 700 "$(stat -c %a "$sockdir" 2>&1)"
check_eq "nbdinfo: the export has the image's size" 67108864 "$(nbdinfo --size "$URI" 2>&1)"

seeded_file "$T/in.raw" 67108864 "$SEED"
expect_ok "nbdcopy 64 MiB of seeded data into the export" nbdcopy "$T/in.raw" "$URI"
expect_ok "nbdcopy the export back out" nbdcopy "$URI" "$T/out.raw"
expect_ok "what came out is byte for byte what went in (cmp)" cmp "$T/in.raw" "$T/out.raw"
expect_ok "rbd export of the image (another librbd client)" rbd export --no-progress "$img" "$T/rbd.raw"
expect_ok "qemu-img compare: the NBD export equals rbd export's copy" \
    qemu-img compare -f raw -F raw "$URI" "$T/rbd.raw"
expect_ok "fio randwrite, bs 4k-64k, verify crc32c over the export" \
    fio --name=rbd --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-64k --size=32M --iodepth=8 \
    --verify=crc32c --do_verify=1 --verify_state_save=0 --randseed="$SEED"
stop_server
check_eq "the daemon is gone after virtnbd stops" "" "$(ps -o pid= -p "$qsd" 2>/dev/null | tr -d ' ')"
check_eq "its private directory is removed" "absent" "$([[ -e $sockdir ]] && echo present || echo absent)"
expect_ok "the fio data verifies from rbd export's copy (fio --verify_only on the file)" \
    bash -c "rbd export --no-progress '$img' '$T/after.raw' &&
        fio --name=rbd --ioengine=psync --filename='$T/after.raw' --rw=randwrite --bsrange=4k-64k --size=32M \
        --verify=crc32c --verify_only --verify_state_save=0 --randseed='$SEED'"

# 2. Read-only: writable=off, and writes fail.
start_server -r --device "$spec"
qsd=$(qsd_of "$SERVER_PID")
check_match "-r: the daemon exports writable=off" "writable=off" "$(tr '\0' ' ' <"/proc/$qsd/cmdline" 2>&1)"
expect_fail "-r: a write is refused" "Operation not permitted|EPERM|read-only|Read-only" \
    nbdsh -u "$URI" -c 'h.pwrite(b"x" * 512, 0)'
check_eq "-r: the last 1 MiB reads the same as rbd export's copy" \
    "$(tail -c 1M "$T/after.raw" | sha256sum | cut -d' ' -f1)" \
    "$(nbdsh -u "$URI" -c 'import sys; sys.stdout.buffer.write(h.pread(1 << 20, 63 << 20))' | sha256sum | cut -d' ' -f1)"
stop_server

# 3. The config file.
cat >"$T/virtnbd.yaml" <<YAML
listen: [$T/cfg.sock]
exports:
  - name: ceph
    device: rbd
    pool: ${img%%/*}
    image: ${img#*/}
    conf: $CEPH_CONF
YAML
start_plain --config "$T/virtnbd.yaml"
check_eq "config file: device: rbd serves the image" 67108864 \
    "$(nbdinfo --size "nbd+unix:///ceph?socket=$T/cfg.sock" 2>&1)"
stop_server

# 4. Errors: one line each, and no daemon or directory left behind.
before=$(ls -d "${TMPDIR:-/tmp}"/virtnbd-rbd.* 2>/dev/null | wc -l)
expect_fail "no qemu-storage-daemon in PATH: says what to install" \
    '^virtnbd: .*qemu-storage-daemon is not in PATH; install it' \
    env PATH=/nonexistent "$VIRTNBD" --device "$spec" --unix "$T/x.sock"
expect_fail "a missing image: the daemon's error and what to check" \
    'exited \(exit status 1\) before exporting it: .*No such file or directory; check the pool' \
    "$VIRTNBD" --device "rbd:rbd/no-such-image-$$@$CEPH_CONF" --unix "$T/x.sock"
check_eq "the failures printed one line each" "1 1" \
    "$(wc -l <"$T/cmd.$((_CMD_SEQ - 1)).log") $(wc -l <"$LAST_OUT")"
expect_fail "a malformed spec is refused" 'must be .*rbd:POOL/IMAGE' "$VIRTNBD" --device rbd:justapool
check_eq "no private directory left by the failed starts" "$before" \
    "$(ls -d "${TMPDIR:-/tmp}"/virtnbd-rbd.* 2>/dev/null | wc -l)"
finish
