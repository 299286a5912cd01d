//! The D-Bus interface `org.atoll.Vmm1`.
//!
//! Object `/org/atoll/Vmm1` carries the supervisor's own state and an
//! `org.freedesktop.DBus.ObjectManager`; one object per VM will appear below it at
//! `/org/atoll/Vmm1/vm/<uuid>`.

use std::time::{SystemTime, UNIX_EPOCH};

use zbus::{interface, proxy};

use crate::health::Health;

/// Well-known bus name owned by `vmm daemon`.
pub const BUS_NAME: &str = "org.atoll.Vmm1";
/// Path of the supervisor object.
pub const OBJECT_PATH: &str = "/org/atoll/Vmm1";

/// State behind the `org.atoll.Vmm1` interface.
#[derive(Debug)]
pub struct Vmm1 {
    node_id: String,
    started_at_us: u64,
    health: Health,
}

impl Vmm1 {
    /// Creates the interface state for a supervisor that starts now.
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

/// The node's VM supervisor: creates VMs, one process each, and reports on them.
#[interface(name = "org.atoll.Vmm1")]
impl Vmm1 {
    /// Version of the vmm daemon (semantic version).
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// Identifier of the node this supervisor runs on.
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

    /// When this supervisor started, in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// KVM API version of /dev/kvm (12 on every supported kernel), 0 when KVM is unusable.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kvm_api_version(&self) -> u32 {
        self.health.kvm_api_version
    }
}

/// Typed client of `org.atoll.Vmm1`.
#[proxy(
    interface = "org.atoll.Vmm1",
    default_service = "org.atoll.Vmm1",
    default_path = "/org/atoll/Vmm1"
)]
pub trait Vmm1 {
    /// Version of the vmm daemon.
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
    /// KVM API version, 0 when KVM is unusable.
    #[zbus(property)]
    fn kvm_api_version(&self) -> zbus::Result<u32>;
}
