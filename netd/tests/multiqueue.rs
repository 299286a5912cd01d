//! Multi-queue ports through a real vhost-user-net frontend with several
//! queue pairs: frames sent on any transmit queue are switched, frames for
//! the VM are spread over the receive queues the driver set up, one flow
//! always on the same queue.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::frame::{checksum, Mac, ETHERTYPE_IPV4};
use netd::l2::SegmentId;
use netd::port::QUEUE_PAIRS;
use netd::switch::Switch;

const A: Mac = [0x52, 0x54, 0, 0x3a, 0, 1];
const M: Mac = [0x52, 0x54, 0, 0x3a, 0, 2];
const WAIT: Duration = Duration::from_secs(10);

/// A UDP frame from `src` to `dst` with source port `sport`.
fn udp(dst: Mac, src: Mac, sport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = [
        0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 3, 0, 1, 10, 3, 0, 2,
    ];
    let s = checksum(&ip);
    ip[10..12].copy_from_slice(&s.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&12u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, b'f', b'l', b'o', b'w']);
    f
}

#[test]
fn a_multi_queue_nic_sends_on_every_pair_and_receives_flows_spread_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let pa = sw.add_port(SegmentId(1), A).unwrap();
    let pm = sw.add_port(SegmentId(1), M).unwrap();
    let mut a = NetFrontend::connect(&pa.socket).unwrap();
    let mut m = NetFrontend::connect_pairs(&pm.socket, 0, 2).unwrap();
    let pairs = m.config.max_virtqueue_pairs;
    assert_eq!(usize::from(pairs), QUEUE_PAIRS);

    // The VM sends on each of its transmit queues; all reach A.
    for pair in 0..2 {
        let f = udp(A, M, 1000 + u16::try_from(pair).unwrap());
        m.send_on(pair, [0; 12], &f).unwrap();
        assert_eq!(a.recv(WAIT).unwrap().unwrap(), f, "sent on pair {pair}");
    }

    // 32 flows to the VM, each sent twice: both receive queues get some,
    // and a flow's two frames arrive on the same queue.
    let mut queue_of: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
    for round in 0..2 {
        for sport in 2000..2032u16 {
            a.send(&udp(M, A, sport)).unwrap();
        }
        for _ in 0..32 {
            let (pair, (_, f)) = m.recv_any(WAIT).unwrap().unwrap();
            let sport = u16::from_be_bytes([f[34], f[35]]);
            queue_of.entry(sport).or_default().insert(pair);
        }
        assert!(
            m.recv_any(Duration::from_millis(200)).unwrap().is_none(),
            "round {round}"
        );
    }
    assert_eq!(queue_of.len(), 32);
    assert!(
        queue_of.values().all(|q| q.len() == 1),
        "a flow changed queues: {queue_of:?}"
    );
    let used: BTreeSet<usize> = queue_of.values().flatten().copied().collect();
    assert_eq!(
        used,
        BTreeSet::from([0, 1]),
        "both receive queues carry flows"
    );

    // A driver asking for more pairs than the port has is refused.
    drop(m);
    assert!(NetFrontend::connect_pairs(&pm.socket, 0, QUEUE_PAIRS + 1).is_err());
    // One that uses a single pair of the four gets everything there.
    let mut one = NetFrontend::connect(&pm.socket).unwrap();
    for sport in 3000..3008u16 {
        a.send(&udp(M, A, sport)).unwrap();
        assert!(one.recv(WAIT).unwrap().is_some(), "flow {sport}");
    }
}

#[test]
fn two_data_path_threads_serve_the_pairs_of_one_nic() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::with_threads(dir.path().to_owned(), 2).unwrap();
    let pa = sw.add_port(SegmentId(1), A).unwrap();
    let pm = sw.add_port(SegmentId(1), M).unwrap();
    let mut a = NetFrontend::connect(&pa.socket).unwrap();
    let mut m = NetFrontend::connect_pairs(&pm.socket, 0, 2).unwrap();

    // 100 frames on each transmit queue, interleaved: every one reaches A,
    // each queue's in the order sent.
    for i in 0..100u16 {
        for pair in 0..2 {
            let sport = 10_000 * (1 + u16::try_from(pair).unwrap()) + i;
            m.send_on(pair, [0; 12], &udp(A, M, sport)).unwrap();
        }
    }
    let mut got: [Vec<u16>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..200 {
        let f = a.recv(WAIT).unwrap().expect("a frame");
        let sport = u16::from_be_bytes([f[34], f[35]]);
        got[usize::from(sport / 10_000 - 1)].push(sport % 10_000);
    }
    let want: Vec<u16> = (0..100).collect();
    assert_eq!(got, [want.clone(), want], "all arrived, in order per queue");
    // The NIC's two pairs are polled by the two threads.
    let rings = sw.datapath_rings();
    assert_eq!(rings.len(), 2);
    assert!(rings.iter().all(|n| *n >= 1), "rings per thread: {rings:?}");

    // And back: A's frames to the VM spread over its receive queues.
    for sport in 2000..2032u16 {
        a.send(&udp(M, A, sport)).unwrap();
    }
    for _ in 0..32 {
        assert!(m.recv_any(WAIT).unwrap().is_some());
    }
}
