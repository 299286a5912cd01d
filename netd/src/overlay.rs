//! Overlay networks: an L2 segment stretched across nodes in VXLAN (RFC
//! 7348) or Geneve (RFC 8926) over UDP, as the node's tunnel endpoint is
//! set. Each node's switch sends a frame for a MAC it learned
//! behind another node to that node's tunnel endpoint, and floods
//! broadcast, multicast and unknown frames to every endpoint listed for the
//! network (head-end replication). Frames from the tunnel are learned behind
//! their endpoint and never flooded back into it. Datagrams from endpoints
//! not listed for the network's VNI are dropped.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::l2::{PortId, SegmentId};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// The IANA Geneve port.
pub const GENEVE_PORT: u16 = 6081;
/// Tunnel header length: VXLAN's, and Geneve's as sent (no options).
pub const HEADER: usize = 8;
/// Highest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Pseudo-port ids for remote endpoints start here (real ports count up
/// from 1).
pub const REMOTE_PORTS: u32 = 0x8000_0000;

/// VXLAN header flags: the VNI is valid.
const FLAG_VNI: u8 = 0x08;
/// Geneve: the protocol of the payload (Ethernet), and the flags of a
/// control message (O) and of critical options (C).
const GENEVE_ETHERNET: u16 = 0x6558;
const GENEVE_OAM: u8 = 0x80;
const GENEVE_CRITICAL: u8 = 0x40;

/// How frames travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encap {
    /// VXLAN (RFC 7348).
    #[default]
    Vxlan,
    /// Geneve (RFC 8926); options are skipped, and datagrams with critical
    /// options (none is known here) or control messages are refused.
    Geneve,
}

