//! The D-Bus interface `org.atoll.Storage1`.
//!
//! Object `/org/atoll/Storage1` carries the storage daemon's own state and an
//! `org.freedesktop.DBus.ObjectManager`; pools, volumes and jobs will appear below it
//! (`/org/atoll/Storage1/volume/<uuid>`, `/org/atoll/Storage1/job/<id>`).

use std::time::{SystemTime, UNIX_EPOCH};

use zbus::{interface, proxy};

use crate::health::Health;

/// Well-known bus name owned by `stord`.
pub const BUS_NAME: &str = "org.atoll.Storage1";
/// Path of the storage daemon object.
pub const OBJECT_PATH: &str = "/org/atoll/Storage1";

/// State behind the `org.atoll.Storage1` interface.
#[derive(Debug)]
pub struct Storage1 {
    node_id: String,
    started_at_us: u64,
    health: Health,
}

impl Storage1 {
    /// Creates the interface state for a storage daemon that starts now.
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

/// The node's volume store: pools, volumes, snapshots and their vhost-user-blk attachments.
#[interface(name = "org.atoll.Storage1")]
impl Storage1 {
    /// Version of the stord (semantic version).
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// Identifier of the node this storage daemon runs on.
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

    /// When this storage daemon started, in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// Whether the kernel lets stord set up an io_uring, which volume I/O runs on.
    #[zbus(property)]
    fn io_uring_available(&self) -> bool {
        self.health.io_uring_available
    }
}

/// Typed client of `org.atoll.Storage1`.
#[proxy(
    interface = "org.atoll.Storage1",
    default_service = "org.atoll.Storage1",
    default_path = "/org/atoll/Storage1"
)]
pub trait Storage1 {
    /// Version of the stord.
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
    /// Whether the kernel lets stord set up an io_uring, which volume I/O runs on.
    #[zbus(property)]
    fn io_uring_available(&self) -> zbus::Result<bool>;
}
