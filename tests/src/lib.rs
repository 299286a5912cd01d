//! Test harness shared by Atoll's crates: the built binaries, a private D-Bus broker,
//! a whole node started with `atoll up`, and the contract every daemon keeps on D-Bus.
//!
//! Everything here panics with a message on failure: it is only for tests.

pub mod bins;
pub mod bus;
pub mod contract;
pub mod net_echo;
pub mod net_frontend;
pub mod node;

pub use bus::TestBus;
pub use node::Node;

use std::time::{Duration, Instant};

/// Polls `check` every few milliseconds until it returns `Some`, panicking with
/// `what` after `timeout`. For conditions that have no event to wait on (a foreign
/// process disappearing).
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
