//! The D-Bus interface `org.atoll.Storage1`.
//!
//! * `/org/atoll/Storage1` — `org.atoll.Storage1` (the daemon and its pool) and an
//!   `org.freedesktop.DBus.ObjectManager` announcing volumes as they come and go.
//! * `/org/atoll/Storage1/volume/<uuid with _ for ->` — `org.atoll.Storage1.Volume`,
//!   one object per volume.
//!
//! Errors are `org.atoll.Storage1.Error.{InvalidArgument,NotFound,Busy,Failed}` with a
//! one-line message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, proxy, ObjectServer};

use crate::health::Health;
use crate::pool;
use crate::store::{self, Store};

/// Well-known bus name owned by `stord`.
pub const BUS_NAME: &str = "org.atoll.Storage1";
/// Path of the storage daemon object.
pub const OBJECT_PATH: &str = "/org/atoll/Storage1";

/// The store shared by every D-Bus object.
#[derive(Debug, Clone)]
pub struct SharedStore(Arc<Mutex<Store>>);

impl SharedStore {
    /// Wraps `store`.
    pub fn new(store: Store) -> Self {
        Self(Arc::new(Mutex::new(store)))
    }

    /// Locks the store (a poisoned lock still holds consistent data: every
    /// mutation is a single pool call).
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Errors returned to D-Bus callers.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.atoll.Storage1.Error")]
pub enum StorageError {
    /// Transport-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// A name, size or path is unusable.
    InvalidArgument(String),
    /// No such volume or attachment.
    NotFound(String),
    /// The volume is in use.
    Busy(String),
    /// Anything else (I/O errors of the pool).
    Failed(String),
}

impl From<store::Error> for StorageError {
    fn from(e: store::Error) -> Self {
        let msg = crate::error_chain(&e);
        match e {
            store::Error::Pool(
                pool::Error::BadName(_)
                | pool::Error::BadSize(_)
                | pool::Error::NameTaken(_)
                | pool::Error::Shrink { .. },
            ) => Self::InvalidArgument(msg),
            store::Error::Qos(..) => Self::InvalidArgument(msg),
            store::Error::Pool(pool::Error::NotFound(_)) | store::Error::NoAttachment(..) => {
                Self::NotFound(msg)
            }
            store::Error::Busy(..) => Self::Busy(msg),
            _ => Self::Failed(msg),
        }
    }
}

/// Object path of volume `id`.
pub fn volume_path(id: &str) -> String {
    format!("{OBJECT_PATH}/volume/{}", id.replace('-', "_"))
}

/// State behind the `org.atoll.Storage1` interface.
#[derive(Debug)]
pub struct Storage1 {
    node_id: String,
    started_at_us: u64,
    health: Health,
    store: SharedStore,
}

impl Storage1 {
    /// Creates the interface state for a storage daemon that starts now.
    pub fn new(node_id: String, health: Health, store: SharedStore) -> Self {
        Self {
            node_id,
            started_at_us: now_us(),
            health,
            store,
        }
    }

    fn health_now(&self) -> (String, String) {
        let broken = self.store.lock().pool().broken().to_vec();
        let mut details = Vec::new();
        if !self.health.detail.is_empty() {
            details.push(self.health.detail.clone());
        }
        if !broken.is_empty() {
            details.push(format!(
                "{} volume(s) unreadable: {}",
                broken.len(),
                broken.join("; ")
            ));
        }
        let state = if details.is_empty() { "ok" } else { "degraded" };
        (state.to_owned(), details.join("; "))
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
    #[zbus(property(emits_changed_signal = "false"))]
    fn health(&self) -> String {
        self.health_now().0
    }

    /// Why Health is not "ok"; empty when it is.
    #[zbus(property(emits_changed_signal = "false"))]
    fn health_detail(&self) -> String {
        self.health_now().1
    }

    /// When this storage daemon started, in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// Whether the kernel lets stord set up an io_uring, which volume I/O runs on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn io_uring_available(&self) -> bool {
        self.health.io_uring_available
    }

