//! The uplink, VLANs, SNAT, port forwards and floating IPs against a real
//! outside world:
//! the switch's TAP uplink is moved into a network namespace whose kernel
//! plays the physical network (a router at 192.0.2.1 on the untagged
//! external network, hosts on VLANs 10 and 20), and pings and datagrams
//! cross it. VMs are test frontends that answer ARP and ping and echo UDP.
//! Needs root (namespaces, TAP).
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::fabric::{Fabric, Kind, PortEntry, SubnetSettings};
use netd::flow::{
    icmp_echo_reply, icmpv6_frame, ipv4_header, udp6_frame, udp_frame, Packet, ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP,
};
use netd::frame::{
    checksum, Arp, Ethernet, Ipv4, Ipv6, ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
};
use netd::qos::Limit;
use netd::router::VpcId;
use netd::secgroup::Rule;

const NS: &str = "atoll-uplink1";
const TAP: &str = "atlup1";

fn run(cmd: &[&str]) -> std::process::Output {
    Command::new(cmd[0]).args(&cmd[1..]).output().unwrap()
}

fn ok(cmd: &[&str]) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{}: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(cmd: &[&str]) -> std::process::Output {
    let mut full = vec!["ip", "netns", "exec", NS];
    full.extend_from_slice(cmd);
    run(&full)
}

struct Outside;

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", NS]);
    }
}

/// The namespace with the TAP moved in: 192.0.2.1/24 untagged, no IPv6
/// chatter. (This kernel has no 802.1Q devices: tagged frames are sent and
/// read through a packet socket, [`Raw`].)
fn outside() -> Outside {
    let _ = run(&["ip", "netns", "del", NS]);
    ok(&["ip", "netns", "add", NS]);
    let guard = Outside;
    for k in ["all", "default"] {
        let key = format!("net.ipv6.conf.{k}.disable_ipv6=1");
        let out = in_ns(&["sysctl", "-qw", &key]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok(&["ip", "link", "set", TAP, "netns", NS]);
    let n = |args: &[&str]| {
        let mut full = vec!["ip", "-n", NS];
        full.extend_from_slice(args);
        ok(&full);
    };
    n(&["addr", "add", "192.0.2.1/24", "dev", TAP]);
    n(&["link", "set", TAP, "up"]);
    guard
}

/// A packet socket on the TAP inside the namespace: raw frames, tagged or
/// not, as a host on a trunk port would send and see them.
struct Raw(OwnedFd);

impl Raw {
    fn open() -> Self {
        std::thread::spawn(|| {
            let ns = std::fs::File::open(format!("/var/run/netns/{NS}")).unwrap();
            // SAFETY: this thread alone enters the namespace, to open the
            // socket there; it ends right after.
            let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0);
            let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
            // SAFETY: plain socket calls on a descriptor we own; the
            // structures passed are initialised and sized as the kernel
            // expects.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "{}", std::io::Error::last_os_error());
                let name = std::ffi::CString::new(TAP).unwrap();
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
                sll.sll_protocol = proto;
                sll.sll_ifindex = i32::try_from(libc::if_nametoindex(name.as_ptr())).unwrap();
                let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
                assert_eq!(libc::bind(fd, (&raw const sll).cast(), len), 0);
                let one: libc::c_int = 1;
                let ilen = u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
                libc::setsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&raw const one).cast(),
                    ilen,
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                let tlen = u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap();
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    tlen,
                );
                Raw(OwnedFd::from_raw_fd(fd))
            }
        })
        .join()
        .unwrap()
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sending from a live buffer on our bound socket.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(n).unwrap(), frame.len());
    }

    /// The next frame within 10 s that `want` accepts, with its VLAN (from
    /// the tag, or from the kernel's note when it took the tag off).
    fn recv(&self, want: impl Fn(&[u8], Option<u16>) -> bool) -> (Vec<u8>, Option<u16>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 2048];
        let mut ctl = [0u64; 16];
        while std::time::Instant::now() < deadline {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr over our buffers; the kernel writes at most
            // their lengths.
            let (n, vlan) = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = ctl.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&ctl);
                let n = libc::recvmsg(self.0.as_raw_fd(), &raw mut msg, 0);
                let mut vlan = None;
                let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA
                    {
                        let aux = libc::CMSG_DATA(c)
                            .cast::<libc::tpacket_auxdata>()
                            .read_unaligned();
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            vlan = Some(aux.tp_vlan_tci & 0x0fff);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&raw const msg, c);
                }
                (n, vlan)
            };
            let Ok(n) = usize::try_from(n) else { continue };
            let frame = &buf[..n];
            let vlan = vlan.or_else(|| Ethernet::parse(frame).ok().and_then(|e| e.vlan));
            if want(frame, vlan) {
                return (frame.to_vec(), vlan);
            }
        }
        panic!("no such frame within 10 s");
    }
}

