//! What the node's networks are made of, above the switch: VPCs, networks,
//! subnets with address management, ports and security groups, by number.
//! The D-Bus objects are views of this; it checks every request before the
//! switch sees it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::dhcp::DhcpConfig;
use crate::flow::{slaac, PROTO_TCP, PROTO_UDP};
use crate::frame::Mac;
use crate::l2::{PortId, SegmentId};
use crate::nat::{Floating, Gateway, Gateway6, PortForward};
use crate::overlay::Encap;
use crate::persist::{
    FloatingRec, ForwardRec, GroupRec, Meta, NetworkRec, PersistError, PortRec, Snapshot, Store,
    SubnetRec, VpcRec,
};
use crate::port::Port;
use crate::qos::Limit;
use crate::router::{gateway_mac, Subnet, VpcId};
use crate::secgroup::{mask, parse_cidr, parse_cidr6, GroupId, Rule, RuleError};
use crate::switch::{Switch, SwitchError};

/// The security group every port is in unless it names others.
pub const DEFAULT_GROUP: GroupId = GroupId(1);

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A bad argument (the message says which and why).
    #[error("{0}")]
    Invalid(String),
    /// No such object.
    #[error("{0}")]
    NotFound(String),
    /// The switch failed.
    #[error(transparent)]
    Switch(#[from] SwitchError),
    /// A security group rule is bad.
    #[error(transparent)]
    Rule(#[from] RuleError),
}

type Result<T> = std::result::Result<T, FabricError>;

fn invalid(msg: impl Into<String>) -> FabricError {
    FabricError::Invalid(msg.into())
}

/// A network's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// Untagged.
    Flat,
    /// One 802.1Q VLAN.
    Vlan(u16),
    /// A VXLAN overlay across nodes.
    Overlay(u32),
}

impl Kind {
    /// Its name on D-Bus.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Flat => "flat",
            Kind::Vlan(_) => "vlan",
            Kind::Overlay(_) => "overlay",
        }
    }
}

/// A network.
#[derive(Debug, Clone)]
pub struct Network {
    /// Name, unique on the node.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Its VPC.
    pub vpc: Option<u32>,
    /// Its subnet.
    pub subnet: Option<u32>,
    /// Tunnel endpoints of the other nodes (overlay networks).
    pub remotes: Vec<IpAddr>,
    /// Whether it is bridged to the node's uplink.
    pub uplink: bool,
}

/// A subnet's settings beyond its prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubnetSettings {
    /// Gateway address (None: the first host address).
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers for DHCP after the gateway's own (which answers for VM
    /// names and refuses others).
    pub dns: Vec<Ipv4Addr>,
    /// DNS domain of VM names.
    pub domain: String,
    /// MTU for the guests.
    pub mtu: u16,
    /// DHCP lease time.
    pub lease: Duration,
    /// An external network's subnet: its gateway is a router outside
    /// (the VPC gateways' next hop); the switch neither answers for it nor
    /// serves DHCP there.
    pub external: bool,
    /// An IPv6 /64 for the VMs to form addresses in (SLAAC): the router
    /// advertises it and routes it within the VPC.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Guests get their IPv6 address by DHCPv6 instead of SLAAC.
    pub dhcp6: bool,
    /// IPv6 DNS servers after the router's own.
    pub dns6: Vec<Ipv6Addr>,
    /// The /64 leaves the VPC translated to the router's IPv6 address
    /// (NAT66) instead of routed.
    pub snat6: bool,
    /// Address ranges (first, last) kept for others: never handed out on
    /// their own, nor given when asked for (on an external network, the
    /// outside's routers and hosts).
    pub reserved: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl Default for SubnetSettings {
    fn default() -> Self {
        Self {
            external: false,
            ipv6: None,
            dhcp6: false,
            dns6: Vec::new(),
            snat6: false,
            reserved: Vec::new(),
            gateway: None,
            dns: Vec::new(),
            domain: String::new(),
            mtu: 1500,
            lease: Duration::from_secs(86_400),
        }
    }
}

/// A subnet and the addresses in use.
#[derive(Debug, Clone)]
pub struct SubnetEntry {
    /// Its network.
    pub network: u32,
    /// The routing part.
    pub subnet: Subnet,
    /// Its settings.
    pub settings: SubnetSettings,
    used: BTreeSet<Ipv4Addr>,
}

/// A port as the fabric knows it.
#[derive(Debug, Clone)]
pub struct PortEntry {
    /// The switch's port.
    pub port: Arc<Port>,
    /// Its network.
    pub network: u32,
    /// Its VM's name in DNS.
    pub name: String,
}

#[derive(Debug, Default)]
struct Registry {
    vpcs: BTreeMap<u32, String>,
    networks: BTreeMap<u32, Network>,
    subnets: BTreeMap<u32, SubnetEntry>,
    ports: BTreeMap<u32, PortEntry>,
    groups: BTreeMap<GroupId, String>,
    /// VPC -> (external network, gateway address).
    gateways: BTreeMap<u32, (u32, Ipv4Addr)>,
    floating: BTreeMap<u32, FloatingEntry>,
    forwards: BTreeMap<u32, ForwardEntry>,
    /// Peered VPCs, (lower id, higher id).
    peerings: BTreeSet<(u32, u32)>,
    next: u32,
    /// The uplink's TAP interface, as asked.
    uplink: Option<String>,
    /// The tunnel endpoint and encapsulation, as asked.
    tunnel: Option<(SocketAddr, Encap)>,
}

/// A port forward of a VPC's gateway address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardEntry {
    /// The VPC.
    pub vpc: u32,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// The gateway address's port.
    pub external_port: u16,
    /// The VM address it goes to.
    pub address: Ipv4Addr,
    /// And the VM's port.
    pub port: u16,
}

impl ForwardEntry {
    /// "tcp" or "udp".
    pub fn protocol(&self) -> &'static str {
        if self.proto == PROTO_TCP {
            "tcp"
        } else {
            "udp"
        }
    }

    /// What the switch is given.
    fn switched(&self) -> PortForward {
        PortForward {
            vpc: VpcId(self.vpc),
            proto: self.proto,
            external_port: self.external_port,
            inner: self.address,
            inner_port: self.port,
        }
    }
}

/// A floating IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingEntry {
    /// Its external network.
    pub network: u32,
    /// The address.
    pub ip: Ipv4Addr,
    /// The port it is bound to.
    pub port: Option<u32>,
}

