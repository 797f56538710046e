#!/usr/bin/env bash
# --metrics: Prometheus text at GET /metrics; known I/O moves the per-export counters by exactly
# the expected amounts; other paths are 404. After traffic from nbdsh, nbdcopy, nbdinfo and qemu-io
# (one server with one export, one with two from --config), `promtool check metrics` finds no
# problem, every metric has HELP and TYPE, and virtnbd_build_info matches `virtnbd -V`.
. "$(dirname "$0")/lib.sh"
need_cmd curl nbdcopy nbdinfo qemu-io promtool
[[ "$INTEROP_SERVER" == virtnbd ]] || { skip "23-metrics tests virtnbd's own metrics"; finish; }

mport=$(free_tcp_port)
MURL="http://127.0.0.1:$mport/metrics"
start_server -e m --size 16M --metrics "127.0.0.1:$mport"

# scrape FILE: the metrics text into FILE.
scrape() { curl -sf "$MURL" >"$1" || die "curl $MURL failed"; }
# val FILE NAME [LABEL=VALUE...]: the sample of NAME with exactly these labels (empty if absent).
val() {
    /usr/bin/python3 - "$@" <<'PY'
import re, sys
path, name, want = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
for line in open(path):
    m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line.strip())
    if not m or m.group(1) != name: continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
    if labels == want:
        v = float(m.group(4)); print(int(v) if v == int(v) else v); break
PY
}
# delta NAME LABELS...: after - before.
delta() { echo $(( $(val "$T/after" "$@") - $(val "$T/before" "$@") )); }

# The endpoint.
check_eq "GET /metrics: 200, Prometheus text format 0.0.4" "200 text/plain; version=0.0.4; charset=utf-8" \
    "$(curl -s -o /dev/null -w '%{http_code} %{content_type}' "$MURL")"
check_eq "GET /other: 404" 404 "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$mport/other")"
check_eq "POST /metrics: 405" 405 "$(curl -s -o /dev/null -w '%{http_code}' -X POST "$MURL")"

scrape "$T/before"
check_match "the export's series exist before any I/O" '^0$' "$(val "$T/before" virtnbd_written_bytes_total export=m)"

# Known I/O on one connection: write 12345 bytes, read 8192, flush, trim 4096, one failing write.
N=12345 M=8192
expect_ok "nbdsh: write $N, read $M, flush, trim, a write past the end" nbdsh -u "$URI" -c "
h.pwrite(b'\\x5a' * $N, 4096)
assert h.pread($M, 4096) == b'\\x5a' * $M
h.flush()
h.trim(4096, 65536)
h.set_strict_mode(0)
try:
    h.pwrite(b'x' * 512, 16 << 20)
    raise SystemExit('a write past the end succeeded')
except nbd.Error:
    pass
"
scrape "$T/after"
check_eq "requests_total{op=write} +2 (one failed)" 2 "$(delta virtnbd_requests_total export=m op=write)"
check_eq "requests_total{op=read} +1" 1 "$(delta virtnbd_requests_total export=m op=read)"
check_eq "requests_total{op=flush} +1" 1 "$(delta virtnbd_requests_total export=m op=flush)"
check_eq "requests_total{op=trim} +1" 1 "$(delta virtnbd_requests_total export=m op=trim)"
check_eq "request_errors_total{op=write} +1" 1 "$(delta virtnbd_request_errors_total export=m op=write)"
check_eq "request_errors_total{op=read} +0" 0 "$(delta virtnbd_request_errors_total export=m op=read)"
check_eq "written_bytes_total +$N" "$N" "$(delta virtnbd_written_bytes_total export=m)"
check_eq "read_bytes_total +$M" "$M" "$(delta virtnbd_read_bytes_total export=m)"
check_eq "request_duration_seconds_count{op=write} +1 (the failed write never reached the device)" 1 \
    "$(delta virtnbd_request_duration_seconds_count export=m op=write)"
