#!/usr/bin/env bash
# The command line as an operator meets it: flags that equal their default still beat --config;
# --help shows the serve options; captive modes (-s, --run, [ CMD ]) are quiet; -s on a terminal or
# /dev/null is one line and exit 1; an existing image is never resized; --version; exit codes;
# contradictory flags; messages for sizes, bind failures and collisions; `virtnbd info --timeout`;
# every URI on stdout; the default export's name; --max-payload.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo nbdcopy python3
[[ "$INTEROP_SERVER" == virtnbd ]] || { skip "31-cli tests virtnbd's own command line"; finish; }
[[ -x "$VIRTNBD" ]] || die "virtnbd binary not found: $VIRTNBD"
vn() { "$VIRTNBD" "$@"; }

# run_rc VAR CMD...: run CMD with stdout+stderr into $LAST_OUT, its exit status into VAR. A command
# that should have refused to start but serves is stopped after 60 s (status 124, a failure).
run_rc() {
    local __v=$1; shift
    _CMD_SEQ=$((_CMD_SEQ + 1)); LAST_OUT="$T/cmd.$_CMD_SEQ.log"
    local __rc=0
    [[ "$1" == vn ]] && set -- "$VIRTNBD" "${@:2}"
    timeout 60 "$@" >"$LAST_OUT" 2>&1 </dev/null || __rc=$?
    printf -v "$__v" '%s' "$__rc"
}

# ------------------------------------------------------------ 1. a flag equal to its default beats --config
cat >"$T/pub.yaml" <<YAML
listen: [0.0.0.0:10809]
limits: { max-connections: 1, handshake-timeout: 1 }
exports:
  - { name: a, device: ram, size: 1M, queue-size: 64 }
YAML
# Port 10809 of a private network namespace: nothing else on the machine can hold it.
if unshare -n true 2>/dev/null; then
    netns() {   # netns OUT ERR CMD...: CMD in a new network namespace; prints what each address answers
        unshare -n bash -c 'ip link set lo up
            OUT=$1 ERR=$2; shift 2
            "$@" >"$OUT" 2>"$ERR" & p=$!
            for _ in $(seq 100); do [[ -s "$OUT" ]] && break; sleep 0.1; done
            for h in 127.0.0.1 127.0.0.2; do printf "%s=%s " "$h" "$(nbdinfo --size "nbd://$h:10809/a" 2>/dev/null || echo refused)"; done
            kill -TERM "$p"; wait "$p"' netns "$@"
    }
    got=$(netns "$T/ns1.out" "$T/ns1.err" "$VIRTNBD" --config "$T/pub.yaml")
    check_eq "the file's 0.0.0.0:10809 is reachable on every local address (the test can tell)" "127.0.0.1=1048576 127.0.0.2=1048576 " "$got"
    got=$(netns "$T/ns2.out" "$T/ns2.err" "$VIRTNBD" --config "$T/pub.yaml" --listen 127.0.0.1)
    check_eq "--listen 127.0.0.1 (its default) narrows the file's 0.0.0.0 listener" "127.0.0.1=1048576 127.0.0.2=refused " "$got"
    check_eq "... and stdout names 127.0.0.1" "nbd://127.0.0.1:10809/a" "$(cat "$T/ns2.out")"
else
    skip "--listen 127.0.0.1 over a 0.0.0.0 file listener (needs unshare -n)"
fi
sock="$T/d.sock"
start_cfg() {   # start_cfg LOGNAME FLAGS...: the config above on $sock; sets CPID
    "$VIRTNBD" --config "$T/pub.yaml" -U "$sock" "${@:2}" >"$T/$1.out" 2>"$T/$1.err" &
    CPID=$!; _ALL_PIDS+=("$CPID")
    for _ in $(seq 100); do [[ -s "$T/$1.out" ]] && break; sleep 0.1; done
}
stop_cfg() { kill -TERM "$CPID"; wait "$CPID" 2>/dev/null; _forget_pid "$CPID"; }
two_clients='
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
try:
    b = nbd.NBD(); b.connect_uri(sys.argv[1]); print("both"); b.shutdown()
except nbd.Error:
    print("second refused")
