#!/usr/bin/env bash
# 03-rbd-failover: front ends on two "hosts" (network namespaces with a veth on the cluster's
# bridge; the cluster listens on the bridge address, CEPH_TEST_ADDR) export two images of one pool.
# A client writes to host A's front end with FUA, QD1, logging each write before it is sent and
# once it is acknowledged. Host A's virtnbd is killed with SIGKILL mid-stream: its daemon goes with
# it (PR_SET_PDEATHSIG), host B's export is untouched, and a new front end on host B serves A's
# image. A client that reconnects there finds every acknowledged write (the one write in flight at
# the kill may or may not have landed). Random data prints its seed (replay: RBD_SEED=N).
. "$(dirname "$0")/lib.sh"
need_cmd ip python3 nbdcopy
SEED=${RBD_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed=$SEED (replay: RBD_SEED=$SEED)"
if [[ $CEPH_TEST_ADDR == 127.* ]]; then
    skip "the cluster listens on 127.0.0.1 only (no bridge could be made): namespaces cannot reach it"
    finish
fi
net=${CEPH_TEST_ADDR%.*}
declare -A NS ADDR
n=0
for h in a b; do
    NS[$h]=vnbd-$$-$h
    ADDR[$h]=$net.$((100 + 2 * ($$ % 60) + n)); n=$((n + 1))
    ip netns add "${NS[$h]}" 2>"$T/netns.err" || { skip "ip netns add fails here: $(cat "$T/netns.err")"; finish; }
    _CEPH_ATEXIT+=("ip netns del ${NS[$h]}")
    ip link add "vh$$$h" type veth peer name "vp$$$h" &&
        ip link set "vp$$$h" netns "${NS[$h]}" &&
        ip link set "vh$$$h" master "$CEPH_BRIDGE" up &&
        ip netns exec "${NS[$h]}" ip addr add "${ADDR[$h]}/24" dev "vp$$$h" &&
        ip netns exec "${NS[$h]}" ip link set "vp$$$h" up &&
        ip netns exec "${NS[$h]}" ip link set lo up || die "cannot wire namespace ${NS[$h]} to $CEPH_BRIDGE"
done
log "hosts: a = ${NS[a]} (${ADDR[a]}), b = ${NS[b]} (${ADDR[b]}); cluster at $CEPH_TEST_ADDR"

# front_end HOST PORT IMAGE: virtnbd in HOST's namespace, listening there; sets FE_PID FE_URI FE_ERR.
front_end() {
    local h=$1 port=$2 img=$3 i
    FE_ERR=$T/fe-$h-$port.err
    FE_URI="nbd://${ADDR[$h]}:$port/"
    ip netns exec "${NS[$h]}" "$VIRTNBD" --listen "${ADDR[$h]}" --port "$port" --device "rbd:$img@$CEPH_CONF" \
        >"$T/fe-$h-$port.out" 2>"$FE_ERR" </dev/null &
    FE_PID=$!; _ALL_PIDS+=("$FE_PID")
    for i in $(seq 600); do
        kill -0 "$FE_PID" 2>/dev/null || die "front end on host $h exited" "$(tail -5 "$FE_ERR")"
        nbdinfo --size "$FE_URI" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "front end on host $h does not answer on $FE_URI" "$(tail -5 "$FE_ERR")"
}

cat >"$T/fo.py" <<'PY'
# fo.py write URI LOG SEED | check URI LOG SEED: QD1 FUA writes to 2048 32 KiB slots, pass after
# pass, logged "I pass slot" before and "A pass slot" after the acknowledgement; check rebuilds the
# last acknowledged content of every slot and compares.
import random, sys, nbd
SLOT, SLOTS = 32768, 2048
def content(seed, p, s):
    r = random.Random("%s-%d-%d" % (seed, p, s))
    n = r.randrange(1, 9) * 4096
    return r.randbytes(n)
mode, uri, logf, seed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
h = nbd.NBD(); h.connect_uri(uri)
if mode == "write":
    out, p = open(logf, "w", buffering=1), 0
    while True:
        for s in random.Random("%s-order-%d" % (seed, p)).sample(range(SLOTS), SLOTS):
            out.write("I %d %d\n" % (p, s))
            h.pwrite(content(seed, p, s), s * SLOT, nbd.CMD_FLAG_FUA)
            out.write("A %d %d\n" % (p, s))
        p += 1
acked, inflight = {}, None
for line in open(logf):
    k, p, s = line.split(); p, s = int(p), int(s)
    if k == "I": inflight = (p, s)
    else: acked[s] = p; inflight = None
lost = []
for s, p in sorted(acked.items()):
    want = content(seed, p, s)
    got = h.pread(len(want), s * SLOT)
    if got != want:
        if inflight and inflight[1] == s and got[:len(content(seed, *inflight))] == content(seed, *inflight)[:len(got)]:
            continue  # the write in flight at the kill landed over it
        lost.append((s, p))
n = len(acked)
print(("ok|" if n > 0 else "fail|") + "the log holds %d acknowledged writes (%d passes begun)|none" % (n, max(acked.values(), default=-1) + 1))
print(("ok|" if not lost else "fail|") + "every acknowledged write is there after the failover (%d checked, %d lost)|first lost: %s" % (n, len(lost), lost[:5]))
print("ok|in flight at the kill: %s" % (inflight,))
PY

fa=$(new_image a 64M); fb=$(new_image b 64M)
front_end a 10809 "$fa"; A_PID=$FE_PID; A_URI=$FE_URI; A_QSD=$(qsd_of "$A_PID")
A_DIR=$(tr '\0' '\n' <"/proc/$A_QSD/cmdline" | sed -nE 's/.*addr\.path=([^,]*)\/vhost\.sock.*/\1/p')
front_end b 10809 "$fb"; B_PID=$FE_PID; B_URI=$FE_URI; B_ERR=$FE_ERR
check_eq "host a's daemon runs in host a's namespace" "${NS[a]}" "$(ip netns identify "$A_QSD" 2>&1)"
check_eq "host b's daemon runs in host b's namespace" "${NS[b]}" "$(ip netns identify "$(qsd_of "$B_PID")" 2>&1)"
seeded_file "$T/b.raw" 67108864 "$SEED"
expect_ok "host b: nbdcopy 64 MiB of seeded data into image b (flushed at the end)" nbdcopy "$T/b.raw" "$B_URI"

/usr/bin/python3 "$T/fo.py" write "$A_URI" "$T/acked.log" "$SEED" >"$T/writer.out" 2>&1 &
W_PID=$!; _ALL_PIDS+=("$W_PID")
until [[ $(grep -c '^A' "$T/acked.log" 2>/dev/null) -ge 200 ]]; do
    kill -0 "$W_PID" 2>/dev/null || die "the writer stopped before the kill" "$(tail -5 "$T/writer.out")"
    sleep 0.1
done
log "SIGKILL host a's virtnbd (pid $A_PID) with $(grep -c '^A' "$T/acked.log") writes acknowledged"
kill -KILL "$A_PID"; wait "$A_PID" 2>/dev/null; _forget_pid "$A_PID"
w_rc=0; wait "$W_PID" || w_rc=$?; _forget_pid "$W_PID"
check_match "the writer's connection broke with the front end" "." "$( ((w_rc != 0)) && tail -1 "$T/writer.out")"
for i in $(seq 300); do kill -0 "$A_QSD" 2>/dev/null || break; sleep 0.05; done
check_eq "host a's daemon ended with its virtnbd (PR_SET_PDEATHSIG)" "" "$(ps -o pid= -p "$A_QSD" | tr -d ' ')"
expect_ok "host b kept serving image b: nbdcopy out" nbdcopy "$B_URI" "$T/b.back"
check_eq "host b: image b reads back as written" "$(sha256_of "$T/b.raw")" "$(sha256_of "$T/b.back")"

t0=$(date +%s.%N)
front_end b 10810 "$fa"; C_PID=$FE_PID; C_URI=$FE_URI
log "a new front end on host b (pid $C_PID) serves image a at $C_URI, answering $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s after it was started (not a check)"
check_eq "the new front end removed the private directory the killed one left" "absent" \
    "$([[ -e $A_DIR ]] && echo present || echo absent)"
run_py_checks "$T/fo.py" check "$C_URI" "$T/acked.log" "$SEED"
expect_ok "the new front end takes writes (pwrite with FUA, read back)" \
    nbdsh -u "$C_URI" -c 'h.pwrite(b"N" * 4096, 0, nbd.CMD_FLAG_FUA); assert h.pread(4096, 0) == b"N" * 4096'
stop_server "$C_PID"
stop_server "$B_PID"
finish