    /// Directory of the storage pool.
    #[zbus(property(emits_changed_signal = "const"))]
    fn pool_path(&self) -> String {
        self.store.lock().pool().dir().display().to_string()
    }

    /// Size of the pool's file system in bytes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pool_size(&self) -> u64 {
        self.store
            .lock()
            .pool()
            .space()
            .map(|(t, _)| t)
            .unwrap_or(0)
    }

    /// Free bytes in the pool's file system.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pool_free(&self) -> u64 {
        self.store
            .lock()
            .pool()
            .space()
            .map(|(_, f)| f)
            .unwrap_or(0)
    }

    /// Creates an empty thin volume of `size` bytes (a multiple of 512) named `name`
    /// (1-64 characters from A-Z a-z 0-9 . _ -, unique in the pool) and returns its
    /// object path.
    async fn create_volume(
        &self,
        name: &str,
        size: u64,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, StorageError> {
        let meta = self.store.lock().create(name, size)?;
        tracing::info!(id = %meta.id, name, size, "volume created");
        publish_volume(server, &self.store, &meta.id).await
    }
}

/// Adds the object of volume `id` to `server`.
pub async fn publish_volume(
    server: &ObjectServer,
    store: &SharedStore,
    id: &str,
) -> Result<OwnedObjectPath, StorageError> {
    let path = volume_path(id);
    let obj = Volume {
        id: id.to_owned(),
        store: store.clone(),
    };
    server.at(path.as_str(), obj).await?;
    Ok(ObjectPath::try_from(path)
        .map_err(zbus::Error::from)?
        .into())
}

/// One volume of the pool.
#[derive(Debug)]
pub struct Volume {
    id: String,
    store: SharedStore,
}

impl Volume {
    fn meta(&self) -> Option<pool::VolumeMeta> {
        self.store.lock().pool().get(&self.id).ok().cloned()
    }
}

/// A thin volume: capacity, space used, and its vhost-user-blk attachments.
#[interface(name = "org.atoll.Storage1.Volume")]
impl Volume {
    /// Unique id (UUID).
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Name, unique in the pool.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.meta().map(|m| m.name).unwrap_or_default()
    }

    /// Capacity in bytes.
    #[zbus(property)]
    fn size(&self) -> u64 {
        self.meta().map(|m| m.size).unwrap_or(0)
    }

    /// Bytes of pool space the volume occupies (grows with data written).
    #[zbus(property(emits_changed_signal = "false"))]
    fn used(&self) -> u64 {
        self.store.lock().pool().used(&self.id).unwrap_or(0)
    }

    /// Live attachments: vhost-user-blk socket path and whether it is read-only.
    #[zbus(property)]
    fn attachments(&self) -> Vec<(String, bool)> {
        self.store.lock().attachments(&self.id)
    }

    /// Serves the volume on a new vhost-user-blk socket and returns its path. Any
    /// number of read-only attachments, or a single read-write one.
    async fn attach(
        &self,
        read_only: bool,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, StorageError> {
        let socket = self.store.lock().attach(&self.id, read_only)?;
        self.attachments_changed(&emitter).await?;
        Ok(socket.display().to_string())
    }

    /// Stops serving the attachment at `socket`; a connected frontend is cut off.
    async fn detach(
        &self,
        socket: &str,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), StorageError> {
        let store = self.store.clone();
        let (id, socket_owned) = (self.id.clone(), socket.to_owned());
        // Joining the serving threads blocks; keep it off the bus executor.
        tokio::task::spawn_blocking(move || store.lock().detach(&id, &socket_owned))
            .await
            .map_err(|e| StorageError::Failed(e.to_string()))??;
        self.attachments_changed(&emitter).await?;
        Ok(())
    }

    /// QoS limits in force: read_bytes_sec, write_bytes_sec, total_bytes_sec,
    /// read_iops_sec, write_iops_sec, total_iops_sec (0 = unlimited).
    #[zbus(property)]
    fn qos(&self) -> HashMap<String, u64> {
        self.meta()
            .map(|m| m.qos.to_map().into_iter().collect())
            .unwrap_or_default()
    }

    /// Replaces the QoS limits (keys as in the Qos property; missing keys mean
    /// unlimited). Takes effect on attached frontends at once.
    async fn set_qos(
        &self,
        limits: HashMap<String, u64>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), StorageError> {
        self.store
            .lock()
            .set_qos(&self.id, &limits.into_iter().collect())?;
        self.qos_changed(&emitter).await?;
        Ok(())
    }

    /// Grows the volume to `size` bytes; it must not be attached.
    async fn resize(
        &self,
        size: u64,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), StorageError> {
        self.store.lock().resize(&self.id, size)?;
        self.size_changed(&emitter).await?;
        Ok(())
    }

    /// Deletes the volume and frees its space; it must not be attached.
    async fn delete(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), StorageError> {
        self.store.lock().delete(&self.id)?;
        tracing::info!(id = %self.id, "volume deleted");
        server
            .remove::<Volume, _>(volume_path(&self.id).as_str())
            .await?;
        Ok(())
    }
}

