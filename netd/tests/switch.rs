//! The switch through real vhost-user-net frontends (virtio-driver over the
//! ports' sockets, rings in shared memory), as VM NICs use it.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::frame::{Arp, Mac, ARP_REQUEST, BROADCAST};
use netd::l2::SegmentId;
use netd::port::Port;
use netd::switch::Switch;

const A: Mac = [0x52, 0x54, 0, 0xa7, 0, 1];
const B: Mac = [0x52, 0x54, 0, 0xa7, 0, 2];
const C: Mac = [0x52, 0x54, 0, 0xa7, 0, 3];
const WAIT: Duration = Duration::from_secs(10);

fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A switch with ports for A and B on segment 1 (the directory holds the
/// sockets).
fn two_ports() -> (tempfile::TempDir, Switch, Arc<Port>, Arc<Port>) {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let p1 = sw.add_port(SegmentId(1), A).unwrap();
    let p2 = sw.add_port(SegmentId(1), B).unwrap();
    (dir, sw, p1, p2)
}

#[test]
fn ports_on_a_segment_talk_and_other_segments_hear_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let (p1, p2, p3) = (
        sw.add_port(SegmentId(1), A).unwrap(),
        sw.add_port(SegmentId(1), B).unwrap(),
        sw.add_port(SegmentId(2), C).unwrap(),
    );
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let mut c = NetFrontend::connect(&p3.socket).unwrap();
    assert_eq!({ a.config.mac }, A);
    assert_eq!({ c.config.mac }, C);
    assert_eq!({ a.config.status } & 1, 1, "link up");

    // A asks for B's address: the broadcast reaches B.
    let who_has = Arp {
        op: ARP_REQUEST,
        sha: A,
        spa: Ipv4Addr::new(10, 0, 0, 1),
        tha: [0; 6],
        tpa: Ipv4Addr::new(10, 0, 0, 2),
    };
    let request = who_has.to_frame(BROADCAST);
    a.send(&request).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&request[..]));

    // B answers to A's address, which the switch learned from the request.
    let reply = who_has.reply_from(B).to_frame(A);
    b.send(&reply).unwrap();
    assert_eq!(a.recv(WAIT).unwrap().as_deref(), Some(&reply[..]));

    // Unicast from A to B, now known: only B gets it. The switch forwards A's
    // frames in order, so once B has this one, the broadcast before it has
    // been handled too, and C (another segment) got neither.
    let hello = frame(B, A, b"hello b");
    a.send(&hello).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&hello[..]));
    assert_eq!(c.try_recv().unwrap(), None);

    // C's broadcast stays on segment 2: nobody else is there.
    c.send(&frame(BROADCAST, C, b"anyone?")).unwrap();
    let ping = frame(A, B, b"still here");
    b.send(&ping).unwrap();
    assert_eq!(a.recv(WAIT).unwrap().as_deref(), Some(&ping[..]));
    assert_eq!(a.try_recv().unwrap(), None);
    assert_eq!(b.try_recv().unwrap(), None);

    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(p1.stats.rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(p3.stats.rx_frames.load(Ordering::Relaxed), 0);
}

