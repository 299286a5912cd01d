//! D-Bus interfaces owned by this crate.
//!
//! * `org.atoll.Manager1` at `/org/atoll/Manager1`, served by `mgmtd`.
//! * `org.atoll.Supervisor1` at `/org/atoll/Supervisor1`, served by `atoll up` (the
//!   development supervisor), with one `org.atoll.Supervisor1.Service` object per
//!   daemon at `/org/atoll/Supervisor1/service/<name>`. On an installed node systemd
//!   plays this role.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use zbus::{interface, proxy};

/// Well-known bus name owned by `mgmtd`.
pub const MANAGER_BUS_NAME: &str = "org.atoll.Manager1";
/// Path of the manager object.
pub const MANAGER_PATH: &str = "/org/atoll/Manager1";
/// Well-known bus name owned by `atoll up`.
pub const SUPERVISOR_BUS_NAME: &str = "org.atoll.Supervisor1";
/// Path of the supervisor object; services live below it.
pub const SUPERVISOR_PATH: &str = "/org/atoll/Supervisor1";

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Path of the object describing one supervised daemon.
pub fn service_path(name: &str) -> String {
    format!("{SUPERVISOR_PATH}/service/{name}")
}

/// State behind `org.atoll.Manager1`.
#[derive(Debug)]
pub struct Manager1 {
    node_id: String,
    web_url: String,
    started_at_us: u64,
}

impl Manager1 {
    /// Interface state for a manager that starts now and serves the UI at `web_url`.
    pub fn new(node_id: String, web_url: String) -> Self {
        Self {
            node_id,
            web_url,
            started_at_us: now_us(),
        }
    }
}

/// The node's management daemon: REST API, web UI, state and (later) cluster membership.
#[interface(name = "org.atoll.Manager1")]
impl Manager1 {
    /// Version of mgmtd (semantic version).
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// Identifier of the node this daemon runs on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn node_id(&self) -> String {
        self.node_id.clone()
    }

    /// "ok", "degraded" or "failed". mgmtd owns its name only once its database is open
    /// and its HTTPS listener is ready, so a running mgmtd reports "ok".
    #[zbus(property)]
    fn health(&self) -> String {
        "ok".to_owned()
    }

    /// Why Health is not "ok"; empty when it is.
    #[zbus(property)]
    fn health_detail(&self) -> String {
        String::new()
    }

    /// When this daemon started, in microseconds since the Unix epoch.
    #[zbus(property)]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// Address of the web UI and REST API, e.g. https://127.0.0.1:8443.
    #[zbus(property(emits_changed_signal = "const"))]
    fn web_url(&self) -> String {
        self.web_url.clone()
    }
}

/// Typed client of `org.atoll.Manager1`.
#[proxy(
    interface = "org.atoll.Manager1",
    default_service = "org.atoll.Manager1",
    default_path = "/org/atoll/Manager1"
)]
pub trait Manager1 {
    /// Version of mgmtd.
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
    /// Address of the web UI.
    #[zbus(property)]
    fn web_url(&self) -> zbus::Result<String>;
}

/// What the supervisor knows about one daemon; shared between the D-Bus object and
/// the task that runs the daemon.
#[derive(Debug, Clone, Default)]
pub struct ServiceState {
    /// Process id of the running instance, 0 when none runs.
    pub pid: u32,
    /// "starting", "running", "restarting", "stopping" or "stopped".
    pub state: &'static str,
    /// How many times the daemon was restarted after it died.
    pub restarts: u32,
    /// How the previous instance ended, e.g. "killed by signal 9"; empty if none did.
    pub last_exit: String,
    /// When the running instance was started, microseconds since the Unix epoch.
    pub started_at_us: u64,
}

/// Handle to a [`ServiceState`] shared between threads.
#[derive(Debug, Clone, Default)]
pub struct SharedServiceState(Arc<Mutex<ServiceState>>);

impl SharedServiceState {
    /// Locks the state; a poisoned lock still yields the data (it is plain values).
    pub fn lock(&self) -> MutexGuard<'_, ServiceState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One supervised daemon.
#[derive(Debug)]
pub struct Service {
    name: String,
    bus_name: String,
    state: SharedServiceState,
}

impl Service {
    /// Object for daemon `name`, which owns `bus_name` when it is up.
    pub fn new(name: &str, bus_name: &str, state: SharedServiceState) -> Self {
        Self {
            name: name.to_owned(),
            bus_name: bus_name.to_owned(),
            state,
        }
    }
}

/// A daemon run and restarted by the supervisor.
#[interface(name = "org.atoll.Supervisor1.Service")]
impl Service {
    /// Short name of the daemon: vmm, netd, stord or mgmtd.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Well-known D-Bus name the daemon owns when it is ready.
    #[zbus(property(emits_changed_signal = "const"))]
    fn bus_name(&self) -> String {
        self.bus_name.clone()
    }

    /// Process id of the running instance; 0 when none runs.
    #[zbus(property)]
    fn main_pid(&self) -> u32 {
        self.state.lock().pid
    }

    /// "starting", "running", "restarting", "stopping" or "stopped".
    #[zbus(property)]
    fn state(&self) -> String {
        self.state.lock().state.to_owned()
    }

    /// Number of restarts after the daemon died.
    #[zbus(property)]
    fn restarts(&self) -> u32 {
        self.state.lock().restarts
    }

    /// How the previous instance ended ("exited with status 1", "killed by signal 9");
    /// empty when no instance has ended.
    #[zbus(property)]
    fn last_exit(&self) -> String {
        self.state.lock().last_exit.clone()
    }

    /// When the running instance started, microseconds since the Unix epoch.
    #[zbus(property)]
    fn started_at(&self) -> u64 {
        self.state.lock().started_at_us
    }
}

/// Typed client of one `org.atoll.Supervisor1.Service` object.
#[proxy(
    interface = "org.atoll.Supervisor1.Service",
    default_service = "org.atoll.Supervisor1"
)]
pub trait Service {
    /// Short name of the daemon.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Well-known D-Bus name of the daemon.
    #[zbus(property)]
    fn bus_name(&self) -> zbus::Result<String>;
    /// Process id of the running instance.
    #[zbus(property)]
    fn main_pid(&self) -> zbus::Result<u32>;
    /// Lifecycle state.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Number of restarts.
    #[zbus(property)]
    fn restarts(&self) -> zbus::Result<u32>;
    /// How the previous instance ended.
    #[zbus(property)]
    fn last_exit(&self) -> zbus::Result<String>;
    /// Start time of the running instance.
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
}

/// State behind `org.atoll.Supervisor1`.
#[derive(Debug)]
pub struct Supervisor1 {
    data_dir: String,
    web_url: String,
}

impl Supervisor1 {
    /// Supervisor of the node whose data lives in `data_dir`.
    pub fn new(data_dir: String, web_url: String) -> Self {
        Self { data_dir, web_url }
    }
}

/// Development supervisor (`atoll up`): runs the node's daemons and restarts them.
#[interface(name = "org.atoll.Supervisor1")]
impl Supervisor1 {
    /// Directory holding all of this node's state.
    #[zbus(property(emits_changed_signal = "const"))]
    fn data_dir(&self) -> String {
        self.data_dir.clone()
    }

    /// Address of the web UI.
    #[zbus(property(emits_changed_signal = "const"))]
    fn web_url(&self) -> String {
        self.web_url.clone()
    }
}