impl Registry {
    fn id(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    /// Whether subnets of VPC `a` route to those of `b`: the same VPC or
    /// peers.
    fn joined(&self, a: u32, b: u32) -> bool {
        a == b || self.peerings.contains(&(a.min(b), a.max(b)))
    }

    /// The subnets of VPC `vpc`.
    fn vpc_subnets(&self, vpc: u32) -> impl Iterator<Item = &SubnetEntry> {
        self.subnets
            .values()
            .filter(move |s| s.subnet.vpc == Some(VpcId(vpc)))
    }
}

/// Parses a reserved range: "192.0.2.5", "192.0.2.5-192.0.2.9" or
/// "192.0.2.0/28".
pub fn parse_range(s: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if let Some((a, b)) = s.split_once('-') {
        let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        return (a <= b).then_some((a, b));
    }
    let (net, len) = parse_cidr(s)?;
    Some((net, Ipv4Addr::from(u32::from(net) | !mask(len))))
}

/// Checks that every range of `reserved` lies in `subnet`.
fn check_reserved(subnet: &Subnet, reserved: &[(Ipv4Addr, Ipv4Addr)]) -> Result<()> {
    match reserved
        .iter()
        .find(|(a, b)| !subnet.contains(*a) || !subnet.contains(*b))
    {
        Some((a, b)) => Err(invalid(format!(
            "reserved {a}-{b}: outside {}/{}",
            subnet.net, subnet.prefix
        ))),
        None => Ok(()),
    }
}

/// Whether subnets `a` and `b` share addresses.
fn overlap(a: &Subnet, b: &Subnet) -> bool {
    a.contains(b.net) || b.contains(a.net) || (a.prefix6.is_some() && a.prefix6 == b.prefix6)
}

/// The node's networks.
#[derive(Debug)]
pub struct Fabric {
    /// The switch under it.
    pub switch: Switch,
    reg: Mutex<Registry>,
    /// Where changes are saved (none: they are not).
    store: std::sync::OnceLock<Store>,
}

/// A VM name: a DNS label.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Fabric {
    /// A fabric whose port sockets go to `run_dir`, with the default
    /// security group: every port in it may reach the others, and anything
    /// may go out.
    pub fn new(run_dir: std::path::PathBuf) -> Result<Self> {
        Self::with_datapath_threads(run_dir, 1)
    }

    /// [`Fabric::new`] with `threads` data-path threads.
    pub fn with_datapath_threads(run_dir: std::path::PathBuf, threads: usize) -> Result<Self> {
        let switch = Switch::with_threads(run_dir, threads)?;
        switch.create_group(DEFAULT_GROUP, "default".into());
        for rule in [
            Rule::parse("egress", "any", (0, 0), "", None),
            Rule::parse("ingress", "any", (0, 0), "", Some(DEFAULT_GROUP)),
        ]
        .into_iter()
        .flatten()
        {
            let _ = switch.add_rule(DEFAULT_GROUP, rule);
        }
        let mut reg = Registry {
            next: DEFAULT_GROUP.0,
            ..Registry::default()
        };
        reg.groups.insert(DEFAULT_GROUP, "default".into());
        Ok(Self {
            switch,
            reg: Mutex::new(reg),
            store: std::sync::OnceLock::new(),
        })
    }

    /// Saves changes to `store` from now on ([`Fabric::save`]).
    pub fn keep_in(&self, store: Store) {
        let _ = self.store.set(store);
    }

    /// Saves the state, if the fabric keeps it in a store.
    pub fn save(&self) -> std::result::Result<(), PersistError> {
        match self.store.get() {
            Some(s) => s.save(|| self.snapshot()),
            None => Ok(()),
        }
    }

    /// Opens the TAP interface `name` as the node's uplink (see
    /// [`Switch::set_uplink`]).
    pub fn set_uplink(&self, name: &str) -> std::result::Result<(), SwitchError> {
        self.switch.set_uplink(name)?;
        self.reg().uplink = Some(name.to_owned());
        Ok(())
    }

    /// Opens the node's tunnel endpoint (see [`Switch::set_tunnel`]).
    /// Its address family is the underlay's: refused while overlay
    /// networks list remotes of the other.
    pub fn set_tunnel(&self, local: SocketAddr, encap: Encap) -> Result<SocketAddr> {
        let other = self
            .reg()
            .networks
            .values()
            .flat_map(|n| n.remotes.iter())
            .find(|r| r.is_ipv4() != local.is_ipv4())
            .copied();
        if let Some(r) = other {
            return Err(invalid(format!(
                "address {}: overlay networks list remote {r}, of the other family",
                local.ip()
            )));
        }
        let bound = self.switch.set_tunnel(local, encap)?;
        self.reg().tunnel = Some((local, encap));
        Ok(bound)
    }

    /// Everything the fabric was told, as it stands now.
    pub fn snapshot(&self) -> Snapshot {
        let reg = self.reg();
        let meta = Meta {
            next: reg.next,
            next_port: self.switch.next_port_id(),
            uplink: reg.uplink.clone(),
            tunnel: reg.tunnel.map(|(a, e)| (a, e.name().to_owned())),
        };
        let groups = reg
            .groups
            .iter()
            .filter_map(|(id, name)| {
                let (rules, next_rule) = self.switch.rules_state(*id)?;
                Some(GroupRec {
                    id: id.0,
                    name: name.clone(),
                    rules,
                    next_rule,
                })
            })
            .collect();
        let vpcs = reg
            .vpcs
            .iter()
            .map(|(id, name)| VpcRec {
                id: *id,
                name: name.clone(),
                gateway: reg.gateways.get(id).copied(),
                peers: reg
                    .peerings
                    .iter()
                    .filter(|(a, _)| a == id)
                    .map(|(_, b)| *b)
                    .collect(),
            })
            .collect();
        let networks = reg
            .networks
            .iter()
            .map(|(id, n)| NetworkRec {
                id: *id,
                name: n.name.clone(),
                kind: n.kind,
                vpc: n.vpc,
                uplink: n.uplink,
                remotes: n.remotes.clone(),
            })
            .collect();
        let subnets = reg
            .subnets
            .iter()
            .map(|(id, s)| SubnetRec {
                id: *id,
                network: s.network,
                cidr: format!("{}/{}", s.subnet.net, s.subnet.prefix),
                settings: SubnetSettings {
                    gateway: Some(s.subnet.gateway),
                    ..s.settings.clone()
                },
            })
            .collect();
        let ports = reg
            .ports
            .iter()
            .map(|(id, e)| {
                let sec = e.port.security();
                let md = e.port.metadata();
                PortRec {
                    id: *id,
                    network: e.network,
                    mac: e.port.mac,
                    ip: sec.ip,
                    name: e.name.clone(),
                    groups: sec.groups.iter().map(|g| g.0).collect(),
                    allowed: sec
                        .allowed
                        .iter()
                        .map(|(a, l)| format!("{a}/{l}"))
                        .chain(sec.allowed6.iter().map(|(a, l)| format!("{a}/{l}")))
                        .collect(),
                    ipv6: sec.chosen6,
                    qos: e.port.qos(),
                    user_data: md.user_data,
                    ssh_keys: md.ssh_keys,
                    mirror: e.port.mirror_target().map(|p| p.0),
                }
            })
            .collect();
        let floating = reg
            .floating
            .iter()
            .map(|(id, f)| FloatingRec {
                id: *id,
                network: f.network,
                ip: f.ip,
                port: f.port,
                qos: self.switch.floating_traffic(f.ip).0,
            })
            .collect();
        let forwards = reg
            .forwards
            .iter()
            .map(|(id, f)| ForwardRec {
                id: *id,
                vpc: f.vpc,
                protocol: f.protocol().to_owned(),
                external_port: f.external_port,
                address: f.address,
                port: f.port,
            })
            .collect();
        Snapshot {
            meta,
            groups,
            vpcs,
            networks,
            subnets,
            ports,
            floating,
            forwards,
        }
    }

