#!/usr/bin/env bash
# The kernel's UDP path alone, as netd's overlay uses it (UDP GSO messages
# of 32 datagrams out, UDP GRO and recvmmsg in): one thread on CPU 0 sends a
# message from one network namespace and reads it in another (a veth pair
# with a 9000-byte MTU), then the next: the setup of bench/netd-testpmd.sh's
# overlay backend without netd and without guests. What arrives per second is the most an overlay over
# kernel sockets can carry on that CPU (docs/BENCHMARKS.md has the results).
#
#   bash bench/udp-ceiling.sh      # RUNS=3 SECS=5 SIZES="114 1568" (datagram bytes:
#                                  # a 64- or 1518-byte frame and 50 bytes of VXLAN)
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-5}
SIZES=${SIZES:-114 1568}
cd "$(dirname "$0")/.."
cargo build --release -q -p netd --example udp_ceiling
bin=$PWD/target/release/examples/udp_ceiling

# shellcheck source=underlay.sh
. bench/underlay.sh
trap 'underlay_down udp' EXIT
underlay_up udp 10.97.0

for size in $SIZES; do
    rates=()
    for run in $(seq "$RUNS"); do
        rate=$(ip netns exec atoll-udp-a taskset -c 0 "$bin" atoll-udp-b 10.97.0.2:4789 10.97.0.1:4789 "$size" "$SECS" |
            awk '{print $(NF-2)}')
        echo "size=$size run=$run Mdatagrams/s=$rate"
        rates+=("$rate")
    done
    printf '%s\n' "${rates[@]}" | sort -g | awk -v s="$size" '{v[NR]=$1} END {printf "| %s B | %.2f / %.2f / %.2f M datagrams/s |\n", s, v[1], v[int((NR+1)/2)], v[NR]}'
done
