#!/usr/bin/env bash
# The Debian package (Scripts/package, issue #30): its contents, lintian without errors, dpkg -i
# (the virtnbd user owns /var/lib/virtnbd), the installed binary run as that user with the shipped
# /etc/virtnbd/virtnbd.yaml (only its two listen addresses changed) serving the exports nbdinfo
# sizes, the man pages and the bash completion, then dpkg --purge leaving nothing behind.
# Needs root and dpkg (skipped otherwise). The package's binary is linked with --static-swift-stdlib:
# Scripts/package reuses .build-package/ when an earlier Scripts/package made it (incremental),
# else it builds with --reuse-build over .build/ (the Swift modules are recompiled, about 4 minutes
# on 2 cores, instead of a full build of about 10), and .build/release/virtnbd is then that binary.
# Whatever happens, the exit trap stops the server and purges the package.
. "$(dirname "$0")/lib.sh"

skip_all() {
    skip "$1"
    _FINISHED=1
    printf '%s: %d passed, %d failed, %d skipped\n' "$TEST_NAME" "$_PASSED" "$_FAILED" "$_SKIPPED"
    exit 0
}
[[ "$INTEROP_SERVER" == virtnbd ]] || skip_all "the package holds virtnbd, not the $INTEROP_SERVER stand-in"
[[ $EUID -eq 0 ]] || skip_all "38-package installs a .deb: run it as root"
for c in dpkg dpkg-deb dpkg-query; do command -v "$c" >/dev/null || skip_all "no $c: not a Debian system"; done
need_cmd lintian man setpriv getent gzip readelf ldd
if [[ "$(dpkg-query -W -f='${Status}' virtnbd 2>/dev/null)" == *installed* ]]; then
    die "the virtnbd package is installed already; this test would purge it (dpkg --purge virtnbd first)"
fi
if getent passwd virtnbd >/dev/null || getent group virtnbd >/dev/null || [[ -e /etc/virtnbd || -e /var/lib/virtnbd ]]; then
    die "a virtnbd user or group, /etc/virtnbd or /var/lib/virtnbd exists without the package; not touching them"
fi

# From here on the machine must be put back: stop what runs as virtnbd, purge, remove the run dir.
RUNDIR=""
installed=0
_package_exit() {
    local rc=$? p
    for p in "${_ALL_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    _ALL_PIDS=()
    if [[ $installed -eq 1 ]]; then dpkg --purge virtnbd >"$T/purge-on-exit.log" 2>&1 || cat "$T/purge-on-exit.log"; fi
    [[ -n "$RUNDIR" ]] && rm -rf "$RUNDIR"
    (exit "$rc")
    _cleanup
}
trap _package_exit EXIT

# ------------------------------------------------------------ 1. build the package
t0=$SECONDS
pkg_args=(-o "$T/dist")
[[ -x "$REPO_ROOT/.build-package/release/virtnbd" ]] || pkg_args+=(--reuse-build)
expect_ok "Scripts/package${pkg_args[2]:+ ${pkg_args[2]}} builds the .deb" "$REPO_ROOT/Scripts/package" "${pkg_args[@]}" ||
    die "no package to test"
log "Scripts/package took $((SECONDS - t0)) s: $(tail -n 1 "$LAST_OUT")"
version=$(sed -n 's/^ *static let virtnbd = "\([^"]*\)".*/\1/p' "$REPO_ROOT/Sources/virtnbd/Versions.swift")
deb="$T/dist/virtnbd_${version}_$(dpkg --print-architecture).deb"
[[ -f "$deb" ]] || die "Scripts/package wrote no $deb" "$(ls -l "$T/dist")"
pass "the package is named virtnbd_VERSION_ARCH.deb ($(basename "$deb"))"

