//! The way out of a VPC: its router's gateway on an external network (one
//! bridged to the uplink), SNAT for every VM (many to one, with port
//! translation), port forwards (DNAT of one TCP or UDP port of the
//! gateway address to a VM's port) and 1:1 floating IPs (DNAT in, SNAT
//! out). The router answers
//! ARP for its external address and the floating IPs, finds next hops on the
//! external network by ARP itself, and holds a few packets while it asks.

use crate::offload::NetHdr;
use crate::qos::{Limit, Qos};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::flow::{
    icmp_echo_reply, icmp_error, nat_rewrite, quoted, route_rewrite, unnat_quoted, Packet, Side,
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
use crate::frame::{Arp, Ethernet, Ipv4, Mac, ARP_REQUEST, BROADCAST};
use crate::l2::SegmentId;
use crate::router::VpcId;
use crate::secgroup::contains;
use crate::switch::{parse_l3, Inner, Kicks};
use crate::uplink::{self, UPLINK_PORT};

/// Packets held per next hop while the router asks for its MAC.
pub(crate) const MAX_WAITING: usize = 8;
/// Translations at most per gateway address.
const MAX_NAPT: usize = 28_000;
/// A translation unused this long may be reused.
const NAPT_IDLE: Duration = Duration::from_secs(300);
const NAPT_PORTS: (u16, u16) = (32_768, 60_999);

/// A VPC router's leg on an external network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// The external network's segment.
    pub segment: SegmentId,
    /// The router's address there (the SNAT address).
    pub ip: Ipv4Addr,
    /// The router's MAC there.
    pub mac: Mac,
    /// The external subnet.
    pub net: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// Where everything off that subnet goes (the external subnet's
    /// gateway).
    pub next_hop: Ipv4Addr,
    /// Its IPv6 leg, where the external subnet has a /64: routed, no NAT.
    pub v6: Option<Gateway6>,
}

/// A VPC router's IPv6 address on an external network's /64: the VPC's
/// /64s are routed through it (the outside routes them to this address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway6 {
    /// The router's address there.
    pub ip: std::net::Ipv6Addr,
    /// The external /64.
    pub net: std::net::Ipv6Addr,
    /// Where everything off that /64 goes (the outside router).
    pub next_hop: std::net::Ipv6Addr,
}

/// A floating IP's rate limits and counters (kept while the address is
/// allocated, bound or not). Both directions are policed: what comes for
/// the VM beyond its rate (`ingress`) and what the VM sends out through
/// the address beyond its (`egress`) is dropped and counted.
#[derive(Debug, Default)]
pub struct FloatingTraffic {
    qos: Qos,
    rx_packets: u64,
    rx_bytes: u64,
    rx_policed: u64,
    tx_packets: u64,
    tx_bytes: u64,
    tx_policed: u64,
}

impl FloatingTraffic {
    /// Whether `len` more bytes fit the limit towards the VM (`inbound`)
    /// or from it; counted either way.
    fn admit(&mut self, inbound: bool, len: usize, now: Instant) -> bool {
        let bucket = if inbound {
            self.qos.ingress.as_mut()
        } else {
            self.qos.egress.as_mut()
        };
        let ok = bucket.is_none_or(|b| b.admit(len, now));
        let (packets, bytes, policed) = if inbound {
            (
                &mut self.rx_packets,
                &mut self.rx_bytes,
                &mut self.rx_policed,
            )
        } else {
            (
                &mut self.tx_packets,
                &mut self.tx_bytes,
                &mut self.tx_policed,
            )
        };
        if ok {
            *packets += 1;
            *bytes += len as u64;
        } else {
            *policed += 1;
        }
        ok
    }

    /// The limits as set: towards the VM, from it.
    pub fn limits(&self) -> (Limit, Limit) {
        self.qos.limits
    }

    /// Counters by name (rx: towards the VM).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("rx_policed", self.rx_policed),
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("tx_policed", self.tx_policed),
        ]
    }
}

