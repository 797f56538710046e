#!/usr/bin/env bash
# virtnbd's own client: `virtnbd copy` round trips 64 MiB (checksums), crossed with nbdcopy both
# ways; `virtnbd info` against nbdinfo --json, against nbdkit, with --list; error cases.
. "$(dirname "$0")/lib.sh"
need_cmd nbdcopy nbdinfo nbdkit sha256sum

# The client is always virtnbd's, whatever INTEROP_SERVER says.
[[ -x "$VIRTNBD" ]] || die "virtnbd binary not found: $VIRTNBD"
vn() { "$VIRTNBD" "$@"; }

# json_field FILE KEY: one key of the first export of nbdinfo-style JSON.
json_field() {
    /usr/bin/python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["exports"][0]; v=e.get(sys.argv[2], "<missing>"); print(json.dumps(v) if isinstance(v, (bool, list)) else v)' "$1" "$2" 2>&1
}

size=$((64 * 1024 * 1024))
head -c "$size" /dev/urandom >"$T/src.img" || die "cannot make random data"
src_sum=$(sha256_of "$T/src.img")

start_server --size 64M -e disk --description "tool test"

# ------------------------------------------------------------ copy round trips
expect_ok "virtnbd copy file -> export (64 MiB)" vn copy "$T/src.img" "$URI"
expect_ok "virtnbd copy export -> file (64 MiB)" vn copy "$URI" "$T/back.img"
check_eq "sha256 after the virtnbd copy round trip" "$src_sum" "$(sha256_of "$T/back.img" 2>&1)"
check_eq "the copied file has the export's size" "$size" "$(stat -c %s "$T/back.img" 2>&1)"
check_eq "no progress bar on stderr when it is not a terminal" "" "$(vn copy "$URI" "$T/quiet.img" 2>&1 >/dev/null)"
rm -f "$T/back.img" "$T/quiet.img"

expect_ok "nbdcopy export -> file reads what virtnbd copy wrote" nbdcopy "$URI" "$T/nbdcopy-back.img"
check_eq "sha256 via nbdcopy" "$src_sum" "$(sha256_of "$T/nbdcopy-back.img" 2>&1)"
rm -f "$T/nbdcopy-back.img"

# New data in with nbdcopy, out with virtnbd copy (1 request in flight, 64 KiB requests, then defaults).
head -c "$size" /dev/urandom >"$T/src2.img"
src2_sum=$(sha256_of "$T/src2.img")
expect_ok "nbdcopy file -> export" nbdcopy "$T/src2.img" "$URI"
expect_ok "virtnbd copy export -> file, --requests 1 --request-size 64K" vn copy --requests 1 --request-size 64K "$URI" "$T/b1.img"
check_eq "sha256 of what nbdcopy wrote, read by virtnbd copy (1 in flight)" "$src2_sum" "$(sha256_of "$T/b1.img" 2>&1)"
expect_ok "virtnbd copy export -> stdout" bash -c "'$VIRTNBD' copy '$URI' - >'$T/b2.img'"
check_eq "sha256 of export -> stdout" "$src2_sum" "$(sha256_of "$T/b2.img" 2>&1)"
rm -f "$T/b1.img" "$T/b2.img" "$T/src2.img"

# Half zeroes through stdin: the zero half goes as WRITE_ZEROES, the copy must still be exact.
head -c $((size / 2)) /dev/zero >"$T/mixed.img"
head -c $((size / 2)) "$T/src.img" >>"$T/mixed.img"
expect_ok "virtnbd copy stdin -> export (half zeroes)" bash -c "'$VIRTNBD' copy - '$URI' <'$T/mixed.img'"
expect_ok "nbdcopy export -> file" nbdcopy "$URI" "$T/mixed-back.img"
check_eq "sha256 of the half-zero image" "$(sha256_of "$T/mixed.img")" "$(sha256_of "$T/mixed-back.img" 2>&1)"
# Reading it back with virtnbd copy exercises OFFSET_HOLE chunks for the zeroed half.
expect_ok "virtnbd copy export -> file (half zeroes)" vn copy "$URI" "$T/mixed-vn.img"
check_eq "sha256 of the half-zero image read by virtnbd copy" "$(sha256_of "$T/mixed.img")" "$(sha256_of "$T/mixed-vn.img" 2>&1)"
alloc=$(( $(stat -c '%b * %B' "$T/mixed-vn.img") ))
if (( alloc <= size / 2 + 1048576 )); then pass "the zero half stays a hole in the output file ($alloc bytes allocated)"
else fail "the zero half stays a hole in the output file" "allocated: $alloc bytes of $size"; fi
rm -f "$T/mixed.img" "$T/mixed-back.img" "$T/mixed-vn.img"

