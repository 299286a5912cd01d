//! `netd`: the node's network daemon process.

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};
use zbus::{connection, Connection};

use crate::dbus::{Net1, BUS_NAME, OBJECT_PATH};

/// Options of `netd`.
#[derive(Debug, Clone)]
pub struct Options {
    /// D-Bus address; the system bus when `None`.
    pub bus: Option<String>,
    /// Identifier of this node.
    pub node_id: String,
    /// Where port sockets go.
    pub run_dir: std::path::PathBuf,
    /// Where the configuration is kept across restarts (`netd.db`).
    pub data_dir: std::path::PathBuf,
    /// Data-path threads (at least one).
    pub datapath_threads: usize,
    /// Each port's budget for requests to the switch's services: a second,
    /// at once.
    pub service_limit: (f64, f64),
    /// Resolvers for names that are not a VPC's (none: refused).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

/// Why the network daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bus could not be reached or the name could not be owned.
    #[error("cannot connect to D-Bus and own {BUS_NAME}")]
    Connect(#[source] zbus::Error),
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The switch could not start.
    #[error("cannot start the switch")]
    Switch(#[source] crate::fabric::FabricError),
    /// The saved configuration could not be opened or read.
    #[error("cannot open the saved configuration")]
    State(#[source] crate::persist::PersistError),
    /// The bus went away under the daemon.
    #[error("lost the connection to D-Bus")]
    BusLost,
}

/// Why [`run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Signal,
}

async fn connect(
    opts: &Options,
    fabric: std::sync::Arc<crate::fabric::Fabric>,
    not_restored: usize,
) -> zbus::Result<Connection> {
    let builder = match &opts.bus {
        Some(address) => connection::Builder::address(address.as_str())?,
        None => connection::Builder::system()?,
    };
    let mut health = crate::health::probe();
    if not_restored > 0 {
        health.degrade(&format!(
            "{not_restored} saved objects or settings did not come back after the restart (see the log; the saved state is kept in netd-unrestored.db)"
        ));
    }
    if health.state != "ok" {
        warn!(detail = %health.detail, "network daemon is degraded");
    }
    let conn = builder
        .serve_at(
            OBJECT_PATH,
            Net1::new(opts.node_id.clone(), health, fabric.clone()),
        )?
        .serve_at(OBJECT_PATH, ObjectManager)?
        .build()
        .await?;
    crate::dbus::serve_all(conn.object_server(), &fabric).await?;
    // Refuse to queue behind another owner: a second instance must fail, not wait.
    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await?
    {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(conn),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(zbus::Error::NameTaken),
    }
}

/// Rebuilds what `store` holds into `fabric`; how many saved objects or
/// settings did not come back (logged, and the full database kept aside:
/// the next change saves the state without them).
fn restore(
    fabric: &crate::fabric::Fabric,
    store: &crate::persist::Store,
    data_dir: &std::path::Path,
) -> usize {
    let (saved, unreadable) = store.load();
    let mut failed: Vec<String> = unreadable.iter().map(ToString::to_string).collect();
    failed.extend(fabric.restore(&saved));
    for f in &failed {
        warn!("not restored: {f}");
    }
    if !failed.is_empty() {
        let aside = data_dir.join("netd-unrestored.db");
        match store.copy_to(&aside) {
            Ok(()) => warn!(copy = %aside.display(), "the saved configuration is kept aside"),
            Err(e) => warn!("cannot keep the saved configuration aside: {e}"),
        }
    }
    if saved != crate::persist::Snapshot::default() {
        info!(
            ports = saved.ports.len(),
            networks = saved.networks.len(),
            not_restored = failed.len(),
            "configuration restored"
        );
    }
    failed.len()
}

/// Runs the network daemon until SIGTERM/SIGINT or until the bus goes away.
pub async fn run(opts: Options) -> Result<Exit, Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    // First: a second netd on the same directory stops here.
    let store = crate::persist::Store::open(&opts.data_dir).map_err(Error::State)?;
    let fabric =
        crate::fabric::Fabric::with_datapath_threads(opts.run_dir.clone(), opts.datapath_threads)
            .map_err(Error::Switch)?;
    fabric.switch.set_service_limit(opts.service_limit);
    if !opts.dns_upstreams.is_empty() {
        info!(upstreams = ?opts.dns_upstreams, "DNS forwarding on");
    }
    fabric.switch.set_dns_upstreams(opts.dns_upstreams.clone());
    info!(threads = opts.datapath_threads, "data path started");
    // What this node's netd was told before it stopped comes back before
    // the name is taken: callers never see it half restored.
    let not_restored = restore(&fabric, &store, &opts.data_dir);
    fabric.keep_in(store);
    let conn = connect(&opts, std::sync::Arc::new(fabric), not_restored)
        .await
        .map_err(Error::Connect)?;
    info!(name = BUS_NAME, node = %opts.node_id, "network daemon ready");
    let exit = tokio::select! {
        _ = term.recv() => Ok(Exit::Signal),
        _ = int.recv() => Ok(Exit::Signal),
        () = conn.closed() => Err(Error::BusLost),
    };
    info!("network daemon stopping");
    drop(conn);
    exit
}