/// A floating IP bound to a VM's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floating {
    /// The VM's VPC.
    pub vpc: VpcId,
    /// The VM's fixed address.
    pub fixed: Ipv4Addr,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Napt<A> {
    pub(crate) vpc: VpcId,
    pub(crate) inner: A,
    pub(crate) port: u16,
    used: Instant,
    /// A port forward's: kept until it is removed, never reused.
    forward: bool,
}

/// Port translations of one address family: many inside addresses and
/// ports of a VPC to one gateway address's ports, and back.
#[derive(Debug)]
pub(crate) struct NaptTable<A> {
    /// (gateway address, protocol, external port) -> inside.
    inbound: HashMap<(A, u8, u16), Napt<A>>,
    /// (VPC, protocol, inside address, inside port) -> external port.
    outbound: HashMap<(VpcId, u8, A, u16), u16>,
    next_port: u16,
}

impl<A> Default for NaptTable<A> {
    fn default() -> Self {
        Self {
            inbound: HashMap::new(),
            outbound: HashMap::new(),
            next_port: 0,
        }
    }
}

impl<A: Copy + Eq + std::hash::Hash> NaptTable<A> {
    /// The external port for (vpc, proto, inner, port) on `gw`, made if
    /// need be (None: all taken and none idle).
    pub(crate) fn out(
        &mut self,
        vpc: VpcId,
        gw: A,
        proto: u8,
        inner: A,
        port: u16,
        now: Instant,
    ) -> Option<u16> {
        if let Some(p) = self.outbound.get(&(vpc, proto, inner, port)).copied() {
            if let Some(n) = self.inbound.get_mut(&(gw, proto, p)) {
                n.used = now;
            }
            return Some(p);
        }
        if self.inbound.len() >= MAX_NAPT {
            let stale: Vec<_> = self
                .inbound
                .iter()
                .filter(|(_, n)| !n.forward && now.saturating_duration_since(n.used) > NAPT_IDLE)
                .map(|(k, n)| (*k, *n))
                .collect();
            for (k, n) in stale {
                self.inbound.remove(&k);
                self.outbound.remove(&(n.vpc, k.1, n.inner, n.port));
            }
            if self.inbound.len() >= MAX_NAPT {
                return None;
            }
        }
        let span = u32::from(NAPT_PORTS.1 - NAPT_PORTS.0) + 1;
        for _ in 0..span {
            if !(NAPT_PORTS.0..=NAPT_PORTS.1).contains(&self.next_port) {
                self.next_port = NAPT_PORTS.0;
            }
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(e) = self.inbound.entry((gw, proto, p))
            {
                e.insert(Napt {
                    vpc,
                    inner,
                    port,
                    used: now,
                    forward: false,
                });
                self.outbound.insert((vpc, proto, inner, port), p);
                return Some(p);
            }
        }
        None
    }

    /// The inside end of external port `port` of `gw`, marked used now.
    pub(crate) fn inside(&mut self, gw: A, proto: u8, port: u16, now: Instant) -> Option<Napt<A>> {
        let n = self.inbound.get_mut(&(gw, proto, port))?;
        n.used = now;
        Some(*n)
    }
}

/// A port forward: connections to a TCP or UDP port of a VPC's gateway
/// address go to a VM's address and port (and its replies come from the
/// gateway's port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// The VPC.
    pub vpc: VpcId,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// The gateway's port.
    pub external_port: u16,
    /// The VM's address.
    pub inner: Ipv4Addr,
    /// The VM's port.
    pub inner_port: u16,
}

