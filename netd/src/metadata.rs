//! The guest metadata service on 169.254.169.254:80, answered inside the
//! switch: each port has its own TCP endpoint (smoltcp over raw IP), so a
//! VM only ever reads its own data. Paths follow EC2
//! (`/latest/user-data`, `/latest/meta-data/...`) and cloud-init's NoCloud
//! over HTTP (`/nocloud/user-data`, `/nocloud/meta-data`,
//! `/nocloud/vendor-data`).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// The service's address.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Largest user-data accepted.
pub const MAX_USER_DATA: usize = 65_536;
/// Connections served at once per VM.
const SOCKETS: usize = 8;
/// The longest request head read.
const MAX_REQUEST: usize = 8192;

/// What a VM is told about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Its user-data (cloud-config, a script...).
    pub user_data: Vec<u8>,
    /// SSH public keys.
    pub ssh_keys: Vec<String>,
    /// Its host name.
    pub hostname: String,
    /// Its instance id.
    pub instance_id: String,
    /// Its address.
    pub ip: Option<Ipv4Addr>,
}

/// The status and body for `path`.
pub fn respond(path: &str, md: &Metadata) -> (u16, Vec<u8>) {
    let text = |s: String| (200, s.into_bytes());
    let ip = md.ip.map(|i| i.to_string()).unwrap_or_default();
    let keys = || {
        md.ssh_keys
            .iter()
            .enumerate()
            .map(|(i, _)| format!("{i}=key{i}\n"))
            .collect::<String>()
    };
    match path.trim_end_matches('/') {
        "/latest/user-data" | "/nocloud/user-data" => (200, md.user_data.clone()),
        "/latest/meta-data" => {
            text("hostname\ninstance-id\nlocal-hostname\nlocal-ipv4\npublic-keys/\n".into())
        }
        "/latest/meta-data/instance-id" => text(md.instance_id.clone()),
        "/latest/meta-data/hostname" | "/latest/meta-data/local-hostname" => {
            text(md.hostname.clone())
        }
        "/latest/meta-data/local-ipv4" => text(ip),
        "/latest/meta-data/public-keys" => text(keys()),
        "/nocloud/meta-data" => {
            let mut y = format!(
                "instance-id: {}\nlocal-hostname: {}\n",
                md.instance_id, md.hostname
            );
            if !md.ssh_keys.is_empty() {
                y.push_str("public-keys:\n");
                for k in &md.ssh_keys {
                    y.push_str(&format!("  - \"{}\"\n", k.replace('"', "")));
                }
            }
            text(y)
        }
        "/nocloud/vendor-data" => text(String::new()),
        "/latest" => text("meta-data/\nuser-data\n".into()),
        p => {
            let key = p
                .strip_prefix("/latest/meta-data/public-keys/")
                .and_then(|r| r.split_once('/'))
                .filter(|(_, what)| *what == "openssh-key")
                .and_then(|(n, _)| n.parse::<usize>().ok())
                .and_then(|n| md.ssh_keys.get(n));
            match key {
                Some(k) => text(format!("{k}\n")),
                None => (404, b"not found\n".to_vec()),
            }
        }
    }
}

/// IP packets in and out of an endpoint.
#[derive(Debug, Default)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

/// One connection's progress.
#[derive(Debug, Default)]
struct Conn {
    request: Vec<u8>,
    response: Vec<u8>,
    answered: bool,
}

/// One VM's TCP endpoint for the service.
pub struct Endpoint {
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<(SocketHandle, Conn)>,
    dev: Queue,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

fn stamp(since: Duration) -> SInstant {
    SInstant::from_micros(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
}

impl Endpoint {
    /// An endpoint listening on port 80 of the service address.
    pub fn new(now: Duration) -> Self {
        let mut dev = Queue::default();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, stamp(now));
        iface.update_ip_addrs(|a| {
            let o = ADDRESS.octets();
            let _ = a.push(IpCidr::new(IpAddress::v4(o[0], o[1], o[2], o[3]), 32));
        });
        // Raw IP: the "router" is never asked for; replies go straight back.
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(169, 254, 169, 253));
        let mut sockets = SocketSet::new(Vec::new());
        let mut conns = Vec::new();
        for _ in 0..SOCKETS {
            let rx = tcp::SocketBuffer::new(vec![0; MAX_REQUEST]);
            let tx = tcp::SocketBuffer::new(vec![0; MAX_USER_DATA + 1024]);
            let mut s = tcp::Socket::new(rx, tx);
            let _ = s.listen(80);
            conns.push((sockets.add(s), Conn::default()));
        }
        Self {
            iface,
            sockets,
            conns,
            dev: Queue::default(),
        }
    }