    /// Makes `id` the next id the registry hands out.
    fn next_is(&self, id: u32) {
        self.reg().next = id.saturating_sub(1);
    }

    /// Builds what `snap` describes, on a fresh fabric, through the same
    /// checks as requests: same ids, MACs, addresses and sockets. What
    /// cannot come back (an uplink interface gone, a tunnel address no
    /// longer the node's) is left out and described in the list returned;
    /// the rest carries on.
    pub fn restore(&self, snap: &Snapshot) -> Vec<String> {
        let mut failed = Vec::new();
        let mut check = |what: String, r: Result<u32>, want: u32| match r {
            Ok(got) if got == want => {}
            Ok(got) => failed.push(format!("{what}: came back as {got}")),
            Err(e) => failed.push(format!("{what}: {e}")),
        };
        if let Some(name) = &snap.meta.uplink {
            let r = self.set_uplink(name).map(|()| 0).map_err(Into::into);
            check(format!("uplink {name}"), r, 0);
        }
        if let Some((addr, encap)) = &snap.meta.tunnel {
            let r = match Encap::parse(encap) {
                Some(e) => self.set_tunnel(*addr, e).map(|_| 0),
                None => Err(invalid(format!("encapsulation {encap:?}"))),
            };
            check(format!("tunnel endpoint {addr}"), r, 0);
        }
        for g in snap.groups.iter().filter(|g| g.id != DEFAULT_GROUP.0) {
            self.next_is(g.id);
            let r = self.create_group(&g.name).map(|id| id.0);
            check(format!("security group {}", g.id), r, g.id);
        }
        // Rules after every group: they may name another as the remote.
        for g in &snap.groups {
            let r = self
                .switch
                .restore_rules(GroupId(g.id), g.rules.clone(), g.next_rule)
                .map(|()| g.id)
                .map_err(Into::into);
            check(format!("rules of security group {}", g.id), r, g.id);
        }
        for v in &snap.vpcs {
            self.next_is(v.id);
            check(format!("VPC {}", v.id), self.create_vpc(&v.name), v.id);
        }
        for n in &snap.networks {
            self.next_is(n.id);
            let r = self
                .create_network(&n.name, n.kind, n.vpc, n.uplink)
                .and_then(|id| {
                    if !n.remotes.is_empty() {
                        self.set_remotes(id, n.remotes.clone())?;
                    }
                    Ok(id)
                });
            check(format!("network {}", n.id), r, n.id);
        }
        for s in &snap.subnets {
            self.next_is(s.id);
            let r = self.create_subnet(s.network, &s.cidr, s.settings.clone());
            check(format!("subnet {}", s.id), r, s.id);
        }
        for v in &snap.vpcs {
            if let Some((net, ip)) = v.gateway {
                let r = self.set_vpc_gateway(v.id, net, Some(ip)).map(|_| v.id);
                check(format!("gateway of VPC {}", v.id), r, v.id);
            }
            for p in &v.peers {
                let r = self.peer_vpcs(v.id, *p).map(|()| v.id);
                check(format!("peering of VPCs {} and {p}", v.id), r, v.id);
            }
        }
        for f in &snap.forwards {
            self.next_is(f.id);
            let r = self.add_port_forward(f.vpc, &f.protocol, f.external_port, f.address, f.port);
            check(format!("port forward {}", f.id), r, f.id);
        }
        for p in &snap.ports {
            self.switch.set_next_port_id(p.id);
            let groups = p.groups.iter().map(|g| GroupId(*g)).collect();
            let r = self
                .create_port(p.network, Some(p.mac), p.ip, &p.name, Some(groups))
                .and_then(|e| {
                    let id = e.port.id.0;
                    if !p.allowed.is_empty() {
                        self.set_allowed_addresses(id, &p.allowed)?;
                    }
                    if let Some(a) = p.ipv6 {
                        self.set_port_ipv6(id, a)?;
                    }
                    e.port.set_qos(p.qos.0, p.qos.1);
                    e.port
                        .set_metadata(p.user_data.clone(), p.ssh_keys.clone(), None);
                    Ok(id)
                });
            check(format!("port {}", p.id), r, p.id);
        }
        // Mirrors once every port is back.
        for p in &snap.ports {
            if let Some(t) = p.mirror {
                let r = self
                    .switch
                    .set_mirror(PortId(p.id), Some(PortId(t)))
                    .map(|()| p.id)
                    .map_err(Into::into);
                check(format!("mirror of port {}", p.id), r, p.id);
            }
        }
        for f in &snap.floating {
            self.next_is(f.id);
            let r = self
                .create_floating_ip(f.network, Some(f.ip))
                .and_then(|(id, _)| {
                    if f.port.is_some() {
                        self.associate_floating_ip(id, f.port)?;
                    }
                    self.set_floating_qos(id, f.qos.0, f.qos.1)?;
                    Ok(id)
                });
            check(format!("floating IP {}", f.id), r, f.id);
        }
        {
            let mut reg = self.reg();
            reg.next = reg.next.max(snap.meta.next);
        }
        self.switch.set_next_port_id(snap.meta.next_port);
        failed
    }

    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a VPC: the subnets of its networks route to each other.
    pub fn create_vpc(&self, name: &str) -> Result<u32> {
        let mut reg = self.reg();
        check_name(name)?;
        if reg.vpcs.values().any(|n| n == name) {
            return Err(invalid(format!("a VPC named {name:?} exists")));
        }
        let id = reg.id();
        reg.vpcs.insert(id, name.to_owned());
        Ok(id)
    }

    /// The VPC's name.
    pub fn vpc(&self, id: u32) -> Option<String> {
        self.reg().vpcs.get(&id).cloned()
    }

    /// Creates a network (one L2 segment) of `kind`, in `vpc` if given.
    pub fn create_network(
        &self,
        name: &str,
        kind: Kind,
        vpc: Option<u32>,
        uplink: bool,
    ) -> Result<u32> {
        let mut reg = self.reg();
        if uplink && matches!(kind, Kind::Overlay(_)) {
            return Err(invalid("an overlay network has no uplink"));
        }
        if uplink
            && kind == Kind::Flat
            && reg
                .networks
                .values()
                .any(|n| n.uplink && n.kind == Kind::Flat)
        {
            return Err(invalid("another flat network has the uplink untagged"));
        }
        check_name(name)?;
        if reg.networks.values().any(|n| n.name == name) {
            return Err(invalid(format!("a network named {name:?} exists")));
        }
        if let Kind::Vlan(v) = kind {
            if !(1..=4094).contains(&v) {
                return Err(invalid(format!("vlan {v}: want 1 to 4094")));
            }
            if reg.networks.values().any(|n| n.kind == kind) {
                return Err(invalid(format!("VLAN {v} has a network")));
            }
        }
        if let Kind::Overlay(v) = kind {
            if !(1..=crate::overlay::MAX_VNI).contains(&v) {
                return Err(invalid(format!(
                    "vni {v}: want 1 to {}",
                    crate::overlay::MAX_VNI
                )));
            }
            if reg.networks.values().any(|n| n.kind == kind) {
                return Err(invalid(format!("VNI {v} has a network")));
            }
        }
        if let Some(v) = vpc {
            if !reg.vpcs.contains_key(&v) {
                return Err(FabricError::NotFound(format!("no VPC {v}")));
            }
        }
        let id = reg.id();
        if let Kind::Overlay(vni) = kind {
            self.switch.set_overlay(SegmentId(id), vni);
        }
        if uplink {
            let tag = match kind {
                Kind::Vlan(v) => Some(v),
                _ => None,
            };
            self.switch.set_uplinked(SegmentId(id), Some(tag));
        }
        reg.networks.insert(
            id,
            Network {
                name: name.to_owned(),
                kind,
                vpc,
                subnet: None,
                remotes: Vec::new(),
                uplink,
            },
        );
        Ok(id)
    }