/// Typed client of `org.atoll.Storage1`.
#[proxy(
    interface = "org.atoll.Storage1",
    default_service = "org.atoll.Storage1",
    default_path = "/org/atoll/Storage1"
)]
pub trait Storage1 {
    /// Version of the storage daemon.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Identifier of the node.
    #[zbus(property)]
    fn node_id(&self) -> zbus::Result<String>;
    /// "ok", "degraded" or "failed".
    #[zbus(property(emits_changed_signal = "false"))]
    fn health(&self) -> zbus::Result<String>;
    /// Why Health is not "ok".
    #[zbus(property(emits_changed_signal = "false"))]
    fn health_detail(&self) -> zbus::Result<String>;
    /// Start time in microseconds since the Unix epoch.
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
    /// Whether io_uring is usable.
    #[zbus(property)]
    fn io_uring_available(&self) -> zbus::Result<bool>;
    /// Pool directory.
    #[zbus(property)]
    fn pool_path(&self) -> zbus::Result<String>;
    /// Pool file system size.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pool_size(&self) -> zbus::Result<u64>;
    /// Pool free bytes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pool_free(&self) -> zbus::Result<u64>;
    /// Creates a thin volume.
    fn create_volume(&self, name: &str, size: u64) -> zbus::Result<OwnedObjectPath>;
}

/// Typed client of one `org.atoll.Storage1.Volume`.
#[proxy(
    interface = "org.atoll.Storage1.Volume",
    default_service = "org.atoll.Storage1"
)]
pub trait Volume {
    /// Unique id.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// Name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Capacity in bytes.
    #[zbus(property)]
    fn size(&self) -> zbus::Result<u64>;
    /// Bytes used.
    #[zbus(property(emits_changed_signal = "false"))]
    fn used(&self) -> zbus::Result<u64>;
    /// Live attachments.
    #[zbus(property)]
    fn attachments(&self) -> zbus::Result<Vec<(String, bool)>>;
    /// Serves the volume on a new socket.
    fn attach(&self, read_only: bool) -> zbus::Result<String>;
    /// Stops one attachment.
    fn detach(&self, socket: &str) -> zbus::Result<()>;
    /// Grows the volume.
    fn resize(&self, size: u64) -> zbus::Result<()>;
    /// QoS limits in force.
    #[zbus(property)]
    fn qos(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Replaces the QoS limits.
    fn set_qos(&self, limits: HashMap<String, u64>) -> zbus::Result<()>;
    /// Deletes the volume.
    fn delete(&self) -> zbus::Result<()>;
}
