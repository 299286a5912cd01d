//! Security groups: allow-lists of rules a port's traffic is checked
//! against (ingress denied and egress allowed unless a rule says
//! otherwise). Only the first packet of a connection meets the rules; the
//! port's connection tracker passes the rest and the replies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::conntrack::Direction;
use crate::flow::{Flow, Flow6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// A security group's id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct GroupId(pub u32);

/// Which packets a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// Every IPv4 or IPv6 packet.
    Any,
    /// TCP to a destination port in the rule's range.
    Tcp,
    /// UDP to a destination port in the rule's range.
    Udp,
    /// ICMP (ICMPv6 for IPv6).
    Icmp,
}

/// The other end a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Remote {
    /// Any address.
    Any,
    /// An address in an IPv4 prefix.
    Cidr(Ipv4Addr, u8),
    /// An address in an IPv6 prefix.
    Cidr6(Ipv6Addr, u8),
    /// The address of any port in a group.
    Group(GroupId),
}

/// One allow rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// Which way.
    pub direction: Direction,
    /// Which protocol.
    pub protocol: Protocol,
    /// Destination ports, inclusive (TCP and UDP only).
    pub ports: (u16, u16),
    /// Who is at the other end.
    pub remote: Remote,
}

/// Why a rule is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Unknown direction.
    #[error("direction {0:?}: want \"ingress\" or \"egress\"")]
    Direction(String),
    /// Unknown protocol.
    #[error("protocol {0:?}: want \"any\", \"tcp\", \"udp\" or \"icmp\"")]
    Protocol(String),
    /// A port range that is empty or given for a protocol without ports.
    #[error("ports {0}-{1}: {2}")]
    Ports(u16, u16, &'static str),
    /// A CIDR that does not parse.
    #[error("remote {0:?}: want an IPv4 or IPv6 prefix like 10.0.0.0/24 or 2001:db8::/64")]
    Cidr(String),
    /// No such group.
    #[error("no security group {0}")]
    NoGroup(String),
    /// A CIDR and a group at once.
    #[error("a rule names a remote CIDR or a remote group, not both")]
    TwoRemotes,
}

impl Rule {
    /// A rule from its parts as D-Bus carries them; `group` resolves a
    /// remote group's name.
    pub fn parse(
        direction: &str,
        protocol: &str,
        ports: (u16, u16),
        cidr: &str,
        group: Option<GroupId>,
    ) -> Result<Self, RuleError> {
        let direction = match direction {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            d => return Err(RuleError::Direction(d.into())),
        };
        let protocol = match protocol {
            "any" | "" => Protocol::Any,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            p => return Err(RuleError::Protocol(p.into())),
        };
        let ports = match (protocol, ports) {
            (Protocol::Tcp | Protocol::Udp, (0, 0)) => (0, u16::MAX),
            (Protocol::Tcp | Protocol::Udp, (lo, hi)) if lo <= hi => (lo, hi),
            (Protocol::Tcp | Protocol::Udp, (lo, hi)) => {
                return Err(RuleError::Ports(lo, hi, "the first is above the last"))
            }
            (_, (0, 0)) => (0, u16::MAX),
            (_, (lo, hi)) => return Err(RuleError::Ports(lo, hi, "only TCP and UDP have ports")),
        };
        let remote = match (cidr, group) {
            ("", None) => Remote::Any,
            ("", Some(g)) => Remote::Group(g),
            (c, None) => match (parse_cidr(c), parse_cidr6(c)) {
                (Some((ip, len)), _) => Remote::Cidr(ip, len),
                (_, Some((ip, len))) => Remote::Cidr6(ip, len),
                _ => return Err(RuleError::Cidr(c.into())),
            },
            (_, Some(_)) => return Err(RuleError::TwoRemotes),
        };
        Ok(Self {
            direction,
            protocol,
            ports,
            remote,
        })
    }
}

/// Parses "10.0.0.0/24" (host bits must be zero) or a bare address (/32).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<Ipv4Addr>().ok()?, len.parse::<u8>().ok()?),
        None => (s.parse::<Ipv4Addr>().ok()?, 32),
    };
    if len > 32 || u32::from(ip) & !mask(len) != 0 {
        return None;
    }
    Some((ip, len))
}

/// Parses "2001:db8::/64" (host bits must be zero) or a bare IPv6
/// address (/128).
pub fn parse_cidr6(s: &str) -> Option<(Ipv6Addr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<Ipv6Addr>().ok()?, len.parse::<u8>().ok()?),
        None => (s.parse::<Ipv6Addr>().ok()?, 128),
    };
    if len > 128 || u128::from(ip) & !mask6(len) != 0 {
        return None;
    }
    Some((ip, len))
}

