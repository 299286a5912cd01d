//! The D-Bus interface `org.atoll.Storage1`.
//!
//! * `/org/atoll/Storage1` — `org.atoll.Storage1` (the daemon and its pool) and an
//!   `org.freedesktop.DBus.ObjectManager` announcing volumes as they come and go.
//! * `/org/atoll/Storage1/volume/<uuid with _ for ->` — `org.atoll.Storage1.Volume`,
//!   one object per volume.
//! * `/org/atoll/Storage1/snapshot/<uuid with _ for ->` — `org.atoll.Storage1.Snapshot`,
//!   one object per snapshot.
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
use crate::image::{self, Format, Progress, Source};
use crate::job;
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
            store::Error::Pool(pool::Error::NotFound(_) | pool::Error::NoSnapshot(_))
            | store::Error::NoAttachment(..) => Self::NotFound(msg),
            store::Error::Busy(..) => Self::Busy(msg),
            _ => Self::Failed(msg),
        }
    }
}

/// Object path of volume `id`.
pub fn volume_path(id: &str) -> String {
    format!("{OBJECT_PATH}/volume/{}", id.replace('-', "_"))
}

/// Object path of snapshot `id`.
pub fn snapshot_path(id: &str) -> String {
    format!("{OBJECT_PATH}/snapshot/{}", id.replace('-', "_"))
}

/// The id in a volume or snapshot object path.
fn id_of(path: &ObjectPath<'_>) -> String {
    path.as_str()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .replace('_', "-")
}

fn object_path(path: String) -> Result<OwnedObjectPath, StorageError> {
    Ok(ObjectPath::try_from(path)
        .map_err(zbus::Error::from)?
        .into())
}

impl From<image::Error> for StorageError {
    fn from(e: image::Error) -> Self {
        let msg = crate::error_chain(&e);
        match e {
            image::Error::Io(_, ref io) if io.kind() == std::io::ErrorKind::NotFound => {
                Self::NotFound(msg)
            }
            image::Error::Io(..) | image::Error::Volume(_) | image::Error::Cancelled => {
                Self::Failed(msg)
            }
            _ => Self::InvalidArgument(msg),
        }
    }
}

/// The outcome of an import/export step as a job sees it: the message, and
/// whether it was a cancellation.
fn job_error(e: &image::Error) -> (String, bool) {
    (crate::error_chain(e), matches!(e, image::Error::Cancelled))
}

/// Starts an export of `disk` to `path` as a job; `done` runs when it ends.
async fn export_job(
    conn: &zbus::Connection,
    disk: Arc<crate::disk::Disk>,
    what: String,
    path: &str,
    format: &str,
    done: impl FnOnce() + Send + 'static,
) -> Result<OwnedObjectPath, StorageError> {
    let format = match Format::parse(format) {
        Ok(Some(f)) => f,
        Ok(None) => Format::Raw,
        Err(e) => {
            done();
            return Err(e.into());
        }
    };
    let progress = Arc::new(Progress::default());
    let (dest, p2) = (std::path::PathBuf::from(path), progress.clone());
    let target = format!("{what} -> {path} ({})", format.name());
    Ok(job::start(
        conn,
        "export",
        target,
        progress,
        move || {
            let r = image::export(&disk, &dest, format, &p2)
                .map(|()| String::new())
                .map_err(|e| job_error(&e));
            done();
            r
        },
        |_, res| async move { res.map(|_| None).map_err(|(m, _)| m) },
    )
    .await?)
}

/// Runs `f` on the locked store on a blocking thread: it may copy data or join
/// threads, which must not stall the bus.
async fn blocking<T: Send + 'static>(
    store: &SharedStore,
    f: impl FnOnce(&mut Store) -> Result<T, store::Error> + Send + 'static,
) -> Result<T, StorageError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&mut store.lock()))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))?
        .map_err(StorageError::from)
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

    /// Creates volume `name` from the image file at `path` (absolute, on this
    /// node) in `format` (`raw`, `qcow2`, or `auto` to detect it). The volume's
    /// size is the image's virtual size. Returns a job object at once; the
    /// volume appears (and is the job's Result) when the job completes, and is
    /// removed if it fails or is cancelled.
    async fn import_volume(
        &self,
        name: &str,
        path: &str,
        format: &str,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, StorageError> {
        let fmt = Format::parse(format)?;
        let src_path = std::path::PathBuf::from(path);
        let src = tokio::task::spawn_blocking(move || Source::open(&src_path, fmt))
            .await
            .map_err(|e| StorageError::Failed(e.to_string()))??;
        let (meta, disk) = self.store.lock().begin_import(name, src.size())?;
        tracing::info!(id = %meta.id, name, path, format = src.format().name(), "import started");
        let progress = Arc::new(Progress::default());
        let p2 = progress.clone();
        let (store, id) = (self.store.clone(), meta.id.clone());
        job::start(
            conn,
            "import",
            format!("{path} ({}) -> {name}", src.format().name()),
            progress,
            move || {
                src.import(&disk, &p2)
                    .map(|()| String::new())
                    .map_err(|e| job_error(&e))
            },
            move |conn, res| async move {
                let ok = res.is_ok();
                let (s2, id2) = (store.clone(), id.clone());
                let ended = tokio::task::spawn_blocking(move || s2.lock().end_import(&id2, ok))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| crate::error_chain(&e)));
                res.map_err(|(m, _)| m)?;
                ended?;
                let path = publish_volume(conn.object_server(), &store, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Some(path))
            },
        )
        .await
        .map_err(StorageError::from)
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
    let snaps: Vec<String> = store
        .lock()
        .pool()
        .get(id)
        .map(|m| m.snapshots.iter().map(|s| s.id.clone()).collect())
        .unwrap_or_default();
    for snap in snaps {
        publish_snapshot(server, store, &snap).await?;
    }
    object_path(path)
}