a.shutdown()'
start_cfg base
check_eq "the file's max-connections: 1 refuses a second client (the test can tell)" "second refused" \
    "$(/usr/bin/python3 -c "$two_clients" "nbd+unix:///a?socket=$sock" 2>&1)"
check_match "the refusal names the client and the limit" 'refusing a client of Unix socket .*d\.sock: the limit of 1 connection\(s\) \(--max-connections / limits\.max-connections\) is reached' "$(cat "$T/base.err")"
check_match "the file's handshake-timeout: 1 and queue-size: 64 are in effect" 'handshake-timeout 1 s' "$(cat "$T/base.err")"
check_match "... queue-size 64" 'queue-size=64 ' "$(cat "$T/base.err")"
stop_cfg
start_cfg flags --max-connections 1024 --handshake-timeout 10 --queue-size 256
check_eq "--max-connections 1024 (its default) lifts the file's limit of 1" "both" \
    "$(/usr/bin/python3 -c "$two_clients" "nbd+unix:///a?socket=$sock" 2>&1)"
check_match "--handshake-timeout 10 (its default) beats the file's 1" 'limits: max-connections 1024, handshake-timeout 10 s' "$(cat "$T/flags.err")"
check_match "--queue-size 256 (its default) beats the file's 64" 'queue-size=256 ' "$(cat "$T/flags.err")"
stop_cfg

# ------------------------------------------------------------ 2. --help
run_rc rc vn --help
check_eq "--help exits 0" 0 "$rc"
for f in --size --file --listen --tls --config --max-payload; do
    # An option line: "  --size <size>  …" or "  -p, --port <port> …".
    if grep -Eq -- "^  (-[A-Za-z], )?$f( <| |$)" "$LAST_OUT"; then pass "--help lists $f"; else fail "--help lists $f" "$(head -n 20 "$LAST_OUT")"; fi
done
check_match "--help lists the subcommands" $'SUBCOMMANDS:\n  serve .*\n(.*\n)*  info .*\n(.*\n)*  copy ' "$(cat "$LAST_OUT")"