# ------------------------------------------------------------ 2. what it holds
dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }' | sed 's#^\([^ ]*\) \([^ ]*\) \./#\1 \2 /#' >"$T/contents"
missing=()
for f in /usr/bin/virtnbd /etc/virtnbd/virtnbd.yaml /usr/share/doc/virtnbd/examples/virtnbd.yaml \
    /usr/lib/systemd/system/virtnbd.service /usr/lib/systemd/system/virtnbd.socket \
    /usr/lib/systemd/system/virtnbd@.service /usr/lib/systemd/system/virtnbd@.socket \
    /usr/share/man/man1/virtnbd.1.gz /usr/share/man/man1/virtnbd.serve.1.gz /usr/share/man/man1/virtnbd.info.1.gz \
    /usr/share/man/man1/virtnbd.copy.1.gz /usr/share/man/man1/virtnbd.bitmap.1.gz \
    /usr/share/man/man5/virtnbd.yaml.5.gz /usr/share/man/man7/virtnbd-security.7.gz \
    /usr/share/bash-completion/completions/virtnbd /usr/share/zsh/vendor-completions/_virtnbd \
    /usr/share/fish/vendor_completions.d/virtnbd.fish \
    /usr/share/doc/virtnbd/copyright /usr/share/doc/virtnbd/changelog.gz \
    /usr/share/lintian/overrides/virtnbd; do
    grep -q " $f\$" "$T/contents" || missing+=("$f")
