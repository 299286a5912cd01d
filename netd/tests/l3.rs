//! Subnets, the distributed gateway, routing inside a VPC, isolation
//! between VPCs, DNS and security groups, through real vhost-user-net
//! frontends on the ports (as VM NICs). Where a frame must not arrive, a
//! marker frame sent after it on the same path must arrive first: the switch
//! handles a port's frames in order, so no waiting on a clock.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::fabric::{Fabric, Kind, PortEntry, SubnetSettings};
use netd::flow::{
    ipv4_header, link_local, multicast_mac, slaac, solicited_node, udp_frame, Packet,
    ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, TCP_ACK, TCP_FIN, TCP_SYN,
};
use netd::frame::{
    checksum, Arp, Ethernet, Ipv4, Ipv6, Mac, ARP_REPLY, ARP_REQUEST, BROADCAST, ETHERTYPE_IPV6,
};
use netd::secgroup::{GroupId, Rule};

const WAIT: Duration = Duration::from_secs(10);

fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = ipv4_header(src, dst, proto, payload.len()).to_vec();
    p.extend_from_slice(payload);
    p
}

fn ping(from: &Vm, dst_mac: Mac, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&[0, 1]);
    icmp.extend_from_slice(b"atoll ping");
    let s = checksum(&icmp);
    icmp[2..4].copy_from_slice(&s.to_be_bytes());
    eth(
        dst_mac,
        from.mac,
        0x0800,
        &ip(from.ip, dst, PROTO_ICMP, &icmp),
    )
}

fn tcp(from: &Vm, dst_mac: Mac, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    eth(dst_mac, from.mac, 0x0800, &ip(from.ip, dst, PROTO_TCP, &t))
}

fn arp_request(from: &Vm, target: Ipv4Addr) -> Vec<u8> {
    Arp {
        op: ARP_REQUEST,
        sha: from.mac,
        spa: from.ip,
        tha: [0; 6],
        tpa: target,
    }
    .to_frame(BROADCAST)
}

/// A VM NIC on a port.
struct Vm {
    fe: NetFrontend,
    port: PortEntry,
    mac: Mac,
    ip: Ipv4Addr,
}

impl Vm {
    fn new(port: PortEntry) -> Self {
        let fe = NetFrontend::connect(&port.port.socket).unwrap();
        let mac = port.port.mac;
        let ip = port.port.security().ip.unwrap();
        Self { fe, port, mac, ip }
    }

    fn send(&mut self, f: &[u8]) {
        self.fe.send(f).unwrap();
    }

    fn recv(&mut self) -> Vec<u8> {
        self.fe.recv(WAIT).unwrap().expect("a frame")
    }

    /// The next IPv4 packet's (source MAC, TTL, transport view).
    fn recv_ip(&mut self) -> (Mac, u8, Packet) {
        let f = self.recv();
        let e = Ethernet::parse(&f).unwrap();
        assert_eq!(e.dst, self.mac, "addressed to this VM");
        let i = Ipv4::parse(e.payload).unwrap();
        (e.src, i.ttl, Packet::of(&i).unwrap())
    }

    fn counter(&self, name: &str) -> u64 {
        let s = &self.port.port.stats;
        match name {
            "tx_filtered" => s.tx_filtered.load(Ordering::Relaxed),
            "rx_filtered" => s.rx_filtered.load(Ordering::Relaxed),
            "tx_dropped" => s.tx_dropped.load(Ordering::Relaxed),
            "tx_service_dropped" => s.tx_service_dropped.load(Ordering::Relaxed),
            _ => panic!("{name}"),
        }
    }
}

/// Sends `frame` from `tx` (which must not reach `rx`), then an ARP request
/// `rx` must get: it has to be the next frame `rx` sees.
fn assert_blocked(tx: &mut Vm, rx: &mut Vm, frame: &[u8]) {
    tx.send(frame);
    let marker = Arp {
        op: ARP_REQUEST,
        sha: tx.mac,
        spa: tx.ip,
        tha: [0; 6],
        tpa: rx.ip,
    }
    .to_frame(rx.mac);
    tx.send(&marker);
    assert_eq!(
        rx.recv(),
        marker,
        "the blocked frame did not arrive before the marker"
    );
}

struct World {
    _dir: tempfile::TempDir,
    fabric: Fabric,
    prod: u32,
    lab: u32,
    web: u32,
    db: u32,
    other: u32,
}

/// VPC "prod" with networks web (10.1.0.0/24, fd00:1::/64) and db
/// (10.2.0.0/24, fd00:2::/64); VPC "lab" with network other (10.2.0.0/24
/// again, no IPv6).
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let fabric = Fabric::new(dir.path().to_owned()).unwrap();
    let prod = fabric.create_vpc("prod").unwrap();
    let lab = fabric.create_vpc("lab").unwrap();
    let web = fabric
        .create_network("web", Kind::Flat, Some(prod), false)
        .unwrap();
    let db = fabric
        .create_network("db", Kind::Flat, Some(prod), false)
        .unwrap();
    let other = fabric
        .create_network("other", Kind::Flat, Some(lab), false)
        .unwrap();
    let domain = |d: &str| SubnetSettings {
        domain: d.into(),
        ..SubnetSettings::default()
    };
    let dual = |d: &str, v6: &str| SubnetSettings {
        ipv6: Some((v6.parse().unwrap(), 64)),
        ..domain(d)
    };
    fabric
        .create_subnet(web, "10.1.0.0/24", dual("prod.atoll", "fd00:1::"))
        .unwrap();
    fabric
        .create_subnet(db, "10.2.0.0/24", dual("prod.atoll", "fd00:2::"))
        .unwrap();
    fabric
        .create_subnet(other, "10.2.0.0/24", domain("lab.atoll"))
        .unwrap();
    World {
        _dir: dir,
        fabric,
        prod,
        lab,
        web,
        db,
        other,
    }
}

impl World {
    fn vm(&self, network: u32, name: &str, groups: Option<Vec<GroupId>>) -> Vm {
        Vm::new(
            self.fabric
                .create_port(network, None, None, name, groups)
                .unwrap(),
        )
    }

    fn gateway_mac(&self, network: u32) -> Mac {
        let n = self.fabric.network(network).unwrap();
        self.fabric
            .subnet(n.subnet.unwrap())
            .unwrap()
            .subnet
            .gateway_mac
    }
}

#[test]
fn two_ports_exchange_arp_and_icmp_and_the_gateway_answers() {
    let w = world();
    let mut a = w.vm(w.web, "web1", None);
    let mut b = w.vm(w.web, "web2", None);
    assert_eq!(a.ip, Ipv4Addr::new(10, 1, 0, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 1, 0, 3));

    // ARP between the two: the request floods, the reply comes back.
    a.send(&arp_request(&a, b.ip));
    let got = b.recv();
    let req = Arp::parse(&got[14..]).unwrap();
    assert_eq!((req.op, req.spa, req.tpa), (ARP_REQUEST, a.ip, b.ip));
    b.send(&req.reply_from(b.mac).to_frame(a.mac));
    let reply = Arp::parse(&a.recv()[14..]).unwrap();
    assert_eq!((reply.op, reply.sha, reply.spa), (ARP_REPLY, b.mac, b.ip));

    // Ping and its reply (both in the default group: members reach each other).
    a.send(&ping(&a, b.mac, b.ip, 7));
    let (src, _, p) = b.recv_ip();
    assert_eq!(
        (src, p.icmp_type, p.flow.src),
        (a.mac, Some(ICMP_ECHO_REQUEST), a.ip)
    );
    let mut echo = vec![ICMP_ECHO_REPLY, 0, 0, 0, 0, 7, 0, 1];
    let s = checksum(&echo);
    echo[2..4].copy_from_slice(&s.to_be_bytes());
    b.send(&eth(
        a.mac,
        b.mac,
        0x0800,
        &ip(b.ip, a.ip, PROTO_ICMP, &echo),
    ));
    let (_, _, p) = a.recv_ip();
    assert_eq!(p.icmp_type, Some(ICMP_ECHO_REPLY));

    // The gateway answers ARP and ping itself.
    let gw = Ipv4Addr::new(10, 1, 0, 1);
    a.send(&arp_request(&a, gw));
    let r = Arp::parse(&a.recv()[14..]).unwrap();
    assert_eq!((r.op, r.sha, r.spa), (ARP_REPLY, w.gateway_mac(w.web), gw));
    a.send(&ping(&a, r.sha, gw, 8));
    let (src, _, p) = a.recv_ip();
    assert_eq!(
        (src, p.flow.src, p.icmp_type),
        (r.sha, gw, Some(ICMP_ECHO_REPLY))
    );
}