#[test]
fn bursts_to_several_ports_arrive_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let (p1, p2, p3) = (
        sw.add_port(SegmentId(1), A).unwrap(),
        sw.add_port(SegmentId(1), B).unwrap(),
        sw.add_port(SegmentId(1), C).unwrap(),
    );
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let mut c = NetFrontend::connect(&p3.socket).unwrap();
    // B and C are learned.
    for (fe, mac) in [(&mut b, B), (&mut c, C)] {
        fe.send(&frame(BROADCAST, mac, b"here")).unwrap();
        assert!(a.recv(WAIT).unwrap().is_some());
    }
    assert!(c.recv(WAIT).unwrap().is_some());
    assert!(b.recv(WAIT).unwrap().is_some());
    // One burst: runs to B, a frame to C between them, a broadcast, a
    // malformed IPv4 frame (a plain segment bridges it as it is), and B
    // again after C changed nothing.
    let mut burst = Vec::new();
    for i in 0..60u8 {
        let f = match i {
            20 => frame(C, A, b"to c"),
            40 => frame(BROADCAST, A, b"to all"),
            50 => {
                let mut f = frame(B, A, &[0x45, 0, 0, 5]);
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                f
            }
            _ => frame(B, A, &[i; 40]),
        };
        burst.push(f);
    }
    a.send_burst(&burst).unwrap();
    let to_b: Vec<&Vec<u8>> = burst
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 20)
        .map(|(_, f)| f)
        .collect();
    for want in to_b {
        assert_eq!(b.recv(WAIT).unwrap().as_ref(), Some(want));
    }
    assert_eq!(c.recv(WAIT).unwrap().as_ref(), Some(&burst[20]));
    assert_eq!(c.recv(WAIT).unwrap().as_ref(), Some(&burst[40]));
    assert_eq!(b.try_recv().unwrap(), None);
    assert_eq!(c.try_recv().unwrap(), None);
    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), 60);
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), 59 + 1);
}

#[test]
fn runts_are_dropped_and_the_port_keeps_working() {
    let (_dir, _sw, p1, p2) = two_ports();
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    a.send(&[0xff; 10]).unwrap();
    let good = frame(BROADCAST, A, b"after the runt");
    a.send(&good).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&good[..]));
    assert_eq!(b.try_recv().unwrap(), None);
    assert_eq!(p1.stats.tx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn a_port_serves_the_next_frontend_after_one_leaves() {
    let (_dir, _sw, p1, p2) = two_ports();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    for round in 0..3u8 {
        // A VM restarting: a new frontend on the same socket.
        let mut a = NetFrontend::connect(&p1.socket).unwrap();
        let f = frame(B, A, &[round; 20]);
        a.send(&f).unwrap();
        assert_eq!(
            b.recv(WAIT).unwrap().as_deref(),
            Some(&f[..]),
            "round {round}"
        );
        drop(a);
    }
}

#[test]
fn a_deleted_port_is_gone_and_the_others_carry_on() {
    let (_dir, sw, p1, p2) = two_ports();
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    // B is learned behind p2.
    b.send(&frame(BROADCAST, B, b"here")).unwrap();
    assert!(a.recv(WAIT).unwrap().is_some());

    sw.remove_port(p2.id).unwrap();
    assert!(!p2.socket.exists(), "the socket is removed");
    assert!(NetFrontend::connect(&p2.socket).is_err());
    assert!(
        sw.remove_port(p2.id).is_err(),
        "a second delete is an error"
    );

    // A new port on the segment hears A, and A's frames to B go nowhere.
    let p3 = sw.add_port(SegmentId(1), C).unwrap();
    let mut c = NetFrontend::connect(&p3.socket).unwrap();
    a.send(&frame(B, A, b"to the deleted port")).unwrap();
    let to_c = frame(BROADCAST, A, b"to everyone");
    a.send(&to_c).unwrap();
    // B's address was forgotten with its port, so the unicast flooded to C.
    assert_eq!(
        c.recv(WAIT).unwrap().as_deref(),
        Some(&frame(B, A, b"to the deleted port")[..])
    );
    assert_eq!(c.recv(WAIT).unwrap().as_deref(), Some(&to_c[..]));
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), 0);
}

#[test]
fn descriptors_that_lie_about_lengths_are_dropped_and_the_port_goes_on() {
    let (_dir, _sw, p1, p2) = two_ports();
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    // Longer than any frame, shorter than the header, empty.
    for len in [100_000, 5, 0] {
        a.send_descriptor(len).unwrap();
    }
    assert_eq!(p1.stats.tx_dropped.load(Ordering::Relaxed), 3);
    let f = frame(B, A, b"still here");
    a.send(&f).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&f[..]));
}

