//! The learning part of the switch: which port a MAC address was last seen
//! on, per L2 segment, with ageing. Frames to unknown, broadcast or
//! multicast addresses flood the segment they came from and nothing else.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::frame::{is_group, Mac};

/// An L2 segment: a flat network, one VLAN, or one overlay network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u32);

/// A switch port (a VM NIC, an uplink, a tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// To one port.
    Port(PortId),
    /// To every port of the segment but the one it came in on.
    Flood,
    /// Nowhere: the destination sits behind the port it came in on.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    seen: Instant,
}

/// MAC addresses learned per segment.
#[derive(Debug)]
pub struct MacTable {
    ageing: Duration,
    max_entries: usize,
    /// Randomly keyed, so guests cannot choose colliding addresses; by
    /// [`key`].
    entries: HashMap<u128, Entry, ahash::RandomState>,
}

/// A segment and an address as one word: one step of the hasher for a
/// lookup, which every frame makes twice.
fn key(segment: SegmentId, mac: Mac) -> u128 {
    let mut m = [0u8; 8];
    m[2..].copy_from_slice(&mac);
    u128::from(segment.0) << 64 | u128::from(u64::from_be_bytes(m))
}

/// The segment of a [`key`].
fn key_segment(k: u128) -> SegmentId {
    SegmentId(u32::try_from(k >> 64).unwrap_or(u32::MAX))
}

impl MacTable {
    /// A table forgetting addresses not seen for `ageing`, holding at most
    /// `max_entries` (past that, new addresses are not learned and frames to
    /// them flood: a guest inventing source addresses cannot push others out).
    pub fn new(ageing: Duration, max_entries: usize) -> Self {
        Self {
            ageing,
            max_entries,
            entries: HashMap::default(),
        }
    }

    /// Learns `src` behind `in_port` and decides where a frame to `dst` goes.
    pub fn forward(
        &mut self,
        segment: SegmentId,
        in_port: PortId,
        src: Mac,
        dst: Mac,
        now: Instant,
    ) -> Forward {
        self.learn(segment, src, in_port, now);
        if is_group(&dst) {
            return Forward::Flood;
        }
        match self.lookup(segment, dst, now) {
            Some(p) if p == in_port => Forward::Drop,
            Some(p) => Forward::Port(p),
            None => Forward::Flood,
        }
    }

    /// Records that `src` sits behind `port` (a move replaces the old port).
    pub fn learn(&mut self, segment: SegmentId, src: Mac, port: PortId, now: Instant) {
        if is_group(&src) || src == [0; 6] {
            return;
        }
        let key = key(segment, src);
        if let Some(e) = self.entries.get_mut(&key) {
            *e = Entry { port, seen: now };
            return;
        }
        if self.entries.len() >= self.max_entries {
            self.expire(now);
            if self.entries.len() >= self.max_entries {
                return;
            }
        }
        self.entries.insert(key, Entry { port, seen: now });
    }

    /// The port `dst` was last seen on, unless that is older than the ageing
    /// time.
    pub fn lookup(&self, segment: SegmentId, dst: Mac, now: Instant) -> Option<PortId> {
        self.entries
            .get(&key(segment, dst))
            .filter(|e| now.saturating_duration_since(e.seen) < self.ageing)
            .map(|e| e.port)
    }

    /// Drops every entry older than the ageing time.
    pub fn expire(&mut self, now: Instant) {
        let ageing = self.ageing;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.seen) < ageing);
    }

    /// Forgets every address learned on `segment` (the network went away).
    pub fn forget_segment(&mut self, segment: SegmentId) {
        self.entries.retain(|k, _| key_segment(*k) != segment);
    }

    /// Forgets every address behind `port` (the port went away).
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    /// Entries held (aged ones included until the next expiry).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::BROADCAST;

    const A: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 2];
    const S1: SegmentId = SegmentId(1);
    const S2: SegmentId = SegmentId(2);
    const P1: PortId = PortId(1);
    const P2: PortId = PortId(2);
    const P3: PortId = PortId(3);

    fn table() -> MacTable {
        MacTable::new(Duration::from_secs(300), 16)
    }

    #[test]
    fn unknown_floods_then_the_reply_teaches_both_sides() {
        let mut t = table();
        let now = Instant::now();
        assert_eq!(t.forward(S1, P1, A, B, now), Forward::Flood);
        assert_eq!(t.forward(S1, P2, B, A, now), Forward::Port(P1));
        assert_eq!(t.forward(S1, P1, A, B, now), Forward::Port(P2));
        assert_eq!(t.forward(S1, P1, A, BROADCAST, now), Forward::Flood);
    }

    #[test]
    fn segments_do_not_share_what_they_learn() {
        let mut t = table();
        let now = Instant::now();
        t.learn(S1, B, P2, now);
        assert_eq!(t.forward(S2, P3, A, B, now), Forward::Flood);
        t.learn(S2, B, P3, now);
        assert_eq!(t.lookup(S1, B, now), Some(P2));
        assert_eq!(t.lookup(S2, B, now), Some(P3));
    }

    #[test]
    fn entries_age_move_and_leave_with_their_port() {
        let mut t = MacTable::new(Duration::from_secs(10), 16);
        let t0 = Instant::now();
        t.learn(S1, B, P2, t0);
        assert_eq!(t.lookup(S1, B, t0 + Duration::from_secs(9)), Some(P2));
        assert_eq!(t.lookup(S1, B, t0 + Duration::from_secs(10)), None);
        t.learn(S1, B, P3, t0 + Duration::from_secs(11));
        assert_eq!(t.lookup(S1, B, t0 + Duration::from_secs(12)), Some(P3));
        // A frame to an address behind the port it came from goes nowhere.
        assert_eq!(
            t.forward(S1, P3, A, B, t0 + Duration::from_secs(12)),
            Forward::Drop
        );
        t.forget_port(P3);
        assert_eq!(t.lookup(S1, B, t0 + Duration::from_secs(12)), None);
        t.expire(t0 + Duration::from_secs(30));
        assert!(t.is_empty());
        // A segment that goes takes its addresses, and only them.
        t.learn(S1, A, P1, t0);
        t.learn(S2, A, P2, t0);
        t.forget_segment(S1);
        assert_eq!(t.lookup(S1, A, t0), None);
        assert_eq!(t.lookup(S2, A, t0), Some(P2));
    }

    #[test]
    fn group_sources_are_not_learned_and_a_full_table_keeps_what_it_has() {
        let mut t = MacTable::new(Duration::from_secs(300), 2);
        let now = Instant::now();
        t.learn(S1, BROADCAST, P1, now);
        t.learn(S1, [0x01, 0, 0x5e, 0, 0, 1], P1, now);
        assert!(t.is_empty());
        t.learn(S1, A, P1, now);
        t.learn(S1, B, P2, now);
        t.learn(S1, [0x52, 0x54, 0, 0, 0, 9], P3, now);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(S1, A, now), Some(P1));
        assert_eq!(t.lookup(S1, B, now), Some(P2));
    }
}
