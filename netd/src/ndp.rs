//! The distributed router's IPv6 side on a subnet with a /64: it answers
//! router solicitations with an advertisement of the prefix (guests form
//! their addresses from it, SLAAC), neighbour solicitations for its own
//! addresses, and pings of them, and tells senders what it cannot route
//! (ICMPv6 errors). Every node answers the same way, from the subnet's
//! gateway MAC and its addresses.

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
/// ICMPv6 redirect.
pub const REDIRECT: u8 = 137;

/// All nodes on the link.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// How long guests may use the router as their default one, when it routes
/// (seconds).
const ROUTER_LIFETIME: u16 = 1800;
/// Neighbour discovery options: recursive DNS servers, DNS search list.
const RDNSS: u8 = 25;
const DNSSL: u8 = 31;
/// How long advertised DNS servers and domains hold (seconds): three times
/// the longest interval between advertisements, as RFC 8106 advises.
const DNS_LIFETIME: u32 = 1800;
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
    // No /64, no IPv6 router.
    subnet.gateway6()?;
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
        ROUTER_SOLICITATION => advertise(subnet, routes, (mac, back)),
        NEIGHBOUR_SOLICITATION => {
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(ip.payload.get(8..24)?).ok()?);
            if !ours(target) {
                return None;
            }
            Some(neighbour_advert(macs, target, ip.src, back))
        }
        ICMPV6_ECHO_REQUEST if ours(ip.dst) => {
            let mut b = ip.payload.to_vec();
            b[0] = ICMPV6_ECHO_REPLY;
            Some(icmpv6_frame(macs, (ip.dst, ip.src), b))
        }
        _ => None,
    }
}

/// The router's neighbour advertisement from `macs.0` for its address
/// `target`, to `back` (at `macs.1`), answering a solicitation from
/// `asker`: router, override, and solicited unless it was a tried address
/// (from `::`).
pub fn neighbour_advert(
    macs: (Mac, Mac),
    target: Ipv6Addr,
    asker: Ipv6Addr,
    back: Ipv6Addr,
) -> Vec<u8> {
    let flags = if asker.is_unspecified() { 0xa0 } else { 0xe0 };
    let mut b = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, flags, 0, 0, 0];
    b.extend_from_slice(&target.octets());
    b.extend_from_slice(&[2, 1]);
    b.extend_from_slice(&macs.0);
    icmpv6_frame(macs, (target, back), b)
}

/// A router advertisement for `subnet` to `to` (a guest's MAC and address,
/// or all nodes); None without a /64.
pub fn advertise(subnet: &Subnet, routes: bool, to: (Mac, Ipv6Addr)) -> Option<Vec<u8>> {
    let [me, _] = subnet.gateway6()?;
    let body = advertisement(subnet, routes);
    Some(icmpv6_frame((subnet.gateway_mac, to.0), (me, to.1), body))
}

/// All nodes on the link and the MAC that group maps to: where unsolicited
/// advertisements go.
pub const ALL_NODES_TO: (Mac, Ipv6Addr) = ([0x33, 0x33, 0, 0, 0, 1], ALL_NODES);

/// How often the router advertises unsolicited, at least and at most
/// (RFC 4861's defaults; the router lifetime is three times the most, so
/// guests never lose their default route between two).
pub const ADVERT_INTERVAL: (u64, u64) = (200, 600);

/// A router advertisement for `subnet`: its /64 on-link (and for address
/// configuration, unless DHCPv6 assigns addresses: then "managed"), "other
/// configuration" by DHCPv6, the link MTU, the router's link-layer
/// address, the DNS servers and search domain (RFC 8106).
fn advertisement(subnet: &Subnet, routes: bool) -> Vec<u8> {
    let lifetime = if routes { ROUTER_LIFETIME } else { 0 };
    let flags = if subnet.dhcp6 { 0xc0 } else { 0x40 };
    let mut b = vec![ROUTER_ADVERTISEMENT, 0, 0, 0, 64, flags];
    b.extend_from_slice(&lifetime.to_be_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&subnet.gateway_mac);
    b.extend_from_slice(&[5, 1, 0, 0]);
    b.extend_from_slice(&u32::from(subnet.mtu).to_be_bytes());
    if let Some(p) = subnet.prefix6 {
        // On-link, and autonomous unless DHCPv6 assigns addresses.
        let flags = if subnet.dhcp6 { 0x80 } else { 0xc0 };
        b.extend_from_slice(&[3, 4, 64, flags]);
        b.extend_from_slice(&PREFIX_VALID.to_be_bytes());
        b.extend_from_slice(&PREFIX_PREFERRED.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&p.octets());
    }
    let servers = subnet.dns6_servers();
    // At most 7 servers fit the option's length (16 bytes each, in units
    // of 8).
    let servers = &servers[..servers.len().min(7)];
    if !servers.is_empty() {
        let units = u8::try_from(1 + 2 * servers.len()).unwrap_or(u8::MAX);
        b.extend_from_slice(&[RDNSS, units, 0, 0]);
        b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
        for s in servers {
            b.extend_from_slice(&s.octets());
        }
    }
    if let Some(mut name) = crate::dhcp6::dns_name(&subnet.domain) {
        name.resize(name.len().div_ceil(8) * 8, 0);
        if let Ok(units) = u8::try_from(1 + name.len() / 8) {
            b.extend_from_slice(&[DNSSL, units, 0, 0]);
            b.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
            b.extend_from_slice(&name);
        }
    }
    b
}

