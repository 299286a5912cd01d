//! A VPC router's IPv6 leg on an external network: where the external
//! subnet has a /64, the router takes an address there (from its MAC) and
//! routes the VPC's /64s through it, without translation (the outside
//! routes them to that address). It answers neighbour solicitations for
//! that address, finds next hops by neighbour discovery itself (holding a
//! few packets meanwhile), and lets in only what the VMs' security groups
//! allow.

use std::net::Ipv6Addr;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use tracing::debug;

use crate::flow::{
    icmpv6_frame, multicast_mac, nat_rewrite6, solicited_node, unnat_quoted6, Packet6, Side,
    ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, PROTO_ICMPV6,
};
use crate::frame::{Ethernet, Ipv6, Mac};
use crate::l2::SegmentId;
use crate::nat::{translated_port, Gateway6, MAX_WAITING};
use crate::ndp::{
    self, neighbour_advert, ALL_NODES, NEIGHBOUR_ADVERTISEMENT, NEIGHBOUR_SOLICITATION,
};
use crate::offload::NetHdr;
use crate::router::VpcId;
use crate::secgroup::contains6;
use crate::switch::{Inner, Kicks};

/// The target of a neighbour solicitation or advertisement and the
/// link-layer address option it carries (source for a solicitation, target
/// for an advertisement), if any.
fn nd_fields(icmp: &[u8]) -> Option<(Ipv6Addr, Option<Mac>)> {
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(icmp.get(8..24)?).ok()?);
    let mut opts = icmp.get(24..)?;
    let mut mac = None;
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if matches!(opts[0], 1 | 2) {
            mac = <[u8; 6]>::try_from(&opts[2..8]).ok();
        }
        opts = &opts[len..];
    }
    Some((target, mac))
}

/// The port NAT66 translates in `p` (see [`translated_port`]).
fn napt_port6(p: &Packet6, outbound: bool) -> Option<u16> {
    let echo = (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
    let ports = (p.flow.sport, p.flow.dport);
    translated_port((p.flow.proto, p.icmp_type), ports, outbound, echo)
}

/// Where the upper-layer header of `ip` (parsed from `frame`) starts in
/// `frame`.
fn upper_offset(frame: &[u8], ip: &Ipv6<'_>) -> usize {
    (ip.payload.as_ptr() as usize).saturating_sub(frame.as_ptr() as usize)
}

/// Decrements the hop limit of the IPv6 packet in `frame` and addresses the
/// frame from `src` to `dst`.
fn forward_rewrite(frame: &mut [u8], src: Mac, dst: Mac) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    if let Some(h) = frame.get_mut(crate::flow::ip_offset(frame) + 7) {
        *h = h.saturating_sub(1);
    }
}

