#!/usr/bin/env bash
# --metrics: Prometheus text at GET /metrics; known I/O moves the per-export counters by exactly
# the expected amounts; other paths are 404.
. "$(dirname "$0")/lib.sh"
need_cmd curl nbdcopy

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
check_match "virtqueue interrupts moved (≥ 1; got $irqs)" '^[1-9][0-9]*$' "$irqs"
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

stop_server
finish