# Alternating 4 KiB zero and data blocks: nbdcopy writes the zero blocks as holes, so one 64 KiB
# READ comes back as interleaved OFFSET_DATA and OFFSET_HOLE chunks that the client assembles.
/usr/bin/python3 -c 'import os,sys; f=open(sys.argv[1],"wb"); [f.write(bytes(4096) if i % 3 == 0 else os.urandom(4096)) for i in range(4096)]' "$T/alt.img"
expect_ok "nbdcopy alternating zero/data blocks -> export" nbdcopy "$T/alt.img" "$URI"
expect_ok "virtnbd copy export -> file in 64 KiB requests (data and hole chunks mixed)" vn copy --request-size 64K "$URI" "$T/alt-back.img"
check_eq "the first 16 MiB match the alternating image" "$(sha256_of "$T/alt.img")" "$(head -c $((16 * 1024 * 1024)) "$T/alt-back.img" | sha256sum | cut -d' ' -f1)"
rm -f "$T/alt.img" "$T/alt-back.img"

# A short file writes only its own length.
printf 'hello' >"$T/small.img"
expect_ok "virtnbd copy of a 5-byte file" vn copy "$T/small.img" "$URI"
check_eq "its bytes are at offset 0" "hello" "$(nbdcopy "$URI" - 2>/dev/null | head -c 5)"

# ------------------------------------------------------------ info vs nbdinfo
expect_ok "virtnbd info --json" vn info --json "$URI"
cp "$LAST_OUT" "$T/vn.json"
nbdinfo --json "$URI" >"$T/nbdinfo.json" 2>&1 || fail "nbdinfo --json" "$(cat "$T/nbdinfo.json")"
for k in export-name export-size is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_df can_multi_conn can_cache is_rotational contexts; do
    check_eq "virtnbd info --json $k matches nbdinfo" "$(json_field "$T/nbdinfo.json" "$k")" "$(json_field "$T/vn.json" "$k")"
done
check_eq "virtnbd info --json description" "tool test" "$(json_field "$T/vn.json" description)"
check_eq "virtnbd info --json block_size_maximum (virtnbd's maximum payload)" "67108864" "$(json_field "$T/vn.json" block_size_maximum)"

expect_ok "virtnbd info (text)" vn info "$URI"
check_match "text: export-size line" $'export-size: 67108864 \\(64M\\)' "$(cat "$LAST_OUT")"
check_match "text: decoded flags" "transmission-flags: 0x[0-9a-f]+ \(has-flags [^)]*flush fua[^)]*\)" "$(cat "$LAST_OUT")"
check_match "text: block sizes" $'block_size_minimum: [0-9]+\n\tblock_size_preferred: [0-9]+\n\tblock_size_maximum: [0-9]+' "$(cat "$LAST_OUT")"
check_match "text: base:allocation context" $'contexts:\n\t\tbase:allocation' "$(cat "$LAST_OUT")"

expect_ok "virtnbd info --list" vn info --list "$URI"
check_match "--list shows the export and its description" $'export="disk":\n\tdescription: tool test' "$(cat "$LAST_OUT")"

# A read-only server.
ro_uri=$URI
start_server --size 1M -r
expect_ok "virtnbd info on a read-only export" vn info --json "$URI"
check_eq "is_read_only" "true" "$(json_field "$LAST_OUT" is_read_only)"
expect_fail "virtnbd copy into a read-only export fails" "read-only" vn copy "$T/small.img" "$URI"

