//! Checksum and segmentation offloads through real vhost-user-net
//! frontends: a driver that negotiated CSUM and HOST_TSO4 sends one large TCP
//! segment with a partial checksum, as Linux does; a port whose driver took
//! GUEST_TSO4 and MRG_RXBUF gets it whole across several buffers, a port
//! without offloads gets MSS-sized frames with every checksum right.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use atoll_tests::net_frontend::{NetFrontend, F_MRG_RXBUF};
use netd::frame::{checksum, Mac, BROADCAST, ETHERTYPE_IPV4};
use netd::l2::SegmentId;
use netd::offload::{
    transport_checksum_ok, NetHdr, FLAG_NEEDS_CSUM, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4,
    F_GUEST_TSO6, F_GUEST_USO4, F_GUEST_USO6, F_HOST_TSO4, F_HOST_TSO6, F_HOST_USO, GSO_TCPV4,
    GSO_TCPV6, GSO_UDP_L4,
};
use netd::switch::Switch;

const S: Mac = [0x52, 0x54, 0, 0x0f, 0, 1];
const T: Mac = [0x52, 0x54, 0, 0x0f, 0, 2];
const P: Mac = [0x52, 0x54, 0, 0x0f, 0, 3];
const G: Mac = [0x52, 0x54, 0, 0x0f, 0, 4];
const WAIT: Duration = Duration::from_secs(10);
const MSS: u16 = 1448;

/// A TCP segment from S to `dst` with `payload` bytes and the pseudo-header
/// sum in its checksum field, and the header that leaves the rest to the
/// device.
fn tcp(dst: Mac, payload: usize, gso: bool) -> (Vec<u8>, NetHdr) {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&S);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = u16::try_from(40 + payload).unwrap();
    let mut ip = [
        0x45, 0, 0, 0, 0x40, 0, 0x40, 0, 64, 6, 0, 0, 10, 9, 0, 1, 10, 9, 0, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let s = checksum(&ip);
    ip[10..12].copy_from_slice(&s.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&7u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH|ACK
                    // The pseudo header, summed but not inverted.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&u16::try_from(20 + payload).unwrap().to_be_bytes());
    tcp[16..18].copy_from_slice(&(!checksum(&pseudo)).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| u8::try_from(i % 253).unwrap()));
    let mut hdr = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..NetHdr::PLAIN
    };
    if gso {
        hdr.gso_type = GSO_TCPV4;
        hdr.gso_size = MSS;
        hdr.hdr_len = 54;
    }
    (f, hdr)
}

/// [`tcp`] over IPv6 (fd00::1 to fd00::2).
fn tcp6(dst: Mac, payload: usize, gso: bool) -> (Vec<u8>, NetHdr) {
    let (v4, mut hdr) = tcp(dst, payload, gso);
    let mut f = v4[..12].to_vec();
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(20 + payload).unwrap().to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    let (src, dst6) = (
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    );
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst6);
    f.extend_from_slice(&ip);
    let mut tcp = v4[34..54].to_vec();
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst6);
    pseudo.extend_from_slice(&u32::try_from(20 + payload).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 6]);
    tcp[16..18].copy_from_slice(&(!checksum(&pseudo)).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(&v4[54..]);
    hdr.csum_start = 54;
    if gso {
        hdr.gso_type = GSO_TCPV6;
        hdr.hdr_len = 74;
    }
    (f, hdr)
}

fn hello(from: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&from);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend_from_slice(b"here");
    f
}

/// Every frame that arrives within a short quiet time.
fn drain(f: &mut NetFrontend) -> Vec<([u8; 12], Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(x) = f.recv_with_header(Duration::from_millis(300)).unwrap() {
        got.push(x);
    }
    got
}

