//! The D-Bus interface `org.atoll.Net1`.
//!
//! Object `/org/atoll/Net1` carries the network daemon's own state and an
//! `org.freedesktop.DBus.ObjectManager`; networks, subnets and ports will appear below it
//! (`/org/atoll/Net1/network/<uuid>`, `/org/atoll/Net1/port/<uuid>`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, proxy};

use crate::frame::Mac;
use crate::health::Health;
use crate::l2::SegmentId;
use crate::port::Port;
use crate::switch::Switch;

/// Errors of `org.atoll.Net1` methods.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.atoll.Net1.Error")]
pub enum NetError {
    /// Transport-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An argument is not acceptable (the message says which and why).
    InvalidArgument(String),
    /// No such object.
    NotFound(String),
    /// The switch could not do it.
    Failed(String),
}

/// A network: one L2 segment.
#[derive(Debug, Clone)]
struct NetworkEntry {
    path: OwnedObjectPath,
    name: String,
    kind: String,
    segment: SegmentId,
}

/// What the switch holds, shared by the D-Bus objects.
#[derive(Debug)]
pub struct Fabric {
    switch: Switch,
    networks: Mutex<Vec<NetworkEntry>>,
}

impl Fabric {
    /// A fabric whose port sockets go to `run_dir`.
    pub fn new(run_dir: std::path::PathBuf) -> Self {
        Self {
            switch: Switch::new(run_dir),
            networks: Mutex::new(Vec::new()),
        }
    }
}

/// Parses "52:54:00:12:34:56".
fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A locally administered unicast MAC (52:54:00 prefix) from the port id and
/// the clock, unique within this switch.
fn generated_mac(port: u32) -> Mac {
    let t = now_us().to_le_bytes();
    let p = port.to_le_bytes();
    [0x52, 0x54, 0x00, t[0] ^ p[1], p[0], t[1]]
}

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
    fabric: Arc<Fabric>,
}

impl Net1 {
    /// Creates the interface state for a network daemon that starts now.
    pub fn new(node_id: String, health: Health, fabric: Arc<Fabric>) -> Self {
        Self {
            node_id,
            started_at_us: now_us(),
            health,
            fabric,
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

    /// Creates a network (one L2 segment). `kind` is "flat" (VLAN and
    /// overlay networks come with uplinks). Returns its object path.
    async fn create_network(
        &self,
        name: String,
        kind: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, NetError> {
        if name.is_empty() || name.len() > 64 {
            return Err(NetError::InvalidArgument("name: 1 to 64 characters".into()));
        }
        if kind != "flat" {
            return Err(NetError::InvalidArgument(format!(
                "kind {kind:?}: only \"flat\" networks exist yet"
            )));
        }
        let entry = {
            let mut nets = self
                .fabric
                .networks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if nets.iter().any(|n| n.name == name) {
                return Err(NetError::InvalidArgument(format!(
                    "a network named {name:?} exists"
                )));
            }
            let id = u32::try_from(nets.len() + 1).unwrap_or(u32::MAX);
            let path = ObjectPath::try_from(format!("{OBJECT_PATH}/network/{id}"))
                .map_err(|e| NetError::Failed(e.to_string()))?
                .into();
            let entry = NetworkEntry {
                path,
                name,
                kind,
                segment: SegmentId(id),
            };
            nets.push(entry.clone());
            entry
        };
        let path = entry.path.clone();
        server.at(&path, NetworkObject(entry)).await?;
        Ok(path)
    }

    /// Creates a port on `network` for one VM NIC; `mac` "" picks one.
    /// Returns the port's object path, the vhost-user socket the VM's NIC
    /// connects to, and the MAC.
    async fn create_port(
        &self,
        network: OwnedObjectPath,
        mac: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(OwnedObjectPath, String, String), NetError> {
        let net = self
            .fabric
            .networks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|n| n.path == network)
            .cloned()
            .ok_or_else(|| NetError::NotFound(format!("no network {}", network.as_str())))?;
        let mac = if mac.is_empty() {
            None
        } else {
            let m = parse_mac(&mac).ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "mac {mac:?}: want six hex bytes, 52:54:00:12:34:56"
                ))
            })?;
            if m[0] & 1 != 0 || m == [0; 6] {
                return Err(NetError::InvalidArgument(format!(
                    "mac {mac:?}: not a unicast address"
                )));
            }
            Some(m)
        };
        let fabric = self.fabric.clone();
        let port = tokio::task::spawn_blocking(move || {
            fabric
                .switch
                .add_port_with(net.segment, |id| mac.unwrap_or_else(|| generated_mac(id.0)))
        })
        .await
        .map_err(|e| NetError::Failed(e.to_string()))?
        .map_err(|e| NetError::Failed(format!("{e:#}")))?;
        let path: OwnedObjectPath =
            ObjectPath::try_from(format!("{OBJECT_PATH}/port/{}", port.id.0))
                .map_err(|e| NetError::Failed(e.to_string()))?
                .into();
        let socket = port.socket.display().to_string();
        let mac = format_mac(&port.mac);
        server
            .at(
                &path,
                PortObject {
                    port,
                    network: net.path,
                },
            )
            .await?;
        Ok((path, socket, mac))
    }

    /// Deletes a port: its VM's NIC is disconnected and the socket removed.
    async fn delete_port(
        &self,
        port: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let not_found = || NetError::NotFound(format!("no port {}", port.as_str()));
        let id = Self::port_id(&port).ok_or_else(not_found)?;
        let fabric = self.fabric.clone();
        tokio::task::spawn_blocking(move || fabric.switch.remove_port(id))
            .await
            .map_err(|e| NetError::Failed(e.to_string()))?
            .map_err(|_| not_found())?;
        server.remove::<PortObject, _>(&port).await?;
        Ok(())
    }
}