/// Gateways, floating IPs, translations and the external neighbours.
#[derive(Debug, Default)]
pub struct Nat {
    gateways: HashMap<VpcId, Gateway>,
    floating: HashMap<Ipv4Addr, Floating>,
    /// Rate limits and counters of allocated floating IPs.
    pub(crate) floating_traffic: HashMap<Ipv4Addr, FloatingTraffic>,
    by_fixed: HashMap<(VpcId, Ipv4Addr), Ipv4Addr>,
    /// IPv4 translations of gateway addresses.
    napt: NaptTable<Ipv4Addr>,
    /// IPv6 translations (NAT66) of the routers' IPv6 addresses.
    pub(crate) napt6: NaptTable<std::net::Ipv6Addr>,
    neighbours: HashMap<(SegmentId, Ipv4Addr), Mac>,
    waiting: HashMap<(SegmentId, Ipv4Addr), Vec<Vec<u8>>>,
    /// IPv6 neighbours on external networks, and packets waiting for one.
    pub(crate) neighbours6: HashMap<(SegmentId, std::net::Ipv6Addr), Mac>,
    pub(crate) waiting6: HashMap<(SegmentId, std::net::Ipv6Addr), Vec<Vec<u8>>>,
    /// Connections that came in through a port forward and when they were
    /// last seen: their replies leave through the forward even from a VM
    /// with a floating IP.
    forwarded: HashMap<Conn, Instant>,
}

/// A connection through a port forward: VPC, protocol, the VM's address
/// and port, the remote's.
type Conn = (VpcId, u8, Ipv4Addr, u16, Ipv4Addr, u16);

impl Nat {
    /// Sets (or with None removes) `vpc`'s gateway.
    pub fn set_gateway(&mut self, vpc: VpcId, gw: Option<Gateway>) {
        match gw {
            Some(g) => self.gateways.insert(vpc, g),
            None => self.gateways.remove(&vpc),
        };
    }

    /// The VPCs whose routers have an IPv6 leg on `seg`, with it.
    pub(crate) fn gateways6(&self, seg: SegmentId) -> Vec<(VpcId, Mac, Gateway6)> {
        self.gateways
            .iter()
            .filter(|(_, g)| g.segment == seg)
            .filter_map(|(v, g)| g.v6.map(|g6| (*v, g.mac, g6)))
            .collect()
    }

    /// `vpc`'s router's IPv6 leg: its segment, MAC and addresses.
    pub(crate) fn gateway6(&self, vpc: VpcId) -> Option<(SegmentId, Mac, Gateway6)> {
        let g = self.gateways.get(&vpc)?;
        g.v6.map(|g6| (g.segment, g.mac, g6))
    }

    /// Whether `vpc` has a gateway (a way out).
    pub fn has_gateway(&self, vpc: VpcId) -> bool {
        self.gateways.contains_key(&vpc)
    }

    /// Whether any VPC has a gateway.
    pub fn has_gateways(&self) -> bool {
        !self.gateways.is_empty()
    }

    /// Sets floating IP `ip`'s limits: towards the VM, from it.
    pub fn set_floating_qos(&mut self, ip: Ipv4Addr, ingress: Limit, egress: Limit, now: Instant) {
        let t = self.floating_traffic.entry(ip).or_default();
        t.qos = Qos::new(ingress, egress, now);
    }

    /// Forgets floating IP `ip`'s limits and counters (the address is
    /// freed).
    pub fn forget_floating(&mut self, ip: Ipv4Addr) {
        self.floating_traffic.remove(&ip);
    }

    /// Whether a frame of `len` bytes through floating IP `ip` fits its
    /// limit (`inbound`: towards the VM); counted.
    fn floating_admit(&mut self, ip: Ipv4Addr, inbound: bool, len: usize, now: Instant) -> bool {
        self.floating_traffic
            .entry(ip)
            .or_default()
            .admit(inbound, len, now)
    }

    /// Binds (or with None frees) floating IP `ip`.
    pub fn set_floating(&mut self, ip: Ipv4Addr, f: Option<Floating>) {
        if let Some(old) = self.floating.remove(&ip) {
            self.by_fixed.remove(&(old.vpc, old.fixed));
        }
        if let Some(f) = f {
            self.by_fixed.insert((f.vpc, f.fixed), ip);
            self.floating.insert(ip, f);
        }
    }

