#!/usr/bin/env bash
# TCP keepalive (--keepalive, on by default): the accepted socket carries a keepalive timer
# (ss -tno: timer:(keepalive,…)) with the configured idle time, --no-keepalive and the file's
# limits.keepalive: false leave it off, a flag wins over the file, Unix sockets are untouched,
# and contradictions are refused. Then, in a network namespace joined to this one by a veth
# pair, a client that goes silent without a FIN (everything it sends to the server is dropped
# by a blackhole route) is closed by the server within idle + interval × count seconds (with
# 2x slack; sooner when it had been idle long enough for probing to have begun), and its
# --max-connections slot is free again; a live idle client is not dropped, and a --no-keepalive
# server's cut-off client keeps its slot (the bug this fixes).
# (tc netem and iptables need kernel modules or packages this kind of machine lacks; a blackhole
# route drops the client's packets as silently.)
. "$(dirname "$0")/lib.sh"
need_cmd ss ip

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "--keepalive is tested against virtnbd only"
    finish
fi


# hold URI [NETNS]: a libnbd client (in NETNS if given) that connects, negotiates and then sits
# idle, never closing. Sets HOLD_PID.
hold() {
    local uri=$1 ns=${2:-}
    _CMD_SEQ=$((_CMD_SEQ + 1))
    local out="$T/hold.$_CMD_SEQ.out"
    local cmd=(/usr/bin/python3 -c '
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", h.get_size(), flush=True)
time.sleep(3600)' "$uri")
    [[ -n "$ns" ]] && cmd=(ip netns exec "$ns" "${cmd[@]}")
    "${cmd[@]}" >"$out" 2>&1 &
    HOLD_PID=$!
    _ALL_PIDS+=("$HOLD_PID")
    local deadline=$((SECONDS + 20))
    until grep -q '^connected' "$out" 2>/dev/null; do
        kill -0 "$HOLD_PID" 2>/dev/null || die "idle client for $uri exited" "$(cat "$out")"
        ((SECONDS < deadline)) || die "idle client for $uri did not connect within 20 s" "$(cat "$out")"
        sleep 0.05
    done
}

unhold() {
    kill "$HOLD_PID" 2>/dev/null
    wait "$HOLD_PID" 2>/dev/null
    _forget_pid "$HOLD_PID"
}

# server_sockets PORT: the server's established TCP connections on PORT, with their timers.
server_sockets() { ss -tnoH state established "( sport = :$1 )"; }

# keepalive_left PORT: seconds left on the keepalive timer of the one connection on PORT
# ("none" without a keepalive timer). ss prints it as e.g. 44sec, 1min59sec or 540ms.
keepalive_left() {
    local line
    line=$(server_sockets "$1")
    if [[ "$line" =~ timer:\(keepalive,(([0-9]+)min)?(([0-9]+)sec)?([0-9.]+ms)?, ]]; then
        echo $((${BASH_REMATCH[2]:-0} * 60 + ${BASH_REMATCH[4]:-0}))
    else
        echo none
    fi
}

# settle PORT: wait (up to 5 s) until the connection on PORT has nothing unacknowledged, so that
# its timer is the idle one (keepalive, or none) rather than a retransmission timer.
settle() {
    local i
    for i in $(seq 50); do
        server_sockets "$1" | awk '$2 != 0 || /timer:\(on/ { busy = 1 } END { exit busy }' && return 0
        sleep 0.1
    done
}

# timer_case DESC EXPECT PORT: EXPECT is "none", or the idle time the timer must not exceed.
timer_case() {
    local desc=$1 want=$2 port=$3 left
    settle "$port"
    left=$(keepalive_left "$port")
    if [[ "$want" == none ]]; then
        if [[ "$left" == none ]]; then pass "$desc: no keepalive timer on the accepted socket"
        else fail "$desc: no keepalive timer on the accepted socket" "ss: $(server_sockets "$port")"; fi
    elif [[ "$left" != none ]] && ((left <= want && left >= want - 15)); then
        pass "$desc: the accepted socket has a keepalive timer (${left}s left of idle $want s)"
    else
        fail "$desc: the accepted socket has a keepalive timer of at most idle $want s" "ss: $(server_sockets "$port")"
    fi
}

# ---------------------------------------------------------------- timers on loopback

start_server --tcp --size 1M
hold "$URI"
timer_case "default" 60 "$PORT"
check_match "default: the limits line shows keepalive on, 120 s" \
    'keepalive on \(idle 60 s, interval 10 s, count 6: a vanished TCP client is closed after 120 s\)' \
    "$(grep 'limits:' "$SERVER_ERR")"
unhold
stop_server

start_server --tcp --size 1M --keepalive-idle 45 --keepalive-interval 7 --keepalive-count 4
hold "$URI"
timer_case "--keepalive-idle 45" 45 "$PORT"
check_match "--keepalive-idle 45 --keepalive-interval 7 --keepalive-count 4: 73 s in the log" \
    'closed after 73 s' "$(grep 'limits:' "$SERVER_ERR")"
unhold
stop_server

start_server --tcp --size 1M --no-keepalive
hold "$URI"
timer_case "--no-keepalive" none "$PORT"
check_match "--no-keepalive: the limits line says keepalive off" 'keepalive off' "$(grep 'limits:' "$SERVER_ERR")"
unhold
stop_server

# The file's limits.keepalive, and a flag over it.
cat >"$T/off.yaml" <<'EOF'
limits:
  keepalive: false
exports: [{ name: "", device: ram, size: 1M }]
EOF
cat >"$T/idle.yaml" <<'EOF'
limits:
  keepalive-idle: 20
exports: [{ name: "", device: ram, size: 1M }]
EOF
start_server --tcp --config "$T/off.yaml"
hold "$URI"
timer_case "file keepalive: false" none "$PORT"
unhold
stop_server
start_server --tcp --config "$T/off.yaml" --keepalive
hold "$URI"
timer_case "file keepalive: false, --keepalive" 60 "$PORT"
unhold
stop_server
start_server --tcp --config "$T/idle.yaml"
hold "$URI"
timer_case "file keepalive-idle: 20" 20 "$PORT"
unhold
stop_server

# Unix sockets: keepalive is not applied (and must not break them).
start_server --size 1M
check_eq "Unix socket with keepalive on: served" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
if grep -q 'cannot set' "$SERVER_ERR"; then fail "Unix socket: no keepalive warning" "$(grep 'cannot set' "$SERVER_ERR")"
else pass "Unix socket: no keepalive warning"; fi
stop_server

# Contradictions and bad values are refused with one line.
expect_fail "--no-keepalive with --keepalive-idle is refused" \
    '^virtnbd: --keepalive-idle: has no effect with --no-keepalive; drop --keepalive-idle, or drop --no-keepalive$' \
    "$VIRTNBD" --size 1M -U "$T/x.sock" --no-keepalive --keepalive-idle 5
expect_fail "--keepalive-count 0 is refused" '^virtnbd: --keepalive-count: 0 is not from 1 to 127; use e.g. 6$' \
    "$VIRTNBD" --size 1M -U "$T/x.sock" --keepalive-count 0
cat >"$T/bad.yaml" <<'EOF'
limits:
  keepalive: false
  keepalive-count: 3
exports: [{ name: "", device: ram, size: 1M }]
EOF
expect_fail "a timing under keepalive: false is refused at its line" \
    'bad.yaml:3: limits.keepalive-count: has no effect while keepalive is false \(line 2\); remove it, or set keepalive: true' \
    "$VIRTNBD" --config "$T/bad.yaml" -U "$T/x.sock"

# ---------------------------------------------------------------- a peer that vanishes

ns="virtnbd-ka-$$"
host_if="vnka$$h"
peer_if="vnka$$n"
net_cleanup() {
    local rc=$?
    ip link del "$host_if" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    return $rc
}
trap 'net_cleanup; _cleanup' EXIT

subnet=""
for i in $(seq 0 63); do
    c=$(((($$ + i) % 250) + 1))
    if ! ip -br addr | grep -q " 198\.18\.$c\."; then subnet="198.18.$c"; break; fi
done
[[ -n "$subnet" ]] || die "no free 198.18.x.0/30 test subnet"
host_ip="$subnet.1"
peer_ip="$subnet.2"

if ! ip netns add "$ns" 2>"$T/netns.err"; then
    skip "cannot create a network namespace ($(cat "$T/netns.err")); run as root on a kernel with network namespaces to test dead peers"
    finish
fi
ip link add "$host_if" type veth peer name "$peer_if" netns "$ns" &&
    ip addr add "$host_ip/30" dev "$host_if" && ip link set "$host_if" up &&
    ip -n "$ns" addr add "$peer_ip/30" dev "$peer_if" && ip -n "$ns" link set "$peer_if" up &&
    ip -n "$ns" link set lo up ||
    die "cannot set up the veth pair $host_if ($host_ip) <-> $ns:$peer_if ($peer_ip)"

idle=2 interval=1 count=3
deadline=$((idle + interval * count))
# The control: a --no-keepalive server whose client is cut off at the same moment.
cport=$(free_tcp_port)
start_plain --listen "$host_ip" -p "$cport" --size 1M --max-connections 1 --no-keepalive
control_pid=$SERVER_PID
curi="nbd://$host_ip:$cport/"
hold "$curi" "$ns"
control_hold=$HOLD_PID

port=$(free_tcp_port)
start_plain -v --listen "$host_ip" -p "$port" --size 1M --max-connections 1 \
    --keepalive-idle "$idle" --keepalive-interval "$interval" --keepalive-count "$count"
uri="nbd://$host_ip:$port/"
hold "$uri" "$ns"
check_eq "the namespace's client is connected" 1 "$(server_sockets "$port" | wc -l)"
expect_fail "with the client holding the only slot, a second client is refused" '' nbdinfo --size "$uri"

# A live client answers the probes: still connected well after the deadline.
sleep $((deadline + 3))
check_eq "a live idle client is still connected $((deadline + 3)) s later (probes answered)" 1 \
    "$(server_sockets "$port" | wc -l)"

# Cut both clients off: everything they send to the server (the probes' ACKs) is dropped, no FIN.
ip -n "$ns" route add blackhole "$host_ip/32" || die "cannot add a blackhole route in $ns"
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
t0=$(now_ms)
bound=$((2 * deadline + 5))
while (($(server_sockets "$port" | wc -l) > 0 && $(now_ms) - t0 < bound * 1000)); do sleep 0.2; done
elapsed_ms=$(($(now_ms) - t0))
elapsed="$((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100))"
if (($(server_sockets "$port" | wc -l) == 0)); then
    pass "the cut-off client is closed by the server after $elapsed s (idle $idle + interval $interval × count $count = $deadline s; bound $bound s)"
else
    fail "the cut-off client is closed by the server within $bound s" "still: $(server_sockets "$port")"
fi
check_match "the server saw the connection time out (ETIMEDOUT: the keepalive probes went unanswered)" \
    'connection error: .*timed out' "$(grep 'connection error' "$SERVER_ERR")"
if kill -0 "$HOLD_PID" 2>/dev/null; then pass "the client never closed its end (it vanished without a FIN)"
else fail "the client never closed its end (it vanished without a FIN)" "it exited"; fi
check_eq "its --max-connections slot is free: a new client is served" 1048576 "$(nbdinfo --size "$uri" 2>&1)"
unhold
stop_server

# The control, at least as long after the cut: without keepalive the dead client still holds its slot.
while (($(now_ms) - t0 < bound * 1000)); do sleep 0.2; done
check_eq "--no-keepalive control: the cut-off client still holds its connection $bound s after the cut" 1 \
    "$(server_sockets "$cport" | wc -l)"
expect_fail "--no-keepalive control: so a new client is refused" '' nbdinfo --size "$curi"
HOLD_PID=$control_hold
unhold
stop_server "$control_pid"
finish