/// The reply of a UDP echo service at the destination of `e` (UDP in
/// `i`), from `mac`: ports swapped, checksum computed.
fn udp_echo(e: &Ethernet<'_>, i: &Ipv4<'_>, mac: [u8; 6]) -> Vec<u8> {
    let q = i.payload;
    let mut udp = [&q[2..4], &q[0..2], &q[4..6], &[0, 0], &q[8..]].concat();
    let mut pseudo = [i.dst.octets(), i.src.octets()].concat();
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&u16::try_from(udp.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut out = [&e.src[..], &mac[..], &ETHERTYPE_IPV4.to_be_bytes()].concat();
    out.extend_from_slice(&ipv4_header(i.dst, i.src, PROTO_UDP, udp.len()));
    out.extend_from_slice(&udp);
    out
}

/// A UDP socket opened inside the outside world's namespace, bound to
/// `at`.
fn outside_udp(at: &'static str) -> UdpSocket {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{NS}")).unwrap();
        // SAFETY: this thread alone enters the namespace, to open the
        // socket there; it ends right after.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0);
        let s = UdpSocket::bind(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    })
    .join()
    .unwrap()
}

/// What a UDP echo at 192.0.2.2:`port` (the VPC router) answers to
/// `msg` within a second, if anything; only the router's address and
/// port may answer (the socket is connected to it).
fn udp_from_outside(port: u16, msg: &[u8]) -> Option<Vec<u8>> {
    let s = outside_udp("0.0.0.0:0");
    s.connect((Ipv4Addr::new(192, 0, 2, 2), port)).unwrap();
    s.send(msg).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// A VM that answers ARP for its address and pings to it and echoes UDP
/// datagrams to it, counting every frame it gets, until told to stop.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<usize>,
}

impl Responder {
    fn start(port: &PortEntry) -> Self {
        let mut fe = NetFrontend::connect(&port.port.socket).unwrap();
        let (mac, ip) = (port.port.mac, port.port.security().ip.unwrap());
        let ip6 = port.port.security().ip6;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = 0;
            while !flag.load(Ordering::Relaxed) {
                let Some(f) = fe.recv(Duration::from_millis(50)).unwrap() else {
                    continue;
                };
                seen += 1;
                let e = Ethernet::parse(&f).unwrap();
                match e.ethertype {
                    ETHERTYPE_ARP => {
                        let a = Arp::parse(e.payload).unwrap();
                        if a.op == ARP_REQUEST && a.tpa == ip {
                            fe.send(&a.reply_from(mac).to_frame(a.sha)).unwrap();
                        }
                    }
                    ETHERTYPE_IPV4 => {
                        let i = Ipv4::parse(e.payload).unwrap();
                        let p = Packet::of(&i).unwrap();
                        if i.dst == ip && p.icmp_type == Some(ICMP_ECHO_REQUEST) {
                            fe.send(&icmp_echo_reply(&f, &i, mac)).unwrap();
                        }
                        if i.dst == ip && i.protocol == PROTO_UDP {
                            fe.send(&udp_echo(&e, &i, mac)).unwrap();
                        }
                    }
                    ETHERTYPE_IPV6 => {
                        let i = Ipv6::parse(e.payload).unwrap();
                        let echo = i.protocol == PROTO_ICMPV6
                            && i.payload.first() == Some(&ICMPV6_ECHO_REQUEST);
                        if echo && ip6.contains(&i.dst) {
                            let mut b = i.payload.to_vec();
                            b[0] = ICMPV6_ECHO_REPLY;
                            fe.send(&icmpv6_frame((mac, e.src), (i.dst, i.src), b))
                                .unwrap();
                        }
                    }
                    _ => {}
                }
            }
            seen
        });
        Self { stop, thread }
    }

    /// Stops it; the frames it got.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Whether the upper-layer checksum of `i` holds.
fn sum6_ok(i: &Ipv6<'_>) -> bool {
    let mut pseudo = [i.src.octets(), i.dst.octets()].concat();
    pseudo.extend_from_slice(&u32::try_from(i.payload.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, i.protocol]);
    pseudo.extend_from_slice(i.payload);
    checksum(&pseudo) == 0
}

