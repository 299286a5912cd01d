//! The transport part of an IPv4 or IPv6 packet as security groups and
//! connection tracking see it: protocol, addresses, ports (the ICMP echo
//! identifier for pings), TCP flags. Also the few rewrites the router does
//! in place.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frame::{checksum, FrameError, Ipv4, Ipv6, Mac};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMP echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// IPv6 next-header number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 echo request.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 echo reply.
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// A connection's identity in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// IP protocol.
    pub proto: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port (ICMP echo: the identifier).
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier).
    pub dport: u16,
}

/// Hashed as one 104-bit word: one step of the hasher per lookup instead
/// of one per field (connection tracking looks a flow up for every packet
/// through a security group).
impl std::hash::Hash for Flow {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let word = u128::from(self.proto) << 96
            | u128::from(u32::from(self.src)) << 64
            | u128::from(u32::from(self.dst)) << 32
            | u128::from(self.sport) << 16
            | u128::from(self.dport);
        state.write_u128(word);
    }
}

impl Flow {
    /// The same connection seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// An IPv6 connection's identity in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow6 {
    /// IP protocol (next header after the extension headers).
    pub proto: u8,
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Source port (ICMPv6 echo: the identifier).
    pub sport: u16,
    /// Destination port (ICMPv6 echo: the identifier).
    pub dport: u16,
}

/// What connection tracking needs of a flow of either family.
pub trait Tracked: Copy + Eq + Ord + std::hash::Hash + std::fmt::Debug {
    /// The same connection seen from the other end.
    fn reversed(&self) -> Self;
    /// Its IP protocol.
    fn proto(&self) -> u8;
}