# ------------------------------------------------------------ info against nbdkit
ksock="$T/nbdkit.sock"
nbdkit -f -U "$ksock" memory 16M >"$T/nbdkit.out" 2>&1 </dev/null &
kpid=$!
_ALL_PIDS+=("$kpid")
for _ in $(seq 100); do [[ -S "$ksock" ]] && break; sleep 0.05; done
kuri="nbd+unix:///?socket=$ksock"
expect_ok "virtnbd info --json against nbdkit memory 16M" vn info --json "$kuri"
cp "$LAST_OUT" "$T/vk.json"
nbdinfo --json "$kuri" >"$T/nk.json" 2>&1
for k in export-size is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_df can_multi_conn can_cache contexts; do
    check_eq "nbdkit: virtnbd info $k matches nbdinfo" "$(json_field "$T/nk.json" "$k")" "$(json_field "$T/vk.json" "$k")"
done
head -c $((16 * 1024 * 1024)) "$T/src.img" >"$T/k.img"
expect_ok "virtnbd copy file -> nbdkit" vn copy "$T/k.img" "$kuri"
expect_ok "virtnbd copy nbdkit -> file" vn copy "$kuri" "$T/k-back.img"
check_eq "sha256 through nbdkit" "$(sha256_of "$T/k.img")" "$(sha256_of "$T/k-back.img" 2>&1)"
kill "$kpid" 2>/dev/null; wait "$kpid" 2>/dev/null; _forget_pid "$kpid"

# ------------------------------------------------------------ errors
expect_fail "bad URI: unknown scheme" "scheme \"http\" is not supported" vn info "http://example/"
expect_fail "bad URI: nbd+unix without socket" "needs the socket path" vn info "nbd+unix:///"
expect_fail "bad URI: port out of range" "not a port number" vn info "nbd://127.0.0.1:99999/"
expect_fail "no server on the socket" "cannot connect to Unix socket .*is an NBD server running" vn info "nbd+unix:///?socket=$T/nothing.sock"
expect_fail "no server on the TCP port" "cannot connect to 127.0.0.1:" vn copy "nbd://127.0.0.1:$(free_tcp_port)/" "$T/x.img"
expect_fail "unknown export (info)" "no export named \"nosuch\".*virtnbd info --list" vn info "nbd+unix:///nosuch?socket=${ro_uri#*socket=}"
expect_fail "unknown export (copy)" "no export named \"nosuch\"" vn copy "nbd+unix:///nosuch?socket=${ro_uri#*socket=}" "$T/x.img"
expect_fail "copy with two local files" "neither SRC nor DST is an NBD URI" vn copy "$T/small.img" "$T/x.img"
expect_fail "copy from a missing file" "cannot open .*missing.img" vn copy "$T/missing.img" "$ro_uri"
expect_fail "copy of a file larger than the export" "the export only 67108864 bytes" bash -c "head -c $((size + 1)) /dev/zero >'$T/big.img' && '$VIRTNBD' copy '$T/big.img' '$ro_uri'"
expect_fail "nbds:// is refused with a clear message" "does not speak TLS" vn info "nbds://127.0.0.1/"

# ------------------------------------------------------------ the default subcommand still serves
expect_ok "virtnbd --size 1M still serves (default subcommand, via --run)" \
    "$VIRTNBD" --size 1M --run "'$VIRTNBD' info --json \"\$uri\""
check_eq "export-size through --run and virtnbd info" "1048576" "$(grep -o '"export-size": [0-9]*' "$LAST_OUT" | grep -o '[0-9]*$')"
expect_ok "virtnbd serve --size 2M still serves (explicit subcommand)" \
    "$VIRTNBD" serve --size 2M --run "'$VIRTNBD' info --json \"\$uri\""
check_eq "export-size through serve --run and virtnbd info" "2097152" "$(grep -o '"export-size": [0-9]*' "$LAST_OUT" | grep -o '[0-9]*$')"

stop_server
finish
