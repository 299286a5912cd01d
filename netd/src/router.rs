//! The distributed router: every node's switch answers for the gateway of
//! each subnet (ARP, ping, DNS) and routes between the subnets of one VPC
//! itself, so no frame goes to a central router. Subnets of different VPCs
//! reach each other only when the two VPCs are peered (not transitively:
//! a peer's peer is not reached).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::flow::link_local;
use crate::frame::Mac;
use crate::l2::{PortId, SegmentId};
use crate::secgroup::{contains, contains6};

/// A VPC: the subnets that route to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VpcId(pub u32);

/// An IPv4 subnet on a segment (and its IPv6 /64, if it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    /// The VPC whose router joins it to other subnets (None: not routed).
    pub vpc: Option<VpcId>,
    /// Network address.
    pub net: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// The gateway's address.
    pub gateway: Ipv4Addr,
    /// The gateway's MAC (the same on every node).
    pub gateway_mac: Mac,
    /// DNS domain of the VM names (may be empty).
    pub domain: String,
    /// The IPv6 /64 whose addresses VMs form for themselves (SLAAC from the
    /// router's advertisements); None: IPv6 link-local only.
    pub prefix6: Option<Ipv6Addr>,
    /// The link MTU (advertised to IPv6 guests; DHCP tells IPv4 ones).
    pub mtu: u16,
    /// Whether guests get their IPv6 address from DHCPv6 (the router
    /// advertises the /64 as managed) rather than forming it (SLAAC).
    pub dhcp6: bool,
    /// IPv6 DNS servers after the router's own (advertised and given by
    /// DHCPv6).
    pub dns6: Vec<Ipv6Addr>,
    /// Whether its /64 leaves the VPC translated to the router's IPv6
    /// address outside (NAT66: a unique-local /64 the outside cannot route
    /// back) rather than routed.
    pub snat6: bool,
}

