#!/usr/bin/env bash
# An operator's first hour (issue #30): each defect found by trying virtnbd as a new user, as a
# regression check that failed on 4b88bbb. Run as an unprivileged user (nobody) when the suite runs
# as root, since that is how an operator meets file permissions.
#   1. -U naming a file or a symlink refuses and keeps it; 2. a live socket is never taken over,
#   a stale one is; 3. a stdout that cannot be written is not a crash; 4. exit statuses of --run
#   under SIGINT/SIGTERM, and of usage errors; 5. the sample configuration starts, and a start
#   that fails removes what it created; 6. a reload that changes a description keeps the RAM
#   disk and its clients; 7. --listen HOST:PORT, repeated; hints for qemu-nbd/nbdkit spellings;
#   8. messages (TLS files, pid file, missing image, unknown export, quiet nbdinfo, absolute URIs).
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io python3 setpriv certtool
[[ "$INTEROP_SERVER" == virtnbd ]] || { skip "37-first-hour tests virtnbd's own command line"; finish; }
[[ -x "$VIRTNBD" ]] || die "virtnbd binary not found: $VIRTNBD"

# The working directory belongs to the user virtnbd runs as.
W="$T/home"; mkdir -p "$W"
# AS_USER execs the command as that user (empty when not root): $! is then virtnbd's own pid.
AS_USER=()
if [[ $(id -u) -eq 0 ]]; then
    chown 65534:65534 "$W"; chmod 755 "$T"
    AS_USER=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
    log "virtnbd runs as uid 65534 (nobody)"
