//! Per-port rate limits through real vhost-user-net frontends: what a VM
//! sends is shaped to its egress rate (nothing lost), what comes for it is
//! policed to its ingress rate; both within 10 % of the rate set.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_tests::net_frontend::NetFrontend;
use netd::frame::Mac;
use netd::l2::SegmentId;
use netd::port::Port;
use netd::qos::Limit;
use netd::switch::Switch;

const A: Mac = [0x52, 0x54, 0, 0x90, 0, 1];
const B: Mac = [0x52, 0x54, 0, 0x90, 0, 2];
/// 8000 kbit/s: 1 MB/s, far below what the test frontends can offer.
const RATE: Limit = Limit {
    kbps: 8000,
    burst_kib: 16,
};
const BYTES_PER_SEC: f64 = 1_000_000.0;

fn frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(1000);
    f.extend_from_slice(&B);
    f.extend_from_slice(&A);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.resize(1000, 0x5a);
    f
}

fn two_ports() -> (tempfile::TempDir, Switch, Arc<Port>, Arc<Port>) {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned());
    let p1 = sw.add_port(SegmentId(1), A).unwrap();
    let p2 = sw.add_port(SegmentId(1), B).unwrap();
    (dir, sw, p1, p2)
}

fn within_10_percent(rate: f64) {
    eprintln!("measured {rate:.0} B/s");
    assert!(
        (rate / BYTES_PER_SEC - 1.0).abs() <= 0.10,
        "{rate:.0} B/s against a limit of {BYTES_PER_SEC} B/s"
    );
}

#[test]
fn what_a_vm_sends_is_shaped_to_its_egress_rate() {
    let (_dir, _sw, p1, p2) = two_ports();
    p1.set_qos(Limit::default(), RATE);
    assert_eq!(p1.qos(), (Limit::default(), RATE));
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let f = frame();
    let n = 400;
    let sender = std::thread::spawn(move || {
        for _ in 0..n {
            a.send(&f).unwrap();
        }
    });
    let mut arrivals = Vec::with_capacity(n);
    for _ in 0..n {
        assert!(b.recv(Duration::from_secs(10)).unwrap().is_some());
        arrivals.push(Instant::now());
    }
    sender.join().unwrap();
    // Past the burst, frames come at the rate; none is lost.
    let (from, to) = (arrivals[50], arrivals[n - 1]);
    within_10_percent(((n - 1 - 50) * 1000) as f64 / (to - from).as_secs_f64());
    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), n as u64);
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), n as u64);
}

#[test]
fn what_comes_for_a_vm_is_policed_to_its_ingress_rate() {
    let (_dir, _sw, p1, p2) = two_ports();
    p2.set_qos(RATE, Limit::default());
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let f = frame();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_millis(800) {
            a.send(&f).unwrap();
            sent += 1;
        }
        (sent, start.elapsed())
    });
    let mut got = 0u64;
    while b.recv(Duration::from_millis(300)).unwrap().is_some() {
        got += 1;
    }
    let (sent, elapsed) = sender.join().unwrap();
    assert!(
        sent > 2 * got,
        "the sender offered more than the rate ({sent} frames)"
    );
    // The burst passes at once, then the rate.
    let burst = f64::from(RATE.burst_kib) * 1024.0;
    within_10_percent((got as f64 * 1000.0 - burst) / elapsed.as_secs_f64());
    assert_eq!(p2.stats.rx_policed.load(Ordering::Relaxed), sent - got);
}
