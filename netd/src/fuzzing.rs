//! Entry points for fuzzing what guests and peers control: frames as a port
//! receives them (Ethernet, ARP, IPv4, IPv6, transport headers, neighbour
//! discovery checks, connection tracking, DHCP, DHCPv6, DNS) and tunnel datagrams (VXLAN, Geneve). `netd/fuzz` wraps them as cargo-fuzz targets; the unit tests run them
//! over pseudo-random input.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use crate::conntrack::{Conntrack, Direction};
use crate::dhcp::{DhcpConfig, DhcpServer};
use crate::dns;
use crate::flow::{link_local, Packet, Packet6, PROTO_ICMPV6, PROTO_UDP};

use crate::frame::{Arp, Ethernet, Ipv4, Ipv6, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use crate::l2::{MacTable, PortId, SegmentId};
use crate::offload;

/// Parses `data` as a frame the way the switch does, feeds its addresses to
/// a MAC table and offers it to a DHCP server, and reads its start as a
/// virtio-net header to finish the rest by; must never panic.
pub fn frame(data: &[u8]) {
    let mut dhcp = DhcpServer::new(DhcpConfig {
        gateway: Ipv4Addr::new(10, 0, 0, 1),
        gateway_mac: [0x52, 0x54, 0, 0, 0, 0xfe],
        prefix: 24,
        pool: (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 12)),
        dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
        mtu: 1500,
        lease: std::time::Duration::from_secs(60),
        reservations: HashMap::new(),
        domain: "lan".into(),
    });
    let _ = dhcp.handle(data, Instant::now());
    dhcp6_answers(data);
    // As a datagram from another node's tunnel endpoint.
    for encap in [crate::overlay::Encap::Vxlan, crate::overlay::Encap::Geneve] {
        if let Some((_, inner)) = encap.decap(data) {
            let _ = Ethernet::parse(inner);
        }
    }
    // The first 12 bytes as the virtio-net header a guest sent with the
    // rest: checked, then finished (checksum, segmentation) if it passes.
    if let Some((h, rest)) = data.split_first_chunk::<{ offload::NET_HDR }>() {
        let hdr = offload::NetHdr::parse(h);
        if hdr.validate(u64::MAX, rest.len()).is_ok() {
            let _ = offload::finish(rest, &hdr, |seg| {
                let _ = Ethernet::parse(seg);
            });
        }
    }
    let Ok(eth) = Ethernet::parse(data) else {
        return;
    };
    match eth.ethertype {
        ETHERTYPE_ARP => {
            if let Ok(a) = Arp::parse(eth.payload) {
                let _ = a.reply_from([0x52, 0x54, 0, 0, 0, 1]).to_frame(a.sha);
            }
        }
        ETHERTYPE_IPV4 => {
            if let Ok(ip) = Ipv4::parse(eth.payload) {
                if let Ok(p) = Packet::of(&ip) {
                    let mut ct = Conntrack::new(4);
                    let now = Instant::now();
                    if !ct.track(&p, now) {
                        ct.commit(&p, Direction::Egress, now);
                    }
                    let _ = ct.track(&p, now);
                    let _ = crate::flow::quoted(ip.payload);
                    let mut copy = data.to_vec();
                    let at = crate::flow::ip_offset(data) + ip.header_len;
                    crate::flow::unnat_quoted(&mut copy, at, Ipv4Addr::LOCALHOST, Some(9));
                    if p.flow.proto == PROTO_UDP {
                        if let Some(q) = ip.payload.get(8..) {
                            let _ = dns::answer(q, "lan.atoll", |_| {
                                Some((Ipv4Addr::LOCALHOST, Some(std::net::Ipv6Addr::LOCALHOST)))
                            });
                        }
                    }
                }
            }
        }
        ETHERTYPE_IPV6 => {
            if let Ok(ip) = Ipv6::parse(eth.payload) {
                if let Ok(p) = Packet6::of6(&ip) {
                    let mut ct = Conntrack::new(4);
                    let now = Instant::now();
                    if !ct.track(&p, now) {
                        ct.commit(&p, Direction::Egress, now);
                    }
                    let _ = ct.track(&p, now);
                    let _ = crate::flow::quoted6(ip.payload);
                    // NAT66 both ways on a copy.
                    let mut copy = data.to_vec();
                    let l4 = (ip.payload.as_ptr() as usize).saturating_sub(data.as_ptr() as usize);
                    for side in [crate::flow::Side::Source, crate::flow::Side::Destination] {
                        let to = std::net::Ipv6Addr::LOCALHOST;
                        crate::flow::nat_rewrite6(&mut copy, (p.flow.proto, l4), side, to, Some(9));
                    }
                    crate::flow::unnat_quoted6(
                        &mut copy,
                        l4,
                        std::net::Ipv6Addr::LOCALHOST,
                        Some(9),
                    );
                    if p.flow.proto == PROTO_UDP {
                        if let Some(m) = ip.payload.get(8..) {
                            dhcp6_answers(m);
                        }
                    }
                    if let (PROTO_ICMPV6, Some(t)) = (p.flow.proto, p.icmp_type) {
                        let sec = crate::secgroup::PortSecurity {
                            ip6: vec![link_local(eth.src)],
                            ..Default::default()
                        };
                        let _ = crate::switch::nd_about_itself(
                            t,
                            ip.payload,
                            eth.src,
                            &sec,
                            ip.src.is_unspecified(),
                        );
                    }
                }
            }
        }
        _ => {}
    }
    let mut table = MacTable::new(std::time::Duration::from_secs(1), 4);
    let now = Instant::now();
    let seg = SegmentId(u32::from(eth.vlan.unwrap_or(0)));
    let _ = table.forward(seg, PortId(1), eth.src, eth.dst, now);
    let _ = table.forward(seg, PortId(2), eth.dst, eth.src, now);
}

