//! Networks and ports through `org.atoll.Net1` on a real (private) bus, and
//! traffic through the ports a VM NIC would connect to.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;

use atoll_tests::contract::wait_owner;
use atoll_tests::net_frontend::NetFrontend;
use atoll_tests::TestBus;
use netd::objects::{FloatingIpProxy, PortProxy, SecurityGroupProxy, SubnetProxy, VpcProxy};
use netd::Net1Proxy;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, Value};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(bus: &TestBus, run: &Path) -> Daemon {
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_netd"))
            .args(["--node-id", "n1", "--bus", bus.address(), "--run-dir"])
            .arg(run)
            .arg("--data-dir")
            .arg(run.with_file_name("data"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A netd daemon on a bus of its own, its run directory, and a connection
/// once it owns its name.
async fn started() -> (tempfile::TempDir, TestBus, Daemon, zbus::Connection) {
    let dir = tempfile::tempdir().unwrap();
    let bus = TestBus::start();
    let d = daemon(&bus, &dir.path().join("run"));
    let conn = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .build()
        .await
        .unwrap();
    wait_owner(&conn, netd::BUS_NAME, true).await;
    (dir, bus, d, conn)
}

fn mac_bytes(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_created_over_dbus_carry_frames_and_count_them() {
    let (_dir, _bus, _d, conn) = started().await;
    let net = Net1Proxy::new(&conn).await.unwrap();

    let none = HashMap::new;
    let lan = net.create_network("lan", "flat", none()).await.unwrap();
    let err = net.create_network("lan", "flat", none()).await.unwrap_err();
    assert!(err.to_string().contains("InvalidArgument"), "{err}");
    let err = net
        .create_network("v10", "vxlan", none())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("want \"flat\", \"vlan\" or \"overlay\""),
        "{err}"
    );
    let err = net.create_network("v10", "vlan", none()).await.unwrap_err();
    assert!(err.to_string().contains("needs option"), "{err}");
    let bad = HashMap::from([("vlan", Value::from("ten"))]);
    let err = net.create_network("v10", "vlan", bad).await.unwrap_err();
    assert!(err.to_string().contains("want type q"), "{err}");
    let bad = HashMap::from([("colour", Value::from("red"))]);
    let err = net.create_network("v10", "flat", bad).await.unwrap_err();
    assert!(
        err.to_string().contains("unknown option \"colour\""),
        "{err}"
    );
    let err = net
        .create_port(&lan, "01:00:5e:00:00:01", none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a unicast"), "{err}");
    let err = net.create_port(&lan, "52:54", none()).await.unwrap_err();
    assert!(err.to_string().contains("InvalidArgument"), "{err}");
    let nowhere = ObjectPath::try_from("/org/atoll/Net1/network/99").unwrap();
    let err = net.create_port(&nowhere, "", none()).await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
    let ip = HashMap::from([("ip", Value::from("10.0.0.5"))]);
    let err = net.create_port(&lan, "", ip).await.unwrap_err();
    assert!(err.to_string().contains("has no subnet"), "{err}");

    let (p1, sock1, mac1) = net
        .create_port(&lan, "52:54:00:aa:00:01", none())
        .await
        .unwrap();
    let (_p2, sock2, mac2) = net.create_port(&lan, "", none()).await.unwrap();
    assert_eq!(mac1, "52:54:00:aa:00:01");
    assert_ne!(mac2, mac1);
    assert_eq!(mac_bytes(&mac2)[0] & 1, 0, "generated MAC is unicast");

    let (m1, m2) = (mac_bytes(&mac1), mac_bytes(&mac2));
    let frames = tokio::task::spawn_blocking(move || {
        let mut a = NetFrontend::connect(Path::new(&sock1)).unwrap();
        let mut b = NetFrontend::connect(Path::new(&sock2)).unwrap();
        assert_eq!({ b.config.mac }, m2);
        let mut f = Vec::new();
        f.extend_from_slice(&m2);
        f.extend_from_slice(&m1);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(b"through netd");
        a.send(&f).unwrap();
        let got = b.recv(Duration::from_secs(10)).unwrap();
        (f, got)
    })
    .await
    .unwrap();
    assert_eq!(frames.1.as_deref(), Some(&frames.0[..]));

    let port = uncached::<PortProxy>(&conn, p1.clone()).await;
    assert_eq!(port.network().await.unwrap(), lan);
    let c = port.counters().await.unwrap();
    assert_eq!(c.get("tx_frames"), Some(&1), "{c:?}");
    assert_eq!(c.get("tx_bytes"), Some(&(frames.0.len() as u64)), "{c:?}");

    let sock1 = port.socket().await.unwrap();
    net.delete_port(&p1).await.unwrap();
    assert!(!Path::new(&sock1).exists(), "the socket is removed");
    assert!(port.mac().await.is_err(), "the object is gone");
    let err = net.delete_port(&p1).await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
}

/// A client of the object at `path` that reads properties afresh each
/// time.
async fn uncached<P>(conn: &zbus::Connection, path: OwnedObjectPath) -> P
where
    P: From<zbus::Proxy<'static>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(conn)
        .path(path)
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpcs_subnets_ports_and_security_groups_over_dbus() {
    let (_dir, _bus, _d, conn) = started().await;
    let net = Net1Proxy::new(&conn).await.unwrap();

    let vpc = net.create_vpc("prod").await.unwrap();
    let web = net
        .create_network(
            "web",
            "flat",
            HashMap::from([("vpc", Value::from(vpc.as_ref()))]),
        )
        .await
        .unwrap();
    let err = net
        .create_subnet(&web, "10.9.0.1/24", HashMap::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("want a network prefix"), "{err}");
    let err = net
        .create_subnet(
            &web,
            "10.9.0.0/24",
            HashMap::from([("mtu", Value::from("big"))]),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("want type q"), "{err}");
    for (v6, why) in [
        ("fd00:9::/48", "/64"),
        ("fd00:9::", "/64"),
        ("nine", "like fd00:1::/64"),
    ] {
        let err = net
            .create_subnet(
                &web,
                "10.9.0.0/24",
                HashMap::from([("ipv6", Value::from(v6))]),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{v6}: {err}");
    }
    for (opts, why) in [
        (
            vec![("ipv6_mode", Value::from("dhcpv6"))],
            "ipv6_mode dhcpv6: the subnet has no ipv6 /64",
        ),
        (
            vec![
                ("ipv6", Value::from("fd00:9::/64")),
                ("ipv6_mode", Value::from("stateful")),
            ],
            "want \"slaac\" or \"dhcpv6\"",
        ),
        (
            vec![("dns", Value::from(vec!["2001:db8::53"]))],
            "an IPv6 server needs the subnet's ipv6 /64",
        ),
        (
            vec![("ipv6_snat", Value::from(true))],
            "ipv6_snat: the subnet has no ipv6 /64",
        ),
        (
            vec![
                ("ipv6", Value::from("fd00:9::/64")),
                ("dns", Value::from(vec!["ff02::1"])),
            ],
            "not a unicast address",
        ),
    ] {
        let err = net
            .create_subnet(&web, "10.9.0.0/24", opts.into_iter().collect())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    let opts = HashMap::from([
        ("domain", Value::from("prod.atoll")),
        ("dns", Value::from(vec!["1.1.1.1", "2001:db8::53"])),
        ("mtu", Value::from(1400u16)),
        ("ipv6", Value::from("fd00:9::/64")),
        ("ipv6_mode", Value::from("dhcpv6")),
        ("ipv6_snat", Value::from(true)),
    ]);
    let subnet = net.create_subnet(&web, "10.9.0.0/24", opts).await.unwrap();
    let err = net
        .create_subnet(&web, "10.8.0.0/24", HashMap::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has a subnet"), "{err}");
    let s = uncached::<SubnetProxy>(&conn, subnet).await;
    assert_eq!(s.cidr().await.unwrap(), "10.9.0.0/24");
    assert_eq!(s.gateway().await.unwrap(), "10.9.0.1");
    assert_eq!(s.ipv6().await.unwrap(), "fd00:9::/64");
    assert_eq!(s.ipv6_mode().await.unwrap(), "dhcpv6");
    assert!(s.ipv6_snat().await.unwrap());
    assert_eq!(s.dns6().await.unwrap(), ["fd00:9::1", "2001:db8::53"]);
    // One data-path thread here (netd's default on this machine's CPUs, or
    // what the test daemon was given), polling no ring yet.
    // The test daemon forwards to the host's resolvers, if it has any.
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let host: Vec<String> = netd::dnsfwd::nameservers(&conf)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(net.dns_upstreams().await.unwrap(), host);
    let rings = net.datapath_rings().await.unwrap();
    assert!(
        !rings.is_empty() && rings.iter().all(|n| *n == 0),
        "{rings:?}"
    );

    // Port forwards of the VPC's gateway address.
    let router = uncached::<VpcProxy>(&conn, vpc.clone()).await;
    let err = router
        .add_port_forward("tcp", 8080, "10.9.0.20", 80)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no gateway"), "{err}");
    let ext = net
        .create_network("ext", "flat", HashMap::new())
        .await
        .unwrap();
    net.create_subnet(
        &ext,
        "192.0.2.0/24",
        HashMap::from([("external", Value::from(true))]),
    )
    .await
    .unwrap();
    assert_eq!(router.set_gateway(&ext, "").await.unwrap(), "192.0.2.2");

    // A floating IP's QoS and counters.
    let (fip, fip_ip) = net.create_floating_ip(&ext, "").await.unwrap();
    assert_eq!(fip_ip, "192.0.2.3");
    let fip = uncached::<FloatingIpProxy>(&conn, fip).await;
    assert_eq!(fip.qos().await.unwrap(), (0, 0, 0, 0), "no limits at first");
    let err = fip.set_qos(10, 16, 0, 0).await.unwrap_err();
    assert!(err.to_string().contains("at least 64"), "{err}");
    fip.set_qos(1000, 64, 2000, 128).await.unwrap();
    assert_eq!(fip.qos().await.unwrap(), (1000, 64, 2000, 128));
    let counters = fip.counters().await.unwrap();
    assert_eq!(counters.get("rx_policed"), Some(&0), "{counters:?}");
    assert_eq!(counters.len(), 6, "{counters:?}");
    net.delete_floating_ip(&fip.inner().path().to_owned())
        .await
        .unwrap();
    let web_fwd = router
        .add_port_forward("tcp", 8080, "10.9.0.20", 80)
        .await
        .unwrap();
    for (args, why) in [
        (("tcp", 8080, "10.9.0.21", 80), "forwarded already"),
        (("tcp", 8081, "10.9.0.20", 80), "has a forward already"),
        (("sctp", 8082, "10.9.0.20", 80), "want tcp or udp"),
        (("udp", 0, "10.9.0.20", 80), "1-65535"),
        (("udp", 8083, "10.10.0.20", 80), "none of the VPC's subnets"),
        (("udp", 8083, "web", 80), "not an IPv4 address"),
    ] {
        let err = router
            .add_port_forward(args.0, args.1, args.2, args.3)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{args:?}: {err}");
    }
    // The same ports over UDP are another forward.
    let dns_fwd = router
        .add_port_forward("udp", 8080, "10.9.0.20", 80)
        .await
        .unwrap();
    assert_eq!(
        router.port_forwards().await.unwrap(),
        vec![
            (web_fwd, "tcp".into(), 8080, "10.9.0.20".into(), 80),
            (dns_fwd, "udp".into(), 8080, "10.9.0.20".into(), 80),
        ]
    );
    router.remove_port_forward(web_fwd).await.unwrap();
    let err = router.remove_port_forward(web_fwd).await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
    assert_eq!(router.port_forwards().await.unwrap().len(), 1);

    // Peering with another VPC, whose object hears of it too.
    let lab = net.create_vpc("lab").await.unwrap();
    let lab_vpc = VpcProxy::builder(&conn)
        .path(lab.clone())
        .unwrap()
        .build()
        .await
        .unwrap();
    assert!(lab_vpc.peers().await.unwrap().is_empty());
    let mut heard = lab_vpc.receive_peers_changed().await;
    router.peer(&lab).await.unwrap();
    // The stream may first give the value cached before the change.
    let signalled = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(c) = heard.next().await {
            if c.get().await.unwrap() == vec![vpc.clone()] {
                return;
            }
        }
    });
    signalled.await.expect("the other VPC signals its new peer");
    assert_eq!(router.peers().await.unwrap(), vec![lab.clone()]);
    let err = router.peer(&vpc).await.unwrap_err();
    assert!(err.to_string().contains("itself"), "{err}");
    router.unpeer(&lab).await.unwrap();
    let err = router.unpeer(&lab).await.unwrap_err();
    assert!(err.to_string().contains("not peered"), "{err}");
    router.peer(&lab).await.unwrap();

    let sg = net.create_security_group("www").await.unwrap();
    let group = uncached::<SecurityGroupProxy>(&conn, sg.clone()).await;
    let rules = group.rules().await.unwrap();
    assert_eq!(rules.len(), 1, "a new group lets anything out: {rules:?}");
    assert_eq!(
        (rules[0].1.as_str(), rules[0].2.as_str()),
        ("egress", "any")
    );
    let http = group
        .add_rule("ingress", "tcp", 80, 443, "", "")
        .await
        .unwrap();
    let err = group
        .add_rule("ingress", "tcp", 90, 80, "", "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("above the last"), "{err}");
    let err = group
        .add_rule(
            "ingress",
            "any",
            0,
            0,
            "",
            "/org/atoll/Net1/security_group/77",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
    let ssh = group
        .add_rule("ingress", "tcp", 22, 22, "192.168.0.0/16", "")
        .await
        .unwrap();
    let rules = group.rules().await.unwrap();
    assert!(rules.contains(&(
        ssh,
        "ingress".into(),
        "tcp".into(),
        22,
        22,
        "192.168.0.0/16".into(),
        String::new()
    )));
    group.remove_rule(http).await.unwrap();
    assert!(group.remove_rule(http).await.is_err());

    // A chosen IPv6 address must be a host of the /64 (a refused one leaves
    // no port behind: its IPv4 address is free again).
    for (v6, why) in [
        ("fd00:9::1", "the router's"),
        ("fd00:8::7", "not in the subnet's"),
        ("seven", "not an IPv6 address"),
    ] {
        let opts = HashMap::from([("ip", Value::from("10.9.0.7")), ("ipv6", Value::from(v6))]);
        let err = net.create_port(&web, "", opts).await.unwrap_err();
        assert!(err.to_string().contains(why), "{v6}: {err}");
    }
    let opts = HashMap::from([
        ("ip", Value::from("10.9.0.7")),
        ("ipv6", Value::from("fd00:9::7")),
        ("name", Value::from("www1")),
        ("security_groups", Value::from(vec![sg.as_ref()])),
    ]);
    let (p, _, _) = net.create_port(&web, "", opts).await.unwrap();
    let err = net
        .create_port(&web, "", HashMap::from([("ip", Value::from("10.9.0.7"))]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    let port = uncached::<PortProxy>(&conn, p).await;
    assert_eq!(port.ip().await.unwrap(), "10.9.0.7");
    let v6 = port.ipv6_addresses().await.unwrap();
    assert_eq!(v6.len(), 2);
    assert!(
        v6[0].starts_with("fe80::") && v6[1] == "fd00:9::7",
        "{v6:?}"
    );
    assert_eq!(port.name().await.unwrap(), "www1");
    assert_eq!(port.security_groups().await.unwrap(), vec![sg.clone()]);
    let err = net.delete_security_group(&sg).await.unwrap_err();
    assert!(err.to_string().contains("has ports"), "{err}");
    let default = ObjectPath::try_from("/org/atoll/Net1/security_group/1").unwrap();
    port.set_security_groups(std::slice::from_ref(&default))
        .await
        .unwrap();
    assert_eq!(port.security_groups().await.unwrap(), vec![default.into()]);
    net.delete_security_group(&sg).await.unwrap();
    assert!(group.name().await.is_err(), "the group is gone");

    // A network goes only once its ports have; its subnet goes with it, and
    // its name and range can be used again.
    let err = net.delete_network(&web).await.unwrap_err();
    assert!(err.to_string().contains("has ports"), "{err}");
    net.delete_port(&port.inner().path().to_owned())
        .await
        .unwrap();
    net.delete_network(&web).await.unwrap();
    assert!(s.cidr().await.is_err(), "the subnet object is gone");
    let err = net.delete_network(&web).await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
    let again = net
        .create_network(
            "web",
            "flat",
            HashMap::from([("vpc", Value::from(vpc.as_ref()))]),
        )
        .await
        .unwrap();
    net.create_subnet(&again, "10.9.0.0/24", HashMap::new())
        .await
        .unwrap();

    // A VPC goes once its networks have.
    let err = net.delete_vpc(&vpc).await.unwrap_err();
    assert!(err.to_string().contains("has networks"), "{err}");
    net.delete_network(&again).await.unwrap();
    net.delete_vpc(&vpc).await.unwrap();
    let lab_now = uncached::<VpcProxy>(&conn, lab.clone()).await;
    assert!(
        lab_now.peers().await.unwrap().is_empty(),
        "the peering went with the VPC"
    );
    let gone = uncached::<VpcProxy>(&conn, vpc.clone()).await;
    assert!(
        gone.gateway_address().await.is_err(),
        "the VPC object is gone"
    );
    let err = net.delete_vpc(&vpc).await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_addresses_are_never_handed_out() {
    let (_dir, _bus, _d, conn) = started().await;
    let net = Net1Proxy::new(&conn).await.unwrap();
    let lab = net
        .create_network("lab", "flat", HashMap::new())
        .await
        .unwrap();
    for (bad, why) in [
        ("10.20.0.9-10.20.0.2", "want 192.0.2.5"),
        ("10.20.0.0/33", "want 192.0.2.5"),
        ("10.21.0.1", "outside 10.20.0.0/24"),
    ] {
        let opts = HashMap::from([("reserved", Value::from(vec![bad]))]);
        let err = net
            .create_subnet(&lab, "10.20.0.0/24", opts)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    let opts = HashMap::from([(
        "reserved",
        Value::from(vec!["10.20.0.2-10.20.0.9", "10.20.0.128/25"]),
    )]);
    let subnet = net.create_subnet(&lab, "10.20.0.0/24", opts).await.unwrap();
    let s = uncached::<SubnetProxy>(&conn, subnet).await;
    assert_eq!(
        s.reserved().await.unwrap(),
        ["10.20.0.2-10.20.0.9", "10.20.0.128-10.20.0.255"]
    );
    let port_ip = |path: OwnedObjectPath| {
        let conn = conn.clone();
        async move { uncached::<PortProxy>(&conn, path).await.ip().await.unwrap() }
    };
    // The first free address past the reserved ones; a reserved one is
    // not given even when asked for.
    let (p, _, _) = net.create_port(&lab, "", HashMap::new()).await.unwrap();
    assert_eq!(port_ip(p).await, "10.20.0.10");
    let asked = HashMap::from([("ip", Value::from("10.20.0.5"))]);
    let err = net.create_port(&lab, "", asked).await.unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    // Reserving what a port holds is refused; other ranges replace the old
    // ones online.
    for (bad, why) in [("10.20.0.10", "in use"), ("nine", "want 192.0.2.5")] {
        let err = s.set_reserved(&[bad]).await.unwrap_err();
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    s.set_reserved(&["10.20.0.11-10.20.0.20"]).await.unwrap();
    assert_eq!(s.reserved().await.unwrap(), ["10.20.0.11-10.20.0.20"]);
    let (p, _, _) = net.create_port(&lab, "", HashMap::new()).await.unwrap();
    assert_eq!(port_ip(p).await, "10.20.0.2");
}

/// Every object below `/org/atoll/Net1` with its settings (all properties
/// but traffic counts).
async fn everything(
    conn: &zbus::Connection,
) -> std::collections::BTreeMap<String, Vec<(String, String)>> {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(netd::BUS_NAME)
        .unwrap()
        .path(netd::OBJECT_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    om.get_managed_objects()
        .await
        .unwrap()
        .into_iter()
        .map(|(path, ifaces)| {
            let mut props: Vec<(String, String)> = ifaces
                .into_iter()
                .flat_map(|(i, p)| {
                    p.into_iter()
                        // Traffic counts start again with the process.
                        .filter(|(k, _)| k != "Counters" && k != "Connections")
                        .map(move |(k, v)| (format!("{i}.{k}"), format!("{v:?}")))
                })
                .collect();
            props.sort();
            (path.to_string(), props)
        })
        // Not the empty nodes above the objects (zbus keeps one after its
        // last object is removed).
        .filter(|(_, props)| !props.is_empty())
        .collect()
}

/// Kills netd (SIGKILL: nothing is flushed on the way out), starts it
/// again on the same directories, and checks that every object and
/// property came back as they were.
async fn restarted(conn: &zbus::Connection, bus: &TestBus, dir: &Path, d: &mut Daemon) {
    let before = everything(conn).await;
    let _ = d.0.kill();
    let _ = d.0.wait();
    wait_owner(conn, netd::BUS_NAME, false).await;
    *d = daemon(bus, &dir.join("run"));
    wait_owner(conn, netd::BUS_NAME, true).await;
    assert_eq!(
        everything(conn).await,
        before,
        "every object and property as before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netd_killed_and_started_again_has_everything_it_was_told() {
    let (dir, bus, mut d, conn) = started().await;
    let net = Net1Proxy::new(&conn).await.unwrap();
    let v = |s: &'static str| Value::from(s);

    // Security groups: rules naming another group, one removed (its id
    // must not come back), one added to the default group.
    let web = net.create_security_group("web").await.unwrap();
    let g = uncached::<SecurityGroupProxy>(&conn, web.clone()).await;
    g.add_rule("ingress", "tcp", 22, 22, "10.0.0.0/8", "")
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let gone = g.add_rule("ingress", "udp", 53, 53, "", "").await.unwrap();
    g.add_rule("ingress", "any", 0, 0, "", web.as_str())
        .await
        .unwrap();
    g.remove_rule(gone).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let default = OwnedObjectPath::try_from("/org/atoll/Net1/security_group/1").unwrap();
    let dg = uncached::<SecurityGroupProxy>(&conn, default.clone()).await;
    dg.add_rule("ingress", "icmp", 0, 0, "", "").await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;

    // VPCs, an external network, a VPC network with a dual-stack subnet,
    // an overlay with a remote, a gateway, a peering, a port forward.
    let vpc = net.create_vpc("prod").await.unwrap();
    let other = net.create_vpc("dev").await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let ext = net
        .create_network("ext", "flat", HashMap::new())
        .await
        .unwrap();
    let ext_sub = net
        .create_subnet(
            &ext,
            "192.0.2.0/24",
            HashMap::from([("external", Value::from(true))]),
        )
        .await
        .unwrap();
    uncached::<SubnetProxy>(&conn, ext_sub)
        .await
        .set_reserved(&["192.0.2.2-192.0.2.9"])
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let lan = net
        .create_network(
            "lan",
            "flat",
            HashMap::from([("vpc", Value::from(vpc.as_ref()))]),
        )
        .await
        .unwrap();
    net.create_subnet(
        &lan,
        "10.1.0.0/24",
        HashMap::from([
            ("dns", Value::from(vec!["192.0.2.53"])),
            ("domain", v("lab")),
            ("mtu", Value::from(1400u16)),
            ("ipv6", v("fd00:1::/64")),
            ("ipv6_mode", v("dhcpv6")),
        ]),
    )
    .await
    .unwrap();
    let ov = net
        .create_network(
            "ov",
            "overlay",
            HashMap::from([("vni", Value::from(77u32))]),
        )
        .await
        .unwrap();
    uncached::<netd::objects::NetworkProxy>(&conn, ov)
        .await
        .set_remotes(&["198.51.100.7"])
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let vp = uncached::<VpcProxy>(&conn, vpc.clone()).await;
    let gw = vp.set_gateway(&ext, "").await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    vp.peer(&other).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    vp.add_port_forward("tcp", 2222, "10.1.0.10", 22)
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;

    // Ports: options, metadata, QoS, a mirror; one deleted (its id is not
    // handed out again).
    let opts = HashMap::from([
        ("ip", v("10.1.0.10")),
        ("name", v("web1")),
        ("security_groups", Value::from(vec![web.as_ref()])),
        ("allowed_addresses", Value::from(vec!["10.1.0.200"])),
        ("ipv6", v("fd00:1::1234")),
    ]);
    let (p1, sock1, mac1) = net.create_port(&lan, "", opts).await.unwrap();
    let (p2, sock2, mac2) = net.create_port(&lan, "", HashMap::new()).await.unwrap();
    let (p3, _, _) = net.create_port(&lan, "", HashMap::new()).await.unwrap();
    net.delete_port(&p3).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let port1 = uncached::<PortProxy>(&conn, p1.clone()).await;
    port1
        .set_metadata(b"#cloud-config\n", &["ssh-ed25519 AAAAC3 k"])
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    port1.set_qos(10_000, 64, 20_000, 128).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    port1.set_mirror(&p2).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let (fip, fip_ip) = net.create_floating_ip(&ext, "").await.unwrap();
    let f = uncached::<FloatingIpProxy>(&conn, fip).await;
    f.associate(&p1).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    f.set_qos(5_000, 32, 6_000, 32).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;

    let before = everything(&conn).await;
    assert!(before.len() >= 12, "{before:#?}");
    restarted(&conn, &bus, dir.path(), &mut d).await;
    assert!(gw.starts_with("192.0.2.") && fip_ip.starts_with("192.0.2."));

    // New objects get fresh ids: not the deleted port's, not a rule's.
    let (p4, _, _) = net.create_port(&lan, "", HashMap::new()).await.unwrap();
    assert_ne!(p4, p3);
    assert!(!before.contains_key(p4.as_str()), "{p4}");
    let g = uncached::<SecurityGroupProxy>(&conn, web).await;
    let next_rule = g.add_rule("egress", "tcp", 80, 80, "", "").await.unwrap();
    assert!(next_rule > gone, "rule id {next_rule} after {gone}");

    // The ports work where they were: same sockets, MACs, addresses; the
    // router answers the restored port at the restored gateway.
    let (m1, m2) = (mac_bytes(&mac1), mac_bytes(&mac2));
    tokio::task::spawn_blocking(move || {
        let mut a = NetFrontend::connect(Path::new(&sock1)).unwrap();
        let mut b = NetFrontend::connect(Path::new(&sock2)).unwrap();
        assert_eq!({ a.config.mac }, m1);
        assert_eq!({ b.config.mac }, m2);
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&m1);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&m1);
        arp.extend_from_slice(&[10, 1, 0, 10]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 1, 0, 1]);
        a.send(&arp).unwrap();
        let reply = a.recv(Duration::from_secs(5)).unwrap().expect("ARP reply");
        assert_eq!(&reply[0..6], &m1, "to the port");
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(&reply[28..32], &[10, 1, 0, 1], "from the gateway");
        // The mirror came back too: the port's frames are copied to p2.
        let copy = b.recv(Duration::from_secs(5)).unwrap().expect("mirrored");
        assert_eq!(&copy[6..12], &m1);
    })
    .await
    .unwrap();

    // Undoing is kept too.
    f.disassociate().await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    vp.unpeer(&other).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let forwards = vp.port_forwards().await.unwrap();
    vp.remove_port_forward(forwards[0].0).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    port1
        .set_security_groups(&[default.as_ref()])
        .await
        .unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    net.delete_floating_ip(f.inner().path()).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    net.delete_vpc(&other).await.unwrap();
    restarted(&conn, &bus, dir.path(), &mut d).await;
    assert!(!everything(&conn).await.contains_key(other.as_str()));
    // The mirror target goes: the mirroring with it, nothing left dangling
    // to fail the next restore.
    net.delete_port(&p2).await.unwrap();
    assert_eq!(port1.mirror().await.unwrap().as_str(), "/");
    restarted(&conn, &bus, dir.path(), &mut d).await;
    let health = Net1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
        .health_detail()
        .await
        .unwrap();
    assert!(!health.contains("did not come back"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_database_stops_netd_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("netd.db"),
        b"this is not a database, it is a poem",
    )
    .unwrap();
    let bus = TestBus::start();
    let out = Command::new(env!("CARGO_BIN_EXE_netd"))
        .args(["--node-id", "n1", "--bus", bus.address(), "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("saved configuration"), "{err}");
    assert!(err.contains("netd.db"), "{err}");
    assert_eq!(
        std::fs::read(data.join("netd.db")).unwrap(),
        b"this is not a database, it is a poem",
        "the file is left for the operator"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_row_is_left_out_and_netd_says_so() {
    let (dir, bus, mut d, conn) = started().await;
    let net = Net1Proxy::new(&conn).await.unwrap();
    let vpc = net.create_vpc("prod").await.unwrap();
    let _ = d.0.kill();
    let _ = d.0.wait();
    wait_owner(&conn, netd::BUS_NAME, false).await;
    let db = rusqlite::Connection::open(dir.path().join("data/netd.db")).unwrap();
    db.execute(
        "INSERT INTO objects (key, value) VALUES ('port/9', '{\"id\": 9, \"network\"')",
        [],
    )
    .unwrap();
    drop(db);

    let _d = daemon(&bus, &dir.path().join("run"));
    wait_owner(&conn, netd::BUS_NAME, true).await;
    let net = Net1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(net.health().await.unwrap(), "degraded");
    let detail = net.health_detail().await.unwrap();
    assert!(detail.contains("1 saved objects"), "{detail}");
    assert!(
        everything(&conn).await.contains_key(vpc.as_str()),
        "the rest came back"
    );
    assert!(dir.path().join("data/netd-unrestored.db").exists());
}