#[test]
fn offloads_pass_to_drivers_that_take_them_and_are_finished_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let ports: Vec<_> = [S, T, P, G]
        .iter()
        .map(|m| sw.add_port(SegmentId(1), *m).unwrap())
        .collect();
    let mut s = NetFrontend::connect_with(&ports[0].socket, F_CSUM | F_HOST_TSO4).unwrap();
    let mut t =
        NetFrontend::connect_with(&ports[1].socket, F_GUEST_CSUM | F_GUEST_TSO4 | F_MRG_RXBUF)
            .unwrap();
    let mut p = NetFrontend::connect(&ports[2].socket).unwrap();
    let mut g = NetFrontend::connect_with(&ports[3].socket, F_GUEST_CSUM).unwrap();
    assert_eq!(s.features() & (F_CSUM | F_HOST_TSO4), F_CSUM | F_HOST_TSO4);
    let want_t = F_GUEST_CSUM | F_GUEST_TSO4 | F_MRG_RXBUF;
    assert_eq!(t.features() & want_t, want_t, "the port offers them");
    // Everyone announces itself, so the switch knows where each MAC is.
    for (f, m) in [(&mut t, T), (&mut p, P), (&mut g, G)] {
        f.send(&hello(m)).unwrap();
    }
    drain(&mut s);
    drain(&mut t);
    drain(&mut p);
    drain(&mut g);

    // 20000 bytes in one segment to T: it arrives whole, header and all,
    // spread over the 2 KiB buffers the driver posted.
    let (big, hdr) = tcp(T, 20_000, true);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let (h, frame) = t.recv_with_header(WAIT).unwrap().unwrap();
    let h = NetHdr::parse(&h);
    assert_eq!(frame, big);
    assert_eq!(
        (h.gso_type, h.gso_size, h.flags),
        (GSO_TCPV4, MSS, FLAG_NEEDS_CSUM)
    );
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert!(h.num_buffers >= 10, "spans {} buffers", h.num_buffers);

    // Two of 60000 bytes back to back: the second needs more buffers than
    // are left, waits for the driver to post them again, and arrives whole.
    let (huge, hdr) = tcp(T, 60_000, true);
    s.send_with_header(hdr.to_bytes(), &huge).unwrap();
    s.send_with_header(hdr.to_bytes(), &huge).unwrap();
    for n in 0..2 {
        let (h, frame) = t.recv_with_header(WAIT).unwrap().unwrap();
        assert_eq!(frame, huge, "frame {n}");
        assert!(NetHdr::parse(&h).num_buffers >= 30);
    }

    // The same to P, whose driver has no offloads: 14 frames of at most
    // the MSS, checksums right, the payload in order.
    let (big, hdr) = tcp(P, 20_000, true);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let segs = drain(&mut p);
    assert_eq!(segs.len(), 20_000usize.div_ceil(usize::from(MSS)));
    let mut data = Vec::new();
    for (i, (h, f)) in segs.iter().enumerate() {
        assert_eq!(
            *h,
            NetHdr {
                num_buffers: 1,
                ..NetHdr::PLAIN
            }
            .to_bytes()
        );
        assert!(f.len() <= 54 + usize::from(MSS));
        assert!(transport_checksum_ok(f), "segment {i}");
        assert_eq!(checksum(&f[14..34]), 0, "IP header of segment {i}");
        data.extend_from_slice(&f[54..]);
    }
    assert_eq!(data, big[54..]);
    // Two hellos, then the segments.
    assert_eq!(ports[2].stats.rx_frames.load(Ordering::Relaxed), 2 + 14);

    // A small frame with a partial checksum: G takes it as it is, P gets
    // it completed.
    let (small, hdr) = tcp(G, 300, false);
    s.send_with_header(hdr.to_bytes(), &small).unwrap();
    let (h, f) = g.recv_with_header(WAIT).unwrap().unwrap();
    assert_eq!(NetHdr::parse(&h).flags, FLAG_NEEDS_CSUM);
    assert_eq!(f, small);
    let (small, hdr) = tcp(P, 300, false);
    s.send_with_header(hdr.to_bytes(), &small).unwrap();
    let f = p.recv(WAIT).unwrap().unwrap();
    assert!(transport_checksum_ok(&f));
    assert_eq!(f[..50], small[..50]);
    assert_eq!(f[52..], small[52..]);

    // Flooded (unknown or group destination): finished for every port,
    // even one that could take it whole.
    let (mut big, hdr) = tcp(T, 3000, true);
    big[..6].copy_from_slice(&BROADCAST);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    for (name, f) in [("T", &mut t), ("P", &mut p), ("G", &mut g)] {
        let got = drain(f);
        assert_eq!(got.len(), 3, "{name}");
        assert!(got
            .iter()
            .all(|(h, f)| h[1] == 0 && transport_checksum_ok(f)));
    }
}