impl Tracked for Flow {
    fn reversed(&self) -> Self {
        Flow::reversed(self)
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

impl Tracked for Flow6 {
    fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// One packet's flow and the details the tracker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<F = Flow> {
    /// Its flow.
    pub flow: F,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP type (None for other protocols).
    pub icmp_type: Option<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn short(what: &'static str, have: usize, need: usize) -> FrameError {
    FrameError::Truncated { what, have, need }
}

/// An IPv6 packet's flow and details.
pub type Packet6 = Packet<Flow6>;

impl Packet6 {
    /// Reads the upper-layer header of `ip`. Fragments after the first
    /// carry none: their ports read as 0.
    pub fn of6(ip: &Ipv6<'_>) -> Result<Self, FrameError> {
        let echo = (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
        let t = Transport::of(ip.protocol, ip.payload, ip.first_fragment, echo)?;
        Ok(Self {
            flow: Flow6 {
                proto: ip.protocol,
                src: ip.src,
                dst: ip.dst,
                sport: t.sport,
                dport: t.dport,
            },
            tcp_flags: t.tcp_flags,
            icmp_type: t.icmp_type,
        })
    }
}

/// What security groups and tracking read of an upper-layer header.
#[derive(Default)]
struct Transport {
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    icmp_type: Option<u8>,
}

impl Transport {
    /// Reads the header of protocol `proto` at the start of `p` (nothing
    /// unless `first`: later fragments carry none). `icmp` names the
    /// family's ICMP protocol and its echo request and reply types, whose
    /// identifier stands for both ports.
    #[inline(always)]
    fn of(proto: u8, p: &[u8], first: bool, icmp: (u8, u8, u8)) -> Result<Self, FrameError> {
        let mut t = Self::default();
        if !first {
            return Ok(t);
        }
        match proto {
            PROTO_TCP => {
                if p.len() < 20 {
                    return Err(short("TCP header", p.len(), 20));
                }
                t.sport = be16(p, 0);
                t.dport = be16(p, 2);
                t.tcp_flags = p[13];
            }
            PROTO_UDP => {
                if p.len() < 8 {
                    return Err(short("UDP header", p.len(), 8));
                }
                t.sport = be16(p, 0);
                t.dport = be16(p, 2);
            }
            _ if proto == icmp.0 => {
                if p.len() < 8 {
                    return Err(short("ICMP header", p.len(), 8));
                }
                t.icmp_type = Some(p[0]);
                if p[0] == icmp.1 || p[0] == icmp.2 {
                    t.sport = be16(p, 4);
                    t.dport = t.sport;
                }
            }
            _ => {}
        }
        Ok(t)
    }
}

/// The IPv6 packet in `frame` as its header's payload length bounds it
/// (link padding cut off; empty if the header is not there): what an
/// ICMPv6 error quotes.
pub fn ipv6_packet(frame: &[u8]) -> &[u8] {
    let at = ip_offset(frame);
    let len = frame
        .get(at + 4..at + 6)
        .map_or(0, |b| 40 + usize::from(u16::from_be_bytes([b[0], b[1]])));
    frame.get(at..at + len).unwrap_or_default()
}

/// The solicited-node multicast group of `ip`: where a neighbour
/// solicitation for it goes.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Whether an ICMP message of `kind` is an error about a packet it quotes
/// (destination unreachable, time exceeded, parameter problem).
pub fn icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 11 | 12)
}

/// Whether an ICMPv6 message of `kind` is an error about a packet it
/// quotes (unreachable, packet too big, time exceeded, parameter problem).
pub fn icmpv6_error(kind: u8) -> bool {
    (1..=4).contains(&kind)
}

/// The flow of the IPv4 packet an ICMP error `icmp` quotes (its header and
/// the 8 bytes after it, as its sender sent them); None if the quote is
/// too short or not IPv4.
pub fn quoted(icmp: &[u8]) -> Option<Flow> {
    let b = icmp.get(8..)?;
    if b.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let ends = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
    let l4 = b.get(ihl..ihl + 8).filter(|_| ihl >= 20)?;
    let (sport, dport) = quoted_ports(b[9], l4, (PROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY));
    Some(Flow {
        proto: b[9],
        src: ends(12),
        dst: ends(16),
        sport,
        dport,
    })
}

/// [`quoted`] for an ICMPv6 error quoting an IPv6 packet (no extension
/// headers).
pub fn quoted6(icmp: &[u8]) -> Option<Flow6> {
    let b = icmp.get(8..)?;
    if b.first()? >> 4 != 6 {
        return None;
    }
    let l4 = b.get(40..48)?;
    let addr = |at: usize| {
        <[u8; 16]>::try_from(&b[at..at + 16])
            .ok()
            .map(Ipv6Addr::from)
    };
    let echo = (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
    let (sport, dport) = quoted_ports(b[6], l4, echo);
    Some(Flow6 {
        proto: b[6],
        src: addr(8)?,
        dst: addr(24)?,
        sport,
        dport,
    })
}

/// Ports of a quoted transport header `l4` (8 bytes) of `proto`; an echo
/// (`icmp`: protocol, request and reply types) gives its identifier twice.
fn quoted_ports(proto: u8, l4: &[u8], icmp: (u8, u8, u8)) -> (u16, u16) {
    match proto {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0), be16(l4, 2)),
        _ if proto == icmp.0 && (l4[0] == icmp.1 || l4[0] == icmp.2) => (be16(l4, 4), be16(l4, 4)),
        _ => (0, 0),
    }
}

/// The link-local address (fe80::/64, modified EUI-64) of an interface
/// with `mac`, as guests form it for themselves.
pub fn link_local(mac: Mac) -> Ipv6Addr {
    slaac(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac)
}

/// The address a guest with `mac` forms in the /64 `prefix` (RFC 4862,
/// modified EUI-64).
pub fn slaac(prefix: Ipv6Addr, mac: Mac) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..16].copy_from_slice(&[
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    Ipv6Addr::from(o)
}

impl Packet {
    /// Reads the transport header of `ip`. Fragments after the first carry
    /// no transport header: their ports read as 0.
    #[inline(always)]
    pub fn of(ip: &Ipv4<'_>) -> Result<Self, FrameError> {
        let first = !ip.fragment || ip.first_fragment;
        let echo = (PROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY);
        let t = Transport::of(ip.protocol, ip.payload, first, echo)?;
        Ok(Self {
            flow: Flow {
                proto: ip.protocol,
                src: ip.src,
                dst: ip.dst,
                sport: t.sport,
                dport: t.dport,
            },
            tcp_flags: t.tcp_flags,
            icmp_type: t.icmp_type,
        })
    }
}

/// Offset of the IPv4 header in `frame` (after an optional 802.1Q tag).
pub fn ip_offset(frame: &[u8]) -> usize {
    if frame.len() >= 14 && be16(frame, 12) == crate::frame::ETHERTYPE_VLAN {
        18
    } else {
        14
    }
}

/// Rewrites a routed frame in place: new MACs, TTL one less, header checksum
/// recomputed. The caller has checked the TTL is above 1.
pub fn route_rewrite(frame: &mut [u8], src: [u8; 6], dst: [u8; 6]) {
    let at = ip_offset(frame);
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    let Some(h) = frame.get_mut(at..) else { return };
    let hl = usize::from(h[0] & 0x0f) * 4;
    h[8] = h[8].saturating_sub(1);
    h[10] = 0;
    h[11] = 0;
    let sum = checksum(&h[..hl.min(h.len())]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Which side of a packet a NAT rewrite changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source (SNAT).
    Source,
    /// The destination (DNAT).
    Destination,
}

/// RFC 1624: the checksum `sum` after the 16-bit words `old` became `new`.
fn csum_update(sum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!sum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap_or(u16::MAX)
}

/// Rewrites one side's address (and, given, its TCP/UDP port or ICMP echo
/// identifier) of the IPv4 packet in `frame`, keeping the IP and transport
/// checksums right. The packet has been parsed: its headers are whole.
pub fn nat_rewrite(frame: &mut [u8], side: Side, ip: Ipv4Addr, port: Option<u16>) {
    let at = ip_offset(frame);
    let Some(h) = frame.get_mut(at..) else { return };
    if h.len() < 20 {
        return;
    }
    let hl = usize::from(h[0] & 0x0f) * 4;
    let proto = h[9];
    let first = be16(h, 6) & 0x1fff == 0;
    let a = if side == Side::Source { 12 } else { 16 };
    let old_ip: [u8; 4] = [h[a], h[a + 1], h[a + 2], h[a + 3]];
    let new_ip = ip.octets();
    h[a..a + 4].copy_from_slice(&new_ip);
    h[10] = 0;
    h[11] = 0;
    let sum = checksum(&h[..hl.min(h.len())]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    if !first {
        return;
    }
    let Some(l4) = h.get_mut(hl..) else { return };
    let port_at = if side == Side::Source { 0 } else { 2 };
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let c = if proto == PROTO_TCP { 16 } else { 6 };
            if l4.len() < c + 2 {
                return;
            }
            let mut sum = be16(l4, c);
            let udp_off = proto == PROTO_UDP && sum == 0;
            sum = csum_update(sum, &old_ip, &new_ip);
            if let Some(p) = port {
                let old = [l4[port_at], l4[port_at + 1]];
                l4[port_at..port_at + 2].copy_from_slice(&p.to_be_bytes());
                sum = csum_update(sum, &old, &p.to_be_bytes());
            }
            if !udp_off {
                let sum = if proto == PROTO_UDP && sum == 0 {
                    0xffff
                } else {
                    sum
                };
                l4[c..c + 2].copy_from_slice(&sum.to_be_bytes());
            }
        }
        PROTO_ICMP => {
            if let (Some(id), true) = (port, l4.len() >= 8) {
                let old = [l4[4], l4[5]];
                l4[4..6].copy_from_slice(&id.to_be_bytes());
                let sum = csum_update(be16(l4, 2), &old, &id.to_be_bytes());
                l4[2..4].copy_from_slice(&sum.to_be_bytes());
            }
        }
        _ => {}
    }
}

/// Rewrites one side's address (and, given, its TCP/UDP port or ICMPv6
/// echo identifier) of the IPv6 packet in `frame`, whose upper-layer
/// header (protocol `proto`) starts at `l4_at`, keeping the transport
/// checksum (over the pseudo-header) right. The packet has been parsed:
/// its headers are whole.
pub fn nat_rewrite6(
    frame: &mut [u8],
    (proto, l4_at): (u8, usize),
    side: Side,
    ip: Ipv6Addr,
    port: Option<u16>,
) {
    let at = ip_offset(frame) + if side == Side::Source { 8 } else { 24 };
    let Some(addr) = frame.get_mut(at..at + 16) else {
        return;
    };
    let old_ip: [u8; 16] = addr.try_into().unwrap_or([0; 16]);
    let new_ip = ip.octets();
    addr.copy_from_slice(&new_ip);
    let Some(l4) = frame.get_mut(l4_at..) else {
        return;
    };
    let (sum_at, port_at) = match proto {
        PROTO_TCP => (16, if side == Side::Source { 0 } else { 2 }),
        PROTO_UDP => (6, if side == Side::Source { 0 } else { 2 }),
        // The echo identifier, either way.
        PROTO_ICMPV6 => (2, 4),
        _ => return,
    };
    if l4.len() < sum_at.max(port_at) + 2 {
        return;
    }
    let mut sum = csum_update(be16(l4, sum_at), &old_ip, &new_ip);
    if let Some(p) = port {
        let old = [l4[port_at], l4[port_at + 1]];
        l4[port_at..port_at + 2].copy_from_slice(&p.to_be_bytes());
        sum = csum_update(sum, &old, &p.to_be_bytes());
    }
    // UDP over IPv6 always has a checksum; 0 is sent as all ones.
    if proto == PROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    l4[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Where the IP packet in `frame` ends (link padding after it).
fn ip_end(frame: &[u8], v6: bool) -> usize {
    let at = ip_offset(frame);
    let len = frame.get(at..).map_or(0, |h| match (v6, h.len()) {
        (false, 4..) => usize::from(be16(h, 2)),
        (true, 6..) => 40 + usize::from(be16(h, 4)),
        _ => 0,
    });
    (at + len).min(frame.len())
}

/// Where, in a frame carrying an ICMP(v6) error, the quoted packet's
/// source address and transport header are, and its protocol.
struct Quote {
    src: usize,
    l4: usize,
    proto: u8,
}

/// Rewrites the quoted packet's source address to `new` and its port or
/// echo identifier (given), with the quoted transport checksum where it
/// is quoted (`pseudo`: it covers the addresses).
fn rewrite_quote(
    frame: &mut [u8],
    end: usize,
    q: &Quote,
    new: &[u8],
    port: Option<u16>,
    (echo_proto, pseudo): (u8, bool),
) {
    let Some(a) = frame.get_mut(q.src..q.src + new.len()) else {
        return;
    };
    let old = a.to_vec();
    a.copy_from_slice(new);
    let old = old.as_slice();
    let (port_at, sum_at) = match q.proto {
        PROTO_TCP => (q.l4, q.l4 + 16),
        PROTO_UDP => (q.l4, q.l4 + 6),
        p if p == echo_proto => (q.l4 + 4, q.l4 + 2),
        _ => return,
    };
    let covers_addr = q.proto != echo_proto || pseudo;
    let Some(sum) = frame.get(sum_at..sum_at + 2).filter(|_| sum_at + 2 <= end) else {
        // Checksum not quoted: the port alone.
        if let (Some(p), Some(b)) = (port, frame.get_mut(port_at..port_at + 2)) {
            if port_at + 2 <= end {
                b.copy_from_slice(&p.to_be_bytes());
            }
        }
        return;
    };
    let mut sum = u16::from_be_bytes([sum[0], sum[1]]);
    let udp_off = q.proto == PROTO_UDP && sum == 0;
    if covers_addr {
        sum = csum_update(sum, old, new);
    }
    if let (Some(p), Some(b)) = (port, frame.get_mut(port_at..port_at + 2)) {
        let before = [b[0], b[1]];
        b.copy_from_slice(&p.to_be_bytes());
        sum = csum_update(sum, &before, &p.to_be_bytes());
    }
    if !udp_off {
        frame[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Turns an ICMP error (the ICMP message at `icmp_at` in `frame`, IPv4)
/// about a translated packet back into one about the packet as its VM
/// sent it: the quoted source becomes `ip` and, given, its port or echo
/// identifier `port`; the quoted header checksum, the quoted transport
/// checksum (where quoted) and the ICMP checksum are made right again.
pub fn unnat_quoted(frame: &mut [u8], icmp_at: usize, ip: Ipv4Addr, port: Option<u16>) {
    let end = ip_end(frame, false);
    let q = icmp_at + 8;
    let Some(&first) = frame.get(q) else { return };
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || q + ihl > end {
        return;
    }
    let quote = Quote {
        src: q + 12,
        l4: q + ihl,
        proto: frame[q + 9],
    };
    rewrite_quote(frame, end, &quote, &ip.octets(), port, (PROTO_ICMP, false));
    frame[q + 10..q + 12].fill(0);
    let sum = checksum(&frame[q..q + ihl]);
    frame[q + 10..q + 12].copy_from_slice(&sum.to_be_bytes());
    if icmp_at + 4 <= end {
        frame[icmp_at + 2..icmp_at + 4].fill(0);
        let sum = checksum(&frame[icmp_at..end]);
        frame[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
    }
}

/// [`unnat_quoted`] for an ICMPv6 error (the outer destination already
/// rewritten: its checksum covers it) quoting an IPv6 packet without
/// extension headers.
pub fn unnat_quoted6(frame: &mut [u8], icmp_at: usize, ip: Ipv6Addr, port: Option<u16>) {
    let end = ip_end(frame, true);
    let q = icmp_at + 8;
    if q + 40 > end {
        return;
    }
    let quote = Quote {
        src: q + 8,
        l4: q + 40,
        proto: frame[q + 6],
    };
    rewrite_quote(frame, end, &quote, &ip.octets(), port, (PROTO_ICMPV6, true));
    let at = ip_offset(frame);
    let mut pseudo = Vec::with_capacity(40 + end - icmp_at);
    pseudo.extend_from_slice(&frame[at + 8..at + 40]);
    pseudo.extend_from_slice(&u32::try_from(end - icmp_at).unwrap_or(0).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
    frame[icmp_at + 2..icmp_at + 4].fill(0);
    pseudo.extend_from_slice(&frame[icmp_at..end]);
    let sum = checksum(&pseudo);
    frame[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
}

/// The echo reply to an ICMP echo request frame `req` (already parsed as
/// `ip`), sent from `mac`/`ip.dst` back to the requester.
pub fn icmp_echo_reply(req: &[u8], ip: &Ipv4<'_>, mac: [u8; 6]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 20 + ip.payload.len());
    out.extend_from_slice(&req[6..12]);
    out.extend_from_slice(&mac);
    out.extend_from_slice(&crate::frame::ETHERTYPE_IPV4.to_be_bytes());
    out.extend_from_slice(&ipv4_header(ip.dst, ip.src, PROTO_ICMP, ip.payload.len()));
    let at = out.len();
    out.extend_from_slice(ip.payload);
    out[at] = ICMP_ECHO_REPLY;
    out[at + 2] = 0;
    out[at + 3] = 0;
    let sum = checksum(&out[at..]);
    out[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
    out
}

/// An ICMPv6 message (`body`: type, code, two checksum bytes, the rest)
/// from `src` to `dst` in a frame from `smac` to `dmac`, hop limit 255 (as
/// neighbour discovery wants), with its checksum.
pub fn icmpv6_frame(macs: (Mac, Mac), ends: (Ipv6Addr, Ipv6Addr), body: Vec<u8>) -> Vec<u8> {
    ipv6_frame(macs, ends, (PROTO_ICMPV6, 255), body, 2)
}

/// A UDP datagram carrying `payload` from `src` port `ports.0` to `dst`
/// port `ports.1` in a frame from `smac` to `dmac`, with its checksum.
pub fn udp6_frame(
    macs: (Mac, Mac),
    ends: (Ipv6Addr, Ipv6Addr),
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut body = Vec::with_capacity(8 + payload.len());
    body.extend_from_slice(&ports.0.to_be_bytes());
    body.extend_from_slice(&ports.1.to_be_bytes());
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(payload);
    ipv6_frame(macs, ends, (PROTO_UDP, 64), body, 6)
}

/// An IPv6 packet from `src` to `dst` (protocol and hop limit `next`)
/// carrying `body`, whose checksum (over the pseudo-header, at `sum_at`)
/// is filled in, in a frame from `smac` to `dmac`.
fn ipv6_frame(
    (smac, dmac): (Mac, Mac),
    (src, dst): (Ipv6Addr, Ipv6Addr),
    (proto, hop_limit): (u8, u8),
    mut body: Vec<u8>,
    sum_at: usize,
) -> Vec<u8> {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    if let Some(field) = body.get_mut(sum_at..sum_at + 2) {
        field.fill(0);
    }
    let mut pseudo = Vec::with_capacity(40 + body.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(&body);
    // A sum of 0 is sent as all ones (for UDP, 0 means none).
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    if let Some(field) = body.get_mut(sum_at..sum_at + 2) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
    let mut out = Vec::with_capacity(14 + 40 + body.len());
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    out.extend_from_slice(&crate::frame::ETHERTYPE_IPV6.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[proto, hop_limit]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&body);
    out
}

/// The Ethernet address IPv6 multicast `group` maps to.
pub fn multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// A 20-byte IPv4 header (TTL 64, don't fragment) with its checksum.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: usize) -> [u8; 20] {
    let total = u16::try_from(20 + payload).unwrap_or(u16::MAX);
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// A UDP datagram from `src`:`sport` to `dst`:`dport` in an Ethernet frame
/// from `smac` to `dmac`, with the UDP checksum.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let mut out = Vec::with_capacity(14 + 20 + ulen);
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    out.extend_from_slice(&crate::frame::ETHERTYPE_IPV4.to_be_bytes());
    out.extend_from_slice(&ipv4_header(src, dst, PROTO_UDP, ulen));
    let at = out.len();
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&u16::try_from(ulen).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    // Pseudo-header sum.
    let mut pseudo = Vec::with_capacity(12 + ulen);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&u16::try_from(ulen).unwrap_or(u16::MAX).to_be_bytes());
    pseudo.extend_from_slice(&out[at..]);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    out[at + 6..at + 8].copy_from_slice(&sum.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Ethernet;

    #[test]
    fn an_echo_reply_answers_the_request() {
        let mut req = vec![0u8; 12];
        req[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        req[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
        req.extend_from_slice(&0x0800u16.to_be_bytes());
        let icmp = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
        req.extend_from_slice(&ipv4_header(
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            PROTO_ICMP,
            icmp.len(),
        ));
        req.extend_from_slice(&icmp);
        let at = req.len() - icmp.len();
        let s = checksum(&req[at..]);
        req[at + 2..at + 4].copy_from_slice(&s.to_be_bytes());
        let eth = Ethernet::parse(&req).unwrap();
        let ip = Ipv4::parse(eth.payload).unwrap();
        let p = Packet::of(&ip).unwrap();
        assert_eq!((p.icmp_type, p.flow.sport), (Some(8), 0x1234));
        let reply = icmp_echo_reply(&req, &ip, [2, 0, 0, 0, 0, 1]);
        let e = Ethernet::parse(&reply).unwrap();
        assert_eq!(e.dst, [0x52, 0x54, 0, 0, 0, 9]);
        let r = Ipv4::parse(e.payload).unwrap();
        assert_eq!((r.src, r.dst), (ip.dst, ip.src));
        assert_eq!(r.payload[0], ICMP_ECHO_REPLY);
        assert_eq!(checksum(r.payload), 0);
        assert_eq!(&r.payload[8..], b"hi");
    }

    /// Whether the upper-layer checksum of the IPv6 packet in `f` holds.
    fn sum6_ok(f: &[u8]) -> bool {
        let ip = Ipv6::parse(&f[14..]).unwrap();
        let mut pseudo = [ip.src.octets(), ip.dst.octets()].concat();
        pseudo.extend_from_slice(&u32::try_from(ip.payload.len()).unwrap().to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ip.protocol]);
        pseudo.extend_from_slice(ip.payload);
        checksum(&pseudo) == 0
    }

    #[test]
    fn nat66_keeps_transport_checksums_right() {
        let (inside, outside): (Ipv6Addr, Ipv6Addr) =
            ("fd00:3::5".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let router: Ipv6Addr = "2001:db8:ee::2".parse().unwrap();
        let macs = ([2; 6], [4; 6]);
        // UDP, TCP and an echo request, each out (source and port or
        // identifier) and back in (destination).
        let mut tcp = vec![0u8; 20];
        tcp[..4].copy_from_slice(&[0x9c, 0x40, 0, 80]);
        tcp[12] = 5 << 4;
        let frames = [
            (
                PROTO_UDP,
                udp6_frame(macs, (inside, outside), (40000, 53), b"query"),
            ),
            (
                PROTO_TCP,
                ipv6_frame(macs, (inside, outside), (PROTO_TCP, 64), tcp, 16),
            ),
            (
                PROTO_ICMPV6,
                icmpv6_frame(macs, (inside, outside), vec![128, 0, 0, 0, 0, 7, 0, 1]),
            ),
        ];
        for (proto, mut f) in frames {
            assert!(sum6_ok(&f));
            nat_rewrite6(&mut f, (proto, 54), Side::Source, router, Some(61000));
            let ip = Ipv6::parse(&f[14..]).unwrap();
            assert_eq!(ip.src, router, "{proto}");
            let at = if proto == PROTO_ICMPV6 { 4 } else { 0 };
            assert_eq!(&ip.payload[at..at + 2], &61000u16.to_be_bytes());
            assert!(sum6_ok(&f), "{proto} out");
            nat_rewrite6(&mut f, (proto, 54), Side::Destination, inside, Some(7));
            assert!(sum6_ok(&f), "{proto} in");
        }
        // Another protocol, or a packet cut short: addresses only, no panic.
        let mut short = udp6_frame(macs, (inside, outside), (1, 2), b"");
        short.truncate(58);
        nat_rewrite6(&mut short, (PROTO_UDP, 54), Side::Source, router, Some(9));
        nat_rewrite6(&mut short, (47, 54), Side::Source, router, Some(9));
        nat_rewrite6(&mut short, (PROTO_UDP, 500), Side::Source, router, Some(9));
    }

    #[test]
    fn errors_about_translated_packets_are_turned_back() {
        let (router, outside) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1));
        let vm = Ipv4Addr::new(10, 0, 0, 5);
        // What left: UDP from the router's port 61000.
        let sent = udp_frame([2; 6], [4; 6], router, outside, 61000, 9, b"anyone?");
        // The outside's port unreachable quoting all of it.
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&sent[14..]);
        let s = checksum(&icmp);
        icmp[2..4].copy_from_slice(&s.to_be_bytes());
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&ipv4_header(outside, router, PROTO_ICMP, icmp.len()));
        f.extend_from_slice(&icmp);
        // Link padding after the packet is not the ICMP message's.
        f.extend_from_slice(&[0xee; 6]);
        nat_rewrite(&mut f, Side::Destination, vm, None);
        unnat_quoted(&mut f, 34, vm, Some(40000));
        let ip = Ipv4::parse(&f[14..]).unwrap();
        assert_eq!(ip.dst, vm);
        assert_eq!(checksum(ip.payload), 0, "ICMP checksum");
        let q = Ipv4::parse(&ip.payload[8..]).unwrap();
        assert_eq!((q.src, q.dst), (vm, outside));
        assert_eq!(checksum(&ip.payload[8..28]), 0, "quoted header checksum");
        let p = Packet::of(&q).unwrap();
        assert_eq!((p.flow.sport, p.flow.dport), (40000, 9));
        // The quoted UDP checksum is right for the packet as the VM sent it.
        let mut pseudo = [vm.octets(), outside.octets()].concat();
        pseudo.extend_from_slice(&[0, PROTO_UDP, 0, 15]);
        pseudo.extend_from_slice(q.payload);
        assert_eq!(checksum(&pseudo), 0);
        // A quote cut right after the ports, or shorter than a header:
        // what is there is rewritten, nothing read past the end.
        let mut short = f[..14 + 20 + 8 + 20 + 4].to_vec();
        unnat_quoted(&mut short, 34, vm, Some(1));
        let mut tiny = f[..14 + 20 + 8 + 10].to_vec();
        unnat_quoted(&mut tiny, 34, vm, Some(1));
        unnat_quoted6(&mut tiny, 34, Ipv6Addr::LOCALHOST, Some(1));
    }

    #[test]
    fn nat_keeps_every_checksum_right() {
        // A UDP datagram with its checksum, then SNAT with a new port.
        let (src, dst) = (Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(192, 0, 2, 1));
        let mut f = udp_frame([2; 6], [4; 6], src, dst, 40000, 53, b"query");
        nat_rewrite(
            &mut f,
            Side::Source,
            Ipv4Addr::new(192, 0, 2, 10),
            Some(61000),
        );
        let fresh = udp_frame(
            [2; 6],
            [4; 6],
            Ipv4Addr::new(192, 0, 2, 10),
            dst,
            61000,
            53,
            b"query",
        );
        assert_eq!(f, fresh, "the same bytes as a datagram built that way");
        // An echo request's identifier.
        let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1];
        let s = checksum(&icmp);
        icmp[2..4].copy_from_slice(&s.to_be_bytes());
        let mut e = vec![0u8; 12];
        e.extend_from_slice(&0x0800u16.to_be_bytes());
        e.extend_from_slice(&ipv4_header(src, dst, PROTO_ICMP, icmp.len()));
        e.extend_from_slice(&icmp);
        nat_rewrite(
            &mut e,
            Side::Destination,
            Ipv4Addr::new(10, 0, 0, 9),
            Some(7),
        );
        let ip = Ipv4::parse(&e[14..]).unwrap();
        assert_eq!(ip.dst, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(checksum(ip.payload), 0);
        assert_eq!(&ip.payload[4..6], &7u16.to_be_bytes());
    }

    #[test]
    fn truncated_transport_headers_are_refused() {
        let mut b = ipv4_header(
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
            PROTO_TCP,
            8,
        )
        .to_vec();
        b.extend_from_slice(&[0; 8]);
        let ip = Ipv4::parse(&b).unwrap();
        assert!(matches!(Packet::of(&ip), Err(FrameError::Truncated { .. })));
    }
}
