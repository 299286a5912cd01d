//! The D-Bus interface `org.atoll.Net1`.
//!
//! Object `/org/atoll/Net1` carries the network daemon's own state and an
//! `org.freedesktop.DBus.ObjectManager`; networks, subnets and ports will appear below it
//! (`/org/atoll/Net1/network/<uuid>`, `/org/atoll/Net1/port/<uuid>`).

use std::time::{SystemTime, UNIX_EPOCH};

use zbus::{interface, proxy};

use crate::health::Health;

/// Well-known bus name owned by `netd`.
pub const BUS_NAME: &str = "org.atoll.Net1";
/// Path of the network daemon object.
pub const OBJECT_PATH: &str = "/org/atoll/Net1";

/// State behind the `org.atoll.Net1` interface.
#[derive(Debug)]
pub struct Net1 {
    node_id: String,
    started_at_us: u64,
    health: Health,
}

impl Net1 {
    /// Creates the interface state for a network daemon that starts now.
    pub fn new(node_id: String, health: Health) -> Self {
        Self {
            node_id,
            started_at_us: now_us(),
            health,
        }
    }
}

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The node's virtual switch: networks, ports, security groups and the services answered inside it.
#[interface(name = "org.atoll.Net1")]
impl Net1 {
    /// Version of the netd (semantic version).
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// Identifier of the node this network daemon runs on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn node_id(&self) -> String {
        self.node_id.clone()
    }

    /// "ok", "degraded" (running but cannot do everything, see HealthDetail) or "failed".
    #[zbus(property)]
    fn health(&self) -> String {
        self.health.state.to_owned()
    }

    /// Why Health is not "ok"; empty when it is.
    #[zbus(property)]
    fn health_detail(&self) -> String {
        self.health.detail.clone()
    }

    /// When this network daemon started, in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// Whether /dev/net/tun can be opened, which TAP uplinks need.
    #[zbus(property)]
    fn tun_available(&self) -> bool {
        self.health.tun_available
    }
}

/// Typed client of `org.atoll.Net1`.
#[proxy(
    interface = "org.atoll.Net1",
    default_service = "org.atoll.Net1",
    default_path = "/org/atoll/Net1"
)]
pub trait Net1 {
    /// Version of the netd.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Identifier of the node.
    #[zbus(property)]
    fn node_id(&self) -> zbus::Result<String>;
    /// "ok", "degraded" or "failed".
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
    /// Why Health is not "ok".
    #[zbus(property)]
    fn health_detail(&self) -> zbus::Result<String>;
    /// Start time in microseconds since the Unix epoch.
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
    /// Whether /dev/net/tun can be opened, which TAP uplinks need.
    #[zbus(property)]
    fn tun_available(&self) -> zbus::Result<bool>;
}