#[test]
fn offloads_a_driver_did_not_negotiate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let ps = sw.add_port(SegmentId(1), S).unwrap();
    let pt = sw.add_port(SegmentId(1), T).unwrap();
    let mut plain = NetFrontend::connect(&ps.socket).unwrap();
    let mut t = NetFrontend::connect(&pt.socket).unwrap();
    t.send(&hello(T)).unwrap();
    drain(&mut plain);

    // A partial checksum from a driver that did not take CSUM.
    let (f, hdr) = tcp(T, 100, false);
    plain.send_with_header(hdr.to_bytes(), &f).unwrap();
    // TSO from a driver without HOST_TSO4.
    let (f, hdr) = tcp(T, 5000, true);
    plain.send_with_header(hdr.to_bytes(), &f).unwrap();
    // UDP fragmentation offload, never offered, and a checksum field past
    // the end of the frame, from a driver with every offload.
    drop(plain);
    let mut s = NetFrontend::connect_with(&ps.socket, F_CSUM | F_HOST_TSO4).unwrap();
    let (f, mut hdr) = tcp(T, 5000, true);
    hdr.gso_type = 3;
    s.send_with_header(hdr.to_bytes(), &f).unwrap();
    let (f, mut hdr) = tcp(T, 100, false);
    hdr.csum_offset = 200;
    s.send_with_header(hdr.to_bytes(), &f).unwrap();
    assert_eq!(ps.stats.tx_dropped.load(Ordering::Relaxed), 4);
    assert!(drain(&mut t).is_empty(), "nothing got through");

    // The port goes on: a good offloaded frame still arrives, finished.
    let (f, hdr) = tcp(T, 5000, true);
    s.send_with_header(hdr.to_bytes(), &f).unwrap();
    let got = drain(&mut t);
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(_, f)| transport_checksum_ok(f)));
}

/// Ports S, T and P on one segment with frontends: S's driver acks
/// `s`, T's and P's `t` and `p` (None: the frontend's defaults); T and P
/// have announced themselves, and everything they sent is drained.
fn sender_and_two(sw: &Switch, s: u64, t: Option<u64>, p: Option<u64>) -> [NetFrontend; 3] {
    let connect = |mac: Mac, features: Option<u64>| {
        let port = sw.add_port(SegmentId(1), mac).unwrap();
        match features {
            Some(f) => NetFrontend::connect_with(&port.socket, f).unwrap(),
            None => NetFrontend::connect(&port.socket).unwrap(),
        }
    };
    let mut fes = [connect(S, Some(s)), connect(T, t), connect(P, p)];
    for (f, m) in fes[1..].iter_mut().zip([T, P]) {
        f.send(&hello(m)).unwrap();
    }
    for f in &mut fes {
        drain(f);
    }
    fes
}

