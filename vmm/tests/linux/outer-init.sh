#!/bin/busybox sh
# /init of the outer guest (L1: QEMU TCG with nested SVM, Debian's stock kernel).
#
# Loads KVM (kvm-amd vgif=0), exports the disk L1 sees as /dev/vda through
# qemu-storage-daemon as vhost-user-blk, then boots the inner Linux twice with
# our vmm (write mode, then read mode) and prints one "ATOLL-L1: PASS name" or
# "ATOLL-L1: FAIL name" line per check, then "ATOLL-L1: DONE" and powers off.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox --install -s /bin
export PATH=/bin
export HOME=/tmp
. /etc/atoll-test.conf

say() { echo "ATOLL-L1: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
pass() { say "PASS $1"; }
failc() { say "FAIL $1${2:+ ($2)}"; }
check() { # name, then a command: PASS when it succeeds
  name=$1
  shift
  if "$@"; then pass "$name"; else failc "$name"; fi
}
finish() {
  [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && sleep 1
  sync
  say "DONE uptime=$(up)"
  poweroff -f
  sleep 30
}

say "init uptime=$(up)"

for m in irqbypass ccp kvm; do
  insmod /lib/modules/$m.ko || say "WARN insmod $m failed"
done
insmod /lib/modules/kvm-amd.ko vgif=0 || say "WARN insmod kvm-amd failed"
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || say "WARN insmod $m failed"
done
if [ ! -c /dev/kvm ]; then
  say "INFRA no /dev/kvm in L1"
  dmesg | tail -n 20
  failc l1-kvm
  finish
fi
say "kvm ready uptime=$(up)"
# Node setting, as an Atoll node sets it: guest RAM is a memfd (shmem), which
# gets transparent huge pages only when shmem_enabled allows them.
if [ -n "$SHMEM_THP" ]; then
  echo "$SHMEM_THP" > /sys/kernel/mm/transparent_hugepage/shmem_enabled || say "WARN cannot set shmem_enabled"
fi

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  if [ "$i" -gt 100 ]; then
    say "INFRA no /dev/vda in L1"
    failc l1-disk
    finish
  fi
  sleep 0.1
done

qemu-storage-daemon \
  --blockdev driver=host_device,node-name=file0,filename=/dev/vda \
  --blockdev driver=raw,node-name=disk0,file=file0 \
  --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on \
  > /tmp/qsd.log 2>&1 &
qsd_pid=$!
i=0
while [ ! -S /tmp/qsd.sock ]; do
  i=$((i + 1))
  if [ "$i" -gt 300 ] || ! kill -0 "$qsd_pid" 2>/dev/null; then
    say "INFRA qemu-storage-daemon did not start:"
    cat /tmp/qsd.log
    qsd_pid=
    failc l1-qsd
    finish
  fi
  sleep 0.1
done
say "qsd ready uptime=$(up) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null) shmem_thp=$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null)"

# netd on a private bus: one flat network with subnet 192.0.2.0/24, gateway
# 192.0.2.2 (answered by the switch: ARP, ping, the metadata service).
net_call() { busctl --address=unix:path=/tmp/bus --timeout=10 call org.atoll.Net1 "$@"; }
dbus-daemon --config-file=/etc/atoll-bus.conf --nofork --nopidfile > /tmp/bus.log 2>&1 &
i=0
while [ ! -S /tmp/bus ] && [ "$i" -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
# start_netd: starts netd (again: its configuration comes back from
# /tmp/netd-data) and waits until it owns its name.
start_netd() {
  netd --node-id l1 --bus unix:path=/tmp/bus --run-dir /tmp/netd --data-dir /tmp/netd-data >> /tmp/netd.log 2>&1 &
  echo $! > /tmp/netd.pid
  i=0
  until busctl --address=unix:path=/tmp/bus --timeout=2 call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus NameHasOwner s org.atoll.Net1 2> /dev/null | grep -q true; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then
      say "INFRA netd did not start: $(cat /tmp/bus.log /tmp/netd.log | tail -n 5)"
      break
    fi
    sleep 0.1
  done
}
start_netd
NET=$(net_call /org/atoll/Net1 org.atoll.Net1 CreateNetwork 'ssa{sv}' l1 flat 0 | awk -F'"' '{print $2}')
net_call /org/atoll/Net1 org.atoll.Net1 CreateSubnet 'osa{sv}' "$NET" 192.0.2.0/24 2 gateway s 192.0.2.2 \
  ipv6 s fd00:a7::/64 > /dev/null ||
  say "INFRA no subnet: $(tail -n 5 /tmp/netd.log)"
say "netd ready network=$NET uptime=$(up)"

# press N: waits (up to 15 s) for the VM's NIC to be back on the restarted
# netd, pauses and resumes the VM, then presses its power button through the
# vmm's control socket (what `vmm daemon` does for Shutdown).
press() {
  i=0
  until grep -q "vhost-user backend back" /tmp/vmm$1.log; do
    i=$((i + 1))
    [ "$i" -gt 150 ] && { say "boot$1: the NIC did not come back"; break; }
    sleep 0.1
  done
  # Pause (vCPUs parked, backends' rings stopped) and resume first.
  p=$(vmm ctl --state-dir /tmp/vm$1 pause 2>&1)
  r=$(vmm ctl --state-dir /tmp/vm$1 resume 2>&1)
  say "boot$1: pause -> $p; resume -> $r"
  echo "ATOLL-L1: boot$1: pause -> $p; resume -> $r" >> /tmp/boot$1.out
  if vmm ctl --state-dir /tmp/vm$1 shutdown > /tmp/ctl$1.out 2>&1; then
    say "boot$1: pressed the power button"
  else
    say "boot$1: vmm ctl shutdown failed: $(cat /tmp/ctl$1.out)"
  fi
}

# console N EXTRA: copies the vmm's output to our console and /tmp/bootN.out.
# With atoll.end=button in EXTRA, once the guest says it waits for the power
# button: netd is killed (SIGKILL) and started again, and `press` runs; the
# guest checks its NIC again after the button.
console() {
  : > /tmp/boot$1.out
  while IFS= read -r line; do
    echo "$line"
    echo "$line" >> /tmp/boot$1.out
    case "$2:$line" in
      *atoll.end=button*:*"waiting for the power button"*)
        old=$(cat /tmp/netd.pid)
        kill -9 "$old"
        # Gone (or a zombie: its files, the data directory's lock among
        # them, are closed) before the next one starts.
        while [ -e /proc/$old ] && ! grep -q '^State:.*Z' /proc/$old/status 2> /dev/null; do
          sleep 0.05
        done
        start_netd
        say "boot$1: netd restarted"
        press $1 &
        ;;
    esac
  done
}

# boot N MODE [EXTRA]: one inner VM; its console and the vmm's log go to our console.
boot() {
  n=$1
  mode=$2
  extra=${3:-}
  quiet=
  case " $INNER_QUIET_BOOTS " in *" $n "*) quiet=quiet ;; esac
  cat > /tmp/boot$n.json <<EOF
{"name":"linux$n","vcpus":$VCPUS,"memory_mib":$MEMORY_MIB,
 "boot":{"kernel":"/inner/vmlinux","initrd":"/inner/initrd.cpio",
  "cmdline":"console=ttyS0 reboot=k panic=-1 $quiet $INNER_CMDLINE_EXTRA $extra atoll.mode=$mode atoll.text=$TEXT"},
 "acpi":${INNER_ACPI:-true},
 "disks":[{"socket":"/tmp/qsd.sock"}],
 "nets":[{"socket":"/tmp/net$n.sock","mac":"52:54:00:a7:00:0$n","num_queues":4}]}
EOF
  # The NIC's vhost-user-net backend: a netd port on the subnet with the
  # guest's address 192.0.2.1, one per boot; its socket as /tmp/net$n.sock.
  rm -f /tmp/net$n.sock
  port=$(net_call /org/atoll/Net1 org.atoll.Net1 CreatePort 'osa{sv}' "$NET" "52:54:00:a7:00:0$n" 2 \
    ip s 192.0.2.1 name s "linux$n")
  sock=$(echo "$port" | awk -F'"' '{print $4}')
  port_path=$(echo "$port" | awk -F'"' '{print $2}')
  if [ -S "$sock" ]; then ln -s "$sock" /tmp/net$n.sock; else say "INFRA no netd port: $port $(tail -n 3 /tmp/netd.log)"; fi
  say "boot$n start mode=$mode ${quiet:-verbose} uptime=$(up)"
  # A heartbeat, so that the host's no-output watchdog only fires when L1 itself
  # is frozen, not when the inner guest is silent.
  (
    t=0
    while sleep 20; do
      t=$((t + 20))
      say "boot$n still running after ${t}s"
    done
  ) &
  hb=$!
  # The vmm's stdout (guest console + exit line) goes to our console as it
  # comes, and to a file for the checks; its log (stderr) to a file of its
  # own (written into the console stream, its lines cut the guest's), shown
  # when the vmm is done.
  : > /tmp/vmm$n.log
  {
    timeout -s KILL "$INNER_TIMEOUT" vmm run --config /tmp/boot$n.json \
      --state-dir /tmp/vm$n --log-level "$VMM_LOG_LEVEL" 2> /tmp/vmm$n.log
    rc=$?
    if [ "$rc" = 137 ]; then
      say "boot$n vmm killed after ${INNER_TIMEOUT}s"
    else
      say "boot$n vmm exit status $rc"
    fi
  } 2>&1 | console $n "$extra"
  kill "$hb" 2>/dev/null
  cat /tmp/vmm$n.log
  say "boot$n port counters: $(net_call "$port_path" org.freedesktop.DBus.Properties Get ss org.atoll.Net1.Port Counters)"
  net_call /org/atoll/Net1 org.atoll.Net1 DeletePort o "$port_path" > /dev/null
  tr -d '\r' < /tmp/boot$n.out > /tmp/boot$n.txt
  say "boot$n end uptime=$(up)"
  exitline=$(grep '{"exit"' /tmp/boot$n.txt | tail -n 1)
  [ -n "$exitline" ] || say "boot$n: vmm printed no exit line"
  say "boot$n exit: ${exitline:-none}"
}

has() { grep -q "$2" "/tmp/boot$1.txt"; }
exit_reset() { grep '{"exit"' "/tmp/boot$1.txt" | grep -q '"reason":"reset"'; }
nic_twice() { [ "$(grep -c 'ATOLL-INNER: NIC eth0 mac=52:54:00:a7:00:0'"$1"' echo=ok' "/tmp/boot$1.txt")" -ge 2 ]; }
# The guest pinged the gateway and fetched its instance id over TCP from the
# metadata service (checksums left to the device, finished by netd).
nic_services() { grep -q "ATOLL-INNER: NIC eth0 .* ping=ok md=atoll-port-" "/tmp/boot$1.txt"; }
# IPv6: the guest formed its address from the router's advertisement and
# pinged the router there.
nic_ipv6() { grep -q "ATOLL-INNER: NIC eth0 .* ping6=ok" "/tmp/boot$1.txt"; }
# The router answered the guest's DNS query over IPv6 with the address the
# guest formed.
nic_dns6() { grep -q "ATOLL-INNER: NIC eth0 .* dns6=ok" "/tmp/boot$1.txt"; }
# The NIC has two queue pairs (the guest's two CPUs; the vmm answered the
# driver's control command) and every check above ran over them.
nic_multiqueue() { grep -q "ATOLL-INNER: NIC eth0 .* queues=rx-0,rx-1,tx-0,tx-1, " "/tmp/boot$1.txt"; }
exit_poweroff() { grep '{"exit"' "/tmp/boot$1.txt" | grep -q '"reason":"poweroff"'; }

boot 1 write
check boot1-userspace has 1 'ATOLL-INNER: userspace mode=write'
check boot1-nic has 1 'ATOLL-INNER: NIC eth0 mac=52:54:00:a7:00:01 echo=ok'
check boot1-nic-services nic_services 1
check boot1-nic-ipv6 nic_ipv6 1
check boot1-nic-dns6 nic_dns6 1
check boot1-nic-multiqueue nic_multiqueue 1
check boot1-file-written has 1 'ATOLL-INNER: WRITE-OK'
check boot1-exit-reset exit_reset 1

boot 2 read "atoll.end=button"
check boot2-userspace has 2 'ATOLL-INNER: userspace mode=read'
check boot2-nic has 2 'ATOLL-INNER: NIC eth0 mac=52:54:00:a7:00:02 echo=ok'
got=$(sed -n 's/.*ATOLL-INNER: READ=//p' /tmp/boot2.txt | tail -n 1)
if [ "$got" = "$TEXT" ]; then pass boot2-read-back; else failc boot2-read-back "got '$got', want '$TEXT'"; fi
check boot2-paused has 2 'pause -> {"ok":true,"state":"paused"}'
check boot2-power-button has 2 'ATOLL-INNER: power button pressed'
got=$(sed -n 's/.*ATOLL-INNER: READ-AFTER-RESUME=//p' /tmp/boot2.txt | tail -n 1)
if [ "$got" = "$TEXT" ]; then pass boot2-disk-after-resume; else failc boot2-disk-after-resume "got '$got'"; fi
check boot2-nic-after-resume nic_twice 2
# netd was SIGKILLed and started again while the guest waited: its port came
# back from netd's database, the vmm reconnected the NIC, and the guest's
# second round (ARP, ping, metadata over TCP, IPv6, DNS) went through it.
check boot2-nic-netd-restart grep -q 'vhost-user backend back; rings restarted' /tmp/vmm2.log
nic_restarted() { [ "$(grep -c 'ATOLL-INNER: NIC eth0 .* ping=ok md=atoll-port-.* ping6=ok dns6=ok' /tmp/boot2.txt)" -ge 2 ]; }
check boot2-nic-services-after-netd-restart nic_restarted
check boot2-exit-poweroff exit_poweroff 2

# Benchmark boots (BENCH_BOOTS > 0): each VMM of BENCH_VMMS whose binary is here
# boots the same kernel, initramfs and command line with 1 vCPU and MEMORY_MIB,
# no disk, no NIC, serial console only; round robin, BENCH_BOOTS times each.
# bootstamp times the process from its start to the first userspace line and
# sums its own Rss (every mapping smaller than guest RAM) at that moment.
BCMD="console=ttyS0 reboot=k panic=-1 quiet $INNER_CMDLINE_EXTRA atoll.mode=read atoll.text=$TEXT"
MARK='ATOLL-INNER: userspace'
cat > /tmp/bench-atoll.json <<EOF
{"name":"bench","vcpus":1,"memory_mib":$MEMORY_MIB,
 "boot":{"kernel":"/inner/vmlinux","initrd":"/inner/initrd.cpio","cmdline":"$BCMD"}}
EOF
cat > /tmp/bench-fc.json <<EOF
{"boot-source":{"kernel_image_path":"/inner/vmlinux","initrd_path":"/inner/initrd.cpio",
  "boot_args":"$BCMD"},
 "drives":[],
 "machine-config":{"vcpu_count":1,"mem_size_mib":$MEMORY_MIB}}
EOF
bench_one() { # VMM N
  log=/tmp/bench-$1-$2.log
  export BOOTSTAMP_SMAPS=/tmp/bench-$1-$2.smaps
  case "$1" in
    atoll)
      out=$(bootstamp "$MARK" "$MEMORY_MIB" 150 "$log" -- \
        vmm run --config /tmp/bench-atoll.json --log-level warn) ;;
    firecracker)
      out=$(bootstamp "$MARK" "$MEMORY_MIB" 150 "$log" -- \
        firecracker --no-api --config-file /tmp/bench-fc.json --level Warning) ;;
    cloud-hypervisor)
      out=$(bootstamp "$MARK" "$MEMORY_MIB" 150 "$log" -- \
        cloud-hypervisor --kernel /inner/vmlinux --initramfs /inner/initrd.cpio \
        --cmdline "$BCMD" --cpus boot=1 --memory "size=${MEMORY_MIB}M" \
        --serial tty --console off) ;;
    qemu)
      out=$(bootstamp "$MARK" "$MEMORY_MIB" 150 "$log" -- \
        qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m "$MEMORY_MIB" -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio -monitor none \
        -L /usr/share/qemu -kernel /inner/vmlinux -initrd /inner/initrd.cpio \
        -append "$BCMD") ;;
  esac
  case "$out" in
    *us=*)
      say "BENCH vmm=$1 boot=$2 ${out#BOOTSTAMP }"
      if [ "$2" = 1 ]; then
        # Where the VMM's own memory is, largest first (Rss KiB, mapping).
        awk '/^[0-9a-f]+-[0-9a-f]+ / {m = $1 " " $6 " " $2} /^Rss:/ {r = $2}
             /^AnonHugePages:/ && r > 100 {print r, m, "thp=" $2}' "$BOOTSTAMP_SMAPS" |
          sort -rn | head -n 10 |
          while read -r l; do say "BENCH-SMAPS vmm=$1 $l"; done
      fi
      ;;
    *) say "BENCH vmm=$1 boot=$2 failed: $out; log: $(tail -c 600 "$log" | tr '\r\n' '  ')" ;;
  esac
}
vmms=
for v in ${BENCH_VMMS:-atoll firecracker cloud-hypervisor qemu}; do
  case "$v" in
    atoll) bin=vmm ;;
    qemu) bin=qemu-system-x86_64 ;;
    *) bin=$v ;;
  esac
  if command -v "$bin" > /dev/null; then vmms="$vmms $v"; else say "bench: no $bin in L1, skipping $v"; fi
done
i=0
while [ "$i" -lt "${BENCH_BOOTS:-0}" ]; do
  i=$((i + 1))
  for v in $vmms; do bench_one "$v" "$i"; done
done

finish
