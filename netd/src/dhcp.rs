//! The DHCP server a network's switch answers with (no frame reaches the
//! other ports): leases from the subnet's pool, static reservations, and the
//! gateway, DNS servers, MTU and lease time as options. Packets are parsed
//! and built with smoltcp's wire types.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr,
};

use crate::frame::Mac;

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
/// How long an offer holds its address for the client.
const OFFER_HOLD: Duration = Duration::from_secs(60);

/// A subnet's DHCP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The gateway's address: the server's identity and the router option.
    pub gateway: Ipv4Addr,
    /// The gateway's MAC (replies come from it).
    pub gateway_mac: Mac,
    /// Prefix length of the subnet.
    pub prefix: u8,
    /// First and last address handed out dynamically.
    pub pool: (Ipv4Addr, Ipv4Addr),
    /// DNS servers (at most 3 are sent).
    pub dns: Vec<Ipv4Addr>,
    /// Interface MTU for the guests.
    pub mtu: u16,
    /// Lease time.
    pub lease: Duration,
    /// Fixed addresses by MAC (inside or outside the pool).
    pub reservations: HashMap<Mac, Ipv4Addr>,
    /// DNS domain (option 15; empty: not sent).
    pub domain: String,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ip: Ipv4Addr,
    until: Instant,
    bound: bool,
}

/// One subnet's server.
#[derive(Debug)]
pub struct DhcpServer {
    cfg: DhcpConfig,
    leases: HashMap<Mac, Lease>,
}

/// What the server did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not a DHCP request to a server: the switch forwards it as usual.
    NotDhcp,
    /// A DHCP request this server ignores (another server's, or no address
    /// left to offer); nobody else gets it either.
    Ignored,
    /// The reply frame for the client.
    Reply(Vec<u8>),
}

impl DhcpServer {
    /// A server for `cfg`.
    pub fn new(cfg: DhcpConfig) -> Self {
        Self {
            cfg,
            leases: HashMap::new(),
        }
    }

    /// Reserves `ip` for `mac` (None: drops its reservation and lease).
    pub fn reserve(&mut self, mac: Mac, ip: Option<Ipv4Addr>) {
        match ip {
            Some(ip) => {
                self.cfg.reservations.insert(mac, ip);
                if self.leases.get(&mac).is_some_and(|l| l.ip != ip) {
                    self.leases.remove(&mac);
                }
            }
            None => {
                self.cfg.reservations.remove(&mac);
                self.leases.remove(&mac);
            }
        }
    }

    /// The address leased (bound) to `mac`, if any.
    pub fn lease_of(&self, mac: &Mac, now: Instant) -> Option<Ipv4Addr> {
        self.leases
            .get(mac)
            .filter(|l| l.bound && l.until > now)
            .map(|l| l.ip)
    }

