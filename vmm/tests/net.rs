//! A virtio-net NIC over vhost-user: a test guest sends a frame through a
//! real vhost-user-net backend (an echo device built on vhost-user-backend,
//! standing in for netd) and receives it back.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use atoll_tests::net_echo::{serve_once, EchoNet};

#[test]
fn a_frame_round_trips_through_a_vhost_user_net_backend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let backend = Arc::new(EchoNet::default());
    let (b2, s2) = (backend.clone(), sock.clone());
    let server = std::thread::spawn(move || serve_once(b2, &s2));
    atoll_tests::wait_until("the backend socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    run_net_guest(dir.path(), &sock);
    // The backend thread stays behind with its listener; the test process ends it.
    drop(server);
}

const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x99];

/// A netd switch with the VM's port and a peer port on one segment; the
/// peer answers the first frame it gets (the VM's broadcast) with the same
/// payload, addressed back to the VM, and hands the frame back when joined.
struct SwitchWithPeer {
    _switch: netd::switch::Switch,
    vm_port: std::sync::Arc<netd::port::Port>,
    answer: std::thread::JoinHandle<Vec<u8>>,
}

fn switch_with_peer(dir: &Path) -> SwitchWithPeer {
    use netd::l2::SegmentId;
    let sw = netd::switch::Switch::new(dir.join("ports")).unwrap();
    let vm_port = sw.add_port(SegmentId(7), VM_MAC).unwrap();
    let peer_port = sw.add_port(SegmentId(7), PEER_MAC).unwrap();
    let mut peer = atoll_tests::net_frontend::NetFrontend::connect(&peer_port.socket).unwrap();
    let answer = std::thread::spawn(move || {
        let got = peer.recv(Duration::from_secs(60)).unwrap().unwrap();
        let mut back = got.clone();
        back[..6].copy_from_slice(&VM_MAC);
        back[6..12].copy_from_slice(&PEER_MAC);
        peer.send(&back).unwrap();
        got
    });
    SwitchWithPeer {
        _switch: sw,
        vm_port,
        answer,
    }
}

#[test]
fn a_vm_nic_talks_to_another_port_through_the_netd_switch() {
    let dir = tempfile::tempdir().unwrap();
    let w = switch_with_peer(dir.path());
    run_net_guest(dir.path(), &w.vm_port.socket);
    let sent = w.answer.join().unwrap();
    assert_eq!(&sent[..6], &[0xff; 6], "the VM broadcast");
    assert_eq!(&sent[6..12], &VM_MAC);
    assert_eq!(&sent[14..], b"atoll echo");
    assert_eq!(
        w.vm_port
            .stats
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Runs the `net` test guest with its NIC on `socket` (MAC 52:54:00:12:34:56)
/// and checks what it printed: it broadcasts one frame and reports the first
/// frame it receives.
fn run_net_guest(dir: &Path, socket: &Path) {
    let lines = run_guest(dir, "net", socket, 2);
    assert_eq!(
        lines[..],
        [
            "status 0f mac 52:54:00:12:34:56 link 1",
            // 12-byte virtio-net header + 14-byte Ethernet header + 10 bytes.
            "tx used 0 rx len 36 type 88b5 payload atoll echo",
            r#"{"exit":{"detail":0,"reason":"guest-exit"},"text":"guest-exit(0)"}"#,
        ],
    );
}

/// Runs test guest `name` with a NIC on `socket` (MAC 52:54:00:12:34:56,
/// `queues` data queues); its output lines.
fn run_guest(dir: &Path, name: &str, socket: &Path, queues: u16) -> Vec<String> {
    let cfg = serde_json::json!({
        "memory_mib": 64,
        "boot": {"kernel": common::guest(name)},
        "debug_exit": true,
        "nets": [{"socket": socket, "mac": "52:54:00:12:34:56", "num_queues": queues}],
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    if !text.contains("guest-exit(0)") {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    text.lines().map(str::to_owned).collect()
}

#[test]
fn a_multi_queue_nic_sets_its_pairs_on_the_control_queue_and_sends_on_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let w = switch_with_peer(dir.path());
    let lines = run_guest(dir.path(), "netmq", &w.vm_port.socket, 4);
    assert_eq!(
        lines[..],
        [
            // Two pairs offered (netd serves four), the control queue after
            // their four queues.
            "mq 1 ctrl 1 pairs 2 queues 5",
            // Three pairs, none, a receive-mode command (not offered) and a
            // command cut short are refused (VIRTIO_NET_ERR); two are taken.
            "ctrl three 1 zero 1 promisc 1 short 1 two 0",
            // 12-byte header + 14-byte Ethernet header + 8 bytes.
            "tx1 used 0 rx len 34 payload atoll mq",
            r#"{"exit":{"detail":0,"reason":"guest-exit"},"text":"guest-exit(0)"}"#,
        ],
    );
    let sent = w.answer.join().unwrap();
    assert_eq!(&sent[6..12], &VM_MAC);
    assert_eq!(&sent[14..], b"atoll mq");
    // One frame, from the only transmit queue the guest used (the second
    // pair's).
    assert_eq!(
        w.vm_port
            .stats
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_nic_comes_back_when_its_backend_restarts() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let console = dir.path().join("console.sock");
    let echo = atoll_tests::bins::bin("atoll-net-echo");
    let backend = |sock: &Path| {
        let child = Command::new(&echo)
            .arg(sock)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        atoll_tests::wait_until("the backend socket", Duration::from_secs(10), || {
            sock.exists().then_some(())
        });
        child
    };
    let mut first = backend(&sock);
    let cfg = serde_json::json!({
        "memory_mib": 64,
        "boot": {"kernel": common::guest("netre")},
        "debug_exit": true,
        "serial": {"socket": console},
        "nets": [{"socket": sock, "mac": "52:54:00:12:34:56"}],
    });
    let path = dir.path().join("netre.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut vm = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The vmm's log, line by line.
    let (tx, log) = std::sync::mpsc::channel();
    let stderr = vm.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait_log = |what: &str| loop {
        let line = log
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no {what:?} in the vmm's log"));
        if line.contains(what) {
            return;
        }
    };
    wait_log("vhost-user-net backend connected");
    let stream = atoll_tests::wait_until("the console", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&console).ok()
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "status 0f mac 52:54:00:12:34:56 link 1\r\n");
    // The guest has its NIC up and waits: the backend dies, and another
    // takes its place on the same socket.
    first.kill().unwrap();
    first.wait().unwrap();
    wait_log("vhost-user backend went away");
    std::fs::remove_file(&sock).unwrap();
    let second = backend(&sock);
    wait_log("vhost-user backend back");
    // Then the guest sends: its frame comes back through the new backend.
    (&stream).write_all(b"g").unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(
        line,
        "tx used 0 rx len 37 type 88b5 payload atoll again\r\n"
    );
    // (Only the new backend was there to echo it.)
    let out = vm.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut second = second;
    second.kill().unwrap();
    second.wait().unwrap();
}
