#!/usr/bin/env bash
# Soak: SOAK_CONNS (64) connections of mixed 4 KiB random I/O for SOAK_TIME (60) seconds with
# data verification, through fio's nbd engine: one job per connection, each on its own disjoint
# region (offset_increment), randrw 50/50 with crc32c on every block written and verify_backlog
# reading written blocks back while the run goes on. Zero errors are required, and the server's
# resident memory (VmRSS) after the soak must be within SOAK_RSS_PCT (10) % of what it was after a
# warm-up run of the same jobs (the disk is filled first, so RAM-disk pages are all resident by
# then). Prints the figures: ops, ops/s, errors, RSS before/after.
#
# Environment: SOAK_TIME (s, default 60), SOAK_WARMUP (s, 10), SOAK_CONNS (64), SOAK_REGION
# (per connection, 2M), SOAK_IODEPTH (per connection, 4), SOAK_RSS_PCT (10).
# Use a release build (VIRTNBD=.build/release/virtnbd).
. "$(dirname "$0")/lib.sh"
need_cmd fio nbdcopy

SOAK_TIME=${SOAK_TIME:-60}
SOAK_WARMUP=${SOAK_WARMUP:-10}
SOAK_CONNS=${SOAK_CONNS:-64}
SOAK_REGION=${SOAK_REGION:-2M}
SOAK_IODEPTH=${SOAK_IODEPTH:-4}
SOAK_RSS_PCT=${SOAK_RSS_PCT:-10}

region_bytes=$(numfmt --from=iec "$SOAK_REGION") || die "SOAK_REGION=$SOAK_REGION is not a size"
disk=$((region_bytes * SOAK_CONNS))
[[ "$VIRTNBD" == */release/* || "$INTEROP_SERVER" != virtnbd ]] || log "note: $VIRTNBD is not a release build; figures will be low"

start_server --tcp --size "$disk"
cd "$T" || die "cd $T"

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null; }

# Fill the whole disk with data (not zeroes, which could stay holes) so that later RSS
# differences are the server's own memory, not RAM-disk pages touched for the first time.
head -c "$disk" /dev/urandom >"$T/fill.img"
expect_ok "fill the ${disk}-byte disk with nbdcopy" nbdcopy "$T/fill.img" "$URI"
rm -f "$T/fill.img"

# job FILE RUNTIME: SOAK_CONNS jobs (one nbd connection each) on disjoint regions.
job() {
    cat >"$1" <<JOB
[global]
ioengine=nbd
uri=$URI
rw=randrw
rwmixread=50
bs=4k
iodepth=$SOAK_IODEPTH
size=$SOAK_REGION
offset_increment=$SOAK_REGION
numjobs=$SOAK_CONNS
time_based=1
runtime=$2
verify=crc32c
verify_backlog=64
verify_fatal=1
verify_state_save=0
group_reporting=1

[soak]
JOB
}

# run_fio NAME RUNTIME: run the jobs, write fio's JSON to $T/NAME.json; print
# "ops errors reads writes connections" (connections: established at the server's port, sampled
# half-way through, at most 5 s in).
run_fio() {
    local name=$1 runtime=$2 rc=0 conns=0 pid
    job "$T/$name.fio" "$runtime"
    fio --output-format=json --output="$T/$name.json" "$T/$name.fio" >"$T/$name.log" 2>&1 &
    pid=$!
    sleep "$(( runtime / 2 < 5 ? runtime / 2 : 5 ))"
    conns=$(ss -Htn state established "( sport = :$PORT )" 2>/dev/null | wc -l)
    wait "$pid" || rc=$?
    /usr/bin/python3 - "$T/$name.json" "$rc" "$conns" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(0, 1, 0, 0, sys.argv[3]); sys.exit(0)
jobs = d.get("jobs", [])
ops = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs)
reads = sum(j["read"]["total_ios"] for j in jobs)
writes = sum(j["write"]["total_ios"] for j in jobs)
errs = sum(j.get("error", 0) for j in jobs) + sum(j.get("total_err", 0) for j in jobs) + (1 if sys.argv[2] != "0" else 0)
print(ops, errs, reads, writes, sys.argv[3])
PY
}

log "warm-up: $SOAK_CONNS connections for ${SOAK_WARMUP}s"
read -r w_ops w_errs _ _ _ < <(run_fio warmup "$SOAK_WARMUP")
check_eq "warm-up: fio errors (exit status, job errors, verify failures)" 0 "$w_errs"
rss_before=$(rss_kb)
[[ -n "$rss_before" ]] || die "cannot read VmRSS of the server (pid $SERVER_PID)"
log "after warm-up ($w_ops ops): server VmRSS ${rss_before} kB"

log "soak: $SOAK_CONNS connections of 4 KiB randrw 50/50 with crc32c verification for ${SOAK_TIME}s"
t0=$SECONDS
read -r ops errs reads writes conns < <(run_fio soak "$SOAK_TIME")
elapsed=$((SECONDS - t0))
rss_after=$(rss_kb)
check_eq "soak: fio errors (exit status, job errors, verify failures)" 0 "$errs"
if [[ "$errs" != 0 ]]; then
    fail "soak: fio output" "$(grep -E 'verify|err|fio:' "$T/soak.log" | head -n 15)"
fi
check_eq "soak: connections established at the server during the run (ss)" "$SOAK_CONNS" "$conns"
if ((ops > 0)); then pass "soak: $ops operations completed"; else fail "soak: operations completed" "fio reported none"; fi
check_eq "the server is still running after the soak" yes "$(kill -0 "$SERVER_PID" 2>/dev/null && echo yes || echo no)"

growth=$(awk -v a="$rss_before" -v b="$rss_after" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')
within=$(awk -v a="$rss_before" -v b="$rss_after" -v p="$SOAK_RSS_PCT" 'BEGIN { d = b - a; if (d < 0) d = -d; print (d * 100 <= p * a) ? "yes" : "no" }')
check_eq "server VmRSS after the soak within ${SOAK_RSS_PCT}% of after the warm-up (${rss_before} -> ${rss_after} kB, ${growth}%)" yes "$within"
server_errors=$(grep -cE 'error|critical|warning' "$SERVER_ERR")
check_eq "server logged no warnings or errors during the soak" 0 "$server_errors"

printf '# SOAK: %d connections, %ss, %d ops (%d reads incl. verification, %d writes), %d ops/s, %d errors; VmRSS %d kB after warm-up, %d kB after soak (%s%%)\n' \
    "$SOAK_CONNS" "$elapsed" "$ops" "$reads" "$writes" "$((ops / (elapsed > 0 ? elapsed : 1)))" "$errs" "$rss_before" "$rss_after" "$growth"
stop_server
finish
