//! Many idle ports on one node: each holds its socket alone until a VM
//! connects, so a netd under a modest descriptor limit still serves them
//! all. Its own test binary: it lowers this process's descriptor limit.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::l2::SegmentId;
use netd::switch::Switch;

/// Under this many descriptors (a common default soft limit is 1024)...
const LIMIT: u64 = 512;
/// ...this many ports wait for their VMs, and the last ones still work.
const PORTS: u32 = 400;

#[test]
fn hundreds_of_idle_ports_fit_in_a_small_descriptor_limit() {
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: LIMIT,
    };
    // SAFETY: setrlimit with a valid struct; this binary runs this test only.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let ports: Vec<_> = (0..PORTS)
        .map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            sw.add_port(SegmentId(1), [0x52, 0x54, 0, 0xc0, a, b])
                .unwrap()
        })
        .collect();
    // The last two, connected as VMs, exchange a frame both ways.
    let (p, q) = (&ports[ports.len() - 2], &ports[ports.len() - 1]);
    let mut a = NetFrontend::connect(&p.socket).unwrap();
    let mut b = NetFrontend::connect(&q.socket).unwrap();
    let mut f = q.mac.to_vec();
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&[0x88, 0xb5, 1, 2, 3, 4]);
    a.send(&f).unwrap();
    let wait = Duration::from_secs(10);
    assert_eq!(b.recv(wait).unwrap().as_deref(), Some(&f[..]));
    let mut back = p.mac.to_vec();
    back.extend_from_slice(&q.mac);
    back.extend_from_slice(&[0x88, 0xb5, 5, 6, 7, 8]);
    b.send(&back).unwrap();
    assert_eq!(a.recv(wait).unwrap().as_deref(), Some(&back[..]));
}
