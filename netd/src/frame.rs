//! Frames as guests send them: Ethernet (with one optional 802.1Q tag), ARP,
//! IPv4 and IPv6 headers. Every length and field a guest controls is checked; a
//! frame that does not parse is an error the switch counts and drops.

use std::net::{Ipv4Addr, Ipv6Addr};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// ff:ff:ff:ff:ff:ff.
pub const BROADCAST: Mac = [0xff; 6];
/// Ethernet header without a VLAN tag.
pub const ETH_HEADER: usize = 14;
/// The longest frame a port accepts: a 64 KiB GSO payload plus headers.
pub const MAX_FRAME: usize = 65_550;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// Group (multicast or broadcast) addresses have the lowest bit of the first
/// byte set; they are never learned as a source.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than an Ethernet header.
    #[error("runt frame of {0} bytes")]
    Runt(usize),
    /// Longer than [`MAX_FRAME`].
    #[error("oversized frame of {0} bytes")]
    Oversized(usize),
    /// A header runs past the end of the frame.
    #[error("truncated {what}: {have} bytes where {need} are needed")]
    Truncated {
        /// Which header.
        what: &'static str,
        /// Bytes there.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), FrameError> {
    if buf.len() < n {
        return Err(FrameError::Truncated {
            what,
            have: buf.len(),
            need: n,
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// An Ethernet frame's header and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ethernet<'a> {
    /// Destination.
    pub dst: Mac,
    /// Source.
    pub src: Mac,
    /// VLAN id of an 802.1Q tag, if the frame carries one.
    pub vlan: Option<u16>,
    /// EtherType after any tag.
    pub ethertype: u16,
    /// What follows the header.
    pub payload: &'a [u8],
}

impl<'a> Ethernet<'a> {
    /// Parses `frame`.
    #[inline(always)]
    pub fn parse(frame: &'a [u8]) -> Result<Self, FrameError> {
        if frame.len() < ETH_HEADER {
            return Err(FrameError::Runt(frame.len()));
        }
        if frame.len() > MAX_FRAME {
            return Err(FrameError::Oversized(frame.len()));
        }
        let (dst, src) = (mac_at(frame, 0), mac_at(frame, 6));
        let mut ethertype = be16(frame, 12);
        let mut at = ETH_HEADER;
        let mut vlan = None;
        if ethertype == ETHERTYPE_VLAN {
            need("802.1Q tag", frame, ETH_HEADER + 4)?;
            vlan = Some(be16(frame, 14) & 0x0fff);
            ethertype = be16(frame, 16);
            at += 4;
        }
        Ok(Self {
            dst,
            src,
            vlan,
            ethertype,
            payload: &frame[at..],
        })
    }
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// ARP request.
pub const ARP_REQUEST: u16 = 1;
/// ARP reply.
pub const ARP_REPLY: u16 = 2;
const ARP_LEN: usize = 28;

impl Arp {
    /// Parses an ARP payload (after the Ethernet header).
    pub fn parse(b: &[u8]) -> Result<Self, FrameError> {
        need("ARP packet", b, ARP_LEN)?;
        if be16(b, 0) != 1 || be16(b, 2) != ETHERTYPE_IPV4 || b[4] != 6 || b[5] != 4 {
            return Err(FrameError::Malformed("ARP: not IPv4 over Ethernet"));
        }
        let op = be16(b, 6);
        if op != ARP_REQUEST && op != ARP_REPLY {
            return Err(FrameError::Malformed("ARP: unknown operation"));
        }
        Ok(Self {
            op,
            sha: mac_at(b, 8),
            spa: ipv4_at(b, 14),
            tha: mac_at(b, 18),
            tpa: ipv4_at(b, 24),
        })
    }

    /// The whole Ethernet frame carrying this packet from `self.sha`.
    pub fn to_frame(&self, dst: Mac) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_HEADER + ARP_LEN);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&self.sha);
        f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f.extend_from_slice(&1u16.to_be_bytes());
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[6, 4]);
        f.extend_from_slice(&self.op.to_be_bytes());
        f.extend_from_slice(&self.sha);
        f.extend_from_slice(&self.spa.octets());
        f.extend_from_slice(&self.tha);
        f.extend_from_slice(&self.tpa.octets());
        f
    }

    /// The reply `mac` (owner of the asked-for address) gives to this request.
    pub fn reply_from(&self, mac: Mac) -> Self {
        Self {
            op: ARP_REPLY,
            sha: mac,
            spa: self.tpa,
            tha: self.sha,
            tpa: self.spa,
        }
    }
}

