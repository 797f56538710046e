#!/usr/bin/env bash
# nbdinfo against the default (simulated 512 KiB) disk, over a unix socket and TCP.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo /usr/bin/python3

expected=524288

check_default_disk() {   # $1 = transport label
    local size json jsize
    size=$(nbdinfo --size "$URI" 2>&1)
    check_eq "$1: nbdinfo --size reports the default disk size" "$expected" "$size"

    if json=$(nbdinfo --json "$URI" 2>&1); then
        jsize=$(printf '%s' "$json" | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["exports"][0]["export-size"])' 2>&1)
        check_eq "$1: nbdinfo --json export-size" "$expected" "$jsize"
        local ro
        ro=$(printf '%s' "$json" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["is_read_only"])' 2>&1)
        check_eq "$1: default export is writable (is_read_only)" "False" "$ro"
    else
        fail "$1: nbdinfo --json succeeds" "$json"
    fi
}

# --- unix socket, no options at all
start_server
check_default_disk "unix"
if [[ "$INTEROP_SERVER" == virtnbd ]]; then
    check_eq "first stdout line is the NBD URI" "$URI" "$PRINTED_URI"
    # The printed URI must itself work.
    got=$(nbdinfo --size "$PRINTED_URI" 2>&1)
    check_eq "nbdinfo --size on the printed URI" "$expected" "$got"
else
    skip "printed URI check (stand-in server $INTEROP_SERVER does not print its URI)"
fi
stop_server

# --- TCP on 127.0.0.1, explicit 'serve' subcommand
if [[ "$INTEROP_SERVER" == virtnbd ]]; then
    start_server --tcp serve
else
    start_server --tcp
fi
check_default_disk "tcp"
if [[ "$INTEROP_SERVER" == virtnbd ]]; then
    check_eq "first stdout line is the NBD URI (tcp)" "nbd://127.0.0.1:$PORT/" "$PRINTED_URI"
fi
stop_server

finish
