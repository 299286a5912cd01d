//! `vmm daemon`: the node's VM supervisor process.

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};
use zbus::{connection, Connection};

use std::sync::Arc;

use crate::dbus::{vm_path, VmObject, Vmm1, BUS_NAME, OBJECT_PATH};
use crate::supervisor::{Supervisor, VmEntry};

/// Emits PropertiesChanged and StateChanged for `vm`.
async fn announce(conn: &Connection, vm: &Arc<VmEntry>) -> zbus::Result<()> {
    let path = vm_path(&vm.id)?;
    let iface = conn.object_server().interface::<_, VmObject>(&path).await?;
    let emitter = iface.signal_emitter();
    let obj = iface.get().await;
    let r = obj.announce(emitter).await;
    drop(obj);
    r
}

/// Options of `vmm daemon`.
#[derive(Debug, Clone)]
pub struct Options {
    /// D-Bus address; the system bus when `None`.
    pub bus: Option<String>,
    /// Identifier of this node.
    pub node_id: String,
    /// Where VM configs and runtime files live.
    pub state_dir: std::path::PathBuf,
    /// The `vmm` binary that runs each VM (normally this executable).
    pub vmm_bin: std::path::PathBuf,
}

/// Why the supervisor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bus could not be reached or the name could not be owned.
    #[error("cannot connect to D-Bus and own {BUS_NAME}")]
    Connect(#[source] zbus::Error),
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The bus went away under the daemon.
    #[error("lost the connection to D-Bus")]
    BusLost,
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] crate::supervisor::SupervisorError),
}

/// Why [`run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Signal,
}

async fn connect(opts: &Options, sup: &Arc<Supervisor>) -> zbus::Result<Connection> {
    let builder = match &opts.bus {
        Some(address) => connection::Builder::address(address.as_str())?,
        None => connection::Builder::system()?,
    };
    let health = crate::health::probe();
    if health.state != "ok" {
        warn!(detail = %health.detail, "VM supervisor is degraded");
    }
    let mut builder = builder
        .serve_at(
            OBJECT_PATH,
            Vmm1::new(opts.node_id.clone(), health, sup.clone()),
        )?
        .serve_at(OBJECT_PATH, ObjectManager)?;
    // Every known VM is on the bus before the name is: a client that sees the
    // name sees the VMs.
    for vm in sup.list() {
        builder = builder.serve_at(vm_path(&vm.id)?, VmObject::new(sup.clone(), vm))?;
    }
    let conn = builder.build().await?;
    // Refuse to queue behind another owner: a second instance must fail, not wait.
    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await?
    {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(conn),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(zbus::Error::NameTaken),
    }
}

/// Runs the supervisor until SIGTERM/SIGINT or until the bus goes away.
pub async fn run(opts: Options) -> Result<Exit, Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let sup = Supervisor::open(&opts.state_dir, opts.vmm_bin.clone())?;
    let conn = connect(&opts, &sup).await.map_err(Error::Connect)?;
    let handle = tokio::runtime::Handle::current();
    let c = conn.clone();
    sup.set_notify(Arc::new(move |vm: &Arc<VmEntry>| {
        let (c, vm) = (c.clone(), vm.clone());
        handle.spawn(async move {
            if let Err(e) = announce(&c, &vm).await {
                warn!(vm = %vm.id, "cannot signal a state change: {e}");
            }
        });
    }));
    info!(name = BUS_NAME, node = %opts.node_id, "VM supervisor ready");
    let exit = tokio::select! {
        _ = term.recv() => Ok(Exit::Signal),
        _ = int.recv() => Ok(Exit::Signal),
        () = conn.closed() => Err(Error::BusLost),
    };
    info!("VM supervisor stopping");
    drop(conn);
    exit
}
