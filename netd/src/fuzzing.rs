//! Entry points for fuzzing what guests control: frames as a port receives
//! them. `netd/fuzz` wraps them as cargo-fuzz targets; the unit tests run them
//! over pseudo-random input.

use std::time::Instant;

use crate::frame::{Arp, Ethernet, Ipv4, ETHERTYPE_ARP, ETHERTYPE_IPV4};
use crate::l2::{MacTable, PortId, SegmentId};

/// Parses `data` as a frame the way the switch does and feeds its addresses
/// to a MAC table; must never panic.
pub fn frame(data: &[u8]) {
    let Ok(eth) = Ethernet::parse(data) else {
        return;
    };
    match eth.ethertype {
        ETHERTYPE_ARP => {
            if let Ok(a) = Arp::parse(eth.payload) {
                let _ = a.reply_from([0x52, 0x54, 0, 0, 0, 1]).to_frame(a.sha);
            }
        }
        ETHERTYPE_IPV4 => {
            let _ = Ipv4::parse(eth.payload);
        }
        _ => {}
    }
    let mut table = MacTable::new(std::time::Duration::from_secs(1), 4);
    let now = Instant::now();
    let seg = SegmentId(u32::from(eth.vlan.unwrap_or(0)));
    let _ = table.forward(seg, PortId(1), eth.src, eth.dst, now);
    let _ = table.forward(seg, PortId(2), eth.dst, eth.src, now);
}

#[cfg(test)]
mod tests {
    #[test]
    fn pseudo_random_frames_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        };
        for i in 0..5000usize {
            let len = i % 200;
            let mut buf: Vec<u8> = (0..len).map(|_| next()).collect();
            // Steer some inputs into the ARP and IPv4 parsers.
            if len > 14 {
                let t = match i % 3 {
                    0 => [0x08, 0x06],
                    1 => [0x08, 0x00],
                    _ => [0x81, 0x00],
                };
                buf[12..14].copy_from_slice(&t);
            }
            super::frame(&buf);
        }
    }
}
