# shellcheck shell=bash
# guest-lib.sh - helpers for guest scripts run by `vmtest.sh run` (source "$VMTEST_LIB").
# The guest script runs as root, chrooted into the host's root (read-only 9p) with tmpfs on /tmp;
# $VMTEST_DIR (the host's work dir, same path) is read-write and $VMTEST_RUN is this run's dir.
# Everything written to stdout/stderr goes to the serial console, which the host logs.

# Under TCG every fork+exec costs a few hundred ms: the helpers use shell builtins only.
vm_up() { local u _; read -r u _ < /proc/uptime; echo "$u"; }

# vm_step NAME: announce the step about to run. On failure the host reports the last step.
vm_step() {
  local u _; read -r u _ < /proc/uptime
  echo "VMTEST-STEP: $* (t=${u}s)"
  echo "$*" > "$VMTEST_RUN/step"
}

vm_log() { echo "VMTEST: $*"; }

# vm_crash RC: report RC to the host, then reboot at once (no sync, no unmount), like a power
# cut. QEMU runs with -no-reboot, so it exits. Any open TCP connection is simply dropped.
vm_crash() {
  echo "$1" > "$VMTEST_RUN/rc"
  echo "VMTEST: crashing on purpose at $(vm_up)s"
  # The tty drains to the UART asynchronously and a sysrq reset drops what is queued; printk
  # output is written synchronously, so the marker also goes through /dev/kmsg (level 2).
  echo "VMTEST-RC=$1"
  echo "<2>VMTEST-RC=$1" > /dev/kmsg
  sleep 0.5
  echo b > /proc/sysrq-trigger
  sleep 10   # not reached
}