done
if [[ ${#missing[@]} -eq 0 ]]; then pass "the .deb holds the binary, units, conffile, example, man pages, completions, copyright, changelog"
else fail "the .deb holds every file it should" "missing: ${missing[*]}"; fi
bad_owner=$(awk '$2 != "root/root"' "$T/contents")
check_eq "every file in the .deb is root/root (--root-owner-group)" "" "$bad_owner"
check_eq "conffiles lists /etc/virtnbd/virtnbd.yaml" "/etc/virtnbd/virtnbd.yaml" "$(dpkg-deb -I "$deb" conffiles)"
depends=$(dpkg-deb -f "$deb" Depends)
check_match "Depends names libc6 and adduser, no Swift runtime ($depends)" '^(.*, )?libc6 \(>= [^)]+\).*adduser' "$depends"
if [[ "$depends" == *swift* ]]; then fail "Depends names no Swift package" "$depends"; else pass "Depends names no Swift package"; fi
mkdir -p "$T/x"
dpkg-deb -x "$deb" "$T/x"
check_eq "the packaged virtnbd.service runs /usr/bin/virtnbd as virtnbd:virtnbd" \
    "ExecStart=/usr/bin/virtnbd --config /etc/virtnbd/virtnbd.yaml Group=virtnbd User=virtnbd" \
    "$(grep -E '^(ExecStart|User|Group)=' "$T/x/usr/lib/systemd/system/virtnbd.service" | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//')"
check_eq "no packaged unit mentions /usr/local" "" "$(grep -l /usr/local "$T/x/usr/lib/systemd/system/"* || true)"
check_eq "the conffile is Config/virtnbd.yaml" "$(sha256_of "$REPO_ROOT/Config/virtnbd.yaml")" \
    "$(sha256_of "$T/x/etc/virtnbd/virtnbd.yaml")"
if ldd "$T/x/usr/bin/virtnbd" | grep -qE 'libswift|not found'; then
    fail "the packaged binary needs no Swift runtime library" "$(ldd "$T/x/usr/bin/virtnbd")"
else pass "the packaged binary needs no Swift runtime library (ldd)"; fi
if readelf -S "$T/x/usr/bin/virtnbd" | grep -qE '\.symtab|\.debug_'; then
    fail "the packaged binary is stripped (no .symtab, no .debug_*)" "$(readelf -S "$T/x/usr/bin/virtnbd" | grep -E 'symtab|debug')"
else pass "the packaged binary is stripped (no .symtab, no .debug_*)"; fi

# ------------------------------------------------------------ 3. lintian
t0=$SECONDS
rc=0
lintian --fail-on error --display-info "$deb" >"$T/lintian.log" 2>&1 || rc=$?
if [[ $rc -eq 0 ]] && ! grep -q '^E: ' "$T/lintian.log"; then
    pass "lintian reports no errors ($(grep -c '^W: ' "$T/lintian.log" || true) warnings, $(grep -c '^I: ' "$T/lintian.log" || true) infos, $((SECONDS - t0)) s)"
else
    fail "lintian reports no errors" "exit $rc:" "$(grep -E '^[EW]: ' "$T/lintian.log" | head -n 20)" "$(tail -n 5 "$T/lintian.log")"
fi
grep -E '^[EWI]: ' "$T/lintian.log" | sed 's/^/# lintian: /' | head -n 30

# ------------------------------------------------------------ 4. install
installed=1
expect_ok "dpkg -i installs the package" dpkg -i "$deb" || die "cannot install $deb"
check_eq "dpkg says virtnbd $version is installed" "install ok installed $version" \
    "$(dpkg-query -W -f='${Status} ${Version}' virtnbd)"
dpkg -L virtnbd >"$T/dpkg-L"
check_match "virtnbd is a system user, home /var/lib/virtnbd, no login shell" \
    '^virtnbd:x:[0-9]{1,3}:[0-9]+:[^:]*:/var/lib/virtnbd:/usr/sbin/nologin$' "$(getent passwd virtnbd || echo none)"
check_eq "the virtnbd group exists and is the user's group" "$(getent group virtnbd | cut -d: -f3)" \
    "$(id -g virtnbd 2>/dev/null || echo none)"
check_eq "/var/lib/virtnbd is virtnbd's, mode 750" "virtnbd:virtnbd 750" "$(stat -c '%U:%G %a' /var/lib/virtnbd 2>&1)"
check_eq "/usr/bin/virtnbd --version names version $version" "$version" \
    "$(/usr/bin/virtnbd --version 2>&1 | grep -oE "^virtnbd[^0-9]*$version" | grep -oE "$version$" || true)"

# ------------------------------------------------------------ 5. the shipped configuration, run as virtnbd
RUNDIR=$(mktemp -d /tmp/virtnbd-package.XXXXXX)
chown virtnbd:virtnbd "$RUNDIR"
PORT=$(free_tcp_port)
SOCK_PATH="$RUNDIR/nbd.sock"
sed -e "s#^  - 127\.0\.0\.1:10809\$#  - 127.0.0.1:$PORT#" -e "s#^  - /run/virtnbd/nbd\.sock\$#  - $SOCK_PATH#" \
    /etc/virtnbd/virtnbd.yaml >"$RUNDIR/virtnbd.yaml"
chmod 644 "$RUNDIR/virtnbd.yaml"
check_eq "the configuration differs from /etc/virtnbd/virtnbd.yaml in its two listen lines only" 4 \
    "$(diff /etc/virtnbd/virtnbd.yaml "$RUNDIR/virtnbd.yaml" | grep -c '^[<>]')"
# Started by hand, not with start_plain: a server that does not start is a failed check, and the
# man pages, the completion and the purge are still checked.
_SERVER_SEQ=$((_SERVER_SEQ + 1))
SERVER_OUT="$T/server.$_SERVER_SEQ.out"; SERVER_ERR="$T/server.$_SERVER_SEQ.err"
log "starting server: setpriv --reuid=virtnbd --regid=virtnbd --init-groups -- /usr/bin/virtnbd --config $RUNDIR/virtnbd.yaml"
setpriv --reuid=virtnbd --regid=virtnbd --init-groups -- /usr/bin/virtnbd --config "$RUNDIR/virtnbd.yaml" \
    >"$SERVER_OUT" 2>"$SERVER_ERR" </dev/null &
SERVER_PID=$!
_ALL_PIDS+=("$SERVER_PID")
for _ in $(seq $((START_TIMEOUT * 10))); do
    [[ -s "$SERVER_OUT" ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -s "$SERVER_OUT" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    pass "/usr/bin/virtnbd starts as virtnbd with the shipped configuration (printed $(wc -l <"$SERVER_OUT") URIs)"
    server_up=1
else
    fail "/usr/bin/virtnbd starts as virtnbd with the shipped configuration" "$(tail -n 3 "$SERVER_ERR")"
    server_up=0
fi
if [[ $server_up -eq 1 ]]; then
    check_eq "the server runs as virtnbd" virtnbd "$(ps -o user= -p "$SERVER_PID" | tr -d ' ')"
    for e in scratch:67108864 images:8589934592 golden:1073741824; do
        check_eq "nbdinfo --size of export ${e%%:*} over TCP" "${e#*:}" \
            "$(nbdinfo --size "nbd://127.0.0.1:$PORT/${e%%:*}" 2>&1)"
    done
    check_eq "nbdinfo --size of export scratch over the Unix socket" 67108864 \
        "$(nbdinfo --size "nbd+unix:///scratch?socket=$SOCK_PATH" 2>&1)"
    check_eq "the images and golden files and the Unix socket belong to virtnbd" "virtnbd virtnbd virtnbd" \
        "$(stat -c %U /var/lib/virtnbd/images.img /var/lib/virtnbd/golden.img "$SOCK_PATH" 2>&1 | tr '\n' ' ' | sed 's/ $//')"
    check_match "golden is read-only" 'is_read_only: true' "$(nbdinfo "nbd://127.0.0.1:$PORT/golden" 2>&1)"
    stop_server "$SERVER_PID" TERM
fi

# ------------------------------------------------------------ 6. man pages and completion
# Docker-style images may exclude /usr/share/man from installation (path-exclude in
# /etc/dpkg/dpkg.cfg.d); then the pages are read from the .deb itself (man -l), and that is said.
mandir=/usr/share/man
if grep -rhsE '^path-exclude[= ]+/usr/share/man' /etc/dpkg/dpkg.cfg.d/ >/dev/null && [[ ! -f /usr/share/man/man1/virtnbd.1.gz ]]; then
    skip "man pages are excluded by /etc/dpkg/dpkg.cfg.d (path-exclude); rendering the .deb's copies with man -l"
    mandir="$T/x/usr/share/man"
fi
man_check() {   # man_check DESC REGEX PAGE-ARGS...: renders without warnings and shows REGEX
    local desc=$1 re=$2 out rc=0; shift 2
    if [[ "$mandir" == /usr/share/man ]]; then
        out=$(MANWIDTH=80 man --warnings "$@" 2>"$T/man.err") || rc=$?
    else
        local section=1 name=$1
        [[ $# -eq 2 ]] && { section=$1; name=$2; }
        out=$(MANWIDTH=80 man --warnings -l "$mandir/man$section/$name.$section.gz" 2>"$T/man.err") || rc=$?
    fi
    if [[ $rc -eq 0 && ! -s "$T/man.err" ]] && grep -qE -- "$re" <<<"$out"; then pass "$desc"
    else fail "$desc" "man $* exit $rc; stderr: $(head -n 5 "$T/man.err")" "output has no /$re/ ($(wc -l <<<"$out") lines)"; fi
}
man_check "man virtnbd renders and documents --tls-verify-peer" '--tls-verify-peer' virtnbd
man_check "man virtnbd.bitmap renders the bitmap subcommand (--freeze-as)" '--freeze-as' virtnbd.bitmap
man_check "man 5 virtnbd.yaml renders and documents max-connections" 'max-connections' 5 virtnbd.yaml
man_check "man 7 virtnbd-security renders and names the 0600 control socket" 'mode 0600' 7 virtnbd-security
if command -v bash >/dev/null; then
    expect_ok "the bash completion loads and completes virtnbd" \
        bash -c 'source /usr/share/bash-completion/completions/virtnbd && complete -p virtnbd'
    check_match "complete -p names a completion function" '^complete .*-F [_A-Za-z0-9]+ virtnbd$' "$(cat "$LAST_OUT")"
fi

# ------------------------------------------------------------ 7. purge leaves nothing
expect_ok "dpkg --purge virtnbd" dpkg --purge virtnbd && installed=0
left=()
while IFS= read -r f; do
    [[ -f "$f" || -L "$f" ]] && left+=("$f")
done <"$T/dpkg-L"
check_eq "no file dpkg -L listed is left ($(wc -l <"$T/dpkg-L") paths)" "" "${left[*]}"
check_eq "no /usr/bin/virtnbd, /etc/virtnbd, /var/lib/virtnbd" "" \
    "$(ls -d /usr/bin/virtnbd /etc/virtnbd /var/lib/virtnbd 2>/dev/null || true)"
check_eq "no virtnbd user or group" "" "$(getent passwd virtnbd; getent group virtnbd)"
check_eq "dpkg knows no virtnbd" "" "$(dpkg-query -W -f='${Status}' virtnbd 2>/dev/null || true)"
finish