# ------------------------------------------------------------ 3. captive modes are quiet
out=$(timeout 60 nbdinfo --size -- [ "$VIRTNBD" --size 1M ] 2>"$T/q1.err")
check_eq "nbdinfo -- [ virtnbd --size 1M ] works" 1048576 "$out"
check_eq "... and prints nothing on stderr" "" "$(cat "$T/q1.err")"
out=$(timeout 60 "$VIRTNBD" --size 1M --run 'nbdinfo --size "$uri"' 2>"$T/q2.err")
check_eq "--run works" 1048576 "$out"
check_eq "... and prints nothing on stderr" "" "$(cat "$T/q2.err")"
out=$(timeout 60 /usr/bin/python3 -c "
import nbd; h = nbd.NBD(); h.connect_command(['$VIRTNBD', '-s', '--size', '1M']); print(h.get_size()); h.shutdown()" 2>"$T/q3.err")
check_eq "-s under nbdsh's connect_command works" 1048576 "$out"
check_eq "... and prints nothing on stderr" "" "$(cat "$T/q3.err")"
timeout 60 "$VIRTNBD" --size 1M -v --run 'nbdinfo --size "$uri" >/dev/null' 2>"$T/q4.err"
check_match "--run -v logs again (the quiet checks can fail)" 'serving RAM' "$(cat "$T/q4.err")"
truncate -s 1M "$T/q.img"
timeout 60 "$VIRTNBD" --size 4M --file "$T/q.img" --run 'exit 0' 2>"$T/q5.err"
check_match "warnings and errors still reach stderr in captive mode" 'already exists' "$(cat "$T/q5.err")"

# ------------------------------------------------------------ 4. -s with stdin/stdout that are not a pipe or socket
rc=0; "$VIRTNBD" -s --size 1M </dev/null >/dev/null 2>"$T/s1.err" || rc=$?
check_eq "virtnbd -s </dev/null >/dev/null exits 1 (no crash)" 1 "$rc"
check_eq "... with one line" 1 "$(wc -l <"$T/s1.err")"
check_match "... that says what stdin and stdout are" 'stdin and stdout are a character device' "$(cat "$T/s1.err")"
rc=0; true | "$VIRTNBD" -s --size 1M >/dev/null 2>"$T/s2.err" || rc=$?
check_eq "true | virtnbd -s >/dev/null exits 1" 1 "$rc"
check_match "... naming stdout" 'but stdout is a character device' "$(cat "$T/s2.err")"
rc=0; bash -c 'exec env LISTEN_PID=$$ LISTEN_FDS=1 "$0" --size 1M 3</dev/null' "$VIRTNBD" >/dev/null 2>"$T/s3.err" || rc=$?
check_eq "socket activation with fd 3 not a socket exits 1" 1 "$rc"
check_match "... saying what fd 3 is" 'fd 3 is a character device' "$(cat "$T/s3.err")"

# ------------------------------------------------------------ 5. an existing image is never resized
truncate -s 1M "$T/one.img"; truncate -s 8M "$T/eight.img"
run_rc rc vn --file "$T/one.img" --size 4M -U "$T/x.sock"
check_eq "--file (1 MiB) --size 4M exits 1" 1 "$rc"
check_match "... saying so" 'one\.img already exists with 1048576 bytes \(1M\), not the 4M of --size; virtnbd never resizes' "$(cat "$LAST_OUT")"
check_eq "... and the image keeps its size" 1048576 "$(stat -c %s "$T/one.img")"
run_rc rc vn --file "$T/eight.img" --size 4M -U "$T/x.sock"
check_eq "--file (8 MiB) --size 4M exits 1" 1 "$rc"
check_eq "... and the image keeps its size" 8388608 "$(stat -c %s "$T/eight.img")"
check_eq "--size equal to the image's size serves it" 8388608 "$(vn --file "$T/eight.img" --size 8M --run 'nbdinfo --size "$uri"' 2>&1)"
check_eq "a missing file is created with --size" 3145728 "$(vn --file "$T/new.img" --size 3M --run 'nbdinfo --size "$uri"' 2>&1)"
check_eq "... sparse, of that size" 3145728 "$(stat -c %s "$T/new.img")"
printf 'exports:\n  - { name: a, device: file, path: one.img, size: 2M }\n' >"$T/grow.yaml"
run_rc rc vn --config "$T/grow.yaml" -U "$T/x.sock"
check_eq "a config export with another size than its file exits 1" 1 "$rc"
check_match "... naming the key" 'not the 2M of exports\[0\]\.size in .*grow\.yaml' "$(cat "$LAST_OUT")"
check_eq "... and the image keeps its size" 1048576 "$(stat -c %s "$T/one.img")"

# ------------------------------------------------------------ 6. --version
run_rc rc vn --version
check_eq "--version exits 0" 0 "$rc"
cp "$LAST_OUT" "$T/version"
if [[ "$(vn -V 2>&1)" == "$(cat "$T/version")" ]]; then pass "-V prints the same"; else fail "-V prints the same" "$(vn -V 2>&1)"; fi
check_match "--version names virtnbd" '^virtnbd [0-9]+\.[0-9]+' "$(head -n1 "$T/version")"
# The commit line: the tree's HEAD (plus -dirty when tracked files had changes at build time), or
# "unknown" for a binary built outside git. A binary built before the tree's last commit fails here.
if command -v git >/dev/null && head=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null); then
    check_match "--version: commit is the tree's HEAD ($head, -dirty allowed)" "^commit $head(-dirty)?\$" \
        "$(grep '^commit ' "$T/version")"
else
    check_match "--version: a commit line (no git checkout to compare with)" '^commit ([0-9a-f]{7,}(-dirty)?|unknown)$' \
        "$(grep '^commit ' "$T/version")"
fi
swift_bin=$(command -v swift || echo /opt/swift/usr/bin/swift)
if [[ -x "$swift_bin" ]]; then
    sv=$("$swift_bin" --version 2>/dev/null | grep -o 'Swift version [0-9.]*' | grep -o '[0-9.]*$')
    check_match "--version names the Swift compiler ($sv)" "^swift ${sv//./\\.}( |$)" "$(grep '^swift ' "$T/version")"
else
    check_match "--version names the Swift compiler" '^swift [0-9]' "$(cat "$T/version")"