    /// Adds (`on`) or removes port forward `f` on gateway address `gw`. A
    /// translation that held either end meanwhile is dropped (its
    /// connection ends); the caller keeps forwards from overlapping.
    pub fn set_forward(&mut self, gw: Ipv4Addr, f: PortForward, on: bool, now: Instant) {
        let outside = (gw, f.proto, f.external_port);
        let inside = (f.vpc, f.proto, f.inner, f.inner_port);
        if let Some(old) = self.napt.inbound.remove(&outside) {
            self.napt
                .outbound
                .remove(&(old.vpc, f.proto, old.inner, old.port));
        }
        if let Some(p) = self.napt.outbound.remove(&inside) {
            self.napt.inbound.remove(&(gw, f.proto, p));
        }
        self.forwarded.retain(|c, _| (c.0, c.1, c.2, c.3) != inside);
        if on {
            self.napt.inbound.insert(
                outside,
                Napt {
                    vpc: f.vpc,
                    inner: f.inner,
                    port: f.inner_port,
                    used: now,
                    forward: true,
                },
            );
            self.napt.outbound.insert(inside, f.external_port);
        }
    }

    /// Where a packet (already translated on its way out) to `dst` on
    /// external segment `seg` goes when `dst` is an address this node's
    /// routers hold there: a floating IP's VM, or through a gateway
    /// address's port forward or translation (TCP and UDP) its VM and
    /// port. None for anything else. The packet leaves `from` (address and
    /// port, as translated).
    fn hairpin(
        &mut self,
        seg: SegmentId,
        pkt: &Packet,
        dst: Ipv4Addr,
        from: (Ipv4Addr, u16),
        now: Instant,
    ) -> Option<(VpcId, Ipv4Addr, Option<u16>)> {
        if let Some(f) = self.floating.get(&dst) {
            let here = self.gateways.get(&f.vpc).is_some_and(|g| g.segment == seg);
            return here.then_some((f.vpc, f.fixed, None));
        }
        if self.gateway_at(seg, dst).is_none() || !matches!(pkt.flow.proto, PROTO_TCP | PROTO_UDP) {
            return None;
        }
        let n = *self
            .napt
            .inbound
            .get(&(dst, pkt.flow.proto, pkt.flow.dport))?;
        if n.forward {
            self.came_in(
                (n.vpc, pkt.flow.proto, n.inner, n.port, from.0, from.1),
                now,
            );
        }
        Some((n.vpc, n.inner, Some(n.port)))
    }

    /// Notes that `conn` came in through a port forward (at most
    /// [`MAX_NAPT`] such, idle ones forgotten after [`NAPT_IDLE`]).
    fn came_in(&mut self, conn: Conn, now: Instant) {
        if self.forwarded.len() >= MAX_NAPT && !self.forwarded.contains_key(&conn) {
            self.forwarded
                .retain(|_, seen| now.saturating_duration_since(*seen) <= NAPT_IDLE);
            if self.forwarded.len() >= MAX_NAPT {
                return;
            }
        }
        self.forwarded.insert(conn, now);
    }

    /// The router MAC answering for `ip` on `segment` (a gateway address
    /// or a floating IP of a VPC whose gateway is there).
    fn owner(&self, segment: SegmentId, ip: Ipv4Addr) -> Option<&Gateway> {
        if let Some(g) = self.gateway_at(segment, ip) {
            return Some(g);
        }
        let f = self.floating.get(&ip)?;
        self.gateways.get(&f.vpc).filter(|g| g.segment == segment)
    }

    /// The gateway whose address on `segment` is `ip`.
    fn gateway_at(&self, segment: SegmentId, ip: Ipv4Addr) -> Option<&Gateway> {
        self.gateways
            .values()
            .find(|g| g.segment == segment && g.ip == ip)
    }
}

/// The port (or ICMP echo identifier) NAPT translates, if the packet has one.
fn napt_port(p: &Packet, outbound: bool) -> Option<u16> {
    let echo = (PROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY);
    let ports = (p.flow.sport, p.flow.dport);
    translated_port((p.flow.proto, p.icmp_type), ports, outbound, echo)
}

