//! Connection tracking for one port: which connections its security groups
//! let in or out, so that their return traffic passes without a rule.
//!
//! An entry is made when a packet passes the rules (in the direction the
//! rules were checked) and then matches both directions of the connection.
//! Entries expire after a time that depends on the protocol and on what
//! was seen: a TCP connection that closed (FIN both ways, or RST) lingers for
//! seconds, an established one for hours.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::flow::{
    Flow, Packet, Tracked, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// Direction relative to the port's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// Towards the VM.
    Ingress,
    /// From the VM.
    Egress,
}

/// TCP before the reply.
const TCP_OPENING: Duration = Duration::from_secs(120);
/// An established TCP connection without traffic.
const TCP_ESTABLISHED: Duration = Duration::from_secs(5 * 24 * 3600);
/// A TCP connection after FIN both ways or RST.
const TCP_CLOSED: Duration = Duration::from_secs(10);
/// UDP before a reply.
const UDP_UNREPLIED: Duration = Duration::from_secs(30);
/// UDP once replied.
const UDP_REPLIED: Duration = Duration::from_secs(180);
/// ICMP echo and anything else.
const OTHER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Conn<F> {
    /// The flow as first seen.
    orig: F,
    /// The direction the rules let it through.
    dir: Direction,
    expires: Instant,
    replied: bool,
    /// FIN seen from the originator (bit 0) and from the responder (bit 1).
    fins: u8,
    reset: bool,
}

impl<F: Tracked> Conn<F> {
    fn timeout(&self) -> Duration {
        match self.orig.proto() {
            PROTO_TCP if self.reset || self.fins == 3 => TCP_CLOSED,
            PROTO_TCP if self.replied => TCP_ESTABLISHED,
            PROTO_TCP => TCP_OPENING,
            PROTO_UDP if self.replied => UDP_REPLIED,
            PROTO_UDP => UDP_UNREPLIED,
            PROTO_ICMP => OTHER,
            _ => OTHER,
        }
    }
}

/// One port's connections (of one address family: IPv4 by default).
#[derive(Debug)]
pub struct Conntrack<F = Flow> {
    /// Randomly keyed, so guests cannot choose colliding flows.
    conns: HashMap<F, Conn<F>, ahash::RandomState>,
    max: usize,
}

/// The key both directions of a connection share.
fn key<F: Tracked>(f: &F) -> F {
    let r = f.reversed();
    if r < *f {
        r
    } else {
        *f
    }
}

