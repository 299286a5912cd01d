#!/bin/busybox sh
# /init of the inner guest (Debian's stock kernel booted by our vmm inside L1).
#
# Kernel command line (read from /proc/cmdline):
#   atoll.mode=write  mount /dev/vda, write atoll.text to /atoll.txt, sync, umount
#   atoll.mode=read   mount /dev/vda, print /atoll.txt
#   atoll.end=reboot  (default) `reboot -f`: with `reboot=k` the kernel resets
#                     through the i8042 (0xfe); the VM ends with reason "reset"
#   atoll.end=button  wait for the ACPI power button (the VMM's `shutdown`), then
#                     `poweroff -f`; the VM ends with reason "poweroff"
#
# Every line the harness looks for starts with "ATOLL-INNER:".
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin

# Boot timer (port 0x440 = 1088): the VMM logs the µs since it started.
stamp() { printf "$1" | dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null; }
stamp U

mode=none
text=
end=reboot
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    atoll.mode=*) mode=${arg#atoll.mode=} ;;
    atoll.text=*) text=${arg#atoll.text=} ;;
    atoll.end=*) end=${arg#atoll.end=} ;;
  esac
done

echo "ATOLL-INNER: userspace mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "ATOLL-INNER: net=$(ls /sys/class/net | tr '\n' ' ')"

# The input device the ACPI button driver registered as "Power Button".
power_button() {
  for d in /sys/class/input/event*; do
    [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && echo "/dev/${d##*/}" && return
  done
}

finish() {
  if [ "$end" = button ]; then
    ev=$(power_button)
    if [ -z "$ev" ]; then
      echo "ATOLL-INNER: ERROR no power button input device"
    else
      echo "ATOLL-INNER: waiting for the power button on $ev"
      # One input_event (24 bytes) arrives when the button is pressed.
      dd if="$ev" of=/dev/null bs=24 count=1 2>/dev/null
      echo "ATOLL-INNER: power button pressed"
      # L1 paused and resumed the VM before pressing it: the disk's and the
      # NIC's backends restarted their rings where they stopped.
      mount -t ext2 -o ro /dev/vda /mnt && echo "ATOLL-INNER: READ-AFTER-RESUME=$(cat /mnt/atoll.txt)"
      umount /mnt 2>/dev/null
      nic
      echo "ATOLL-INNER: powering off"
      sync
      poweroff -f
      sleep 5
      echo "ATOLL-INNER: ERROR poweroff -f returned"
    fi
  fi
  stamp E
  echo "ATOLL-INNER: rebooting uptime=$(cut -d' ' -f1 /proc/uptime)"
  sync
  reboot -f
  # Not reached unless the reset failed.
  sleep 5
  echo "ATOLL-INNER: ERROR reboot -f returned"
  while :; do sleep 60; done
}

fail() {
  echo "ATOLL-INNER: ERROR $*"
  dmesg | tail -n 30 | sed 's/^/ATOLL-INNER: dmesg: /'
  finish
}

# Drivers that Debian builds as modules, in dependency order.
for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" || echo "ATOLL-INNER: WARN insmod $m failed"
done
echo "ATOLL-INNER: modules loaded uptime=$(cut -d' ' -f1 /proc/uptime)"

# Debugging hook: the harness copies $INNER_EXTRA_DIR to /extra.
if [ -x /extra/run.sh ]; then
  /extra/run.sh 2>&1 | sed 's/^/ATOLL-INNER: extra: /'
fi

# The NIC (vhost-user-net, a netd port in L1): the first one is up with the
# MAC the VMM gave it, and an ARP request for the gateway it sends is answered.
nic() {
  [ -e /sys/class/net/eth0 ] || { echo "ATOLL-INNER: NIC none ($(ls /sys/class/net | tr '\n' ' '))"; return; }
  mac=$(cat /sys/class/net/eth0/address)
  ip link set eth0 up
  ip addr add 192.0.2.1/24 dev eth0 2>/dev/null
  rx0=$(cat /sys/class/net/eth0/statistics/rx_packets)
  arping -c 1 -w 2 -I eth0 192.0.2.2 > /dev/null 2>&1
  rx=$(cat /sys/class/net/eth0/statistics/rx_packets)
  tx=$(cat /sys/class/net/eth0/statistics/tx_packets)
  echo=missing
  [ "$rx" -gt "$rx0" ] && [ "$tx" -gt 0 ] && echo=ok
  # The gateway (netd's router) answers pings; the metadata service behind
  # it answers over TCP (the guest leaves its checksums to the device).
  ip route add default via 192.0.2.2 dev eth0 2>/dev/null
  ping=missing
  ping -c 2 -W 2 192.0.2.2 > /dev/null 2>&1 && ping=ok
  md=$(timeout 10 wget -O - http://169.254.169.254/latest/meta-data/instance-id 2>/tmp/wget.err)
  [ -n "$md" ] || md=$(tail -n 1 /tmp/wget.err)
  case "$md" in
    atoll-port-*) ;;
    *) echo "ATOLL-INNER: metadata: ${md:-nothing} routes: $(ip route | tr '\n' ';')" ;;
  esac
  # IPv6: the router's advertisement gives the NIC an address in the
  # subnet's fd00:a7::/64 (SLAAC, after duplicate address detection), and
  # the router answers pings there.
  ping6=missing
  for _ in $(seq 50); do
    grep -q '^fd0000a7' /proc/net/if_inet6 && break
    sleep 0.1
  done
  ping6 -c 2 -W 2 fd00:a7::1 > /dev/null 2>&1 && ping6=ok
  [ "$ping6" = ok ] || echo "ATOLL-INNER: ipv6: $(tr '\n' ';' < /proc/net/if_inet6)"
  # The router answers DNS over IPv6 too: the guest's own name (linuxN,
  # N the last byte of its MAC) resolves to the address it formed
  # (compared as 32 hex digits, as /proc/net/if_inet6 lists it).
  dns6=missing
  ns=$(nslookup -type=AAAA "linux$((0x${mac##*:}))" fd00:a7::1 2>&1)
  got=$(echo "$ns" | awk '/^Address: fd00:a7:/ { print $2 }' | awk -F: '{
    out = ""; done = 0
    for (i = 1; i <= NF; i++) {
      if ($i == "") { if (!done) { for (j = 0; j <= 8 - NF; j++) out = out "0000"; done = 1 } }
      else out = out substr("0000" $i, length($i) + 1)
    }
    print out }')
  [ -n "$got" ] && grep -q "^$got " /proc/net/if_inet6 && dns6=ok
  [ "$dns6" = ok ] || echo "ATOLL-INNER: dns6: $(echo "$ns" | tr '\n' ';') have: $(cut -d' ' -f1 /proc/net/if_inet6 | tr '\n' ' ')"
  # The virtio feature bits the driver took (bit 0 CSUM, 11 HOST_TSO4, 15
  # MRG_RXBUF, counting from the left).
  feat=$(cat /sys/class/net/eth0/device/features 2>/dev/null)
  queues=$(ls /sys/class/net/eth0/queues | tr '\n' ,)
  echo "ATOLL-INNER: NIC eth0 mac=$mac echo=$echo tx=$tx rx=$rx ping=$ping md=${md:-none} ping6=$ping6 dns6=$dns6 queues=$queues features=$feat"
}
nic

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -gt 300 ] && fail "no /dev/vda after 30 s ($(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' '))"
  sleep 0.1
done
echo "ATOLL-INNER: disk vda size=$(cat /sys/block/vda/size) sectors uptime=$(cut -d' ' -f1 /proc/uptime)"

case "$mode" in
  write)
    mount -t ext2 /dev/vda /mnt || fail "mount /dev/vda failed"
    echo "$text" > /mnt/atoll.txt || fail "write failed"
    sync
    umount /mnt || fail "umount failed"
    echo "ATOLL-INNER: WRITE-OK"
    ;;
  read)
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount /dev/vda failed"
    [ -f /mnt/atoll.txt ] || fail "/atoll.txt not on the disk"
    echo "ATOLL-INNER: READ=$(cat /mnt/atoll.txt)"
    umount /mnt
    ;;
  *)
    fail "unknown atoll.mode=$mode"
    ;;
esac
finish
