//! The D-Bus interface `org.atoll.Vmm1`.
//!
//! Object `/org/atoll/Vmm1` carries the supervisor's own state and an
//! `org.freedesktop.DBus.ObjectManager`; one object per VM appears below it at
//! `/org/atoll/Vmm1/vm/<uuid>` with the interface `org.atoll.Vmm1.Vm`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, proxy};

use crate::health::Health;
use crate::supervisor::{Supervisor, SupervisorError, VmEntry};

/// Errors of `org.atoll.Vmm1` methods.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.atoll.Vmm1.Error")]
pub enum VmmError {
    /// Transport-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The VM config is invalid.
    InvalidConfig(String),
    /// The request does not fit the VM's state.
    InvalidState(String),
    /// The VM process failed.
    Failed(String),
}

impl From<SupervisorError> for VmmError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Config(c) => Self::InvalidConfig(c.to_string()),
            SupervisorError::State { .. } => Self::InvalidState(e.to_string()),
            other => Self::Failed(other.to_string()),
        }
    }
}

/// Object path of a VM.
pub fn vm_path(id: &str) -> Result<OwnedObjectPath, zbus::Error> {
    let p = format!("{OBJECT_PATH}/vm/{}", id.replace('-', "_"));
    Ok(ObjectPath::try_from(p)?.into())
}

/// Runs blocking supervisor work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SupervisorError> + Send + 'static,
) -> Result<T, VmmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VmmError::Failed(e.to_string()))?
        .map_err(VmmError::from)
}

/// One VM on the bus.
#[derive(Debug)]
pub struct VmObject {
    sup: Arc<Supervisor>,
    vm: Arc<VmEntry>,
}

impl VmObject {
    /// The object for `vm`.
    pub fn new(sup: Arc<Supervisor>, vm: Arc<VmEntry>) -> Self {
        Self { sup, vm }
    }

    async fn request(&self, op: &'static str, emitter: &SignalEmitter<'_>) -> Result<(), VmmError> {
        let (sup, vm) = (self.sup.clone(), self.vm.clone());
        let r = blocking(move || sup.request(&vm, op)).await;
        self.announce(emitter).await?;
        r
    }

    /// Emits PropertiesChanged for the mutable properties and StateChanged.
    pub async fn announce(&self, emitter: &SignalEmitter<'_>) -> zbus::Result<()> {
        self.state_changed(emitter).await?;
        self.exit_reason_changed(emitter).await?;
        self.pid_changed(emitter).await?;
        self.boots_changed(emitter).await?;
        let st = self.vm.status();
        Self::vm_state_changed(emitter, st.state.as_str(), &st.exit_reason).await
    }
}