/// An IPv4 header and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4<'a> {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Protocol number (1 ICMP, 6 TCP, 17 UDP).
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// Header length in bytes.
    pub header_len: usize,
    /// Whether this is a fragment other than a whole datagram.
    pub fragment: bool,
    /// Whether the fragment offset is 0 (a whole datagram, or the fragment
    /// carrying the transport header).
    pub first_fragment: bool,
    /// The payload up to the header's total length (link padding cut off).
    pub payload: &'a [u8],
}

impl<'a> Ipv4<'a> {
    /// Parses an IPv4 payload (after the Ethernet header); the checksum must
    /// hold.
    #[inline(always)]
    pub fn parse(b: &'a [u8]) -> Result<Self, FrameError> {
        need("IPv4 header", b, 20)?;
        if b[0] >> 4 != 4 {
            return Err(FrameError::Malformed("IPv4: version is not 4"));
        }
        let header_len = usize::from(b[0] & 0x0f) * 4;
        if header_len < 20 {
            return Err(FrameError::Malformed("IPv4: header length below 20"));
        }
        need("IPv4 header", b, header_len)?;
        let total = usize::from(be16(b, 2));
        if total < header_len {
            return Err(FrameError::Malformed("IPv4: total length below header"));
        }
        need("IPv4 datagram", b, total)?;
        if checksum(&b[..header_len]) != 0 {
            return Err(FrameError::Malformed("IPv4: header checksum"));
        }
        let frag = be16(b, 6);
        Ok(Self {
            src: ipv4_at(b, 12),
            dst: ipv4_at(b, 16),
            protocol: b[9],
            ttl: b[8],
            header_len,
            fragment: frag & 0x3fff != 0,
            first_fragment: frag & 0x1fff == 0,
            payload: &b[header_len..total],
        })
    }
}

/// An IPv6 packet: the fixed header, then the extension headers a switch
/// must look past (hop-by-hop, routing, destination options, fragment) to
/// the upper-layer protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6<'a> {
    /// Source.
    pub src: Ipv6Addr,
    /// Destination.
    pub dst: Ipv6Addr,
    /// The upper-layer protocol after the extension headers (6 TCP, 17
    /// UDP, 58 ICMPv6, 59 none).
    pub protocol: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Whether a fragment header is present.
    pub fragment: bool,
    /// Whether the fragment offset is 0 (or there is no fragment header):
    /// the upper-layer header is here.
    pub first_fragment: bool,
    /// The upper-layer part, up to the payload length (link padding cut
    /// off).
    pub payload: &'a [u8],
}

/// Extension headers followed before giving up (a chain longer than this
/// is refused rather than walked).
const MAX_EXTENSIONS: usize = 8;

impl<'a> Ipv6<'a> {
    /// Parses an IPv6 payload (after the Ethernet header).
    pub fn parse(b: &'a [u8]) -> Result<Self, FrameError> {
        need("IPv6 header", b, 40)?;
        if b[0] >> 4 != 6 {
            return Err(FrameError::Malformed("IPv6: version is not 6"));
        }
        let len = usize::from(be16(b, 4));
        need("IPv6 packet", b, 40 + len)?;
        let body = &b[40..40 + len];
        let (mut next, mut at) = (b[6], 0usize);
        let (mut fragment, mut first_fragment) = (false, true);
        for _ in 0..MAX_EXTENSIONS {
            match next {
                // Hop-by-hop, routing, destination options: length in
                // 8-byte units after the first 8.
                0 | 43 | 60 => {
                    need("IPv6 extension header", &body[at.min(body.len())..], 8)?;
                    let l = 8 + usize::from(body[at + 1]) * 8;
                    need("IPv6 extension header", &body[at..], l)?;
                    next = body[at];
                    at += l;
                }
                44 => {
                    need("IPv6 fragment header", &body[at.min(body.len())..], 8)?;
                    fragment = true;
                    first_fragment = be16(body, at + 2) & 0xfff8 == 0;
                    next = body[at];
                    at += 8;
                }
                _ => {
                    return Ok(Self {
                        src: ipv6_at(b, 8),
                        dst: ipv6_at(b, 24),
                        protocol: next,
                        hop_limit: b[7],
                        fragment,
                        first_fragment,
                        payload: &body[at..],
                    })
                }
            }
        }
        Err(FrameError::Malformed("IPv6: too many extension headers"))
    }
}