    /// Feeds an IPv4 packet from the VM (None: only timers) and returns the
    /// IPv4 packets for it.
    pub fn poll(&mut self, packet: Option<&[u8]>, now: Duration, md: &Metadata) -> Vec<Vec<u8>> {
        if let Some(p) = packet {
            self.dev.rx.push_back(p.to_vec());
        }
        let t = stamp(now);
        for _ in 0..4 {
            self.iface.poll(t, &mut self.dev, &mut self.sockets);
            if !self.serve(md) {
                break;
            }
        }
        std::mem::take(&mut self.dev.tx)
    }

    /// Reads requests and writes answers; true if anything moved.
    fn serve(&mut self, md: &Metadata) -> bool {
        let mut moved = false;
        for (h, c) in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if s.state() == tcp::State::TimeWait {
                // Done: free the socket for the next request now rather than
                // after TIME-WAIT.
                s.abort();
            }
            if !s.is_open() {
                *c = Conn::default();
                let _ = s.listen(80);
                continue;
            }
            while s.can_recv() && !c.answered {
                let mut buf = [0u8; 1024];
                match s.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.request.extend_from_slice(&buf[..n]);
                        moved = true;
                    }
                }
                if c.request.len() > MAX_REQUEST {
                    c.response = http(400, b"request too long\n");
                    c.answered = true;
                }
            }
            if !c.answered && c.request.windows(4).any(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&c.request).into_owned();
                let mut parts = head.split_whitespace();
                c.response = match (parts.next(), parts.next()) {
                    (Some("GET"), Some(path)) => {
                        let (status, body) = respond(path, md);
                        http(status, &body)
                    }
                    (Some(_), Some(_)) => http(405, b"GET only\n"),
                    _ => http(400, b"bad request\n"),
                };
                c.answered = true;
            }
            if c.answered && !c.response.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(&c.response) {
                    c.response.drain(..n);
                    moved = true;
                }
            }
            if c.answered && c.response.is_empty() && s.may_send() {
                s.close();
                moved = true;
            }
        }
        moved
    }

    /// When the endpoint next needs a poll without input.
    pub fn next_poll(&mut self, now: Duration) -> Option<Duration> {
        self.iface
            .poll_delay(stamp(now), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }
}

fn http(status: u16, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_answer_what_the_vm_was_given() {
        let md = Metadata {
            user_data: b"#cloud-config\n".to_vec(),
            ssh_keys: vec!["ssh-ed25519 AAAA admin".into()],
            hostname: "web1".into(),
            instance_id: "atoll-port-3".into(),
            ip: Some(Ipv4Addr::new(10, 0, 0, 5)),
        };
        assert_eq!(
            respond("/latest/user-data", &md),
            (200, md.user_data.clone())
        );
        assert_eq!(
            respond("/latest/meta-data/public-keys/0/openssh-key", &md).1,
            b"ssh-ed25519 AAAA admin\n"
        );
        assert_eq!(
            respond("/latest/meta-data/public-keys/1/openssh-key", &md).0,
            404
        );
        assert_eq!(respond("/latest/meta-data/local-ipv4", &md).1, b"10.0.0.5");
        let nc = String::from_utf8(respond("/nocloud/meta-data", &md).1).unwrap();
        assert!(nc.contains("instance-id: atoll-port-3") && nc.contains("local-hostname: web1"));
        assert_eq!(respond("/etc/passwd", &md).0, 404);
    }
}
