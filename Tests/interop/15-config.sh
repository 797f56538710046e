#!/usr/bin/env bash
# --config: several exports (RAM, file, read-only file) and listeners from one YAML file;
# nbdinfo --list shows them; a bad config names the file, line and fix and does not start.
. "$(dirname "$0")/lib.sh"
need_cmd nbdinfo qemu-io

head -c 4M /dev/urandom >"$T/golden.img"
cp "$T/golden.img" "$T/golden.orig"
port=$(free_tcp_port)
cat >"$T/virtnbd.yaml" <<YAML
listen:
  - 127.0.0.1:$port
  - $T/nbd.sock
limits:
  max-connections: 16
exports:
  - name: scratch
    description: "RAM scratch"
    device: ram
    size: 16M
  - name: images
    description: "image store"
    device: file
    path: images.img
    size: 8M
  - name: golden
    description: "read-only base"
    device: file
    path: golden.img
    read-only: true
YAML
"$VIRTNBD" --config "$T/virtnbd.yaml" >"$T/out" 2>"$T/err" &
pid=$!; _ALL_PIDS+=("$pid")
for _ in $(seq 100); do [[ -s "$T/out" && -S "$T/nbd.sock" ]] && break; sleep 0.1; done
list=$(nbdinfo --list --json "nbd://127.0.0.1:$port" 2>&1 | /usr/bin/python3 -c '
import json,sys
d=json.load(sys.stdin)
print(" ".join("%s=%s(%d)" % (e["export-name"], e.get("description",""), e["export-size"]) for e in d["exports"]))' 2>&1)
check_eq "nbdinfo --list shows the three exports with descriptions and sizes" \
    "scratch=RAM scratch(16777216) images=image store(8388608) golden=read-only base(4194304)" "$list"
expect_ok "scratch over TCP: write and verify" qemu-io -f raw -c "write -P 7 1000 5000" -c "read -P 7 1000 5000" "nbd://127.0.0.1:$port/scratch"
expect_ok "images over the Unix listener: write and verify" qemu-io -f raw -c "write -P 9 4095 3" -c "read -P 9 4095 3" "nbd+unix:///images?socket=$T/nbd.sock"
expect_fail "golden is read-only" 'read-only|Read-only|not permitted|Permission denied' qemu-io -f raw -c "write 0 512" "nbd://127.0.0.1:$port/golden"
check_eq "golden reads its file" "$(sha256_of "$T/golden.orig")" "$(nbdcopy "nbd://127.0.0.1:$port/golden" - | sha256sum | cut -d' ' -f1)"
expect_fail "an unknown export name is refused" 'unknown|not found|No such|does not exist|ERR_UNKNOWN|server' nbdinfo --size "nbd://127.0.0.1:$port/nope"
kill -TERM "$pid"; rc=0; wait "$pid" || rc=$?
check_eq "SIGTERM: exit status 0" 0 "$rc"
check_eq "images.img was created beside the config and holds the write" "090909" "$(dd if="$T/images.img" bs=1 skip=4095 count=3 status=none | od -An -tx1 | tr -d ' \n')"
if cmp "$T/golden.img" "$T/golden.orig" >/dev/null; then pass "golden.img unchanged"; else fail "golden.img unchanged"; fi

# Flags override the file: -p replaces the listeners.
port2=$(free_tcp_port)
"$VIRTNBD" --config "$T/virtnbd.yaml" -p "$port2" >"$T/out2" 2>"$T/err2" &
pid=$!; _ALL_PIDS+=("$pid")
for _ in $(seq 100); do [[ -s "$T/out2" ]] && break; sleep 0.1; done
check_eq "-p overrides the file's listeners" 16777216 "$(nbdinfo --size "nbd://127.0.0.1:$port2/scratch" 2>&1)"
kill -TERM "$pid"; wait "$pid"

# A bad config: the error names file, line, key and fix; the server does not start.
printf 'exports:\n  - name: a\n    device: ram\n    size: 64Q\n' >"$T/bad.yaml"
rc=0; "$VIRTNBD" --config "$T/bad.yaml" >"$T/bad.out" 2>&1 || rc=$?
check_eq "a bad config exits 1" 1 "$rc"
check_match "the error names file:line, the key and the fix" 'bad\.yaml:4: exports\[0\]\.size: "64Q" is not a size' "$(cat "$T/bad.out")"
printf 'exports:\n  - name: a\n    device: ram\n    szie: 1M\n' >"$T/typo.yaml"
check_match "an unknown key gets a did-you-mean hint" 'typo\.yaml:4.*size' "$("$VIRTNBD" --config "$T/typo.yaml" 2>&1)"
finish