    /// The tunnel endpoints of the other nodes with ports on overlay
    /// network `id` (IPv4 or IPv6, the family of this node's endpoint).
    pub fn set_remotes(&self, id: u32, remotes: Vec<IpAddr>) -> Result<()> {
        let mut reg = self.reg();
        let tunnel = reg.tunnel;
        let n = reg
            .networks
            .get_mut(&id)
            .ok_or_else(|| FabricError::NotFound(format!("no network {id}")))?;
        if !matches!(n.kind, Kind::Overlay(_)) {
            return Err(invalid(format!("network {:?} is not an overlay", n.name)));
        }
        let unicast = |r: &IpAddr| match r {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
            // Link-local addresses would need an interface to go out of.
            IpAddr::V6(a) => {
                !(a.is_unspecified() || a.is_multicast() || a.segments()[0] & 0xffc0 == 0xfe80)
            }
        };
        if let Some(r) = remotes.iter().find(|r| !unicast(r)) {
            return Err(invalid(format!(
                "remote {r}: not a unicast address (nor a link-local one)"
            )));
        }
        if let Some((local, _)) = tunnel {
            if let Some(r) = remotes.iter().find(|r| r.is_ipv4() != local.is_ipv4()) {
                return Err(invalid(format!(
                    "remote {r}: the node's tunnel endpoint {} is of the other family",
                    local.ip()
                )));
            }
        }
        n.remotes.clone_from(&remotes);
        self.switch.set_remotes(SegmentId(id), remotes);
        Ok(())
    }

    /// Deletes network `id` and its subnet; refused while ports, a VPC
    /// gateway or floating IPs use it.
    pub fn delete_network(&self, id: u32) -> Result<Option<u32>> {
        let mut reg = self.reg();
        let n = reg
            .networks
            .get(&id)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no network {id}")))?;
        if reg.ports.values().any(|p| p.network == id) {
            return Err(invalid(format!("network {:?} has ports", n.name)));
        }
        if reg.gateways.values().any(|(net, _)| *net == id) {
            return Err(invalid(format!("network {:?} holds a VPC gateway", n.name)));
        }
        if reg.floating.values().any(|f| f.network == id) {
            return Err(invalid(format!("network {:?} holds floating IPs", n.name)));
        }
        self.switch.remove_segment(SegmentId(id));
        if let Some(s) = n.subnet {
            reg.subnets.remove(&s);
        }
        reg.networks.remove(&id);
        Ok(n.subnet)
    }

    /// The network `id`.
    pub fn network(&self, id: u32) -> Option<Network> {
        self.reg().networks.get(&id).cloned()
    }

    /// Creates the IPv4 subnet `cidr` on `network` (one per network): its
    /// gateway answers ARP, ping, DHCP and DNS and routes within the VPC.
    pub fn create_subnet(&self, network: u32, cidr: &str, settings: SubnetSettings) -> Result<u32> {
        let mut reg = self.reg();
        let (net, prefix) = parse_cidr(cidr).ok_or_else(|| {
            invalid(format!(
                "cidr {cidr:?}: want a network prefix like 10.0.0.0/24"
            ))
        })?;
        if !(8..=29).contains(&prefix) {
            return Err(invalid(format!("cidr {cidr:?}: prefix length 8 to 29")));
        }
        let n = reg
            .networks
            .get(&network)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no network {network}")))?;
        if n.subnet.is_some() {
            return Err(invalid(format!("network {:?} has a subnet", n.name)));
        }
        if settings.mtu < 576 || settings.mtu > 9000 {
            return Err(invalid(format!("mtu {}: 576 to 9000", settings.mtu)));
        }
        if !settings.domain.is_empty() && !settings.domain.split('.').all(valid_hostname) {
            return Err(invalid(format!(
                "domain {:?}: not a DNS name",
                settings.domain
            )));
        }
        let broadcast = Ipv4Addr::from(u32::from(net) | !mask(prefix));
        let gateway = settings
            .gateway
            .unwrap_or(Ipv4Addr::from(u32::from(net) + 1));
        let sub = Subnet {
            vpc: n.vpc.map(VpcId),
            net,
            prefix,
            gateway,
            gateway_mac: gateway_mac(SegmentId(network)),
            domain: settings.domain.clone(),
            prefix6: settings.ipv6.map(|(p, _)| p),
            mtu: settings.mtu,
            dhcp6: settings.dhcp6,
            dns6: settings.dns6.clone(),
            snat6: settings.snat6,
        };
        if let Some((p, len)) = settings.ipv6 {
            let first = p.segments()[0];
            let unicast = first & 0xe000 == 0x2000 || first & 0xfe00 == 0xfc00;
            if len != 64 || !unicast {
                return Err(invalid(format!(
                    "ipv6 {p}/{len}: want a global or unique-local /64 (guests form their addresses in it)"
                )));
            }
        }
        if settings.ipv6.is_none() {
            if settings.dhcp6 {
                return Err(invalid("ipv6_mode dhcpv6: the subnet has no ipv6 /64"));
            }
            if settings.snat6 {
                return Err(invalid("ipv6_snat: the subnet has no ipv6 /64"));
            }
            if let Some(d) = settings.dns6.first() {
                return Err(invalid(format!(
                    "dns {d}: an IPv6 server needs the subnet's ipv6 /64"
                )));
            }
        }
        if let Some(d) = settings
            .dns6
            .iter()
            .find(|d| d.is_unspecified() || d.is_multicast())
        {
            return Err(invalid(format!("dns {d}: not a unicast address")));
        }
        check_reserved(&sub, &settings.reserved)?;
        if !sub.contains(gateway) || gateway == net || gateway == broadcast {
            return Err(invalid(format!(
                "gateway {gateway}: not a host address of {cidr}"
            )));
        }
        // Subnets of one VPC, or of peered VPCs, route to each other: they
        // may not overlap.
        if let Some(vpc) = n.vpc {
            let routed = |s: &&SubnetEntry| s.subnet.vpc.is_some_and(|o| reg.joined(vpc, o.0));
            let same6 = |s: &&SubnetEntry| sub.prefix6.is_some() && s.subnet.prefix6 == sub.prefix6;
            if let Some(c) = reg.subnets.values().filter(routed).find(same6) {
                return Err(invalid(format!(
                    "ipv6 {}/64 is taken by {}/{} in the VPC or a peered one",
                    sub.prefix6.unwrap_or(Ipv6Addr::UNSPECIFIED),
                    c.subnet.net,
                    c.subnet.prefix
                )));
            }
            let clash = reg.subnets.values().find(|s| {
                s.subnet.vpc.is_some_and(|o| reg.joined(vpc, o.0)) && overlap(&s.subnet, &sub)
            });
            if let Some(c) = clash {
                let whose = if c.subnet.vpc == Some(VpcId(vpc)) {
                    "the VPC"
                } else {
                    "a peered VPC"
                };
                return Err(invalid(format!(
                    "cidr {cidr} overlaps {}/{}, a subnet of {whose}",
                    c.subnet.net, c.subnet.prefix
                )));
            }
        }
        let id = reg.id();
        let mut dns = vec![gateway];
        dns.extend(settings.dns.iter().copied().filter(|d| *d != gateway));
        let dhcp = DhcpConfig {
            gateway,
            gateway_mac: sub.gateway_mac,
            prefix,
            // No dynamic pool: every port has its fixed address.
            pool: (broadcast, net),
            dns,
            mtu: settings.mtu,
            lease: settings.lease,
            reservations: Default::default(),
            domain: settings.domain.clone(),
        };
        if !settings.external {
            self.switch
                .set_subnet(SegmentId(network), sub.clone(), dhcp);
        }
        reg.subnets.insert(
            id,
            SubnetEntry {
                network,
                subnet: sub,
                settings,
                used: BTreeSet::from([net, gateway, broadcast]),
            },
        );
        if let Some(n) = reg.networks.get_mut(&network) {
            n.subnet = Some(id);
        }
        Ok(id)
    }

