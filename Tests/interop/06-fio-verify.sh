#!/usr/bin/env bash
# fio --ioengine=nbd over TCP: two concurrent connections doing random writes
# with crc32c verification (iodepth 32 and 16), a re-verification on a new
# connection (verify_only), and a negative control that must fail.
. "$(dirname "$0")/lib.sh"
need_cmd fio qemu-io

start_server --tcp --size 64M
cd "$T" || die "cd $T"

cat >"$T/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$URI
verify=crc32c
verify_fatal=1
randrepeat=1

[small4k]
rw=randwrite
bs=4k
iodepth=32
offset=0
size=16M

[mixed]
rw=randwrite
bsrange=512-128k
blockalign=512
iodepth=16
offset=32M
size=16M
JOB

# check_fio DESC LOGFILE RC: exit status 0, every job err= 0, and every job
# read back (verified) as many blocks as it wrote.
check_fio() {
    local desc=$1 logf=$2 rc=$3
    local errs jobs bad
    errs=$(grep -oE 'err= *[0-9]+' "$logf" | tr -d ' ' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
    jobs=$(grep -cE '^[a-z0-9]+: \(groupid=' "$logf")
    bad=$(grep -E 'err= *[0-9]+' "$logf" | grep -vcE 'err= *0[^0-9]')
    if [[ $rc -eq 0 && $jobs -eq 2 && $bad -eq 0 ]]; then
        pass "$desc: fio exit 0, 2 jobs, all err= 0"
    else
        fail "$desc: fio exit 0, 2 jobs, all err= 0" "got exit $rc, $jobs job reports, err fields: $errs" "$(grep -E 'verify|err=|fio:' "$logf" | head -n 10)"
    fi
    local line r w
    while read -r line; do
        r=${line#*total=}; r=${r%%,*}
        w=${line#*total=*,}; w=${w%%,*}
        if [[ "$r" -gt 0 && "$r" == "$w" ]]; then
            pass "$desc: verified all $w written blocks ($line)"
        else
            fail "$desc: every written block read back for verification" "issued: $line"
        fi
    done < <(grep -oE 'issued rwts: total=[0-9]+,[0-9]+' "$logf")
}

rc=0; fio "$T/verify.fio" >"$T/fio1.log" 2>&1 || rc=$?
check_fio "randwrite + verify" "$T/fio1.log" "$rc"

# Same workload, verify only, on fresh connections: the data persisted.
rc=0; fio --verify_only "$T/verify.fio" >"$T/fio2.log" 2>&1 || rc=$?
check_fio "verify_only on new connections" "$T/fio2.log" "$rc"

# Negative control: clobber 4 KiB inside the first job's area; verify must fail.
expect_ok "qemu-io overwrites 4 KiB at 1 MiB with zeroes" qemu-io -f raw -c "write -P 0 1M 4k" "$URI"
rc=0; fio --verify_only --section=small4k "$T/verify.fio" >"$T/fio3.log" 2>&1 || rc=$?
if [[ $rc -ne 0 ]] && grep -qE 'verify: bad' "$T/fio3.log" && grep -qE 'err= *[1-9]' "$T/fio3.log"; then
    pass "negative control: fio verify_only detects the clobbered block (exit $rc)"
else
    fail "negative control: fio verify_only detects the clobbered block" "expected non-zero exit, 'verify: bad' and err != 0; got exit $rc" "$(grep -E 'verify|err=' "$T/fio3.log" | head -n 5)"
fi

cd / && stop_server
finish
