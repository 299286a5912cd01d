//! An overlay network across two nodes: two netd daemons, each in its own
//! network namespace joined by a veth pair, each on its own private bus,
//! carry frames between their ports in VXLAN or Geneve. Needs root
//! (namespaces).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use atoll_tests::contract::wait_owner;
use atoll_tests::net_frontend::NetFrontend;
use atoll_tests::TestBus;
use netd::frame::{Arp, Mac, ARP_REPLY, ARP_REQUEST, BROADCAST};
use netd::objects::NetworkProxy;
use netd::Net1Proxy;
use zbus::zvariant::Value;

const WAIT: Duration = Duration::from_secs(10);
const A: Mac = [0x52, 0x54, 0, 0x0e, 0, 1];
const B: Mac = [0x52, 0x54, 0, 0x0e, 0, 2];
const C: Mac = [0x52, 0x54, 0, 0x0e, 0, 3];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, 10.99.<n>.1 and .2 (and
/// fd00:99:<n>::1 and ::2); removed on drop.
struct Namespaces(String, String);

impl Namespaces {
    fn new(n: u32) -> Self {
        let (a, b) = (format!("atoll-ov{n}a"), format!("atoll-ov{n}b"));
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let (va, vb) = (format!("ov{n}a"), format!("ov{n}b"));
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", &vb, "netns", &b,
        ]);
        for (ns, dev, addr) in [(&a, &va, 1), (&b, &vb, 2)] {
            let cidr = format!("10.99.{n}.{addr}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev]);
            let cidr6 = format!("fd00:99:{n}::{addr}/64");
            ip(&["-n", ns, "addr", "add", &cidr6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Self(a, b)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).output();
    }
}

/// A netd in namespace `ns` on its own bus.
struct Node {
    child: Child,
    bus: TestBus,
    _run: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(ns: &str, run: &Path) -> Node {
    let bus = TestBus::start();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_netd")])
        .args(["--node-id", ns, "--bus", bus.address(), "--run-dir"])
        .arg(run)
        .arg("--data-dir")
        .arg(run.with_file_name(format!("{ns}-data")))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Node {
        child,
        bus,
        _run: run.to_owned(),
    }
}

/// Sets up the overlay network `vni` on a node: endpoint `local` speaking
/// `encap` on its own port, remote `remote`, one port with `mac`; returns
/// the port's socket.
async fn overlay_port(
    n: &Node,
    (vni, encap): (u32, &str),
    local: &str,
    remote: &str,
    mac: &str,
) -> OverlayPort {
    let conn = zbus::connection::Builder::address(n.bus.address())
        .unwrap()
        .build()
        .await
        .unwrap();
    wait_owner(&conn, netd::BUS_NAME, true).await;
    let net = Net1Proxy::new(&conn).await.unwrap();
    let err = net.set_tunnel_endpoint(local, 0, "gre").await.unwrap_err();
    assert!(err.to_string().contains("want vxlan or geneve"), "{err}");
    let bound = net.set_tunnel_endpoint(local, 0, encap).await.unwrap();
    let port = if encap == "geneve" { 6081 } else { 4789 };
    let want = std::net::SocketAddr::new(local.parse().unwrap(), port);
    assert_eq!(bound, want.to_string());
    assert_eq!(net.tunnel_encapsulation().await.unwrap(), encap);
    let opts = HashMap::from([("vni", Value::from(vni))]);
    let path = net.create_network("ov", "overlay", opts).await.unwrap();
    let network = NetworkProxy::builder(&conn)
        .path(path.clone())
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert!(network.set_remotes(&["10.0.0.300"]).await.is_err());
    network.set_remotes(&[remote]).await.unwrap();
    assert_eq!(network.remotes().await.unwrap(), vec![remote.to_owned()]);
    assert_eq!(network.vni().await.unwrap(), vni);
    let (_, socket, _) = net.create_port(&path, mac, HashMap::new()).await.unwrap();
    (socket, conn, path)
}

/// A port's socket, its node's bus connection, and its network's path.
type OverlayPort = (String, zbus::Connection, zbus::zvariant::OwnedObjectPath);

/// Two nodes in the namespaces of `Namespaces::new(n)`, each with a port
/// on the overlay network `vni` in `encap`, their endpoints `a` and `b`.
struct TwoNodes {
    a: OverlayPort,
    b: OverlayPort,
    // The nodes stop before their namespaces go.
    _nodes: (Node, Node),
    ns: Namespaces,
    _dir: tempfile::TempDir,
}

async fn two_nodes(n: u32, (vni, encap): (u32, &str), (a, b): (&str, &str)) -> TwoNodes {
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespaces::new(n);
    let na = node(&ns.0, &dir.path().join("a"));
    let nb = node(&ns.1, &dir.path().join("b"));
    let pa = overlay_port(&na, (vni, encap), a, b, "52:54:00:0e:00:01").await;
    let pb = overlay_port(&nb, (vni, encap), b, a, "52:54:00:0e:00:02").await;
    TwoNodes {
        a: pa,
        b: pb,
        _nodes: (na, nb),
        ns,
        _dir: dir,
    }
}

fn arp(op: u16, sha: Mac, spa: [u8; 4], tha: Mac, tpa: [u8; 4], dst: Mac) -> Vec<u8> {
    Arp {
        op,
        sha,
        spa: spa.into(),
        tha,
        tpa: tpa.into(),
    }
    .to_frame(dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_carry_an_overlay_network_in_vxlan() {
    let t = two_nodes(1, (5001, "vxlan"), ("10.99.1.1", "10.99.1.2")).await;
    let ((sock_a, conn_a, _), (sock_b, conn_b, ov_b)) = (t.a.clone(), t.b.clone());
    // A port of another overlay network on node B must hear nothing.
    let net_b = Net1Proxy::new(&conn_b).await.unwrap();
    let other = net_b
        .create_network(
            "ov2",
            "overlay",
            HashMap::from([("vni", Value::from(5002u32))]),
        )
        .await
        .unwrap();
    NetworkProxy::builder(&conn_b)
        .path(other.clone())
        .unwrap()
        .build()
        .await
        .unwrap()
        .set_remotes(&["10.99.1.1"])
        .await
        .unwrap();
    let (_, sock_c, _) = net_b
        .create_port(&other, "52:54:00:0e:00:03", HashMap::new())
        .await
        .unwrap();

    let (a, b) = tokio::task::spawn_blocking(move || {
        let mut a = NetFrontend::connect(Path::new(&sock_a)).unwrap();
        let mut b = NetFrontend::connect(Path::new(&sock_b)).unwrap();
        let mut c = NetFrontend::connect(Path::new(&sock_c)).unwrap();
        // A broadcast crosses to the other node, the unicast answer comes
        // back to the learned address...
        let who_has = ask_and_answer(&mut a, &mut b, 5);
        // ...and unicast goes straight to it; big frames too.
        let mut big = arp(ARP_REQUEST, A, [192, 168, 5, 1], B, [192, 168, 5, 2], B);
        big.resize(1400, 0xab);
        a.send(&big).unwrap();
        assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&big[..]));
        // Full-size frames sent back to back, each over the 1500-byte
        // underlay with its tunnel headers: joined datagrams the route
        // refuses go one by one, in IP fragments, and all arrive in order.
        let full: Vec<Vec<u8>> = (0..6u8)
            .map(|i| {
                let mut f = big.clone();
                f.resize(1514, i);
                f
            })
            .collect();
        for f in &full {
            a.send(f).unwrap();
        }
        for f in &full {
            assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&f[..]));
        }
        // One burst to B of frames in three sizes, with a broadcast in the
        // middle: sent in joined runs where the sizes allow, each frame
        // once, all in order.
        let burst: Vec<Vec<u8>> = (0..40u8)
            .map(|i| {
                if i == 20 {
                    return who_has.clone();
                }
                let mut f = big.clone();
                f.truncate(100 + usize::from(i / 7));
                f[60] = i;
                f
            })
            .collect();
        a.send_burst(&burst).unwrap();
        for f in &burst {
            assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&f[..]));
        }
        // Another VNI on node B heard none of it.
        assert_eq!(c.try_recv().unwrap(), None);
        let _ = C;
        (a, b)
    })
    .await
    .unwrap();

    // Node B no longer lists node A for the network: A's datagrams are
    // refused there, counted, and nothing reaches B's port.
    let net_b = Net1Proxy::builder(&conn_b)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    NetworkProxy::builder(&conn_b)
        .path(ov_b)
        .unwrap()
        .build()
        .await
        .unwrap()
        .set_remotes(&["10.99.1.9"])
        .await
        .unwrap();
    let dropped = |c: HashMap<String, u64>| c.get("dropped").copied().unwrap_or(0);
    let before = dropped(net_b.tunnel_counters().await.unwrap());
    let (mut a, mut b) = (a, b);
    let frame = arp(
        ARP_REQUEST,
        A,
        [192, 168, 5, 1],
        [0; 6],
        [192, 168, 5, 2],
        BROADCAST,
    );
    a.send(&frame).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while dropped(net_b.tunnel_counters().await.unwrap()) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the datagram was not refused"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(b.try_recv().unwrap(), None);
    let counters = tunnel_counters(&conn_a).await;
    // The request, the 1400-byte frame, six full-size ones, the burst's 40
    // and the one B refused.
    assert_eq!(counters.get("tx"), Some(&49), "{counters:?}");
    assert_eq!(counters.get("rx"), Some(&1), "{counters:?}");
}