    /// The subnet `id`.
    pub fn subnet(&self, id: u32) -> Option<SubnetEntry> {
        self.reg().subnets.get(&id).cloned()
    }

    /// Creates a port on `network` for a VM NIC. On a network with a subnet
    /// it gets `ip` (or the first free address) and is filtered by its
    /// `groups` (None: the default group).
    pub fn create_port(
        &self,
        network: u32,
        mac: Option<Mac>,
        ip: Option<Ipv4Addr>,
        name: &str,
        groups: Option<Vec<GroupId>>,
    ) -> Result<PortEntry> {
        let mut reg = self.reg();
        let n = reg
            .networks
            .get(&network)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no network {network}")))?;
        if !name.is_empty() && !valid_hostname(name) {
            return Err(invalid(format!(
                "name {name:?}: letters, digits and '-', at most 63"
            )));
        }
        let groups = groups.unwrap_or_else(|| vec![DEFAULT_GROUP]);
        if let Some(g) = groups.iter().find(|g| !reg.groups.contains_key(g)) {
            return Err(FabricError::NotFound(format!("no security group {}", g.0)));
        }
        if let Some(m) = mac {
            if m[0] & 1 != 0 || m == [0; 6] {
                return Err(invalid("mac: not a unicast address"));
            }
            if reg
                .ports
                .values()
                .any(|p| p.network == network && p.port.mac == m)
            {
                return Err(invalid("mac: another port on the network has it"));
            }
        }
        if !name.is_empty()
            && reg
                .ports
                .values()
                .any(|p| p.network == network && p.name == name)
        {
            return Err(invalid(format!(
                "name {name:?}: another port on the network has it"
            )));
        }
        let address = match (n.subnet, ip) {
            (None, None) => None,
            (None, Some(ip)) => {
                return Err(invalid(format!(
                    "ip {ip}: network {:?} has no subnet",
                    n.name
                )))
            }
            (Some(_), want) => Some(Self::take_address(&mut reg, network, want)?),
        };
        let port = match self.switch.add_port_with(SegmentId(network), |id| {
            mac.unwrap_or_else(|| generated_mac(id.0))
        }) {
            Ok(p) => p,
            Err(e) => {
                Self::release_address(&mut reg, network, address);
                return Err(e.into());
            }
        };
        let id = port.id;
        let done = self
            .switch
            .set_port_address(id, address, name)
            .and_then(|()| self.switch.set_port_groups(id, groups));
        if let Err(e) = done {
            let _ = self.switch.remove_port(id);
            Self::release_address(&mut reg, network, address);
            return Err(e.into());
        }
        let entry = PortEntry {
            port,
            network,
            name: name.to_owned(),
        };
        reg.ports.insert(id.0, entry.clone());
        Ok(entry)
    }

    /// Gives `ip` back to `network`'s subnet.
    fn release_address(reg: &mut Registry, network: u32, ip: Option<Ipv4Addr>) {
        let subnet = reg.networks.get(&network).and_then(|n| n.subnet);
        if let (Some(ip), Some(s)) = (ip, subnet.and_then(|s| reg.subnets.get_mut(&s))) {
            s.used.remove(&ip);
        }
    }

    /// Takes `ip` (or the first free address) in `network`'s subnet.
    fn take_address(reg: &mut Registry, network: u32, ip: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let n = reg
            .networks
            .get(&network)
            .ok_or_else(|| FabricError::NotFound(format!("no network {network}")))?;
        let name = n.name.clone();
        let s = n
            .subnet
            .and_then(|s| reg.subnets.get_mut(&s))
            .ok_or_else(|| invalid(format!("network {name:?} has no subnet")))?;
        let reserved = |ip: &Ipv4Addr| {
            s.settings
                .reserved
                .iter()
                .any(|(a, b)| (a..=b).contains(&ip))
        };
        let ip = match ip {
            Some(ip) if !s.subnet.contains(ip) => {
                return Err(invalid(format!("ip {ip}: outside the subnet")))
            }
            Some(ip) if s.used.contains(&ip) => return Err(invalid(format!("ip {ip}: in use"))),
            Some(ip) if reserved(&ip) => return Err(invalid(format!("ip {ip}: reserved"))),
            Some(ip) => ip,
            None => {
                let first = u32::from(s.subnet.net);
                let last = first | !mask(s.subnet.prefix);
                (first..=last)
                    .map(Ipv4Addr::from)
                    .find(|ip| !s.used.contains(ip) && !reserved(ip))
                    .ok_or_else(|| invalid("the subnet has no free address"))?
            }
        };
        s.used.insert(ip);
        Ok(ip)
    }

    /// Gives VPC `vpc` its way out: a router address (`ip`, or the first
    /// free one) on external network `network`, whose subnet's gateway is
    /// the next hop. Its VMs reach the outside through SNAT.
    pub fn set_vpc_gateway(
        &self,
        vpc: u32,
        network: u32,
        ip: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let mut reg = self.reg();
        if !reg.vpcs.contains_key(&vpc) {
            return Err(FabricError::NotFound(format!("no VPC {vpc}")));
        }
        if reg.gateways.contains_key(&vpc) {
            return Err(invalid("the VPC has a gateway"));
        }
        let n = reg
            .networks
            .get(&network)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no network {network}")))?;
        let sub = n
            .subnet
            .and_then(|s| reg.subnets.get(&s))
            .filter(|s| s.settings.external)
            .cloned()
            .ok_or_else(|| invalid(format!("network {:?} has no external subnet", n.name)))?;
        let ip = Self::take_address(&mut reg, network, ip)?;
        let v = vpc.to_be_bytes();
        let mac = [0x02, 0xa7, 0xfe, v[1], v[2], v[3]];
        self.switch.set_gateway(
            VpcId(vpc),
            Some(Gateway {
                segment: SegmentId(network),
                ip,
                mac,
                net: sub.subnet.net,
                prefix: sub.subnet.prefix,
                next_hop: sub.subnet.gateway,
                // On the external /64: the address its MAC gives, the
                // outside router at ::1.
                v6: sub.subnet.prefix6.map(|p| Gateway6 {
                    ip: slaac(p, mac),
                    net: p,
                    next_hop: Ipv6Addr::from(u128::from(p) | 1),
                }),
            }),
        );
        reg.gateways.insert(vpc, (network, ip));
        Ok(ip)
    }

