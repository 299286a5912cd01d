//! The metadata service as a guest reaches it: a real TCP/IP stack
//! (smoltcp) on a vhost-user-net frontend asks http://169.254.169.254/
//! through its default gateway, as cloud-init does.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use atoll_tests::net_frontend::NetFrontend;
use netd::fabric::{Fabric, Kind, PortEntry, SubnetSettings};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// The guest's NIC as a smoltcp device.
struct Nic {
    fe: NetFrontend,
    rx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut NetFrontend);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.send(&buf).unwrap();
        r
    }
}

impl Device for Nic {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(Rx, Tx<'_>)> {
        let f = match self.rx.pop_front() {
            Some(f) => f,
            None => self.fe.try_recv().unwrap()?,
        };
        Some((Rx(f), Tx(&mut self.fe)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.fe))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// A guest: its stack on its port.
struct Guest {
    nic: Nic,
    iface: Interface,
    next_port: u16,
    epoch: Instant,
}

impl Guest {
    fn new(port: &PortEntry, gateway: Ipv4Addr) -> Self {
        let fe = NetFrontend::connect(&port.port.socket).unwrap();
        let mut nic = Nic {
            fe,
            rx: VecDeque::new(),
        };
        let epoch = Instant::now();
        let hw = HardwareAddress::Ethernet(EthernetAddress(port.port.mac));
        let mut iface = Interface::new(Config::new(hw), &mut nic, SInstant::from_micros(0));
        let ip = port.port.security().ip.unwrap().octets();
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), 24))
                .unwrap();
        });
        let g = gateway.octets();
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(g[0], g[1], g[2], g[3]))
            .unwrap();
        Self {
            nic,
            iface,
            next_port: 49_152,
            epoch,
        }
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(i64::try_from(self.epoch.elapsed().as_micros()).unwrap())
    }

    /// GET `path` from the metadata service: (status, body).
    fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        let mut sockets = SocketSet::new(Vec::new());
        let rx = tcp::SocketBuffer::new(vec![0; 128 * 1024]);
        let tx = tcp::SocketBuffer::new(vec![0; 4096]);
        let h = sockets.add(tcp::Socket::new(rx, tx));
        self.next_port += 1;
        sockets
            .get_mut::<tcp::Socket>(h)
            .connect(
                self.iface.context(),
                (IpAddress::v4(169, 254, 169, 254), 80),
                self.next_port,
            )
            .unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n");
        let (mut sent, mut response) = (false, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no answer for {path}");
            let now = self.now();
            self.iface.poll(now, &mut self.nic, &mut sockets);
            let s = sockets.get_mut::<tcp::Socket>(h);
            if s.may_send() && !sent {
                s.send_slice(request.as_bytes()).unwrap();
                sent = true;
            }
            while s.can_recv() {
                s.recv(|b| {
                    response.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            if sent && !s.may_recv() && s.state() != tcp::State::Established {
                s.close();
                self.iface.poll(self.now(), &mut self.nic, &mut sockets);
                break;
            }
            // Nothing to do until a frame comes (or a timer fires).
            if let Some(f) = self.nic.fe.recv(Duration::from_millis(20)).unwrap() {
                self.nic.rx.push_back(f);
            }
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, _) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        let body_at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, response[body_at..].to_vec())
    }
}

#[test]
fn each_vm_reads_its_own_metadata_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fabric::new(dir.path().to_owned()).unwrap();
    let vpc = f.create_vpc("prod").unwrap();
    let net = f
        .create_network("web", Kind::Flat, Some(vpc), false)
        .unwrap();
    f.create_subnet(net, "10.1.0.0/24", SubnetSettings::default())
        .unwrap();
    let a = f.create_port(net, None, None, "web1", None).unwrap();
    let b = f.create_port(net, None, None, "web2", None).unwrap();
    // Big enough to take many segments.
    let mut user_data = b"#cloud-config\nhostname: web1\n".to_vec();
    user_data.extend((0..20_000).map(|i| b'a' + u8::try_from(i % 26).unwrap()));
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAtoll admin@atoll";
    a.port
        .set_metadata(user_data.clone(), vec![key.into()], None);
    b.port.set_metadata(
        b"#cloud-config\nhostname: web2\n".to_vec(),
        Vec::new(),
        None,
    );

    let mut guest = Guest::new(&a, Ipv4Addr::new(10, 1, 0, 1));
    assert_eq!(guest.get("/latest/user-data"), (200, user_data));
    let (status, k) = guest.get("/latest/meta-data/public-keys/0/openssh-key");
    assert_eq!(
        (status, String::from_utf8(k).unwrap()),
        (200, format!("{key}\n"))
    );
    let (_, md) = guest.get("/nocloud/meta-data");
    let md = String::from_utf8(md).unwrap();
    assert!(md.contains("local-hostname: web1"), "{md}");
    assert!(
        md.contains(&format!("instance-id: atoll-port-{}", a.port.id.0)),
        "{md}"
    );
    assert_eq!(guest.get("/latest/meta-data/local-ipv4").1, b"10.1.0.2");
    assert_eq!(guest.get("/nope").0, 404);
    // Request after request, as cloud-init makes them.
    for _ in 0..10 {
        assert_eq!(guest.get("/latest/meta-data/hostname").1, b"web1");
    }

    // The other VM reads its own.
    let mut other = Guest::new(&b, Ipv4Addr::new(10, 1, 0, 1));
    assert_eq!(
        other.get("/latest/user-data"),
        (200, b"#cloud-config\nhostname: web2\n".to_vec())
    );
    assert_eq!(
        other.get("/latest/meta-data/public-keys/0/openssh-key").0,
        404
    );
}