fn ping_from_outside(args: &[&str]) -> bool {
    let mut cmd = vec!["ping", "-c", "2", "-i", "0.2", "-W", "5"];
    cmd.extend_from_slice(args);
    let out = in_ns(&cmd);
    eprintln!(
        "{}: {}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

#[test]
fn floating_ips_snat_port_forwards_and_vlans_meet_the_outside_world() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fabric::new(dir.path().to_owned()).unwrap();
    f.switch.set_uplink(TAP).unwrap();
    let _outside = outside();

    // The external network: untagged on the uplink, 192.0.2.1 is the
    // router outside.
    let ext = f.create_network("ext", Kind::Flat, None, true).unwrap();
    let external = SubnetSettings {
        external: true,
        ipv6: Some(("fd00:ee::".parse().unwrap(), 64)),
        ..SubnetSettings::default()
    };
    f.create_subnet(ext, "192.0.2.0/24", external).unwrap();
    let vpc = f.create_vpc("prod").unwrap();
    let web = f
        .create_network("web", Kind::Flat, Some(vpc), false)
        .unwrap();
    let dual = SubnetSettings {
        ipv6: Some(("fd00:1::".parse().unwrap(), 64)),
        ..SubnetSettings::default()
    };
    f.create_subnet(web, "10.1.0.0/24", dual).unwrap();
    let gw = f.set_vpc_gateway(vpc, ext, None).unwrap();
    assert_eq!(gw, Ipv4Addr::new(192, 0, 2, 2));
    let open = f.create_group("open").unwrap();
    f.switch
        .add_rule(
            open,
            Rule::parse("ingress", "icmp", (0, 0), "", None).unwrap(),
        )
        .unwrap();

    // A VM with a floating IP answers pings from outside.
    let vm = f
        .create_port(web, None, None, "vm1", Some(vec![open]))
        .unwrap();
    let (fip, fip_ip) = f.create_floating_ip(ext, None).unwrap();
    assert_eq!(fip_ip, Ipv4Addr::new(192, 0, 2, 3));
    f.associate_floating_ip(fip, Some(vm.port.id.0)).unwrap();
    let responder = Responder::start(&vm);
    assert!(ping_from_outside(&["192.0.2.3"]), "the floating IP answers");
    // The router's own address answers too; a free address does not.
    assert!(ping_from_outside(&["192.0.2.2"]));
    assert!(!ping_from_outside(&["-c", "1", "-W", "1", "192.0.2.9"]));
    responder.stop();

    // The floating IP's QoS polices both ways at the address. At 64 kbit/s
    // (8 kB/s) with a 16 KiB burst, a quick run of 40 datagrams of 1042
    // bytes (frames) lets the burst through, 15 of them, and at most a
    // couple more the rate adds meanwhile; the rest is dropped and counted.
    // What got through is counted where it arrives: up to a marker sent
    // once the limits are lifted (the path keeps order).
    f.switch
        .add_rule(
            open,
            Rule::parse("ingress", "udp", (7, 7), "", None).unwrap(),
        )
        .unwrap();
    let limit = Limit {
        kbps: 64,
        burst_kib: 16,
    };
    f.set_floating_qos(fip, limit, limit).unwrap();
    let count = |k: &str| {
        let (_, c) = f.switch.floating_traffic(fip_ip);
        c.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v)
    };
    let both = |dir: &str| count(&format!("{dir}_packets")) + count(&format!("{dir}_policed"));
    let (rx0, tx0) = (count("rx_packets"), count("tx_packets"));
    let (rx_seen, tx_seen) = (both("rx"), both("tx"));
    let mut fe1 = NetFrontend::connect(&vm.port.socket).unwrap();
    let s = outside_udp("0.0.0.0:0");
    let burst = |send: &mut dyn FnMut(&[u8]), dir: &str, seen: u64| {
        for _ in 0..40 {
            send(&[0u8; 1000]);
        }
        atoll_tests::wait_until(
            "40 datagrams at the router",
            Duration::from_secs(10),
            || (both(dir) == seen + 40).then_some(()),
        );
    };
    let unlimited = Limit::default();
    burst(
        &mut |b| {
            s.send_to(b, ("192.0.2.3", 7)).unwrap();
        },
        "rx",
        rx_seen,
    );
    f.set_floating_qos(fip, unlimited, unlimited).unwrap();
    s.send_to(b"marker", ("192.0.2.3", 7)).unwrap();
    let mut came = 0;
    loop {
        let r = fe1
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("the marker");
        let Ok(i) = Ipv4::parse(&r[14..]) else {
            continue;
        };
        if i.protocol != PROTO_UDP {
            continue;
        }
        if &i.payload[8..] == b"marker" {
            break;
        }
        came += 1;
    }
    assert!((15..=17).contains(&came), "{came} of 40 came in");
    assert_eq!(
        came,
        count("rx_packets") - rx0 - 1,
        "as counted (and the marker)"
    );
    f.set_floating_qos(fip, limit, limit).unwrap();
    let vm_ip = vm.port.security().ip.unwrap();
    let web_gw_mac = f
        .subnet(f.network(web).unwrap().subnet.unwrap())
        .unwrap()
        .subnet
        .gateway_mac;
    let to = s.local_addr().unwrap().port();
    let out = |payload: &[u8]| {
        let there = Ipv4Addr::new(192, 0, 2, 1);
        udp_frame(vm.port.mac, web_gw_mac, vm_ip, there, 4000, to, payload)
    };
    burst(&mut |b| fe1.send(&out(b)).unwrap(), "tx", tx_seen);
    assert_eq!(count("tx_policed"), 40 - (count("tx_packets") - tx0));
    f.set_floating_qos(fip, unlimited, unlimited).unwrap();
    fe1.send(&out(b"marker")).unwrap();
    let mut went = 0;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = s.recv_from(&mut buf).expect("the marker");
        assert_eq!(
            from.ip(),
            std::net::IpAddr::V4(fip_ip),
            "from the floating IP"
        );
        if &buf[..n] == b"marker" {
            break;
        }
        went += 1;
    }
    assert!((15..=17).contains(&went), "{went} of 40 went out");
    assert_eq!(
        went,
        count("tx_packets") - tx0 - 1,
        "as counted (and the marker)"
    );
    drop(fe1);

    // The VM goes: its floating IP stays, bound to nothing, so the VM that
    // gets the same fixed address next does not get the floating IP's
    // traffic.
    let fixed = vm.port.security().ip.unwrap();
    f.delete_port(vm.port.id.0).unwrap();
    assert_eq!(f.floating_ip(fip).unwrap().port, None);
    let heir = f
        .create_port(web, None, Some(fixed), "heir", Some(vec![open]))
        .unwrap();
    let responder = Responder::start(&heir);
    assert!(!ping_from_outside(&["-c", "1", "-W", "1", "192.0.2.3"]));
    responder.stop();
    f.delete_port(heir.port.id.0).unwrap();
    // Deleted, its address is free for the next one.
    f.delete_floating_ip(fip).unwrap();
    assert!(f.floating_ip(fip).is_none());
    let (fip, ip) = f.create_floating_ip(ext, None).unwrap();
    assert_eq!(ip, Ipv4Addr::new(192, 0, 2, 3));
    f.delete_floating_ip(fip).unwrap();

    // A VM without one reaches outside through SNAT, and the reply comes
    // back to it.
    let vm2 = f.create_port(web, None, None, "vm2", None).unwrap();
    let mut fe = NetFrontend::connect(&vm2.port.socket).unwrap();
    let gw_mac = f
        .subnet(f.network(web).unwrap().subnet.unwrap())
        .unwrap()
        .subnet
        .gateway_mac;
    let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0, 0x44, 0x44, 0, 1];
    let s = checksum(&icmp);
    icmp[2..4].copy_from_slice(&s.to_be_bytes());
    let src = vm2.port.security().ip.unwrap();
    let mut frame = gw_mac.to_vec();
    frame.extend_from_slice(&vm2.port.mac);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(&ipv4_header(
        src,
        Ipv4Addr::new(192, 0, 2, 1),
        PROTO_ICMP,
        8,
    ));
    frame.extend_from_slice(&icmp);
    fe.send(&frame).unwrap();
    let reply = fe
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the echo reply");
    let e = Ethernet::parse(&reply).unwrap();
    let i = Ipv4::parse(e.payload).unwrap();
    let p = Packet::of(&i).unwrap();
    assert_eq!(
        (e.src, i.src, i.dst, p.icmp_type, p.flow.sport),
        (
            gw_mac,
            Ipv4Addr::new(192, 0, 2, 1),
            src,
            Some(ICMP_ECHO_REPLY),
            0x4444
        )
    );

    // An error about a translated packet reaches the VM about the packet
    // as it sent it: the outside's kernel refuses a datagram to a closed
    // port of 192.0.2.1, quoting it as it arrived (from the router's
    // address and port); the VM hears of its own address and port, with
    // every checksum right, through its ingress rules (they allow no
    // ICMP: the error belongs to its connection).
    let refused = udp_frame(
        vm2.port.mac,
        gw_mac,
        src,
        Ipv4Addr::new(192, 0, 2, 1),
        40001,
        9,
        b"anyone?",
    );
    fe.send(&refused).unwrap();
    let err = loop {
        let r = fe
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("the error");
        if Ipv4::parse(&r[14..]).is_ok_and(|i| i.protocol == PROTO_ICMP && i.payload[0] == 3) {
            break r;
        }
    };
    let i = Ipv4::parse(&err[14..]).unwrap();
    assert_eq!(
        (i.dst, i.payload[1]),
        (src, 3),
        "port unreachable, to the VM"
    );
    assert_eq!(checksum(i.payload), 0, "the ICMP checksum holds");
    let q = &i.payload[8..];
    assert_eq!(&q[12..16], &src.octets(), "about the VM's address");
    assert_eq!(checksum(&q[..20]), 0, "the quoted header's checksum holds");
    assert_eq!(&q[20..22], &40001u16.to_be_bytes(), "and its port");

    // A port forward: UDP 8053 of the router's address reaches a VM's port
    // 53 once its ingress rules let it in, and the answer comes from the
    // router's port (the outside socket hears only that).
    let svc = f
        .create_port(web, None, None, "svc", Some(vec![open]))
        .unwrap();
    let svc_ip = svc.port.security().ip.unwrap();
    let fwd = f.add_port_forward(vpc, "udp", 8053, svc_ip, 53).unwrap();
    let responder = Responder::start(&svc);
    assert_eq!(
        udp_from_outside(8053, b"refused"),
        None,
        "no rule lets it in"
    );
    f.switch
        .add_rule(
            open,
            Rule::parse("ingress", "udp", (53, 53), "", None).unwrap(),
        )
        .unwrap();
    assert_eq!(
        udp_from_outside(8053, b"what is atoll?").as_deref(),
        Some(&b"what is atoll?"[..])
    );
    // With a floating IP too, the forward's replies still leave from the
    // router's port.
    let (svc_fip, svc_fip_ip) = f.create_floating_ip(ext, None).unwrap();
    f.associate_floating_ip(svc_fip, Some(svc.port.id.0))
        .unwrap();
    assert_eq!(
        udp_from_outside(8053, b"still the router").as_deref(),
        Some(&b"still the router"[..])
    );
    // From inside the VPC the same addresses work (hairpin): vm2 asks the
    // forward and the floating IP, and the answers come from the
    // addresses it asked.
    let me = vm2.port.security().ip.unwrap();
    let router = Ipv4Addr::new(192, 0, 2, 2);
    for (dst, dport, sport) in [(router, 8053u16, 40000u16), (svc_fip_ip, 53, 40001)] {
        let mut udp = [sport.to_be_bytes(), dport.to_be_bytes(), [0, 14], [0, 0]].concat();
        udp.extend_from_slice(b"inside");
        let ip = ipv4_header(me, dst, PROTO_UDP, udp.len());
        let eth = [
            &gw_mac[..],
            &vm2.port.mac[..],
            &ETHERTYPE_IPV4.to_be_bytes()[..],
        ]
        .concat();
        fe.send(&[&eth[..], &ip[..], &udp[..]].concat()).unwrap();
        let reply = fe.recv(Duration::from_secs(10)).unwrap().expect("the echo");
        let e = Ethernet::parse(&reply).unwrap();
        let i = Ipv4::parse(e.payload).unwrap();
        let p = Packet::of(&i).unwrap();
        assert_eq!(
            (i.src, p.flow.sport, i.dst, p.flow.dport, &i.payload[8..]),
            (dst, dport, me, sport, &b"inside"[..])
        );
    }
    // And the router's address answers pings from inside.
    let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0, 0x55, 0x55, 0, 1];
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let eth = [
        &gw_mac[..],
        &vm2.port.mac[..],
        &ETHERTYPE_IPV4.to_be_bytes()[..],
    ]
    .concat();
    let ip = ipv4_header(me, router, PROTO_ICMP, icmp.len());
    fe.send(&[&eth[..], &ip[..], &icmp[..]].concat()).unwrap();
    let reply = fe
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the reply");
    let i = Ipv4::parse(Ethernet::parse(&reply).unwrap().payload).unwrap();
    let p = Packet::of(&i).unwrap();
    assert_eq!(
        (i.src, i.dst, p.icmp_type, p.flow.sport),
        (router, me, Some(ICMP_ECHO_REPLY), 0x5555)
    );
    f.delete_floating_ip(svc_fip).unwrap();
    // Other ports of the router go nowhere; a removed forward neither.
    assert_eq!(udp_from_outside(8054, b"other port"), None);
    f.remove_port_forward(vpc, fwd).unwrap();
    assert_eq!(udp_from_outside(8053, b"gone"), None);
    assert_eq!(
        responder.stop(),
        4,
        "the VM got the allowed datagrams and nothing else"
    );
    f.delete_port(svc.port.id.0).unwrap();

    // VLANs: a host on the trunk asks each VLAN for its VM; each answers
    // with its own tag, and neither hears the other VLAN.
    let mut vms = Vec::new();
    for (name, vlan, cidr, addr) in [
        ("v10", 10, "10.10.0.0/24", "10.10.0.5"),
        ("v20", 20, "10.20.0.0/24", "10.20.0.5"),
    ] {
        let net = f
            .create_network(name, Kind::Vlan(vlan), None, true)
            .unwrap();
        let settings = SubnetSettings {
            gateway: Some(Ipv4Addr::new(10, u8::try_from(vlan).unwrap(), 0, 254)),
            ..SubnetSettings::default()
        };
        f.create_subnet(net, cidr, settings).unwrap();
        let ip = addr.parse().unwrap();
        vms.push(
            f.create_port(net, None, Some(ip), name, Some(vec![open]))
                .unwrap(),
        );
    }
    let responders: Vec<Responder> = vms.iter().map(Responder::start).collect();
    let raw = Raw::open();
    const HOST: [u8; 6] = [0x02, 0x99, 0, 0, 0, 1];
    for (vm, vlan) in vms.iter().zip([10u16, 20]) {
        let vm_ip = vm.port.security().ip.unwrap();
        let ask = Arp {
            op: ARP_REQUEST,
            sha: HOST,
            spa: Ipv4Addr::new(10, u8::try_from(vlan).unwrap(), 0, 1),
            tha: [0; 6],
            tpa: vm_ip,
        }
        .to_frame([0xff; 6]);
        raw.send(&netd::uplink::tag(&ask, vlan));
        let mac = vm.port.mac;
        let (reply, tag) =
            raw.recv(|f, _| Ethernet::parse(f).is_ok_and(|e| e.src == mac && e.dst == HOST));
        assert_eq!(tag, Some(vlan), "the answer carries the VM's VLAN");
        let e = Ethernet::parse(&reply).unwrap();
        let a = Arp::parse(e.payload).unwrap();
        assert_eq!((a.sha, a.spa), (mac, vm_ip));
    }
    // An untagged frame for a VLAN's VM goes to the external network, not
    // to the VLAN.
    let stray = Arp {
        op: ARP_REQUEST,
        sha: HOST,
        spa: Ipv4Addr::new(10, 10, 0, 1),
        tha: [0; 6],
        tpa: Ipv4Addr::new(10, 10, 0, 5),
    }
    .to_frame([0xff; 6]);
    raw.send(&stray);
    // Then one more tagged question, whose answer shows the stray was
    // handled before it.
    let ask = Arp {
        op: ARP_REQUEST,
        sha: HOST,
        spa: Ipv4Addr::new(10, 10, 0, 1),
        tha: [0; 6],
        tpa: Ipv4Addr::new(10, 10, 0, 5),
    }
    .to_frame([0xff; 6]);
    raw.send(&netd::uplink::tag(&ask, 10));
    let mac = vms[0].port.mac;
    raw.recv(|f, _| Ethernet::parse(f).is_ok_and(|e| e.src == mac && e.dst == HOST));
    let heard: Vec<usize> = responders.into_iter().map(Responder::stop).collect();
    assert_eq!(
        heard,
        vec![2, 1],
        "each VM heard its own VLAN's questions only"
    );
    let counters = f.switch.uplink_stats();
    assert!(
        counters.iter().any(|(k, v)| *k == "rx" && *v > 0),
        "{counters:?}"
    );

    // IPv6 is routed, not translated: the outside routes the VPC's /64 to
    // the router's address on the external /64, and a VM there answers
    // pings from outside (its group lets ICMP in); the router answers its
    // own address too. The kernel finds the router by neighbour discovery,
    // the router the outside's by its own.
    let gw6 = f.switch.gateway6(VpcId(vpc)).unwrap();
    for key in ["all", TAP] {
        let set = format!("net.ipv6.conf.{key}.disable_ipv6=0");
        assert!(in_ns(&["sysctl", "-qw", &set]).status.success());
    }
    let gw6s = gw6.to_string();
    for args in [
        &["-6", "addr", "add", "fd00:ee::1/64", "dev", TAP, "nodad"][..],
        &["-6", "route", "add", "fd00:1::/64", "via", &gw6s],
        &["-6", "route", "add", "fd00:9::/64", "via", &gw6s],
    ] {
        let mut full = vec!["ip", "-n", NS];
        full.extend_from_slice(args);
        ok(&full);
    }
    let vm6 = f
        .create_port(web, None, None, "vm6", Some(vec![open]))
        .unwrap();
    let addr6 = vm6.port.security().ip6[1];
    let responder = Responder::start(&vm6);
    assert!(ping_from_outside(&["-6", &gw6s]), "the router's address");
    assert!(ping_from_outside(&["-6", &addr6.to_string()]), "the VM");
    // Nobody there, or outside the VPC's /64s: the router says so.
    for (to, why) in [
        ("fd00:1::99", "Address unreachable"),
        ("fd00:9::1", "No route"),
    ] {
        let out = in_ns(&["ping", "-6", "-c", "1", "-W", "2", to]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{to}: {text}");
        assert!(text.contains(why), "{to}: {text}");
    }
    assert!(responder.stop() >= 2);
    // The VM calls out first, to an outside address the router has not
    // met: the packet waits for neighbour discovery and then leaves as the
    // router's (its MAC, one hop less); the answer comes back in.
    ok(&[
        "ip",
        "-n",
        NS,
        "-6",
        "addr",
        "add",
        "fd00:ee::7/64",
        "dev",
        TAP,
        "nodad",
    ]);
    let raw = Raw::open();
    let mut fe6 = NetFrontend::connect(&vm6.port.socket).unwrap();
    let web_subnet = f.network(web).unwrap().subnet.unwrap();
    let web_gateway_mac = f.subnet(web_subnet).unwrap().subnet.gateway_mac;
    let there: Ipv6Addr = "fd00:ee::7".parse().unwrap();
    let ping = icmpv6_frame(
        (vm6.port.mac, web_gateway_mac),
        (addr6, there),
        vec![ICMPV6_ECHO_REQUEST, 0, 0, 0, 0, 9, 0, 1],
    );
    fe6.send(&ping).unwrap();
    let (out, _) = raw.recv(|fr, _| {
        Ethernet::parse(fr).is_ok_and(|e| e.ethertype == ETHERTYPE_IPV6)
            && Ipv6::parse(&fr[14..]).is_ok_and(|i| i.dst == there && i.protocol == PROTO_ICMPV6)
    });
    let gw_mac = out[6..12].to_vec();
    assert_ne!(gw_mac, vm6.port.mac.to_vec(), "from the router's MAC");
    assert_eq!(Ipv6::parse(&out[14..]).unwrap().hop_limit, 254);
    let (back, _) = raw.recv(|fr, _| {
        Ethernet::parse(fr).is_ok_and(|e| e.ethertype == ETHERTYPE_IPV6)
            && Ipv6::parse(&fr[14..]).is_ok_and(|i| i.src == there)
    });
    assert_eq!(&back[..6], &gw_mac[..], "the outside answers the router");
    let reply = loop {
        let r = fe6
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("the answer");
        if Ipv6::parse(&r[14..]).is_ok_and(|i| i.src == there) {
            break r;
        }
    };
    assert_eq!(reply[14 + 40], ICMPV6_ECHO_REPLY);
    drop(fe6);
    f.delete_port(vm6.port.id.0).unwrap();

    // A unique-local /64 under NAT66 leaves as the router's address: the
    // outside has no route to fd00:3::/64, yet a VM there pings it and
    // talks UDP with it (fresh ports of the router's address, checksums
    // kept), and the answers find their way back in, translated back.
    let lab = f
        .create_network("lab", Kind::Flat, Some(vpc), false)
        .unwrap();
    let natted = SubnetSettings {
        ipv6: Some(("fd00:3::".parse().unwrap(), 64)),
        snat6: true,
        ..SubnetSettings::default()
    };
    f.create_subnet(lab, "10.3.0.0/24", natted).unwrap();
    let vm7 = f.create_port(lab, None, None, "vm7", None).unwrap();
    let addr7 = vm7.port.security().ip6[1];
    let lab_subnet = f.network(lab).unwrap().subnet.unwrap();
    let lab_gw = (
        vm7.port.mac,
        f.subnet(lab_subnet).unwrap().subnet.gateway_mac,
    );
    let mut fe7 = NetFrontend::connect(&vm7.port.socket).unwrap();
    let from_there = |fe: &mut NetFrontend, proto: u8| loop {
        let r = fe
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("the answer");
        if Ipv6::parse(&r[14..]).is_ok_and(|i| i.src == there && i.protocol == proto) {
            break r;
        }
    };
    let ping = vec![ICMPV6_ECHO_REQUEST, 0, 0, 0, 0, 7, 0, 1];
    fe7.send(&icmpv6_frame(lab_gw, (addr7, there), ping))
        .unwrap();
    let (out, _) = raw.recv(|fr, _| {
        Ipv6::parse(fr.get(14..).unwrap_or_default()).is_ok_and(|i| {
            i.dst == there && i.protocol == PROTO_ICMPV6 && i.payload[0] == ICMPV6_ECHO_REQUEST
        })
    });
    let o = Ipv6::parse(&out[14..]).unwrap();
    assert_eq!(o.src, gw6, "from the router's address");
    assert!(sum6_ok(&o), "the ICMPv6 checksum holds after translation");
    let r = from_there(&mut fe7, PROTO_ICMPV6);
    let r = Ipv6::parse(&r[14..]).unwrap();
    assert_eq!(r.dst, addr7);
    assert_eq!(
        (r.payload[0], &r.payload[4..6]),
        (ICMPV6_ECHO_REPLY, &[0, 7][..])
    );
    assert!(sum6_ok(&r));
    let s = outside_udp("[fd00:ee::7]:0");
    let port = s.local_addr().unwrap().port();
    let hello = udp6_frame(lab_gw, (addr7, there), (5353, port), b"hello");
    fe7.send(&hello).unwrap();
    let mut buf = [0u8; 64];
    // The kernel drops a datagram whose checksum is wrong.
    let (n, peer) = s
        .recv_from(&mut buf)
        .expect("the datagram, checksum intact");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V6(gw6),
        "from the router's address"
    );
    assert_ne!(peer.port(), 5353, "and a port of the router's");
    s.send_to(b"back", peer).unwrap();
    let r = from_there(&mut fe7, PROTO_UDP);
    let r = Ipv6::parse(&r[14..]).unwrap();
    assert_eq!(
        (r.dst, &r.payload[2..4]),
        (addr7, &5353u16.to_be_bytes()[..])
    );
    assert_eq!(&r.payload[8..], b"back");
    assert!(sum6_ok(&r));
    // A datagram to a closed port: the outside's refusal (about the router's
    // address and port) reaches the VM about its own.
    let closed = udp6_frame(lab_gw, (addr7, there), (5354, 9), b"anyone?");
    fe7.send(&closed).unwrap();
    let r = from_there(&mut fe7, PROTO_ICMPV6);
    let r = Ipv6::parse(&r[14..]).unwrap();
    assert_eq!(
        (r.dst, r.payload[0], r.payload[1]),
        (addr7, 1, 4),
        "port unreachable"
    );
    assert!(sum6_ok(&r), "the ICMPv6 checksum holds");
    let q = &r.payload[8..];
    assert_eq!(&q[8..24], &addr7.octets(), "about the VM's address");
    assert_eq!(&q[40..42], &5354u16.to_be_bytes(), "and its port");
    drop(fe7);
    f.delete_port(vm7.port.id.0).unwrap();
    f.delete_network(lab).unwrap();

    // The VPC goes once its network has; its router address stops
    // answering and is free again.
    let err = f.delete_vpc(vpc).unwrap_err();
    assert!(err.to_string().contains("has networks"), "{err}");
    drop(fe);
    f.delete_port(vm2.port.id.0).unwrap();
    f.delete_network(web).unwrap();
    f.delete_vpc(vpc).unwrap();
    assert!(f.vpc(vpc).is_none());
    assert!(!ping_from_outside(&["-c", "1", "-W", "1", "192.0.2.2"]));
    let (_, ip) = f.create_floating_ip(ext, None).unwrap();
    assert_eq!(ip, Ipv4Addr::new(192, 0, 2, 2));
}
