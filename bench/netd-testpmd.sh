#!/usr/bin/env bash
# Port-to-port packet rate through netd, against testpmd's own vhost PMD
# forwarder, in one run (docs/BENCHMARKS.md has the results).
#
#   bash bench/netd-testpmd.sh     # RUNS=3 SECS=5 WARM=2 SIZES="64 1518" (wire sizes, CRC included)
#                                  # BACKENDS="peer l2 sg overlay" NETD=<binary>
#                                  # ENCAP=vxlan|geneve (the overlay's)
#
# Driver: dpdk-testpmd (Debian's dpdk-dev) with two net_virtio_user ports
# (--no-huge), forwarding lcore on CPU 1, mac forwarding with --eth-peer:
# what port 0 receives goes out of port 1 addressed to port 0's MAC and the
# other way round, so every frame crosses the switch again. 16 bursts of 32
# frames are injected per port (`start tx_first 16`); after WARM seconds the
# counters are cleared, and the rate is RX-packets over the next SECS
# seconds, per direction. The frames keep testpmd's UDP 198.18.0.1:9 ->
# 198.18.0.2:9 both ways.
#
# Backends, each on CPU 0:
#   peer    testpmd --vdev net_vhost0 --vdev net_vhost1, io forwarding
#   l2      netd: a flat network, two ports (MAC learning, no filtering)
#   overlay two netd daemons in two network namespaces joined by a veth
#           pair, one port each on a VXLAN network between them (kernel UDP
#           sockets; both daemons on CPU 0)
#   sg      netd: a subnet, two ports with addresses (anti-spoofing; port 2
#           may also send from .1, as the frames do) in a security group of
#           100 rules (the last one allows UDP 9), connection tracking
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-5}
WARM=${WARM:-2}
SIZES=${SIZES:-64 1518}
BACKENDS=${BACKENDS:-peer l2 sg overlay}
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=underlay.sh
. bench/underlay.sh

command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd (apt install dpdk-dev)" >&2; exit 1; }
# NETD=path runs that binary instead (for A/B comparisons of two builds).
if [ -n "${NETD:-}" ]; then
    netd=$NETD
else
    cargo build --release -q -p netd
    netd=$root/target/release/netd
fi
# The vCPUs' distance around each run: "near" when they share a cache,
# "far" when a cache line takes hundreds of ns between them (the host
# decides, and moves them within seconds).
cargo build --release -q -p netd --example vcpu_distance
distance() {
    "$root/target/release/examples/vcpu_distance" 0 1 2>/dev/null |
        awk '{print ($1 < 150) ? "near" : "far"}' || echo "?"
}

work=$(mktemp -d /tmp/netd-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}" ${backend_pid:-} ${drv_pid:-}; do kill "$p" 2>/dev/null || true; done
    netns_down
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

bus=unix:path=$work/bus
dbus-daemon --session --address="$bus" --nofork --nopidfile &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/bus" ] && break; sleep 0.05; done

call() { busctl --address="${BUS:-$bus}" call org.atoll.Net1 "$@"; }
# The n-th quoted field of busctl's reply.
field() { awk -v n="$1" -F'"' '{print $(2*n)}'; }

# Starts netd on bus $1 with sockets in $2, in namespace $3 if given.
start_netd() {
    local b=${1:-$bus} run=${2:-$work/run} ns=${3:-}
    rm -rf "$run" "$run-data"
    local wrap=() data=()
    # A fresh configuration each start (binaries from before --data-dir
    # are measured too).
    "$netd" --help | grep -q -- --data-dir && data=(--data-dir "$run-data")
    [ -n "$ns" ] && wrap=(ip netns exec "$ns")
    "${wrap[@]}" taskset -c 0 "$netd" --node-id bench --bus "$b" --run-dir "$run" "${data[@]}" >>"$work/netd.log" 2>&1 &
    netd_pid=$!
    for _ in $(seq 200); do
        busctl --address="$b" status org.atoll.Net1 >/dev/null 2>&1 && return
        sleep 0.05
    done
    echo "netd did not start" >&2; cat "$work/netd.log" >&2; exit 1
}

