#!/usr/bin/env bash
# 39-hostile: the hostile-client suite of issue #31 (Tests/hostile/run, CI scale, about 3 minutes):
# floods, slow and mid-TLS handshakes, absurd option and payload lengths, 10^5 options, stalled big
# writers, block-status amplification, disconnects with replies in flight, a slow reader, SIGTERM
# mid-reply and mid-write, unknown flags and reused cookies. Each case runs against a fresh server
# with a good client attached and asserts its memory bound and that everyone is answered; the table
# (RSS, CPU, the good client's latency) is printed as comments, each case is one pass/fail line.
# INTEROP_SERVER=nbdkit runs it against nbdkit (HOSTILE_SEED=N replays a run's random choices).
. "$(dirname "$0")/lib.sh"
need_cmd openssl

args=(--server "$INTEROP_SERVER" --workdir "$T/hostile" --checks "$T/checks")
[[ -n "${HOSTILE_SEED:-}" ]] && args+=(--seed "$HOSTILE_SEED")
rc=0
VIRTNBD="$VIRTNBD" "$REPO_ROOT/Tests/hostile/run" "${args[@]}" >"$T/hostile.out" 2>&1 || rc=$?
sed 's/^/# /' "$T/hostile.out"
if [[ ! -s "$T/checks" ]]; then
    fail "the hostile suite ran (exit $rc)" "$(tail -n 15 "$T/hostile.out")"
    finish
fi
while IFS= read -r line; do
    case "$line" in
        ok\|*) pass "${line#ok|}" ;;
        skip\|*) skip "${line#skip|}" ;;
        fail\|*)
            line=${line#fail|}
            name=${line%%|*}
            detail=${line#*|}
            fail "$name" "${detail// \/\/ /$'\n'}"
            ;;
    esac
done <"$T/checks"
finish