check_eq "request_duration_seconds_count{op=read} +1" 1 "$(delta virtnbd_request_duration_seconds_count export=m op=read)"
check_eq "connections_total +1" 1 "$(delta virtnbd_connections_total export=m)"
check_eq "connections_active back to 0" 0 "$(val "$T/after" virtnbd_connections_active export=m)"
check_eq "requests_in_flight back to 0" 0 "$(val "$T/after" virtnbd_requests_in_flight export=m)"
check_eq "virtqueue_in_flight 0 when idle" 0 "$(val "$T/after" virtnbd_virtqueue_in_flight export=m)"
check_eq "device_errors_total 0" 0 "$(val "$T/after" virtnbd_device_errors_total export=m)"
kicks=$(delta virtnbd_virtqueue_kicks_total export=m)
irqs=$(delta virtnbd_virtqueue_interrupts_total export=m)
check_match "virtqueue kicks moved (≥ 1; EVENT_IDX may suppress some; got $kicks)" '^[1-9][0-9]*$' "$kicks"
# The RAM device runs inside the kick and the kicker reaps at once, with the interrupt turned off
# for that kick (quiet kicks): none is raised. (A device thread, --no-device-inline, raises them.)
check_eq "virtqueue interrupts: none for a device that completes on the kick (got $irqs)" 0 "$irqs"
check_match "latency buckets are exported" 'virtnbd_request_duration_seconds_bucket\{export="m",op="write",le="0.0001"\}' "$(cat "$T/after")"

# A connection open during a scrape is counted as active.
nbdsh -u "$URI" -c 'import time; time.sleep(3)' &
sleeper=$!
for _ in $(seq 50); do scrape "$T/mid"; [[ "$(val "$T/mid" virtnbd_connections_active export=m)" == 1 ]] && break; sleep 0.1; done
check_eq "connections_active = 1 while a client is connected" 1 "$(val "$T/mid" virtnbd_connections_active export=m)"
wait "$sleeper"

# A bulk copy: 1 MiB of random data in whatever requests and connections nbdcopy chooses.
head -c 1M /dev/urandom >"$T/src"
scrape "$T/before"
expect_ok "nbdcopy 1 MiB in" nbdcopy "$T/src" "$URI"
scrape "$T/after"
check_eq "written_bytes_total +1048576 after nbdcopy" 1048576 "$(delta virtnbd_written_bytes_total export=m)"

# ------------------------------------------------------------ a scrape a Prometheus user can trust
# lint FILE WHAT: promtool finds no problem in the scrape. promtool 2.42 exits 3 on lint problems,
# other versions print them and exit 0, so the output must be empty too.
lint() {
    local out rc=0
    out=$(promtool check metrics <"$1" 2>&1) || rc=$?
    check_eq "promtool check metrics ($2): no problems printed" "" "$out"
    check_eq "promtool check metrics ($2): exit 0" 0 "$rc"
}
# families FILE: every family has HELP and TYPE before its samples (a histogram's _bucket, _sum and
# _count count as its own), counters end _total, only known bounded labels appear, and the families
# are exactly the names in ExportMetrics.Name.
families() {
    /usr/bin/python3 - "$1" "$REPO_ROOT/Sources/NBDServer/Metrics.swift" <<'PY'
import re, sys
help, typ, problems, seen = {}, {}, [], set()
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    m = re.match(r'^# (HELP|TYPE) (\S+) ?(.*)$', line)
    if m:
        (help if m.group(1) == "HELP" else typ)[m.group(2)] = m.group(3)
        continue
    m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? \S+$', line)
    if not m:
        if line: problems.append(f"unparsed line: {line}")
        continue
    name, family = m.group(1), m.group(1)
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and typ.get(name[: -len(suffix)]) == "histogram":
            family = name[: -len(suffix)]
    seen.add(family)
    if family not in typ: problems.append(f"{name}: sample before a TYPE line")
    if not help.get(family): problems.append(f"{family}: no HELP text")
    labels = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or "")
    # Bounded labels only: a label per client, address or connection would grow without limit.
    for l in set(labels) - {"export", "op", "result", "reason", "le", "version", "commit", "swift"}:
        problems.append(f"{name}: label {l} is not one of the known bounded ones")