/// A asks for B's address on 192.168.`net`.0/24 by broadcast, B answers
/// A by unicast; each arrives as sent. Returns the question.
fn ask_and_answer(a: &mut NetFrontend, b: &mut NetFrontend, net: u8) -> Vec<u8> {
    let (ip_a, ip_b) = ([192, 168, net, 1], [192, 168, net, 2]);
    let who_has = arp(ARP_REQUEST, A, ip_a, [0; 6], ip_b, BROADCAST);
    a.send(&who_has).unwrap();
    assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&who_has[..]));
    let is_at = arp(ARP_REPLY, B, ip_b, A, ip_a, A);
    b.send(&is_at).unwrap();
    assert_eq!(a.recv(WAIT).unwrap().as_deref(), Some(&is_at[..]));
    who_has
}

/// The node's tunnel counters, as they are now.
async fn tunnel_counters(conn: &zbus::Connection) -> HashMap<String, u64> {
    Net1Proxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
        .tunnel_counters()
        .await
        .unwrap()
}

/// `n` full-size frames (192.168.`net`.0/24) from A in one burst reach B
/// whole and in order.
fn full_size_burst(a: &mut NetFrontend, b: &mut NetFrontend, n: u8, net: u8) {
    let full: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = arp(ARP_REQUEST, A, [192, 168, net, 1], B, [192, 168, net, 2], B);
            f.resize(1514, i);
            f
        })
        .collect();
    a.send_burst(&full).unwrap();
    for f in &full {
        assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&f[..]));
    }
}