#[test]
fn subnets_of_a_vpc_route_and_other_vpcs_stay_apart() {
    let w = world();
    let mut a = w.vm(w.web, "web1", None);
    let mut c = w.vm(w.db, "db1", None);
    let mut d = w.vm(w.other, "lab1", None);
    assert_eq!(c.ip, d.ip, "the two VPCs use the same range");

    // web -> db through the gateway: new MACs, one hop less.
    a.send(&ping(&a, w.gateway_mac(w.web), c.ip, 1));
    let (src, ttl, p) = c.recv_ip();
    assert_eq!((src, ttl, p.flow.src), (w.gateway_mac(w.db), 63, a.ip));
    let mut echo = vec![ICMP_ECHO_REPLY, 0, 0, 0, 0, 1, 0, 1];
    let s = checksum(&echo);
    echo[2..4].copy_from_slice(&s.to_be_bytes());
    c.send(&eth(
        w.gateway_mac(w.db),
        c.mac,
        0x0800,
        &ip(c.ip, a.ip, PROTO_ICMP, &echo),
    ));
    let (src, _, p) = a.recv_ip();
    assert_eq!(
        (src, p.icmp_type, p.flow.src),
        (w.gateway_mac(w.web), Some(ICMP_ECHO_REPLY), c.ip)
    );

    // lab's VM cannot reach prod's: no route, counted; then its own
    // gateway's answer shows the frame was handled.
    d.send(&ping(&d, w.gateway_mac(w.other), a.ip, 2));
    d.send(&ping(
        &d,
        w.gateway_mac(w.other),
        Ipv4Addr::new(10, 2, 0, 1),
        3,
    ));
    let (_, _, p) = d.recv_ip();
    assert_eq!(p.flow.src, Ipv4Addr::new(10, 2, 0, 1));
    assert_eq!(d.counter("tx_dropped"), 1);
    assert!(a.fe.try_recv().unwrap().is_none(), "nothing crossed VPCs");
    // Nor does prod's gateway address answer there.
    d.send(&ping(
        &d,
        w.gateway_mac(w.other),
        Ipv4Addr::new(10, 1, 0, 1),
        4,
    ));
    d.send(&ping(
        &d,
        w.gateway_mac(w.other),
        Ipv4Addr::new(10, 2, 0, 1),
        5,
    ));
    let (_, _, p) = d.recv_ip();
    assert_eq!(p.flow.sport, 5);
}

#[test]
fn peered_vpcs_route_to_each_other_and_no_further() {
    let w = world();
    let f = &w.fabric;
    let (prod, lab) = (w.prod, w.lab);
    let err = f.peer_vpcs(prod, lab).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    let ops = f.create_vpc("ops").unwrap();
    let tools = f
        .create_network("tools", Kind::Flat, Some(ops), false)
        .unwrap();
    f.create_subnet(tools, "10.3.0.0/24", SubnetSettings::default())
        .unwrap();
    let mut a = w.vm(w.web, "web1", None);
    let mut t = w.vm(tools, "tool1", None);
    let mut d = w.vm(w.other, "lab1", None);

    // Not peered: no route.
    a.send(&ping(&a, w.gateway_mac(w.web), t.ip, 1));
    a.send(&ping(
        &a,
        w.gateway_mac(w.web),
        Ipv4Addr::new(10, 1, 0, 1),
        2,
    ));
    let (_, _, p) = a.recv_ip();
    assert_eq!((p.flow.src, p.flow.sport), (Ipv4Addr::new(10, 1, 0, 1), 2));
    assert_eq!(a.counter("tx_dropped"), 1);

    // Peered: routed both ways, as within a VPC.
    f.peer_vpcs(ops, prod).unwrap();
    assert_eq!(f.vpc_peers(prod), vec![ops]);
    let err = f.peer_vpcs(prod, ops).unwrap_err();
    assert!(err.to_string().contains("peered already"), "{err}");
    a.send(&ping(&a, w.gateway_mac(w.web), t.ip, 3));
    let (src, ttl, p) = t.recv_ip();
    assert_eq!((src, ttl, p.flow.src), (w.gateway_mac(tools), 63, a.ip));
    let mut echo = vec![ICMP_ECHO_REPLY, 0, 0, 0, 0, 3, 0, 1];
    let s = checksum(&echo);
    echo[2..4].copy_from_slice(&s.to_be_bytes());
    t.send(&eth(
        w.gateway_mac(tools),
        t.mac,
        0x0800,
        &ip(t.ip, a.ip, PROTO_ICMP, &echo),
    ));
    let (src, _, p) = a.recv_ip();
    assert_eq!(
        (src, p.icmp_type, p.flow.src),
        (w.gateway_mac(w.web), Some(ICMP_ECHO_REPLY), t.ip)
    );
    // A peer's subnets may not overlap the VPC's.
    let spare = f
        .create_network("spare", Kind::Flat, Some(ops), false)
        .unwrap();
    let err = f
        .create_subnet(spare, "10.1.0.128/25", SubnetSettings::default())
        .unwrap_err();
    assert!(err.to_string().contains("a peered VPC"), "{err}");

    // Not transitive: lab peers with ops, yet does not reach prod.
    f.peer_vpcs(lab, ops).unwrap();
    d.send(&ping(&d, w.gateway_mac(w.other), a.ip, 4));
    d.send(&ping(&d, w.gateway_mac(w.other), t.ip, 5));
    let (_, _, p) = t.recv_ip();
    assert_eq!((p.flow.src, p.flow.sport), (d.ip, 5));
    assert_eq!(d.counter("tx_dropped"), 1);
    assert!(a.fe.try_recv().unwrap().is_none(), "nothing crossed");

    // Parted: no route again. A deleted VPC takes its peerings along.
    f.unpeer_vpcs(prod, ops).unwrap();
    assert!(f.unpeer_vpcs(prod, ops).is_err());
    a.send(&ping(&a, w.gateway_mac(w.web), t.ip, 6));
    a.send(&ping(
        &a,
        w.gateway_mac(w.web),
        Ipv4Addr::new(10, 1, 0, 1),
        7,
    ));
    let (_, _, p) = a.recv_ip();
    assert_eq!(p.flow.sport, 7);
    assert_eq!(a.counter("tx_dropped"), 2);
    f.delete_port(t.port.port.id.0).unwrap();
    drop(t);
    f.delete_network(tools).unwrap();
    f.delete_network(spare).unwrap();
    f.delete_vpc(ops).unwrap();
    assert!(f.vpc_peers(lab).is_empty());
}

fn dns_query(id: u16, name: &str, qtype: u8) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        m.push(u8::try_from(l.len()).unwrap());
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, qtype, 0, 1]);
    m
}