    /// VPC `vpc`'s gateway: (external network, address).
    pub fn vpc_gateway(&self, vpc: u32) -> Option<(u32, Ipv4Addr)> {
        self.reg().gateways.get(&vpc).copied()
    }

    /// Peers VPCs `a` and `b`: their subnets route to each other (security
    /// groups apply as within a VPC; names stay each VPC's own). Refused
    /// while any of their subnets overlap.
    pub fn peer_vpcs(&self, a: u32, b: u32) -> Result<()> {
        let mut reg = self.reg();
        for v in [a, b] {
            if !reg.vpcs.contains_key(&v) {
                return Err(FabricError::NotFound(format!("no VPC {v}")));
            }
        }
        if a == b {
            return Err(invalid("a VPC does not peer with itself"));
        }
        if reg.joined(a, b) {
            return Err(invalid("the VPCs are peered already"));
        }
        for x in reg.vpc_subnets(a) {
            if let Some(y) = reg.vpc_subnets(b).find(|y| overlap(&x.subnet, &y.subnet)) {
                return Err(invalid(format!(
                    "subnets {}/{} and {}/{} overlap",
                    x.subnet.net, x.subnet.prefix, y.subnet.net, y.subnet.prefix
                )));
            }
        }
        self.switch.set_peering(VpcId(a), VpcId(b), true);
        reg.peerings.insert((a.min(b), a.max(b)));
        Ok(())
    }

    /// Parts peered VPCs `a` and `b`: their subnets stop reaching each
    /// other.
    pub fn unpeer_vpcs(&self, a: u32, b: u32) -> Result<()> {
        let mut reg = self.reg();
        if a == b || !reg.peerings.remove(&(a.min(b), a.max(b))) {
            return Err(FabricError::NotFound(format!(
                "VPCs {a} and {b} are not peered"
            )));
        }
        self.switch.set_peering(VpcId(a), VpcId(b), false);
        Ok(())
    }

    /// The VPCs `vpc` is peered with.
    pub fn vpc_peers(&self, vpc: u32) -> Vec<u32> {
        self.reg()
            .peerings
            .iter()
            .filter_map(|&(x, y)| match (x == vpc, y == vpc) {
                (true, _) => Some(y),
                (_, true) => Some(x),
                _ => None,
            })
            .collect()
    }

    /// Forwards `protocol` ("tcp" or "udp") port `external_port` of VPC
    /// `vpc`'s gateway address to `address`:`port`, an address in one of
    /// the VPC's subnets; replies leave from the gateway's port. The
    /// VM's ingress rules apply. Returns the forward's id.
    pub fn add_port_forward(
        &self,
        vpc: u32,
        protocol: &str,
        external_port: u16,
        address: Ipv4Addr,
        port: u16,
    ) -> Result<u32> {
        let mut reg = self.reg();
        if !reg.vpcs.contains_key(&vpc) {
            return Err(FabricError::NotFound(format!("no VPC {vpc}")));
        }
        let proto = match protocol {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            other => return Err(invalid(format!("protocol {other:?}: want tcp or udp"))),
        };
        if external_port == 0 || port == 0 {
            return Err(invalid("ports are 1-65535"));
        }
        let Some(&(_, gw)) = reg.gateways.get(&vpc) else {
            return Err(invalid("the VPC has no gateway"));
        };
        if !reg.vpc_subnets(vpc).any(|s| s.subnet.contains(address)) {
            return Err(invalid(format!(
                "{address} is in none of the VPC's subnets"
            )));
        }
        for f in reg
            .forwards
            .values()
            .filter(|f| f.vpc == vpc && f.proto == proto)
        {
            if f.external_port == external_port {
                return Err(invalid(format!(
                    "{protocol} port {external_port} of the gateway is forwarded already"
                )));
            }
            if (f.address, f.port) == (address, port) {
                return Err(invalid(format!(
                    "{protocol} {address}:{port} has a forward already"
                )));
            }
        }
        let id = reg.id();
        let entry = ForwardEntry {
            vpc,
            proto,
            external_port,
            address,
            port,
        };
        self.switch.set_forward(gw, entry.switched(), true);
        reg.forwards.insert(id, entry);
        Ok(id)
    }

    /// Removes VPC `vpc`'s port forward `id`; its connections end.
    pub fn remove_port_forward(&self, vpc: u32, id: u32) -> Result<()> {
        let mut reg = self.reg();
        if reg.forwards.get(&id).map(|f| f.vpc) != Some(vpc) {
            return Err(FabricError::NotFound(format!(
                "VPC {vpc} has no port forward {id}"
            )));
        }
        Self::drop_forward(&self.switch, &mut reg, id);
        Ok(())
    }

    fn drop_forward(switch: &Switch, reg: &mut Registry, id: u32) {
        let Some(f) = reg.forwards.remove(&id) else {
            return;
        };
        if let Some(&(_, gw)) = reg.gateways.get(&f.vpc) {
            switch.set_forward(gw, f.switched(), false);
        }
    }

    /// VPC `vpc`'s port forwards, by id.
    pub fn port_forwards(&self, vpc: u32) -> Vec<(u32, ForwardEntry)> {
        self.reg()
            .forwards
            .iter()
            .filter(|(_, f)| f.vpc == vpc)
            .map(|(id, f)| (*id, f.clone()))
            .collect()
    }

    /// Takes floating IP `ip` (or the first free one) on external network
    /// `network`.
    pub fn create_floating_ip(
        &self,
        network: u32,
        ip: Option<Ipv4Addr>,
    ) -> Result<(u32, Ipv4Addr)> {
        let mut reg = self.reg();
        let external = reg
            .networks
            .get(&network)
            .and_then(|n| n.subnet)
            .and_then(|s| reg.subnets.get(&s))
            .is_some_and(|s| s.settings.external);
        if !external {
            return Err(invalid(
                "floating IPs come from a network with an external subnet",
            ));
        }
        let ip = Self::take_address(&mut reg, network, ip)?;
        let id = reg.id();
        reg.floating.insert(
            id,
            FloatingEntry {
                network,
                ip,
                port: None,
            },
        );
        Ok((id, ip))
    }

    /// Floating IP `id`.
    pub fn floating_ip(&self, id: u32) -> Option<FloatingEntry> {
        self.reg().floating.get(&id).cloned()
    }

