#!/usr/bin/env bash
# A named export with a description: clients reach it by name, NBD_OPT_LIST
# (nbdinfo --list) shows the name and the description, the printed URI has it.
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
stop_server
finish