/// A UDP socket bound in namespace `ns` (as another Geneve speaker there).
fn udp_in(ns: &str) -> std::net::UdpSocket {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: this thread alone enters the namespace, to open the
        // socket there; it ends right after.
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0);
        std::net::UdpSocket::bind("0.0.0.0:0").unwrap()
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_carry_an_overlay_network_in_geneve() {
    let t = two_nodes(2, (7001, "geneve"), ("10.99.2.1", "10.99.2.2")).await;
    let ((sock_a, _, _), (sock_b, conn_b, _)) = (t.a.clone(), t.b.clone());
    let node_a = t.ns.0.clone();
    tokio::task::spawn_blocking(move || {
        let mut a = NetFrontend::connect(Path::new(&sock_a)).unwrap();
        let mut b = NetFrontend::connect(Path::new(&sock_b)).unwrap();
        // Broadcast, the learned answer, and full-size frames in one burst.
        ask_and_answer(&mut a, &mut b, 7);
        full_size_burst(&mut a, &mut b, 8, 7);

        // Another Geneve speaker at node A's address: a datagram with a
        // (non-critical) option is taken, the frame after the option
        // delivered; one whose option is critical is refused.
        let peer = udp_in(&node_a);
        let frame = arp(ARP_REPLY, A, [192, 168, 7, 1], B, [192, 168, 7, 2], B);
        let geneve = |flags: u8| {
            let mut d = vec![2, flags, 0x65, 0x58, 0, 0x1b, 0x59, 0];
            d.extend_from_slice(&[0x01, 0x02, 0x03, 0x01, 0xde, 0xad, 0xbe, 0xef]);
            d.extend_from_slice(&frame);
            d
        };
        peer.send_to(&geneve(0x40), "10.99.2.2:6081").unwrap();
        peer.send_to(&geneve(0), "10.99.2.2:6081").unwrap();
        assert_eq!(b.recv(WAIT).unwrap().as_deref(), Some(&frame[..]));
        assert_eq!(b.try_recv().unwrap(), None);
    })
    .await
    .unwrap();
    let counters = tunnel_counters(&conn_b).await;
    // The broadcast, 8 full-size frames and the optioned one; the critical
    // one refused.
    assert_eq!(counters.get("rx"), Some(&10), "{counters:?}");
    assert_eq!(counters.get("dropped"), Some(&1), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_carry_an_overlay_network_over_an_ipv6_underlay() {
    let t = two_nodes(3, (6001, "vxlan"), ("fd00:99:3::1", "fd00:99:3::2")).await;
    let ((sock_a, conn_a, ov_a), (sock_b, conn_b, _)) = (t.a.clone(), t.b.clone());
    // One underlay family per node: IPv4 remotes are refused while the
    // endpoint is IPv6, and link-local ones (no interface to leave by).
    let network = NetworkProxy::builder(&conn_a)
        .path(ov_a)
        .unwrap()
        .build()
        .await
        .unwrap();
    for (bad, why) in [("10.99.3.2", "other family"), ("fe80::2", "link-local")] {
        let err = network.set_remotes(&[bad]).await.unwrap_err();
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    tokio::task::spawn_blocking(move || {
        let mut a = NetFrontend::connect(Path::new(&sock_a)).unwrap();
        let mut b = NetFrontend::connect(Path::new(&sock_b)).unwrap();
        ask_and_answer(&mut a, &mut b, 6);
        // A GSO run over IPv6.
        full_size_burst(&mut a, &mut b, 16, 6);
    })
    .await
    .unwrap();
    let counters = tunnel_counters(&conn_b).await;
    assert_eq!(counters.get("rx"), Some(&17), "{counters:?}");
}
