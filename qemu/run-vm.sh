#!/bin/bash
# Boot one test guest (qemu/build/vmlinuz + initramfs.gz) with its NIC on a vhost-user socket.
# The single source of truth for the QEMU command line: tests/support/guest.py execs this.
# It execs QEMU (the PID you started is QEMU's) and never starts anything else that outlives it.
#
# usage: qemu/run-vm.sh --socket PATH [options] [-- extra qemu args]
#   --socket PATH        vhost-user socket (QEMU is the client; the backend must listen)
#   --user-net           slirp (-netdev user) instead of vhost-user, for a backend-less guest
#   --mac MAC            NIC MAC (default 52:54:00:12:34:56)
#   --mem SIZE           guest RAM, memfd-backed and shared with the backend (default 256M)
#   --smp N              vCPUs (default 1)
#   --queues N           queue pairs: -netdev queues=N, -device mq=on (default 1)
#   --device-opts OPTS   extra virtio-net-pci properties, appended (later ones win),
#                        e.g. csum=off,guest_csum=off,host_tso4=off,...
#   --name NAME          QEMU -name and guest hostname (adds vv.name=NAME)
#   --append ARGS        extra kernel command line (vv.ip=A/P, vv.dhcp=1, vv.cmd=B64, ...)
#   --console WHERE      stdio (default) | unix:PATH (QEMU listens) |
#                        file:PATH or PATH (output only)
#   --accel WHICH        auto (default) | kvm | tcg; auto boots a probe guest once under KVM
#                        and caches the verdict in qemu/build/accel-probe
#   --kernel/--initrd F  override the image (default qemu/build/{vmlinuz,initramfs.gz})
#   --dry-run            print the QEMU argv, one argument per line, and exit
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=${VV_BUILD_DIR:-$here/build}
qemu=${QEMU:-qemu-system-x86_64}

die() { echo "run-vm.sh: $*" >&2; exit 2; }

socket= user_net= mac=52:54:00:12:34:56 mem=256M smp=1 queues=1 device_opts= name=
append= console=stdio accel=${VV_ACCEL:-auto} dry_run=
kernel=$build/vmlinuz initrd=$build/initramfs.gz
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) socket=$2; shift 2 ;;
    --user-net) user_net=1; shift ;;
    --mac) mac=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --device-opts) device_opts=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --append) append=$2; shift 2 ;;
    --console) console=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ -n "$socket" ] || [ -n "$user_net" ] || die "--socket PATH (or --user-net) is required"
[ -f "$kernel" ] && [ -f "$initrd" ] ||
    die "no guest image at $kernel / $initrd: run python3 $here/build_image.py"
[[ "$queues" =~ ^[1-9][0-9]*$ ]] || die "--queues must be a positive integer, got '$queues'"

# Quiet kernel and every boot-time knob that costs TCG time without helping a test guest.
kernel_args="console=ttyS0 quiet mitigations=off cryptomgr.notests random.trust_cpu=on"
kernel_args+=" tsc=reliable no_timer_check audit=0 apparmor=0 security=none 8250.nr_uarts=1"
[ -n "$name" ] && kernel_args+=" vv.name=$name"
[ -n "$append" ] && kernel_args+=" $append"

# KVM is only trusted after a probe guest has booted under it: on some nested hosts
# /dev/kvm opens fine and the guest then dies with "KVM internal error".
probe_kvm() {
    local cache=$build/accel-probe key verdict out
    key="$(uname -r) $("$qemu" --version | head -n1) $(sha256sum < "$kernel" | cut -c1-16)"
    if [ -f "$cache" ] && [ "$(head -n1 "$cache")" = "$key" ]; then
        sed -n 2p "$cache"
        return
    fi
    verdict=tcg
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        # --foreground: stay in our process group, so whoever kills the group kills the probe.
        out=$(timeout --foreground -k 2 10 "$qemu" -accel kvm -cpu host -m 128M -nodefaults \
            -display none -serial stdio -kernel "$kernel" -initrd "$initrd" \
            -append "console=ttyS0 quiet vv.cmd=$(printf 'echo kvm-ok' | base64 -w0)" \
            </dev/null 2>&1 || true)
        case "$out" in *kvm-ok*) verdict=kvm ;; esac
    fi
    printf '%s\n%s\n' "$key" "$verdict" > "$cache.tmp.$$" && mv "$cache.tmp.$$" "$cache"
    echo "$verdict"
}
case "$accel" in
auto) accel=$(probe_kvm) ;;
kvm|tcg) ;;
*) die "--accel must be auto, kvm or tcg, got '$accel'" ;;
esac
if [ "$accel" = kvm ]; then cpu=host; else cpu=qemu64; fi

case "$console" in
stdio) serial=(-chardev stdio,id=con0,signal=off -serial chardev:con0) ;;
file:*) serial=(-serial "file:${console#file:}") ;;
unix:*) serial=(-chardev "socket,id=con0,path=${console#unix:},server=on,wait=off"
                -serial chardev:con0) ;;
"") die "--console must be stdio, file:PATH, unix:PATH or a file path" ;;
*) serial=(-serial "file:$console") ;;
esac

# vectors=0: QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a vhost-user
# virtio-net starts with MSI-X, so the NIC uses INTx. romfile= skips the iPXE option ROM.
nic="virtio-net-pci,netdev=net0,mac=$mac,vectors=0,romfile=,mrg_rxbuf=on"
nic+=",csum=on,guest_csum=on,host_tso4=on,host_tso6=on,guest_tso4=on,guest_tso6=on"
[ "$queues" -gt 1 ] && nic+=",mq=on"
[ -n "$device_opts" ] && nic+=",$device_opts"

if [ -n "$user_net" ]; then
    netdev=(-netdev user,id=net0)
else
    netdev=(-chardev "socket,id=chr0,path=$socket,reconnect=1"
            -netdev "vhost-user,id=net0,chardev=chr0,queues=$queues")
fi

argv=(
    "$qemu"
    -accel "$accel" -cpu "$cpu" -machine pc -smp "$smp" -m "$mem"
    -object "memory-backend-memfd,id=mem0,size=$mem,share=on" -numa node,memdev=mem0
    -nodefaults -display none -no-user-config
    "${serial[@]}"
    "${netdev[@]}"
    -device "$nic"
    -kernel "$kernel" -initrd "$initrd" -append "$kernel_args"
)
[ -n "$name" ] && argv+=(-name "$name")
argv+=("$@")
if [ -n "$dry_run" ]; then
    printf '%s\n' "${argv[@]}"
    exit 0
fi
exec "${argv[@]}"
