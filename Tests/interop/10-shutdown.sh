#!/usr/bin/env bash
# Shutdown with a client connected: SIGTERM (and SIGINT) arrives while a client
# holds an open connection after a flushed write.  Whether the server closes
# that connection at once or waits for it is its policy; either way, once the
# client has gone it must exit with status 0 (within STOP_TIMEOUT), and every
# write that was acknowledged and flushed is in the backing file.
. "$(dirname "$0")/lib.sh"
need_cmd cmp

disk="$T/disk.img"
MiB=1048576

# client.py URI OFFSET BYTE: write 1 MiB of BYTE at OFFSET, flush, say "flushed",
# then hold the connection open until stdin closes.
cat >"$T/client.py" <<'PY'
import sys, nbd
uri, off, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(bytes([byte]) * (1 << 20), off)
if h.can_flush():
    h.flush()
print("flushed", flush=True)
sys.stdin.read()          # hold the connection until told to go
try:
    h.shutdown()          # NBD_CMD_DISC, if the server still listens
except nbd.Error:
    pass
PY

# hold_client URI OFFSET BYTE: start client.py; sets CLIENT_PID and CLIENT_FIFO.
hold_client() {
    CLIENT_FIFO="$T/fifo.$2"
    mkfifo "$CLIENT_FIFO"
    /usr/bin/python3 "$T/client.py" "$1" "$2" "$3" <"$CLIENT_FIFO" >"$T/client.$2.out" 2>&1 &
    CLIENT_PID=$!
    exec {CLIENT_FD}>"$CLIENT_FIFO"   # keep its stdin open
    local i
    for ((i = 0; i < 200; i++)); do
        grep -q flushed "$T/client.$2.out" 2>/dev/null && return 0
        kill -0 "$CLIENT_PID" 2>/dev/null || break
        sleep 0.05
    done
    die "client did not write and flush" "$(cat "$T/client.$2.out")"
}
release_client() {  # let the client disconnect; kill it if it hangs
    exec {CLIENT_FD}>&-
    local i
    for ((i = 0; i < 100; i++)); do kill -0 "$CLIENT_PID" 2>/dev/null || break; sleep 0.05; done
    kill "$CLIENT_PID" 2>/dev/null; wait "$CLIENT_PID" 2>/dev/null
}
# signal_then_release SIG: signal the server while the client is connected,
# note what the server does, let the client go, then the server must exit 0.
signal_then_release() {
    signal_server "$SERVER_PID" "$1" || return 1
    sleep 1
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "1s after SIG$1 the server still runs (waits for the connected client)"
    else
        log "the server exited within 1s of SIG$1 with a client connected"
    fi
    release_client
    wait_server_exit "$SERVER_PID" "SIG$1 and the client's disconnect"
}

# --- SIGTERM with one idle connected client
start_server --file "$disk" --size 8M
hold_client "$URI" 0 0x5a
pass "client wrote and flushed 1 MiB at offset 0, connection held open"
signal_then_release TERM
head -c $MiB /dev/zero | tr '\0' '\132' >"$T/expect"
if cmp -n $MiB "$T/expect" "$disk" >"$T/cmp.out" 2>&1; then pass "flushed data is in the file after SIGTERM"; else fail "flushed data is in the file after SIGTERM" "$(cat "$T/cmp.out")"; fi

# --- SIGINT with one idle connected client; the existing file keeps its data
start_server --file "$disk"
hold_client "$URI" $MiB 0xa5
pass "client wrote and flushed 1 MiB at offset 1 MiB, connection held open"
signal_then_release INT
head -c $MiB /dev/zero | tr '\0' '\245' >>"$T/expect"
if cmp -n $((2 * MiB)) "$T/expect" "$disk" >"$T/cmp.out" 2>&1; then pass "both writes are in the file after SIGINT"; else fail "both writes are in the file after SIGINT" "$(cat "$T/cmp.out")"; fi
check_eq "file size unchanged" $((8 * MiB)) "$(stat -c %s "$disk")"

# --- SIGTERM while 4 READs of 16 MiB are queued for a client that reads slowly (issue #31): every
# reply arrives whole, then EOF, and the server exits 0. (Before: 19 of 64 MiB, then EOF.)
# rawnbd.py: what the raw clients below share (a Unix-socket connection, exact reads, OPT_GO).
cat >"$T/rawnbd.py" <<'PY'
import socket, struct, time
def connect(path, rcvbuf=None):
    s = socket.socket(socket.AF_UNIX)
    if rcvbuf: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(path); s.settimeout(60)
    return s
def recvn(s, n, rate=None):
    """n bytes, fewer at EOF; with `rate` (bytes/s) read as slowly as that."""
    b = bytearray()
    while len(b) < n:
        c = s.recv(min(n - len(b), 1 << 16))
        if not c: break
        b += c
        if rate: time.sleep(len(c) / rate)
    return bytes(b)