for f, t in typ.items():
    if t == "counter" and not f.endswith("_total"): problems.append(f"{f}: a counter not ending _total")
    if f not in seen: problems.append(f"{f}: TYPE without samples")
names = set(re.findall(r'public static let \w+ = "(virtnbd_\w+)"', open(sys.argv[2]).read()))
for n in sorted(names - seen): problems.append(f"{n}: in ExportMetrics.Name but not in the scrape")
for n in sorted(seen - names): problems.append(f"{n}: in the scrape but not in ExportMetrics.Name")
print("\n".join(problems))
PY
}

# More clients on the one-export server: nbdinfo (with the block status map) and qemu-io.
expect_ok "nbdinfo --map" nbdinfo --map "$URI"
expect_ok "qemu-io: write, read back, flush, discard, write zeroes" qemu-io -f raw \
    -c 'write -P 0x33 0 64k' -c 'read -P 0x33 0 64k' -c flush -c 'discard 64k 64k' -c 'write -z 128k 64k' "$URI"
scrape "$T/one"
check_match "block_status requests counted" '^[1-9]' "$(val "$T/one" virtnbd_requests_total export=m op=block_status)"
check_match "write_zeroes requests counted" '^[1-9]' "$(val "$T/one" virtnbd_requests_total export=m op=write_zeroes)"
lint "$T/one" "one export"
check_eq "every family has HELP and TYPE, sane names and labels (one export)" "" "$(families "$T/one")"

# virtnbd_build_info: the version, commit and compiler of `virtnbd -V`.
"$VIRTNBD" -V >"$T/version"
bi_want=$(printf 'virtnbd_build_info{version="%s",commit="%s",swift="%s"} 1' \
    "$(sed -n 's/^virtnbd //p' "$T/version")" "$(sed -n 's/^commit //p' "$T/version")" \
    "$(sed -n 's/^swift //p' "$T/version")")
check_eq "virtnbd_build_info has -V's version, commit and swift" "$bi_want" \
    "$(grep '^virtnbd_build_info' "$T/one" | sed 's/ 1\.0$/ 1/')"
check_match "virtnbd_build_info's commit is not empty" 'commit="([0-9a-f]{7,}(-dirty)?|unknown)"' \
    "$(grep '^virtnbd_build_info' "$T/one")"
stop_server

# Two exports from --config, traffic on both.
mport2=$(free_tcp_port)
S2="$T/multi.sock"
printf 'listen:\n  - %s\nmetrics: 127.0.0.1:%s\nexports:\n' "$S2" "$mport2" >"$T/multi.yaml"
printf '  - name: %s\n    device: ram\n    size: 8M\n' a b >>"$T/multi.yaml"
"$VIRTNBD" --config "$T/multi.yaml" >"$T/multi.out" 2>"$T/multi.err" &
multi=$!
_ALL_PIDS+=("$multi")
# shellcheck disable=SC2034  # read by stop_server (lib.sh) for its failure messages
SERVER_ERR="$T/multi.err"
for _ in $(seq 100); do [[ -S "$S2" ]] && curl -sf -o /dev/null "http://127.0.0.1:$mport2/metrics" && break; sleep 0.1; done
expect_ok "nbdinfo --map on export a" nbdinfo --map "nbd+unix:///a?socket=$S2"
expect_ok "qemu-io on export b" qemu-io -f raw -c 'write -P 0x44 0 1M' -c 'read 0 64k' -c flush "nbd+unix:///b?socket=$S2"
curl -sf "http://127.0.0.1:$mport2/metrics" >"$T/two" || die "curl of the two-export server failed"
check_match "export a: block_status counted" '^[1-9]' "$(val "$T/two" virtnbd_requests_total export=a op=block_status)"
check_eq "export b: 1 MiB written" 1048576 "$(val "$T/two" virtnbd_written_bytes_total export=b)"
lint "$T/two" "two exports"
check_eq "every family has HELP and TYPE, sane names and labels (two exports)" "" "$(families "$T/two")"
stop_server "$multi"
finish