/// The port NAPT translates in a packet of `proto` (ICMP type `icmp`) with
/// `ports`: the inside one (outbound: the source; inbound: the
/// destination) of TCP and UDP, the identifier of echo requests going out
/// and replies coming in (`echo`: the ICMP protocol and those types).
pub(crate) fn translated_port(
    (proto, icmp): (u8, Option<u8>),
    (sport, dport): (u16, u16),
    outbound: bool,
    (echo_proto, request, reply): (u8, u8, u8),
) -> Option<u16> {
    match proto {
        PROTO_TCP | PROTO_UDP => Some(if outbound { sport } else { dport }),
        p if p == echo_proto && icmp == Some(if outbound { request } else { reply }) => Some(sport),
        _ => None,
    }
}

impl Inner {
    /// A packet from a VM of `vpc` to an address outside the VPC: SNAT
    /// (the VM's floating IP, else the gateway address with a translated
    /// port) and on to the next hop on the external network. False if the
    /// VPC has no way out.
    pub(crate) fn route_external(
        &self,
        vpc: VpcId,
        frame: &[u8],
        pkt: &Packet,
        ip: &Ipv4<'_>,
        kicks: &mut Kicks,
    ) -> bool {
        let mut nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(gw) = nat.gateways.get(&vpc).cloned() else {
            return false;
        };
        if ip.ttl <= 1 {
            return true;
        }
        // A ping of a gateway address on that network: the router's to
        // answer.
        let own = nat.gateway_at(gw.segment, ip.dst).is_some();
        if pkt.icmp_type == Some(ICMP_ECHO_REQUEST) && own {
            drop(nat);
            if let Ok(eth) = Ethernet::parse(frame) {
                let reply = icmp_echo_reply(frame, ip, eth.dst);
                self.route_into(vpc, ip.src, reply, kicks);
            }
            return true;
        }
        let mut out = frame.to_vec();
        // A reply on a connection that came in through a port forward
        // leaves from the gateway's port, even from a VM with a floating IP.
        let proto = pkt.flow.proto;
        let forwarded = napt_port(pkt, true).and_then(|p| {
            let conn = (vpc, proto, ip.src, p, ip.dst, pkt.flow.dport);
            let seen = nat.forwarded.get_mut(&conn)?;
            *seen = kicks.now;
            nat.napt.outbound.get(&(vpc, proto, ip.src, p)).copied()
        });
        let from = match (forwarded, nat.by_fixed.get(&(vpc, ip.src)).copied()) {
            (Some(ext), _) => {
                nat_rewrite(&mut out, Side::Source, gw.ip, Some(ext));
                (gw.ip, ext)
            }
            (None, Some(floating)) => {
                if !nat.floating_admit(floating, false, frame.len(), kicks.now) {
                    return true;
                }
                nat_rewrite(&mut out, Side::Source, floating, None);
                (floating, pkt.flow.sport)
            }
            (None, None) => {
                let Some(port) = napt_port(pkt, true) else {
                    debug!(src = %ip.src, "no translation for this protocol");
                    return true;
                };
                let Some(ext) = nat
                    .napt
                    .out(vpc, gw.ip, pkt.flow.proto, ip.src, port, kicks.now)
                else {
                    debug!(gateway = %gw.ip, "out of translations");
                    return true;
                };
                nat_rewrite(&mut out, Side::Source, gw.ip, Some(ext));
                (gw.ip, ext)
            }
        };
        // To an address this node's routers hold on that network (a
        // floating IP, a port forward or a translation of a gateway
        // address): turned around here (hairpin), as the outside would.
        if let Some((to_vpc, inner, port)) = nat.hairpin(gw.segment, pkt, ip.dst, from, kicks.now) {
            drop(nat);
            nat_rewrite(&mut out, Side::Destination, inner, port);
            self.route_into(to_vpc, inner, out, kicks);
            return true;
        }
        let hop = if contains(gw.net, gw.prefix, ip.dst) {
            ip.dst
        } else {
            gw.next_hop
        };
        // From the router, TTL one less; the next hop's MAC comes now or
        // when it answers.
        let known = nat.neighbours.get(&(gw.segment, hop)).copied();
        route_rewrite(&mut out, gw.mac, known.unwrap_or([0; 6]));
        match known {
            Some(_) => {
                drop(nat);
                self.emit(gw.segment, &out, kicks);
            }
            None => {
                let q = nat.waiting.entry((gw.segment, hop)).or_default();
                if q.len() < MAX_WAITING {
                    q.push(out);
                }
                drop(nat);
                let ask = Arp {
                    op: ARP_REQUEST,
                    sha: gw.mac,
                    spa: gw.ip,
                    tha: [0; 6],
                    tpa: hop,
                };
                self.emit(gw.segment, &ask.to_frame(BROADCAST), kicks);
            }
        }
        true
    }

