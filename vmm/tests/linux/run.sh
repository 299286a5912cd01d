#!/usr/bin/env bash
# Boots Debian's stock Linux kernel in our vmm, twice, with a vhost-user-blk disk:
# the first boot writes a file, the second reads it back.
#
# KVM on these machines is nested and emulates guest ring 0, so Linux cannot boot
# on it directly (docs: shared/design/ENVIRONMENT.md). The vmm therefore runs inside
# an outer guest ("L1"): QEMU TCG with nested SVM, Debian's kernel with kvm-amd
# (vgif=0), qemu-storage-daemon exporting L1's /dev/vda (this run's disk.raw) as
# vhost-user-blk. See outer-init.sh and inner-init.sh beside this file.
#
#   bash vmm/tests/linux/run.sh
#
# Ends with "N passed, M failed"; exit status 0 only when every check passed,
# 1 when a check failed, 2 when L1 itself hung or died twice (infrastructure).
#
# Environment (all optional):
#   ATOLL_CACHE       downloads and extracted packages  [/var/tmp/atoll-linux-cache]
#   ATOLL_LINUX_WORK  this run's files and logs           [a new /tmp/atoll-linux.XXXXXX]
#   VMM_BIN           the vmm binary [target/x86_64-unknown-linux-gnu/vmm-release/vmm,
#                     (re)built by cargo when unset]
#   L1_TIMEOUT        seconds for one outer QEMU run     [480]
#   L1_SILENCE        seconds without L1 output = hang   [90]
#   INNER_TIMEOUT     seconds for one inner VM, in L1    [150]
#   INNER_CMDLINE_EXTRA  more inner kernel parameters    []
#   INNER_ACPI        "acpi" in the inner VMs' config    [true]
#   BENCH_BOOTS       after the checks, N timed 1-vCPU boots per VMM   [0]
#   BENCH_VMMS        which VMMs those are [atoll firecracker cloud-hypervisor qemu]
#                     (qemu = the QEMU above with -M microvm; the others
#                     only when PEERS_DIR has their binaries)
#   PEERS_DIR         firecracker and cloud-hypervisor binaries built from
#                     their public sources, for the benchmark  [/var/tmp/peers/bin]
#   INNER_QUIET_BOOTS which inner boots get "quiet"      ["2": boot 1 logs
#                     everything for diagnosis, boot 2 is timed without the
#                     cost of a serial console byte per VM exit]
#   INNER_EXTRA_DIR   a directory copied to the inner guest's /extra; its
#                     run.sh (if any) runs before the disk test (debugging)
#   SHMEM_THP         L1's transparent_hugepage/shmem_enabled  [advise]
#                     ("" leaves the kernel default, never)
#   VMM_LOG_LEVEL     --log-level of the vmm             [info]
#   VERBOSE=1         stream the whole L1 console (default: only ATOLL- lines)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
CACHE=${ATOLL_CACHE:-/var/tmp/atoll-linux-cache}
VMM_BIN_SET=${VMM_BIN:+1}
VMM_BIN=${VMM_BIN:-$REPO/target/x86_64-unknown-linux-gnu/vmm-release/vmm}
BENCH_BOOTS=${BENCH_BOOTS:-0}
# Each benchmark round (up to four VMMs) takes about a minute of L1 time.
L1_TIMEOUT=${L1_TIMEOUT:-$((480 + BENCH_BOOTS * 90))}
L1_SILENCE=${L1_SILENCE:-90}
L1_MEMORY_MIB=${L1_MEMORY_MIB:-2048}
INNER_TIMEOUT=${INNER_TIMEOUT:-150}
INNER_CMDLINE_EXTRA=${INNER_CMDLINE_EXTRA:-}
INNER_ACPI=${INNER_ACPI:-true}
INNER_QUIET_BOOTS=${INNER_QUIET_BOOTS-2}
INNER_EXTRA_DIR=${INNER_EXTRA_DIR:-}
BENCH_VMMS=${BENCH_VMMS:-atoll firecracker cloud-hypervisor qemu}
PEERS_DIR=${PEERS_DIR:-/var/tmp/peers/bin}
SHMEM_THP=${SHMEM_THP-advise}
VMM_LOG_LEVEL=${VMM_LOG_LEVEL:-info}
VERBOSE=${VERBOSE:-0}
VCPUS=2
MEMORY_MIB=512
CHECKS=(boot1-userspace boot1-nic boot1-nic-services boot1-nic-ipv6 boot1-nic-dns6 boot1-nic-multiqueue boot1-file-written boot1-exit-reset
        boot2-userspace boot2-nic boot2-read-back boot2-paused boot2-power-button
        boot2-disk-after-resume boot2-nic-after-resume boot2-nic-netd-restart
        boot2-nic-services-after-netd-restart boot2-exit-poweroff
        disk-has-text)