#[test]
fn the_gateway_resolves_vm_names_of_the_vpc() {
    let w = world();
    let mut a = w.vm(w.web, "web1", None);
    let c = w.vm(w.db, "db1", None);
    let _d = w.vm(w.other, "lab1", None);
    let gw = Ipv4Addr::new(10, 1, 0, 1);
    let mut ask_type = |name: &str, qtype: u8| {
        let q = udp_frame(
            a.mac,
            w.gateway_mac(w.web),
            a.ip,
            gw,
            40000,
            53,
            &dns_query(9, name, qtype),
        );
        a.send(&q);
        let f = a.recv();
        let e = Ethernet::parse(&f).unwrap();
        let i = Ipv4::parse(e.payload).unwrap();
        assert_eq!((i.src, &i.payload[0..2]), (gw, &53u16.to_be_bytes()[..]));
        i.payload[8..].to_vec()
    };
    // AAAA: the address db1 forms in its subnet's /64.
    let r = ask_type("db1", 28);
    let db6 = slaac("fd00:2::".parse().unwrap(), c.mac);
    assert_eq!((r[7], &r[r.len() - 16..]), (1, &db6.octets()[..]));
    let mut ask = |name: &str| ask_type(name, 1);
    let r = ask("db1.prod.atoll");
    assert_eq!((r[3] & 0x0f, &r[r.len() - 4..]), (0, &c.ip.octets()[..]));
    let r = ask("db1");
    assert_eq!(&r[r.len() - 4..], &c.ip.octets()[..]);
    // lab1 lives in another VPC; example.com is not ours to answer.
    assert_eq!(ask("lab1.prod.atoll")[3] & 0x0f, 3, "NXDOMAIN");
    assert_eq!(ask("example.com")[3] & 0x0f, 5, "REFUSED");
}

/// Groups "web" (TCP 80 in, rule id returned) and "client", and a VM in
/// each on network web: client1 and server1.
fn client_and_server(w: &World) -> (GroupId, GroupId, u32, Vm, Vm) {
    let web = w.fabric.create_group("web").unwrap();
    let client = w.fabric.create_group("client").unwrap();
    let http = w
        .fabric
        .switch
        .add_rule(
            web,
            Rule::parse("ingress", "tcp", (80, 80), "", None).unwrap(),
        )
        .unwrap();
    let a = w.vm(w.web, "client1", Some(vec![client]));
    let b = w.vm(w.web, "server1", Some(vec![web]));
    (web, client, http, a, b)
}

#[test]
fn within_a_burst_each_connection_meets_security_on_its_own() {
    let w = world();
    let (_web, _client, _http, mut a, mut b) = client_and_server(&w);
    a.send(&tcp(&a, b.mac, b.ip, 40000, 80, TCP_SYN));
    assert_eq!(b.recv_ip().2.tcp_flags, TCP_SYN);
    b.send(&tcp(&b, a.mac, a.ip, 80, 40000, TCP_SYN | TCP_ACK));
    assert_eq!(a.recv_ip().2.tcp_flags, TCP_SYN | TCP_ACK);

    // One burst from the client: the open connection's segments between
    // frames no rule allows (another port opened or not, a ping), and a
    // FIN. Only the connection's segments arrive, in order.
    let ack = |a: &Vm, b: &Vm| tcp(a, b.mac, b.ip, 40000, 80, TCP_ACK);
    let mut burst = Vec::new();
    let mut want = Vec::new();
    for i in 0..30 {
        let f = match i {
            10 => tcp(&a, b.mac, b.ip, 40000, 22, TCP_SYN),
            11 => tcp(&a, b.mac, b.ip, 40000, 22, TCP_ACK),
            17 => ping(&a, b.mac, b.ip, 9),
            25 => tcp(&a, b.mac, b.ip, 40000, 80, TCP_FIN | TCP_ACK),
            _ => ack(&a, &b),
        };
        if ![10, 11, 17].contains(&i) {
            want.push(f.clone());
        }
        burst.push(f);
    }
    let filtered = b.counter("rx_filtered");
    a.fe.send_burst(&burst).unwrap();
    for f in &want {
        assert_eq!(&b.recv(), f);
    }
    let late = ping(&a, b.mac, b.ip, 10);
    assert_blocked(&mut a, &mut b, &late);
    assert_eq!(b.counter("rx_filtered"), filtered + 4);
}

#[test]
fn security_groups_allow_what_rules_say_and_return_traffic() {
    let w = world();
    let sw = &w.fabric.switch;
    let (web, client, http, mut a, mut b) = client_and_server(&w);

    // An allowed connection and its return traffic.
    a.send(&tcp(&a, b.mac, b.ip, 40000, 80, TCP_SYN));
    let (_, _, p) = b.recv_ip();
    assert_eq!(p.flow.dport, 80);
    b.send(&tcp(&b, a.mac, a.ip, 80, 40000, TCP_SYN | TCP_ACK));
    let (_, _, p) = a.recv_ip();
    assert_eq!(p.tcp_flags, TCP_SYN | TCP_ACK, "the reply came back in");
    assert_eq!(a.port.port.connections(), 1);

    // A virtual address the client may send from as well.
    w.fabric
        .set_allowed_addresses(a.port.port.id.0, &["10.1.0.100".into()])
        .unwrap();
    let mut vip = tcp(&a, b.mac, b.ip, 40002, 80, TCP_SYN);
    vip[26..30].copy_from_slice(&[10, 1, 0, 100]);
    vip[24..26].fill(0);
    let sum = checksum(&vip[14..34]);
    vip[24..26].copy_from_slice(&sum.to_be_bytes());
    a.send(&vip);
    let (_, _, p) = b.recv_ip();
    assert_eq!(p.flow.src, Ipv4Addr::new(10, 1, 0, 100));

    // Not allowed: another port, ICMP, and the server opening a connection
    // to the client (nothing allows ingress to the client).
    let f = tcp(&a, b.mac, b.ip, 40001, 22, TCP_SYN);
    assert_blocked(&mut a, &mut b, &f);
    let f = ping(&a, b.mac, b.ip, 1);
    assert_blocked(&mut a, &mut b, &f);
    let f = tcp(&b, a.mac, a.ip, 5000, 6000, TCP_SYN);
    assert_blocked(&mut b, &mut a, &f);
    assert_eq!(b.counter("rx_filtered"), 2);
    assert_eq!(a.counter("rx_filtered"), 1);

    // Spoofed source addresses never leave.
    let mut spoof = ping(&a, b.mac, b.ip, 2);
    spoof[26..30].copy_from_slice(&[10, 1, 0, 99]);
    let sum = {
        spoof[24] = 0;
        spoof[25] = 0;
        checksum(&spoof[14..34])
    };
    spoof[24..26].copy_from_slice(&sum.to_be_bytes());
    assert_blocked(&mut a, &mut b, &spoof);
    assert_eq!(a.counter("tx_filtered"), 1);

    // Rules change online: ICMP allowed from the client's group...
    let icmp = sw
        .add_rule(
            web,
            Rule::parse("ingress", "icmp", (0, 0), "", Some(client)).unwrap(),
        )
        .unwrap();
    a.send(&ping(&a, b.mac, b.ip, 3));
    let (_, _, p) = b.recv_ip();
    assert_eq!(p.icmp_type, Some(ICMP_ECHO_REQUEST));
    // ...removing that rule leaves the established HTTP connection alone...
    sw.remove_rule(web, icmp).unwrap();
    a.send(&tcp(&a, b.mac, b.ip, 40000, 80, TCP_ACK));
    let (_, _, p) = b.recv_ip();
    assert_eq!((p.flow.dport, p.tcp_flags), (80, TCP_ACK));
    let f = ping(&a, b.mac, b.ip, 3);
    assert_blocked(&mut a, &mut b, &f);
    // ...and removing the HTTP rule cuts it.
    let tracked = b.port.port.connections();
    sw.remove_rule(web, http).unwrap();
    let f = tcp(&a, b.mac, b.ip, 40000, 80, TCP_ACK);
    assert_blocked(&mut a, &mut b, &f);
    assert_eq!(
        b.port.port.connections(),
        tracked - 2,
        "b's side of both HTTP connections (from .2 and from .100) is gone"
    );
}