/// ICMPv6 destination unreachable.
pub const UNREACHABLE: u8 = 1;
/// ICMPv6 time exceeded.
pub const TIME_EXCEEDED: u8 = 3;
/// Unreachable code: no route to the destination.
pub const NO_ROUTE: u8 = 0;
/// Unreachable code: the address is in a subnet but nobody has it.
pub const ADDRESS_UNREACHABLE: u8 = 3;
/// Of the packet that caused an error, at most this much goes back (the
/// error then fits the IPv6 minimum MTU, RFC 4443).
const ERROR_QUOTE: usize = 1280 - 40 - 8;

/// The ICMPv6 error `(kind, code)` from the router on `subnet` to the guest
/// at `mac` about its IPv6 `packet` (parsed as `ip`), quoting it; None
/// where RFC 4443 forbids one: about an error, a multicast destination, or
/// a source that names no one.
pub fn error(
    subnet: &Subnet,
    mac: Mac,
    packet: &[u8],
    ip: &Ipv6<'_>,
    (kind, code): (u8, u8),
) -> Option<Vec<u8>> {
    let [_, me] = subnet.gateway6()?;
    error_from((subnet.gateway_mac, mac), me, packet, ip, (kind, code))
}

/// [`error`] from the router's address `me` and MAC `macs.0` to `macs.1`.
pub fn error_from(
    macs: (Mac, Mac),
    me: Ipv6Addr,
    packet: &[u8],
    ip: &Ipv6<'_>,
    (kind, code): (u8, u8),
) -> Option<Vec<u8>> {
    let about_error = ip.protocol == PROTO_ICMPV6 && ip.payload.first().is_some_and(|t| *t < 128);
    if about_error || ip.dst.is_multicast() || ip.src.is_multicast() || ip.src.is_unspecified() {
        return None;
    }
    let mut b = vec![kind, code, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&packet[..packet.len().min(ERROR_QUOTE)]);
    Some(icmpv6_frame(macs, (me, ip.src), b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::link_local;
    use std::net::Ipv4Addr;

    fn subnet() -> Subnet {
        Subnet {
            vpc: None,
            net: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            gateway_mac: [2, 0xa7, 0, 0, 0, 1],
            domain: String::new(),
            prefix6: "fd00:1::".parse().ok(),
            mtu: 9000,
            dhcp6: false,
            dns6: Vec::new(),
            snat6: false,
        }
    }

    /// An IPv6 packet from `src` to `dst` carrying `next` and `body`.
    fn packet(src: &str, dst: &str, next: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn errors_are_not_sent_where_rfc_4443_forbids_them() {
        let s = subnet();
        let mac = [0x52, 0x54, 0, 0, 0, 5];
        let tcp = packet("fd00:1::5", "fd00:9::1", 6, &[0; 20]);
        let ip = Ipv6::parse(&tcp).unwrap();
        let e = error(&s, mac, &tcp, &ip, (UNREACHABLE, NO_ROUTE)).unwrap();
        assert_eq!(&e[0..12], &[0x52, 0x54, 0, 0, 0, 5, 2, 0xa7, 0, 0, 0, 1]);
        let long = packet("fd00:1::5", "fd00:9::1", 17, &[0; 1400]);
        let ip = Ipv6::parse(&long).unwrap();
        let e = error(&s, mac, &long, &ip, (UNREACHABLE, NO_ROUTE)).unwrap();
        assert_eq!(e.len(), 14 + 1280, "fits the minimum MTU");
        for (p, why) in [
            (
                packet("fd00:1::5", "fd00:9::1", 58, &[1, 0, 0, 0, 0, 0, 0, 0]),
                "about an error",
            ),
            (packet("fd00:1::5", "ff0e::1", 17, &[0; 8]), "to a group"),
            (packet("::", "fd00:9::1", 17, &[0; 8]), "from nobody"),
        ] {
            let ip = Ipv6::parse(&p).unwrap();
            assert!(
                error(&s, mac, &p, &ip, (UNREACHABLE, NO_ROUTE)).is_none(),
                "{why}"
            );
        }
    }

    #[test]
    fn the_advertisement_carries_prefix_mtu_and_router() {
        let s = subnet();
        let mac = [0x52, 0x54, 0, 0, 0, 5];
        let rs = packet(
            &link_local(mac).to_string(),
            "ff02::2",
            58,
            &[133, 0, 0, 0, 0, 0, 0, 0],
        );
        let ip = Ipv6::parse(&rs).unwrap();
        let p = Packet6::of6(&ip).unwrap();
        // Outside a VPC the router is no default router.
        let ra = answer(&s, false, mac, (&p, &ip), |_| false).unwrap();
        let ra = Ipv6::parse(&ra[14..]).unwrap();
        assert_eq!(ra.src, link_local(s.gateway_mac));
        assert_eq!(&ra.payload[6..8], &[0, 0], "router lifetime 0");
        assert_eq!(&ra.payload[28..32], &9000u32.to_be_bytes(), "the MTU");
        // A subnet without a /64 has no IPv6 router.
        let bare = Subnet {
            prefix6: None,
            ..subnet()
        };
        assert!(answer(&bare, true, mac, (&p, &ip), |_| true).is_none());
    }
}
