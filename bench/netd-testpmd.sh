#!/usr/bin/env bash
# Port-to-port packet rate through netd, against testpmd's own vhost PMD
# forwarder, in one run (docs/BENCHMARKS.md has the results).
#
#   bash bench/netd-testpmd.sh     # RUNS=3 SECS=5 WARM=2 SIZES="64 1518" (wire sizes, CRC included)
#
# Driver: dpdk-testpmd (Debian's dpdk-dev) with two net_virtio_user ports
# (--no-huge), forwarding lcore on CPU 1, 5tswap forwarding: every frame a
# port receives goes back out of it with MACs, IPs and UDP ports swapped, so
# each one crosses the switch again and each is a valid reply for connection
# tracking. 16 bursts of 32 frames are injected (`start tx_first 16`); after
# WARM seconds the counters are cleared, and the rate is RX-packets over the
# next SECS seconds, per direction.
#
# Backends, each on CPU 0:
#   peer    testpmd --vdev net_vhost0 --vdev net_vhost1, io forwarding
#   l2      netd: a flat network, two ports (MAC learning, no filtering)
#   sg      netd: a subnet, two ports with addresses (anti-spoofing) in a
#           security group of 100 rules (the last one allows UDP 9), stateful
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-5}
WARM=${WARM:-2}
SIZES=${SIZES:-64 1518}
BACKENDS=${BACKENDS:-peer l2 sg}
cd "$(dirname "$0")/.."
root=$PWD

command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd (apt install dpdk-dev)" >&2; exit 1; }
cargo build --release -q -p netd
netd=$root/target/release/netd

work=$(mktemp -d /tmp/netd-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}" ${backend_pid:-} ${drv_pid:-}; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

bus=unix:path=$work/bus
dbus-daemon --session --address="$bus" --nofork --nopidfile &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/bus" ] && break; sleep 0.05; done

call() { busctl --address="$bus" call org.atoll.Net1 "$@"; }
# The n-th quoted field of busctl's reply.
field() { awk -v n="$1" -F'"' '{print $(2*n)}'; }

start_netd() {
    rm -rf "$work/run"
    RUST_LOG=${RUST_LOG:-info} taskset -c 0 "$netd" --node-id bench --bus "$bus" --run-dir "$work/run" >"$work/netd.log" 2>&1 &
    netd_pid=$!
    for _ in $(seq 200); do
        busctl --address="$bus" status org.atoll.Net1 >/dev/null 2>&1 && return
        sleep 0.05
    done
    echo "netd did not start" >&2; cat "$work/netd.log" >&2; exit 1
}

# Sets up the backend $1; prints the two socket paths and the testpmd
# options for the ports (vhost PMD: server sockets testpmd makes).
setup() {
    case $1 in
    peer)
        taskset -c 0 dpdk-testpmd --lcores=0@0,1@0 --no-huge -m 512 --no-pci --file-prefix=peer \
            --vdev "net_vhost0,iface=$work/vh0.sock,queues=1" \
            --vdev "net_vhost1,iface=$work/vh1.sock,queues=1" \
            -- --forward-mode=io --auto-start --total-num-mbufs=32768 --stats-period=3600 \
            </dev/null >"$work/peer.log" 2>&1 &
        backend_pid=$!
        for _ in $(seq 200); do [ -S "$work/vh1.sock" ] && break; sleep 0.05; done
        echo "$work/vh0.sock $work/vh1.sock"
        ;;
    l2)
        start_netd
        backend_pid=$netd_pid
        net=$(call /org/atoll/Net1 org.atoll.Net1 CreateNetwork ssa{sv} bench flat 0 | field 1)
        a=$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:01 0 | field 2)
        b=$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:02 0 | field 2)
        echo "$a $b"
        ;;
    sg)
        start_netd
        backend_pid=$netd_pid
        net=$(call /org/atoll/Net1 org.atoll.Net1 CreateNetwork ssa{sv} bench flat 0 | field 1)
        call /org/atoll/Net1 org.atoll.Net1 CreateSubnet osa{sv} "$net" 198.18.0.0/24 1 gateway s 198.18.0.254 >/dev/null
        sg=$(call /org/atoll/Net1 org.atoll.Net1 CreateSecurityGroup s bench | field 1)
        for i in $(seq 0 98); do
            call "$sg" org.atoll.Net1.SecurityGroup AddRule ssqqss ingress tcp $((1000 + i)) $((1000 + i)) "10.$i.0.0/16" "" >/dev/null
        done
        call "$sg" org.atoll.Net1.SecurityGroup AddRule ssqqss ingress udp 9 9 "" "" >/dev/null
        a=$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:01 2 ip s 198.18.0.1 security_groups ao 1 "$sg" | field 2)
        b=$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:02 2 ip s 198.18.0.2 security_groups ao 1 "$sg" | field 2)
        echo "$a $b"
        ;;
    esac
}