/// An IPv6 packet from `src` to `dst` in a frame from `from`, with the
/// upper-layer checksum (`sum_at`: its offset in `l4`, if it has one).
fn ip6_frame(
    from: Mac,
    dst_mac: Mac,
    (src, dst): (Ipv6Addr, Ipv6Addr),
    next: u8,
    l4: &[u8],
    sum_at: Option<usize>,
) -> Vec<u8> {
    let mut l4 = l4.to_vec();
    if let Some(at) = sum_at {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&u32::try_from(l4.len()).unwrap().to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, next]);
        pseudo.extend_from_slice(&l4);
        let s = checksum(&pseudo);
        l4[at..at + 2].copy_from_slice(&s.to_be_bytes());
    }
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[next, if next == PROTO_ICMPV6 { 255 } else { 64 }]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&l4);
    eth(dst_mac, from, ETHERTYPE_IPV6, &p)
}

fn tcp6(from: Mac, to: Mac, ends: (Ipv6Addr, Ipv6Addr), ports: (u16, u16), flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&ports.0.to_be_bytes());
    t[2..4].copy_from_slice(&ports.1.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    ip6_frame(from, to, ends, PROTO_TCP, &t, Some(16))
}

fn icmp6(from: Mac, to: Mac, ends: (Ipv6Addr, Ipv6Addr), kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(body);
    ip6_frame(from, to, ends, PROTO_ICMPV6, &m, Some(2))
}

/// A neighbour solicitation (135) or advertisement (136) about `target`
/// with a link-layer address option naming `lladdr`.
fn nd(kind: u8, target: Ipv6Addr, lladdr: Mac) -> Vec<u8> {
    let mut b = vec![if kind == 136 { 0x60 } else { 0 }, 0, 0, 0];
    b.extend_from_slice(&target.octets());
    b.extend_from_slice(&[if kind == 135 { 1 } else { 2 }, 1]);
    b.extend_from_slice(&lladdr);
    b
}

/// A well-formed router advertisement's body from a router at `mac`.
fn router_advert(mac: Mac) -> Vec<u8> {
    let mut b = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&mac);
    b
}

/// The solicited-node multicast address of `ip`, and its MAC.
fn solicited(ip: Ipv6Addr) -> (Ipv6Addr, Mac) {
    let group = solicited_node(ip);
    (group, multicast_mac(group))
}

/// The next frame `vm` gets, as an IPv6 packet's (protocol, ICMPv6 type or
/// TCP flags, source).
fn recv6(vm: &mut Vm) -> (u8, u8, Ipv6Addr) {
    let f = vm.recv();
    let e = Ethernet::parse(&f).unwrap();
    assert_eq!(e.ethertype, ETHERTYPE_IPV6, "an IPv6 frame");
    let ip = Ipv6::parse(e.payload).unwrap();
    let detail = match ip.protocol {
        PROTO_TCP => ip.payload[13],
        _ => ip.payload[0],
    };
    (ip.protocol, detail, ip.src)
}

#[test]
fn ipv6_on_a_subnet_is_held_to_the_ports_addresses_and_groups() {
    let w = world();
    let sw = &w.fabric.switch;
    let (web, client, _http, mut a, mut b) = client_and_server(&w);
    let (la, lb) = (link_local(a.mac), link_local(b.mac));
    assert_eq!(a.port.port.security().ip6[0], la, "link-local first");

    // Neighbour discovery: duplicate address detection from ::, a
    // solicitation and its advertisement pass without any rule.
    let (group, group_mac) = solicited(lb);
    let dad = icmp6(
        a.mac,
        group_mac,
        (Ipv6Addr::UNSPECIFIED, group),
        135,
        &nd(135, la, a.mac)[..20],
    );
    a.send(&dad);
    assert_eq!(recv6(&mut b), (PROTO_ICMPV6, 135, Ipv6Addr::UNSPECIFIED));
    a.send(&icmp6(
        a.mac,
        group_mac,
        (la, group),
        135,
        &nd(135, lb, a.mac),
    ));
    assert_eq!(recv6(&mut b), (PROTO_ICMPV6, 135, la));
    b.send(&icmp6(b.mac, a.mac, (lb, la), 136, &nd(136, lb, b.mac)));
    assert_eq!(recv6(&mut a), (PROTO_ICMPV6, 136, lb));

    // A connection the server's group allows, and its return traffic.
    a.send(&tcp6(a.mac, b.mac, (la, lb), (40000, 80), TCP_SYN));
    assert_eq!(recv6(&mut b), (PROTO_TCP, TCP_SYN, la));
    b.send(&tcp6(
        b.mac,
        a.mac,
        (lb, la),
        (80, 40000),
        TCP_SYN | TCP_ACK,
    ));
    assert_eq!(recv6(&mut a), (PROTO_TCP, TCP_SYN | TCP_ACK, lb));

    // What no rule allows: another port, a ping, the server calling out
    // to the client.
    let f = tcp6(a.mac, b.mac, (la, lb), (40001, 22), TCP_SYN);
    assert_blocked(&mut a, &mut b, &f);
    let ping = |from: &Vm, to: &Vm| {
        let ends = (link_local(from.mac), link_local(to.mac));
        icmp6(from.mac, to.mac, ends, ICMPV6_ECHO_REQUEST, &[0, 7, 0, 1])
    };
    let f = ping(&a, &b);
    assert_blocked(&mut a, &mut b, &f);
    let f = tcp6(b.mac, a.mac, (lb, la), (5000, 6000), TCP_SYN);
    assert_blocked(&mut b, &mut a, &f);
    assert_eq!(b.counter("rx_filtered"), 2);
    assert_eq!(a.counter("rx_filtered"), 1);

    // A remote-group rule knows the client by its IPv6 address too.
    sw.add_rule(
        web,
        Rule::parse("ingress", "icmp", (0, 0), "", Some(client)).unwrap(),
    )
    .unwrap();
    a.send(&ping(&a, &b));
    assert_eq!(recv6(&mut b), (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, la));

    // An IPv6 prefix rule, from an address the client was allowed.
    let extra: Ipv6Addr = "2001:db8:1::5".parse().unwrap();
    sw.add_rule(
        web,
        Rule::parse("ingress", "tcp", (22, 22), "2001:db8:1::/64", None).unwrap(),
    )
    .unwrap();
    let f = tcp6(a.mac, b.mac, (la, lb), (40002, 22), TCP_SYN);
    assert_blocked(&mut a, &mut b, &f);
    let f = tcp6(a.mac, b.mac, (extra, lb), (40003, 22), TCP_SYN);
    assert_blocked(&mut a, &mut b, &f);
    assert_eq!(a.counter("tx_filtered"), 1, "not its address yet");
    w.fabric
        .set_allowed_addresses(a.port.port.id.0, &["2001:db8:1::5".into()])
        .unwrap();
    a.send(&f);
    assert_eq!(recv6(&mut b), (PROTO_TCP, TCP_SYN, extra));

    // What a VM may not say: another's address as its source, a router
    // advertisement, an advertisement for another VM's address, a
    // link-layer address that is not its own.
    let tx = a.counter("tx_filtered");
    let spoofs = [
        tcp6(
            a.mac,
            b.mac,
            (link_local([2, 0, 0, 0, 0, 9]), lb),
            (1, 80),
            TCP_SYN,
        ),
        icmp6(a.mac, b.mac, (la, lb), 134, &router_advert(a.mac)),
        icmp6(a.mac, b.mac, (la, lb), 136, &nd(136, lb, a.mac)),
        icmp6(a.mac, group_mac, (la, group), 135, &nd(135, lb, b.mac)),
        // Duplicate address detection for another's address, which would
        // make its owner give it up.
        icmp6(
            a.mac,
            group_mac,
            (Ipv6Addr::UNSPECIFIED, group),
            135,
            &nd(135, lb, a.mac)[..20],
        ),
    ];
    for f in &spoofs {
        assert_blocked(&mut a, &mut b, f);
    }
    assert_eq!(a.counter("tx_filtered"), tx + 5);
    // A malformed option (length 0) is refused too, and the port still
    // works after all of it.
    let mut bad = nd(135, lb, a.mac);
    bad[21] = 0;
    let f = icmp6(a.mac, group_mac, (la, group), 135, &bad);
    assert_blocked(&mut a, &mut b, &f);
    a.send(&tcp6(a.mac, b.mac, (la, lb), (40000, 80), TCP_ACK));
    assert_eq!(recv6(&mut b), (PROTO_TCP, TCP_ACK, la));
}