impl Net1 {
    fn port_id(path: &ObjectPath<'_>) -> Option<crate::l2::PortId> {
        path.as_str()
            .strip_prefix(&format!("{OBJECT_PATH}/port/"))?
            .parse()
            .ok()
            .map(crate::l2::PortId)
    }
}

/// A network on the bus.
#[derive(Debug)]
pub struct NetworkObject(NetworkEntry);

/// One L2 segment.
#[interface(name = "org.atoll.Net1.Network")]
impl NetworkObject {
    /// Name, unique on the node.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.0.name.clone()
    }

    /// "flat".
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> String {
        self.0.kind.clone()
    }
}

/// A port on the bus.
#[derive(Debug)]
pub struct PortObject {
    port: Arc<Port>,
    network: OwnedObjectPath,
}

/// A switch port: one VM NIC's vhost-user-net socket.
#[interface(name = "org.atoll.Net1.Port")]
impl PortObject {
    /// The network it is on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn network(&self) -> OwnedObjectPath {
        self.network.clone()
    }

    /// The MAC its NIC gets.
    #[zbus(property(emits_changed_signal = "const"))]
    fn mac(&self) -> String {
        format_mac(&self.port.mac)
    }

    /// The vhost-user socket the VM connects to.
    #[zbus(property(emits_changed_signal = "const"))]
    fn socket(&self) -> String {
        self.port.socket.display().to_string()
    }

    /// tx/rx frames and bytes (tx = from the VM), tx_dropped (refused by the
    /// switch), rx_dropped (no room in the VM). Read on each Get.
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> HashMap<String, u64> {
        self.port
            .stats
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
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
    /// Creates a network.
    fn create_network(&self, name: &str, kind: &str) -> zbus::Result<OwnedObjectPath>;
    /// Creates a port: (object, socket, mac).
    fn create_port(
        &self,
        network: &ObjectPath<'_>,
        mac: &str,
    ) -> zbus::Result<(OwnedObjectPath, String, String)>;
    /// Deletes a port.
    fn delete_port(&self, port: &ObjectPath<'_>) -> zbus::Result<()>;
}

/// Typed client of a port.
#[proxy(interface = "org.atoll.Net1.Port", default_service = "org.atoll.Net1")]
pub trait Port {
    /// Its network.
    #[zbus(property)]
    fn network(&self) -> zbus::Result<OwnedObjectPath>;
    /// MAC.
    #[zbus(property)]
    fn mac(&self) -> zbus::Result<String>;
    /// Socket.
    #[zbus(property)]
    fn socket(&self) -> zbus::Result<String>;
    /// Counters.
    #[zbus(property)]
    fn counters(&self) -> zbus::Result<HashMap<String, u64>>;
}
