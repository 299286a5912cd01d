//! The switch: ports on L2 segments, the MAC table, and the forwarding of
//! each frame a guest sends (in the sending port's thread, in order).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::dhcp::{self, DhcpConfig, DhcpServer, Outcome};
use crate::frame::{Ethernet, Mac};
use crate::l2::{Forward, MacTable, PortId, SegmentId};
use crate::port::{self, Port};

/// How long a learned address stays without traffic from it.
pub const MAC_AGEING: Duration = Duration::from_secs(300);
/// Addresses the switch learns at most (all segments).
pub const MAC_TABLE_SIZE: usize = 65_536;

/// Switch errors.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The port's socket could not be created.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such port.
    #[error("no port {0}")]
    NoPort(u32),
}

#[derive(Debug)]
pub(crate) struct Inner {
    table: Mutex<MacTable>,
    ports: RwLock<BTreeMap<PortId, Arc<Port>>>,
    dhcp: Mutex<HashMap<SegmentId, DhcpServer>>,
}

impl Inner {
    /// Forwards one frame `from` sent.
    pub(crate) fn switch_frame(&self, from: &Port, frame: &[u8]) {
        let eth = match Ethernet::parse(frame) {
            Ok(e) => e,
            Err(e) => {
                from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(port = from.id.0, "dropped a frame: {e}");
                return;
            }
        };
        from.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
        from.stats
            .tx_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        // DHCP requests are the switch's to answer on a segment with a server.
        let dhcp = if dhcp::is_request(frame) {
            self.dhcp
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&from.segment)
                .map(|server| server.handle(frame, Instant::now()))
        } else {
            None
        };
        match dhcp {
            Some(Outcome::Reply(reply)) => {
                from.deliver(&reply);
                return;
            }
            Some(Outcome::Ignored) => return,
            Some(Outcome::NotDhcp) | None => {}
        }
        let decision = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward(from.segment, from.id, eth.src, eth.dst, Instant::now());
        let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
        match decision {
            Forward::Port(p) => {
                if let Some(to) = ports.get(&p).filter(|to| to.segment == from.segment) {
                    to.deliver(frame);
                }
            }
            Forward::Flood => {
                for to in ports
                    .values()
                    .filter(|p| p.segment == from.segment && p.id != from.id)
                {
                    to.deliver(frame);
                }
            }
            Forward::Drop => {}
        }
    }
}

/// The node's switch.
#[derive(Debug)]
pub struct Switch {
    inner: Arc<Inner>,
    next: Mutex<u32>,
    dir: PathBuf,
}

impl Switch {
    /// A switch whose port sockets live in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(MacTable::new(MAC_AGEING, MAC_TABLE_SIZE)),
                ports: RwLock::new(BTreeMap::new()),
                dhcp: Mutex::new(HashMap::new()),
            }),
            next: Mutex::new(1),
            dir,
        }
    }

    /// Adds a port on `segment` whose NIC gets `mac`; returns it once its
    /// socket accepts connections.
    pub fn add_port(&self, segment: SegmentId, mac: Mac) -> Result<Arc<Port>, SwitchError> {
        self.add_port_with(segment, |_| mac)
    }

    /// [`Switch::add_port`] with the MAC chosen from the new port's id.
    pub fn add_port_with(
        &self,
        segment: SegmentId,
        mac: impl FnOnce(PortId) -> Mac,
    ) -> Result<Arc<Port>, SwitchError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| SwitchError::Listen {
            path: self.dir.clone(),
            source,
        })?;
        let id = {
            let mut n = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let id = PortId(*n);
            *n += 1;
            id
        };
        let path = port::socket_path(&self.dir, id);
        let port = Arc::new(Port::new(id, segment, mac(id), path.clone()));
        // Bound here, so that the socket accepts connections when this returns.
        let listener =
            vhost::vhost_user::Listener::new(&path, true).map_err(|e| SwitchError::Listen {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        self.inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, port.clone());
        let (p, weak) = (port.clone(), Arc::downgrade(&self.inner));
        std::thread::Builder::new()
            .name(format!("port-{}", id.0))
            .spawn(move || {
                if let Err(e) = port::serve(p, weak, listener) {
                    warn!(port = id.0, "port stopped serving: {e}");
                }
            })
            .map_err(|source| SwitchError::Listen { path, source })?;
        Ok(port)
    }

    /// Answers DHCP on `segment` with `cfg` (replacing any server there;
    /// leases start empty).
    pub fn set_dhcp(&self, segment: SegmentId, cfg: DhcpConfig) {
        self.inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment, DhcpServer::new(cfg));
    }

    /// The address `mac` holds a DHCP lease for on `segment`.
    pub fn dhcp_lease(&self, segment: SegmentId, mac: &Mac) -> Option<std::net::Ipv4Addr> {
        self.inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&segment)
            .and_then(|s| s.lease_of(mac, Instant::now()))
    }

    /// Deletes port `id`: no more frames to or from it, its frontend is
    /// disconnected and its socket removed.
    pub fn remove_port(&self, id: PortId) -> Result<(), SwitchError> {
        let port = self
            .inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .ok_or(SwitchError::NoPort(id.0))?;
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_port(id);
        port.close();
        Ok(())
    }

    /// The port with `id`.
    pub fn port(&self, id: PortId) -> Result<Arc<Port>, SwitchError> {
        self.inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or(SwitchError::NoPort(id.0))
    }
}