    /// Answers `frame` if it is a DHCP client message.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Outcome {
        let Some((mac, req)) = parse_request(frame) else {
            return Outcome::NotDhcp;
        };
        let Ok(packet) = DhcpPacket::new_checked(req) else {
            return Outcome::Ignored;
        };
        let Ok(repr) = DhcpRepr::parse(&packet) else {
            return Outcome::Ignored;
        };
        if repr.client_hardware_address != EthernetAddress(mac) {
            // The client's hardware address must be the frame's source.
            return Outcome::Ignored;
        }
        let ours = repr.server_identifier.is_none_or(|s| s == self.cfg.gateway);
        match repr.message_type {
            DhcpMessageType::Discover => match self.choose(mac, now) {
                Some(ip) => {
                    self.leases.insert(
                        mac,
                        Lease {
                            ip,
                            until: now + OFFER_HOLD,
                            bound: false,
                        },
                    );
                    Outcome::Reply(self.reply(&repr, DhcpMessageType::Offer, ip))
                }
                None => Outcome::Ignored,
            },
            DhcpMessageType::Request if ours => {
                let wanted = repr
                    .requested_ip
                    .or((!repr.client_ip.is_unspecified()).then_some(repr.client_ip));
                match (wanted, self.choose(mac, now)) {
                    (Some(w), Some(ip)) if w == ip => {
                        self.leases.insert(
                            mac,
                            Lease {
                                ip,
                                until: now + self.cfg.lease,
                                bound: true,
                            },
                        );
                        Outcome::Reply(self.reply(&repr, DhcpMessageType::Ack, ip))
                    }
                    _ => Outcome::Reply(self.reply(
                        &repr,
                        DhcpMessageType::Nak,
                        Ipv4Addr::UNSPECIFIED,
                    )),
                }
            }
            DhcpMessageType::Release if ours => {
                self.leases.remove(&mac);
                Outcome::Ignored
            }
            _ => Outcome::Ignored,
        }
    }

    /// The address for `mac`: its reservation, its current lease or offer,
    /// or the first free one of the pool.
    fn choose(&self, mac: Mac, now: Instant) -> Option<Ipv4Addr> {
        if let Some(ip) = self.cfg.reservations.get(&mac) {
            return Some(*ip);
        }
        if let Some(l) = self.leases.get(&mac).filter(|l| l.until > now) {
            return Some(l.ip);
        }
        let (first, last) = (u32::from(self.cfg.pool.0), u32::from(self.cfg.pool.1));
        (first..=last).map(Ipv4Addr::from).find(|ip| {
            *ip != self.cfg.gateway
                && !self.cfg.reservations.values().any(|r| r == ip)
                && !self
                    .leases
                    .iter()
                    .any(|(m, l)| *m != mac && l.ip == *ip && l.until > now)
        })
    }

    fn reply(&self, req: &DhcpRepr<'_>, kind: DhcpMessageType, ip: Ipv4Addr) -> Vec<u8> {
        let gw = self.cfg.gateway;
        let ack = kind != DhcpMessageType::Nak;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.cfg.prefix.min(32)))
            .unwrap_or(0);
        let dns: Vec<Ipv4Address> = self.cfg.dns.iter().take(3).copied().collect();
        let mtu = self.cfg.mtu.to_be_bytes();
        let domain = self.cfg.domain.as_bytes();
        let mut extra = vec![DhcpOption {
            kind: 26, // interface MTU
            data: &mtu,
        }];
        if !domain.is_empty() && domain.len() <= 255 {
            extra.push(DhcpOption {
                kind: 15, // domain name
                data: domain,
            });
        }
        let secs = u32::try_from(self.cfg.lease.as_secs()).unwrap_or(u32::MAX);
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: ip,
            server_ip: if ack { gw } else { Ipv4Address::UNSPECIFIED },
            router: ack.then_some(gw),
            subnet_mask: ack.then(|| Ipv4Addr::from(mask)),
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: req.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(gw),
            parameter_request_list: None,
            dns_servers: if ack { heapless_dns(&dns) } else { None },
            max_size: None,
            lease_duration: ack.then_some(secs),
            renew_duration: ack.then_some(secs / 2),
            rebind_duration: ack.then_some(secs / 8 * 7),
            additional_options: if ack { &extra } else { &[] },
        };
        let to_client = !req.broadcast && ack && kind == DhcpMessageType::Ack;
        let (eth_dst, ip_dst) = if to_client {
            (req.client_hardware_address, ip)
        } else {
            (EthernetAddress::BROADCAST, Ipv4Address::BROADCAST)
        };
        let udp = UdpRepr {
            src_port: SERVER_PORT,
            dst_port: CLIENT_PORT,
        };
        let dhcp_len = repr.buffer_len();
        let ipv4 = Ipv4Repr {
            src_addr: gw,
            dst_addr: ip_dst,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + dhcp_len,
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.cfg.gateway_mac),
            dst_addr: eth_dst,
            ethertype: EthernetProtocol::Ipv4,
        };
        let total = eth.buffer_len() + ipv4.buffer_len() + ipv4.payload_len;
        let mut buf = vec![0u8; total];
        let caps = ChecksumCapabilities::default();
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ipv4.emit(&mut p, &caps);
        let mut u = UdpPacket::new_unchecked(p.payload_mut());
        udp.emit(
            &mut u,
            &ipv4.src_addr.into(),
            &ipv4.dst_addr.into(),
            dhcp_len,
            |b| {
                let mut d = DhcpPacket::new_unchecked(b);
                // Emitting into a buffer of buffer_len() bytes cannot fail.
                let _ = repr.emit(&mut d);
            },
            &caps,
        );
        buf
    }
}

fn heapless_dns(dns: &[Ipv4Address]) -> Option<heapless::Vec<Ipv4Address, 3>> {
    if dns.is_empty() {
        return None;
    }
    let mut v = heapless::Vec::new();
    for d in dns {
        let _ = v.push(*d);
    }
    Some(v)
}

/// Whether `frame` is a DHCP client-to-server message: the switch asks
/// before taking its servers' lock, so other traffic never waits for it.
pub fn is_request(frame: &[u8]) -> bool {
    parse_request(frame).is_some()
}

/// (client MAC, DHCP payload) of a client-to-server DHCP frame. The header
/// checksum is verified last, for UDP 68 -> 67 only.
fn parse_request(frame: &[u8]) -> Option<(Mac, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    if udp.dst_port() != SERVER_PORT || udp.src_port() != CLIENT_PORT || !ip.verify_checksum() {
        return None;
    }
    Some((eth.src_addr().0, udp.payload()))
}