/// The netmask of an IPv6 prefix length.
pub fn mask6(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// Whether `ip` is in the IPv6 prefix `net`/`len`.
pub fn contains6(net: Ipv6Addr, len: u8, ip: Ipv6Addr) -> bool {
    u128::from(ip) & mask6(len) == u128::from(net)
}

/// The netmask of a prefix length.
pub fn mask(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// Whether `ip` is in `net`/`len`.
pub fn contains(net: Ipv4Addr, len: u8, ip: Ipv4Addr) -> bool {
    u32::from(ip) & mask(len) == u32::from(net)
}

/// A group: a name and its rules by id.
#[derive(Debug, Clone, Default)]
pub struct SecurityGroup {
    /// Name.
    pub name: String,
    /// Rules by id.
    pub rules: BTreeMap<u32, Rule>,
    next_rule: u32,
}

impl SecurityGroup {
    /// An empty group.
    pub fn new(name: String) -> Self {
        Self {
            name,
            rules: BTreeMap::new(),
            next_rule: 1,
        }
    }

    /// The id the next rule gets.
    pub fn next_rule(&self) -> u32 {
        self.next_rule
    }

    /// Puts back rules with their ids (a restart's): the next rule gets
    /// an id past them and past `next`.
    pub fn restore(&mut self, rules: BTreeMap<u32, Rule>, next: u32) {
        let past = rules.keys().next_back().map_or(1, |k| k.saturating_add(1));
        self.next_rule = next.max(past).max(1);
        self.rules = rules;
    }

    /// Adds `rule`; returns its id.
    pub fn add(&mut self, rule: Rule) -> u32 {
        let id = self.next_rule;
        self.next_rule += 1;
        self.rules.insert(id, rule);
        id
    }
}

/// What a port's traffic is held to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSecurity {
    /// The port's address: its frames must come from it (and from the
    /// port's MAC); None leaves the port unfiltered (a plain L2 port).
    pub ip: Option<Ipv4Addr>,
    /// Its groups' rules decide which connections pass.
    pub groups: Vec<GroupId>,
    /// Other source prefixes it may use (a virtual IP, say).
    pub allowed: Vec<(Ipv4Addr, u8)>,
    /// Its IPv6 addresses (the link-local one its MAC gives, and one per
    /// IPv6 prefix of its subnet): set with `ip`.
    pub ip6: Vec<Ipv6Addr>,
    /// Other IPv6 source prefixes it may use.
    pub allowed6: Vec<(Ipv6Addr, u8)>,
    /// The address in its subnet's /64 chosen for it (None: the one its
    /// MAC gives, SLAAC's).
    pub chosen6: Option<Ipv6Addr>,
}

impl PortSecurity {
    /// Whether the port's traffic is checked at all.
    pub fn enabled(&self) -> bool {
        self.ip.is_some()
    }

    /// Whether the port may send from `ip`.
    pub fn may_use(&self, ip: Ipv4Addr) -> bool {
        self.ip == Some(ip) || self.allowed.iter().any(|(n, l)| contains(*n, *l, ip))
    }

    /// Whether the port may send from the IPv6 address `ip`.
    pub fn may_use6(&self, ip: Ipv6Addr) -> bool {
        self.ip6.contains(&ip) || self.allowed6.iter().any(|(n, l)| contains6(*n, *l, ip))
    }

    /// The addresses remote-group rules know the port by.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = self.ip.map(IpAddr::V4);
        v4.into_iter()
            .chain(self.ip6.iter().map(|a| IpAddr::V6(*a)))
            .collect()
    }
}

/// Every group, and which addresses belong to each (for remote-group rules).
#[derive(Debug, Default)]
pub struct Groups {
    /// Groups by id.
    pub groups: HashMap<GroupId, SecurityGroup>,
    members: HashMap<GroupId, HashSet<IpAddr>>,
}

impl Groups {
    /// Sets the groups the port at `ips` belongs to (replacing `old`).
    pub fn set_member(&mut self, ips: &[IpAddr], old: &[GroupId], new: &[GroupId]) {
        for g in old {
            if let Some(m) = self.members.get_mut(g) {
                for ip in ips {
                    m.remove(ip);
                }
            }
        }
        for g in new {
            self.members.entry(*g).or_default().extend(ips);
        }
    }

