# shellcheck shell=bash
# Tests/interop/lib.sh — shared helpers for the interop tests.
#
# Source it from a test script:   . "$(dirname "$0")/lib.sh"
#
# Environment:
#   VIRTNBD          path of the virtnbd binary (default: .build/release/virtnbd,
#                    else .build/debug/virtnbd)
#   INTEROP_SERVER   virtnbd (default) | nbdkit — nbdkit is a stand-in server used
#                    to validate the tests themselves; start_server translates the
#                    virtnbd command line for it.
#   KEEP_TMP=1       keep the per-test temp dir
#   START_TIMEOUT    seconds to wait for the server to answer (default 30)
#   STOP_TIMEOUT     seconds to wait for the server to exit after SIGTERM (default 30)
#
# start_server is the only place that knows how a server is started.

set -u -o pipefail

# Debian's python3 (with python3-libnbd) must win over a pyenv python3.
export PATH="/usr/bin:/bin:/usr/sbin:/sbin:$PATH"

TEST_NAME=$(basename "$0" .sh)
INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$INTEROP_DIR/../.." && pwd)
INTEROP_SERVER=${INTEROP_SERVER:-virtnbd}
START_TIMEOUT=${START_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}

if [[ -z "${VIRTNBD:-}" ]]; then
    if [[ -x "$REPO_ROOT/.build/release/virtnbd" ]]; then
        VIRTNBD="$REPO_ROOT/.build/release/virtnbd"
    else
        VIRTNBD="$REPO_ROOT/.build/debug/virtnbd"
    fi