def greet(s):
    recvn(s, 18); s.sendall(struct.pack(">I", 3))
def go(s):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20)); recvn(s, ln)
        if typ == 1: return
PY

cat >"$T/slowread.py" <<'PY'
import os, signal, struct, sys, time
from rawnbd import connect, recvn as _recvn, greet, go
path, pid = sys.argv[1], int(sys.argv[2])
s = connect(path, rcvbuf=4096)
def recvn(n, rate=None): return _recvn(s, n, rate)  # rate: a slow reader, 12.5 MB/s
greet(s); go(s)
L = 16 << 20
s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * L, L) for i in range(4)))
time.sleep(1)
os.kill(pid, signal.SIGTERM)
time.sleep(0.5)
data = shut = 0
for i in range(4):
    h = recvn(16)
    if len(h) < 16: break
    magic, err, cookie = struct.unpack(">IIQ", h)
    if err == 108: shut += 1; continue
    if err == 0 and len(recvn(L, 12.5e6)) == L: data += 1
    else: break
print("%d whole, %d ESHUTDOWN, EOF %s" % (data, shut, recvn(1) == b""))
PY
# A 16 MiB budget: the READs are served one after another, each reply queued while the last
# is still being written (the hostile suite's slow reader saw the fourth cut short).
start_server --size 64M --memory-budget 16M
got=$(/usr/bin/python3 "$T/slowread.py" "$SOCK" "$SERVER_PID" 2>&1)
# The four were received before the signal, so all four are served with their data.
check_eq "SIGTERM with 64 MiB of READ replies queued: all four arrive whole, then EOF" "4 whole, 0 ESHUTDOWN, EOF True" "$got"
wait_server_exit "$SERVER_PID" "SIGTERM with replies queued"
# --- A client still negotiating when SIGTERM arrives: its next option is answered
# NBD_REP_ERR_SHUTDOWN (spec, "Option haggling"), its ABORT is acknowledged, then EOF.
cat >"$T/haggle.py" <<'PY'
import os, signal, struct, sys, time
from rawnbd import connect, recvn as _recvn, greet
path, pid = sys.argv[1], int(sys.argv[2])
s = connect(path)
def recvn(n): return _recvn(s, n)
greet(s)
os.kill(pid, signal.SIGTERM)
time.sleep(0.3)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 3, 0))  # NBD_OPT_LIST
magic, o, typ, ln = struct.unpack(">QIII", recvn(20)); recvn(ln)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 2, 0))  # NBD_OPT_ABORT
m2, o2, typ2, ln2 = struct.unpack(">QIII", recvn(20))
print("LIST 0x%x, ABORT 0x%x, EOF %s" % (typ, typ2, recvn(1) == b""))
PY
start_server --size 8M
got=$(/usr/bin/python3 "$T/haggle.py" "$SOCK" "$SERVER_PID" 2>&1)
check_eq "an option sent during shutdown gets NBD_REP_ERR_SHUTDOWN, ABORT its ACK, then EOF" "LIST 0x80000007, ABORT 0x1, EOF True" "$got"
wait_server_exit "$SERVER_PID" "SIGTERM during a handshake"

# --- A second SIGTERM while the drain waits for a client that does not read its replies: the
# server exits at once, status 1, saying so (the first one alone would wait --shutdown-timeout).
cat >"$T/noread.py" <<'PY'
import struct, sys, time
from rawnbd import connect, greet, go
s = connect(sys.argv[1], rcvbuf=4096)
greet(s); go(s)
L = 16 << 20
s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * L, L) for i in range(4)))
print("sent", flush=True)
time.sleep(60)
PY
start_server --size 64M
/usr/bin/python3 "$T/noread.py" "$SOCK" >"$T/noread.out" 2>&1 &
NOREAD=$!
for _ in $(seq 100); do grep -q sent "$T/noread.out" && break; sleep 0.05; done
sleep 0.5
kill -TERM "$SERVER_PID"
sleep 1
if kill -0 "$SERVER_PID" 2>/dev/null; then pass "one SIGTERM waits for the client's unread replies"; else fail "one SIGTERM waits for the client's unread replies" "the server had exited"; fi
kill -TERM "$SERVER_PID" 2>/dev/null
rc=0; deadline=$((SECONDS + 5))
while kill -0 "$SERVER_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
    fail "a second SIGTERM exits at once" "still running 5 s later"; kill -KILL "$SERVER_PID"
fi
wait "$SERVER_PID" 2>/dev/null || rc=$?
_forget_pid "$SERVER_PID"
check_eq "a second SIGTERM exits with status 1" 1 "$rc"
expect_log 1 "SIGTERM again while draining: exiting now" "the second SIGTERM is logged"
kill "$NOREAD" 2>/dev/null; wait "$NOREAD" 2>/dev/null
finish