fi
if [[ -f "$REPO_ROOT/Package.resolved" ]]; then
    for pkg in swift-nio swift-nio-ssl swift-argument-parser swift-log yams; do
        want=$(/usr/bin/python3 -c 'import json,sys; print(next(p["state"]["version"] for p in json.load(open(sys.argv[1]))["pins"] if p["identity"] == sys.argv[2]))' "$REPO_ROOT/Package.resolved" "$pkg" 2>&1)
        check_eq "--version: $pkg is Package.resolved's" "$pkg $want" "$(grep "^$pkg " "$T/version")"
    done
else
    skip "no Package.resolved to compare --version with"
fi
hash=$(grep -o 'revision [0-9a-f]*' "$REPO_ROOT/.build/checkouts/swift-nio-ssl/Sources/CNIOBoringSSL/hash.txt" 2>/dev/null | cut -d' ' -f2)
if [[ -n "$hash" ]]; then check_eq "--version: the BoringSSL revision swift-nio-ssl vendors" "boringssl $hash" "$(grep '^boringssl ' "$T/version")"
else skip "no swift-nio-ssl checkout to compare BoringSSL with"; fi

# ------------------------------------------------------------ 7. exit codes
run_rc rc vn --size 1M --run 'kill -KILL $$'
check_eq "--run: a command killed by SIGKILL gives 137 (128+9)" 137 "$rc"
run_rc rc vn --size 1M --run 'kill -TERM $$'
check_eq "--run: a command killed by SIGTERM gives 143" 143 "$rc"
run_rc rc vn --size 1M --run 'exit 3'
check_eq "--run: the command's own status" 3 "$rc"
check_eq "--run: the command gets SIGPIPE's default action (yes | head ends quietly)" "" \
    "$(vn --size 1M --run 'yes | head -c1 >/dev/null' 2>&1)"
for args in "--bogus" "--port 0" "--size" "--ring round"; do
    # shellcheck disable=SC2086
    run_rc rc vn $args
    check_eq "usage error ($args) exits 1, as nbdkit" 1 "$rc"
done

# ------------------------------------------------------------ 8. contradictory flags
run_rc rc vn -U "$T/c.sock" -p 20034 --size 1M
check_eq "-U with -p exits 1" 1 "$rc"
check_match "... saying -p would be ignored" '-U/--unix listens on a Unix socket only, so -p 20034 would be ignored' "$(cat "$LAST_OUT")"
run_rc rc vn -U "$T/c.sock" --listen 127.0.0.1 --size 1M
check_eq "-U with --listen exits 1" 1 "$rc"
run_rc rc vn -s -p 20034 --size 1M
check_eq "-s with -p exits 1" 1 "$rc"
check_match "... saying -s listens nowhere" 'listens nowhere, so it cannot be combined with -p 20034' "$(cat "$LAST_OUT")"
[[ -e "$T/c.sock" ]] && fail "no socket was created by the refused commands" || pass "no socket was created by the refused commands"

# ------------------------------------------------------------ 9. messages
for s in 12Q 0 1.5M -1; do
    run_rc rc vn --size "$s" -U "$T/m.sock"
    check_eq "--size $s exits 1" 1 "$rc"
    check_match "--size $s says what a size is" "invalid for '--size <size>': .*use a whole number with K, M, G or T" "$(cat "$LAST_OUT")"
done
check_match "--size 12Q names the unit" '"Q" is not a unit' "$(vn --size 12Q 2>&1)"
check_match "--size -1 is not 'missing value'" 'cannot be negative' "$(vn --size -1 2>&1)"
check_match "--size 1.5M asks for a whole number" 'whole number' "$(vn --size 1.5M 2>&1)"
check_eq "--size 64MiB is 64 MiB" 67108864 "$(vn --size 64MiB --run 'nbdinfo --size "$uri"' 2>&1)"
check_eq "--size 1GiB is 1 GiB" 1073741824 "$(vn --size 1GiB --run 'nbdinfo --size "$uri"' 2>&1)"