impl Subnet {
    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        contains(self.net, self.prefix, ip)
    }

    /// Whether `ip` is in the subnet's IPv6 /64.
    pub fn contains6(&self, ip: Ipv6Addr) -> bool {
        self.prefix6.is_some_and(|p| contains6(p, 64, ip))
    }

    /// The router's IPv6 addresses on the subnet: its link-local one (the
    /// source of its advertisements) and the first of the /64.
    pub fn gateway6(&self) -> Option<[Ipv6Addr; 2]> {
        let p = self.prefix6?;
        Some([
            link_local(self.gateway_mac),
            Ipv6Addr::from(u128::from(p) | 1),
        ])
    }

    /// The IPv6 DNS servers guests are told of: the router's own (which
    /// answers for VM names), then the subnet's others; empty without a
    /// /64.
    pub fn dns6_servers(&self) -> Vec<Ipv6Addr> {
        self.gateway6()
            .map(|[_, own]| {
                std::iter::once(own)
                    .chain(self.dns6.iter().copied())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A port with an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The port.
    pub port: PortId,
    /// Its MAC.
    pub mac: Mac,
    /// Its VM's name in DNS (may be empty).
    pub name: String,
    /// Its address in the subnet's /64, if the subnet has one.
    pub ip6: Option<Ipv6Addr>,
}

/// Subnets by segment and the addressed ports in them.
#[derive(Debug, Default)]
pub struct L3 {
    subnets: HashMap<SegmentId, Subnet, ahash::RandomState>,
    hosts: HashMap<(SegmentId, Ipv4Addr), Host, ahash::RandomState>,
    /// Ports by the address they form in their subnet's IPv6 /64.
    hosts6: HashMap<(SegmentId, Ipv6Addr), Host, ahash::RandomState>,
    /// Peered VPCs, each pair both ways round.
    peers: HashSet<(VpcId, VpcId), ahash::RandomState>,
}

impl L3 {
    /// The subnet on `segment`.
    pub fn subnet(&self, segment: SegmentId) -> Option<&Subnet> {
        self.subnets.get(&segment)
    }

    /// Puts `subnet` on `segment` (replacing one there).
    pub fn set_subnet(&mut self, segment: SegmentId, subnet: Subnet) {
        self.subnets.insert(segment, subnet);
    }

    /// Records (or with None forgets) the port at `ip` on `segment`.
    pub fn set_host(&mut self, segment: SegmentId, ip: Ipv4Addr, host: Option<Host>) {
        match host {
            Some(h) => self.hosts.insert((segment, ip), h),
            None => self.hosts.remove(&(segment, ip)),
        };
    }

    /// The subnets with an IPv6 /64, by segment.
    pub fn subnets6(&self) -> impl Iterator<Item = (SegmentId, &Subnet)> {
        self.subnets
            .iter()
            .filter(|(_, s)| s.prefix6.is_some())
            .map(|(seg, s)| (*seg, s))
    }

    /// Records (or with None forgets) the port at the IPv6 `ip` on
    /// `segment`.
    pub fn set_host6(&mut self, segment: SegmentId, ip: Ipv6Addr, host: Option<Host>) {
        match host {
            Some(h) => self.hosts6.insert((segment, ip), h),
            None => self.hosts6.remove(&(segment, ip)),
        };
    }

    /// Where an IPv6 packet from `segment` to `dst` goes through the router:
    /// the destination's segment, subnet and port.
    pub fn route6(&self, segment: SegmentId, dst: Ipv6Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self
            .reachable(segment, true)
            .find(|(_, s)| s.contains6(dst))?;
        Some((seg, subnet, self.hosts6.get(&(seg, dst))?))
    }

    /// Whether `ip` is in a /64 a port on `segment` is routed to (whether
    /// anyone has it or not).
    pub fn covers6(&self, segment: SegmentId, ip: Ipv6Addr) -> bool {
        self.reachable(segment, true).any(|(_, s)| s.contains6(ip))
    }

    /// Whether `ip` is in a /64 of `vpc`'s subnets.
    pub fn vpc_covers6(&self, vpc: VpcId, ip: Ipv6Addr) -> bool {
        self.subnets
            .values()
            .any(|s| s.vpc == Some(vpc) && s.contains6(ip))
    }

    /// Whether `ip` is an IPv6 address of the router a port on `segment`
    /// may talk to.
    pub fn is_gateway6(&self, segment: SegmentId, ip: Ipv6Addr) -> bool {
        self.reachable(segment, true)
            .filter_map(|(_, s)| s.gateway6())
            .any(|g| g[1] == ip)
            || self
                .subnet(segment)
                .and_then(Subnet::gateway6)
                .is_some_and(|g| g[0] == ip)
    }

    /// The port holding `ip` on `segment`.
    pub fn host(&self, segment: SegmentId, ip: Ipv4Addr) -> Option<&Host> {
        self.hosts.get(&(segment, ip))
    }

    /// Peers (`on`) or parts VPCs `a` and `b`.
    pub fn set_peering(&mut self, a: VpcId, b: VpcId, on: bool) {
        if on {
            self.peers.insert((a, b));
            self.peers.insert((b, a));
        } else {
            self.peers.remove(&(a, b));
            self.peers.remove(&(b, a));
        }
    }

    /// Whether subnets of `vpc` route to those of `other`: the same VPC,
    /// or a peer.
    fn joined(&self, vpc: VpcId, other: Option<VpcId>) -> bool {
        other.is_some_and(|o| o == vpc || self.peers.contains(&(vpc, o)))
    }

    /// Segments whose subnets a port on `segment` reaches: its own, every
    /// other one of its VPC, and with `peers` those of peered VPCs.
    fn reachable(
        &self,
        segment: SegmentId,
        peers: bool,
    ) -> impl Iterator<Item = (SegmentId, &Subnet)> {
        let vpc = self.subnets.get(&segment).and_then(|s| s.vpc);
        self.subnets
            .iter()
            .filter(move |(seg, s)| {
                **seg == segment
                    || vpc.is_some_and(|v| {
                        if peers {
                            self.joined(v, s.vpc)
                        } else {
                            s.vpc == Some(v)
                        }
                    })
            })
            .map(|(seg, s)| (*seg, s))
    }

    /// Whether `ip` is a gateway address a port on `segment` may talk to.
    pub fn is_gateway(&self, segment: SegmentId, ip: Ipv4Addr) -> bool {
        self.reachable(segment, true).any(|(_, s)| s.gateway == ip)
    }

    /// Where a packet from `segment` to `dst` goes through the router: the
    /// destination's segment, subnet and port.
    pub fn route(&self, segment: SegmentId, dst: Ipv4Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self
            .reachable(segment, true)
            .find(|(_, s)| s.contains(dst))?;
        Some((seg, subnet, self.hosts.get(&(seg, dst))?))
    }

    /// Whether `ip` is in a subnet of `vpc` or of a peer (not the way out,
    /// then, even with no VM there).
    pub fn vpc_contains(&self, vpc: VpcId, ip: Ipv4Addr) -> bool {
        self.subnets
            .values()
            .any(|s| self.joined(vpc, s.vpc) && s.contains(ip))
    }

    /// The segment, subnet and port of `dst` among the subnets of `vpc`.
    pub fn route_in_vpc(&self, vpc: VpcId, dst: Ipv4Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self
            .subnets
            .iter()
            .find(|(_, s)| s.vpc == Some(vpc) && s.contains(dst))?;
        Some((*seg, subnet, self.hosts.get(&(*seg, dst))?))
    }

    /// The segment, subnet and port of the IPv6 `dst` among the subnets of
    /// `vpc`.
    pub fn route_in_vpc6(&self, vpc: VpcId, dst: Ipv6Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self
            .subnets
            .iter()
            .find(|(_, s)| s.vpc == Some(vpc) && s.contains6(dst))?;
        Some((*seg, subnet, self.hosts6.get(&(*seg, dst))?))
    }

    /// The addresses of the VM named `name` that a port on `segment` can
    /// reach (its own network first): IPv4, and IPv6 where its subnet has
    /// a /64.
    pub fn resolve(&self, segment: SegmentId, name: &str) -> Option<(Ipv4Addr, Option<Ipv6Addr>)> {
        let mut found = None;
        for ((seg, ip), h) in &self.hosts {
            if !h.name.eq_ignore_ascii_case(name) {
                continue;
            }
            let v6 = h.ip6;
            if *seg == segment {
                return Some((*ip, v6));
            }
            // Names are the VPC's own: a peer's are not resolved.
            if self.reachable(segment, false).any(|(s, _)| s == *seg) {
                found = Some((*ip, v6));
            }
        }
        found
    }

    /// Forgets `segment`'s subnet and hosts.
    pub fn remove_segment(&mut self, segment: SegmentId) {
        self.subnets.remove(&segment);
        self.hosts.retain(|(s, _), _| *s != segment);
        self.hosts6.retain(|(s, _), _| *s != segment);
    }
}

/// The gateway MAC of the subnet on `segment`: locally administered, the
/// same on every node for the same segment.
pub fn gateway_mac(segment: SegmentId) -> Mac {
    let s = segment.0.to_be_bytes();
    [0x02, 0xa7, s[0], s[1], s[2], s[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(vpc: Option<u32>, net: [u8; 4]) -> Subnet {
        let net = Ipv4Addr::from(net);
        Subnet {
            vpc: vpc.map(VpcId),
            net,
            prefix: 24,
            gateway: Ipv4Addr::from(u32::from(net) + 1),
            gateway_mac: [2, 0, 0, 0, 0, 1],
            domain: String::new(),
            prefix6: None,
            mtu: 1500,
            dhcp6: false,
            dns6: Vec::new(),
            snat6: false,
        }
    }

    fn host(port: u32, name: &str) -> Option<Host> {
        Some(Host {
            port: PortId(port),
            mac: [0x52, 0, 0, 0, 0, 1],
            name: name.into(),
            ip6: None,
        })
    }

    #[test]
    fn subnets_of_a_vpc_route_to_each_other_and_no_further() {
        let mut l3 = L3::default();
        let (a, b, c) = (SegmentId(1), SegmentId(2), SegmentId(3));
        l3.set_subnet(a, subnet(Some(1), [10, 0, 1, 0]));
        l3.set_subnet(b, subnet(Some(1), [10, 0, 2, 0]));
        l3.set_subnet(c, subnet(Some(2), [10, 0, 2, 0]));
        l3.set_host(b, Ipv4Addr::new(10, 0, 2, 5), host(2, "db"));
        l3.set_host(c, Ipv4Addr::new(10, 0, 2, 6), host(3, "other"));
        let (seg, _, h) = l3.route(a, Ipv4Addr::new(10, 0, 2, 5)).unwrap();
        assert_eq!((seg, h.port), (b, PortId(2)));
        // VPC 2's host is not reachable from VPC 1, even in an overlapping range.
        assert!(l3.route(a, Ipv4Addr::new(10, 0, 2, 6)).is_none());
        assert!(l3.is_gateway(a, Ipv4Addr::new(10, 0, 2, 1)));
        assert!(!l3.is_gateway(c, Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(
            l3.resolve(a, "DB"),
            Some((Ipv4Addr::new(10, 0, 2, 5), None))
        );
        assert_eq!(l3.resolve(a, "other"), None);
        l3.remove_segment(b);
        assert!(l3.route(a, Ipv4Addr::new(10, 0, 2, 5)).is_none());
    }

    #[test]
    fn peered_vpcs_route_to_each_other_but_not_to_peers_of_peers() {
        let mut l3 = L3::default();
        let (a, b, c) = (SegmentId(1), SegmentId(2), SegmentId(3));
        l3.set_subnet(a, subnet(Some(1), [10, 1, 0, 0]));
        l3.set_subnet(b, subnet(Some(2), [10, 2, 0, 0]));
        l3.set_subnet(c, subnet(Some(3), [10, 3, 0, 0]));
        l3.set_host(a, Ipv4Addr::new(10, 1, 0, 5), host(1, "app"));
        l3.set_host(b, Ipv4Addr::new(10, 2, 0, 5), host(2, "db"));
        l3.set_host(c, Ipv4Addr::new(10, 3, 0, 5), host(3, "far"));
        let db = Ipv4Addr::new(10, 2, 0, 5);
        assert!(l3.route(a, db).is_none());
        assert!(!l3.vpc_contains(VpcId(1), db));
        l3.set_peering(VpcId(1), VpcId(2), true);
        l3.set_peering(VpcId(2), VpcId(3), true);
        let (seg, _, h) = l3.route(a, db).unwrap();
        assert_eq!((seg, h.port), (b, PortId(2)));
        let (seg, _, _) = l3.route(b, Ipv4Addr::new(10, 1, 0, 5)).unwrap();
        assert_eq!(seg, a, "both ways");
        assert!(l3.vpc_contains(VpcId(1), Ipv4Addr::new(10, 2, 0, 77)));
        assert!(l3.is_gateway(a, Ipv4Addr::new(10, 2, 0, 1)));
        // Not transitive.
        assert!(l3.route(a, Ipv4Addr::new(10, 3, 0, 5)).is_none());
        assert!(!l3.vpc_contains(VpcId(1), Ipv4Addr::new(10, 3, 0, 5)));
        // Names stay the VPC's own.
        assert_eq!(l3.resolve(a, "db"), None);
        l3.set_peering(VpcId(2), VpcId(1), false);
        assert!(l3.route(a, db).is_none());
        assert!(l3.route(b, Ipv4Addr::new(10, 3, 0, 5)).is_some());
    }
}