    /// Whether the rules of `groups` let `flow` through in `dir`.
    pub fn allows(&self, groups: &[GroupId], dir: Direction, flow: &Flow) -> bool {
        let remote = match dir {
            Direction::Ingress => flow.src,
            Direction::Egress => flow.dst,
        };
        let what = (flow.proto, PROTO_ICMP, flow.dport);
        self.allow(groups, dir, what, IpAddr::V4(remote))
    }

    /// Whether the rules of `groups` let the IPv6 `flow` through in `dir`.
    pub fn allows6(&self, groups: &[GroupId], dir: Direction, flow: &Flow6) -> bool {
        let remote = match dir {
            Direction::Ingress => flow.src,
            Direction::Egress => flow.dst,
        };
        let what = (flow.proto, PROTO_ICMPV6, flow.dport);
        self.allow(groups, dir, what, IpAddr::V6(remote))
    }

    /// Whether a rule of `groups` in `dir` admits a packet of `(protocol,
    /// the family's ICMP protocol, destination port)` with `remote` at the
    /// other end.
    fn allow(
        &self,
        groups: &[GroupId],
        dir: Direction,
        (proto, icmp, dport): (u8, u8, u16),
        remote: IpAddr,
    ) -> bool {
        groups
            .iter()
            .filter_map(|g| self.groups.get(g))
            .flat_map(|g| g.rules.values())
            .any(|r| r.direction == dir && r.admits(proto, icmp, dport) && self.from(r, remote))
    }

    /// Whether `remote` is the other end `r` admits.
    fn from(&self, r: &Rule, remote: IpAddr) -> bool {
        match (r.remote, remote) {
            (Remote::Any, _) => true,
            (Remote::Cidr(net, len), IpAddr::V4(ip)) => contains(net, len, ip),
            (Remote::Cidr6(net, len), IpAddr::V6(ip)) => contains6(net, len, ip),
            (Remote::Cidr(..) | Remote::Cidr6(..), _) => false,
            (Remote::Group(g), ip) => self.members.get(&g).is_some_and(|m| m.contains(&ip)),
        }
    }
}