bus2=unix:path=$work/bus2
netns_up() { underlay_up bench 10.98.0; }
netns_down() { underlay_down bench; }

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
        b=$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:02 3 ip s 198.18.0.2 security_groups ao 1 "$sg" allowed_addresses as 1 198.18.0.1 | field 2)
        echo "$a $b"
        ;;
    overlay)
        [ -S "$work/bus2" ] || {
            dbus-daemon --session --address="$bus2" --nofork --nopidfile 2>/dev/null &
            pids+=($!)
            for _ in $(seq 100); do [ -S "$work/bus2" ] && break; sleep 0.05; done
        }
        netns_up
        start_netd "$bus" "$work/run" atoll-bench-a
        local p1=$netd_pid
        start_netd "$bus2" "$work/run2" atoll-bench-b
        backend_pid="$p1 $netd_pid"
        local socks=() me peer n
        for n in 1 2; do
            if [ $n = 1 ]; then export BUS=$bus me=10.98.0.1 peer=10.98.0.2; else export BUS=$bus2 me=10.98.0.2 peer=10.98.0.1; fi
            call /org/atoll/Net1 org.atoll.Net1 SetTunnelEndpoint sqs "$me" 0 "${ENCAP:-vxlan}" >/dev/null
            net=$(call /org/atoll/Net1 org.atoll.Net1 CreateNetwork ssa{sv} bench overlay 1 vni u 5001 | field 1)
            call "$net" org.atoll.Net1.Network SetRemotes as 1 "$peer" >/dev/null
            socks+=("$(call /org/atoll/Net1 org.atoll.Net1 CreatePort osa{sv} "$net" 02:00:00:00:00:0$n 0 | field 2)")
        done
        unset BUS
        echo "${socks[0]} ${socks[1]}"
        ;;
    esac
}

# Runs the driver against sockets $1 $2 with frames of $3 bytes; prints
# "pps_port0 pps_port1".
drive() {
    local fifo=$work/cmd
    rm -f "$fifo"; mkfifo "$fifo"
    stdbuf -oL dpdk-testpmd --lcores=0@0,1@1 --no-huge -m 512 --no-pci --file-prefix=drv \
        --vdev "net_virtio_user0,path=$1,queues=1,mac=02:00:00:00:00:01" \
        --vdev "net_virtio_user1,path=$2,queues=1,mac=02:00:00:00:00:02" \
        -- -i --forward-mode=mac --total-num-mbufs=32768 --txpkts="$(( $3 - 4 ))" \
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
        if [ -n "${KEEP:-}" ]; then
            for b in "$bus" "$bus2"; do
                busctl --address="$b" get-property org.atoll.Net1 /org/atoll/Net1 org.atoll.Net1 TunnelCounters >>"$work/counters" 2>&1 || true
            done
        fi
        echo "stop"
        echo "quit"
    } >&"$cmd"
    exec {cmd}>&-
    wait "$drv" || true
    # The first two RX-packets lines are "show port stats all"'s.
    awk -v s="$SECS" '/RX-packets:/ && n < 2 {printf "%d ", $2 / s; n++} END {print ""}' "$work/drv.log"
}

declare -A results bymode
for size in $SIZES; do
    for run in $(seq "$RUNS"); do
        for be in $BACKENDS; do
            mode=$(distance)
            setup "$be" >"$work/socks"
            socks=$(cat "$work/socks")
            # shellcheck disable=SC2086
            r=$(drive $socks "$size")
            # shellcheck disable=SC2086
            kill $backend_pid 2>/dev/null || true
            # shellcheck disable=SC2086
            wait $backend_pid 2>/dev/null || true
            [ "$be" = overlay ] && netns_down
            # Counted under a distance only when it held before and after.
            [ "$(distance)" = "$mode" ] || mode=mixed
            echo "size=$size run=$run backend=$be vcpus=$mode pps=$r"
            results[$be,$size]+="$(echo "$r" | awk '{printf "%d", ($1 + $2) / 2}') "
            bymode[$be,$size,$mode]+="$(echo "$r" | awk '{printf "%d", ($1 + $2) / 2}') "
        done
    done
done

