//! The distributed router's IPv6 side on a subnet with a /64: it answers
//! router solicitations with an advertisement of the prefix (guests form
//! their addresses from it, SLAAC), neighbour solicitations for its own
//! addresses, and pings of them. Every node answers the same way, from the
//! subnet's gateway MAC and its link-local address.

use std::net::Ipv6Addr;

use crate::flow::{icmpv6_frame, Packet6, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, PROTO_ICMPV6};
use crate::frame::{Ipv6, Mac};
use crate::router::Subnet;

/// ICMPv6 router solicitation.
pub const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 router advertisement.
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// ICMPv6 neighbour solicitation.
pub const NEIGHBOUR_SOLICITATION: u8 = 135;
/// ICMPv6 neighbour advertisement.
pub const NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// All nodes on the link.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// How long guests may use the router as their default one, when it routes
/// (seconds).
const ROUTER_LIFETIME: u16 = 1800;
/// Prefix lifetimes (seconds): valid, preferred.
const PREFIX_VALID: u32 = 86_400;
const PREFIX_PREFERRED: u32 = 14_400;

/// The router's answer to `p` (parsed from `ip`) from the guest at `mac`,
/// if it is for the router: an advertisement for a solicitation, a
/// neighbour advertisement for one of `ours` (the router's addresses the
/// guest may talk to), an echo reply. `routes`: whether the router routes
/// for the subnet (its VPC), so guests may take it as their default.
pub fn answer(
    subnet: &Subnet,
    routes: bool,
    mac: Mac,
    (p, ip): (&Packet6, &Ipv6<'_>),
    ours: impl Fn(Ipv6Addr) -> bool,
) -> Option<Vec<u8>> {
    let [me, _] = subnet.gateway6()?;
    if p.flow.proto != PROTO_ICMPV6 {
        return None;
    }
    // A solicited reply goes back to its asker; one to the unspecified
    // address (an address being tried) to every node.
    let back = if ip.src.is_unspecified() {
        ALL_NODES
    } else {
        ip.src
    };
    let macs = (subnet.gateway_mac, mac);
    match p.icmp_type? {
        ROUTER_SOLICITATION => Some(icmpv6_frame(
            macs,
            (me, back),
            advertisement(subnet, routes),
        )),
        NEIGHBOUR_SOLICITATION => {
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(ip.payload.get(8..24)?).ok()?);
            if !ours(target) {
                return None;
            }
            // Router, solicited (unless for a tried address), override.
            let flags = if ip.src.is_unspecified() { 0xa0 } else { 0xe0 };
            let mut b = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, flags, 0, 0, 0];
            b.extend_from_slice(&target.octets());
            b.extend_from_slice(&[2, 1]);
            b.extend_from_slice(&subnet.gateway_mac);
            Some(icmpv6_frame(macs, (target, back), b))
        }
        ICMPV6_ECHO_REQUEST if ours(ip.dst) => {
            let mut b = ip.payload.to_vec();
            b[0] = ICMPV6_ECHO_REPLY;
            Some(icmpv6_frame(macs, (ip.dst, ip.src), b))
        }
        _ => None,
    }
}

/// A router advertisement for `subnet`: its /64 on-link and for address
/// configuration, the link MTU, the router's link-layer address.
fn advertisement(subnet: &Subnet, routes: bool) -> Vec<u8> {
    let lifetime = if routes { ROUTER_LIFETIME } else { 0 };
    let mut b = vec![ROUTER_ADVERTISEMENT, 0, 0, 0, 64, 0];
    b.extend_from_slice(&lifetime.to_be_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&subnet.gateway_mac);
    b.extend_from_slice(&[5, 1, 0, 0]);
    b.extend_from_slice(&u32::from(subnet.mtu).to_be_bytes());
    if let Some(p) = subnet.prefix6 {
        // On-link and autonomous.
        b.extend_from_slice(&[3, 4, 64, 0xc0]);
        b.extend_from_slice(&PREFIX_VALID.to_be_bytes());
        b.extend_from_slice(&PREFIX_PREFERRED.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&p.octets());
    }
    b
}