fi
mine() { [[ ${#AS_USER[@]} -eq 0 ]] || chown -R 65534:65534 "$@"; }
cd "$W" || die "cd $W"
# vn OUT ERR ARGS...: virtnbd in the background as the user; sets VPID.
vn() {
    local out=$1 err=$2; shift 2
    "${AS_USER[@]}" "$VIRTNBD" "$@" >"$out" 2>"$err" </dev/null &
    VPID=$!; _ALL_PIDS+=("$VPID")
}
# run_rc VAR ARGS...: virtnbd in the foreground (60 s at most); stdout+stderr in $LAST_OUT.
run_rc() {
    local __v=$1; shift
    _CMD_SEQ=$((_CMD_SEQ + 1)); LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    local __rc=0
    timeout 60 "${AS_USER[@]}" "$VIRTNBD" "$@" >"$LAST_OUT" 2>&1 </dev/null || __rc=$?
    printf -v "$__v" '%s' "$__rc"
}
wait_sock() { local i; for i in $(seq 200); do [[ -S "$1" ]] && nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
stop_vn() { kill -"${2:-TERM}" "$1" 2>/dev/null; local rc=0; wait "$1" || rc=$?; _forget_pid "$1"; return $rc; }
backtrace() { grep -cE 'Fatal error|Stack dump|backtrace|Current stack trace|💣' "$1"; }

# ------------------------------------------------------------ 1. a file or symlink at -U is kept
echo precious >notes.txt; mine notes.txt
run_rc rc --size 1M -U notes.txt
check_eq "-U naming a regular file: exit status" 1 "$rc"
check_eq "... the file is still there with its bytes" precious "$(cat notes.txt 2>&1)"
check_match "... one line says it is a file that virtnbd never replaces" "notes.txt already exists and is a regular file, not a socket; virtnbd never replaces it" "$(cat "$LAST_OUT")"
ln -s notes.txt link.sock
run_rc rc --size 1M -U link.sock
check_eq "-U naming a symlink: exit 1, the link kept" "1 notes.txt" "$rc $(readlink link.sock)"
printf 'listen: [%s]\nexports: [{name: a, device: ram, size: 1M}]\n' "$W/notes.txt" >cfg-file.yaml
run_rc rc --config cfg-file.yaml
check_eq "listen: naming a file in the configuration: exit 1, the file kept" "1 precious" "$rc $(cat notes.txt 2>&1)"

# ------------------------------------------------------------ 2. a live socket is not stolen; a stale one is replaced
vn a.out a.err --size 1M -e first -U live.sock; A=$VPID
wait_sock live.sock || die "the first server did not answer on live.sock" "$(cat a.err)"
run_rc rc --size 2M -U live.sock
check_eq "a second server on a live socket: exit 1" 1 "$rc"
check_match "... it names the other server" "another server is listening on .*live.sock" "$(cat "$LAST_OUT")"
check_eq "... and the first server is still reachable there" 1048576 "$(nbdinfo --size "nbd+unix:///first?socket=$W/live.sock" 2>&1)"
stop_vn "$A" KILL
[[ -S live.sock ]] && pass "a server killed with SIGKILL leaves a stale socket (the test can tell)" || fail "no stale socket left"
vn b.out b.err --size 2M -U live.sock; B=$VPID
if wait_sock live.sock; then
    check_eq "a stale socket is replaced: the new server answers" 2097152 "$(nbdinfo --size "nbd+unix:///?socket=$W/live.sock" 2>&1)"
else
    fail "a stale socket is replaced" "$(cat b.err)"
fi
stop_vn "$B"
[[ -e live.sock ]] && fail "the server's own socket is removed when it stops" || pass "the server's own socket is removed when it stops"

# ------------------------------------------------------------ 3. stdout closed or its reader gone
"${AS_USER[@]}" "$VIRTNBD" --size 1M -U pipe.sock 2>pipe.err </dev/null | true &
P=$!
if wait_sock pipe.sock; then
    check_eq "stdout's reader gone: the server still serves" 1048576 "$(nbdinfo --size "nbd+unix:///?socket=$W/pipe.sock" 2>&1)"
    pkill -TERM -f -- "-U pipe.sock"
    wait "$P"; rc=${PIPESTATUS[0]:-$?}
else
    fail "stdout's reader gone: the server still serves" "$(cat pipe.err)"
fi
check_eq "... no crash report on stderr" 0 "$(backtrace pipe.err)"
check_match "... one warning says the URIs could not be printed" "warning .*cannot print the URIs on stdout \(Broken pipe\)" "$(cat pipe.err)"
"${AS_USER[@]}" bash -c 'exec "$0" --size 1M -U closed.sock >&- 2>closed.err </dev/null' "$VIRTNBD" & P=$!
if wait_sock closed.sock; then
    pass "stdout closed: the server serves"
    kill -TERM "$P"; rc=0; wait "$P" || rc=$?
    check_eq "... and exits 0 on SIGTERM" 0 "$rc"
else
    fail "stdout closed: the server serves" "$(cat closed.err)"
fi
check_eq "... no crash report" 0 "$(backtrace closed.err)"

# ------------------------------------------------------------ 4. exit statuses
tag="first-hour-$$"
# Ctrl-C: the terminal signals the whole foreground process group, virtnbd and its command.
setsid "${AS_USER[@]}" "$VIRTNBD" --size 1M --run "sleep 1000 # $tag-int" >int.out 2>int.err </dev/null &
P=$!
for _ in $(seq 100); do pgrep -f "$tag-int" >/dev/null && break; sleep 0.05; done
sleep 0.3
kill -INT -- "-$P"; rc=0; wait "$P" || rc=$?
check_eq "Ctrl-C during --run (SIGINT to the process group): exit 130, as nbdkit" 130 "$rc"
vn term.out term.err --size 1M --run "sleep 1000; sleep 1001 # $tag-term"; P=$VPID
for _ in $(seq 100); do pgrep -f "$tag-term" >/dev/null && break; sleep 0.05; done
sleep 0.3
rc=0; stop_vn "$P" TERM || rc=$?
check_eq "SIGTERM to virtnbd alone during --run: the command is stopped, exit 128+15" 143 "$rc"
sleep 0.2
check_eq "... and nothing of the command is left running" "" "$(pgrep -f "sleep 100[01]" || true)"
run_rc rc --size 1M --run 'exit 7'
check_eq "--run's own status" 7 "$rc"
run_rc rc bitmap list
check_eq "virtnbd bitmap usage error: exit 1 (as the README says), not 64" 1 "$rc"
check_eq "... in one line" 1 "$(wc -l <"$LAST_OUT")"

# ------------------------------------------------------------ 5. the sample configuration; a failed start leaves nothing
mkdir -p state run; mine state run
port=$(free_tcp_port) || die "no free port"
sed -e "s#/var/lib/virtnbd#$W/state#g" -e "s#/run/virtnbd#$W/run#g" -e "s#127.0.0.1:10809#127.0.0.1:$port#" \
    "$REPO_ROOT/Config/virtnbd.yaml" >sample.yaml
vn sample.out sample.err --config sample.yaml; S=$VPID
for _ in $(seq 200); do [[ -s sample.out ]] && break; kill -0 "$S" 2>/dev/null || break; sleep 0.05; done
got=""
for e in scratch images golden; do got+="$e=$(nbdinfo --size "nbd://127.0.0.1:$port/$e" 2>&1) "; done
check_eq "Config/virtnbd.yaml starts as shipped; every export answers" \
    "scratch=67108864 images=8589934592 golden=1073741824 " "$got"
stop_vn "$S"
rm -rf state; mkdir -p state
echo keep >state/old.img; mine state
cat >fail.yaml <<YAML
listen: [$W/fail.sock]
exports:
  - { name: images, device: file, path: $W/state/images.img, size: 8G, bitmaps: [nightly] }
  - { name: old, device: file, path: $W/state/old.img }
  - { name: golden, device: file, path: $W/state/missing.img, read-only: true }
YAML
run_rc rc --config fail.yaml
check_eq "a configuration whose third export cannot open: exit 1" 1 "$rc"
check_eq "... it removed the image and bitmap file it had created, and kept the file that was there" \
    "old.img" "$(ls state | tr '\n' ' ' | sed 's/ $//')"
check_match "... the message suggests a size to create the missing image" "missing.img: No such file or directory; check the path, or give a size" "$(cat "$LAST_OUT")"

# ------------------------------------------------------------ 6. a reload that changes only the description
cat >reload.yaml <<YAML
listen: [$W/reload.sock]
exports:
  - { name: scratch, description: "before", device: ram, size: 4M }
YAML
vn reload.out reload.err --config reload.yaml; R=$VPID
wait_sock reload.sock || die "reload server did not start" "$(cat reload.err)"
ruri="nbd+unix:///scratch?socket=$W/reload.sock"
expect_ok "a pattern written to the RAM disk" qemu-io -f raw "$ruri" -c 'write -P 0x5a 0 1M'
# A client connected across the reload: writes before, reads after.
cat >held.py <<'PY'
import nbd, sys, os
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\xa5" * 4096, 1 << 20)
open(sys.argv[2], "w").write("connected\n")
while not os.path.exists(sys.argv[3]): __import__("time").sleep(0.05)
ok = h.pread(4096, 1 << 20) == b"\xa5" * 4096 and h.pread(4096, 0) == b"\x5a" * 4096
print("held client still served" if ok else "held client read wrong bytes"); h.shutdown()
PY
/usr/bin/python3 held.py "$ruri" held.ready held.go >held.out 2>&1 & H=$!
for _ in $(seq 100); do [[ -s held.ready ]] && break; sleep 0.05; done
sed -i 's/"before"/"after"/' reload.yaml
kill -HUP "$R"
for _ in $(seq 100); do grep -q "configuration reloaded" reload.err && break; sleep 0.05; done
touch held.go; wait "$H"
check_eq "a client connected across a description-only reload keeps working" "held client still served" "$(cat held.out)"
expect_ok "... and the RAM disk's bytes are still there" qemu-io -f raw "$ruri" -c 'read -P 0x5a 0 1M'
check_match "... the new description is listed" "after" "$(nbdinfo --list "nbd+unix:///?socket=$W/reload.sock" 2>&1)"
check_match "... the log says it was updated in place" 'updated in place "scratch"' "$(cat reload.err)"
sed -i 's/size: 4M/size: 8M/' reload.yaml
kill -HUP "$R"
for _ in $(seq 100); do [[ $(grep -c "configuration reloaded" reload.err) -ge 2 ]] && break; sleep 0.05; done
check_match "a reload that replaces the RAM disk warns that its data is discarded" \
    'warning .*export "scratch" gets a new device \(size 4194304 → 8388608\).*data of its RAM disk \(4194304 bytes\) is discarded' "$(cat reload.err)"
stop_vn "$R"

# ------------------------------------------------------------ 7. flags
p1=$(free_tcp_port); p2=$(free_tcp_port)
vn l.out l.err --size 1M --listen "127.0.0.1:$p1" --listen "127.0.0.1:$p2"; L=$VPID
for _ in $(seq 200); do [[ -s l.out ]] && break; kill -0 "$L" 2>/dev/null || break; sleep 0.05; done
check_eq "--listen HOST:PORT twice: both answer" "1048576 1048576" \
    "$(nbdinfo --size "nbd://127.0.0.1:$p1" 2>&1) $(nbdinfo --size "nbd://127.0.0.1:$p2" 2>&1)"
check_eq "... both URIs printed" "nbd://127.0.0.1:$p1/ nbd://127.0.0.1:$p2/" "$(tr '\n' ' ' <l.out | sed 's/ $//')"
stop_vn "$L"
hint() {   # hint DESCRIPTION REGEX ARGS...
    local d=$1 re=$2; shift 2
    run_rc rc "$@"
    if [[ $rc -eq 1 && $(wc -l <"$LAST_OUT") -eq 1 && "$(cat "$LAST_OUT")" =~ $re ]]; then pass "$d"; else
        fail "$d" "exit $rc, expected 1 and one line matching: $re" "$(cat "$LAST_OUT")"; fi
}
hint "--export → -e/--export-name" "^virtnbd: .*-e/--export-name NAME" --size 1M --export disk
hint "--bind → --listen" "^virtnbd: .*--listen ADDRESS" --size 1M --bind 0.0.0.0
hint "-f raw (qemu-nbd) → drop it" "^virtnbd: .*serves raw images only" -f raw --size 1M
hint "-t (qemu-nbd) → always persistent" "^virtnbd: .*keeps serving after a client leaves" -t --size 1M
hint "--persistent" "^virtnbd: .*keeps serving after a client leaves" --persistent --size 1M
hint "--shared N → --max-connections" "^virtnbd: .*--max-connections N" --shared 4 --size 1M
hint "-x NAME → -e" "^virtnbd: .*-e/--export-name NAME" -x disk --size 1M
hint "-k PATH → -U" "^virtnbd: .*-U/--unix PATH" -k "$W/k.sock" --size 1M
hint "--socket PATH → -U" "^virtnbd: .*-U/--unix PATH" --socket "$W/k.sock" --size 1M
hint "a positional image → --file" "^virtnbd: .*give --file disk.img" disk.img
hint "nbdkit's 'memory 1G' → --size 1G" "^virtnbd: .*--size 1G" memory 1G
hint "an unknown option: one line with the way to help" "^virtnbd: Unknown option '--frobnicate'.*; see 'virtnbd --help'$" --frobnicate
hint "a bad value: one line" "^virtnbd: .*'12Q'.*e.g. 64M$" --size 12Q
run_rc rc --help
check_eq "--help still prints the full usage, exit 0" "0 yes" "$rc $(grep -q -- '--export-name' "$LAST_OUT" && echo yes)"

# ------------------------------------------------------------ 8. messages
hint "a missing --tls-psk file: one line, no Foundation dump, no certificate hint" \
    "^virtnbd: cannot read the PSK key file $W/none.psk: No such file or directory; check --tls-psk, or create it with: psktool" \
    --size 1M --tls on --tls-psk "$W/none.psk"
if grep -qE "NSCocoaErrorDomain|server-cert" "$LAST_OUT"; then fail "... without NSCocoaErrorDomain or certificates" "$(cat "$LAST_OUT")"; else pass "... without NSCocoaErrorDomain or certificates"; fi
pki="$W/pki"; mkdir -p "$pki"
tmpl="$T/cert.info"; printf 'cn = "localhost"\nexpiration_days = 2\ntls_www_server\nsigning_key\nencryption_key\n' >"$tmpl"
certtool --generate-privkey --key-type=ecdsa --outfile "$pki/server-key.pem" >/dev/null 2>&1 &&
    certtool --generate-privkey --key-type=ecdsa --outfile "$T/other-key.pem" >/dev/null 2>&1 &&
    certtool --generate-self-signed --load-privkey "$T/other-key.pem" --template "$tmpl" --outfile "$pki/server-cert.pem" >/dev/null 2>&1 ||
    die "certtool could not make a certificate"
chmod 644 "$pki"/*
hint "a key that does not match the certificate says so" "server-key.pem is not the private key of .*server-cert.pem" \
    --size 1M --tls on --tls-certificates "$pki"
hint "a pid file in a missing directory: refused before serving" "^virtnbd: cannot write the pid file $W/nodir/x.pid: the directory $W/nodir does not exist" \
    --size 1M -U "$W/pid.sock" -P "$W/nodir/x.pid"
hint "a missing read-only --file: no '-r' hint; a size would create it" \
    "cannot open $W/absent.img: No such file or directory; check the path, or give a size" -r --file "$W/absent.img"
if grep -q -- "use -r" "$LAST_OUT"; then fail "... and no -r hint when -r was given" "$(cat "$LAST_OUT")"; else pass "... and no -r hint when -r was given"; fi
vn rel.out rel.err --size 1M -e disk -U rel.sock; X=$VPID
wait_sock rel.sock || die "relative -U server did not start" "$(cat rel.err)"
check_eq "a relative -U prints an absolute URI" "nbd+unix:///disk?socket=$W/rel.sock" "$(cat rel.out)"
nbdinfo "nbd+unix:///disk?socket=$W/rel.sock" >/dev/null 2>&1
nbdinfo --size "nbd+unix:///nosuch?socket=$W/rel.sock" >/dev/null 2>&1
sleep 0.3
check_match "an unknown export name is logged, with the names there are" \
    'the client asked for export "nosuch" \(NBD_OPT_GO\), which does not exist; exports: "disk"' "$(cat rel.err)"
check_eq "a plain nbdinfo run logs no 'closing during handshake' at info" 0 "$(grep -c 'info .*closing during handshake: client sent NBD_OPT_ABORT' rel.err)"
stop_vn "$X"

finish
