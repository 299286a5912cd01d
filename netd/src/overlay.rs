//! Overlay networks: an L2 segment stretched across nodes in VXLAN (RFC
//! 7348) over UDP. Each node's switch sends a frame for a MAC it learned
//! behind another node to that node's tunnel endpoint, and floods
//! broadcast, multicast and unknown frames to every endpoint listed for the
//! network (head-end replication). Frames from the tunnel are learned behind
//! their endpoint and never flooded back into it. Datagrams from endpoints
//! not listed for the network's VNI are dropped.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::l2::{PortId, SegmentId};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN header length.
pub const VXLAN_HEADER: usize = 8;
/// Highest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Pseudo-port ids for remote endpoints start here (real ports count up
/// from 1).
pub const REMOTE_PORTS: u32 = 0x8000_0000;

/// VXLAN header flags: the VNI is valid.
const FLAG_VNI: u8 = 0x08;

#[derive(Debug, Clone, Default)]
struct Seg {
    vni: u32,
    remotes: Vec<Ipv4Addr>,
}

/// Which segments are overlays, their VNIs and remote endpoints, and the
/// pseudo-ports the MAC table learns remote addresses behind.
#[derive(Debug, Default)]
pub struct Overlay {
    by_vni: HashMap<u32, SegmentId, ahash::RandomState>,
    segs: HashMap<SegmentId, Seg, ahash::RandomState>,
    remote_port: HashMap<Ipv4Addr, PortId, ahash::RandomState>,
    port_remote: HashMap<PortId, Ipv4Addr, ahash::RandomState>,
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
    pub fn set_remotes(&mut self, segment: SegmentId, remotes: Vec<Ipv4Addr>) {
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
    pub fn remotes(&self, segment: SegmentId) -> Option<(u32, &[Ipv4Addr])> {
        self.segs
            .get(&segment)
            .map(|s| (s.vni, s.remotes.as_slice()))
    }

    /// The endpoint behind pseudo-port `port`.
    pub fn remote_of(&self, port: PortId) -> Option<Ipv4Addr> {
        self.port_remote.get(&port).copied()
    }

    /// The segment a datagram for `vni` from `from` belongs to, and the
    /// pseudo-port of `from`; None if `from` is not an endpoint of that
    /// network.
    pub fn accept(&self, vni: u32, from: Ipv4Addr) -> Option<(SegmentId, PortId)> {
        let seg = *self.by_vni.get(&vni)?;
        let s = self.segs.get(&seg)?;
        if !s.remotes.contains(&from) {
            return None;
        }
        Some((seg, *self.remote_port.get(&from)?))
    }
}

/// `frame` in a VXLAN header for `vni`.
pub fn encap(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VXLAN_HEADER + frame.len());
    encap_into(vni, frame, &mut out);
    out
}

/// Appends `frame` in a VXLAN header for `vni` to `out`.
pub fn encap_into(vni: u32, frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&header(vni));
    out.extend_from_slice(frame);
}

/// The VXLAN header for `vni`.
pub fn header(vni: u32) -> [u8; VXLAN_HEADER] {
    let v = (vni << 8).to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[0], v[1], v[2], v[3]]
}

/// The VNI and inner frame of a VXLAN datagram; None if it is not one.
pub fn decap(datagram: &[u8]) -> Option<(u32, &[u8])> {
    let h = datagram.get(..VXLAN_HEADER)?;
    if h[0] & FLAG_VNI == 0 {
        return None;
    }
    let vni = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) >> 8;
    Some((vni, &datagram[VXLAN_HEADER..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_strangers_are_refused() {
        let d = encap(5001, b"frame");
        assert_eq!(decap(&d), Some((5001, &b"frame"[..])));
        assert_eq!(decap(&d[..7]), None);
        let mut no_flag = d.clone();
        no_flag[0] = 0;
        assert_eq!(decap(&no_flag), None);

        let mut o = Overlay::default();
        let (seg, peer, stranger) = (
            SegmentId(3),
            Ipv4Addr::new(10, 99, 0, 2),
            Ipv4Addr::new(10, 99, 0, 9),
        );
        o.add(seg, 5001);
        o.set_remotes(seg, vec![peer]);
        let (s, p) = o.accept(5001, peer).unwrap();
        assert_eq!((s, o.remote_of(p)), (seg, Some(peer)));
        assert!(o.accept(5001, stranger).is_none());
        assert!(o.accept(5002, peer).is_none());
    }
}
