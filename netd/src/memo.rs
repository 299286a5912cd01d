//! Keys of the switch's per-burst decision memo: what a frame must share
//! with an earlier one of the same burst to go where that one went without
//! being parsed again.

use crate::flow::{PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN};
use crate::frame::{checksum, ETHERTYPE_IPV4, ETH_HEADER};

/// A frame's destination and source addresses (its first 12 bytes) as two
/// words, compared without parsing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addrs(u64, u32);

impl Addrs {
    /// The addresses of `frame`; None for a frame shorter than an Ethernet
    /// header.
    #[inline]
    pub(crate) fn of(frame: &[u8]) -> Option<Self> {
        let b = frame.get(..ETH_HEADER)?;
        let (lo, hi) = b.split_at(8);
        Some(Self(
            u64::from_ne_bytes(lo.try_into().ok()?),
            u32::from_ne_bytes(hi.get(..4)?.try_into().ok()?),
        ))
    }
}

/// Where an untagged IPv4 header without options starts, and its length.
const IP: usize = ETH_HEADER;
const IP_HEADER: usize = 20;

/// The connection of an untagged TCP or UDP frame in IPv4 without options
/// or fragmentation, as the bytes that name it: protocol, addresses and
/// ports. A frame matches a key when it carries a well-formed header for
/// the same connection (what the switch's parsers would accept, giving the
/// same flow) and, for TCP, no SYN, FIN or RST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowKey {
    proto: u8,
    ends: (u64, u32),
}

impl FlowKey {
    /// The key of `frame`, if it is such a frame and well formed.
    pub(crate) fn of(frame: &[u8]) -> Option<Self> {
        Self::key(frame, frame.len())
    }

    /// The key of a frame of `len` bytes starting with `frame`.
    #[inline]
    fn key(frame: &[u8], len: usize) -> Option<Self> {
        let proto = Self::check(frame, len)?;
        let ends = frame.get(IP + 12..IP + 24)?;
        let (lo, hi) = ends.split_at(8);
        Some(Self {
            proto,
            ends: (
                u64::from_ne_bytes(lo.try_into().ok()?),
                u32::from_ne_bytes(hi.try_into().ok()?),
            ),
        })
    }

    /// Whether `frame` is well formed and of this key's connection, with
    /// no connection-state flags.
    #[inline]
    #[cfg(test)]
    pub(crate) fn matches(&self, frame: &[u8]) -> bool {
        self.matches_start(frame, frame.len())
    }

    /// [`FlowKey::matches`] for a frame of `len` bytes of which `start`
    /// holds the first (at least its headers, else no match).
    #[inline]
    pub(crate) fn matches_start(&self, start: &[u8], len: usize) -> bool {
        Self::key(start, len).is_some_and(|k| k == *self)
    }

    /// The protocol of a well-formed frame of the kind keys are taken
    /// from; None otherwise (or for TCP with SYN, FIN or RST).
    #[inline]
    fn check(frame: &[u8], len: usize) -> Option<u8> {
        let eth = frame.get(12..14)?;
        if u16::from_be_bytes([eth[0], eth[1]]) != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = frame.get(IP..IP + IP_HEADER)?;
        // Version 4, a 20-byte header, no fragment offset or more-fragments.
        if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let proto = ip[9];
        let need = match proto {
            PROTO_TCP => 20,
            PROTO_UDP => 8,
            _ => return None,
        };
        if total < IP_HEADER + need || checksum(ip) != 0 {
            return None;
        }
        if IP + total > len {
            return None;
        }
        let l4 = frame.get(IP + IP_HEADER..(IP + total).min(frame.len()))?;
        if proto == PROTO_TCP && l4.get(13)? & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            return None;
        }
        Some(proto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Packet;
    use crate::frame::{Ethernet, Ipv4};

    /// An untagged IPv4 frame: protocol, transport header, TCP flags.
    fn frame(proto: u8, l4_len: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        let total = u16::try_from(20 + l4_len).unwrap();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let s = checksum(&ip);
        ip[10..12].copy_from_slice(&s.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut l4 = vec![0u8; l4_len];
        l4[..4].copy_from_slice(&[0x30, 0x39, 0, 80]);
        if let (PROTO_TCP, Some(f)) = (proto, l4.get_mut(13)) {
            *f = flags;
        }
        f.extend_from_slice(&l4);
        f
    }

    fn parsed_flow(f: &[u8]) -> Option<crate::flow::Flow> {
        let eth = Ethernet::parse(f).ok()?;
        let ip = Ipv4::parse(eth.payload).ok()?;
        Some(Packet::of(&ip).ok()?.flow)
    }

    #[test]
    fn a_key_matches_only_well_formed_frames_of_its_connection() {
        let ack = frame(PROTO_TCP, 20, 0x10);
        let key = FlowKey::of(&ack).unwrap();
        assert!(key.matches(&ack));
        assert!(parsed_flow(&ack).is_some());
        // Link padding after the datagram does not matter.
        let mut padded = ack.clone();
        padded.extend_from_slice(&[0; 6]);
        assert!(key.matches(&padded));
        // Another port, a SYN, a FIN, an RST.
        let mut other = ack.clone();
        other[IP + 20 + 3] = 81;
        let s = checksum(&other[IP..IP + 20]);
        assert_eq!(s, 0);
        assert!(!key.matches(&other));
        for flags in [TCP_SYN, TCP_FIN, TCP_RST] {
            assert!(!key.matches(&frame(PROTO_TCP, 20, 0x10 | flags)));
        }
        // A bad checksum, a truncated datagram, options, a fragment, UDP.
        let mut bad = ack.clone();
        bad[IP + 10] ^= 1;
        assert!(!key.matches(&bad) && parsed_flow(&bad).is_none());
        assert!(!key.matches(&ack[..ack.len() - 1]));
        let mut opts = ack.clone();
        opts[IP] = 0x46;
        assert!(!key.matches(&opts));
        let mut frag = ack.clone();
        frag[IP + 6] = 0x20;
        frag[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
        let s = checksum(&frag[IP..IP + 20]);
        frag[IP + 10..IP + 12].copy_from_slice(&s.to_be_bytes());
        assert!(!key.matches(&frag));
        assert!(!key.matches(&frame(PROTO_UDP, 8, 0)));
        // A TCP header cut short is no key; ICMP has none.
        assert!(FlowKey::of(&frame(PROTO_TCP, 12, 0)).is_none());
        assert!(FlowKey::of(&frame(1, 8, 0)).is_none());
        assert!(FlowKey::of(&frame(PROTO_UDP, 8, 0)).is_some());
    }
}