#[test]
fn a_mirrored_port_copies_what_it_sends_and_receives_to_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let (p1, p2) = (
        sw.add_port(SegmentId(1), A).unwrap(),
        sw.add_port(SegmentId(1), B).unwrap(),
    );
    // The capture port sits on a segment of its own.
    let p3 = sw.add_port(SegmentId(9), C).unwrap();
    sw.set_mirror(p1.id, Some(p3.id)).unwrap();
    assert!(sw.set_mirror(p1.id, Some(p1.id)).is_err());
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let mut c = NetFrontend::connect(&p3.socket).unwrap();
    let out = frame(B, A, b"out");
    a.send(&out).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&out[..]));
    let back = frame(A, B, b"back");
    b.send(&back).unwrap();
    assert_eq!(a.recv(WAIT).unwrap().as_deref(), Some(&back[..]));
    assert_eq!(c.recv(WAIT).unwrap().as_deref(), Some(&out[..]));
    assert_eq!(c.recv(WAIT).unwrap().as_deref(), Some(&back[..]));
    sw.set_mirror(p1.id, None).unwrap();
    a.send(&out).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&out[..]));
    assert_eq!(c.try_recv().unwrap(), None);
    // A target that goes away takes the mirroring with it.
    sw.set_mirror(p2.id, Some(p3.id)).unwrap();
    drop(c);
    sw.remove_port(p3.id).unwrap();
    assert_eq!(p2.mirror_target(), None);
}

/// Long frames of a burst go from the sender's buffers straight into the
/// receiver's (read in part, see `Kicks::switch_burst`): each arrives
/// whole and in order, from chains of one or several descriptors, and
/// still whole when the sender rewrites its buffers as soon as the port
/// hands them back, or when the receiver has no buffers yet (the frames
/// wait in the port).
#[test]
fn long_frames_of_a_burst_arrive_whole_from_the_senders_buffers() {
    let (_dir, _sw, p1, p2) = two_ports();
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    // B is learned: A's frames to it go to one port.
    let hello = frame(A, B, b"here");
    b.send(&hello).unwrap();
    assert_eq!(a.recv(WAIT).unwrap().as_deref(), Some(&hello[..]));
    let burst = |round: usize, pieces: usize| -> Vec<Vec<u8>> {
        // As many as the ring's 64 descriptors take.
        let count = u8::try_from((64 / pieces).min(32)).unwrap();
        (0..count)
            .map(|i| {
                let mut f = frame(B, A, &[]);
                let len = 600 + 29 * usize::from(i);
                let salt = u8::try_from(round).unwrap().wrapping_mul(37);
                f.extend((0..len).map(|k| u8::try_from(k % 251).unwrap() ^ i ^ salt));
                f
            })
            .collect()
    };
    // B has room: the frames are in its ring by the time A gets its
    // buffers back (written before the port hands them back).
    for (round, pieces) in [(0, 1), (1, 2), (2, 3)] {
        let frames = burst(round, pieces);
        a.send_burst_in(&frames, pieces).unwrap();
        a.scribble_tx(0xee);
        for (i, f) in frames.iter().enumerate() {
            let got = b.try_recv().unwrap();
            assert_eq!(got.as_deref(), Some(&f[..]), "round {round}, frame {i}");
        }
    }
    // B reads nothing until all are sent: its 64 buffers fill up, and the
    // later frames wait in the port.
    let mut sent = Vec::new();
    for (round, pieces) in [(3, 1), (4, 1), (5, 3), (6, 4), (7, 6)] {
        let frames = burst(round, pieces);
        a.send_burst_in(&frames, pieces).unwrap();
        a.scribble_tx(0xee);
        sent.extend(frames);
    }
    assert!(sent.len() > 64);
    for (i, f) in sent.iter().enumerate() {
        let got = b.recv(WAIT).unwrap();
        assert_eq!(got.as_deref(), Some(&f[..]), "frame {i}");
    }
    assert_eq!(b.try_recv().unwrap(), None);
    let n = sent.len() as u64 + 32 + 32 + 21;
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), n);
    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), n);
}
