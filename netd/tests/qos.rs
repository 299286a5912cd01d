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
const BYTES_PER_SEC: f64 = 500_000.0;
/// 4000 kbit/s (500 kB/s, far below what the test frontends can offer even
/// on a busy machine) with a deep bucket: a bucket forfeits what goes unused
/// past its depth, so a thread the scheduler holds back longer than
/// burst / rate would measure low; 64 KiB covers 128 ms of that.
const DEEP: Limit = Limit {
    kbps: 4000,
    burst_kib: 64,
};

fn frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(1000);
    f.extend_from_slice(&B);
    f.extend_from_slice(&A);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.resize(1000, 0x5a);
    f
}

/// The two tests measure time: one at a time, so they do not share the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn two_ports() -> (tempfile::TempDir, Switch, Arc<Port>, Arc<Port>) {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let p1 = sw.add_port(SegmentId(1), A).unwrap();
    let p2 = sw.add_port(SegmentId(1), B).unwrap();
    (dir, sw, p1, p2)
}

/// The rate never passes the limit by more than 10 %, and falls short of it
/// by no more than 10 % unless the machine held the traffic back for
/// longer than the bucket lasts (`longest_gap` between frames; a bucket
/// forfeits what goes unused past its depth, and that is the scheduler's
/// doing, not the limit's).
fn within_10_percent(what: &str, rate: f64, longest_gap: Duration) {
    let depth = Duration::from_secs_f64(f64::from(DEEP.burst_kib) * 1024.0 / BYTES_PER_SEC);
    eprintln!("{what}: measured {rate:.0} B/s, longest gap {longest_gap:?}");
    assert!(
        rate <= BYTES_PER_SEC * 1.10,
        "{rate:.0} B/s against a limit of {BYTES_PER_SEC} B/s"
    );
    if longest_gap < depth / 2 {
        assert!(
            rate >= BYTES_PER_SEC * 0.90,
            "{rate:.0} B/s against a limit of {BYTES_PER_SEC} B/s"
        );
    }
}

fn longest_gap(times: &[Instant]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn what_a_vm_sends_is_shaped_to_its_egress_rate() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_dir, _sw, p1, p2) = two_ports();
    p1.set_qos(Limit::default(), DEEP);
    assert_eq!(p1.qos(), (Limit::default(), DEEP));
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let f = frame();
    let n = 600u64;
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for _ in 0..n {
            a.send(&f).unwrap();
        }
    });
    let mut arrivals = vec![start];
    for _ in 0..n {
        assert!(b.recv(Duration::from_secs(10)).unwrap().is_some());
        arrivals.push(Instant::now());
    }
    let elapsed = start.elapsed();
    sender.join().unwrap();
    // The burst passes at once, the rest at the rate; none is lost.
    let burst = f64::from(DEEP.burst_kib) * 1024.0;
    within_10_percent(
        "egress",
        (n as f64 * 1000.0 - burst) / elapsed.as_secs_f64(),
        longest_gap(&arrivals),
    );
    assert_eq!(p1.stats.tx_frames.load(Ordering::Relaxed), n);
    assert_eq!(p2.stats.rx_frames.load(Ordering::Relaxed), n);
}

#[test]
fn what_comes_for_a_vm_is_policed_to_its_ingress_rate() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_dir, _sw, p1, p2) = two_ports();
    p2.set_qos(DEEP, Limit::default());
    let mut a = NetFrontend::connect(&p1.socket).unwrap();
    let mut b = NetFrontend::connect(&p2.socket).unwrap();
    let f = frame();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut times = vec![start];
        while start.elapsed() < Duration::from_millis(1500) {
            a.send(&f).unwrap();
            sent += 1;
            times.push(Instant::now());
        }
        (sent, start.elapsed(), longest_gap(&times))
    });
    let (sent, elapsed, gap) = sender.join().unwrap();
    // What the switch let through (counted as it decided, whenever the
    // receiving thread gets to read it).
    let admitted = sent - p2.stats.rx_policed.load(Ordering::Relaxed);
    assert!(
        sent > 2 * admitted,
        "the sender offered more than the rate ({sent} frames)"
    );
    // The burst passes at once, then the rate.
    let burst = f64::from(DEEP.burst_kib) * 1024.0;
    within_10_percent(
        "ingress",
        (admitted as f64 * 1000.0 - burst) / elapsed.as_secs_f64(),
        gap,
    );
    // And the VM gets every frame let through.
    for _ in 0..admitted {
        assert!(b.recv(Duration::from_secs(10)).unwrap().is_some());
    }
    assert_eq!(b.try_recv().unwrap(), None);
}
