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
