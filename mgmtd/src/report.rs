//! The node report behind `GET /api/v1/node`: the four daemons as seen over D-Bus.

use std::time::Duration;

use serde::Serialize;
use zbus::{fdo::DBusProxy, names::BusName, proxy::CacheProperties, Connection};

use crate::dbus::{now_us, service_path, Manager1Proxy, ServiceProxy, SUPERVISOR_BUS_NAME};

/// How long one daemon may take to answer before it is reported unresponsive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemons of a node: short name and well-known bus name.
pub const DAEMONS: [(&str, &str); 4] = [
    ("vmm", vmm::BUS_NAME),
    ("netd", netd::BUS_NAME),
    ("stord", stord::BUS_NAME),
    ("mgmtd", crate::dbus::MANAGER_BUS_NAME),
];

/// One daemon as read over D-Bus.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DaemonReport {
    /// Short name: vmm, netd, stord or mgmtd.
    pub name: String,
    /// Well-known bus name.
    pub bus_name: String,
    /// Whether some process owns the bus name.
    pub running: bool,
    /// Process id of the owner, when known.
    pub pid: Option<u32>,
    /// "ok", "degraded", "failed", or "unreachable" when the daemon did not answer.
    pub health: String,
    /// Why health is not "ok".
    pub health_detail: String,
    /// Version the daemon reports.
    pub version: Option<String>,
    /// Seconds since the running instance started.
    pub uptime_secs: Option<u64>,
    /// Restarts counted by the supervisor; absent when no supervisor publishes them.
    pub restarts: Option<u32>,
    /// How the previous instance ended, from the supervisor.
    pub last_exit: Option<String>,
}

/// The whole node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeReport {
    /// Node identifier.
    pub node_id: String,
    /// Host name of the machine.
    pub hostname: String,
    /// Version of mgmtd.
    pub version: String,
    /// True when every daemon runs and reports "ok".
    pub healthy: bool,
    /// One entry per daemon, in a fixed order.
    pub daemons: Vec<DaemonReport>,
}

/// Properties common to the four daemon interfaces.
struct Common {
    version: String,
    health: String,
    health_detail: String,
    started_at: u64,
}

macro_rules! read_common {
    ($proxy:ty, $conn:expr) => {{
        let p = <$proxy>::builder($conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let (version, health, health_detail, started_at) =
            tokio::try_join!(p.version(), p.health(), p.health_detail(), p.started_at())?;
        Ok::<_, zbus::Error>(Common {
            version,
            health,
            health_detail,
            started_at,
        })
    }};
}

async fn read_daemon(conn: &Connection, name: &str) -> zbus::Result<Common> {
    match name {
        "vmm" => read_common!(vmm::Vmm1Proxy, conn),
        "netd" => read_common!(netd::Net1Proxy, conn),
        "stord" => read_common!(stord::Storage1Proxy, conn),
        _ => read_common!(Manager1Proxy, conn),
    }
}

/// Restarts and last exit as published by `atoll up`, if it runs.
async fn read_supervised(conn: &Connection, name: &str) -> Option<(u32, String)> {
    let p = ServiceProxy::builder(conn)
        .path(service_path(name))
        .ok()?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .ok()?;
    tokio::try_join!(p.restarts(), p.last_exit()).ok()
}

async fn probe(
    conn: &Connection,
    dbus: &DBusProxy<'_>,
    supervised: bool,
    name: &str,
    bus_name: &str,
) -> DaemonReport {
    let mut report = DaemonReport {
        name: name.to_owned(),
        bus_name: bus_name.to_owned(),
        running: false,
        pid: None,
        health: "unreachable".to_owned(),
        health_detail: String::new(),
        version: None,
        uptime_secs: None,
        restarts: None,
        last_exit: None,
    };
    if supervised {
        if let Some((restarts, last_exit)) = read_supervised(conn, name).await {
            report.restarts = Some(restarts);
            report.last_exit = Some(last_exit).filter(|s| !s.is_empty());
        }
    }
    let Ok(owned) = BusName::try_from(bus_name) else {
        return report;
    };
    report.running = dbus.name_has_owner(owned.clone()).await.unwrap_or(false);
    if !report.running {
        report.health_detail = format!("{bus_name} has no owner");
        return report;
    }
    report.pid = dbus.get_connection_unix_process_id(owned).await.ok();
    match tokio::time::timeout(PROBE_TIMEOUT, read_daemon(conn, name)).await {
        Ok(Ok(c)) => {
            report.health = c.health;
            report.health_detail = c.health_detail;
            report.version = Some(c.version);
            report.uptime_secs = Some(now_us().saturating_sub(c.started_at) / 1_000_000);
        }
        Ok(Err(e)) => report.health_detail = format!("D-Bus error: {e}"),
        Err(_) => report.health_detail = format!("no answer within {PROBE_TIMEOUT:?}"),
    }
    report
}

/// Reads every daemon of the node over `conn`.
pub async fn collect(conn: &Connection, node_id: &str) -> NodeReport {
    let dbus = match DBusProxy::new(conn).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "cannot talk to the bus daemon");
            None
        }
    };
    let mut daemons = Vec::with_capacity(DAEMONS.len());
    if let Some(dbus) = &dbus {
        let supervised = match BusName::try_from(SUPERVISOR_BUS_NAME) {
            Ok(n) => dbus.name_has_owner(n).await.unwrap_or(false),
            Err(_) => false,
        };
        let probes = DAEMONS
            .iter()
            .map(|(name, bus_name)| probe(conn, dbus, supervised, name, bus_name));
        daemons = futures_util::future::join_all(probes).await;
    }
    let healthy =
        daemons.len() == DAEMONS.len() && daemons.iter().all(|d| d.running && d.health == "ok");
    NodeReport {
        node_id: node_id.to_owned(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        version: crate::VERSION.to_owned(),
        healthy,
        daemons,
    }
}
