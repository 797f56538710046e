#!/bin/bash
# nbdkit-as-virtnbd.sh - a stand-in with virtnbd's CLI, backed by nbdkit. For checking the VM test
# itself against a trusted server: VIRTNBD=Tests/vm/nbdkit-as-virtnbd.sh Tests/vm/kernel-client.sh
# Accepts: -p PORT [--listen ADDR] [-e NAME] [--size SIZE] [--file PATH] [-r] [-v]
# Like virtnbd it prints its URI on stdout when ready, exits 0 on SIGTERM and then logs
# "virtio_discard=<N>" (here: the TRIM requests nbdkit's stats filter counted).
set -euo pipefail
port=10809 addr=127.0.0.1 name="" size=512K file="" ro=() verbose=()
while [ $# -gt 0 ]; do case $1 in
  -p|--port) port=$2; shift 2;;   --listen) addr=$2; shift 2;;
  -e|--export-name) name=$2; shift 2;;  --size) size=$2; shift 2;;
  --file) file=$2; shift 2;;      -r|--readonly) ro=(-r); shift;;
  -v|--verbose) verbose=(-v); shift;;
  *) echo "nbdkit-as-virtnbd: unsupported argument $1" >&2; exit 2;;
esac; done
stats=$(mktemp); trap 'rm -f "$stats"' EXIT
if [ -n "$file" ]; then plugin=(file "file=$file"); else plugin=(memory "size=$size"); fi
nbdkit -f -i "$addr" -p "$port" -e "$name" "${ro[@]}" "${verbose[@]}" --filter=stats \
  "${plugin[@]}" statsfile="$stats" statsappend=false &
pid=$!
stop=0; trap 'stop=1' TERM INT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null && break; sleep 0.1; done
kill -0 $pid 2>/dev/null || exit 1
echo "nbd://$addr:$port/$name"
while [ $stop = 0 ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -TERM $pid 2>/dev/null || true
rc=0; wait $pid || rc=$?
[ "$rc" = 143 ] && rc=0
n=$(sed -n 's/^trim: \([0-9]*\) ops.*/\1/p' "$stats"); echo "nbdkit-as-virtnbd: virtio_discard=${n:-0}" >&2
exit "$rc"