fi
# Make a relative path absolute: tests may cd.
[[ "$VIRTNBD" == /* ]] || VIRTNBD="$PWD/$VIRTNBD"

T=$(mktemp -d "${TMPDIR:-/tmp}/interop-$TEST_NAME.XXXXXX") || { echo "cannot create temp dir" >&2; exit 2; }

_PASSED=0
_FAILED=0
_SKIPPED=0
_FINISHED=0
_ALL_PIDS=()
_SERVER_SEQ=0

# ---------------------------------------------------------------- reporting

log()  { printf '# %s\n' "$*"; }

pass() {
    _PASSED=$((_PASSED + 1))
    printf 'ok %d - %s\n' "$((_PASSED + _FAILED))" "$1"
}

# fail DESCRIPTION [DETAILS...]
fail() {
    _FAILED=$((_FAILED + 1))
    printf 'not ok %d - %s\n' "$((_PASSED + _FAILED))" "$1"
    shift
    local line
    for line in "$@"; do
        printf '%s\n' "$line" | sed 's/^/#     /'
    done
}

skip() {
    _SKIPPED=$((_SKIPPED + 1))
    printf 'skip - %s\n' "$*"
}

# die MESSAGE: setup went wrong; counts as a failure and ends the test.
die() {
    fail "setup: $1" "${@:2}"
    exit 1
}

# check_eq DESCRIPTION EXPECTED GOT
check_eq() {
    if [[ "$2" == "$3" ]]; then
        pass "$1 (= $3)"
    else
        fail "$1" "expected: $2" "got:      $3"
    fi
}

# check_match DESCRIPTION REGEX GOT
check_match() {
    if [[ "$3" =~ $2 ]]; then
        pass "$1"
    else
        fail "$1" "expected to match: $2" "got: $3"
    fi
}

# _run LOGFILE CMD...: run CMD with stdout+stderr into LOGFILE, return its status.
_CMD_SEQ=0
_run() {
    local logf=$1; shift
    "$@" >"$logf" 2>&1
}

_tail_of() { tail -n "${2:-15}" "$1" 2>/dev/null; }

# expect_ok DESCRIPTION CMD...: the command must exit 0.
# Its output is left in $LAST_OUT (a file).
expect_ok() {
    local desc=$1; shift
    _CMD_SEQ=$((_CMD_SEQ + 1))
    LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    local rc=0
    _run "$LAST_OUT" "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then
        pass "$desc"
        return 0
    fi
    fail "$desc" "command: $(_quote "$@")" "expected exit status 0, got $rc; output (last lines):" "$(_tail_of "$LAST_OUT")"
    return 1
}

# expect_fail DESCRIPTION REGEX CMD...: the command must exit non-zero and
# its output must match the extended REGEX (use '' for any output).
expect_fail() {
    local desc=$1 re=$2; shift 2
    _CMD_SEQ=$((_CMD_SEQ + 1))
    LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    local rc=0
    _run "$LAST_OUT" "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then
        fail "$desc" "command: $(_quote "$@")" "expected a non-zero exit status, got 0; output (last lines):" "$(_tail_of "$LAST_OUT")"
        return 1
    fi
    if [[ -n "$re" ]] && ! grep -Eq -- "$re" "$LAST_OUT"; then
        fail "$desc" "command: $(_quote "$@")" "exited $rc as expected, but output does not match /$re/:" "$(_tail_of "$LAST_OUT")"
        return 1
    fi
    pass "$desc"
}

_quote() { local a out=""; for a in "$@"; do out+=$(printf '%q ' "$a"); done; printf '%s' "${out% }"; }

# need_cmd CMD...: die when a tool is missing.
need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "required tool '$c' not found (install it: Scripts/deps test)"
    done
}

# nbdsh via Debian's python (python3-libnbd).
nbdsh() { /usr/bin/python3 -m nbd "$@"; }

# run_py_checks SCRIPT ARGS...: run a Python checker with Debian's python3
# (python3-libnbd).  It prints one line per check: "ok|DESC" or
# "fail|DESC|DETAIL"; each becomes a pass/fail here.  A non-zero exit fails too.
run_py_checks() {
    local rc=0 line desc detail
    /usr/bin/python3 "$@" >"$T/py.out" 2>&1 || rc=$?
    while IFS= read -r line; do
        case "$line" in
            ok\|*)   desc=${line#ok|}; pass "${desc%%|*}" ;;
            fail\|*) line=${line#fail|}; desc=${line%%|*}; detail=${line#"$desc"}; fail "$desc" "${detail#|}" ;;
        esac
    done <"$T/py.out"
    if [[ $rc -ne 0 ]]; then fail "python checker $1 exits 0" "exit $rc:" "$(grep -vE '^(ok|fail)\|' "$T/py.out" | tail -n 15)"; fi
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------- servers

# free_tcp_port: print a TCP port on 127.0.0.1 that is free right now.
free_tcp_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start_server [--tcp] [VIRTNBD-ARGS...]
#   Starts a server with the given virtnbd options on a fresh unix socket in
#   $T (or, with --tcp, on a free port of 127.0.0.1), and waits until it answers.
#   Sets: SERVER_PID, URI (the URI clients use), SOCK (unix only), PORT (tcp only),
#   SERVER_OUT, SERVER_ERR (its stdout/stderr files), PRINTED_URI (first stdout
#   line; virtnbd only).  Several servers may run at once: save these variables.
start_server() {
    local tcp=0
    if [[ "${1:-}" == "--tcp" ]]; then tcp=1; shift; fi
    _SERVER_SEQ=$((_SERVER_SEQ + 1))
    local n=$_SERVER_SEQ
    SERVER_OUT="$T/server.$n.out"
    SERVER_ERR="$T/server.$n.err"
    PRINTED_URI=""
    SOCK=""
    PORT=""

    # The export name (for the URI) from the virtnbd args.
    local name="" i args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do
        case "${args[i]}" in
            -e|--export-name) name=${args[i+1]:-} ;;
            --export-name=*) name=${args[i]#--export-name=} ;;
        esac
    done

    local cmd=()
    if [[ $tcp -eq 1 ]]; then
        PORT=$(free_tcp_port) || die "no free TCP port"
        URI="nbd://127.0.0.1:$PORT/$name"
    else
        SOCK="$T/nbd.$n.sock"
        URI="nbd+unix:///$name?socket=$SOCK"
    fi

    case "$INTEROP_SERVER" in
        virtnbd)
            [[ -x "$VIRTNBD" ]] || die "virtnbd binary not found or not executable: $VIRTNBD (build it: swift build -c release, or set VIRTNBD)"
            cmd=("$VIRTNBD")
            # A subcommand must come first.
            if [[ "${1:-}" == serve ]]; then cmd+=(serve); shift; fi
            if [[ $tcp -eq 1 ]]; then
                cmd+=(--listen 127.0.0.1 --port "$PORT")
            else
                cmd+=(--unix "$SOCK")
            fi
            cmd+=("$@")
            ;;
        nbdkit)
            cmd=(nbdkit -f)
            if [[ $tcp -eq 1 ]]; then
                cmd+=(-i 127.0.0.1 -p "$PORT")
            else
                cmd+=(-U "$SOCK")
            fi
            local size="" file="" ro=0
            for ((i = 0; i < ${#args[@]}; i++)); do
                case "${args[i]}" in
                    serve) ;;
                    -r|--read-only) ro=1 ;;
                    --size) size=${args[i+1]}; i=$((i + 1)) ;;
                    --file) file=${args[i+1]}; i=$((i + 1)) ;;
                    -e|--export-name) cmd+=(-e "${args[i+1]}"); i=$((i + 1)) ;;
                    --description|--queue-size) i=$((i + 1)) ;;
                    -v|--verbose) ;;
                    *) die "start_server: the nbdkit stand-in does not know option '${args[i]}'" ;;
                esac
            done
            [[ $ro -eq 1 ]] && cmd+=(-r)
            if [[ -n "$file" ]]; then
                if [[ ! -e "$file" && -n "$size" ]]; then truncate -s "$size" "$file" || die "truncate $file"; fi
                cmd+=(file "$file")
            else
                cmd+=(memory "${size:-524288}")
            fi
            ;;
        *) die "unknown INTEROP_SERVER=$INTEROP_SERVER (virtnbd|nbdkit)" ;;
    esac

    SERVER_CMD=$(_quote "${cmd[@]}")
    log "starting server: $SERVER_CMD"
    "${cmd[@]}" >"$SERVER_OUT" 2>"$SERVER_ERR" </dev/null &
    SERVER_PID=$!
    _ALL_PIDS+=("$SERVER_PID")

    # Wait until it answers.
    local deadline=$((SECONDS + START_TIMEOUT)) ready=0
    while ((SECONDS < deadline)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local rc=0
            wait "$SERVER_PID" || rc=$?
            die "server exited (status $rc) before answering" "command: $SERVER_CMD" "stdout:" "$(_tail_of "$SERVER_OUT")" "stderr:" "$(_tail_of "$SERVER_ERR")"
        fi
        if [[ -n "$SOCK" && ! -S "$SOCK" ]]; then sleep 0.05; continue; fi
        if [[ "$INTEROP_SERVER" == virtnbd && ! -s "$SERVER_OUT" ]]; then sleep 0.05; continue; fi
        # START_WAIT=printed: the printed URI is enough (e.g. TLS servers a plain probe cannot reach).
        if [[ "${START_WAIT:-probe}" == printed && -s "$SERVER_OUT" ]]; then ready=1; break; fi
        if nbdinfo --size "$URI" >/dev/null 2>&1; then ready=1; break; fi
        sleep 0.1
    done
    if [[ $ready -ne 1 ]]; then
        local why=""
        [[ -n "$SOCK" && ! -S "$SOCK" ]] && why=" (no socket $SOCK)"
        [[ "$INTEROP_SERVER" == virtnbd && ! -s "$SERVER_OUT" ]] && why+=" (printed no URI on stdout)"
        die "server did not answer on $URI within ${START_TIMEOUT}s$why" "command: $SERVER_CMD" "stdout:" "$(_tail_of "$SERVER_OUT")" "stderr:" "$(_tail_of "$SERVER_ERR")"
    fi
    PRINTED_URI=$(head -n 1 "$SERVER_OUT" 2>/dev/null || true)
    log "server pid $SERVER_PID ready at $URI${PRINTED_URI:+ (printed: $PRINTED_URI)}"
}

# start_qsd SOCKET IMAGE [NUM-QUEUES]: qemu-storage-daemon exporting IMAGE as vhost-user-blk on
# SOCKET (a stale socket file is removed first); waits for the socket. Sets QSD_PID; the log is
# appended to $T/qsd.log. kill_qsd: SIGKILL (the socket file stays); stop_qsd: SIGTERM, socket removed.
start_qsd() {
    QSD_SOCK=$1
    rm -f "$QSD_SOCK"
    qemu-storage-daemon --blockdev driver=file,node-name=disk,filename="$2",discard=unmap \
        --export type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path="$QSD_SOCK",writable=on,num-queues="${3:-1}" \
        >>"$T/qsd.log" 2>&1 &
    QSD_PID=$!; _ALL_PIDS+=("$QSD_PID")
    local _i
    for _i in $(seq 200); do [[ -S "$QSD_SOCK" ]] && return 0; sleep 0.05; done
    die "qemu-storage-daemon did not create $QSD_SOCK" "$(cat "$T/qsd.log")"
}
kill_qsd() { kill -KILL "$QSD_PID" 2>/dev/null; wait "$QSD_PID" 2>/dev/null; _forget_pid "$QSD_PID"; }
stop_qsd() { kill "$QSD_PID" 2>/dev/null; wait "$QSD_PID" 2>/dev/null; _forget_pid "$QSD_PID"; rm -f "$QSD_SOCK"; }

# expect_log COUNT REGEX DESCRIPTION: passes once the server's log has COUNT lines matching the
# extended REGEX (waiting up to 20 s), else fails with the log's tail.
expect_log() {
    local _i
    for _i in $(seq 400); do
        if [[ $(grep -cE -- "$2" "$SERVER_ERR") -ge $1 ]]; then pass "$3"; return 0; fi
        sleep 0.05
    done
    fail "$3" "no $1 line(s) matching /$2/ in the server log; its tail:" "$(tail -5 "$SERVER_ERR")"
    return 1
}

# start_plain ARGS...: start virtnbd with exactly these arguments (no probe: a refused or idle
# client is what some tests want) and wait for its printed URI. Sets SERVER_PID, SERVER_OUT, SERVER_ERR.
start_plain() {
    _SERVER_SEQ=$((_SERVER_SEQ + 1))
    SERVER_OUT="$T/server.$_SERVER_SEQ.out"; SERVER_ERR="$T/server.$_SERVER_SEQ.err"
    log "starting server: $(_quote "$VIRTNBD" "$@")"
    "$VIRTNBD" "$@" >"$SERVER_OUT" 2>"$SERVER_ERR" </dev/null &
    SERVER_PID=$!
    _ALL_PIDS+=("$SERVER_PID")
    local deadline=$((SECONDS + START_TIMEOUT))
    while [[ ! -s "$SERVER_OUT" ]] && ((SECONDS < deadline)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "server exited before printing its URI" "$(_tail_of "$SERVER_ERR")"
        sleep 0.05
    done
    [[ -s "$SERVER_OUT" ]] || die "server printed no URI within ${START_TIMEOUT}s" "$(_tail_of "$SERVER_ERR")"
}

# stop_server [PID] [SIGNAL]: send SIGNAL (default TERM) to the server and
# check that it exits with status 0 within STOP_TIMEOUT.
stop_server() {
    local pid=${1:-$SERVER_PID} sig=${2:-TERM}
    signal_server "$pid" "$sig" || return 1
    wait_server_exit "$pid" "SIG$sig"
}

# signal_server PID SIGNAL: send it; fails (and reports) if the server is gone.
signal_server() {
    local pid=$1 sig=$2
    if ! kill -0 "$pid" 2>/dev/null; then
        local rc=0
        wait "$pid" 2>/dev/null || rc=$?
        fail "server (pid $pid) still running before SIG$sig" "it had already exited with status $rc" "stderr:" "$(_tail_of "$SERVER_ERR")"
        _forget_pid "$pid"
        return 1
    fi
    kill -"$sig" "$pid"
}

# wait_server_exit PID WHAT: the server must exit with status 0 within
# STOP_TIMEOUT seconds (WHAT names the event, for the messages).
wait_server_exit() {
    local pid=$1 what=$2
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        _forget_pid "$pid"
        fail "server exits within ${STOP_TIMEOUT}s of $what" "it was still running; killed with SIGKILL" "stderr:" "$(_tail_of "$SERVER_ERR")"
        return 1
    fi
    local rc=0
    wait "$pid" || rc=$?
    _forget_pid "$pid"
    if [[ $rc -eq 0 ]]; then
        pass "server exits with status 0 after $what"
    else
        fail "server exits with status 0 after $what" "expected: 0" "got:      $rc" "stderr:" "$(_tail_of "$SERVER_ERR")"
        return 1
    fi
}

_forget_pid() {
    local p keep=()
    for p in "${_ALL_PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    _ALL_PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- end

# finish: print the summary and exit (non-zero on any failure, or when nothing
# was checked).
finish() {
    _FINISHED=1
    local rc=0
    if ((_FAILED > 0 || _PASSED == 0)); then rc=1; fi
    printf '%s: %d passed, %d failed, %d skipped\n' "$TEST_NAME" "$_PASSED" "$_FAILED" "$_SKIPPED"
    exit $rc
}

_cleanup() {
    local rc=$?
    local p
    for p in "${_ALL_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null && { sleep 0.2; kill -KILL "$p" 2>/dev/null; }
        wait "$p" 2>/dev/null
    done
    if [[ $_FINISHED -eq 0 ]]; then
        printf '%s: %d passed, %d failed (aborted with status %d)\n' "$TEST_NAME" "$_PASSED" "$((_FAILED > 0 ? _FAILED : 1))" "$rc"
        rc=1
    fi
    if [[ $rc -ne 0 ]]; then
        local f
        for f in "$T"/server.*.err; do
            [[ -s "$f" ]] || continue
            echo "# --- $(basename "$f") (last 30 lines) ---"
            tail -n 30 "$f" | sed 's/^/#   /'
        done
    fi
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then
        echo "# temp dir kept: $T"
    else
        rm -rf "$T"
    fi
    exit $rc
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need_cmd nbdinfo
log "test $TEST_NAME, server: $INTEROP_SERVER${INTEROP_SERVER:+$([[ $INTEROP_SERVER == virtnbd ]] && echo " ($VIRTNBD)")}, tmp: $T"
