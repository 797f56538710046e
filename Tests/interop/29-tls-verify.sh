#!/usr/bin/env bash
# --tls-verify-peer (nbdkit's flag): a client must present a certificate signed by ca-cert.pem;
# none, a self-signed one or one from another CA fails the TLS handshake. Per-export
# authorisation (allow-dn, allow-psk in the configuration file): another client gets
# NBD_REP_ERR_POLICY for that export and can still use the others; NBD_OPT_LIST hides it.
# Certificates are made with certtool (gnutls-bin), checked with nbdinfo, libnbd and qemu.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io qemu-img certtool

pki="$T/pki"; mkdir -p "$pki"
# cert NAME TEMPLATE-LINES [CA-NAME]: NAME-key.pem, NAME-cert.pem in $pki (self-signed without a CA).
cert() {
    local name=$1 tmpl=$2 ca=${3:-}
    printf '%s\nexpiration_days = 2\n' "$tmpl" >"$pki/$name.info"
    certtool --generate-privkey --key-type=ecdsa --outfile "$pki/$name-key.pem" >/dev/null 2>&1 || return 1
    if [[ -z "$ca" ]]; then
        certtool --generate-self-signed --load-privkey "$pki/$name-key.pem" --template "$pki/$name.info" --outfile "$pki/$name-cert.pem" >/dev/null 2>&1
    else
        certtool --generate-certificate --load-privkey "$pki/$name-key.pem" --load-ca-certificate "$pki/$ca-cert.pem" \
            --load-ca-privkey "$pki/$ca-key.pem" --template "$pki/$name.info" --outfile "$pki/$name-cert.pem" >/dev/null 2>&1
    fi
}
client_tmpl() { printf 'cn = "%s"\norganization = "Example"\ntls_www_client\nsigning_key\nencryption_key\n' "$1"; }
{
    cert ca $'cn = "virtnbd test CA"\nca\ncert_signing_key' &&
    cert otherca $'cn = "some other CA"\nca\ncert_signing_key' &&
    cert server $'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\nsigning_key\nencryption_key' ca &&
    cert alice "$(client_tmpl alice)" ca &&
    cert bob "$(client_tmpl bob)" ca &&
    cert selfalice "$(client_tmpl alice)" &&        # alice's name, but self-signed (nbd's tlswrongcert)
    cert otheralice "$(client_tmpl alice)" otherca   # alice's name, signed by another CA
} || die "certtool could not make the test certificates"
srv="$T/srv"; mkdir -p "$srv"
cp "$pki/ca-cert.pem" "$srv/"; cp "$pki/server-cert.pem" "$srv/"; cp "$pki/server-key.pem" "$srv/"
# Client directories as libnbd and qemu read them: ca-cert.pem (to verify the server),
# client-cert.pem and client-key.pem.
for who in alice bob selfalice otheralice none; do
    mkdir -p "$T/c-$who"; cp "$pki/ca-cert.pem" "$T/c-$who/"
    [[ $who == none ]] && continue
    cp "$pki/$who-cert.pem" "$T/c-$who/client-cert.pem"; cp "$pki/$who-key.pem" "$T/c-$who/client-key.pem"
done
# qemu first checks its own certificate against its ca-cert.pem (every certificate there must be a
# CA, and its own must not be one), so it cannot use a self-signed client certificate at all. For
# the foreign CA, its directory also trusts that CA, so that its client gets as far as the
# server's check.
mkdir -p "$T/q-otheralice"; cp "$T/c-otheralice/client-cert.pem" "$T/c-otheralice/client-key.pem" "$T/q-otheralice/"
cat "$pki/ca-cert.pem" "$pki/otherca-cert.pem" >"$T/q-otheralice/ca-cert.pem"
mkdir -p "$T/q-none"; cp "$pki/ca-cert.pem" "$T/q-none/"
check_eq "certtool names alice's certificate CN=alice,O=Example" "CN=alice,O=Example" \
    "$(certtool -i --infile "$pki/alice-cert.pem" | sed -n 's/^[[:space:]]*Subject: //p')"

# refusals_after N: the server's count of failed TLS handshakes once it reaches N (the server
# logs just after sending its alert, so the client may exit a moment before the line is written;
# waits up to 10 s for it, then prints whatever the count is).
refusals_after() {
    local n i=0
    while n=$(grep -c "TLS handshake failed" "$SERVER_ERR"); ((n < $1 && i < 200)); do sleep 0.05; i=$((i + 1)); done
    echo "$n"
}
uri() { printf 'nbds://localhost:%s/%s?tls-certificates=%s' "$1" "$2" "$T/c-$3"; }
qemu_read() {   # qemu_read PORT EXPORT DIR: qemu-io reads over TLS with the certificates in $T/DIR
    qemu-io --object "tls-creds-x509,id=tls0,dir=$T/$3,endpoint=client" \
        --image-opts "driver=nbd,host=localhost,port=$1,export=$2,tls-creds=tls0" -r -c "read 0 4096"
}

