//! A frame from a guest: Ethernet, 802.1Q, ARP and IPv4 parsing and the MAC
//! table's forwarding decision.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netd::fuzzing::frame(data));
