# shellcheck shell=bash
# Tests/ceph/lib.sh — what the Ceph tests share, on top of Tests/interop/lib.sh.
#
# The cluster: the one Scripts/test's ceph stage started (CEPH_TEST_DIR, its ceph.conf), else one
# of the test's own in $T/ceph, stopped at the end. Either listens on CEPH_TEST_ADDR (10.77.0.1, on
# the bridge vnbr-ceph, so that network namespaces reach it; 127.0.0.1 when no bridge can be made)
# and port 16789/13300, away from a demo cluster's 6789/3300.
#
#   new_image NAME SIZE   create rbd/TEST-PID-NAME (removed at the end); prints POOL/IMAGE
#   qsd_of PID            the pid of virtnbd PID's qemu-storage-daemon (empty if none)
#   ceph_bridge_up        make the bridge if it is not there (0 if it is there now)
. "$(dirname "${BASH_SOURCE[0]}")/../interop/lib.sh"

CEPH_TEST_ADDR=${CEPH_TEST_ADDR:-10.77.0.1}
CEPH_BRIDGE=vnbr-ceph
export CEPH_MON_PORT=${CEPH_MON_PORT:-16789}
_OWN_CLUSTER=""
_IMAGES=()
_CEPH_ATEXIT=() # commands (strings) run after the servers stop, before the images go

ceph_bridge_up() {
    ip link show "$CEPH_BRIDGE" >/dev/null 2>&1 && return 0
    ip link add "$CEPH_BRIDGE" type bridge 2>/dev/null || return 1
    ip addr add "$CEPH_TEST_ADDR/24" dev "$CEPH_BRIDGE" && ip link set "$CEPH_BRIDGE" up
}

_ceph_cleanup() {
    local rc=$? i
    # Servers first (their daemons hold the images open), then the images, then the cluster.
    for i in "${_ALL_PIDS[@]}"; do kill -TERM "$i" 2>/dev/null; done
    for i in "${_ALL_PIDS[@]}"; do
        timeout 15 tail --pid="$i" -f /dev/null 2>/dev/null || kill -KILL "$i" 2>/dev/null
        wait "$i" 2>/dev/null
    done
    _ALL_PIDS=()
    for i in "${_CEPH_ATEXIT[@]}"; do eval "$i" >/dev/null 2>&1; done
    for i in "${_IMAGES[@]}"; do timeout 60 rbd rm --no-progress "$i" >/dev/null 2>&1; done
    if [[ -n $_OWN_CLUSTER ]]; then
        "$REPO_ROOT/Scripts/ceph-cluster" stop "$_OWN_CLUSTER" >/dev/null 2>&1
        [[ ${_OWN_BRIDGE:-0} == 1 ]] && ip link del "$CEPH_BRIDGE" 2>/dev/null
    fi
    (exit "$rc")
    _cleanup
}
trap _ceph_cleanup EXIT

need_cmd ceph rbd qemu-storage-daemon
if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "--device rbd: exists only in virtnbd"
    finish
fi
[[ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so || -n $(find /usr/lib -name block-rbd.so 2>/dev/null | head -1) ]] ||
    die "QEMU's rbd driver (block-rbd.so) is missing: apt-get install qemu-block-extra"

if [[ -n ${CEPH_TEST_DIR:-} && -f $CEPH_TEST_DIR/ceph.conf ]]; then
    CEPH_DIR=$CEPH_TEST_DIR
    log "cluster: $CEPH_DIR (from the ceph stage)"
else
    CEPH_DIR=$T/ceph
    _OWN_BRIDGE=0
    if ip link show "$CEPH_BRIDGE" >/dev/null 2>&1; then :; elif ceph_bridge_up; then _OWN_BRIDGE=1; else
        log "no bridge can be made here: the cluster listens on 127.0.0.1"
        CEPH_TEST_ADDR=127.0.0.1
    fi
    log "starting a cluster of this test's own in $CEPH_DIR on $CEPH_TEST_ADDR"
    _OWN_CLUSTER=$CEPH_DIR
    CEPH_MGR=0 CEPH_ADDR=$CEPH_TEST_ADDR CEPH_OSD_SIZE=4G "$REPO_ROOT/Scripts/ceph-cluster" start "$CEPH_DIR" \
        >"$T/ceph-start.log" 2>&1 || die "Scripts/ceph-cluster start failed" "$(tail -n 5 "$T/ceph-start.log")"
fi
export CEPH_CONF=$CEPH_DIR/ceph.conf
CEPH_TEST_ADDR=$(sed -nE 's/^mon host = \[v2:([0-9.]+):.*/\1/p' "$CEPH_CONF")

new_image() {
    local name="rbd/$TEST_NAME-$$-$1"
    rbd create --size "$2" "$name" >"$T/rbd-create.log" 2>&1 || die "rbd create $name" "$(cat "$T/rbd-create.log")"
    _IMAGES+=("$name")
    echo "$name"
}

qsd_of() { pgrep -P "$1" -f qemu-storage-daemon | head -n 1; }

# seeded_file PATH SIZE SEED: SIZE bytes of seeded pseudo-random data.
seeded_file() {
    /usr/bin/python3 -c 'import random,sys; random.seed(int(sys.argv[3])); open(sys.argv[1],"wb").write(random.randbytes(int(sys.argv[2])))' "$1" "$2" "$3"
}