# --- Control: without --tls-verify-peer any client certificate (or none) is admitted.
START_WAIT=printed start_server --tcp --size 8M --tls require --tls-certificates "$srv"
check_eq "without --tls-verify-peer a self-signed client certificate is admitted (as before)" 8388608 \
    "$(nbdinfo --size "$(uri "$PORT" "" selfalice)" 2>&1)"
check_eq "without --tls-verify-peer a client without a certificate is admitted" 8388608 "$(nbdinfo --size "$(uri "$PORT" "" none)" 2>&1)"
stop_server

# --- --tls-verify-peer from the command line.
START_WAIT=printed start_server --tcp --size 8M --tls require --tls-certificates "$srv" --tls-verify-peer
port=$PORT
check_eq "--tls-verify-peer: a CA-signed client certificate connects" 8388608 "$(nbdinfo --size "$(uri "$port" "" alice)" 2>&1)"
expect_ok "--tls-verify-peer: qemu-io with the CA-signed certificate writes and verifies" qemu-io \
    --object "tls-creds-x509,id=tls0,dir=$T/c-alice,endpoint=client" \
    --image-opts "driver=nbd,host=localhost,port=$port,tls-creds=tls0" \
    -c "write -P 0xa5 4096 65536" -c "read -P 0xa5 4096 65536"
cat >"$T/read.py" <<'PY'
import sys, nbd
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1])
data = h.pread(65536, 4096)
print(("ok|" if data == b"\xa5" * 65536 else "fail|") + "--tls-verify-peer: libnbd with the CA-signed certificate reads back what qemu-io wrote")
PY
run_py_checks "$T/read.py" "$(uri "$port" "" alice)"
for who in selfalice otheralice none; do
    case $who in
        selfalice) what="a self-signed client certificate (nbd's tlswrongcert)" ;;
        otheralice) what="a client certificate signed by another CA" ;;
        none) what="a client without a certificate" ;;
    esac
    before=$(grep -c "TLS handshake failed" "$SERVER_ERR")
    expect_fail "--tls-verify-peer: $what is refused (nbdinfo)" 'TLS|tls|handshake|certificate|alert|closed|reset' \
        nbdinfo --size "$(uri "$port" "" "$who")"
    after=$(refusals_after $((before + 1)))
    check_eq "--tls-verify-peer: the server logged the failed TLS handshake for $what" $((before + 1)) "$after"
    [[ $who == selfalice ]] && continue
    before=$after
    expect_fail "--tls-verify-peer: $what is refused (qemu-io)" '.' qemu_read "$port" "" "q-$who"
    after=$(refusals_after $((before + 1)))
    check_eq "--tls-verify-peer: the server refused qemu-io's TLS handshake for $what" $((before + 1)) "$after"
done
expect_ok "--tls-verify-peer: qemu-img info with the CA-signed certificate" qemu-img info \
    --object "tls-creds-x509,id=tls0,dir=$T/c-alice,endpoint=client" --image-opts "driver=nbd,host=localhost,port=$port,tls-creds=tls0"
before=$(grep -c "TLS handshake failed" "$SERVER_ERR")
expect_fail "--tls-verify-peer: qemu-img info with another CA's certificate fails" '.' qemu-img info \
    --object "tls-creds-x509,id=tls0,dir=$T/q-otheralice,endpoint=client" --image-opts "driver=nbd,host=localhost,port=$port,tls-creds=tls0"
check_eq "--tls-verify-peer: the server refused qemu-img's TLS handshake" $((before + 1)) "$(refusals_after $((before + 1)))"
# Each refusal is one log line at notice, in words, without BoringSSL's error queue (build paths).
refusal_lines=$(grep "TLS handshake failed" "$SERVER_ERR")
check_eq "refusals are logged at notice, not info" 0 "$(grep -vc ' notice ' <<<"$refusal_lines")"
check_eq "... and carry no source path of the build" 0 "$(grep -c '/' <<<"$refusal_lines")"
# (A client whose certificate the server's CA list does not name sends none: gnutls picks by that list.)
check_match "... in words: the client presented no certificate" "the client presented no certificate" "$refusal_lines"
stop_server