echo
echo "| backend | frame | per-direction pps min / median / max | vs peer (median) | vs l2 (median) |"
echo "| --- | --- | --- | --- | --- |"
median() { echo "${results[$1,$2]:-}" | tr ' ' '\n' | { grep . || true; } | sort -n | awk '{v[NR]=$1} END {if (NR) printf "%.0f", v[int((NR+1)/2)]}'; }
for size in $SIZES; do
    peer_med=$(median peer "$size")
    l2_med=$(median l2 "$size")
    for be in $BACKENDS; do
        stats=$(echo "${results[$be,$size]}" | tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {printf "%.0f %.0f %.0f", v[1], v[int((NR+1)/2)], v[NR]}')
        read -r mn md mx <<<"$stats"
        ratio() { [ -n "$1" ] && awk -v a="$md" -v b="$1" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}' || echo -; }
        printf '| %s | %s B | %.2f / %.2f / %.2f Mpps | %s | %s |\n' "$be" "$size" \
            "$(awk -v x="$mn" 'BEGIN{print x/1e6}')" "$(awk -v x="$md" 'BEGIN{print x/1e6}')" \
            "$(awk -v x="$mx" 'BEGIN{print x/1e6}')" "$(ratio "$peer_med")" "$(ratio "$l2_med")"
    done
done

# The machine's two vCPUs are moved between host cores within seconds
# (SMT siblings share a core's execution; separate cores pay ~300 ns per
# cache line passed between them), and every backend's rate follows. The
# backends of one run are measured back to back, so each run's ratios
# compare like with like more often than medians taken across runs.
echo
echo "Paired ratios (each run's backends against the same run's peer and l2):"
echo
echo "| ratio | frame | min / median / max over runs |"
echo "| --- | --- | --- |"
# The per-run values of backend $1 at size $2, one per line.
runs_of() { echo "${results[$1,$2]:-}" | tr ' ' '\n' | { grep . || true; }; }
# ratio rows: name, numerator backend, denominator backend, factor
paired() {
    local name=$1 num=$2 den=$3 factor=$4 size=$5
    [ -n "${results[$num,$size]:-}" ] && [ -n "${results[$den,$size]:-}" ] || return 0
    paste <(runs_of "$num" "$size") <(runs_of "$den" "$size") |
        awk -v f="$factor" '$2 > 0 {print f * $1 / $2}' | sort -g |
        awk -v n="$name" -v s="$size" '{v[NR]=$1} END {if (NR) printf "| %s | %s B | %.2f / %.2f / %.2f |\n", n, s, v[1], v[int((NR+1)/2)], v[NR]}'
}
for size in $SIZES; do
    paired "l2 / peer" l2 peer 1 "$size"
    paired "sg / l2" sg l2 1 "$size"
    # Two daemons share the core: per node core, the overlay moves twice
    # its rate.
    paired "overlay per node core / l2" overlay l2 2 "$size"
done

echo
echo "By the vCPUs' distance, the same before and after the run (median per-direction Mpps, runs):"
echo
echo "| vCPUs | frame | $(for be in $BACKENDS; do printf '%s | ' "$be"; done)l2 / peer | sg cost | overlay per node core cost |"
echo "| --- | --- | $(for be in $BACKENDS; do printf -- '--- | '; done)--- | --- | --- |"
for size in $SIZES; do
    for mode in near far; do
        declare -A med=()
        row="| $mode | $size B | "
        for be in $BACKENDS; do
            v=$(echo "${bymode[$be,$size,$mode]:-}" | tr ' ' '\n' | { grep . || true; } | sort -n |
                awk '{v[NR]=$1} END {if (NR) printf "%.0f %d", v[int((NR+1)/2)], NR}')
            med[$be]=${v%% *}
            if [ -n "$v" ]; then
                row+="$(awk -v m="${v%% *}" -v n="${v##* }" 'BEGIN {printf "%.2f (%d)", m / 1e6, n}') | "
            else
                row+="- | "
            fi
        done
        frac() { [ -n "${med[$1]:-}" ] && [ -n "${med[$2]:-}" ] && awk -v a="${med[$1]}" -v b="${med[$2]}" -v f="$3" -v c="$4" \
            'BEGIN {r = f * a / b; if (c) printf "%.0f %%", (1 - r) * 100; else printf "%.2fx", r}' || echo -; }
        row+="$(frac l2 peer 1 0) | $(frac sg l2 1 1) | $(frac overlay l2 2 1) |"
        echo "$row"
    done
done