/// Offers `msg` to a DHCPv6 server that assigns addresses and to one that
/// does not.
fn dhcp6_answers(msg: &[u8]) {
    let dns = [std::net::Ipv6Addr::LOCALHOST];
    for address in [None, Some(std::net::Ipv6Addr::LOCALHOST)] {
        let cfg = crate::dhcp6::Config {
            server_mac: [0x52, 0x54, 0, 0, 0, 0xfe],
            prefix: std::net::Ipv6Addr::UNSPECIFIED,
            address,
            dns: &dns,
            domain: "lan.atoll",
        };
        let _ = crate::dhcp6::answer(&cfg, msg);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pseudo_random_frames_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        };
        for i in 0..5000usize {
            let len = i % 200;
            let mut buf: Vec<u8> = (0..len).map(|_| next()).collect();
            // Steer some inputs into the ARP, IPv4 and DHCP parsers.
            if len > 14 {
                let t = match i % 3 {
                    0 => [0x08, 0x06],
                    1 => [0x08, 0x00],
                    _ => [0x81, 0x00],
                };
                buf[12..14].copy_from_slice(&t);
            }
            if len > 42 && i % 5 == 0 {
                // IPv4, UDP 68 -> 67, valid header checksum: into DHCP parsing.
                buf[14] = 0x45;
                buf[23] = 17;
                buf[24..26].fill(0);
                let total = u16::try_from(len - 14).unwrap_or(0);
                buf[16..18].copy_from_slice(&total.to_be_bytes());
                let sum = crate::frame::checksum(&buf[14..34]);
                buf[24..26].copy_from_slice(&sum.to_be_bytes());
                buf[34..36].copy_from_slice(&68u16.to_be_bytes());
                buf[36..38].copy_from_slice(&67u16.to_be_bytes());
            }
            if len > 12 + 60 && i % 7 == 0 {
                // A GSO TCPv4 header before an IPv4/TCP frame: into
                // segmentation, with random IP and TCP header lengths.
                buf[..12].copy_from_slice(&[1, 1, 54, 0, 64, 0, 34, 0, 16, 0, 0, 0]);
                buf[24..26].copy_from_slice(&[0x08, 0x00]);
                buf[26] = 0x40 | (buf[26] & 0x0f);
                buf[35] = 6;
            }
            super::frame(&buf);
        }
    }
}