#[test]
fn the_router_advertises_the_prefix_and_routes_ipv6_in_the_vpc() {
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let w = world();
    let (web, client, _http, _, _) = client_and_server(&w);
    let mut a = w.vm(w.web, "client6", Some(vec![client]));
    let mut b = w.vm(w.db, "server6", Some(vec![web]));
    let (gw_web, gw_db) = (w.gateway_mac(w.web), w.gateway_mac(w.db));
    let router = link_local(gw_web);
    let a6 = slaac("fd00:1::".parse().unwrap(), a.mac);
    let b6 = slaac("fd00:2::".parse().unwrap(), b.mac);
    assert_eq!(a.port.port.security().ip6, vec![link_local(a.mac), a6]);
    let la = link_local(a.mac);

    // A solicitation gets the advertisement: from the router's link-local
    // address and MAC, a default router (it routes the VPC), the MTU and
    // the /64 to form addresses in.
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    a.send(&icmp6(
        a.mac,
        multicast_mac(all_routers),
        (la, all_routers),
        133,
        &[0; 4],
    ));
    let f = a.recv();
    let e = Ethernet::parse(&f).unwrap();
    assert_eq!((e.src, e.dst), (gw_web, a.mac));
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!((ip.src, ip.dst, ip.hop_limit), (router, la, 255));
    let ra = ip.payload;
    assert_eq!(ra[0], 134);
    assert!(checksum_ok6(&ip), "the ICMPv6 checksum holds");
    assert_eq!(u16::from_be_bytes([ra[6], ra[7]]), 1800, "router lifetime");
    let opts = &ra[16..];
    assert_eq!(
        &opts[..8],
        &[1, 1, gw_web[0], gw_web[1], gw_web[2], gw_web[3], gw_web[4], gw_web[5]]
    );
    assert_eq!(&opts[8..16], &[5, 1, 0, 0, 0, 0, 0x05, 0xdc], "MTU 1500");
    assert_eq!(
        &opts[16..20],
        &[3, 4, 64, 0xc0],
        "a /64, on-link, autonomous"
    );
    assert_eq!(
        &opts[32..48],
        &"fd00:1::".parse::<Ipv6Addr>().unwrap().octets()
    );

    // It also advertises unasked (every few minutes; here on demand), to
    // all nodes, so guests keep their default route and addresses.
    w.fabric.switch.advertise_now();
    let f = a.recv();
    let e = Ethernet::parse(&f).unwrap();
    assert_eq!((e.src, e.dst), (gw_web, multicast_mac(ALL_NODES)));
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!((ip.src, ip.dst, ip.payload[0]), (router, ALL_NODES, 134));
    assert_eq!(&ip.payload[16..], opts, "the same advertisement");
    let f = b.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!(
        (ip.src, ip.payload[0]),
        (link_local(gw_db), 134),
        "db's own"
    );

    // The router's address is resolved and answers pings.
    let gw6: Ipv6Addr = "fd00:1::1".parse().unwrap();
    let (group, group_mac) = solicited(gw6);
    a.send(&icmp6(
        a.mac,
        group_mac,
        (a6, group),
        135,
        &nd(135, gw6, a.mac),
    ));
    let f = a.recv();
    let e = Ethernet::parse(&f).unwrap();
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!(
        (ip.src, ip.dst, ip.payload[0], ip.payload[4]),
        (gw6, a6, 136, 0xe0)
    );
    assert_eq!(&ip.payload[8..24], &gw6.octets());
    assert_eq!(&ip.payload[26..32], &gw_web);
    a.send(&icmp6(
        a.mac,
        gw_web,
        (a6, gw6),
        ICMPV6_ECHO_REQUEST,
        &[0, 5, 0, 1, b'h', b'i'],
    ));
    let f = a.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!((ip.src, ip.dst, ip.payload[0]), (gw6, a6, 129));
    assert!(checksum_ok6(&ip));
    assert_eq!(&ip.payload[4..], &[0, 5, 0, 1, b'h', b'i']);

    // Routed to the other subnet, as the server's rules allow, and back.
    a.send(&tcp6(a.mac, gw_web, (a6, b6), (40000, 80), TCP_SYN));
    let f = b.recv();
    let e = Ethernet::parse(&f).unwrap();
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!((e.src, e.dst), (gw_db, b.mac));
    assert_eq!((ip.src, ip.hop_limit, ip.payload[13]), (a6, 63, TCP_SYN));
    b.send(&tcp6(
        b.mac,
        gw_db,
        (b6, a6),
        (80, 40000),
        TCP_SYN | TCP_ACK,
    ));
    assert_eq!(recv6(&mut a), (PROTO_TCP, TCP_SYN | TCP_ACK, b6));
    // Not allowed in: port 22.
    let f = tcp6(a.mac, gw_web, (a6, b6), (40001, 22), TCP_SYN);
    let filtered = b.counter("rx_filtered");
    a.send(&f);
    a.send(&tcp6(a.mac, gw_web, (a6, b6), (40000, 80), TCP_ACK));
    assert_eq!(
        recv6(&mut b),
        (PROTO_TCP, TCP_ACK, a6),
        "only the allowed one arrived"
    );
    assert_eq!(b.counter("rx_filtered"), filtered + 1);

    // An address in the /64 that is not the VM's own does not leave; a
    // link-local source is not routed (silently); what cannot be routed is
    // answered with an ICMPv6 error quoting it: no route (a prefix no
    // subnet of the VPC has), address unreachable (nobody has it), time
    // exceeded (hop limit 1).
    let tx = a.counter("tx_filtered");
    let dropped = a.counter("tx_dropped");
    let spoofed: Ipv6Addr = "fd00:1::99".parse().unwrap();
    a.send(&tcp6(a.mac, gw_web, (spoofed, b6), (1, 80), TCP_SYN));
    a.send(&tcp6(a.mac, gw_web, (la, b6), (1, 80), TCP_SYN));
    let nowhere = tcp6(
        a.mac,
        gw_web,
        (a6, "fd00:3::5".parse().unwrap()),
        (1, 80),
        TCP_SYN,
    );
    let nobody = tcp6(
        a.mac,
        gw_web,
        (a6, "fd00:2::99".parse().unwrap()),
        (1, 80),
        TCP_SYN,
    );
    let mut last_hop = tcp6(a.mac, gw_web, (a6, b6), (2, 80), TCP_SYN);
    last_hop[14 + 7] = 1;
    for (sent, want) in [(&nowhere, (1, 0)), (&nobody, (1, 3)), (&last_hop, (3, 0))] {
        a.send(sent);
        let f = a.recv();
        let ip = Ipv6::parse(&f[14..]).unwrap();
        assert_eq!((ip.src, ip.dst), (gw6, a6), "from the router's address");
        assert_eq!((ip.payload[0], ip.payload[1]), want);
        assert!(checksum_ok6(&ip));
        assert_eq!(&ip.payload[8..], &sent[14..], "the packet quoted whole");
    }
    a.send(&icmp6(
        a.mac,
        gw_web,
        (a6, gw6),
        ICMPV6_ECHO_REQUEST,
        &[0, 6, 0, 1],
    ));
    assert_eq!(
        recv6(&mut a),
        (PROTO_ICMPV6, 129, gw6),
        "the ping after them is the next answer"
    );
    assert_eq!(a.counter("tx_filtered"), tx + 1);
    assert_eq!(a.counter("tx_dropped"), dropped + 4);
}

/// Whether the ICMPv6 checksum of `ip` holds.
fn checksum_ok6(ip: &Ipv6<'_>) -> bool {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip.src.octets());
    pseudo.extend_from_slice(&ip.dst.octets());
    pseudo.extend_from_slice(&u32::try_from(ip.payload.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ip.protocol]);
    pseudo.extend_from_slice(ip.payload);
    checksum(&pseudo) == 0
}