run_rc rc vn --size 1M --listen 192.0.2.1 -p "$(free_tcp_port)"
check_eq "--listen with an address of another host exits 1" 1 "$rc"
check_match "... naming the address, the OS's reason and the fix" 'cannot listen for NBD clients on 192\.0\.2\.1:[0-9]+: Cannot assign requested address; 192\.0\.2\.1 is not an address of this host' "$(cat "$LAST_OUT")"
if grep -q 'bind(descriptor\|errno:\|another server using it' "$LAST_OUT"; then fail "... without NIO's call signature or the wrong hint" "$(cat "$LAST_OUT")"; else pass "... without NIO's call signature or the wrong hint"; fi
busy=$(free_tcp_port)
/usr/bin/python3 -c 'import socket,sys,time; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1]))); s.listen(); print("up",flush=True); time.sleep(300)' "$busy" >"$T/busy.out" 2>&1 &
holder=$!; _ALL_PIDS+=("$holder")
for _ in $(seq 50); do [[ -s "$T/busy.out" ]] && break; sleep 0.1; done
run_rc rc vn --size 1M -p "$busy"
check_eq "a port another process holds exits 1" 1 "$rc"
check_match "... saying another process listens there" "127\.0\.0\.1:$busy: Address already in use; another process is already listening on port $busy" "$(cat "$LAST_OUT")"
kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null; _forget_pid "$holder"

mp=$(free_tcp_port)
run_rc rc vn --size 1M -p "$mp" --metrics "127.0.0.1:$mp"
check_eq "-p N --metrics 127.0.0.1:N exits 1" 1 "$rc"
check_match "... caught up front, naming both" "--metrics: 127\.0\.0\.1:$mp collides with the NBD listener -p/--listen \(127\.0\.0\.1:$mp\)" "$(cat "$LAST_OUT")"
if grep -q 'virtio-blk ready\|cannot listen' "$LAST_OUT"; then fail "... before any device or socket is opened" "$(cat "$LAST_OUT")"; else pass "... before any device or socket is opened"; fi
printf 'listen: [127.0.0.1:%s]\nexports: [{ name: a, device: ram, size: 1M }]\n' "$mp" >"$T/m.yaml"
check_match "with --config the collision names listen[0]" "--metrics: 127\.0\.0\.1:$mp collides with listen\[0\] \(127\.0\.0\.1:$mp\)" "$(vn --config "$T/m.yaml" --metrics "127.0.0.1:$mp" 2>&1)"

run_rc rc vn --size 1M --queue-size 100 -U "$T/m.sock"
check_eq "--queue-size 100 (split ring) exits 1" 1 "$rc"
check_match "... with the rule the README states" 'power of two from 1 to 32768, which a split ring \(the default\) needs; .*--ring packed, which takes any size from 2 to 32768' "$(cat "$LAST_OUT")"
check_eq "--ring packed --queue-size 100 serves" 1048576 "$(vn --size 1M --ring packed --queue-size 100 --run 'nbdinfo --size "$uri"' 2>&1)"
check_match "README states the same rule" 'power of two from 1 to 32768 for split rings, any size from 2 to 32768 for packed' "$(cat "$REPO_ROOT/README.md")"

run_rc rc vn --size 1M --tls-certificates "$T/no-such-pki" -U "$T/m.sock"
check_eq "--tls-certificates DIR without --tls is checked (DIR missing: exit 1)" 1 "$rc"
check_match "... because it turns TLS on" '^virtnbd: cannot load the server certificate from .*no-such-pki/server-cert.pem: No such file or directory' "$(cat "$LAST_OUT")"

printf 'exports: [{ name: ro, device: ram, size: 1M, read-only: true }]\n' >"$T/ro.yaml"
start_server --config "$T/ro.yaml"
printf 'x' >"$T/x.bin"
expect_fail "writing to a read-only config export points at read-only: true" 'read-only: true' vn copy "$T/x.bin" "nbd+unix:///ro?socket=$SOCK"
stop_server