/// Adds the object of snapshot `id` to `server`.
async fn publish_snapshot(
    server: &ObjectServer,
    store: &SharedStore,
    id: &str,
) -> Result<OwnedObjectPath, StorageError> {
    let path = snapshot_path(id);
    let obj = Snapshot {
        id: id.to_owned(),
        store: store.clone(),
    };
    server.at(path.as_str(), obj).await?;
    object_path(path)
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

    /// Grows the volume to `size` bytes, also while attached: a connected
    /// frontend that set up the backend channel gets a config-change message.
    async fn resize(
        &self,
        size: u64,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), StorageError> {
        let id = self.id.clone();
        blocking(&self.store, move |s| s.resize(&id, size)).await?;
        self.size_changed(&emitter).await?;
        Ok(())
    }

    /// Writes the volume's contents to a new file at `path` (absolute; must not
    /// exist) in `format` (`raw` or `qcow2`) as a job, whose object path is
    /// returned at once. The volume must not be attached read-write: export a
    /// snapshot of a running VM's disk instead.
    async fn export(
        &self,
        path: &str,
        format: &str,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, StorageError> {
        let id = self.id.clone();
        let disk = blocking(&self.store, move |s| s.begin_export(&id)).await?;
        let (store, id) = (self.store.clone(), self.id.clone());
        let name = self.meta().map(|m| m.name).unwrap_or_default();
        export_job(conn, disk, name, path, format, move || {
            store.lock().end_export(&id)
        })
        .await
    }

    /// I/O counters summed over the live attachments: read_ops, read_bytes,
    /// write_ops, write_bytes, flush_ops, discard_ops, errors (requests that
    /// failed with a status) and malformed (chains without a status byte).
    #[zbus(property(emits_changed_signal = "false"))]
    fn io_counters(&self) -> HashMap<String, u64> {
        self.store.lock().counters(&self.id).into_iter().collect()
    }

    /// Snapshots of the volume, oldest first.
    #[zbus(property)]
    fn snapshots(&self) -> Vec<OwnedObjectPath> {
        self.meta()
            .map(|m| {
                m.snapshots
                    .iter()
                    .filter_map(|s| object_path(snapshot_path(&s.id)).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Freezes the volume's current contents as snapshot `name` (unique among
    /// its snapshots) in O(1), also while attached, and returns its object path.
    async fn snapshot(
        &self,
        name: &str,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, StorageError> {
        let (id, name_owned) = (self.id.clone(), name.to_owned());
        let snap = blocking(&self.store, move |s| s.snapshot(&id, &name_owned)).await?;
        let path = publish_snapshot(server, &self.store, &snap.id).await?;
        self.snapshots_changed(&emitter).await?;
        Ok(path)
    }

    /// Returns the volume to `snapshot` (one of its own), discarding what was
    /// written since; it must not be attached. Later snapshots stay.
    async fn rollback(
        &self,
        snapshot: ObjectPath<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), StorageError> {
        let (id, snap) = (self.id.clone(), id_of(&snapshot));
        blocking(&self.store, move |s| s.rollback(&id, &snap)).await?;
        self.size_changed(&emitter).await?;
        Ok(())
    }

    /// Deletes the volume with its snapshots and frees their space (clones keep
    /// the data they share); it must not be attached.
    async fn delete(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), StorageError> {
        let snaps: Vec<String> = self
            .meta()
            .map(|m| m.snapshots.iter().map(|s| s.id.clone()).collect())
            .unwrap_or_default();
        let id = self.id.clone();
        blocking(&self.store, move |s| s.delete(&id)).await?;
        tracing::info!(id = %self.id, "volume deleted");
        for snap in snaps {
            server
                .remove::<Snapshot, _>(snapshot_path(&snap).as_str())
                .await?;
        }
        server
            .remove::<Volume, _>(volume_path(&self.id).as_str())
            .await?;
        Ok(())
    }
}

/// One snapshot of a volume.
#[derive(Debug)]
pub struct Snapshot {
    id: String,
    store: SharedStore,
}

impl Snapshot {
    fn meta(&self) -> Option<(String, pool::SnapshotMeta)> {
        let store = self.store.lock();
        let (v, s) = store.pool().snapshot(&self.id).ok()?;
        Some((v.id.clone(), s.clone()))
    }
}

/// A frozen point in a volume's history, from which it can be rolled back or
/// cloned.
#[interface(name = "org.atoll.Storage1.Snapshot")]
impl Snapshot {
    /// Unique id (UUID).
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Name, unique among the volume's snapshots.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.meta().map(|(_, s)| s.name).unwrap_or_default()
    }

    /// The volume it was taken of.
    #[zbus(property(emits_changed_signal = "const"))]
    fn volume(&self) -> OwnedObjectPath {
        self.meta()
            .and_then(|(v, _)| object_path(volume_path(&v)).ok())
            .unwrap_or_else(|| OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/")))
    }

    /// The volume's size when it was taken.
    #[zbus(property(emits_changed_signal = "const"))]
    fn size(&self) -> u64 {
        self.meta().map(|(_, s)| s.size).unwrap_or(0)
    }

    /// Creation time in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> u64 {
        self.meta().map(|(_, s)| s.created_at_us).unwrap_or(0)
    }

    /// Bytes written between the previous snapshot and this one.
    #[zbus(property(emits_changed_signal = "false"))]
    fn used(&self) -> u64 {
        let store = self.store.lock();
        store
            .pool()
            .snapshot(&self.id)
            .map(|(_, s)| store.pool().layer_used(&s.layer))
            .unwrap_or(0)
    }

    /// Creates volume `name` holding the snapshot's contents, sharing its data
    /// (thin: only what the clone writes takes new space); returns its path.
    #[zbus(name = "Clone")]
    async fn clone_to(
        &self,
        name: &str,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, StorageError> {
        let (snap, name_owned) = (self.id.clone(), name.to_owned());
        let meta = blocking(&self.store, move |s| s.clone_snapshot(&snap, &name_owned)).await?;
        tracing::info!(id = %meta.id, name, snapshot = %self.id, "volume cloned");
        publish_volume(server, &self.store, &meta.id).await
    }

    /// Writes the snapshot's contents to a new file at `path` (absolute; must
    /// not exist) in `format` (`raw` or `qcow2`) as a job, whose object path is
    /// returned at once.
    async fn export(
        &self,
        path: &str,
        format: &str,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, StorageError> {
        let snap = self.id.clone();
        let disk = blocking(&self.store, move |s| s.snapshot_disk(&snap)).await?;
        let name = self.meta().map(|(_, s)| s.name).unwrap_or_default();
        export_job(conn, disk, name, path, format, || {}).await
    }

    /// Deletes the snapshot; its space is reclaimed unless clones still use it
    /// (then when the last of them goes).
    async fn delete(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), StorageError> {
        let snap = self.id.clone();
        let volume = blocking(&self.store, move |s| s.delete_snapshot(&snap)).await?;
        tracing::info!(id = %self.id, "snapshot deleted");
        server
            .remove::<Snapshot, _>(snapshot_path(&self.id).as_str())
            .await?;
        let vpath = volume_path(&volume.id);
        if let Ok(iface) = server.interface::<_, Volume>(vpath.as_str()).await {
            iface
                .get()
                .await
                .snapshots_changed(iface.signal_emitter())
                .await?;
        }
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
    /// Imports an image into a new volume; returns a job.
    fn import_volume(&self, name: &str, path: &str, format: &str) -> zbus::Result<OwnedObjectPath>;
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
    /// Snapshots, oldest first.
    #[zbus(property)]
    fn snapshots(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// I/O counters over the live attachments.
    #[zbus(property(emits_changed_signal = "false"))]
    fn io_counters(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Takes a snapshot.
    fn snapshot(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Returns to one of the volume's snapshots.
    fn rollback(&self, snapshot: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Exports the volume to an image file; returns a job.
    fn export(&self, path: &str, format: &str) -> zbus::Result<OwnedObjectPath>;
}

/// Typed client of one `org.atoll.Storage1.Snapshot`.
#[proxy(
    interface = "org.atoll.Storage1.Snapshot",
    default_service = "org.atoll.Storage1"
)]
pub trait Snapshot {
    /// Unique id.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// Name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// The volume it belongs to.
    #[zbus(property)]
    fn volume(&self) -> zbus::Result<OwnedObjectPath>;
    /// The volume's size when it was taken.
    #[zbus(property)]
    fn size(&self) -> zbus::Result<u64>;
    /// Creation time.
    #[zbus(property)]
    fn created_at(&self) -> zbus::Result<u64>;
    /// Bytes it holds.
    #[zbus(property(emits_changed_signal = "false"))]
    fn used(&self) -> zbus::Result<u64>;
    /// Clones it into a new volume.
    #[zbus(name = "Clone")]
    fn clone_to(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Deletes it.
    fn delete(&self) -> zbus::Result<()>;
    /// Exports it to an image file; returns a job.
    fn export(&self, path: &str, format: &str) -> zbus::Result<OwnedObjectPath>;
}
