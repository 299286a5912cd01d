//! DHCP answered by the switch, through real vhost-user-net frontends.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use atoll_tests::net_frontend::NetFrontend;
use netd::dhcp::DhcpConfig;
use netd::fabric::{Fabric, Kind, SubnetSettings};
use netd::frame::Mac;
use netd::l2::SegmentId;
use netd::switch::Switch;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

const A: Mac = [0x52, 0x54, 0, 0xd0, 0, 1];
const B: Mac = [0x52, 0x54, 0, 0xd0, 0, 2];
const C: Mac = [0x52, 0x54, 0, 0xd0, 0, 3];
const GW_MAC: Mac = [0x52, 0x54, 0, 0xff, 0, 1];
const WAIT: Duration = Duration::from_secs(10);

fn client(mac: Mac, kind: DhcpMessageType, xid: u32, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: xid,
        secs: 0,
        client_hardware_address: EthernetAddress(mac),
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: Ipv4Address::UNSPECIFIED,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: true,
        requested_ip: requested,
        client_identifier: Some(EthernetAddress(mac)),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let udp = UdpRepr {
        src_port: 68,
        dst_port: 67,
    };
    let ip = Ipv4Repr {
        src_addr: Ipv4Address::UNSPECIFIED,
        dst_addr: Ipv4Address::BROADCAST,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + repr.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    let mut u = UdpPacket::new_unchecked(p.payload_mut());
    let len = repr.buffer_len();
    udp.emit(
        &mut u,
        &ip.src_addr.into(),
        &ip.dst_addr.into(),
        len,
        |b| repr.emit(&mut DhcpPacket::new_unchecked(b)).unwrap(),
        &caps,
    );
    buf
}

/// (message type, your address, router, mask, DNS, MTU option, lease secs).
type Answer = (
    DhcpMessageType,
    Ipv4Addr,
    Option<Ipv4Addr>,
    Option<Ipv4Addr>,
    Vec<Ipv4Addr>,
    Option<u16>,
    Option<u32>,
);

fn answer(frame: &[u8]) -> Answer {
    answer_from(frame, GW_MAC, Ipv4Addr::new(10, 0, 0, 1)).0
}

/// The answer from the gateway `mac`/`gw`, and its domain option.
fn answer_from(frame: &[u8], mac: Mac, gw: Ipv4Addr) -> (Answer, Option<String>) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.src_addr(), EthernetAddress(mac));
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.src_addr(), gw);
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
    let pkt = DhcpPacket::new_checked(udp.payload()).unwrap();
    let r = DhcpRepr::parse(&pkt).unwrap();
    let mtu = pkt
        .options()
        .find(|o| o.kind == 26)
        .map(|o| u16::from_be_bytes([o.data[0], o.data[1]]));
    let domain = pkt
        .options()
        .find(|o| o.kind == 15)
        .map(|o| String::from_utf8_lossy(o.data).into_owned());
    assert_eq!(r.server_identifier, Some(gw));
    (
        (
            r.message_type,
            r.your_ip,
            r.router,
            r.subnet_mask,
            r.dns_servers.map(|d| d.to_vec()).unwrap_or_default(),
            mtu,
            r.lease_duration,
        ),
        domain,
    )
}

#[test]
fn a_port_on_a_subnet_gets_its_fixed_address_gateway_dns_and_domain() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fabric::new(dir.path().to_owned()).unwrap();
    let net = f.create_network("lan", Kind::Flat, None, false).unwrap();
    let settings = SubnetSettings {
        dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
        domain: "lan.atoll".into(),
        mtu: 1450,
        ..SubnetSettings::default()
    };
    let s = f.create_subnet(net, "192.168.10.0/24", settings).unwrap();
    let gw_mac = f.subnet(s).unwrap().subnet.gateway_mac;
    let gw = Ipv4Addr::new(192, 168, 10, 1);
    let p = f.create_port(net, Some(A), None, "vm1", None).unwrap();
    let mut a = NetFrontend::connect(&p.port.socket).unwrap();
    a.send(&client(A, DhcpMessageType::Discover, 1, None))
        .unwrap();
    let (offer, _) = answer_from(&a.recv(WAIT).unwrap().unwrap(), gw_mac, gw);
    assert_eq!(
        (offer.0, offer.1),
        (DhcpMessageType::Offer, Ipv4Addr::new(192, 168, 10, 2))
    );
    a.send(&client(A, DhcpMessageType::Request, 2, Some(offer.1)))
        .unwrap();
    let (ack, domain) = answer_from(&a.recv(WAIT).unwrap().unwrap(), gw_mac, gw);
    assert_eq!(
        ack,
        (
            DhcpMessageType::Ack,
            Ipv4Addr::new(192, 168, 10, 2),
            Some(gw),
            Some(Ipv4Addr::new(255, 255, 255, 0)),
            vec![gw, Ipv4Addr::new(9, 9, 9, 9)],
            Some(1450),
            Some(86_400),
        )
    );
    assert_eq!(domain.as_deref(), Some("lan.atoll"));
    // Another address than the port's own: NAK (its traffic would be
    // dropped as spoofed anyway).
    a.send(&client(
        A,
        DhcpMessageType::Request,
        3,
        Some(Ipv4Addr::new(192, 168, 10, 9)),
    ))
    .unwrap();
    let (nak, _) = answer_from(&a.recv(WAIT).unwrap().unwrap(), gw_mac, gw);
    assert_eq!(nak.0, DhcpMessageType::Nak);
}