impl Encap {
    /// "vxlan" or "geneve" ("" is VXLAN).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | "vxlan" => Some(Self::Vxlan),
            "geneve" => Some(Self::Geneve),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::Geneve => "geneve",
        }
    }

    /// Its IANA port.
    pub fn port(self) -> u16 {
        match self {
            Self::Vxlan => VXLAN_PORT,
            Self::Geneve => GENEVE_PORT,
        }
    }

    /// The header for `vni`.
    #[inline]
    pub fn header(self, vni: u32) -> [u8; HEADER] {
        let v = (vni << 8).to_be_bytes();
        match self {
            Self::Vxlan => [FLAG_VNI, 0, 0, 0, v[0], v[1], v[2], v[3]],
            Self::Geneve => {
                let p = GENEVE_ETHERNET.to_be_bytes();
                [0, 0, p[0], p[1], v[0], v[1], v[2], v[3]]
            }
        }
    }

    /// `frame` with the header for `vni`.
    pub fn encap(self, vni: u32, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + frame.len());
        self.encap_into(vni, frame, &mut out);
        out
    }

    /// Appends `frame` with the header for `vni` to `out`.
    pub fn encap_into(self, vni: u32, frame: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header(vni));
        out.extend_from_slice(frame);
    }

    /// The VNI and inner frame of a datagram; None if it is not one this
    /// endpoint takes.
    #[inline]
    pub fn decap(self, datagram: &[u8]) -> Option<(u32, &[u8])> {
        let h = datagram.get(..HEADER)?;
        let vni = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) >> 8;
        match self {
            Self::Vxlan => {
                if h[0] & FLAG_VNI == 0 {
                    return None;
                }
                datagram.get(HEADER..).map(|f| (vni, f))
            }
            Self::Geneve => {
                let version = h[0] >> 6;
                let options = usize::from(h[0] & 0x3f) * 4;
                let ethernet = u16::from_be_bytes([h[2], h[3]]) == GENEVE_ETHERNET;
                if version != 0 || h[1] & (GENEVE_OAM | GENEVE_CRITICAL) != 0 || !ethernet {
                    return None;
                }
                datagram.get(HEADER + options..).map(|f| (vni, f))
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Seg {
    vni: u32,
    remotes: Vec<IpAddr>,
}

/// Which segments are overlays, their VNIs and remote endpoints, and the
/// pseudo-ports the MAC table learns remote addresses behind.
#[derive(Debug, Default)]
pub struct Overlay {
    by_vni: HashMap<u32, SegmentId, ahash::RandomState>,
    segs: HashMap<SegmentId, Seg, ahash::RandomState>,
    remote_port: HashMap<IpAddr, PortId, ahash::RandomState>,
    port_remote: HashMap<PortId, IpAddr, ahash::RandomState>,
}

impl Overlay {
    /// Makes `segment` the overlay network `vni`.
    pub fn add(&mut self, segment: SegmentId, vni: u32) {
        self.by_vni.insert(vni, segment);
        self.segs.insert(
            segment,
            Seg {
                vni,
                remotes: Vec::new(),
            },
        );
    }

    /// Forgets overlay `segment`.
    pub fn remove(&mut self, segment: SegmentId) {
        if let Some(s) = self.segs.remove(&segment) {
            self.by_vni.remove(&s.vni);
        }
    }

    /// The endpoints of the other nodes with ports on `segment`.
    pub fn set_remotes(&mut self, segment: SegmentId, remotes: Vec<IpAddr>) {
        for r in &remotes {
            if !self.remote_port.contains_key(r) {
                let id = PortId(REMOTE_PORTS + u32::try_from(self.remote_port.len()).unwrap_or(0));
                self.remote_port.insert(*r, id);
                self.port_remote.insert(id, *r);
            }
        }
        if let Some(s) = self.segs.get_mut(&segment) {
            s.remotes = remotes;
        }
    }

    /// The VNI and remote endpoints of `segment`, if it is an overlay.
    pub fn remotes(&self, segment: SegmentId) -> Option<(u32, &[IpAddr])> {
        self.segs
            .get(&segment)
            .map(|s| (s.vni, s.remotes.as_slice()))
    }

    /// The endpoint behind pseudo-port `port`.
    pub fn remote_of(&self, port: PortId) -> Option<IpAddr> {
        self.port_remote.get(&port).copied()
    }

    /// The segment a datagram for `vni` from `from` belongs to, and the
    /// pseudo-port of `from`; None if `from` is not an endpoint of that
    /// network.
    pub fn accept(&self, vni: u32, from: IpAddr) -> Option<(SegmentId, PortId)> {
        let seg = *self.by_vni.get(&vni)?;
        let s = self.segs.get(&seg)?;
        if !s.remotes.contains(&from) {
            return None;
        }
        Some((seg, *self.remote_port.get(&from)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_strangers_are_refused() {
        let vxlan = Encap::Vxlan;
        let d = vxlan.encap(5001, b"frame");
        assert_eq!(vxlan.decap(&d), Some((5001, &b"frame"[..])));
        assert_eq!(vxlan.decap(&d[..7]), None);
        let mut no_flag = d.clone();
        no_flag[0] = 0;
        assert_eq!(vxlan.decap(&no_flag), None);
        // Neither endpoint takes the other's datagrams.
        assert_eq!(Encap::Geneve.decap(&d), None);
        assert_eq!(vxlan.decap(&Encap::Geneve.encap(5001, b"frame")), None);

        let mut o = Overlay::default();
        let (seg, peer, stranger) = (
            SegmentId(3),
            IpAddr::from([10, 99, 0, 2]),
            IpAddr::from([0xfd00, 0x99, 0, 0, 0, 0, 0, 2]),
        );
        o.add(seg, 5001);
        o.set_remotes(seg, vec![peer]);
        let (s, p) = o.accept(5001, peer).unwrap();
        assert_eq!((s, o.remote_of(p)), (seg, Some(peer)));
        assert!(o.accept(5001, stranger).is_none());
        assert!(o.accept(5002, peer).is_none());
    }

    #[test]
    fn geneve_options_are_skipped_and_what_must_not_pass_is_refused() {
        let g = Encap::Geneve;
        let d = g.encap(0x00ab_cdef, b"frame");
        assert_eq!(&d[..8], &[0, 0, 0x65, 0x58, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(g.decap(&d), Some((0x00ab_cdef, &b"frame"[..])));
        // Two 4-byte words of (non-critical) options before the frame.
        let mut opts = d[..8].to_vec();
        opts[0] = 2;
        opts.extend_from_slice(&[0x01, 0x02, 0x03, 0x01, 9, 9, 9, 9]);
        opts.extend_from_slice(b"frame");
        assert_eq!(g.decap(&opts), Some((0x00ab_cdef, &b"frame"[..])));
        // Options longer than the datagram.
        assert_eq!(g.decap(&opts[..14]), None);
        let refused = |byte: usize, value: u8| {
            let mut x = d.clone();
            x[byte] = value;
            g.decap(&x).map(|(vni, f)| (vni, f.to_vec()))
        };
        assert_eq!(refused(1, GENEVE_CRITICAL), None, "critical options");
        assert_eq!(refused(1, GENEVE_OAM), None, "a control message");
        assert_eq!(refused(0, 0x40), None, "version 1");
        assert_eq!(refused(3, 0x00), None, "not Ethernet");
        assert_eq!(g.decap(&d[..7]), None);
    }
}