impl Rule {
    /// Whether the rule's protocol and ports admit a packet of `proto` to
    /// `dport` (`icmp`: the family's ICMP protocol number).
    fn admits(&self, proto: u8, icmp: u8, dport: u16) -> bool {
        let p = match self.protocol {
            Protocol::Any => true,
            Protocol::Tcp => proto == PROTO_TCP,
            Protocol::Udp => proto == PROTO_UDP,
            Protocol::Icmp => proto == icmp,
        };
        let ports = match self.protocol {
            Protocol::Tcp | Protocol::Udp => (self.ports.0..=self.ports.1).contains(&dport),
            _ => true,
        };
        p && ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(proto: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> Flow {
        Flow {
            proto,
            src: src.into(),
            dst: dst.into(),
            sport: 40000,
            dport,
        }
    }

    #[test]
    fn rules_match_protocol_ports_and_remote() {
        let mut gs = Groups::default();
        let web = GroupId(1);
        let admin = GroupId(2);
        let mut g = SecurityGroup::new("web".into());
        g.add(Rule::parse("ingress", "tcp", (80, 443), "", None).unwrap());
        g.add(Rule::parse("ingress", "tcp", (22, 22), "", Some(admin)).unwrap());
        g.add(Rule::parse("ingress", "icmp", (0, 0), "192.168.0.0/16", None).unwrap());
        gs.groups.insert(web, g);
        gs.groups.insert(admin, SecurityGroup::new("admin".into()));
        gs.set_member(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))], &[], &[admin]);
        let i = Direction::Ingress;
        assert!(gs.allows(
            &[web],
            i,
            &flow(PROTO_TCP, [1, 2, 3, 4], [10, 0, 0, 5], 443)
        ));
        assert!(!gs.allows(
            &[web],
            i,
            &flow(PROTO_TCP, [1, 2, 3, 4], [10, 0, 0, 5], 444)
        ));
        assert!(!gs.allows(&[web], i, &flow(PROTO_UDP, [1, 2, 3, 4], [10, 0, 0, 5], 80)));
        assert!(gs.allows(
            &[web],
            i,
            &flow(PROTO_TCP, [10, 0, 0, 9], [10, 0, 0, 5], 22)
        ));
        assert!(!gs.allows(
            &[web],
            i,
            &flow(PROTO_TCP, [10, 0, 0, 8], [10, 0, 0, 5], 22)
        ));
        assert!(gs.allows(
            &[web],
            i,
            &flow(PROTO_ICMP, [192, 168, 7, 1], [10, 0, 0, 5], 0)
        ));
        assert!(!gs.allows(
            &[web],
            i,
            &flow(PROTO_ICMP, [172, 16, 0, 1], [10, 0, 0, 5], 0)
        ));
        // Nothing allows egress; no group allows nothing.
        assert!(!gs.allows(
            &[web],
            Direction::Egress,
            &flow(PROTO_TCP, [10, 0, 0, 5], [1, 2, 3, 4], 80)
        ));
        assert!(!gs.allows(&[], i, &flow(PROTO_TCP, [1, 2, 3, 4], [10, 0, 0, 5], 80)));
        // Leaving the group takes the address out.
        gs.set_member(&[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))], &[admin], &[]);
        assert!(!gs.allows(
            &[web],
            i,
            &flow(PROTO_TCP, [10, 0, 0, 9], [10, 0, 0, 5], 22)
        ));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        assert!(matches!(
            Rule::parse("in", "tcp", (0, 0), "", None),
            Err(RuleError::Direction(_))
        ));
        assert!(matches!(
            Rule::parse("ingress", "sctp", (0, 0), "", None),
            Err(RuleError::Protocol(_))
        ));
        assert!(matches!(
            Rule::parse("ingress", "tcp", (90, 80), "", None),
            Err(RuleError::Ports(..))
        ));
        assert!(matches!(
            Rule::parse("ingress", "icmp", (1, 2), "", None),
            Err(RuleError::Ports(..))
        ));
        assert!(matches!(
            Rule::parse("ingress", "any", (0, 0), "10.0.0.1/24", None),
            Err(RuleError::Cidr(_))
        ));
        assert!(matches!(
            Rule::parse("ingress", "any", (0, 0), "10.0.0.0/24", Some(GroupId(1))),
            Err(RuleError::TwoRemotes)
        ));
        assert_eq!(
            parse_cidr("10.1.0.0/16"),
            Some((Ipv4Addr::new(10, 1, 0, 0), 16))
        );
        assert_eq!(parse_cidr("0.0.0.0/0"), Some((Ipv4Addr::UNSPECIFIED, 0)));
    }

    #[test]
    fn ipv6_flows_meet_ipv6_prefixes_groups_and_icmpv6() {
        let mut gs = Groups::default();
        let (web, admin) = (GroupId(1), GroupId(2));
        let mut g = SecurityGroup::new("web".into());
        g.add(Rule::parse("ingress", "tcp", (22, 22), "2001:db8::/32", None).unwrap());
        g.add(Rule::parse("ingress", "tcp", (80, 80), "10.0.0.0/8", None).unwrap());
        g.add(Rule::parse("ingress", "icmp", (0, 0), "", Some(admin)).unwrap());
        gs.groups.insert(web, g);
        let me: Ipv6Addr = "fe80::1".parse().unwrap();
        let admin_ll: Ipv6Addr = "fe80::9".parse().unwrap();
        gs.set_member(&[IpAddr::V6(admin_ll)], &[], &[admin]);
        let f = |proto, src: &str, dport| Flow6 {
            proto,
            src: src.parse().unwrap(),
            dst: me,
            sport: 40000,
            dport,
        };
        let i = Direction::Ingress;
        assert!(gs.allows6(&[web], i, &f(PROTO_TCP, "2001:db8:5::1", 22)));
        assert!(!gs.allows6(&[web], i, &f(PROTO_TCP, "2001:db9::1", 22)));
        // An IPv4 prefix admits no IPv6 remote.
        assert!(!gs.allows6(&[web], i, &f(PROTO_TCP, "::ffff:10.0.0.1", 80)));
        // "icmp" is ICMPv6 here, from the group's IPv6 members.
        assert!(gs.allows6(&[web], i, &f(PROTO_ICMPV6, "fe80::9", 0)));
        assert!(!gs.allows6(&[web], i, &f(PROTO_ICMP, "fe80::9", 0)));
        assert!(!gs.allows6(&[web], i, &f(PROTO_ICMPV6, "fe80::8", 0)));
        assert_eq!(
            parse_cidr6("2001:db8::/32"),
            Some(("2001:db8::".parse().unwrap(), 32))
        );
        assert_eq!(parse_cidr6("2001:db8::1/32"), None, "host bits set");
        assert_eq!(parse_cidr6("::/129"), None);
        assert!(matches!(
            Rule::parse("ingress", "any", (0, 0), "2001:db8::1/64", None),
            Err(RuleError::Cidr(_))
        ));
    }
}