#[test]
fn tcp_over_ipv6_is_segmented_for_drivers_without_tso6() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    // P takes TSO for IPv4 only.
    let [mut s, mut t, mut p] = sender_and_two(
        &sw,
        F_CSUM | F_HOST_TSO6,
        Some(F_GUEST_CSUM | F_GUEST_TSO6 | F_MRG_RXBUF),
        Some(F_GUEST_CSUM | F_GUEST_TSO4 | F_MRG_RXBUF),
    );
    assert_eq!(
        s.features() & F_HOST_TSO6,
        F_HOST_TSO6,
        "the port offers it"
    );

    // Whole to T.
    let (big, hdr) = tcp6(T, 20_000, true);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let (h, frame) = t.recv_with_header(WAIT).unwrap().unwrap();
    assert_eq!(frame, big);
    assert_eq!(NetHdr::parse(&h).gso_type, GSO_TCPV6);

    // Cut for P: every segment's payload length and checksum right, the
    // sequence numbers follow the data.
    let (big, hdr) = tcp6(P, 20_000, true);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let segs = drain(&mut p);
    assert_eq!(segs.len(), 20_000usize.div_ceil(usize::from(MSS)));
    let mut data = Vec::new();
    for (i, (h, f)) in segs.iter().enumerate() {
        assert_eq!(NetHdr::parse(h).gso_type, 0, "segment {i} is plain");
        assert!(transport_checksum_ok(f), "segment {i}");
        let len = usize::from(u16::from_be_bytes([f[18], f[19]]));
        assert_eq!(len, f.len() - 54, "payload length of segment {i}");
        let seq = u32::from_be_bytes([f[58], f[59], f[60], f[61]]);
        assert_eq!(seq as usize, 7 + data.len(), "sequence of segment {i}");
        data.extend_from_slice(&f[74..]);
    }
    assert_eq!(data, big[74..]);

    // A driver that did not take HOST_TSO6 may not send it.
    let pu = sw.add_port(SegmentId(1), G).unwrap();
    let mut u = NetFrontend::connect_with(&pu.socket, F_CSUM | F_HOST_TSO4).unwrap();
    let (big, hdr) = tcp6(T, 3000, true);
    u.send_with_header(hdr.to_bytes(), &big).unwrap();
    u.send(&hello(G)).unwrap();
    let (_, f) = t.recv_with_header(WAIT).unwrap().unwrap();
    assert_eq!(f, hello(G), "the TSO6 frame was dropped");
    assert_eq!(pu.stats.tx_dropped.load(Ordering::Relaxed), 1);
}

/// A UDP frame from S to `dst` of `payload` bytes over IPv4 with the
/// pseudo-header sum in its checksum field, and the header that asks for
/// UDP segmentation into `size`-byte datagrams.
fn udp_gso(dst: Mac, payload: usize, size: u16) -> (Vec<u8>, NetHdr) {
    let (mut f, mut hdr) = tcp(dst, payload, false);
    // The TCP frame's 20-byte header becomes an 8-byte UDP one.
    f.drain(14 + 20 + 8..14 + 20 + 20);
    let total = u16::try_from(20 + 8 + payload).unwrap();
    f[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    f[14 + 9] = 17;
    f[14 + 10..14 + 12].fill(0);
    let s = checksum(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&s.to_be_bytes());
    let ulen = u16::try_from(8 + payload).unwrap();
    f[34 + 4..34 + 6].copy_from_slice(&ulen.to_be_bytes());
    let mut pseudo = f[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&ulen.to_be_bytes());
    f[34 + 6..34 + 8].copy_from_slice(&(!checksum(&pseudo)).to_be_bytes());
    hdr.csum_offset = 6;
    hdr.gso_type = GSO_UDP_L4;
    hdr.gso_size = size;
    hdr.hdr_len = 42;
    (f, hdr)
}

#[test]
fn udp_segmentation_is_kept_for_drivers_that_take_it_and_done_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let uso = F_GUEST_CSUM | F_GUEST_USO4 | F_GUEST_USO6 | F_MRG_RXBUF;
    let [mut s, mut t, mut p] = sender_and_two(&sw, F_CSUM | F_HOST_USO, Some(uso), None);
    assert_eq!(s.features() & F_HOST_USO, F_HOST_USO, "the port offers it");

    let (big, hdr) = udp_gso(T, 10_000, 1400);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let (h, frame) = t.recv_with_header(WAIT).unwrap().unwrap();
    assert_eq!(frame, big, "whole to the driver that takes it");
    assert_eq!(NetHdr::parse(&h).gso_type, GSO_UDP_L4);

    let (big, hdr) = udp_gso(P, 10_000, 1400);
    s.send_with_header(hdr.to_bytes(), &big).unwrap();
    let segs = drain(&mut p);
    assert_eq!(segs.len(), 8);
    let mut data = Vec::new();
    for (i, (_, f)) in segs.iter().enumerate() {
        assert!(transport_checksum_ok(f), "datagram {i}");
        assert_eq!(checksum(&f[14..34]), 0, "IP header of datagram {i}");
        let ulen = usize::from(u16::from_be_bytes([f[38], f[39]]));
        assert_eq!(ulen, f.len() - 34, "UDP length of datagram {i}");
        assert!(ulen <= 8 + 1400);
        data.extend_from_slice(&f[42..]);
    }
    assert_eq!(data, big[42..]);
}
