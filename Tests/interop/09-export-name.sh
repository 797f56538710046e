#!/usr/bin/env bash
# A named export with a description: clients reach it by name, NBD_OPT_LIST
# (nbdinfo --list) shows the name and the description, the printed URI has it;
# unconfigured names get NBD_REP_ERR_UNKNOWN (OPT_INFO/OPT_GO) or a hang-up (OPT_EXPORT_NAME).
. "$(dirname "$0")/lib.sh"
need_cmd qemu-io

name="disk1"
desc="virtnbd interop test disk"
start_server -e "$name" --description "$desc" --size 1M
check_match "client URI carries the export name" "^nbd\+unix:///$name\?socket=" "$URI"
check_eq "nbdinfo --size through the named URI" 1048576 "$(nbdinfo --size "$URI" 2>&1)"
expect_ok "qemu-io write + read back through the named URI" qemu-io -f raw -c "write -P 0x42 4095 2" -c "read -P 0x42 4095 2" "$URI"

if [[ "$INTEROP_SERVER" == virtnbd ]]; then
    check_eq "printed URI carries the export name" "$URI" "$PRINTED_URI"
    if nbdinfo --list --json "$URI" >"$T/list.json" 2>"$T/list.err"; then
        got=$(/usr/bin/python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(";".join("%s=%s" % (e.get("export-name"), e.get("description", "<none>")) for e in d["exports"]))' "$T/list.json" 2>&1)
        check_eq "nbdinfo --list: the one export, its name and description" "$name=$desc" "$got"
    else
        fail "nbdinfo --list --json succeeds" "$(cat "$T/list.err")"
    fi
    # nbdinfo without --list asks NBD_OPT_INFO/GO for the named export.
    got=$(nbdinfo --json "$URI" 2>&1 | /usr/bin/python3 -c 'import json,sys; e=json.load(sys.stdin)["exports"][0]; print(e.get("export-name"), "|", e.get("description", "<none>"))' 2>&1)
    check_eq "nbdinfo (OPT_GO) reports name | description" "$name | $desc" "$got"
else
    skip "list/description checks (the nbdkit stand-in has no description and lists no name)"
fi

# Names that are not configured, on the wire: OPT_INFO and OPT_GO get NBD_REP_ERR_UNKNOWN and
# negotiation goes on (the right name still works on the same connection); OPT_EXPORT_NAME,
# which has no error reply, gets the connection closed without any export data.
cat >"$T/unknown.py" <<'PY'
import socket, struct, sys
sock_path, good = sys.argv[1], sys.argv[2]
REPLY_MAGIC, IHAVEOPT = 0x3e889045565a9, 0x49484156454F5054
ERR_UNKNOWN, REP_ACK, REP_INFO = 0x80000006, 1, 3
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
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sock_path)
    g = recvn(s, 18)
    assert g[:16] == b"NBDMAGICIHAVEOPT", g
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s
def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
def replies(s):
    out_ = []
    while True:
        magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REPLY_MAGIC, hex(magic)
        recvn(s, ln)
        out_.append(typ)
        if typ == REP_ACK or typ & 0x80000000: return out_
def go_data(name):
    n = name.encode(); return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
s = connect()
for opt, label in ((6, "OPT_INFO"), (7, "OPT_GO")):
    # ("" is not in the list: an empty name selects the default export, see README -e.)
    for name in ("nope", good + "x", good.upper()):
        option(s, opt, go_data(name))
        r = replies(s)
        out(r == [ERR_UNKNOWN], "%s for unconfigured name %r gets NBD_REP_ERR_UNKNOWN" % (label, name), "replies: %s" % [hex(t) for t in r])
option(s, 7, go_data(good))
r = replies(s)
out(r[-1] == REP_ACK and REP_INFO in r, "OPT_GO for the configured name still succeeds on the same connection", "replies: %s" % [hex(t) for t in r])
s.close()
s = connect()
option(s, 1, b"nope")   # OPT_EXPORT_NAME: no error reply exists; the server must hang up
try:
    b = s.recv(1)
    out(b == b"", "OPT_EXPORT_NAME for an unconfigured name: closed without export data", "got %r" % b)
except ConnectionResetError:
    out(True, "OPT_EXPORT_NAME for an unconfigured name: closed without export data")
PY
if [[ "$INTEROP_SERVER" == virtnbd ]]; then
    run_py_checks "$T/unknown.py" "$SOCK" "$name"
else
    skip "unconfigured names (nbdkit's memory plugin serves every name)"
fi
stop_server
finish