#[test]
fn malformed_ipv6_is_dropped_and_counted_and_the_port_keeps_working() {
    let w = world();
    let (_, _, _, mut a, mut b) = client_and_server(&w);
    let (la, lb) = (link_local(a.mac), link_local(b.mac));
    let good = tcp6(a.mac, b.mac, (la, lb), (40000, 80), TCP_SYN);
    let mut bad: Vec<Vec<u8>> = Vec::new();
    // A header cut short; a payload length past the frame's end.
    bad.push(good[..14 + 30].to_vec());
    let mut long = good.clone();
    long[18..20].copy_from_slice(&500u16.to_be_bytes());
    bad.push(long);
    // Extension headers without end: nine destination-options headers.
    let mut opts = Vec::new();
    for _ in 0..9 {
        opts.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    bad.push(ip6_frame(a.mac, b.mac, (la, lb), 60, &opts, None));
    // A TCP header of 10 bytes; an ICMPv6 echo of 5; version 4 in an
    // IPv6 frame.
    bad.push(ip6_frame(a.mac, b.mac, (la, lb), PROTO_TCP, &[0; 10], None));
    bad.push(ip6_frame(
        a.mac,
        b.mac,
        (la, lb),
        PROTO_ICMPV6,
        &[128, 0, 0, 0, 1],
        None,
    ));
    let mut v4 = good.clone();
    v4[14] = 0x45;
    bad.push(v4);
    let dropped = a.counter("tx_dropped");
    for f in &bad {
        assert_blocked(&mut a, &mut b, f);
    }
    assert_eq!(a.counter("tx_dropped"), dropped + bad.len() as u64);
    a.send(&good);
    assert_eq!(recv6(&mut b), (PROTO_TCP, TCP_SYN, la), "still working");
}

#[test]
fn icmp_errors_about_a_connection_pass_with_it() {
    let w = world();
    let (_, _, _, mut a, mut b) = client_and_server(&w);
    // The client (nothing allowed in) opens a connection to the server.
    let syn = tcp(&a, b.mac, b.ip, 40000, 80, TCP_SYN);
    a.send(&syn);
    b.recv();
    // An error from the server's side quoting that packet (fragmentation
    // needed: path MTU discovery) comes in; one quoting a connection the
    // client never opened does not.
    let (am, bm, aip, bip) = (a.mac, b.mac, a.ip, b.ip);
    let error = |quote: &[u8]| {
        let mut m = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        m.extend_from_slice(&quote[14..14 + 28]);
        let s = checksum(&m);
        m[2..4].copy_from_slice(&s.to_be_bytes());
        eth(am, bm, 0x0800, &ip(bip, aip, PROTO_ICMP, &m))
    };
    let ok = error(&syn);
    b.send(&ok);
    assert_eq!(a.recv(), ok, "frag needed for a's connection");
    let other = error(&tcp(&a, b.mac, b.ip, 40999, 80, TCP_SYN));
    assert_blocked(&mut b, &mut a, &other);

    // IPv6: packet too big about the client's connection.
    let (la, lb) = (link_local(a.mac), link_local(b.mac));
    let syn6 = tcp6(a.mac, b.mac, (la, lb), (40000, 80), TCP_SYN);
    a.send(&syn6);
    recv6(&mut b);
    let too_big = |quote: &[u8]| {
        let mut m = 1280u32.to_be_bytes().to_vec();
        m.extend_from_slice(&quote[14..]);
        icmp6(bm, am, (lb, la), 2, &m)
    };
    let ok = too_big(&syn6);
    b.send(&ok);
    assert_eq!(recv6(&mut a), (PROTO_ICMPV6, 2, lb));
    let other = too_big(&tcp6(a.mac, b.mac, (la, lb), (40999, 80), TCP_SYN));
    assert_blocked(&mut b, &mut a, &other);
}

const ALL_DHCP_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

fn udp6(from: Mac, to: Mac, ends: (Ipv6Addr, Ipv6Addr), ports: (u16, u16), body: &[u8]) -> Vec<u8> {
    let mut u = ports.0.to_be_bytes().to_vec();
    u.extend_from_slice(&ports.1.to_be_bytes());
    u.extend_from_slice(&u16::try_from(8 + body.len()).unwrap().to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(body);
    ip6_frame(from, to, ends, PROTO_UDP, &u, Some(6))
}

/// DHCPv6 options as (code, body).
type Options6 = Vec<(u16, Vec<u8>)>;

fn options6(mut b: &[u8]) -> Options6 {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        out.push((u16::from_be_bytes([b[0], b[1]]), b[4..4 + len].to_vec()));
        b = &b[4 + len..];
    }
    assert!(b.is_empty(), "options fill the message");
    out
}

fn option6(opts: &Options6, code: u16) -> Option<&[u8]> {
    opts.iter()
        .find(|(c, _)| *c == code)
        .map(|(_, b)| b.as_slice())
}

/// A DHCPv6 client message of `kind` (transaction 0x010203) with `opts`,
/// from `vm`'s link-local address to all servers.
fn dhcp6_from(vm: &Vm, kind: u8, opts: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![kind, 1, 2, 3];
    for (c, b) in opts {
        m.extend_from_slice(&c.to_be_bytes());
        m.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        m.extend_from_slice(b);
    }
    udp6(
        vm.mac,
        multicast_mac(ALL_DHCP_SERVERS),
        (link_local(vm.mac), ALL_DHCP_SERVERS),
        (546, 547),
        &m,
    )
}

/// The router's DHCPv6 answer `vm` gets next: its type and options, after
/// checking it comes from the router's link-local address and port 547 to
/// the VM's and port 546, for transaction 0x010203.
fn dhcp6_reply(vm: &mut Vm, gw_mac: Mac) -> (u8, Options6) {
    let f = vm.recv();
    let e = Ethernet::parse(&f).unwrap();
    assert_eq!((e.src, e.dst), (gw_mac, vm.mac));
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!((ip.src, ip.dst), (link_local(gw_mac), link_local(vm.mac)));
    assert_eq!(
        (ip.protocol, &ip.payload[..4]),
        (PROTO_UDP, &[2, 0x23, 2, 0x22][..])
    );
    assert!(checksum_ok6(&ip), "the UDP checksum holds");
    let m = &ip.payload[8..];
    assert_eq!(&m[1..4], &[1, 2, 3], "the transaction");
    (m[0], options6(&m[4..]))
}

/// The router advertisement `vm` gets for its solicitation: flags, the
/// prefix option's flags, and the RDNSS and DNSSL options' bodies.
fn solicit_router(vm: &mut Vm) -> (u8, u8, Vec<u8>, Vec<u8>) {
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let la = link_local(vm.mac);
    vm.send(&icmp6(
        vm.mac,
        multicast_mac(all_routers),
        (la, all_routers),
        133,
        &[0; 4],
    ));
    let f = vm.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!(ip.payload[0], 134);
    let (mut prefix_flags, mut rdnss, mut dnssl) = (0, Vec::new(), Vec::new());
    let mut opts = &ip.payload[16..];
    while !opts.is_empty() {
        let len = usize::from(opts[1]) * 8;
        match opts[0] {
            3 => prefix_flags = opts[3],
            25 => rdnss = opts[8..len].to_vec(),
            31 => dnssl = opts[8..len].to_vec(),
            _ => {}
        }
        opts = &opts[len..];
    }
    (ip.payload[5], prefix_flags, rdnss, dnssl)
}

const CLIENT_ID: &[u8] = &[0, 3, 0, 1, 0x52, 0x54, 0, 0, 0, 1];

#[test]
fn slaac_subnets_tell_guests_their_dns_and_answer_it_over_ipv6() {
    let w = world();
    let mut a = w.vm(w.web, "web6", None);
    let mut b = w.vm(w.web, "peer6", None);
    let gw = w.gateway_mac(w.web);
    let gw6: Ipv6Addr = "fd00:1::1".parse().unwrap();

    // The advertisement: "other configuration" by DHCPv6, an autonomous
    // prefix, the router as DNS server, the domain to search.
    let (flags, prefix_flags, rdnss, dnssl) = solicit_router(&mut a);
    assert_eq!((flags, prefix_flags), (0x40, 0xc0));
    assert_eq!(rdnss, gw6.octets());
    assert_eq!(&dnssl[..12], b"\x04prod\x05atoll\x00");

    // Stateless DHCPv6: the same, asked for. No other port sees the
    // request.
    let info = dhcp6_from(&a, 11, &[(1, CLIENT_ID), (6, &[0, 23, 0, 24])]);
    assert_blocked(&mut a, &mut b, &info);
    let (kind, opts) = dhcp6_reply(&mut a, gw);
    assert_eq!(kind, 7, "a reply");
    assert_eq!(option6(&opts, 1), Some(CLIENT_ID));
    assert_eq!(
        option6(&opts, 2),
        Some(&[0, 3, 0, 1, gw[0], gw[1], gw[2], gw[3], gw[4], gw[5]][..])
    );
    assert_eq!(option6(&opts, 23), Some(&gw6.octets()[..]));
    assert_eq!(option6(&opts, 24), Some(&b"\x04prod\x05atoll\x00"[..]));
    // Asked for an address, it says there is none to give here.
    let ia = [0u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    a.send(&dhcp6_from(&a, 1, &[(1, CLIENT_ID), (3, &ia)]));
    let (kind, opts) = dhcp6_reply(&mut a, gw);
    assert_eq!(kind, 2, "an advertise");
    let ia = option6(&opts, 3).unwrap();
    assert_eq!(&ia[12..18], &[0, 13, 0, 36, 0, 2], "NoAddrsAvail");

    // DNS to the router's IPv6 address: VM names, AAAA from their /64.
    let (a6, b6) = (
        slaac("fd00:1::".parse().unwrap(), a.mac),
        slaac("fd00:1::".parse().unwrap(), b.mac),
    );
    a.send(&udp6(
        a.mac,
        gw,
        (a6, gw6),
        (40000, 53),
        &dns_query(7, "peer6.prod.atoll", 28),
    ));
    let f = a.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!((ip.src, ip.dst, ip.protocol), (gw6, a6, PROTO_UDP));
    assert!(checksum_ok6(&ip));
    assert_eq!(&ip.payload[..4], &[0, 53, 0x9c, 0x40]);
    let r = &ip.payload[8..];
    assert_eq!((r[3] & 0x0f, r[7]), (0, 1), "one answer, no error");
    assert_eq!(&r[r.len() - 16..], &b6.octets());

    // Addresses are the guests' own here: none is chosen for them.
    let err = w
        .fabric
        .set_port_ipv6(a.port.port.id.0, "fd00:1::100".parse().unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("SLAAC"), "{err}");

    // A VM may not play DHCPv6 server to another.
    let before = b.counter("tx_filtered");
    let rogue = udp6(
        b.mac,
        a.mac,
        (link_local(b.mac), link_local(a.mac)),
        (547, 546),
        &[7, 1, 2, 3],
    );
    assert_blocked(&mut b, &mut a, &rogue);
    assert_eq!(b.counter("tx_filtered"), before + 1);
}

#[test]
fn dhcpv6_subnets_assign_each_port_its_address() {
    let w = world();
    let net = w
        .fabric
        .create_network("managed", Kind::Flat, Some(w.prod), false)
        .unwrap();
    let dns6: Ipv6Addr = "2001:db8::53".parse().unwrap();
    w.fabric
        .create_subnet(
            net,
            "10.3.0.0/24",
            SubnetSettings {
                ipv6: Some(("fd00:3::".parse().unwrap(), 64)),
                dhcp6: true,
                dns6: vec![dns6],
                ..SubnetSettings::default()
            },
        )
        .unwrap();
    let mut a = w.vm(net, "m1", None);
    let mut b = w.vm(net, "m2", None);
    let gw = w.gateway_mac(net);
    let gw6: Ipv6Addr = "fd00:3::1".parse().unwrap();
    let mine = slaac("fd00:3::".parse().unwrap(), a.mac);

    // Managed: the prefix is on-link only, addresses come from DHCPv6.
    let (flags, prefix_flags, rdnss, dnssl) = solicit_router(&mut a);
    assert_eq!((flags, prefix_flags), (0xc0, 0x80));
    assert_eq!(rdnss, [gw6.octets(), dns6.octets()].concat());
    assert!(dnssl.is_empty(), "no domain, no search list");

    // Solicit: the port's address is advertised; nobody else hears it.
    let ia = [0u8, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];
    let solicit = dhcp6_from(&a, 1, &[(1, CLIENT_ID), (3, &ia), (8, &[0, 0])]);
    assert_blocked(&mut a, &mut b, &solicit);
    let (kind, opts) = dhcp6_reply(&mut a, gw);
    assert_eq!(kind, 2);
    assert_eq!(
        option6(&opts, 7),
        Some(&[255][..]),
        "preference: no need to wait"
    );
    let advertised = option6(&opts, 3).unwrap().to_vec();
    assert_eq!(&advertised[..4], &[0, 0, 0, 9], "the client's IAID");
    assert_eq!(&advertised[12..16], &[0, 5, 0, 24], "one address");
    assert_eq!(&advertised[16..32], &mine.octets());
    assert_eq!(
        option6(&opts, 23),
        Some(&[gw6.octets(), dns6.octets()].concat()[..])
    );
    let server = option6(&opts, 2).unwrap().to_vec();

    // A request to another server gets nothing: the next answer is the
    // information request's that follows it.
    let elsewhere = [0u8, 3, 0, 1, 1, 2, 3, 4, 5, 6];
    a.send(&dhcp6_from(
        &a,
        3,
        &[(1, CLIENT_ID), (2, &elsewhere), (3, &ia)],
    ));
    a.send(&dhcp6_from(&a, 11, &[]));
    let (kind, opts) = dhcp6_reply(&mut a, gw);
    assert_eq!(kind, 7);
    assert!(option6(&opts, 3).is_none() && option6(&opts, 32).is_some());

    // The request to this one gets the address.
    a.send(&dhcp6_from(
        &a,
        3,
        &[(1, CLIENT_ID), (2, &server), (3, &advertised)],
    ));
    let (kind, opts) = dhcp6_reply(&mut a, gw);
    assert_eq!(kind, 7);
    assert_eq!(option6(&opts, 3), Some(&advertised[..]));

    // And the address works: the router answers a ping from it.
    a.send(&icmp6(
        a.mac,
        gw,
        (mine, gw6),
        ICMPV6_ECHO_REQUEST,
        &[0, 1, 0, 1],
    ));
    let (proto, kind, from) = recv6(&mut a);
    assert_eq!((proto, kind, from), (PROTO_ICMPV6, 129, gw6));

    // A port may have an address chosen for it instead: DHCPv6 gives that
    // one, DNS answers with it, the port may send from it and no longer
    // from the one its MAC gives.
    let chosen: Ipv6Addr = "fd00:3::100".parse().unwrap();
    for (bad, why) in [
        ("fd00:3::1", "the router's"),
        ("fd00:4::100", "not in the subnet's fd00:3::/64"),
    ] {
        let err = w
            .fabric
            .set_port_ipv6(b.port.port.id.0, bad.parse().unwrap())
            .unwrap_err();
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    w.fabric.set_port_ipv6(b.port.port.id.0, chosen).unwrap();
    let err = w
        .fabric
        .set_port_ipv6(a.port.port.id.0, chosen)
        .unwrap_err();
    assert!(err.to_string().contains("has it"), "{err}");
    assert_eq!(b.port.port.security().ip6, vec![link_local(b.mac), chosen]);
    b.send(&dhcp6_from(&b, 1, &[(1, CLIENT_ID), (3, &ia)]));
    let (_, opts) = dhcp6_reply(&mut b, gw);
    assert_eq!(&option6(&opts, 3).unwrap()[16..32], &chosen.octets());
    a.send(&udp6(
        a.mac,
        gw,
        (mine, gw6),
        (40000, 53),
        &dns_query(8, "m2", 28),
    ));
    let f = a.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!(&ip.payload[ip.payload.len() - 16..], &chosen.octets());
    b.send(&icmp6(
        b.mac,
        gw,
        (chosen, gw6),
        ICMPV6_ECHO_REQUEST,
        &[0, 2, 0, 1],
    ));
    assert_eq!(recv6(&mut b), (PROTO_ICMPV6, 129, gw6));
    let old = slaac("fd00:3::".parse().unwrap(), b.mac);
    let before = b.counter("tx_filtered");
    let spoofed = icmp6(
        b.mac,
        a.mac,
        (old, mine),
        ICMPV6_ECHO_REQUEST,
        &[0, 3, 0, 1],
    );
    assert_blocked(&mut b, &mut a, &spoofed);
    assert_eq!(
        b.counter("tx_filtered"),
        before + 1,
        "the MAC's address is not b's now"
    );
}

#[test]
fn a_port_flooding_the_routers_services_is_held_to_its_budget_and_others_are_served() {
    let w = world();
    // A small budget, to see it: 10 at once, one more every 100 s.
    w.fabric.switch.set_service_limit((0.01, 10.0));
    let mut a = w.vm(w.web, "flood", None);
    let mut b = w.vm(w.web, "calm", None);
    let (gw_mac, gw) = (w.gateway_mac(w.web), Ipv4Addr::new(10, 1, 0, 1));
    let query = |vm: &Vm, id: u16| {
        udp_frame(
            vm.mac,
            gw_mac,
            vm.ip,
            gw,
            40000,
            53,
            &dns_query(id, "calm", 1),
        )
    };
    // 40 DNS queries at once: the burst is answered (and at most one more
    // the rate adds meanwhile), the rest dropped and counted.
    for id in 0..40 {
        a.send(&query(&a, id));
    }
    let mut answered = 0u64;
    atoll_tests::wait_until("every query answered or dropped", WAIT, || {
        while let Some(f) = a.fe.recv(Duration::from_millis(20)).unwrap() {
            let i = Ipv4::parse(&f[14..]).unwrap();
            assert_eq!((i.src, &i.payload[..2]), (gw, &53u16.to_be_bytes()[..]));
            answered += 1;
        }
        (answered + a.counter("tx_service_dropped") == 40).then_some(())
    });
    assert!((10..=11).contains(&answered), "{answered} of 40 answered");
    // Its ARP for the router waits for the budget too; the other port has
    // its own and is served at once.
    let before = a.counter("tx_service_dropped");
    b.send(&query(&b, 1));
    let f = b.recv();
    let i = Ipv4::parse(&f[14..]).unwrap();
    assert_eq!(&i.payload[8..10], &1u16.to_be_bytes(), "b's answer");
    a.send(&arp_request(&a, gw));
    atoll_tests::wait_until("a's ARP dropped", WAIT, || {
        (a.counter("tx_service_dropped") > before).then_some(())
    });
}

/// A resolver's answer to `query`: one A record of `addr`.
fn resolver_answer(query: &[u8], addr: [u8; 4]) -> Vec<u8> {
    let mut a = query.to_vec();
    a[2] |= 0x80;
    a[6..8].copy_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&addr);
    a
}

#[test]
fn names_not_the_vpcs_are_asked_of_the_nodes_resolvers() {
    let w = world();
    let resolver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    resolver.set_read_timeout(Some(WAIT)).unwrap();
    w.fabric
        .switch
        .set_dns_upstreams(vec![resolver.local_addr().unwrap()]);
    // Only VPCs with a way out resolve through the node: "prod" gets a
    // gateway, "lab" stays isolated and keeps getting REFUSED.
    let ext = w
        .fabric
        .create_network("ext", Kind::Flat, None, false)
        .unwrap();
    let external = SubnetSettings {
        external: true,
        ..SubnetSettings::default()
    };
    w.fabric
        .create_subnet(ext, "192.0.2.0/24", external)
        .unwrap();
    w.fabric.set_vpc_gateway(w.prod, ext, None).unwrap();
    let mut hermit = w.vm(w.other, "hermit", None);
    let (other_mac, other_gw) = (w.gateway_mac(w.other), Ipv4Addr::new(10, 2, 0, 1));
    let q = dns_query(6, "example.net", 1);
    hermit.send(&udp_frame(
        hermit.mac, other_mac, hermit.ip, other_gw, 40000, 53, &q,
    ));
    let f = hermit.recv();
    let i = Ipv4::parse(&f[14..]).unwrap();
    assert_eq!(i.payload[8 + 3] & 0x0f, 5, "REFUSED in an isolated VPC");
    let mut a = w.vm(w.web, "asker", None);
    let _b = w.vm(w.web, "local", None);
    let (gw_mac, gw) = (w.gateway_mac(w.web), Ipv4Addr::new(10, 1, 0, 1));
    let ask = |vm: &Vm, sport: u16, id: u16, name: &str| {
        udp_frame(
            vm.mac,
            gw_mac,
            vm.ip,
            gw,
            sport,
            53,
            &dns_query(id, name, 1),
        )
    };
    // A VM's name is the router's to answer: nothing goes to the resolver
    // (the first query it gets is the next one, not this one or the
    // isolated VPC's).
    a.send(&ask(&a, 40000, 7, "local"));
    let f = a.recv();
    let i = Ipv4::parse(&f[14..]).unwrap();
    assert_eq!(&i.payload[8..10], &7u16.to_be_bytes());
    // Another name goes to the resolver, under an identifier of the
    // router's.
    a.send(&ask(&a, 40001, 8, "example.com"));
    let mut buf = [0u8; 512];
    let (n, router) = resolver.recv_from(&mut buf).expect("the forwarded query");
    let q = buf[..n].to_vec();
    assert_eq!(
        &q[2..],
        &dns_query(8, "example.com", 1)[2..],
        "the question as asked"
    );
    // An answer from anyone else is not taken; the resolver's comes back
    // to the VM from the router, with its identifier.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .send_to(&resolver_answer(&q, [192, 0, 2, 66]), router)
        .unwrap();
    resolver
        .send_to(&resolver_answer(&q, [192, 0, 2, 77]), router)
        .unwrap();
    let f = a.recv();
    let i = Ipv4::parse(&f[14..]).unwrap();
    assert_eq!((i.src, i.dst), (gw, a.ip));
    assert_eq!(
        &i.payload[..4],
        &[0, 53, 0x9c, 0x41],
        "from 53 to the asking port"
    );
    let r = &i.payload[8..];
    assert_eq!(&r[..2], &8u16.to_be_bytes(), "the VM's identifier");
    assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 77], "the resolver's answer");

    // Over IPv6 the same, from the router's IPv6 address.
    let (a6, gw6): (Ipv6Addr, Ipv6Addr) = (
        slaac("fd00:1::".parse().unwrap(), a.mac),
        "fd00:1::1".parse().unwrap(),
    );
    a.send(&udp6(
        a.mac,
        gw_mac,
        (a6, gw6),
        (40002, 53),
        &dns_query(9, "example.org", 1),
    ));
    let (n, router) = resolver.recv_from(&mut buf).expect("the forwarded query");
    let q = buf[..n].to_vec();
    resolver
        .send_to(&resolver_answer(&q, [192, 0, 2, 78]), router)
        .unwrap();
    let f = a.recv();
    let ip = Ipv6::parse(&f[14..]).unwrap();
    assert_eq!((ip.src, ip.dst), (gw6, a6));
    assert!(checksum_ok6(&ip));
    let r = &ip.payload[8..];
    assert_eq!(&r[..2], &9u16.to_be_bytes());
    assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 78]);
}
