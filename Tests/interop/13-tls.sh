#!/usr/bin/env bash
# TLS: X.509 (nbdkit/qemu directory layout) and PSK (psktool format) with nbdinfo and qemu-io;
# --tls require refuses plaintext clients, --tls on serves both.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io openssl

# X.509: a CA and a server certificate for 127.0.0.1 / localhost.
pki="$T/pki"; mkdir -p "$pki"
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=virtnbd test CA" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj "/CN=localhost" >/dev/null 2>&1
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >ext.cnf
  openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile ext.cnf >/dev/null 2>&1
) || die "openssl could not make test certificates"
# The client side only needs the CA (libnbd/qemu read ca-cert.pem from the same directory layout).
cli="$T/client-pki"; mkdir -p "$cli"; cp "$pki/ca-cert.pem" "$cli/"

START_WAIT=printed start_server --tcp --size 8M --tls require --tls-certificates "$pki"
port=$PORT
check_match "the printed URI uses nbds://" '^nbds://' "$(head -n1 "$SERVER_OUT")"
check_eq "X.509: nbdinfo over nbds:// sees the size" 8388608 \
    "$(nbdinfo --size "nbds://localhost:$port/?tls-certificates=$cli" 2>"$T/x.err")"
check_match "X.509: nbdinfo reports TLS" '"TLS": true' "$(nbdinfo --json "nbds://localhost:$port/?tls-certificates=$cli" 2>&1)"
expect_ok "X.509: qemu-io writes and verifies over TLS" qemu-io \
    --object "tls-creds-x509,id=tls0,dir=$cli,endpoint=client" \
    --image-opts "driver=nbd,host=localhost,port=$port,tls-creds=tls0" \
    -c "write -P 0x5c 4097 10000" -c "read -P 0x5c 4097 10000"
expect_fail "--tls require: a plaintext client is refused" 'TLS|tls|refused|required|REQD|handshake' \
    nbdinfo --size "nbd://localhost:$port/"
# With strict mode off, libnbd still sends OPT_GO in plaintext: the server must answer ERR_TLS_REQD.
cat >"$T/plain.py" <<'PY'
import sys, nbd
h = nbd.NBD(); h.set_tls(nbd.TLS_DISABLE)
try:
    h.connect_uri(sys.argv[1]); print("fail|plaintext connect must fail under --tls require")
except nbd.Error as e:
    print(("ok|" if "TLS" in str(e) or "tls" in str(e) else "fail|") + "plaintext OPT_GO is refused with a TLS error|" + str(e))
PY
run_py_checks "$T/plain.py" "nbd://localhost:$port/"
# On the wire, under --tls require no plaintext option reveals anything: LIST, INFO, GO,
# STRUCTURED_REPLY, SET/LIST_META_CONTEXT each get exactly NBD_REP_ERR_TLS_REQD (no REP_SERVER
# name, no REP_INFO size or flags), and EXPORT_NAME, which has no error reply, is hung up on.
cat >"$T/wire.py" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
REPLY_MAGIC, IHAVEOPT, TLS_REQD = 0x3e889045565a9, 0x49484156454F5054, 0x80000005
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + desc + ("|" + detail if detail else ""), flush=True)
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b
def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert recvn(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))
    return s
def replies(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    got = []
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REPLY_MAGIC and o == opt, (hex(magic), o)
        recvn(s, ln); got.append(typ)
        if typ == 1 or typ & 0x80000000: return got
go = struct.pack(">I", 0) + struct.pack(">H", 1) + struct.pack(">H", 0)   # default export, ask for INFO_EXPORT
meta = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
s = connect()
for opt, name, data in ((3, "OPT_LIST", b""), (6, "OPT_INFO", go), (7, "OPT_GO", go), (8, "OPT_STRUCTURED_REPLY", b""),
                        (9, "OPT_LIST_META_CONTEXT", meta), (10, "OPT_SET_META_CONTEXT", meta)):
    r = replies(s, opt, data)
    out(r == [TLS_REQD], "--tls require: plaintext %s gets only NBD_REP_ERR_TLS_REQD" % name, "replies: %s" % [hex(t) for t in r])
s.close()
s = connect()
s.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))   # OPT_EXPORT_NAME ""
try:
    b = s.recv(1)
    out(b == b"", "--tls require: plaintext OPT_EXPORT_NAME is closed without size or flags", "got %r" % b)
except ConnectionResetError:
    out(True, "--tls require: plaintext OPT_EXPORT_NAME is closed without size or flags")
PY
run_py_checks "$T/wire.py" "$port"
stop_server

# PSK: psktool's "identity:hexkey" format.
printf 'alice:%s\n' "$(openssl rand -hex 32)" >"$T/keys.psk"
mkdir -p "$T/qpsk"; cp "$T/keys.psk" "$T/qpsk/keys.psk"
START_WAIT=printed start_server --tcp --size 8M --tls on --tls-psk "$T/keys.psk"
port=$PORT
check_eq "PSK: nbdinfo with tls-psk-file sees the size" 8388608 \
    "$(nbdinfo --size "nbds://alice@localhost:$port/?tls-psk-file=$T/keys.psk" 2>"$T/p.err")"
expect_ok "PSK: qemu-io writes and verifies over TLS" qemu-io \
    --object "tls-creds-psk,id=tls0,dir=$T/qpsk,username=alice,endpoint=client" \
    --image-opts "driver=nbd,host=localhost,port=$port,tls-creds=tls0" \
    -c "write -P 0x33 0 65536" -c "read -P 0x33 0 65536"
check_eq "--tls on: a plaintext client is still served" 8388608 "$(nbdinfo --size "nbd://localhost:$port/" 2>&1)"
printf 'alice:%s\n' "$(openssl rand -hex 32)" >"$T/wrong.psk"
expect_fail "PSK: a wrong key is refused" '.' nbdinfo --size "nbds://alice@localhost:$port/?tls-psk-file=$T/wrong.psk"
stop_server

expect_fail "--tls require without credentials is a clear startup error" 'tls-certificates|tls-psk' "$VIRTNBD" --tls require --size 1M -p "$(free_tcp_port)"
finish
