//! What the network daemon checks to call itself healthy.

use std::fs::OpenOptions;

/// Health of the network daemon, as published in the `Health` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `ok`, `degraded` or `failed`.
    pub state: &'static str,
    /// Why the state is not `ok`; empty when it is.
    pub detail: String,
    /// Whether `/dev/net/tun` can be opened (needed for TAP uplinks).
    pub tun_available: bool,
}

impl Health {
    /// Marks it degraded for `why` too (after any other reason).
    pub fn degrade(&mut self, why: &str) {
        self.state = "degraded";
        self.detail = if self.detail.is_empty() {
            why.to_owned()
        } else {
            format!("{}; {why}", self.detail)
        };
    }
}

/// Probes `/dev/net/tun`: without it the switch still serves VM ports, but cannot
/// reach the host network through a TAP uplink.
pub fn probe() -> Health {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Health {
            state: "ok",
            detail: String::new(),
            tun_available: true,
        },
        Err(e) => Health {
            state: "degraded",
            detail: format!("/dev/net/tun unavailable: {e}"),
            tun_available: false,
        },
    }
}