# --- Startup errors.
mkdir -p "$T/noca"; cp "$srv/server-cert.pem" "$srv/server-key.pem" "$T/noca/"
expect_fail "--tls-verify-peer without ca-cert.pem is a startup error naming the file" "$T/noca/ca-cert.pem" \
    timeout 60 "$VIRTNBD" --tls require --tls-certificates "$T/noca" --tls-verify-peer --size 1M -p "$(free_tcp_port)"
printf 'alice:%s\nbob:%s\n' "$(openssl rand -hex 32)" "$(openssl rand -hex 32)" >"$T/keys.psk"
expect_fail "--tls-verify-peer with --tls-psk is refused at startup" 'tls-verify-peer.*tls-psk' \
    timeout 60 "$VIRTNBD" --tls require --tls-psk "$T/keys.psk" --tls-verify-peer --size 1M -p "$(free_tcp_port)"
expect_fail "--tls-verify-peer with TLS off is refused at startup" 'tls-verify-peer' \
    timeout 60 "$VIRTNBD" --tls-verify-peer --size 1M -p "$(free_tcp_port)"

# --- Per-export authorisation by certificate DN (allow-dn). tls: on, so plaintext clients are served too.
cat >"$T/dn.yaml" <<EOF
tls: { policy: on, certificates: $srv, verify-peer: true }
exports:
  - { name: open, device: ram, size: 1M }
  - name: secret
    device: ram
    size: 2M
    allow-dn:
      - "cn=alice, o=Example"
EOF
START_WAIT=printed start_server --tcp --config "$T/dn.yaml"
port=$PORT
check_eq "allow-dn: alice's certificate reaches its export" 2097152 "$(nbdinfo --size "$(uri "$port" secret alice)" 2>&1)"
expect_ok "allow-dn: qemu-io as alice reads the export" qemu_read "$port" secret c-alice
expect_fail "allow-dn: bob's certificate is refused for that export by policy" 'policy|not allowed|permitted' \
    nbdinfo --size "$(uri "$port" secret bob)"
