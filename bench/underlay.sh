# Sourced by the bench scripts: an overlay's underlay between two network
# namespaces.

# underlay_up NAME NET: namespaces atoll-NAME-a and atoll-NAME-b joined by
# a veth pair (NAME-a, NAME-b) with NET.1/24 and NET.2/24. Jumbo frames, as
# VXLAN deployments have: full-size frames plus the 50 bytes of tunnel
# headers fit in one datagram.
underlay_up() {
    local name=$1 net=$2
    underlay_down "$name"
    ip netns add "atoll-$name-a"
    ip netns add "atoll-$name-b"
    ip link add "$name-a" netns "atoll-$name-a" mtu 9000 type veth peer "$name-b" netns "atoll-$name-b" mtu 9000
    ip -n "atoll-$name-a" addr add "$net.1/24" dev "$name-a"
    ip -n "atoll-$name-b" addr add "$net.2/24" dev "$name-b"
    ip -n "atoll-$name-a" link set "$name-a" up
    ip -n "atoll-$name-b" link set "$name-b" up
}

# underlay_down NAME: removes what underlay_up made (nothing if absent).
underlay_down() {
    ip netns del "atoll-$1-a" 2>/dev/null || true
    ip netns del "atoll-$1-b" 2>/dev/null || true
}
