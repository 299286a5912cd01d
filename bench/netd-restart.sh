#!/usr/bin/env bash
# How long netd's saved configuration costs: a change saved with N ports
# on the node, and a netd SIGKILLed and started again until it owns its
# name with all N ports back (what a VM's NIC waits for, on top of the
# vmm's 100 ms reconnect tries). docs/BENCHMARKS.md has the results.
#
#   bash bench/netd-restart.sh        # PORTS="100 1000" RUNS=3 NETD=<binary>
#
# One flat network with a /20 subnet; every port has an address, a name
# and the default security group. No peer: other switches keep their
# configuration in a database of their own (OVS's ovsdb) or are told it
# again by their controller.
set -euo pipefail

PORTS=${PORTS:-100 1000}
RUNS=${RUNS:-3}
cd "$(dirname "$0")/.."
if [ -n "${NETD:-}" ]; then
    netd=$NETD
else
    cargo build --release -q -p netd
    netd=$PWD/target/release/netd
fi

work=$(mktemp -d /tmp/netd-restart.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}" ${netd_pid:-}; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

bus=unix:path=$work/bus
dbus-daemon --session --address="$bus" --nofork --nopidfile 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/bus" ] && break; sleep 0.05; done
call() { busctl --address="$bus" call org.atoll.Net1 "$@"; }
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

start_netd() {
    "$netd" --node-id bench --bus "$bus" --run-dir "$work/run" --data-dir "$work/data" \
        --log-level warn >>"$work/netd.log" 2>&1 &
    netd_pid=$!
    until busctl --address="$bus" status org.atoll.Net1 >/dev/null 2>&1; do sleep 0.002; done
}

for n in $PORTS; do
    for run in $(seq "$RUNS"); do
        rm -rf "$work/run" "$work/data"
        start_netd
        net=$(call /org/atoll/Net1 org.atoll.Net1 CreateNetwork 'ssa{sv}' lan flat 0 | cut -d'"' -f2)
        call /org/atoll/Net1 org.atoll.Net1 CreateSubnet 'osa{sv}' "$net" 10.64.0.0/20 0 >/dev/null
        t0=$(now)
        for i in $(seq "$n"); do
            call /org/atoll/Net1 org.atoll.Net1 CreatePort 'osa{sv}' "$net" "" 1 name s "vm$i" >/dev/null
        done
        t1=$(now)
        # One more change with n ports on the node: its save.
        t2=$(now)
        call /org/atoll/Net1 org.atoll.Net1 CreatePort 'osa{sv}' "$net" "" 1 name s "extra" >/dev/null
        t3=$(now)
        kill -9 "$netd_pid"
        wait "$netd_pid" 2>/dev/null || true
        t4=$(now)
        start_netd
        t5=$(now)
        got=$(busctl --address="$bus" tree org.atoll.Net1 2>/dev/null | grep -c '/port/' || true)
        [ "$got" -eq $((n + 1)) ] || { echo "ports=$n: $got ports came back" >&2; exit 1; }
        echo "ports=$n run=$run create_each_ms=$(( $(ms "$t0" "$t1") / n )) change_ms=$(ms "$t2" "$t3") restart_ms=$(ms "$t4" "$t5") db_kib=$(du -sk "$work/data" | cut -f1)"
        kill -9 "$netd_pid"
        wait "$netd_pid" 2>/dev/null || true
    done
done
