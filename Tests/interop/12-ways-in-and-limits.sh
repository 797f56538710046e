#!/usr/bin/env bash
# Ways in: systemd socket activation (nbdinfo/nbdcopy -- [ CMD ]), --stdio (nbdsh connect_command),
# --run; and limits: --max-connections, --handshake-timeout.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo nbdcopy

check_eq "socket activation: nbdinfo --size -- [ virtnbd --size 1M ]" 1048576 \
    "$(timeout 60 nbdinfo --size -- [ "$VIRTNBD" --size 1M ] 2>"$T/sa.err")"
head -c $((3 << 20)) /dev/urandom >"$T/in.bin"
expect_ok "socket activation: nbdcopy file -> [ virtnbd --file ] " \
    timeout 60 nbdcopy -- "$T/in.bin" [ "$VIRTNBD" --file "$T/sa.img" --size 3M ]
if cmp "$T/in.bin" "$T/sa.img" >/dev/null 2>&1; then pass "socket activation: the file holds what nbdcopy wrote"; else fail "socket activation: the file holds what nbdcopy wrote"; fi

out=$(timeout 60 /usr/bin/python3 -m nbd -c "
h.connect_command(['$VIRTNBD', '--stdio', '--size', '2M'])
print(h.get_size())
h.pwrite(b'stdio!' * 100, 4096)
print(bytes(h.pread(6, 4096)).decode())
h.shutdown()" 2>"$T/stdio.err")
check_eq "stdio: nbdsh connect_command sees size and data" "2097152 stdio!" "$(echo $out)"

rc=0; got=$(timeout 60 "$VIRTNBD" --size 4M --run 'nbdinfo --size "$uri"; test -S "$unixsocket" || exit 9; exit 7' 2>"$T/run.err") || rc=$?
check_eq "--run: command sees \$uri and \$unixsocket" 4194304 "$got"
check_eq "--run: exit status is the command's" 7 "$rc"

# --max-connections 2: two clients hold connections, the third is refused, the first two still work.
start_server --size 1M --max-connections 2
cat >"$T/maxconn.py" <<'PY'
import sys, nbd
uri = sys.argv[1]
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail else ""), flush=True)
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
c = nbd.NBD()
try:
    c.connect_uri(uri); out(False, "third client refused at --max-connections 2")
except nbd.Error as e:
    out(True, "third client refused at --max-connections 2", str(e))
a.pwrite(b"\1" * 512, 0)
out(bytes(b.pread(512, 0)) == b"\1" * 512, "the two admitted clients keep working")
a.shutdown(); b.shutdown()
import time
for i in range(50):
    try:
        d = nbd.NBD(); d.connect_uri(uri); break
    except nbd.Error:
        time.sleep(0.1)
out(d.get_size() == 1 << 20, "a slot frees up when a client leaves")
d.shutdown()
PY
run_py_checks "$T/maxconn.py" "$URI"
stop_server

# A flood of refusals: every one counted in metrics, one log line per burst (issue #31).
mport=$(free_tcp_port) || die "no free port"
start_server --size 1M --max-connections 1 --metrics "127.0.0.1:$mport"
sock=${URI#*socket=}
/usr/bin/python3 - "$sock" <<'PY'
import socket, sys, time
held = socket.socket(socket.AF_UNIX); held.connect(sys.argv[1]); held.recv(18)
for i in range(30):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5); s.recv(18); s.close()
held.close()
PY
sleep 0.3
check_eq "30 refused clients: counted in virtnbd_connections_refused_total" 30 \
    "$(curl -s "http://127.0.0.1:$mport/metrics" | sed -n 's/^virtnbd_connections_refused_total{reason="limit"} //p')"
check_eq "... and logged once for the burst, not once each" 1 "$(grep -c 'refusing a client' "$SERVER_ERR")"
stop_server
start_server --size 1M
check_match "the default limit is 1024 connections" 'limits: max-connections 1024,' "$(cat "$SERVER_ERR")"
stop_server

# --max-connections-per-address 2 (TCP): a third connection from 127.0.0.1 is refused before the
# greeting and counted apart; 127.0.0.2 (another address) is still admitted.
mport=$(free_tcp_port) || die "no free port"
start_server --tcp --size 1M --max-connections-per-address 2 --metrics "127.0.0.1:$mport"
got=$(/usr/bin/python3 - "$PORT" <<'PY'
import socket, sys
port = int(sys.argv[1])
def conn(src):
    s = socket.socket(); s.bind((src, 0)); s.settimeout(5); s.connect(("127.0.0.1", port))
    b = b""
    try:
        while len(b) < 18:
            c = s.recv(18 - len(b))
            if not c: break
            b += c
    except ConnectionResetError:
        pass
    return s, len(b) == 18
a, ga = conn("127.0.0.1"); b, gb = conn("127.0.0.1"); c, gc = conn("127.0.0.1"); d, gd = conn("127.0.0.2")
a.close()
import time; time.sleep(0.3)
e, ge = conn("127.0.0.1")
print("greeted %s %s %s %s, after one left %s" % (ga, gb, gc, gd, ge))
PY
)
check_eq "per-address limit 2: the third from 127.0.0.1 refused, 127.0.0.2 admitted, a slot frees on close" \
    "greeted True True False True, after one left True" "$got"
check_eq "... counted as reason=\"per-address\"" 1 \
    "$(curl -s "http://127.0.0.1:$mport/metrics" | sed -n 's/^virtnbd_connections_refused_total{reason="per-address"} //p')"
expect_log 1 'the limit of 2 connection\(s\) from one address \(--max-connections-per-address\) is reached' "... and logged with the flag to change"
stop_server

# A client that connects and never negotiates is dropped after --handshake-timeout.
start_server --size 1M --handshake-timeout 1
sock=${URI#*socket=}
dropped=$(/usr/bin/python3 - "$sock" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)
t = time.time(); data = b""
while True:
    d = s.recv(4096)
    if not d: break
    data += d
print("dropped" if 0.5 < time.time() - t < 8 and len(data) == 18 else "not dropped (%.1fs, %d bytes)" % (time.time() - t, len(data)))
PY
)
check_eq "a silent client is dropped after the handshake timeout" dropped "$dropped"
check_eq "the server still answers afterwards" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
stop_server
finish