impl<F: Tracked> Conntrack<F> {
    /// A tracker holding at most `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            conns: HashMap::default(),
            max,
        }
    }

    /// Whether `p` belongs to a tracked connection (either direction); the
    /// connection's state and expiry are updated.
    pub fn track(&mut self, p: &Packet<F>, now: Instant) -> bool {
        let k = key(&p.flow);
        let Some(c) = self.conns.get_mut(&k) else {
            return false;
        };
        if c.expires <= now {
            self.conns.remove(&k);
            return false;
        }
        let reply = p.flow != c.orig;
        let syn_only = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if p.flow.proto() == PROTO_TCP && syn_only && (c.reset || c.fins == 3) {
            // A new connection on the ports of a closed one: the rules decide
            // again.
            self.conns.remove(&k);
            return false;
        }
        if reply {
            c.replied = true;
        }
        if p.flow.proto() == PROTO_TCP {
            if p.tcp_flags & TCP_RST != 0 {
                c.reset = true;
            }
            if p.tcp_flags & TCP_FIN != 0 {
                c.fins |= if reply { 2 } else { 1 };
            }
        }
        c.expires = now + c.timeout();
        true
    }

    /// Whether `p` passes in `dir`: part of a tracked connection, or the
    /// first packet of one that `allowed` (the rules, asked only then) lets
    /// through, which is then tracked.
    pub fn admit(
        &mut self,
        p: &Packet<F>,
        dir: Direction,
        now: Instant,
        allowed: impl FnOnce() -> bool,
    ) -> bool {
        self.track(p, now) || (allowed() && self.commit(p, dir, now))
    }

    /// Whether `flow` (either direction) is a live tracked connection: an
    /// ICMP error about one of its packets is let in with it. Nothing is
    /// updated.
    pub fn related(&self, flow: &F, now: Instant) -> bool {
        self.conns.get(&key(flow)).is_some_and(|c| c.expires > now)
    }

    /// Records `p` as the first packet of a connection the rules let
    /// through in `dir`. False if the table is full (the packet is dropped).
    pub fn commit(&mut self, p: &Packet<F>, dir: Direction, now: Instant) -> bool {
        if self.conns.len() >= self.max {
            self.conns.retain(|_, c| c.expires > now);
            if self.conns.len() >= self.max {
                return false;
            }
        }
        let mut c = Conn {
            orig: p.flow,
            dir,
            expires: now,
            replied: false,
            fins: 0,
            reset: p.tcp_flags & TCP_RST != 0,
        };
        c.expires = now + c.timeout();
        self.conns.insert(key(&p.flow), c);
        true
    }

    /// Keeps the connections `allowed` still lets through (given their
    /// original flow and direction): called when rules change.
    pub fn revalidate(&mut self, mut allowed: impl FnMut(&F, Direction) -> bool) {
        self.conns.retain(|_, c| allowed(&c.orig, c.dir));
    }

    /// Connections held (expired ones included until they are looked at).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Forgets every connection.
    pub fn clear(&mut self) {
        self.conns.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn tcp(src: u8, dst: u8, sport: u16, dport: u16, flags: u8) -> Packet {
        Packet {
            flow: Flow {
                proto: PROTO_TCP,
                src: Ipv4Addr::new(10, 0, 0, src),
                dst: Ipv4Addr::new(10, 0, 0, dst),
                sport,
                dport,
            },
            tcp_flags: flags,
            icmp_type: None,
        }
    }

    #[test]
    fn a_connection_matches_both_ways_until_it_closes() {
        let mut ct = Conntrack::new(8);
        let t = Instant::now();
        let syn = tcp(1, 2, 40000, 22, TCP_SYN);
        assert!(!ct.track(&syn, t));
        assert!(ct.commit(&syn, Direction::Egress, t));
        assert!(ct.track(&tcp(2, 1, 22, 40000, TCP_SYN | TCP_ACK), t));
        // Other ports are another connection.
        assert!(!ct.track(&tcp(2, 1, 23, 40000, TCP_ACK), t));
        // Established: still there after an hour.
        let later = t + Duration::from_secs(3600);
        assert!(ct.track(&tcp(1, 2, 40000, 22, TCP_ACK), later));
        assert!(ct.track(&tcp(1, 2, 40000, 22, TCP_FIN | TCP_ACK), later));
        assert!(ct.track(&tcp(2, 1, 22, 40000, TCP_FIN | TCP_ACK), later));
        // Closed: gone after its linger time.
        assert!(!ct.track(
            &tcp(1, 2, 40000, 22, TCP_ACK),
            later + TCP_CLOSED + Duration::from_secs(1)
        ));
        assert!(ct.is_empty());
    }

    #[test]
    fn unreplied_udp_expires_and_a_full_table_refuses() {
        let mut ct = Conntrack::new(1);
        let t = Instant::now();
        let mut p = tcp(1, 2, 5000, 53, 0);
        p.flow.proto = PROTO_UDP;
        assert!(ct.commit(&p, Direction::Egress, t));
        let mut q = p;
        q.flow.sport = 5001;
        assert!(!ct.commit(&q, Direction::Egress, t));
        assert!(ct.commit(&q, Direction::Egress, t + UDP_UNREPLIED));
        assert!(!ct.track(&p, t + UDP_UNREPLIED));
    }

    #[test]
    fn revalidation_keeps_what_is_still_allowed() {
        let mut ct = Conntrack::new(8);
        let t = Instant::now();
        ct.commit(&tcp(1, 2, 1, 22, TCP_SYN), Direction::Ingress, t);
        ct.commit(&tcp(1, 2, 1, 80, TCP_SYN), Direction::Ingress, t);
        ct.revalidate(|f, d| d == Direction::Ingress && f.dport == 22);
        assert!(ct.track(&tcp(2, 1, 22, 1, TCP_ACK), t));
        assert!(!ct.track(&tcp(2, 1, 80, 1, TCP_ACK), t));
    }
}
