//! The transport part of an IPv4 packet as security groups and connection
//! tracking see it: protocol, addresses, ports (the ICMP echo identifier for
//! pings), TCP flags. Also the few rewrites the router does in place.

use std::net::Ipv4Addr;

use crate::frame::{checksum, FrameError, Ipv4};

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

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// A connection's identity in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// One packet's flow and the details the tracker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Its flow.
    pub flow: Flow,
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

impl Packet {
    /// Reads the transport header of `ip`. Fragments after the first carry
    /// no transport header: their ports read as 0.
    pub fn of(ip: &Ipv4<'_>) -> Result<Self, FrameError> {
        let p = ip.payload;
        let mut flow = Flow {
            proto: ip.protocol,
            src: ip.src,
            dst: ip.dst,
            sport: 0,
            dport: 0,
        };
        let (mut tcp_flags, mut icmp_type) = (0, None);
        if !ip.fragment || ip.first_fragment {
            match ip.protocol {
                PROTO_TCP => {
                    if p.len() < 20 {
                        return Err(short("TCP header", p.len(), 20));
                    }
                    flow.sport = be16(p, 0);
                    flow.dport = be16(p, 2);
                    tcp_flags = p[13];
                }
                PROTO_UDP => {
                    if p.len() < 8 {
                        return Err(short("UDP header", p.len(), 8));
                    }
                    flow.sport = be16(p, 0);
                    flow.dport = be16(p, 2);
                }
                PROTO_ICMP => {
                    if p.len() < 8 {
                        return Err(short("ICMP header", p.len(), 8));
                    }
                    icmp_type = Some(p[0]);
                    if matches!(p[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) {
                        flow.sport = be16(p, 4);
                        flow.dport = flow.sport;
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            flow,
            tcp_flags,
            icmp_type,
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
