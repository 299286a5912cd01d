//! The distributed router: every node's switch answers for the gateway of
//! each subnet (ARP, ping, DNS) and routes between the subnets of one VPC
//! itself, so no frame goes to a central router. Subnets of different VPCs
//! never reach each other.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::frame::Mac;
use crate::l2::{PortId, SegmentId};
use crate::secgroup::contains;

/// A VPC: the subnets that route to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VpcId(pub u32);

/// An IPv4 subnet on a segment.
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
}

impl Subnet {
    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        contains(self.net, self.prefix, ip)
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
}

/// Subnets by segment and the addressed ports in them.
#[derive(Debug, Default)]
pub struct L3 {
    subnets: HashMap<SegmentId, Subnet, ahash::RandomState>,
    hosts: HashMap<(SegmentId, Ipv4Addr), Host, ahash::RandomState>,
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

    /// The port holding `ip` on `segment`.
    pub fn host(&self, segment: SegmentId, ip: Ipv4Addr) -> Option<&Host> {
        self.hosts.get(&(segment, ip))
    }

    /// Segments whose subnets a port on `segment` reaches: its own, and
    /// every other one of its VPC.
    fn reachable(&self, segment: SegmentId) -> impl Iterator<Item = (SegmentId, &Subnet)> {
        let vpc = self.subnets.get(&segment).and_then(|s| s.vpc);
        self.subnets
            .iter()
            .filter(move |(seg, s)| **seg == segment || (vpc.is_some() && s.vpc == vpc))
            .map(|(seg, s)| (*seg, s))
    }

    /// Whether `ip` is a gateway address a port on `segment` may talk to.
    pub fn is_gateway(&self, segment: SegmentId, ip: Ipv4Addr) -> bool {
        self.reachable(segment).any(|(_, s)| s.gateway == ip)
    }

    /// Where a packet from `segment` to `dst` goes through the router: the
    /// destination's segment, subnet and port.
    pub fn route(&self, segment: SegmentId, dst: Ipv4Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self.reachable(segment).find(|(_, s)| s.contains(dst))?;
        Some((seg, subnet, self.hosts.get(&(seg, dst))?))
    }

    /// Whether `ip` is in a subnet of `vpc`.
    pub fn vpc_contains(&self, vpc: VpcId, ip: Ipv4Addr) -> bool {
        self.subnets
            .values()
            .any(|s| s.vpc == Some(vpc) && s.contains(ip))
    }

    /// The segment, subnet and port of `dst` among the subnets of `vpc`.
    pub fn route_in_vpc(&self, vpc: VpcId, dst: Ipv4Addr) -> Option<(SegmentId, &Subnet, &Host)> {
        let (seg, subnet) = self
            .subnets
            .iter()
            .find(|(_, s)| s.vpc == Some(vpc) && s.contains(dst))?;
        Some((*seg, subnet, self.hosts.get(&(*seg, dst))?))
    }

    /// The address of the VM named `name` that a port on `segment` can
    /// reach (its own network first).
    pub fn resolve(&self, segment: SegmentId, name: &str) -> Option<Ipv4Addr> {
        let mut found = None;
        for ((seg, ip), h) in &self.hosts {
            if !h.name.eq_ignore_ascii_case(name) {
                continue;
            }
            if *seg == segment {
                return Some(*ip);
            }
            if self.reachable(segment).any(|(s, _)| s == *seg) {
                found = Some(*ip);
            }
        }
        found
    }

    /// Forgets `segment`'s subnet and hosts.
    pub fn remove_segment(&mut self, segment: SegmentId) {
        self.subnets.remove(&segment);
        self.hosts.retain(|(s, _), _| *s != segment);
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
        }
    }

    fn host(port: u32, name: &str) -> Option<Host> {
        Some(Host {
            port: PortId(port),
            mac: [0x52, 0, 0, 0, 0, 1],
            name: name.into(),
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
        assert_eq!(l3.resolve(a, "DB"), Some(Ipv4Addr::new(10, 0, 2, 5)));
        assert_eq!(l3.resolve(a, "other"), None);
        l3.remove_segment(b);
        assert!(l3.route(a, Ipv4Addr::new(10, 0, 2, 5)).is_none());
    }
}