/// A virtual machine: lifecycle and what it is made of.
#[interface(name = "org.atoll.Vmm1.Vm")]
impl VmObject {
    /// Identifier (UUID).
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.vm.id.clone()
    }

    /// Name from the config.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.vm.config.name.clone()
    }

    /// Number of vCPUs.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vcpus(&self) -> u32 {
        u32::from(self.vm.config.vcpus)
    }

    /// Guest memory in MiB.
    #[zbus(property(emits_changed_signal = "const"))]
    fn memory_mib(&self) -> u64 {
        self.vm.config.memory_mib
    }

    /// The config as JSON.
    #[zbus(property(emits_changed_signal = "const"))]
    fn config(&self) -> String {
        serde_json::to_string(&self.vm.config).unwrap_or_default()
    }

    /// "stopped", "starting", "running", "paused" or "crashed".
    #[zbus(property)]
    fn state(&self) -> String {
        self.vm.status().state.as_str().to_owned()
    }

    /// Why the VM last ended ("" before its first end): poweroff, reset,
    /// triple-fault, stopped, crashed: ...
    #[zbus(property)]
    fn exit_reason(&self) -> String {
        self.vm.status().exit_reason
    }

    /// Process id of the running VM, 0 when none.
    #[zbus(property)]
    fn pid(&self) -> u32 {
        self.vm.status().pid.unwrap_or(0)
    }

    /// Processes started for this VM (a guest reboot starts a new one).
    #[zbus(property)]
    fn boots(&self) -> u32 {
        self.vm.status().boots
    }

    /// Milliseconds since the current process started, 0 when stopped.
    #[zbus(property(emits_changed_signal = "false"))]
    fn uptime_ms(&self) -> u64 {
        self.vm.status().since.map_or(0, |s| {
            u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// The VM's devices while it runs: (PCI slot, what it is, state, counters).
    /// State is "idle" (no driver yet), "starting", "active" or "broken";
    /// counters include activations, resets and failed_activations, plus the
    /// device's own (requests and bytes for devices the VMM serves itself;
    /// vhost-user backends count their I/O themselves). Read from the VM
    /// process on each Get; empty when it does not run.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn devices(&self) -> Vec<(u32, String, String, HashMap<String, u64>)> {
        let vm = self.vm.clone();
        let info = tokio::task::spawn_blocking(move || vm.api("info"))
            .await
            .ok()
            .and_then(Result::ok);
        info.and_then(|v| {
            serde_json::from_value::<Vec<crate::pci::DeviceInfo>>(v["devices"].clone()).ok()
        })
        .unwrap_or_default()
        .into_iter()
        .map(|d| (d.slot, d.kind, d.state, d.counters.into_iter().collect()))
        .collect()
    }

    /// Starts the VM; returns once its process answers.
    async fn start(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        let (sup, vm) = (self.sup.clone(), self.vm.clone());
        let r = blocking(move || sup.start(&vm)).await;
        self.announce(&emitter).await?;
        r
    }

    /// Ends the VM at once (reason "stopped").
    async fn stop(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        self.request("stop", &emitter).await
    }

    /// Asks the guest to power off.
    async fn shutdown(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        self.request("shutdown", &emitter).await
    }

    /// Restarts the VM at once (a new process, as a hardware reset).
    async fn reboot(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        self.request("reboot", &emitter).await
    }

    /// Parks every vCPU.
    async fn pause(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        self.request("pause", &emitter).await
    }

    /// Lets a paused VM run.
    async fn resume(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), VmmError> {
        self.request("resume", &emitter).await
    }

    /// Forgets a stopped VM and its files; the object disappears.
    async fn delete(
        &self,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), VmmError> {
        let (sup, vm) = (self.sup.clone(), self.vm.clone());
        blocking(move || sup.delete(&vm)).await?;
        let path = vm_path(&self.vm.id)?;
        server.remove::<VmObject, _>(path).await?;
        Ok(())
    }

    /// The state changed (State and ExitReason carry the same).
    #[zbus(signal, name = "StateChanged")]
    pub async fn vm_state_changed(
        emitter: &SignalEmitter<'_>,
        state: &str,
        exit_reason: &str,
    ) -> zbus::Result<()>;
}

/// Typed client of a VM object.
#[proxy(interface = "org.atoll.Vmm1.Vm", default_service = "org.atoll.Vmm1")]
pub trait Vm {
    /// Identifier.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// Name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// vCPUs.
    #[zbus(property)]
    fn vcpus(&self) -> zbus::Result<u32>;
    /// Memory in MiB.
    #[zbus(property)]
    fn memory_mib(&self) -> zbus::Result<u64>;
    /// State.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Why it last ended.
    #[zbus(property)]
    fn exit_reason(&self) -> zbus::Result<String>;
    /// Process id.
    #[zbus(property)]
    fn pid(&self) -> zbus::Result<u32>;
    /// Processes started.
    #[zbus(property)]
    fn boots(&self) -> zbus::Result<u32>;
    /// Devices with their state and counters.
    #[zbus(property)]
    fn devices(&self) -> zbus::Result<Vec<(u32, String, String, HashMap<String, u64>)>>;
    /// Start.
    fn start(&self) -> zbus::Result<()>;
    /// Stop.
    fn stop(&self) -> zbus::Result<()>;
    /// Graceful shutdown.
    fn shutdown(&self) -> zbus::Result<()>;
    /// Reboot.
    fn reboot(&self) -> zbus::Result<()>;
    /// Pause.
    fn pause(&self) -> zbus::Result<()>;
    /// Resume.
    fn resume(&self) -> zbus::Result<()>;
    /// Delete.
    fn delete(&self) -> zbus::Result<()>;
    /// State changes.
    #[zbus(signal, name = "StateChanged")]
    fn vm_state_changed(&self, state: String, exit_reason: String) -> zbus::Result<()>;
}

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
    sup: Arc<Supervisor>,
}

impl Vmm1 {
    /// Creates the interface state for a supervisor that starts now.
    pub fn new(node_id: String, health: Health, sup: Arc<Supervisor>) -> Self {
        Self {
            node_id,
            started_at_us: now_us(),
            health,
            sup,
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

    /// Registers a VM from its JSON config (see docs/vmm.md); it starts
    /// stopped. Returns its object path.
    async fn create_vm(
        &self,
        config: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, VmmError> {
        let sup = self.sup.clone();
        let vm = blocking(move || sup.create(&config)).await?;
        let path = vm_path(&vm.id)?;
        server
            .at(&path, VmObject::new(self.sup.clone(), vm))
            .await?;
        Ok(path)
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
    /// Registers a VM; returns its object path.
    fn create_vm(&self, config: &str) -> zbus::Result<OwnedObjectPath>;
}