fn ipv6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// The Internet checksum (RFC 1071) of `bytes`: 0 over a header whose
/// checksum field is right.
#[inline]
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(ones_sum(0, bytes))
}

/// Folds a 32-bit one's-complement sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The folding above leaves at most 16 bits.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// `sum` plus the one's-complement sum (not inverted) of `bytes`, folded
/// so that further sums cannot overflow.
///
/// The sum is taken eight bytes at a time in the machine's byte order (a
/// one's-complement sum of 16-bit words is the same in either order, up
/// to swapping its two bytes).
pub fn ones_sum(sum: u32, bytes: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut carry: u64 = 0;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let (s, c) = acc.overflowing_add(u64::from_ne_bytes(b));
        acc = s;
        carry += u64::from(c);
    }
    let mut add = |w: u16| {
        let (s, c) = acc.overflowing_add(u64::from(w));
        acc = s;
        carry += u64::from(c);
    };
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        add(u16::from_ne_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        // The odd byte is the high byte of a big-endian word.
        add(u16::from_ne_bytes([*last, 0]));
    }
    // Carries out of bit 63 wrap around (one's complement); fold to 16.
    let mut folded = (acc & 0xffff_ffff) + (acc >> 32) + carry;
    while folded > 0xffff {
        folded = (folded & 0xffff) + (folded >> 16);
    }
    // In network order, then added to what came before.
    let native = u16::try_from(folded).unwrap_or(u16::MAX);
    u32::from(fold(sum + u32::from(u16::from_be(native))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sum word by word, as RFC 1071 states it.
    fn ones_sum_reference(mut sum: u32, bytes: &[u8]) -> u32 {
        for c in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    #[test]
    fn the_wide_sum_is_the_word_by_word_sum() {
        let mut x: u32 = 12345;
        for len in 0..200 {
            for fill in [0u8, 0xff, 1] {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        match fill {
                            0xff => 0xff,
                            0 => x.to_le_bytes()[2],
                            _ => u8::try_from(i % 251).unwrap(),
                        }
                    })
                    .collect();
                for start in [0u32, 0xffff, 0x1234] {
                    assert_eq!(
                        fold(ones_sum(start, &bytes)),
                        fold(ones_sum_reference(start, &bytes)),
                        "len {len} fill {fill} start {start}"
                    );
                }
            }
        }
    }

    const A: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 2];

    fn ipv4(total_extra: usize, bad_sum: bool) -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let total = u16::try_from(20 + 8 + total_extra).unwrap();
        h[2..4].copy_from_slice(&total.to_be_bytes());
        let s = checksum(&h);
        h[10..12].copy_from_slice(&s.to_be_bytes());
        if bad_sum {
            h[10] ^= 1;
        }
        h.extend_from_slice(&[0; 8]);
        h
    }

    #[test]
    fn runts_and_giants_are_refused() {
        assert_eq!(Ethernet::parse(&[0; 13]), Err(FrameError::Runt(13)));
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            Ethernet::parse(&big),
            Err(FrameError::Oversized(MAX_FRAME + 1))
        );
    }

    #[test]
    fn a_vlan_tag_is_read_and_a_cut_tag_refused() {
        let mut f = Vec::new();
        f.extend_from_slice(&B);
        f.extend_from_slice(&A);
        f.extend_from_slice(&[0x81, 0x00, 0x20, 0x0a, 0x08, 0x06, 9]);
        let e = Ethernet::parse(&f).unwrap();
        assert_eq!(
            (e.vlan, e.ethertype, e.payload, e.src, e.dst),
            (Some(10), ETHERTYPE_ARP, &[9u8][..], A, B)
        );
        assert!(matches!(
            Ethernet::parse(&f[..16]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn arp_round_trips_and_lies_are_refused() {
        let req = Arp {
            op: ARP_REQUEST,
            sha: A,
            spa: Ipv4Addr::new(10, 0, 0, 1),
            tha: [0; 6],
            tpa: Ipv4Addr::new(10, 0, 0, 2),
        };
        let frame = req.to_frame(BROADCAST);
        let e = Ethernet::parse(&frame).unwrap();
        assert_eq!(e.ethertype, ETHERTYPE_ARP);
        let got = Arp::parse(e.payload).unwrap();
        assert_eq!(got, req);
        let reply = got.reply_from(B);
        assert_eq!(
            (reply.op, reply.sha, reply.spa, reply.tha, reply.tpa),
            (ARP_REPLY, B, req.tpa, A, req.spa)
        );
        let mut bad = e.payload.to_vec();
        bad[4] = 8; // hardware address length
        assert_eq!(
            Arp::parse(&bad),
            Err(FrameError::Malformed("ARP: not IPv4 over Ethernet"))
        );
        assert!(matches!(
            Arp::parse(&e.payload[..27]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn ipv4_headers_are_checked() {
        let ok = ipv4(0, false);
        let p = Ipv4::parse(&ok).unwrap();
        assert_eq!((p.protocol, p.payload.len(), p.fragment), (17, 8, false));
        // Link padding after the datagram is not payload.
        let mut padded = ok.clone();
        padded.extend_from_slice(&[0; 18]);
        assert_eq!(Ipv4::parse(&padded).unwrap().payload.len(), 8);
        assert_eq!(
            Ipv4::parse(&ipv4(0, true)),
            Err(FrameError::Malformed("IPv4: header checksum"))
        );
        // A total length beyond the frame.
        let long = ipv4(100, false);
        assert!(matches!(
            Ipv4::parse(&long[..28]),
            Err(FrameError::Truncated { .. })
        ));
        let mut short_ihl = ok.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Ipv4::parse(&short_ihl),
            Err(FrameError::Malformed("IPv4: header length below 20"))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let buf: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            if let Ok(e) = Ethernet::parse(&buf) {
                let _ = Arp::parse(e.payload);
                let _ = Ipv4::parse(e.payload);
            }
            let _ = Ipv4::parse(&buf);
        }
    }

    /// An IPv6 header for `len` bytes of payload after it, `next` first.
    fn ipv6(next: u8, body: &[u8]) -> Vec<u8> {
        let mut b = vec![0x60, 0, 0, 0];
        b.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&[next, 64]);
        b.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn ipv6_headers_are_walked_to_the_upper_layer() {
        // Hop-by-hop (8 bytes), a first fragment, then UDP; link padding
        // after the payload length is cut off.
        let mut body = vec![44, 0, 1, 4, 0, 0, 0, 0];
        body.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 9]);
        body.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
        let mut b = ipv6(0, &body);
        b.extend_from_slice(&[0xee; 6]);
        let ip = Ipv6::parse(&b).unwrap();
        assert_eq!(
            (ip.protocol, ip.fragment, ip.first_fragment),
            (17, true, true)
        );
        assert_eq!(ip.payload.len(), 8);
        assert_eq!(ip.dst, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        // A later fragment carries no upper-layer header.
        let mut later = body.clone();
        later[10..12].copy_from_slice(&[0x05, 0x00]);
        let l = ipv6(0, &later);
        assert!(!Ipv6::parse(&l).unwrap().first_fragment);
        // A payload length past the end, an extension header past the end,
        // a chain of extension headers without end, another version.
        let mut short = ipv6(17, &[0; 8]);
        short.truncate(44);
        assert!(matches!(
            Ipv6::parse(&short),
            Err(FrameError::Truncated { .. })
        ));
        let ext = ipv6(60, &[17, 4, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Ipv6::parse(&ext),
            Err(FrameError::Truncated { .. })
        ));
        let endless = ipv6(60, &[60, 0, 0, 0, 0, 0, 0, 0].repeat(9));
        assert!(matches!(
            Ipv6::parse(&endless),
            Err(FrameError::Malformed(_))
        ));
        let mut v4 = ipv6(17, &[0; 8]);
        v4[0] = 0x45;
        assert!(matches!(Ipv6::parse(&v4), Err(FrameError::Malformed(_))));
    }
}