# Runs the driver against sockets $1 $2 with frames of $3 bytes; prints
# "pps_port0 pps_port1".
drive() {
    local fifo=$work/cmd
    rm -f "$fifo"; mkfifo "$fifo"
    dpdk-testpmd --lcores=0@0,1@1 --no-huge -m 512 --no-pci --file-prefix=drv \
        --vdev "net_virtio_user0,path=$1,queues=1,mac=02:00:00:00:00:01" \
        --vdev "net_virtio_user1,path=$2,queues=1,mac=02:00:00:00:00:02" \
        -- -i --forward-mode=5tswap --port-topology=loop --total-num-mbufs=32768 --txpkts="$(( $3 - 4 ))" \
        --eth-peer=0,02:00:00:00:00:02 --eth-peer=1,02:00:00:00:00:01 \
        <"$fifo" >"$work/drv.log" 2>&1 &
    local drv=$!
    drv_pid=$drv
    exec {cmd}>"$fifo"
    # Ports are up when testpmd says so (registering --no-huge memory with
    # the backend takes a while).
    for _ in $(seq 600); do
        grep -q "^Done" "$work/drv.log" 2>/dev/null && break
        sleep 0.05
    done
    {
        echo "start tx_first 16"
        sleep "$WARM"
        echo "clear port stats all"
        sleep "$SECS"
        echo "show port stats all"
        echo "stop"
        echo "quit"
    } >&"$cmd"
    exec {cmd}>&-
    wait "$drv" || true
    # The first two RX-packets lines are "show port stats all"'s.
    awk -v s="$SECS" '/RX-packets:/ && n < 2 {printf "%d ", $2 / s; n++} END {print ""}' "$work/drv.log"
}

declare -A results
for size in $SIZES; do
    for run in $(seq "$RUNS"); do
        for be in $BACKENDS; do
            setup "$be" >"$work/socks"
            socks=$(cat "$work/socks")
            # shellcheck disable=SC2086
            r=$(drive $socks "$size")
            kill "$backend_pid" 2>/dev/null || true
            wait "$backend_pid" 2>/dev/null || true
            echo "size=$size run=$run backend=$be pps=$r"
            results[$be,$size]+="$(echo "$r" | awk '{print ($1 + $2) / 2}') "
        done
    done
done

echo
echo "| backend | frame | per-direction pps min / median / max | vs peer (median) |"
echo "| --- | --- | --- | --- |"
for size in $SIZES; do
    peer_med=
    for be in $BACKENDS; do
        stats=$(echo "${results[$be,$size]}" | tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {printf "%.0f %.0f %.0f", v[1], v[int((NR+1)/2)], v[NR]}')
        read -r mn md mx <<<"$stats"
        [ "$be" = peer ] && peer_med=$md
        ratio=$(awk -v a="$md" -v b="${peer_med:-$md}" 'BEGIN {printf "%.2fx", a / b}')
        printf '| %s | %s B | %.2f / %.2f / %.2f Mpps | %s |\n' "$be" "$size" \
            "$(awk -v x="$mn" 'BEGIN{print x/1e6}')" "$(awk -v x="$md" 'BEGIN{print x/1e6}')" \
            "$(awk -v x="$mx" 'BEGIN{print x/1e6}')" "$ratio"
    done
done
