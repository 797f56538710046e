#!/usr/bin/env bash
# -P/--pidfile (written once listening, removed on exit), --exit-with-parent (the server drains,
# flushes and exits when its parent dies; without the flag it stays), SIGHUP without --config,
# and the connection id (and export name) on every per-connection log line.
. "$(dirname "$0")/lib.sh"

# --pidfile
start_server -e p --size 1M --pidfile "$T/virtnbd.pid"
check_eq "the pid file holds the server's pid" "$SERVER_PID" "$(cat "$T/virtnbd.pid" 2>&1)"
kill -HUP "$SERVER_PID"
sleep 0.3
if kill -0 "$SERVER_PID" 2>/dev/null; then pass "SIGHUP without --config does not stop the server"; else fail "SIGHUP without --config does not stop the server"; fi
check_match "... it says there is nothing to reload" 'nothing to reload' "$(cat "$SERVER_ERR")"
stop_server
if [[ -e "$T/virtnbd.pid" ]]; then fail "the pid file is removed on exit" "$(ls -l "$T/virtnbd.pid")"; else pass "the pid file is removed on exit"; fi
expect_fail "an unwritable pid file stops the server with exit 1 and says why" 'cannot write the pid file .*/no/such/dir/x.pid' \
    "$VIRTNBD" --unix "$T/never.sock" --size 1M --pidfile "$T/no/such/dir/x.pid"

# --exit-with-parent: a parent shell starts the server, a client writes and flushes, the parent is
# killed; the server must drain, flush and go, removing its pid file, and the write is in the file.
# spawn FLAGS...: a parent sh that starts virtnbd with FLAGS and waits; sets PARENT, CHILD.
spawn() {
    rm -f "$T/child.pid"
    sh -c '"$@" >/dev/null 2>>"'"$T"'/child.err" & wait' sh "$VIRTNBD" --unix "$T/c.sock" --file "$T/disk.img" --size 4M \
        --pidfile "$T/child.pid" "$@" &
    PARENT=$!
    for _ in $(seq 100); do [[ -s "$T/child.pid" ]] && break; sleep 0.1; done
    CHILD=$(cat "$T/child.pid" 2>/dev/null) || die "the server did not write its pid file" "$(tail "$T/child.err")"
}
spawn --exit-with-parent
expect_ok "a client writes and flushes 64 KiB" nbdsh -u "nbd+unix:///?socket=$T/c.sock" -c "h.pwrite(b'\\xab' * 65536, 8192); h.flush()"
kill -KILL "$PARENT"; wait "$PARENT" 2>/dev/null
for _ in $(seq 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$CHILD" 2>/dev/null; then fail "--exit-with-parent: the server exits when its parent is killed"; kill -KILL "$CHILD"
else pass "--exit-with-parent: the server exits when its parent is killed"; fi
check_match "... after a graceful drain" 'SIGTERM received: draining connections' "$(cat "$T/child.err")"
check_match "... and a final stats line" 'stopped;' "$(cat "$T/child.err")"
if [[ -e "$T/child.pid" ]]; then fail "... its pid file is removed"; else pass "... its pid file is removed"; fi
check_eq "... the flushed write is in the file" "$(printf '\xab%.0s' $(seq 16) | od -An -tx1 | tr -d ' \n')" \
    "$(dd if="$T/disk.img" bs=1 skip=8192 count=16 status=none | od -An -tx1 | tr -d ' \n')"

: >"$T/child.err"
spawn
kill -KILL "$PARENT"; wait "$PARENT" 2>/dev/null
sleep 1
if kill -0 "$CHILD" 2>/dev/null; then pass "without --exit-with-parent the server outlives its parent"; else fail "without --exit-with-parent the server outlives its parent"; fi
kill -TERM "$CHILD"
for _ in $(seq 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$CHILD" 2>/dev/null; then kill -KILL "$CHILD"; fi

# Logs: with -v every line of a connection names it (conn=ID), and once the export is chosen, it too.
start_server -e logs --size 1M -v
expect_ok "a client session" nbdsh -u "$URI" -c "h.pwrite(b'x' * 512, 0); h.flush()"
expect_fail "a bad request is logged" '' nbdsh -u "$URI" -c "h.set_strict_mode(0); h.pwrite(b'x' * 512, 2 << 20)"
stop_server
conn_lines=$(grep -E 'client connected|transmission started|request failed|client sent NBD_CMD_DISC|client disconnected' "$SERVER_ERR")
check_match "per-connection lines were logged" 'transmission started' "$conn_lines"
check_eq "every per-connection line carries conn=" "" "$(grep -v 'conn=' <<<"$conn_lines")"
check_eq "every line after transmission started carries export=logs" "" \
    "$(grep -E 'transmission started|request failed|client sent NBD_CMD_DISC' <<<"$conn_lines" | grep -v 'export=logs')"
finish
