#!/bin/sh
# rsttrace rig, stage 2: shipped fresh on the input disk of every run and
# exec'd by /rig-init as PID 1.  Sets up what the tracer and its tests need,
# runs /rig/cmd.sh in /rig/project, packs /rig/result (the exit status and
# the command's output dir) as a tar onto the raw disk /dev/vdc for the host,
# then powers off.  Lines starting with "RSTTRACE-RIG:" are read by the host.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

try_mount() {  # try_mount TYPE DIR [OPTIONS]: mount unless already mounted
    mkdir -p "$2"
    mountpoint -q "$2" && return 0
    mount -t "$1" ${3:+-o "$3"} "$1" "$2" 2>/dev/null ||
        echo "RSTTRACE-RIG: note: could not mount $1 on $2"
}

try_mount proc /proc
try_mount sysfs /sys
try_mount devtmpfs /dev
try_mount devpts /dev/pts
try_mount tmpfs /dev/shm
try_mount tmpfs /run mode=0755
try_mount tmpfs /tmp mode=1777
# tracefs for the format files; debugfs too, because bcc 0.18 (bullseye)
# looks tracepoint ids up under /sys/kernel/debug/tracing and cannot attach
# tracepoints without it.
try_mount tracefs /sys/kernel/tracing
try_mount debugfs /sys/kernel/debug
try_mount bpf /sys/fs/bpf
try_mount cgroup2 /sys/fs/cgroup

ip link set lo up 2>/dev/null || echo "RSTTRACE-RIG: note: could not bring lo up"
hostname rsttrace-rig 2>/dev/null || true
# env.sh (written by the host) exports RSTTRACE_RIG_KERNEL and friends.
# shellcheck disable=SC1091
. /rig/env.sh
export HOME=/root LANG=C.UTF-8 TERM=dumb CI=true RSTTRACE_RIG=1
export RSTTRACE_RIG_PROJECT=/rig/project RSTTRACE_RIG_OUT=/rig/result/out
# rig/run --attach DIR: the host directory, read-only in spirit.
if [ -d /rig/attach ]; then export RSTTRACE_RIG_ATTACH=/rig/attach; fi
mkdir -p "$RSTTRACE_RIG_OUT"

echo "RSTTRACE-RIG: begin $(uname -r) $(/usr/bin/python3 --version 2>&1)"
cd /rig/project || echo "RSTTRACE-RIG: note: no /rig/project"
/bin/sh /rig/cmd.sh </dev/null 2>&1
status=$?
cd /

echo "$status" >/rig/result/status
sync
# A raw disk holding a tar: the host reads it with any tar reader, no mount.
if ! tar -cf /dev/vdc -C /rig/result . 2>/tmp/rig-tar.err; then
    echo "RSTTRACE-RIG: note: could not write the result disk: $(cat /tmp/rig-tar.err)"
fi
sync
echo "RSTTRACE-RIG: status $status"
# Let the serial port drain: the kernel's own "Power Off" line would
# otherwise overtake (or cut off) the status line still in the tty buffer.
sleep 1
echo o >/proc/sysrq-trigger
sleep 30
exit "$status"  # PID 1 exiting panics; panic=-1 -no-reboot then ends qemu