    /// Binds floating IP `id` to port `port` (None: unbinds it). The port
    /// must have an address in a VPC whose gateway is on the floating IP's
    /// network.
    pub fn associate_floating_ip(&self, id: u32, port: Option<u32>) -> Result<()> {
        let mut reg = self.reg();
        let f = reg
            .floating
            .get(&id)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no floating IP {id}")))?;
        let binding = match port {
            None => None,
            Some(p) => {
                let entry = reg
                    .ports
                    .get(&p)
                    .ok_or_else(|| FabricError::NotFound(format!("no port {p}")))?;
                let fixed = entry
                    .port
                    .security()
                    .ip
                    .ok_or_else(|| invalid("the port has no address"))?;
                let vpc = reg
                    .networks
                    .get(&entry.network)
                    .and_then(|n| n.vpc)
                    .ok_or_else(|| invalid("the port is in no VPC"))?;
                if reg.gateways.get(&vpc).map(|g| g.0) != Some(f.network) {
                    return Err(invalid(
                        "the port's VPC has no gateway on the floating IP's network",
                    ));
                }
                if reg
                    .floating
                    .values()
                    .any(|o| o.port == Some(p) && o.ip != f.ip)
                {
                    return Err(invalid("the port has a floating IP"));
                }
                Some(Floating {
                    vpc: VpcId(vpc),
                    fixed,
                })
            }
        };
        self.switch.set_floating(f.ip, binding);
        if let Some(e) = reg.floating.get_mut(&id) {
            e.port = port;
        }
        Ok(())
    }

