#!/usr/bin/env bash
# Access control (--allow CIDR): a TCP client outside every allowed network is closed before the
# greeting (no NBDMAGIC byte reaches it) and the server logs one line naming the peer and the
# rules; a client inside one is served. IPv4 rules match IPv4 clients on a dual-stack (::)
# listener. Unix-socket clients are not filtered. A bad CIDR is a clear startup error. The
# config file's allow: list works and --allow replaces it.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo

if [[ "$INTEROP_SERVER" != virtnbd ]]; then
    skip "--allow is virtnbd's (nbdkit uses its ip filter instead)"
    finish
fi

# probe HOST PORT: connect with a raw socket and print what the server sent first:
# "closed" (EOF or reset with no byte), "greeting" (NBDMAGIC IHAVEOPT), or "other …".
probe() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
data = b""
try:
    while len(data) < 16:
        b = s.recv(16 - len(data))
        if not b:
            break
        data += b
except ConnectionResetError:
    pass
except socket.timeout:
    print("other: timeout after %d bytes" % len(data)); sys.exit(0)
if not data:
    print("closed")
elif data == b"NBDMAGICIHAVEOPT":
    print("greeting")
else:
    print("other: %r" % data)
PY
}


# --allow 10.0.0.0/8: 127.0.0.1 is outside; closed before the greeting, one log line.
START_WAIT=printed start_server --tcp --size 1M --allow 10.0.0.0/8
check_eq "--allow 10.0.0.0/8: a client from 127.0.0.1 is closed before the greeting" closed "$(probe 127.0.0.1 "$PORT" 2>&1)"
expect_fail "--allow 10.0.0.0/8: nbdinfo from 127.0.0.1 fails" '' nbdinfo --size "$URI"
sleep 0.2
refusals=$(grep -c 'refusing 127\.0\.0\.1:[0-9]*: not in any --allow network (10\.0\.0\.0/8)' "$SERVER_ERR")
check_eq "one log line per refused client, naming the peer and the rule" 2 "$refusals"
check_match "the log line says the greeting was not sent" 'closed before the greeting' "$(grep refusing "$SERVER_ERR" | head -n1)"
stop_server

# --allow 127.0.0.0/8 (and an unrelated network first): served.
start_server --tcp --size 1M --allow 10.0.0.0/8 --allow 127.0.0.0/8 -v
check_eq "--allow 10.0.0.0/8 --allow 127.0.0.0/8: a client from 127.0.0.1 gets the greeting" greeting "$(probe 127.0.0.1 "$PORT" 2>&1)"
check_eq "--allow 127.0.0.0/8: nbdinfo sees the size" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
check_match "debug log names the rule that admitted the client" 'accepting 127\.0\.0\.1:[0-9]+: allowed by --allow 127\.0\.0\.0/8' "$(cat "$SERVER_ERR")"
stop_server

# Comma-separated and a single host.
start_server --tcp --size 1M --allow 192.168.0.0/16,127.0.0.1
check_eq "--allow 192.168.0.0/16,127.0.0.1: served" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
stop_server

# Unix sockets are not filtered.
start_server --size 1M --allow 10.0.0.0/8
check_eq "a Unix-socket client is not filtered by --allow" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
stop_server

# Bad CIDRs stop virtnbd at start with a message that says what to write.
expect_fail "--allow 10.0.0.1/8 (host bits) is a startup error naming the network" 'write the network 10\.0\.0\.0/8' \
    "$VIRTNBD" --size 1M --allow 10.0.0.1/8 -p "$(free_tcp_port)"
expect_fail "--allow 10.0.0.0/33 is a startup error" 'no valid prefix length.*0 to 32' \
    "$VIRTNBD" --size 1M --allow 10.0.0.0/33 -p "$(free_tcp_port)"
expect_fail "--allow ::1/129 is a startup error" 'no valid prefix length.*0 to 128' \
    "$VIRTNBD" --size 1M --allow ::1/129 -p "$(free_tcp_port)"
expect_fail "--allow localhost is a startup error" 'not an IPv4 or IPv6 address' \
    "$VIRTNBD" --size 1M --allow localhost -p "$(free_tcp_port)"
expect_fail "--allow '' is a startup error (not \"everyone\")" 'empty network' \
    "$VIRTNBD" --size 1M --allow '' -p "$(free_tcp_port)"

# The config file's allow: list, and --allow replacing it.
port=$(free_tcp_port)
cat >"$T/acl.yaml" <<EOF
listen: [127.0.0.1:$port]
allow: [10.0.0.0/8]
exports: [{ name: "", device: ram, size: 1M }]
EOF
start_plain --config "$T/acl.yaml"
check_eq "config allow: [10.0.0.0/8]: a client from 127.0.0.1 is closed before the greeting" closed "$(probe 127.0.0.1 "$port" 2>&1)"
stop_server
start_plain --config "$T/acl.yaml" --allow 127.0.0.0/8
check_eq "--allow 127.0.0.0/8 replaces the file's allow list" 1048576 "$(nbdinfo --size "nbd://127.0.0.1:$port/" 2>&1)"
stop_server
cat >"$T/bad.yaml" <<EOF
allow:
  - 127.0.0.1/8
exports: [{ name: "", device: ram, size: 1M }]
EOF
expect_fail "a bad allow: entry names file, line and the fix" 'bad\.yaml:2: allow\[0\]: "127\.0\.0\.1/8" has bits set after the prefix; write the network 127\.0\.0\.0/8' \
    "$VIRTNBD" --config "$T/bad.yaml"

# IPv6 loopback, if this machine has it.
if /usr/bin/python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null; then
    port=$(free_tcp_port)
    start_plain --listen ::1 --port "$port" --size 1M --allow ::1/128
    check_eq "--listen ::1 --allow ::1/128: a client from ::1 gets the greeting" greeting "$(probe ::1 "$port" 2>&1)"
    check_eq "--listen ::1 --allow ::1/128: nbdinfo nbd://[::1] sees the size" 1048576 "$(nbdinfo --size "nbd://[::1]:$port/" 2>&1)"
    stop_server
    start_plain --listen ::1 --port "$port" --size 1M --allow 127.0.0.0/8
    check_eq "--listen ::1 --allow 127.0.0.0/8: a client from ::1 is closed before the greeting" closed "$(probe ::1 "$port" 2>&1)"
    check_match "the refusal log line names [::1] and the rule" 'refusing \[::1\]:[0-9]+: not in any --allow network \(127\.0\.0\.0/8\)' "$(cat "$SERVER_ERR")"
    stop_server
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; IPv4 rules still apply to them.
    if /usr/bin/python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", 0))' 2>/dev/null; then
        port=$(free_tcp_port)
        start_plain --listen :: --port "$port" --size 1M --allow 127.0.0.0/8
        check_eq "--listen :: --allow 127.0.0.0/8: an IPv4 client (::ffff:127.0.0.1) is served" greeting "$(probe 127.0.0.1 "$port" 2>&1)"
        check_eq "--listen :: --allow 127.0.0.0/8: a client from ::1 is refused" closed "$(probe ::1 "$port" 2>&1)"
        stop_server
    else
        skip "dual-stack (::) listener: cannot bind :: here"
    fi
else
    skip "IPv6 checks: no IPv6 loopback (::1) on this machine"
fi

finish