    /// A frame on external segment `seg` (from the uplink or a local port):
    /// the router's part of it. True if it was the router's (ARP for its
    /// addresses, traffic to its MAC).
    pub(crate) fn external_frame(
        &self,
        seg: SegmentId,
        frame: &[u8],
        eth: &Ethernet<'_>,
        arp: Option<&Arp>,
        ip: Option<&(Packet, Ipv4<'_>)>,
        kicks: &mut Kicks,
    ) -> bool {
        if !self.nat_on.load(Ordering::Acquire) {
            return false;
        }
        let mut nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        if !nat.gateways.values().any(|g| g.segment == seg) {
            return false;
        }
        if let Some(a) = arp {
            let ours = nat.owner(seg, a.tpa).cloned();
            if ours.is_some() || nat.waiting.contains_key(&(seg, a.spa)) {
                // A neighbour speaking to the router: remember it, and send
                // what waited for it.
                nat.neighbours.insert((seg, a.spa), a.sha);
                let held = nat.waiting.remove(&(seg, a.spa)).unwrap_or_default();
                drop(nat);
                // Held frames are the router's already (source, TTL): only
                // the next hop's MAC was missing.
                for mut f in held {
                    f[0..6].copy_from_slice(&a.sha);
                    self.emit(seg, &f, kicks);
                }
                if let (Some(g), ARP_REQUEST) = (ours, a.op) {
                    self.emit(seg, &a.reply_from(g.mac).to_frame(a.sha), kicks);
                }
                return true;
            }
            return false;
        }
        let Some((pkt, ipv4)) = ip else { return false };
        let Some(gw) = nat
            .gateways
            .values()
            .find(|g| g.segment == seg && g.mac == eth.dst)
            .cloned()
        else {
            return false;
        };
        // An error about a packet a translation sent (its quote's source
        // is the address the packet came to).
        let error = pkt
            .icmp_type
            .filter(|t| icmp_error(*t))
            .and_then(|_| quoted(ipv4.payload))
            .filter(|q| q.src == ipv4.dst);
        let icmp_at = crate::flow::ip_offset(frame) + ipv4.header_len;
        // To a floating IP: DNAT to its VM.
        if let Some(f) = nat.floating.get(&ipv4.dst).copied() {
            let admitted = nat.floating_admit(ipv4.dst, true, frame.len(), kicks.now);
            drop(nat);
            if !admitted {
                return true;
            }
            let mut out = frame.to_vec();
            nat_rewrite(&mut out, Side::Destination, f.fixed, None);
            if error.is_some() {
                unnat_quoted(&mut out, icmp_at, f.fixed, None);
            }
            self.route_into(f.vpc, f.fixed, out, kicks);
            return true;
        }
        if ipv4.dst != gw.ip {
            return true;
        }
        // To the gateway address: a reply to a translated connection, or a
        // ping of the router itself.
        if pkt.icmp_type == Some(ICMP_ECHO_REQUEST) {
            drop(nat);
            self.emit(seg, &icmp_echo_reply(frame, ipv4, gw.mac), kicks);
            return true;
        }
        // An error about a translated packet (unreachable, frag needed,
        // time exceeded): back to its VM, about the packet as it sent it.
        if let Some(q) = error {
            let Some(n) = nat.napt.inside(gw.ip, q.proto, q.sport, kicks.now) else {
                return true;
            };
            drop(nat);
            let mut out = frame.to_vec();
            nat_rewrite(&mut out, Side::Destination, n.inner, None);
            unnat_quoted(&mut out, icmp_at, n.inner, Some(n.port));
            self.route_into(n.vpc, n.inner, out, kicks);
            return true;
        }
        let Some(port) = napt_port(pkt, false) else {
            return true;
        };
        let Some(n) = nat.napt.inside(gw.ip, pkt.flow.proto, port, kicks.now) else {
            return true;
        };
        if n.forward {
            let conn = (
                n.vpc,
                pkt.flow.proto,
                n.inner,
                n.port,
                ipv4.src,
                pkt.flow.sport,
            );
            nat.came_in(conn, kicks.now);
        }
        drop(nat);
        let mut out = frame.to_vec();
        nat_rewrite(&mut out, Side::Destination, n.inner, Some(n.port));
        self.route_into(n.vpc, n.inner, out, kicks);
        true
    }

    /// Routes a translated packet to the VM at `fixed` in `vpc` (its
    /// ingress rules apply).
    fn route_into(&self, vpc: VpcId, fixed: Ipv4Addr, mut out: Vec<u8>, kicks: &mut Kicks) {
        let target = {
            let l3 = self.l3.read().unwrap_or_else(PoisonError::into_inner);
            l3.route_in_vpc(vpc, fixed)
                .map(|(seg, sub, host)| (seg, sub.gateway_mac, host.port, host.mac))
        };
        let Some((seg, gw_mac, port, mac)) = target else {
            return;
        };
        route_rewrite(&mut out, gw_mac, mac);
        let to = self.port_on(seg, port);
        let Some(to) = to else { return };
        let at = crate::flow::ip_offset(&out);
        let Some(pkt) = out
            .get(at..)
            .and_then(|b| Ipv4::parse(b).ok())
            .and_then(|ip| Packet::of(&ip).ok())
        else {
            return;
        };
        self.deliver_checked(&to, (&out, &NetHdr::PLAIN), Some(&pkt), kicks.now, kicks);
    }

    /// Puts `frame` on segment `seg` from the router: to the port its
    /// destination was learned on (or the uplink), else to all of them.
    pub(crate) fn emit(&self, seg: SegmentId, frame: &[u8], kicks: &mut Kicks) {
        let Ok(eth) = Ethernet::parse(frame) else {
            return;
        };
        let to = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(seg, eth.dst, kicks.now);
        let decision = match to {
            Some(p) if !crate::frame::is_group(&eth.dst) => crate::l2::Forward::Port(p),
            _ => crate::l2::Forward::Flood,
        };
        let pkt = Ipv4::parse(eth.payload)
            .ok()
            .and_then(|ip| Packet::of(&ip).ok());
        self.forward_local(
            seg,
            crate::l2::PortId(0),
            decision,
            (frame, &NetHdr::PLAIN),
            pkt.as_ref(),
            kicks,
        );
    }

    /// Sends `frame` of segment `seg` out of the uplink, tagged as the
    /// segment's network is.
    pub(crate) fn to_uplink(&self, seg: SegmentId, frame: &[u8]) {
        let tag = self
            .uplinked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&seg)
            .copied();
        let Some(tag) = tag else { return };
        let Some(tap) = self
            .uplink
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        let sent = match tag {
            Some(v) => tap.write(&uplink::tag(frame, v)),
            None => tap.write(frame),
        };
        if let Err(e) = sent {
            debug!(uplink = %tap.name, "cannot send: {e}");
            self.uplink_stats.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.uplink_stats.tx.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A frame from the uplink: onto the network its tag (or its lack of
    /// one) names, the router's part first.
    pub(crate) fn uplink_frame(&self, frame: &[u8], kicks: &mut Kicks) {
        let Ok(eth) = Ethernet::parse(frame) else {
            self.uplink_stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let seg = self
            .uplinked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(_, tag)| **tag == eth.vlan)
            .map(|(s, _)| *s);
        let Some(seg) = seg else {
            self.uplink_stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Untagged frames are switched as they are; tagged ones lose the tag.
        let inner: Cow<'_, [u8]> = if eth.vlan.is_some() {
            Cow::Owned(uplink::untag(frame))
        } else {
            Cow::Borrowed(frame)
        };
        let Some((eth, (arp, ip))) = Ethernet::parse(&inner)
            .ok()
            .and_then(|e| Some((e, parse_l3(&e).ok()?)))
        else {
            self.uplink_stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.uplink_stats.rx.fetch_add(1, Ordering::Relaxed);
        let decision = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward(seg, UPLINK_PORT, eth.src, eth.dst, kicks.now);
        if self.external_frame(seg, &inner, &eth, arp.as_ref(), ip.as_ref(), kicks) {
            return;
        }
        if let Ok(Some((p6, v6))) = crate::switch::parse_ipv6(&eth) {
            if self.external_frame6(seg, &inner, &eth, (&p6, &v6), kicks) {
                return;
            }
        }
        let pkt = ip.as_ref().map(|p| &p.0);
        let plain = (&inner[..], &NetHdr::PLAIN);
        self.forward_local(seg, UPLINK_PORT, decision, plain, pkt, kicks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);

    fn forward(external_port: u16) -> PortForward {
        PortForward {
            vpc: VpcId(1),
            proto: PROTO_UDP,
            external_port,
            inner: VM,
            inner_port: 53,
        }
    }

    /// A forward answers both ways, outlives idle translations when the
    /// table is full, takes over a translation that held its port, and
    /// goes without a trace.
    #[test]
    fn port_forwards_hold_their_ports() {
        let mut nat = Nat::default();
        let t0 = Instant::now();
        // A VM's connection holds a translation at the first dynamic port.
        let taken = nat.napt.out(VpcId(1), GW, PROTO_UDP, VM, 53, t0).unwrap();
        assert_eq!(taken, NAPT_PORTS.0);
        // A forward of that port replaces it (its inside end too).
        nat.set_forward(GW, forward(taken), true, t0);
        let n = nat.napt.inbound[&(GW, PROTO_UDP, taken)];
        assert_eq!((n.inner, n.port, n.forward), (VM, 53, true));
        assert_eq!(
            nat.napt.out(VpcId(1), GW, PROTO_UDP, VM, 53, t0),
            Some(taken)
        );
        // The table fills with translations; once they are idle, new ones
        // reuse their room, never the forward's.
        let mut other = 0u32;
        while nat.napt.inbound.len() < MAX_NAPT {
            let ip = Ipv4Addr::from(0x0a02_0000 + other / 1000);
            let port = u16::try_from(1000 + other % 1000).unwrap();
            assert!(nat
                .napt
                .out(VpcId(1), GW, PROTO_UDP, ip, port, t0)
                .is_some());
            other += 1;
        }
        let later = t0 + NAPT_IDLE + Duration::from_secs(1);
        let fresh = nat.napt.out(
            VpcId(1),
            GW,
            PROTO_UDP,
            Ipv4Addr::new(10, 3, 0, 1),
            9,
            later,
        );
        assert!(fresh.is_some_and(|p| p != taken));
        assert!(nat.napt.inbound[&(GW, PROTO_UDP, taken)].forward);
        // Removed, nothing of it is left.
        nat.set_forward(GW, forward(taken), false, later);
        assert!(!nat.napt.inbound.contains_key(&(GW, PROTO_UDP, taken)));
        assert!(!nat
            .napt
            .outbound
            .contains_key(&(VpcId(1), PROTO_UDP, VM, 53)));
    }
}