    /// The ports mirrored to port `id`.
    pub fn mirrored_to(&self, id: u32) -> Vec<u32> {
        self.reg()
            .ports
            .iter()
            .filter(|(_, e)| e.port.mirror_target() == Some(PortId(id)))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The port `id`.
    pub fn port(&self, id: u32) -> Option<PortEntry> {
        self.reg().ports.get(&id).cloned()
    }

    /// Deletes port `id`: its VM's NIC is disconnected, its address freed.
    pub fn delete_port(&self, id: u32) -> Result<()> {
        let mut reg = self.reg();
        let entry = reg
            .ports
            .remove(&id)
            .ok_or_else(|| FabricError::NotFound(format!("no port {id}")))?;
        Self::release_address(&mut reg, entry.network, entry.port.security().ip);
        // Its floating IPs stay, bound to nothing: their traffic must not
        // reach whoever gets the address next.
        for f in reg.floating.values_mut().filter(|f| f.port == Some(id)) {
            self.switch.set_floating(f.ip, None);
            f.port = None;
        }
        self.switch.remove_port(PortId(id))?;
        Ok(())
    }

    /// Deletes VPC `id` once no network is in it; its gateway, port
    /// forwards and peerings go with it and the gateway's address returns
    /// to the external subnet.
    pub fn delete_vpc(&self, id: u32) -> Result<()> {
        let mut reg = self.reg();
        let name = reg
            .vpcs
            .get(&id)
            .cloned()
            .ok_or_else(|| FabricError::NotFound(format!("no VPC {id}")))?;
        if reg.networks.values().any(|n| n.vpc == Some(id)) {
            return Err(invalid(format!("VPC {name:?} has networks")));
        }
        // Its peerings end with it.
        let peers: Vec<(u32, u32)> = reg
            .peerings
            .iter()
            .filter(|(x, y)| *x == id || *y == id)
            .copied()
            .collect();
        for (x, y) in peers {
            reg.peerings.remove(&(x, y));
            self.switch.set_peering(VpcId(x), VpcId(y), false);
        }
        let forwards: Vec<u32> = reg
            .forwards
            .iter()
            .filter(|(_, f)| f.vpc == id)
            .map(|(k, _)| *k)
            .collect();
        for f in forwards {
            Self::drop_forward(&self.switch, &mut reg, f);
        }
        if let Some((network, ip)) = reg.gateways.remove(&id) {
            self.switch.set_gateway(VpcId(id), None);
            Self::release_address(&mut reg, network, Some(ip));
        }
        reg.vpcs.remove(&id);
        Ok(())
    }

    /// Deletes floating IP `id` (unbound first if bound); its address
    /// returns to the external subnet.
    pub fn delete_floating_ip(&self, id: u32) -> Result<()> {
        let mut reg = self.reg();
        let f = reg
            .floating
            .remove(&id)
            .ok_or_else(|| FabricError::NotFound(format!("no floating IP {id}")))?;
        if f.port.is_some() {
            self.switch.set_floating(f.ip, None);
        }
        self.switch.forget_floating(f.ip);
        Self::release_address(&mut reg, f.network, Some(f.ip));
        Ok(())
    }

    /// Sets floating IP `id`'s rate limits: towards its VM, from it (both
    /// policed).
    pub fn set_floating_qos(&self, id: u32, ingress: Limit, egress: Limit) -> Result<()> {
        let f = self
            .floating_ip(id)
            .ok_or_else(|| FabricError::NotFound(format!("no floating IP {id}")))?;
        self.switch.set_floating_qos(f.ip, ingress, egress);
        Ok(())
    }

    /// Sets subnet `id`'s reserved ranges (addresses never handed out);
    /// refused if one covers an address a port, gateway or floating IP
    /// holds.
    pub fn set_subnet_reserved(&self, id: u32, reserved: Vec<(Ipv4Addr, Ipv4Addr)>) -> Result<()> {
        let mut reg = self.reg();
        let s = reg
            .subnets
            .get_mut(&id)
            .ok_or_else(|| FabricError::NotFound(format!("no subnet {id}")))?;
        check_reserved(&s.subnet, &reserved)?;
        let broadcast = Ipv4Addr::from(u32::from(s.subnet.net) | !mask(s.subnet.prefix));
        let own = [s.subnet.net, s.subnet.gateway, broadcast];
        let held = s
            .used
            .iter()
            .filter(|ip| !own.contains(ip))
            .find(|ip| reserved.iter().any(|(a, b)| (a..=b).contains(ip)));
        if let Some(ip) = held {
            return Err(invalid(format!("reserved: {ip} is in use")));
        }
        s.settings.reserved = reserved;
        Ok(())
    }

    /// Lets port `id` also send from `allowed` ("10.0.0.5", "10.0.0.0/29",
    /// "2001:db8::5" or "2001:db8::/64"; replacing the list).
    pub fn set_allowed_addresses(&self, id: u32, allowed: &[String]) -> Result<()> {
        let reg = self.reg();
        if !reg.ports.contains_key(&id) {
            return Err(FabricError::NotFound(format!("no port {id}")));
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in allowed {
            match (parse_cidr(a), parse_cidr6(a)) {
                (Some(p), _) => v4.push(p),
                (_, Some(p)) => v6.push(p),
                _ => {
                    return Err(invalid(format!(
                        "allowed address {a:?}: want 10.0.0.5, 10.0.0.0/29, 2001:db8::5 or 2001:db8::/64"
                    )))
                }
            }
        }
        self.switch.set_port_allowed(PortId(id), v4, v6)?;
        Ok(())
    }

    /// Gives port `id` the IPv6 address `ip6` in its subnet's /64 instead
    /// of the one its MAC gives: a host address there (not the router's
    /// `::1` or the subnet-router `::`), not another port's.
    pub fn set_port_ipv6(&self, id: u32, ip6: Ipv6Addr) -> Result<()> {
        let reg = self.reg();
        let p = reg
            .ports
            .get(&id)
            .ok_or_else(|| FabricError::NotFound(format!("no port {id}")))?;
        let subnet = reg
            .networks
            .get(&p.network)
            .and_then(|n| n.subnet)
            .and_then(|s| reg.subnets.get(&s))
            .map(|s| &s.subnet);
        let prefix = subnet
            .and_then(|s| s.prefix6)
            .ok_or_else(|| invalid(format!("ipv6 {ip6}: the port's subnet has no ipv6 /64")))?;
        // Guests on a SLAAC subnet form their own address and would not
        // use a chosen one (it would only block theirs).
        if !subnet.is_some_and(|s| s.dhcp6) {
            return Err(invalid(format!(
                "ipv6 {ip6}: the subnet's guests form their own addresses (SLAAC); choose addresses on an ipv6_mode dhcpv6 subnet"
            )));
        }
        if !crate::secgroup::contains6(prefix, 64, ip6) {
            return Err(invalid(format!(
                "ipv6 {ip6}: not in the subnet's {prefix}/64"
            )));
        }
        if u128::from(ip6) & 0xffff_ffff_ffff_ffff <= 1 {
            return Err(invalid(format!("ipv6 {ip6}: the router's")));
        }
        let taken = reg.ports.iter().find(|(other, o)| {
            **other != id && o.network == p.network && o.port.security().ip6.get(1) == Some(&ip6)
        });
        if let Some((_, o)) = taken {
            return Err(invalid(format!("ipv6 {ip6}: port {} has it", o.port.id.0)));
        }
        self.switch.set_port_ipv6(PortId(id), Some(ip6))?;
        Ok(())
    }

    /// Puts port `id` in `groups`.
    pub fn set_port_groups(&self, id: u32, groups: Vec<GroupId>) -> Result<()> {
        let reg = self.reg();
        if !reg.ports.contains_key(&id) {
            return Err(FabricError::NotFound(format!("no port {id}")));
        }
        if let Some(g) = groups.iter().find(|g| !reg.groups.contains_key(g)) {
            return Err(FabricError::NotFound(format!("no security group {}", g.0)));
        }
        self.switch.set_port_groups(PortId(id), groups)?;
        Ok(())
    }

    /// Creates a security group: nothing comes in, anything goes out,
    /// until its rules change.
    pub fn create_group(&self, name: &str) -> Result<GroupId> {
        let mut reg = self.reg();
        check_name(name)?;
        if reg.groups.values().any(|n| n == name) {
            return Err(invalid(format!("a security group named {name:?} exists")));
        }
        let id = GroupId(reg.id());
        self.switch.create_group(id, name.to_owned());
        self.switch
            .add_rule(id, Rule::parse("egress", "any", (0, 0), "", None)?)?;
        reg.groups.insert(id, name.to_owned());
        Ok(id)
    }

    /// Deletes a security group no port is in.
    pub fn delete_group(&self, id: GroupId) -> Result<()> {
        let mut reg = self.reg();
        if id == DEFAULT_GROUP {
            return Err(invalid("the default security group stays"));
        }
        if !reg.groups.contains_key(&id) {
            return Err(FabricError::NotFound(format!("no security group {}", id.0)));
        }
        self.switch.delete_group(id)?;
        reg.groups.remove(&id);
        Ok(())
    }

    /// The group's name.
    pub fn group(&self, id: GroupId) -> Option<String> {
        self.reg().groups.get(&id).cloned()
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(invalid("name: 1 to 64 printable characters"));
    }
    Ok(())
}

/// A locally administered unicast MAC (52:54:00 prefix) from the port id
/// and the clock, unique within this switch.
fn generated_mac(port: u32) -> Mac {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or(0)
        .to_le_bytes();
    let p = port.to_le_bytes();
    [0x52, 0x54, 0x00, t[0] ^ p[1], p[0], t[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_handed_out_and_bad_requests_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fabric::new(dir.path().to_owned()).unwrap();
        let vpc = f.create_vpc("prod").unwrap();
        let net = f
            .create_network("web", Kind::Flat, Some(vpc), false)
            .unwrap();
        assert!(f.create_network("web", Kind::Flat, None, false).is_err());
        assert!(f.create_network("v0", Kind::Vlan(0), None, false).is_err());
        assert!(f
            .create_subnet(net, "10.0.0.1/24", SubnetSettings::default())
            .is_err());
        let s = f
            .create_subnet(net, "10.0.0.0/29", SubnetSettings::default())
            .unwrap();
        assert_eq!(
            f.subnet(s).unwrap().subnet.gateway,
            Ipv4Addr::new(10, 0, 0, 1)
        );
        assert!(f
            .create_subnet(net, "10.0.1.0/24", SubnetSettings::default())
            .is_err());
        let other = f
            .create_network("db", Kind::Flat, Some(vpc), false)
            .unwrap();
        assert!(matches!(
            f.create_subnet(other, "10.0.0.0/24", SubnetSettings::default()),
            Err(FabricError::Invalid(m)) if m.contains("overlaps")
        ));
        // .2 to .6 are the hosts of a /29 after the gateway.
        let mut got = Vec::new();
        for i in 0..5 {
            let p = f
                .create_port(net, None, None, &format!("vm{i}"), None)
                .unwrap();
            got.push(p.port.security().ip.unwrap());
        }
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 0, 0, 6)));
        assert!(f.create_port(net, None, None, "", None).is_err(), "full");
        // The switch numbers ports from 1: the first holds .2.
        f.delete_port(1).unwrap();
        let again = f.create_port(net, None, None, "vm0", None).unwrap();
        assert_eq!(again.port.security().ip, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(f
            .create_port(net, None, Some(Ipv4Addr::new(10, 0, 1, 9)), "", None)
            .is_err());
        assert!(f.create_port(net, None, None, "bad_name", None).is_err());
        assert!(f
            .create_port(net, None, None, "", Some(vec![GroupId(99)]))
            .is_err());
    }

    #[test]
    fn ipv6_prefixes_are_unicast_64s_and_unique_in_the_vpc() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fabric::new(dir.path().to_owned()).unwrap();
        let vpc = f.create_vpc("prod").unwrap();
        let nets: Vec<u32> = (0..3)
            .map(|i| {
                f.create_network(&format!("n{i}"), Kind::Flat, Some(vpc), false)
                    .unwrap()
            })
            .collect();
        let v6 = |p: &str, len| SubnetSettings {
            ipv6: Some((p.parse().unwrap(), len)),
            ..SubnetSettings::default()
        };
        for (prefix, len) in [("fd00:1::", 48), ("fe80::", 64), ("ff02::", 64), ("::", 64)] {
            let e = f.create_subnet(nets[0], "10.0.0.0/24", v6(prefix, len));
            assert!(
                e.unwrap_err().to_string().contains("/64"),
                "{prefix}/{len} refused"
            );
        }
        f.create_subnet(nets[0], "10.0.0.0/24", v6("2001:db8:1::", 64))
            .unwrap();
        let taken = f.create_subnet(nets[1], "10.0.1.0/24", v6("2001:db8:1::", 64));
        assert!(taken.unwrap_err().to_string().contains("taken"));
        f.create_subnet(nets[2], "10.0.2.0/24", v6("fd00:2::", 64))
            .unwrap();
    }
}
