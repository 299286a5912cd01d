//! The router's DNS for names that are not the VPC's: forwarded to the
//! node's resolvers (`netd --dns-upstream`, by default the nameservers of
//! the host's /etc/resolv.conf) from a socket of the host, and the answer
//! handed back to the VM as the router's. Only VPCs with a gateway forward:
//! an isolated VPC stays isolated. Without resolvers the router refuses
//! such names (the guest moves on to the next server DHCP gave).
//!
//! Each forwarded query gets a fresh random identifier (the guest's is
//! restored in the answer), an answer is taken only from the resolver the
//! query went to, and queries unanswered after [`QUERY_TIMEOUT`] are
//! forgotten (the guest asks again). At most [`MAX_PENDING`] wait at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::frame::Mac;
use crate::port::Port;

/// How long a forwarded query waits for its answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarded queries waiting at most.
pub const MAX_PENDING: usize = 4096;
/// Largest answer relayed (a UDP datagram a guest may ask for with EDNS).
const MAX_ANSWER: usize = 4096;

/// Where an answer goes back to: the VM's port, its addresses and port,
/// the router's addresses it asked.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The VM's port.
    pub port: Weak<Port>,
    /// (router's MAC, VM's MAC).
    pub macs: (Mac, Mac),
    /// (router's address the query went to, VM's address).
    pub ends: (IpAddr, IpAddr),
    /// The VM's UDP port.
    pub sport: u16,
}

#[derive(Debug)]
struct Pending {
    asker: Asker,
    id: u16,
    to: SocketAddr,
    sent: Instant,
}

/// The forwarder: its socket and the queries in flight.
#[derive(Debug)]
pub struct Forwarder {
    socket: UdpSocket,
    upstreams: Vec<SocketAddr>,
    pending: Mutex<HashMap<u16, Pending>>,
}

impl Forwarder {
    /// A forwarder to `upstreams` (None if there are none, or no socket).
    pub fn new(upstreams: Vec<SocketAddr>) -> Option<Arc<Self>> {
        if upstreams.is_empty() {
            return None;
        }
        // One socket for both families where the host has IPv6.
        let socket = UdpSocket::bind("[::]:0")
            .or_else(|_| UdpSocket::bind("0.0.0.0:0"))
            .map_err(|e| warn!("DNS forwarding off: no socket: {e}"))
            .ok()?;
        socket.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        Some(Arc::new(Self {
            socket,
            upstreams,
            pending: Mutex::new(HashMap::new()),
        }))
    }

    /// The resolvers queries go to.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Sends the guest's query `msg` on, for `asker`; false if it could not
    /// (too many waiting, a malformed message, the send failed).
    pub fn forward(&self, msg: &[u8], asker: Asker, now: Instant) -> bool {
        let Some(orig) = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return false;
        };
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, p| now.saturating_duration_since(p.sent) < QUERY_TIMEOUT);
            if pending.len() >= MAX_PENDING {
                return false;
            }
        }
        let Some(id) = (0..8)
            .map(|_| random_u16())
            .find(|id| !pending.contains_key(id))
        else {
            return false;
        };
        let to = self.upstreams[usize::from(id) % self.upstreams.len()];
        let mut out = msg.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        let to_sent = match (to, self.socket.local_addr()) {
            // An IPv4 resolver from a dual-stack socket: as a mapped address.
            (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => to,
        };
        if let Err(e) = self.socket.send_to(&out, to_sent) {
            debug!(%to, "DNS query not forwarded: {e}");
            return false;
        }
        pending.insert(
            id,
            Pending {
                asker,
                id: orig,
                to,
                sent: now,
            },
        );
        true
    }

    /// Reads answers until the socket's timeout; each goes back to its
    /// asker through `reply` (the answer with the guest's identifier).
    /// False when the socket failed.
    pub fn receive(&self, reply: impl Fn(&Asker, &[u8])) -> bool {
        let mut buf = [0u8; MAX_ANSWER];
        let (n, from) = match self.socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.expire(Instant::now());
                return true;
            }
            Err(e) => {
                warn!("DNS forwarding socket: {e}");
                return false;
            }
        };
        let Some(answer) = buf.get(..n).filter(|a| a.len() >= 12 && a[2] & 0x80 != 0) else {
            return true;
        };
        let id = u16::from_be_bytes([answer[0], answer[1]]);
        let from = unmapped(from);
        let p = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            // Only the resolver the query went to may answer it.
            match pending.get(&id) {
                Some(p) if p.to == from => pending.remove(&id),
                _ => None,
            }
        };
        let Some(p) = p else {
            debug!(%from, "a DNS answer nobody waits for");
            return true;
        };
        let mut back = answer.to_vec();
        back[..2].copy_from_slice(&p.id.to_be_bytes());
        reply(&p.asker, &back);
        true
    }

    /// Forgets queries older than [`QUERY_TIMEOUT`].
    fn expire(&self, now: Instant) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, p| now.saturating_duration_since(p.sent) < QUERY_TIMEOUT);
    }

    /// Queries waiting for answers.
    pub fn waiting(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// `a` with an IPv4-mapped IPv6 address turned back into IPv4.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: the pointer and length describe `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        // No entropy source: the time's low bits still vary.
        let t = Instant::now().elapsed().subsec_nanos()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        return u16::try_from((t ^ (t >> 16)) & 0xffff).unwrap_or(0);
    }
    u16::from_ne_bytes(b)
}

/// The nameservers of `resolv_conf` (a resolv.conf's text), port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        // A link-local resolver needs its interface, which a socket of
        // the host cannot name here.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let text = "# comment\nnameserver 192.0.2.53\nsearch lan\nnameserver fe80::1%eth0\nnameserver bogus\nnameserver 2001:db8::53\n";
        assert_eq!(
            nameservers(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }
}