impl Inner {
    /// An IPv6 packet from a VM of `vpc` to an address outside the VPC:
    /// on to the next hop on the external network (the hop limit checked
    /// by the caller). False if the VPC's router has no IPv6 leg.
    pub(crate) fn route_external6(
        &self,
        vpc: VpcId,
        frame: &[u8],
        (ip, snat): (&Ipv6<'_>, bool),
        kicks: &mut Kicks,
    ) -> bool {
        let mut nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((seg, mac, gw)) = nat.gateway6(vpc) else {
            return false;
        };
        let hop = if contains6(gw.net, 64, ip.dst) {
            ip.dst
        } else {
            gw.next_hop
        };
        let mut out = frame.to_vec();
        if snat {
            // NAT66: from the router's address, a port of its own.
            let Some((p, port)) = Packet6::of6(ip)
                .ok()
                .filter(|_| !ip.fragment)
                .and_then(|p| Some((p, napt_port6(&p, true)?)))
            else {
                debug!(src = %ip.src, "no IPv6 translation for this packet");
                return true;
            };
            let proto = p.flow.proto;
            let Some(ext) = nat.napt6.out(vpc, gw.ip, proto, ip.src, port, kicks.now) else {
                debug!(gateway = %gw.ip, "out of IPv6 translations");
                return true;
            };
            let l4 = (proto, upper_offset(frame, ip));
            nat_rewrite6(&mut out, l4, Side::Source, gw.ip, Some(ext));
        }
        // From the router, one hop less; the next hop's MAC comes now or
        // when it answers.
        let known = nat.neighbours6.get(&(seg, hop)).copied();
        forward_rewrite(&mut out, mac, known.unwrap_or([0; 6]));
        match known {
            Some(_) => {
                drop(nat);
                self.emit(seg, &out, kicks);
            }
            None => {
                let q = nat.waiting6.entry((seg, hop)).or_default();
                if q.len() < MAX_WAITING {
                    q.push(out);
                }
                drop(nat);
                self.solicit(seg, mac, &gw, hop, kicks);
            }
        }
        true
    }

    /// Asks on `seg` who has `hop`, from the router's address there.
    fn solicit(&self, seg: SegmentId, mac: Mac, gw: &Gateway6, hop: Ipv6Addr, kicks: &mut Kicks) {
        let group = solicited_node(hop);
        let mut b = vec![NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&hop.octets());
        b.extend_from_slice(&[1, 1]);
        b.extend_from_slice(&mac);
        let ns = icmpv6_frame((mac, multicast_mac(group)), (gw.ip, group), b);
        self.emit(seg, &ns, kicks);
    }

    /// An IPv6 frame on external segment `seg` (from the uplink or a local
    /// port): the routers' part of it. True if it was theirs (neighbour
    /// discovery about their addresses, traffic to their MACs).
    pub(crate) fn external_frame6(
        &self,
        seg: SegmentId,
        frame: &[u8],
        eth: &Ethernet<'_>,
        (p, ip): (&Packet6, &Ipv6<'_>),
        kicks: &mut Kicks,
    ) -> bool {
        if !self.nat_on.load(Ordering::Acquire) {
            return false;
        }
        let mut nat = self.nat.lock().unwrap_or_else(PoisonError::into_inner);
        let legs = nat.gateways6(seg);
        if legs.is_empty() {
            return false;
        }
        let nd = (p.flow.proto == crate::flow::PROTO_ICMPV6)
            .then_some(p.icmp_type)
            .flatten()
            .filter(|t| matches!(*t, NEIGHBOUR_SOLICITATION | NEIGHBOUR_ADVERTISEMENT))
            .and_then(|t| Some((t, nd_fields(ip.payload)?)));
        if let Some((kind, (target, lladdr))) = nd {
            let ours = legs.iter().find(|(_, _, g)| g.ip == target).copied();
            // A neighbour speaking: remember it (a solicitation names its
            // sender, an advertisement its target), and send what waited.
            let (who, at) = if kind == NEIGHBOUR_SOLICITATION {
                (ip.src, lladdr)
            } else {
                (target, lladdr.or(Some(eth.src)))
            };
            let mut held = Vec::new();
            if let (Some(at), false) = (at, who.is_unspecified()) {
                if ours.is_some() || nat.waiting6.contains_key(&(seg, who)) {
                    nat.neighbours6.insert((seg, who), at);
                    held = nat.waiting6.remove(&(seg, who)).unwrap_or_default();
                }
            }
            drop(nat);
            // Held frames are the router's already (source, hop limit):
            // only the next hop's MAC was missing.
            for mut f in held {
                if let Some(to) = at {
                    f[0..6].copy_from_slice(&to);
                    self.emit(seg, &f, kicks);
                }
            }
            if let (Some((_, mac, g)), NEIGHBOUR_SOLICITATION) = (ours, kind) {
                let (back, to_mac) = if ip.src.is_unspecified() {
                    (ALL_NODES, multicast_mac(ALL_NODES))
                } else {
                    (ip.src, eth.src)
                };
                let na = neighbour_advert((mac, to_mac), g.ip, ip.src, back);
                self.emit(seg, &na, kicks);
                return true;
            }
            return ours.is_some();
        }
        let Some((vpc, mac, g)) = legs.iter().find(|(_, m, _)| *m == eth.dst).copied() else {
            return false;
        };
        drop(nat);
        if ip.dst == g.ip {
            // A ping of the router's address, or a reply on a translated
            // connection (NAT66); anything else to it is not served.
            if p.icmp_type == Some(ICMPV6_ECHO_REQUEST) {
                let mut b = ip.payload.to_vec();
                b[0] = ICMPV6_ECHO_REPLY;
                let reply = icmpv6_frame((mac, eth.src), (g.ip, ip.src), b);
                self.emit(seg, &reply, kicks);
            } else if ip.hop_limit > 1 && !ip.fragment {
                // An error about a translated packet (quoting the router's
                // address as its source), or a reply on a translation.
                let error = p
                    .icmp_type
                    .filter(|t| crate::flow::icmpv6_error(*t))
                    .and_then(|_| crate::flow::quoted6(ip.payload))
                    .filter(|q| q.src == g.ip);
                let key = match error {
                    Some(q) => Some((q.proto, q.sport)),
                    None => napt_port6(p, false).map(|port| (p.flow.proto, port)),
                };
                let inside = key.and_then(|(proto, port)| {
                    self.nat
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .napt6
                        .inside(g.ip, proto, port, kicks.now)
                });
                if let Some(n) = inside {
                    let mut out = frame.to_vec();
                    let at = upper_offset(frame, ip);
                    if error.is_some() {
                        nat_rewrite6(
                            &mut out,
                            (p.flow.proto, at),
                            Side::Destination,
                            n.inner,
                            None,
                        );
                        unnat_quoted6(&mut out, at, n.inner, Some(n.port));
                    } else {
                        let l4 = (p.flow.proto, at);
                        nat_rewrite6(&mut out, l4, Side::Destination, n.inner, Some(n.port));
                    }
                    self.route_into6(n.vpc, n.inner, &out, kicks);
                }
            }
            return true;
        }
        let why = if ip.hop_limit <= 1 {
            Some((ndp::TIME_EXCEEDED, 0))
        } else if self.route_into6(vpc, ip.dst, frame, kicks) {
            None
        } else if self
            .l3
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .vpc_covers6(vpc, ip.dst)
        {
            Some((ndp::UNREACHABLE, ndp::ADDRESS_UNREACHABLE))
        } else {
            Some((ndp::UNREACHABLE, ndp::NO_ROUTE))
        };
        // The sender learns why, within the router's error rate.
        if let Some(why) = why.filter(|_| self.icmp6_errors.allow(kicks.now)) {
            let packet = crate::flow::ipv6_packet(frame);
            if let Some(e) = ndp::error_from((mac, eth.src), g.ip, packet, ip, why) {
                self.emit(seg, &e, kicks);
            }
        }
        true
    }

    /// Hands an IPv6 packet from outside to the VM of `vpc` holding `dst`,
    /// through its ingress checks.
    /// False if no VM of the VPC holds `dst` (here).
    fn route_into6(&self, vpc: VpcId, dst: Ipv6Addr, frame: &[u8], kicks: &mut Kicks) -> bool {
        let target = {
            let l3 = self.l3.read().unwrap_or_else(PoisonError::into_inner);
            l3.route_in_vpc6(vpc, dst)
                .map(|(seg, sub, host)| (seg, sub.gateway_mac, host.port, host.mac))
        };
        let Some((seg, gw_mac, port, mac)) = target else {
            return false;
        };
        let Some(to) = self.port_on(seg, port) else {
            return false;
        };
        let mut out = frame.to_vec();
        forward_rewrite(&mut out, gw_mac, mac);
        self.deliver_checked(&to, (&out, &NetHdr::PLAIN), None, kicks.now, kicks);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_messages_name_their_target_and_link_layer_address() {
        let t: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        na.extend_from_slice(&t.octets());
        na.extend_from_slice(&[2, 1, 2, 0, 0, 0, 0, 9]);
        assert_eq!(nd_fields(&na), Some((t, Some([2, 0, 0, 0, 0, 9]))));
        // A zero-length option ends the walk; a short message is nothing.
        na[25] = 0;
        assert_eq!(nd_fields(&na), Some((t, None)));
        assert_eq!(nd_fields(&na[..20]), None);
        assert_eq!(
            solicited_node("2001:db8::12:3456".parse().unwrap()),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }
}