# ------------------------------------------------------------ 10. virtnbd info --timeout against a listener that never greets
mute=$(free_tcp_port)
/usr/bin/python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("up", flush=True)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)' "$mute" >"$T/mute.out" 2>&1 &
mpid=$!; _ALL_PIDS+=("$mpid")
for _ in $(seq 50); do [[ -s "$T/mute.out" ]] && break; sleep 0.1; done
rc=0; timeout 60 "$VIRTNBD" info --timeout 1 "nbd://127.0.0.1:$mute/" >"$T/mute.log" 2>&1 || rc=$?
check_eq "virtnbd info --timeout 1 against a silent listener exits 1 (not killed by timeout 60)" 1 "$rc"
check_eq "... with one line" 1 "$(wc -l <"$T/mute.log")"
check_match "... naming the problem" "127\.0\.0\.1:$mute accepted the connection but did not complete an NBD handshake within 1 s" "$(cat "$T/mute.log")"
rc=0; timeout 60 "$VIRTNBD" copy --timeout 1 "nbd://127.0.0.1:$mute/" "$T/never.img" >"$T/mute2.log" 2>&1 || rc=$?
check_eq "virtnbd copy --timeout 1 too" 1 "$rc"
kill "$mpid"; wait "$mpid" 2>/dev/null; _forget_pid "$mpid"

# ------------------------------------------------------------ 11. every URI on stdout; the default export
port=$(free_tcp_port)
cat >"$T/two.yaml" <<YAML
listen: [127.0.0.1:$port, $T/two.sock]
exports:
  - { name: first, device: ram, size: 1M }
  - { name: second, device: ram, size: 2M }
YAML
"$VIRTNBD" --config "$T/two.yaml" >"$T/two.out" 2>"$T/two.err" &
tpid=$!; _ALL_PIDS+=("$tpid")
for _ in $(seq 100); do [[ $(wc -l <"$T/two.out") -ge 4 ]] && break; sleep 0.1; done
check_eq "stdout: one URI per export and listener, exports in order" \
    "nbd://127.0.0.1:$port/first nbd+unix:///first?socket=$T/two.sock nbd://127.0.0.1:$port/second nbd+unix:///second?socket=$T/two.sock" \
    "$(tr '\n' ' ' <"$T/two.out" | sed 's/ $//')"
while read -r u; do
    check_match "printed URI $u answers" '^(1048576|2097152)$' "$(nbdinfo --size "$u" 2>&1)"
done <"$T/two.out"
check_eq "the empty name reaches the first export" 1048576 "$(nbdinfo --size "nbd://127.0.0.1:$port/" 2>&1)"
check_match "... and the log says it is the default" "as nbd://127\.0\.0\.1:$port/first \(the default export: nbd://127\.0\.0\.1:$port/ reaches it too\)" "$(cat "$T/two.err")"
nb=$(nbdinfo "nbd://127.0.0.1:$port/" 2>&1 | grep -o '^export="[^"]*"')
check_eq "nbdinfo shows the default export's name" 'export="first"' "$nb"
check_eq "virtnbd info shows the same name" "$nb" "$(vn info "nbd://127.0.0.1:$port/" 2>&1 | grep -o '^export="[^"]*"')"
kill -TERM "$tpid"; wait "$tpid" 2>/dev/null; _forget_pid "$tpid"

# ------------------------------------------------------------ 12. --max-payload
bsmax() { nbdinfo --json "$1" 2>&1 | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["block_size_maximum"])' 2>&1; }
start_server --size 1M
check_eq "default maximum payload 64M" 67108864 "$(bsmax "$URI")"
stop_server
start_server --size 1M --max-payload 1M
check_eq "--max-payload 1M reaches NBD_INFO_BLOCK_SIZE" 1048576 "$(bsmax "$URI")"
stop_server
printf 'exports:\n  - { name: a, device: ram, size: 1M, max-payload: 256K }\n  - { name: b, device: ram, size: 1M }\n' >"$T/mp.yaml"
start_server --config "$T/mp.yaml"
check_eq "max-payload: 256K in the file" 262144 "$(bsmax "nbd+unix:///a?socket=$SOCK")"
check_eq "... only for that export" 67108864 "$(bsmax "nbd+unix:///b?socket=$SOCK")"
stop_server
for bad in 1K 2G; do
    run_rc rc vn --size 1M --max-payload "$bad" -U "$T/m.sock"
    check_eq "--max-payload $bad exits 1" 1 "$rc"
    check_match "... saying the range" 'is not from 4K to 1G' "$(cat "$LAST_OUT")"
done
finish