#[test]
fn leases_come_from_the_pool_and_reservations_with_the_subnet_options() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(dir.path().to_owned()).unwrap();
    let seg = SegmentId(1);
    sw.set_dhcp(
        seg,
        DhcpConfig {
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            gateway_mac: GW_MAC,
            prefix: 24,
            pool: (Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 101)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            mtu: 1450,
            lease: Duration::from_secs(3600),
            reservations: HashMap::from([(C, Ipv4Addr::new(10, 0, 0, 50))]),
            domain: String::new(),
        },
    );
    let ports = [A, B, C].map(|m| sw.add_port(seg, m).unwrap());
    let [mut a, mut b, mut c] = [0, 1, 2].map(|i| NetFrontend::connect(&ports[i].socket).unwrap());

    a.send(&client(A, DhcpMessageType::Discover, 1, None))
        .unwrap();
    let offer = answer(&a.recv(WAIT).unwrap().unwrap());
    assert_eq!(
        offer,
        (
            DhcpMessageType::Offer,
            Ipv4Addr::new(10, 0, 0, 100),
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            Some(Ipv4Addr::new(255, 255, 255, 0)),
            vec![Ipv4Addr::new(10, 0, 0, 53)],
            Some(1450),
            Some(3600),
        )
    );
    // The switch answered: the DISCOVER went to nobody else.
    assert_eq!(b.try_recv().unwrap(), None);

    a.send(&client(A, DhcpMessageType::Request, 2, Some(offer.1)))
        .unwrap();
    assert_eq!(
        answer(&a.recv(WAIT).unwrap().unwrap()).0,
        DhcpMessageType::Ack
    );
    assert_eq!(sw.dhcp_lease(seg, &A), Some(Ipv4Addr::new(10, 0, 0, 100)));

    // The reservation, and the next free address for B.
    c.send(&client(C, DhcpMessageType::Discover, 3, None))
        .unwrap();
    assert_eq!(
        answer(&c.recv(WAIT).unwrap().unwrap()).1,
        Ipv4Addr::new(10, 0, 0, 50)
    );
    b.send(&client(B, DhcpMessageType::Discover, 4, None))
        .unwrap();
    assert_eq!(
        answer(&b.recv(WAIT).unwrap().unwrap()).1,
        Ipv4Addr::new(10, 0, 0, 101)
    );

    // Asking for an address that is not B's: NAK.
    b.send(&client(
        B,
        DhcpMessageType::Request,
        5,
        Some(Ipv4Addr::new(10, 0, 0, 100)),
    ))
    .unwrap();
    assert_eq!(
        answer(&b.recv(WAIT).unwrap().unwrap()).0,
        DhcpMessageType::Nak
    );
    assert_eq!(sw.dhcp_lease(seg, &B), None);

    // A spoofed client hardware address (not the frame's source) is ignored,
    // and the port keeps working.
    let mut spoof = client(A, DhcpMessageType::Discover, 6, None);
    spoof[6..12].copy_from_slice(&B);
    b.send(&spoof).unwrap();
    b.send(&client(B, DhcpMessageType::Discover, 7, None))
        .unwrap();
    assert_eq!(
        answer(&b.recv(WAIT).unwrap().unwrap()).1,
        Ipv4Addr::new(10, 0, 0, 101)
    );
    assert_eq!(b.try_recv().unwrap(), None);
}