export DEBIAN_FRONTEND=noninteractive LC_ALL=C
T_SCRIPT=${EPOCHREALTIME/./}
say() { echo "[linux] $*"; }
die() { say "ERROR: $*"; echo "0 passed, 1 failed"; exit 2; }

((EUID == 0)) || die "run as root (apt-get, and mknod for the initramfs consoles)"
mkdir -p "$CACHE/debs"
WORK=${ATOLL_LINUX_WORK:-$(mktemp -d /tmp/atoll-linux.XXXXXX)}
mkdir -p "$WORK"
say "work dir $WORK, cache $CACHE"

# ---------------------------------------------------------------- packages
apt_updated=0
apt_update() {
  if ((apt_updated == 0)); then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}
apt_install() { # command package
  command -v "$1" > /dev/null && return
  apt_update
  say "apt-get install $2"
  apt-get install -y -qq --no-install-recommends "$2" > /dev/null
}
deb_file() { ls "$CACHE"/debs/"$1"_*.deb 2> /dev/null | head -n 1; }
deb_fetch() { # packages...: into $CACHE/debs unless there
  local want=() p
  for p in "$@"; do [[ -n $(deb_file "$p") ]] || want+=("$p"); done
  ((${#want[@]})) || return 0
  say "apt-get download ${want[*]}"
  if ! (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "${want[@]}" > /dev/null); then
    apt_update
    (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "${want[@]}" > /dev/null)
  fi
}

# One preparer at a time per cache.
exec 9> "$CACHE/.lock"
flock 9

apt_install xz xz-utils
apt_install mke2fs e2fsprogs
apt_install debugfs e2fsprogs

# busybox (static) for both initramfs images; its cpio builds them.
BB=$CACHE/busybox/bin/busybox
if [[ ! -x $BB ]]; then
  deb_fetch busybox-static
  rm -rf "$CACHE/busybox.tmp"
  dpkg-deb -x "$(deb_file busybox-static)" "$CACHE/busybox.tmp"
  rm -rf "$CACHE/busybox"
  mv "$CACHE/busybox.tmp" "$CACHE/busybox"
fi

# The Debian kernel: the package linux-image-amd64 depends on (the ABI name moves).
kpkg() { apt-cache depends linux-image-amd64 2> /dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(kpkg)
if [[ -z $KPKG ]]; then
  apt_update
  KPKG=$(kpkg)
fi
if [[ -z $KPKG ]]; then # no package lists at all: use what the cache has
  KPKG=$(basename "$(ls -d "$CACHE"/kernel/linux-image-* 2> /dev/null | tail -n 1)")
  [[ -n $KPKG ]] || die "cannot resolve the kernel package linux-image-amd64 depends on"
fi
KDIR=$CACHE/kernel/$KPKG
# .done-2: the module set grew (ACPI button, input, network drivers).
if [[ ! -e $KDIR/.done-2 ]]; then
  deb_fetch "$KPKG"
  say "extracting $KPKG"
  rm -rf "$KDIR"
  mkdir -p "$KDIR"
  dpkg-deb --fsys-tarfile "$(deb_file "$KPKG")" |
    tar -x -C "$KDIR" --wildcards './boot/*' \
      ./lib/modules/'*'/kernel/{arch,crypto,lib,virt,fs,net/core,drivers/virtio,drivers/block,drivers/crypto,drivers/acpi,drivers/input,drivers/net}/'*'
  mv "$KDIR"/boot/vmlinuz-* "$KDIR/vmlinuz"
  mv "$KDIR"/boot/config-* "$KDIR/config"
  mv "$KDIR"/lib/modules/*/kernel "$KDIR/modules"
  rm -rf "$KDIR/boot" "$KDIR/lib"
  # The uncompressed PVH vmlinux: the bzImage payload is one XZ stream.
  for off in $(grep -obUaP '\xfd7zXZ\x00' "$KDIR/vmlinuz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$KDIR/vmlinuz" | xz -dc --single-stream > "$KDIR/vmlinux" 2> /dev/null || true
    [[ $(head -c 4 "$KDIR/vmlinux" | od -An -c | tr -d ' ') == 177ELF ]] && break
  done
  [[ $(head -c 4 "$KDIR/vmlinux" | od -An -c | tr -d ' ') == 177ELF ]] ||
    die "no XZ-compressed ELF found in $KDIR/vmlinuz"
  touch "$KDIR/.done-2"
fi
if ! grep -q '^CONFIG_PVH=y' "$KDIR/config"; then
  say "WARNING: $KPKG has no CONFIG_PVH; the vmm boots its vmlinux as plain ELF"
fi

# QEMU: the system's, or Debian's packages unpacked into the cache (installing
# qemu-system-x86 would replace the machine's newer qemu-utils).
QEMU=$(command -v qemu-system-x86_64 || true)
QEMU_ARGS=()
if [[ -z $QEMU ]]; then
  QROOT=$CACHE/qemu
  if [[ ! -e $QROOT/.done ]]; then
    apt_update
    mapfile -t qpkgs < <(apt-get install -s --no-install-recommends qemu-system-x86 |
      awk '/^Inst / && $3 !~ /^\[/ {print $2}')
    qpkgs+=(qemu-system-x86 qemu-system-data seabios)
    mapfile -t qpkgs < <(printf '%s\n' "${qpkgs[@]}" | sort -u)
    deb_fetch "${qpkgs[@]}"
    say "unpacking QEMU into $QROOT"
    rm -rf "$QROOT"
    mkdir -p "$QROOT"
    for p in "${qpkgs[@]}"; do dpkg-deb -x "$(deb_file "$p")" "$QROOT"; done
    touch "$QROOT/.done"
  fi
  QEMU=$QROOT/usr/bin/qemu-system-x86_64
  export LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  QEMU_ARGS+=(-L "$QROOT/usr/share/qemu" -L "$QROOT/usr/share/seabios")
  if ldd "$QEMU" | grep -q 'not found'; then
    ldd "$QEMU" | grep 'not found'
    die "QEMU unpacked into $QROOT misses libraries (remove $QROOT/.done to redo)"
  fi
fi

QSD=$(command -v qemu-storage-daemon || true)
if [[ -z $QSD && -x ${QROOT:-/nonexistent}/usr/bin/qemu-storage-daemon ]]; then
  QSD=$QROOT/usr/bin/qemu-storage-daemon
fi
if [[ -z $QSD ]]; then
  apt_install qemu-storage-daemon qemu-system-common
  QSD=$(command -v qemu-storage-daemon) || die "no qemu-storage-daemon"
fi
flock -u 9

if [[ -z ${VMM_BIN_SET:-} ]]; then
  # As a node ships it: the vmm-release profile (LTO, abort on panic, size
  # optimised), glibc linked statically.
  say "building vmm (cargo build --profile vmm-release -p vmm, static)"
  (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile vmm-release -p vmm --target x86_64-unknown-linux-gnu)
fi
# The NIC's backend in L1: a netd port (netd on a private bus in L1, driven
# with busctl as mgmtd drives it over D-Bus).
NETD_BIN=$REPO/target/release/netd
say "building netd"
(cd "$REPO" && cargo build --release -p netd --bin netd)
say "kernel $KPKG, QEMU $QEMU, vmm $VMM_BIN, qemu-storage-daemon $QSD"

# ---------------------------------------------------------------- images
# mods DEST NAME...: NAME and the modules it depends on (the .ko's modinfo
# "depends="), as DEST/NAME.ko, and DEST/order listing them dependencies first.
declare -A mod_seen
mod_order=()
mod_resolve() {
  local n=$1 p d
  [[ -n ${mod_seen[$n]:-} ]] && return
  mod_seen[$n]=1
  p=$(find "$KDIR/modules" \( -name "$n.ko" -o -name "${n//_/-}.ko" \) | head -n 1)
  [[ -n $p ]] || die "module $n not found in $KPKG"
  for d in $(tr '\0' '\n' < "$p" | sed -n 's/^depends=//p' | tr ',' ' '); do mod_resolve "$d"; done
  mod_order+=("$n")
  cp "$p" "$MOD_DEST/$n.ko"
}
mods() {
  MOD_DEST=$1
  shift
  mkdir -p "$MOD_DEST"
  mod_seen=()
  mod_order=()
  local n
  for n in "$@"; do mod_resolve "$n"; done
  printf '%s\n' "${mod_order[@]}" > "$MOD_DEST/order"
}
# copy_bin ROOT FILE NAME: FILE as ROOT/bin/NAME (stripped) and the libraries ldd names.
copy_bin() {
  local root=$1 file=$2 name=$3 lib
  mkdir -p "$root/bin" "$root/lib/x86_64-linux-gnu" "$root/lib64"
  cp "$file" "$root/bin/$name"
  strip "$root/bin/$name" 2> /dev/null || true
  for lib in $(ldd "$file" | awk '/=> \// {print $3}'); do
    cp -L "$lib" "$root/lib/x86_64-linux-gnu/"
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
}
mkcpio() { # DIR OUT
  (cd "$1" && find . | "$BB" cpio -o -H newc -R 0:0 2> /dev/null) > "$2"
}

say "building images"
rm -rf "$WORK/inner" "$WORK/outer"
# The inner guest: busybox, /init, virtio-pci + virtio-blk + ext4 (Debian builds them as modules).
mkdir -p "$WORK/inner/bin" "$WORK/inner/dev"
cp "$BB" "$WORK/inner/bin/busybox"
install -m 755 "$HERE/inner-init.sh" "$WORK/inner/init"
mknod -m 600 "$WORK/inner/dev/console" c 5 1
mods "$WORK/inner/modules" virtio_pci virtio_blk crc32c_generic ext4 virtio_net button evdev
[[ -n $INNER_EXTRA_DIR ]] && cp -a "$INNER_EXTRA_DIR" "$WORK/inner/extra"
say "inner modules: $(tr '\n' ' ' < "$WORK/inner/modules/order")"

# The outer guest (L1).
O=$WORK/outer
mkdir -p "$O/bin" "$O/dev" "$O/etc" "$O/inner"
cp "$BB" "$O/bin/busybox"
install -m 755 "$HERE/outer-init.sh" "$O/init"
mknod -m 600 "$O/dev/console" c 5 1
mods "$O/lib/modules" virtio_pci virtio_blk
for m in irqbypass ccp kvm kvm-amd; do
  cp "$(find "$KDIR/modules" -name "$m.ko" | head -n 1)" "$O/lib/modules/$m.ko"
done
copy_bin "$O" "$VMM_BIN" vmm
copy_bin "$O" "$NETD_BIN" netd
copy_bin "$O" "$(command -v dbus-daemon)" dbus-daemon
copy_bin "$O" "$(command -v busctl)" busctl
# busctl's libsystemd-shared lives under .../systemd/ (its RUNPATH).
for lib in $(ldd "$(command -v busctl)" | awk '/=> \/.*systemd/ {print $3}'); do
  mkdir -p "$O$(dirname "$lib")"
  cp -L "$lib" "$O$lib"
done
printf 'root:x:0:0:root:/tmp:/bin/sh\nmessagebus:x:100:100::/tmp:/bin/false\n' > "$O/etc/passwd"
printf 'root:x:0:\nmessagebus:x:100:\n' > "$O/etc/group"
cat > "$O/etc/atoll-bus.conf" << 'EOF'
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=/tmp/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
if ((BENCH_BOOTS > 0)); then
  gcc -O2 -static -o "$O/bin/bootstamp" "$HERE/bootstamp.c"
  for v in firecracker cloud-hypervisor; do
    [[ " $BENCH_VMMS " == *" $v "* && -x $PEERS_DIR/$v ]] && copy_bin "$O" "$PEERS_DIR/$v" "$v"
  done
  if [[ " $BENCH_VMMS " == *" qemu "* ]]; then
    copy_bin "$O" "$QEMU" qemu-system-x86_64
    mkdir -p "$O/usr/share/qemu"
    cp "$(dirname "$QEMU")/../share/qemu/bios-microvm.bin" "$O/usr/share/qemu/" 2> /dev/null ||
      cp /usr/share/qemu/bios-microvm.bin "$O/usr/share/qemu/"
  fi
fi
copy_bin "$O" "$QSD" qemu-storage-daemon
cp "$KDIR/vmlinux" "$O/inner/vmlinux"
mkcpio "$WORK/inner" "$O/inner/initrd.cpio"
TEXT="atoll-linux-$(date +%s)-$RANDOM"
cat > "$O/etc/atoll-test.conf" << EOF
TEXT='$TEXT'
VCPUS=$VCPUS
MEMORY_MIB=$MEMORY_MIB
INNER_TIMEOUT=$INNER_TIMEOUT
INNER_CMDLINE_EXTRA='$INNER_CMDLINE_EXTRA'
INNER_ACPI=$INNER_ACPI
BENCH_BOOTS=$BENCH_BOOTS
BENCH_VMMS='$BENCH_VMMS'
INNER_QUIET_BOOTS='$INNER_QUIET_BOOTS'
VMM_LOG_LEVEL='$VMM_LOG_LEVEL'
SHMEM_THP='$SHMEM_THP'
EOF
mkcpio "$O" "$WORK/outer.cpio"
say "outer initramfs $(($(stat -c %s "$WORK/outer.cpio") / 1048576)) MiB, text $TEXT"

# ---------------------------------------------------------------- L1 runs
# stamp T0: each line prefixed with [seconds since T0]; ATOLL- lines (or all,
# with VERBOSE=1) also to fd 3.
stamp() {
  local t0=$1 line now e
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    now=${EPOCHREALTIME/./}
    e=$((now - t0))
    printf -v line '[%4d.%03d] %s' $((e / 1000000)) $((e / 1000 % 1000)) "$line"
    printf '%s\n' "$line"
    if [[ $VERBOSE == 1 || $line == *ATOLL-L1:* || $line == *ATOLL-INNER:* ]]; then
      printf '%s\n' "$line" >&3
    fi
  done
}

QPID=
cleanup() { [[ -n $QPID ]] && kill "$QPID" 2> /dev/null || true; }
trap cleanup EXIT

# run_l1 N: one outer QEMU; console log in $WORK/l1-console-N.log.
# Sets HANG to "" (ended by itself) or the reason it was killed.
run_l1() {
  local n=$1 fifo=$WORK/console.fifo log=$WORK/l1-console-$1.log
  local t0 now last size lastsize=-1 spid
  rm -f "$fifo" "$log"
  mkfifo "$fifo"
  truncate -s 64M "$WORK/disk.raw.tmp"
  rm -f "$WORK/disk.raw"
  mke2fs -q -t ext2 -F -L atoll "$WORK/disk.raw.tmp"
  mv "$WORK/disk.raw.tmp" "$WORK/disk.raw"
  HANG=
  t0=${EPOCHREALTIME/./}
  "$QEMU" "${QEMU_ARGS[@]}" -M q35 -accel tcg -cpu max -m "$L1_MEMORY_MIB" -smp 1 \
    -nographic -no-reboot -nic none \
    -kernel "$KDIR/vmlinuz" -initrd "$WORK/outer.cpio" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive "file=$WORK/disk.raw,if=virtio,format=raw" \
    < /dev/null > "$fifo" 2>&1 &
  QPID=$!
  stamp "$t0" < "$fifo" > "$log" &
  spid=$!
  last=$t0
  while kill -0 "$QPID" 2> /dev/null; do
    sleep 1
    now=${EPOCHREALTIME/./}
    size=$(stat -c %s "$log" 2> /dev/null || echo 0)
    if ((size != lastsize)); then
      lastsize=$size
      last=$now
    fi
    if (((now - t0) / 1000000 > L1_TIMEOUT)); then
      HANG="no end after ${L1_TIMEOUT}s"
    elif (((now - last) / 1000000 > L1_SILENCE)); then
      HANG="no output for ${L1_SILENCE}s"
    fi
    if [[ -n $HANG ]]; then
      kill "$QPID" 2> /dev/null || true
      break
    fi
  done
  wait "$QPID" 2> /dev/null || true
  QPID=
  wait "$spid" 2> /dev/null || true
  rm -f "$fifo"
}

LOG=
for attempt in 1 2; do
  say "L1 run $attempt (timeout ${L1_TIMEOUT}s, silence ${L1_SILENCE}s)"
  run_l1 "$attempt" 3>&1
  LOG=$WORK/l1-console-$attempt.log
  if [[ -z $HANG ]] && grep -q 'ATOLL-L1: DONE' "$LOG"; then
    break
  fi
  why=${HANG:-QEMU ended before L1 said DONE}
  say "L1 run $attempt failed: $why; its last lines:"
  tail -n 40 "$LOG" | sed 's/^/    /'
  if ((attempt == 2)); then
    say "INFRASTRUCTURE FAILURE: the outer QEMU hung or died twice (not a vmm test result); logs in $WORK"
    echo "FAIL infrastructure"
    echo "0 passed, 1 failed"
    exit 2
  fi
done

# ---------------------------------------------------------------- results
passed=0
failed=0
result() { # name ok(0/1) [detail]
  if (($2 == 0)); then
    echo "PASS $1"
    passed=$((passed + 1))
  else
    echo "FAIL $1${3:+: $3}"
    failed=$((failed + 1))
  fi
}
for c in "${CHECKS[@]}"; do
  [[ $c == disk-has-text ]] && continue
  if grep -q "ATOLL-L1: PASS $c\$" "$LOG"; then
    result "$c" 0
  else
    result "$c" 1 "$({ grep -o "ATOLL-L1: FAIL $c.*" "$LOG" || echo "no result line"; } | head -n 1 | sed 's/^ATOLL-L1: FAIL [^ ]* *//')"
  fi
done
# The host reads the disk image itself: the write went through vhost-user to the file.
got=$(debugfs -R 'cat /atoll.txt' "$WORK/disk.raw" 2> /dev/null | tr -d '\r\n' || true)
if [[ $got == "$TEXT" ]]; then result disk-has-text 0; else result disk-has-text 1 "disk.raw has '${got}'"; fi

# Timing, from the host's timestamps of the L1 console lines.
ts() { { grep -m1 -F "$1" "$LOG" || true; } | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p'; }
mode=(none write read)
for n in 1 2; do
  t_start=$(ts "ATOLL-L1: boot$n start")
  t_mark=$(ts "ATOLL-INNER: userspace mode=${mode[n]}")
  t_end=$(ts "ATOLL-L1: boot$n end")
  uptime=$({ grep -m1 -F "ATOLL-INNER: userspace mode=${mode[n]}" "$LOG" || true; } | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')
  # The vmm's boot timer: µs since the vmm started, stamped by the guest itself.
  bt=$(awk -v s="ATOLL-L1: boot$n start" -v e="ATOLL-L1: boot$n end" \
    'index($0, s) {p = 1} index($0, e) {p = 0}
     p && /boot timer stage=85 / {sub(/.*micros=/, ""); printf "%.1f", $0 / 1e6}' "$LOG")
  if [[ -n $t_mark && -n $t_start ]]; then
    echo "timing boot$n: userspace marker ${t_mark}s after QEMU start," \
      "$(awk "BEGIN {printf \"%.1f\", $t_mark - $t_start}")s after vmm start" \
      "(boot timer ${bt:-?}s, guest uptime ${uptime:-?}s);" \
      "vmm ran $(awk "BEGIN {printf \"%.1f\", ${t_end:-0} - $t_start}")s"
  else
    echo "timing boot$n: no userspace marker (vmm started ${t_start:-?}s after QEMU start)"
  fi
done
# Benchmark boots: min / median / max per VMM.
if grep -q "ATOLL-L1: BENCH " "$LOG"; then
  for v in $(sed -n 's/.*ATOLL-L1: BENCH vmm=\([^ ]*\) .*/\1/p' "$LOG" | sort -u); do
    for f in us rss_kib; do
      vals=$(sed -n "s/.*ATOLL-L1: BENCH vmm=$v .* $f=\([0-9]*\).*/\1/p" "$LOG" | sort -n)
      n=$(echo "$vals" | grep -c . || true)
      if ((n > 0)); then
        echo "bench $v $f over $n boots: min $(echo "$vals" | head -n 1)" \
          "median $(echo "$vals" | sed -n "$(((n + 1) / 2))p") max $(echo "$vals" | tail -n 1)"
      fi
    done
    fails=$(grep -c "ATOLL-L1: BENCH vmm=$v .* failed" "$LOG" || true)
    ((fails == 0)) || echo "bench $v: $fails boots failed"
  done
fi
if ((failed > 0)); then
  say "last 60 lines of the L1 console (all of it: $LOG):"
  tail -n 60 "$LOG" | sed 's/^/    /'
fi
say "console log $LOG; total $(((${EPOCHREALTIME/./} - T_SCRIPT) / 1000000))s"
rm -rf "$WORK/outer.cpio" "$WORK/outer" "$WORK/inner"
echo "$passed passed, $failed failed"
((failed == 0))