check_eq "allow-dn: bob can still use the unrestricted export" 1048576 "$(nbdinfo --size "$(uri "$port" open bob)" 2>&1)"
expect_fail "allow-dn: qemu-io as bob is refused by the server" 'not allowed to use export' qemu_read "$port" secret c-bob
# On the wire inside TLS (Python's ssl with the client's certificate): what NBD_OPT_LIST names,
# the exact reply to NBD_OPT_INFO/GO of a refused export, and that the same connection then
# reaches an export it may use.
cat >"$T/authz.py" <<'PY'
import socket, ssl, struct, sys
port, certdir, who = int(sys.argv[1]), sys.argv[2], sys.argv[3]
listed_want, refused, allowed = sys.argv[4].split(","), sys.argv[5], sys.argv[6]
REPLY_MAGIC, IHAVEOPT, ACK, SERVER, POLICY = 0x3e889045565a9, 0x49484156454F5054, 1, 2, 0x80000002
def out(ok, desc, detail=""):
    print(("ok|" if ok else "fail|") + who + ": " + desc + ("|" + detail if detail else ""), flush=True)
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b
def replies(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    got = []
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REPLY_MAGIC and o == opt, (hex(magic), o)
        got.append((typ, recvn(s, ln)))
        if typ == ACK or typ & 0x80000000: return got
def go(name): return struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
assert recvn(raw, 18)[:16] == b"NBDMAGICIHAVEOPT"
raw.sendall(struct.pack(">I", 3))
out([t for t, _ in replies(raw, 5)] == [ACK], "NBD_OPT_STARTTLS is acknowledged")
ctx = ssl.create_default_context(cafile=certdir + "/ca-cert.pem")
ctx.load_cert_chain(certdir + "/client-cert.pem", certdir + "/client-key.pem")
s = ctx.wrap_socket(raw, server_hostname="localhost")
r = replies(s, 3)
names = [d[4:4 + struct.unpack(">I", d[:4])[0]].decode() for t, d in r if t == SERVER]
out(names == listed_want, "NBD_OPT_LIST over TLS names %s" % listed_want, "listed: %s" % names)
if refused != "-":
    for opt, what in ((6, "NBD_OPT_INFO"), (7, "NBD_OPT_GO")):
        r = replies(s, opt, go(refused))
        out([t for t, _ in r] == [POLICY] and b"not allowed" in r[0][1],
            "%s %r gets only NBD_REP_ERR_POLICY saying it is not allowed" % (what, refused), "replies: %s" % r)
r = replies(s, 7, go(allowed))
out(r[-1][0] == ACK, "NBD_OPT_GO %r is then acknowledged on the same connection" % allowed, "replies: %s" % [hex(t) for t, _ in r])
PY
run_py_checks "$T/authz.py" "$port" "$T/c-bob" bob open secret open
run_py_checks "$T/authz.py" "$port" "$T/c-alice" alice open,secret - secret
check_eq "plaintext: the unrestricted export is served (tls: on)" 1048576 "$(nbdinfo --size "nbd://localhost:$port/open" 2>&1)"
# On the wire in plaintext: LIST names only "open"; INFO and GO of "secret" get exactly
# NBD_REP_ERR_TLS_REQD; EXPORT_NAME "secret" is hung up on without size or flags.
cat >"$T/plain.py" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
REPLY_MAGIC, IHAVEOPT, ACK, SERVER, TLS_REQD = 0x3e889045565a9, 0x49484156454F5054, 1, 2, 0x80000005
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
        got.append((typ, recvn(s, ln)))
        if typ == ACK or typ & 0x80000000: return got
def go(name): return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s = connect()
r = replies(s, 3)
names = [d[4:4 + struct.unpack(">I", d[:4])[0]] for t, d in r if t == SERVER]
out(names == [b"open"], "plaintext NBD_OPT_LIST lists only the unrestricted export", "listed: %s" % names)
for opt, what in ((6, "NBD_OPT_INFO"), (7, "NBD_OPT_GO")):
    r = replies(s, opt, go(b"secret"))
    out([t for t, _ in r] == [TLS_REQD], "plaintext %s of the allow-listed export gets only NBD_REP_ERR_TLS_REQD" % what, "replies: %s" % r)
r = replies(s, 7, go(b"open"))
out(r[-1][0] == ACK, "the same plaintext connection then gets NBD_OPT_GO of the unrestricted export", "replies: %s" % [hex(t) for t, _ in r])
s.close()
s = connect()
s.sendall(struct.pack(">QII", IHAVEOPT, 1, 6) + b"secret")
try:
    b = s.recv(1)
    out(b == b"", "plaintext NBD_OPT_EXPORT_NAME of the allow-listed export is closed without size or flags", "got %r" % b)
except ConnectionResetError:
    out(True, "plaintext NBD_OPT_EXPORT_NAME of the allow-listed export is closed without size or flags")
PY
run_py_checks "$T/plain.py" "$port"
stop_server

# --- Per-export authorisation by PSK identity (allow-psk).
cat >"$T/psk.yaml" <<EOF
tls: { policy: require, psk: $T/keys.psk }
exports:
  - { name: open, device: ram, size: 1M }
  - { name: secret, device: ram, size: 2M, allow-psk: [alice] }
EOF
START_WAIT=printed start_server --tcp --config "$T/psk.yaml"
port=$PORT
check_eq "allow-psk: alice's identity reaches its export" 2097152 \
    "$(nbdinfo --size "nbds://alice@localhost:$port/secret?tls-psk-file=$T/keys.psk" 2>&1)"
expect_fail "allow-psk: bob's identity is refused for that export by policy" 'policy|not allowed|permitted' \
    nbdinfo --size "nbds://bob@localhost:$port/secret?tls-psk-file=$T/keys.psk"
check_eq "allow-psk: bob can still use the unrestricted export" 1048576 \
    "$(nbdinfo --size "nbds://bob@localhost:$port/open?tls-psk-file=$T/keys.psk" 2>&1)"
stop_server

printf 'tls: { policy: on, certificates: %s }\nexports: [{ name: a, device: simulated, allow-dn: CN=a }]\n' "$srv" >"$T/bad.yaml"
expect_fail "allow-dn without verify-peer is a configuration error" 'allow-dn.*verify-peer' \
    timeout 60 "$VIRTNBD" --config "$T/bad.yaml" -p "$(free_tcp_port)"

# --- An export's own `tls: require` under `tls: { policy: on }`: plaintext clients get
# NBD_REP_ERR_TLS_REQD for it (it used to be served in plaintext: the key was parsed, not
# enforced) and still reach the others; TLS clients reach it.
cat >"$T/req.yaml" <<EOF
tls: { policy: on, certificates: $srv }
exports:
  - { name: open, device: ram, size: 1M }
  - { name: guarded, device: ram, size: 2M, tls: require }
EOF
START_WAIT=printed start_server --tcp --config "$T/req.yaml"
expect_fail "tls: require on one export: plaintext nbdinfo is refused for it" 'TLS|tls' \
    nbdinfo --size "nbd://localhost:$PORT/guarded"
check_eq "tls: require on one export: plaintext still reaches the other" 1048576 "$(nbdinfo --size "nbd://localhost:$PORT/open" 2>&1)"
check_eq "tls: require on one export: a TLS client reaches it" 2097152 "$(nbdinfo --size "$(uri "$PORT" guarded alice)" 2>&1)"
stop_server

finish
