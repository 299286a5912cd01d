//! The virtio-net header and the offloads it carries: a checksum the sender
//! left to the device (NEEDS_CSUM), TCP segmentation (GSO TCPv4 and
//! TCPv6) and UDP segmentation (GSO UDP_L4, both families).
//!
//! A frame keeps its header through the switch as long as it goes to ports
//! whose drivers accept the offload; for anything else (a driver without the
//! feature, the uplink, the tunnel, the switch's own services) it is
//! finished here: the checksum is computed and a large TCP segment is cut
//! into MSS-sized frames, each with its own sequence number, lengths,
//! checksums and (IPv4) id.

use crate::frame::{
    checksum, fold, ones_sum, Ethernet, FrameError, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
};

/// Size of the header with VIRTIO_F_VERSION_1 (or MRG_RXBUF).
pub const NET_HDR: usize = 12;

/// VIRTIO_NET_F_CSUM: the device accepts frames with a partial checksum.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver accepts frames with a partial checksum.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_GUEST_TSO4: the driver accepts TCPv4 segmentation offload.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6: the driver accepts TCPv6 segmentation offload.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_HOST_TSO4: the device accepts TCPv4 segmentation offload.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6: the device accepts TCPv6 segmentation offload.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// VIRTIO_NET_F_GUEST_USO4: the driver accepts UDP segmentation over IPv4.
pub const F_GUEST_USO4: u64 = 1 << 54;
/// VIRTIO_NET_F_GUEST_USO6: the driver accepts UDP segmentation over IPv6.
pub const F_GUEST_USO6: u64 = 1 << 55;
/// VIRTIO_NET_F_HOST_USO: the device accepts UDP segmentation offload.
pub const F_HOST_USO: u64 = 1 << 56;
/// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// VIRTIO_NET_HDR_F_NEEDS_CSUM.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// VIRTIO_NET_HDR_GSO_NONE.
pub const GSO_NONE: u8 = 0;
/// VIRTIO_NET_HDR_GSO_TCPV4.
pub const GSO_TCPV4: u8 = 1;
/// VIRTIO_NET_HDR_GSO_TCPV6.
pub const GSO_TCPV6: u8 = 4;
/// VIRTIO_NET_HDR_GSO_UDP_L4: UDP datagrams of `gso_size` bytes each.
pub const GSO_UDP_L4: u8 = 5;
/// VIRTIO_NET_HDR_GSO_ECN, or-ed into the GSO type.
pub const GSO_ECN: u8 = 0x80;
/// The smallest segment size accepted: below it, one frame would turn into
/// thousands.
pub const MIN_GSO_SIZE: u16 = 64;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr_v1`, in host order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// NEEDS_CSUM (or DATA_VALID on receive).
    pub flags: u8,
    /// GSO type, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers before the payload to segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed range starts.
    pub csum_start: u16,
    /// Where in that range the checksum goes.
    pub csum_offset: u16,
    /// Buffers the frame spans (receive side, MRG_RXBUF).
    pub num_buffers: u16,
}

impl NetHdr {
    /// A frame with nothing left to do.
    pub const PLAIN: Self = Self {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// Reads the header from its 12 little-endian bytes.
    pub fn parse(b: &[u8; NET_HDR]) -> Self {
        let le = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// The header's 12 bytes.
    pub fn to_bytes(&self) -> [u8; NET_HDR] {
        let mut b = [0u8; NET_HDR];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Whether the checksum is left to do.
    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }

    /// Whether the frame is a large TCP segment to cut.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// Whether anything is left to do.
    pub fn offloaded(&self) -> bool {
        self.needs_csum() || self.is_gso()
    }

    /// The driver features a receiver needs to take the frame as it is.
    pub fn needs_features(&self) -> u64 {
        let mut f = 0;
        if self.needs_csum() {
            f |= F_GUEST_CSUM;
        }
        match self.gso_type & !GSO_ECN {
            GSO_TCPV4 => f |= F_GUEST_TSO4 | F_GUEST_CSUM,
            GSO_TCPV6 => f |= F_GUEST_TSO6 | F_GUEST_CSUM,
            // Either family: the header does not say which.
            GSO_UDP_L4 => f |= F_GUEST_USO4 | F_GUEST_USO6 | F_GUEST_CSUM,
            _ => {}
        }
        f
    }

    /// Checks a header a guest sent with a frame of `len` bytes, against
    /// the `features` its driver acked: offloads it did not negotiate, GSO
    /// types other than TCPv4, TCPv6 and UDP_L4, GSO without NEEDS_CSUM and
    /// a checksum position outside the frame are refused.
    pub fn validate(&self, features: u64, len: usize) -> Result<(), FrameError> {
        if self.needs_csum() {
            if features & F_CSUM == 0 {
                return Err(FrameError::Malformed("virtio-net: CSUM not negotiated"));
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > len {
                return Err(FrameError::Malformed(
                    "virtio-net: checksum position outside the frame",
                ));
            }
        }
        if self.is_gso() {
            match self.gso_type & !GSO_ECN {
                GSO_TCPV4 if features & F_HOST_TSO4 == 0 => {
                    return Err(FrameError::Malformed("virtio-net: TSO4 not negotiated"));
                }
                GSO_TCPV6 if features & F_HOST_TSO6 == 0 => {
                    return Err(FrameError::Malformed("virtio-net: TSO6 not negotiated"));
                }
                GSO_UDP_L4 if features & F_HOST_USO == 0 => {
                    return Err(FrameError::Malformed("virtio-net: USO not negotiated"));
                }
                GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => {}
                _ => return Err(FrameError::Malformed("virtio-net: GSO type not offered")),
            }
            if !self.needs_csum() {
                return Err(FrameError::Malformed("virtio-net: GSO without NEEDS_CSUM"));
            }
            if self.gso_size < MIN_GSO_SIZE {
                return Err(FrameError::Malformed("virtio-net: GSO size too small"));
            }
        }
        Ok(())
    }
}

/// Completes a partial checksum in place: the sum over the frame from
/// `csum_start` (with the pseudo-header sum the sender left in the field)
/// goes into the field at `csum_start + csum_offset`.
pub fn complete_checksum(frame: &mut [u8], hdr: &NetHdr) -> Result<(), FrameError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return Err(FrameError::Malformed(
            "virtio-net: checksum position outside the frame",
        ));
    }
    let sum = !fold(ones_sum(0, &frame[start..]));
    // UDP sends a computed 0 as all ones; TCP's 0 and 0xffff are the same.
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Where the headers of a TCP or UDP frame sit.
struct TcpLayout {
    /// Start of the IP header.
    ip: usize,
    /// Start of the TCP (or UDP) header.
    tcp: usize,
    /// Start of the payload.
    payload: usize,
    /// IPv6 (else IPv4).
    v6: bool,
}

fn tcp_layout(frame: &[u8]) -> Result<TcpLayout, FrameError> {
    l4_layout(frame, PROTO_TCP)
}

/// Where the headers of a frame of transport `proto` (TCP or UDP) sit.
fn l4_layout(frame: &[u8], proto: u8) -> Result<TcpLayout, FrameError> {
    let eth = Ethernet::parse(frame)?;
    let ip = frame.len() - eth.payload.len();
    let b = eth.payload;
    let (ihl, v6) = match eth.ethertype {
        ETHERTYPE_IPV4 => {
            if b.len() < 20 || b[0] >> 4 != 4 {
                return Err(FrameError::Malformed("GSO: bad IPv4 header"));
            }
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if ihl < 20 || b.len() < ihl + 8 || b[9] != proto {
                return Err(FrameError::Malformed("GSO: not the protocol of its type"));
            }
            (ihl, false)
        }
        // TCP right after the fixed header: drivers put no extension
        // headers in the segments they leave to the device.
        ETHERTYPE_IPV6 => {
            if b.len() < 48 || b[0] >> 4 != 6 || b[6] != proto {
                return Err(FrameError::Malformed(
                    "GSO: not the protocol of its type in IPv6",
                ));
            }
            (40, true)
        }
        _ => return Err(FrameError::Malformed("GSO: neither IPv4 nor IPv6")),
    };
    let tcp = ip + ihl;
    let doff = if proto == PROTO_UDP {
        8
    } else {
        let doff = frame.get(tcp + 12).map_or(0, |b| usize::from(b >> 4) * 4);
        if doff < 20 || frame.len() < tcp + doff {
            return Err(FrameError::Malformed("GSO: bad TCP header"));
        }
        doff
    };
    Ok(TcpLayout {
        ip,
        tcp,
        payload: tcp + doff,
        v6,
    })
}

/// The pseudo-header sum of a TCP or UDP segment of `l4_len` bytes after
/// the IPv4 or IPv6 header `ip_header`.
fn pseudo_sum(ip_header: &[u8], proto: u8, l4_len: usize) -> u32 {
    let addrs = if ip_header[0] >> 4 == 6 {
        &ip_header[8..40]
    } else {
        &ip_header[12..20]
    };
    let mut sum = ones_sum(0, addrs);
    sum += u32::from(proto);
    sum += u32::try_from(l4_len).unwrap_or(0);
    u32::from(fold(sum))
}

/// Hands `out` the frames `frame` with `hdr` stands for, each finished: a
/// large TCP segment cut into `gso_size` pieces, every checksum computed.
/// A frame with nothing to do is handed on as it is.
pub fn finish(frame: &[u8], hdr: &NetHdr, mut out: impl FnMut(&[u8])) -> Result<(), FrameError> {
    if !hdr.is_gso() {
        if !hdr.needs_csum() {
            out(frame);
            return Ok(());
        }
        let mut f = frame.to_vec();
        complete_checksum(&mut f, hdr)?;
        out(&f);
        return Ok(());
    }
    if hdr.gso_type & !GSO_ECN == GSO_UDP_L4 {
        return finish_udp(frame, hdr, out);
    }
    let l = tcp_layout(frame)?;
    let mss = usize::from(hdr.gso_size.max(MIN_GSO_SIZE));
    let payload = &frame[l.payload..];
    let headers = &frame[..l.payload];
    let ip_id = u16::from_be_bytes([frame[l.ip + 4], frame[l.ip + 5]]);
    let seq = u32::from_be_bytes([
        frame[l.tcp + 4],
        frame[l.tcp + 5],
        frame[l.tcp + 6],
        frame[l.tcp + 7],
    ]);
    let flags = frame[l.tcp + 13];
    let count = payload.len().div_ceil(mss).max(1);
    let mut seg = Vec::with_capacity(headers.len() + mss);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        seg.clear();
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        let tcp_len = seg.len() - l.tcp;
        let off = u32::try_from(i * mss).unwrap_or(0);
        fix_ip(&mut seg, &l, u16::try_from(i).unwrap_or(u16::MAX), ip_id)?;
        // TCP: sequence, flags (FIN and PSH on the last only, CWR on the
        // first only), checksum.
        seg[l.tcp + 4..l.tcp + 8].copy_from_slice(&seq.wrapping_add(off).to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        seg[l.tcp + 13] = f;
        seg[l.tcp + 16..l.tcp + 18].fill(0);
        let sum = ones_sum(
            pseudo_sum(&seg[l.ip..l.tcp], PROTO_TCP, tcp_len),
            &seg[l.tcp..],
        );
        seg[l.tcp + 16..l.tcp + 18].copy_from_slice(&(!fold(sum)).to_be_bytes());
        out(&seg);
    }
    Ok(())
}

/// Sets the IP header's lengths (and for IPv4 its id and checksum) for a
/// segment `seg` cut from a larger one: segment `n`, the first's id `id`.
fn fix_ip(seg: &mut [u8], l: &TcpLayout, n: u16, id: u16) -> Result<(), FrameError> {
    let ip_len = seg.len() - l.ip;
    let too_long = |_| FrameError::Malformed("GSO: segment too long");
    if l.v6 {
        let len = u16::try_from(ip_len - 40).map_err(too_long)?;
        seg[l.ip + 4..l.ip + 6].copy_from_slice(&len.to_be_bytes());
    } else {
        let ip_total = u16::try_from(ip_len).map_err(too_long)?;
        seg[l.ip + 2..l.ip + 4].copy_from_slice(&ip_total.to_be_bytes());
        seg[l.ip + 4..l.ip + 6].copy_from_slice(&id.wrapping_add(n).to_be_bytes());
        seg[l.ip + 10..l.ip + 12].fill(0);
        let ip_sum = checksum(&seg[l.ip..l.tcp]);
        seg[l.ip + 10..l.ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
    }
    Ok(())
}

/// [`finish`] for a UDP segmentation frame: datagrams of `gso_size`
/// payload bytes, each with its own length and checksum.
fn finish_udp(frame: &[u8], hdr: &NetHdr, mut out: impl FnMut(&[u8])) -> Result<(), FrameError> {
    let l = l4_layout(frame, PROTO_UDP)?;
    let size = usize::from(hdr.gso_size.max(MIN_GSO_SIZE));
    let payload = &frame[l.payload..];
    let headers = &frame[..l.payload];
    let ip_id = u16::from_be_bytes([frame[l.ip + 4], frame[l.ip + 5]]);
    let mut seg = Vec::with_capacity(headers.len() + size);
    for (i, chunk) in payload
        .chunks(size)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        seg.clear();
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        fix_ip(&mut seg, &l, u16::try_from(i).unwrap_or(u16::MAX), ip_id)?;
        let udp_len = seg.len() - l.tcp;
        let len =
            u16::try_from(udp_len).map_err(|_| FrameError::Malformed("GSO: segment too long"))?;
        seg[l.tcp + 4..l.tcp + 6].copy_from_slice(&len.to_be_bytes());
        seg[l.tcp + 6..l.tcp + 8].fill(0);
        let sum = !fold(ones_sum(
            pseudo_sum(&seg[l.ip..l.tcp], PROTO_UDP, udp_len),
            &seg[l.tcp..],
        ));
        // A computed 0 goes as all ones (0 means no checksum).
        let sum = if sum == 0 { 0xffff } else { sum };
        seg[l.tcp + 6..l.tcp + 8].copy_from_slice(&sum.to_be_bytes());
        out(&seg);
    }
    Ok(())
}

/// Whether the TCP or UDP checksum of an IPv4 or IPv6 frame (no
/// extension headers) holds (tests and diagnostics).
pub fn transport_checksum_ok(frame: &[u8]) -> bool {
    let Ok(eth) = Ethernet::parse(frame) else {
        return false;
    };
    let b = eth.payload;
    let (ihl, total, proto) = match eth.ethertype {
        ETHERTYPE_IPV4 if b.len() >= 20 => (
            usize::from(b[0] & 0x0f) * 4,
            usize::from(u16::from_be_bytes([b[2], b[3]])),
            b[9],
        ),
        ETHERTYPE_IPV6 if b.len() >= 40 => {
            (40, 40 + usize::from(u16::from_be_bytes([b[4], b[5]])), b[6])
        }
        _ => return false,
    };
    let (Some(ip), Some(l4)) = (b.get(..ihl), b.get(ihl..total)) else {
        return false;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return false;
    }
    fold(ones_sum(pseudo_sum(ip, proto, l4.len()), l4)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP frame of `payload` bytes with the pseudo-header sum in its
    /// checksum field, as a driver using CSUM leaves it.
    fn partial_tcp(payload: usize, flags: u8) -> (Vec<u8>, NetHdr) {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = u16::try_from(40 + payload).unwrap();
        let ip = [
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        f[14..34].copy_from_slice(&ip);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let s = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&s.to_be_bytes());
        f[34..36].copy_from_slice(&1234u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[38..42].copy_from_slice(&1000u32.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = flags;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap();
        }
        let pseudo = fold(pseudo_sum(&f[14..34], PROTO_TCP, 20 + payload));
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..NetHdr::PLAIN
        };
        (f, hdr)
    }

    #[test]
    fn header_round_trips() {
        let h = NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::parse(&h.to_bytes()), h);
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let (f, hdr) = partial_tcp(301, 0x18);
        assert!(!transport_checksum_ok(&f));
        let mut got = Vec::new();
        finish(&f, &hdr, |s| got.push(s.to_vec())).unwrap();
        assert_eq!(got.len(), 1);
        assert!(transport_checksum_ok(&got[0]));
        assert_eq!(got[0][54..], f[54..]);
    }

    #[test]
    fn a_large_segment_is_cut_at_the_mss() {
        let (f, mut hdr) = partial_tcp(4000, 0x19); // FIN|PSH|ACK
        hdr.gso_type = GSO_TCPV4;
        hdr.gso_size = 1448;
        hdr.hdr_len = 54;
        let mut segs = Vec::new();
        finish(&f, &hdr, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), 3);
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(transport_checksum_ok(s), "segment {i}");
            assert_eq!(checksum(&s[14..34]), 0, "IP checksum of segment {i}");
            let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
            assert_eq!(seq, 1000 + 1448 * u32::try_from(i).unwrap());
            let id = u16::from_be_bytes([s[18], s[19]]);
            assert_eq!(id, 0x1234 + u16::try_from(i).unwrap());
            let last = i == 2;
            assert_eq!(s[47] & (TCP_FIN | TCP_PSH) != 0, last);
            data.extend_from_slice(&s[54..]);
        }
        assert_eq!(segs[0].len(), 54 + 1448);
        assert_eq!(segs[2].len(), 54 + 4000 - 2 * 1448);
        assert_eq!(data, f[54..]);
    }

    #[test]
    fn headers_a_guest_may_not_send_are_refused() {
        let csum = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..NetHdr::PLAIN
        };
        assert!(csum.validate(0, 100).is_err(), "CSUM not negotiated");
        assert!(csum.validate(F_CSUM, 100).is_ok());
        assert!(csum.validate(F_CSUM, 51).is_err(), "field past the end");
        let gso = NetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..csum
        };
        assert!(gso.validate(F_CSUM, 100).is_err(), "TSO not negotiated");
        assert!(gso.validate(F_CSUM | F_HOST_TSO4, 100).is_ok());
        let udp = NetHdr { gso_type: 3, ..gso };
        assert!(udp.validate(F_CSUM | F_HOST_TSO4, 100).is_err());
        let v6 = NetHdr {
            gso_type: GSO_TCPV6,
            ..gso
        };
        assert!(
            v6.validate(F_CSUM | F_HOST_TSO4, 100).is_err(),
            "TSO6 not negotiated"
        );
        assert!(v6.validate(F_CSUM | F_HOST_TSO6, 100).is_ok());
        assert_eq!(v6.needs_features(), F_GUEST_TSO6 | F_GUEST_CSUM);
        let uso = NetHdr {
            gso_type: GSO_UDP_L4,
            ..gso
        };
        assert!(
            uso.validate(F_CSUM | F_HOST_TSO4, 100).is_err(),
            "USO not negotiated"
        );
        assert!(uso.validate(F_CSUM | F_HOST_USO, 100).is_ok());
        let tiny = NetHdr { gso_size: 1, ..gso };
        assert!(tiny.validate(F_CSUM | F_HOST_TSO4, 100).is_err());
        let no_csum = NetHdr { flags: 0, ..gso };
        assert!(no_csum.validate(F_CSUM | F_HOST_TSO4, 100).is_err());
    }

    #[test]
    fn malformed_gso_frames_are_errors_not_panics() {
        let (f, mut hdr) = partial_tcp(3000, 0x10);
        hdr.gso_type = GSO_TCPV4;
        hdr.gso_size = 1000;
        for cut in [0, 13, 20, 40, 53] {
            let _ = finish(&f[..cut], &hdr, |_| {});
        }
        let mut bad = f.clone();
        bad[46] = 0xf0; // data offset 60 bytes, header past a short frame
        let _ = finish(&bad[..80], &hdr, |_| {});
        hdr.csum_start = 60000;
        assert!(finish(&f[..100], &NetHdr { gso_type: 0, ..hdr }, |_| {}).is_err());
    }
}
