//! The daemon's state: the pool, the open chains of attached volumes and their
//! attachments.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use crate::disk::Disk;
use crate::layer::{self, Layer};
use crate::pool::{self, Merge, Pool, SnapshotMeta, VolumeMeta};
use crate::qos::{self, Limiter, QosSpec};
use crate::vhost_blk::{self, Attachment};

/// Queues each attachment offers.
pub const NUM_QUEUES: usize = 4;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the pool.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The volume is attached where the operation needs it free, or attached
    /// read-write where another attachment was asked for.
    #[error("volume {0} is busy: {1}")]
    Busy(String, String),
    /// No attachment with this socket.
    #[error("volume {0} has no attachment at {1}")]
    NoAttachment(String, String),
    /// A layer's data could not be read, written or synced.
    #[error("volume {0}: layer I/O")]
    Io(String, #[source] std::io::Error),
    /// The socket could not be served.
    #[error("cannot attach volume {0}")]
    Attach(String, #[source] vhost_blk::Error),
    /// The QoS specification was refused.
    #[error("invalid QoS for volume {0}")]
    Qos(String, #[source] qos::Error),
    /// The run directory could not be prepared.
    #[error("cannot prepare {0}")]
    RunDir(PathBuf, #[source] std::io::Error),
}

/// The pool and its attachments.
#[derive(Debug)]
pub struct Store {
    pool: Pool,
    run_dir: PathBuf,
    attachments: HashMap<String, Vec<(Attachment, bool)>>,
    /// Open chains of volumes with attachments.
    disks: HashMap<String, Arc<Disk>>,
    /// Open layers, shared by every chain that contains them.
    layers: HashMap<String, Weak<Layer>>,
    limiters: HashMap<String, Limiter>,
    /// Volumes an import or export is working on, with what it is doing.
    busy: HashMap<String, &'static str>,
    next_socket: u64,
}

impl Store {
    /// Opens the pool in `data_dir`; sockets go to `run_dir` (stale ones are
    /// removed). Merges left pending by a crash are finished.
    pub fn open(data_dir: &Path, run_dir: &Path) -> Result<Self, Error> {
        let pool = Pool::open(data_dir)?;
        std::fs::create_dir_all(run_dir).map_err(|e| Error::RunDir(run_dir.to_owned(), e))?;
        for entry in std::fs::read_dir(run_dir)
            .map_err(|e| Error::RunDir(run_dir.to_owned(), e))?
            .flatten()
        {
            if entry.path().extension().is_some_and(|x| x == "sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut store = Self {
            pool,
            run_dir: run_dir.to_owned(),
            attachments: HashMap::new(),
            disks: HashMap::new(),
            layers: HashMap::new(),
            limiters: HashMap::new(),
            busy: HashMap::new(),
            next_socket: 0,
        };
        store.collect()?;
        Ok(store)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn attached(&self, id: &str) -> bool {
        self.attachments.get(id).is_some_and(|a| !a.is_empty())
    }

    fn check_not_busy(&self, id: &str) -> Result<(), Error> {
        match self.busy.get(id) {
            Some(what) => Err(Error::Busy(id.to_owned(), format!("{what} is running"))),
            None => Ok(()),
        }
    }

    /// Creates volume `name` for `src` and returns it with its chain, marked as
    /// importing until [`end_import`](Self::end_import).
    pub fn begin_import(
        &mut self,
        name: &str,
        size: u64,
    ) -> Result<(VolumeMeta, Arc<Disk>), Error> {
        let meta = self.pool.create_for_import(name, size)?;
        self.busy.insert(meta.id.clone(), "an import");
        let disk = self.disk(&meta.id)?;
        Ok((meta, disk))
    }

    /// Finishes an import: keeps the volume if `ok`, else deletes it.
    pub fn end_import(&mut self, id: &str, ok: bool) -> Result<(), Error> {
        self.busy.remove(id);
        if ok {
            self.pool.finish_import(id)?;
            Ok(())
        } else {
            self.delete(id)
        }
    }

    /// The chain of volume `id` for an export; the volume may not be attached
    /// read-write (nor become so) until [`end_export`](Self::end_export).
    pub fn begin_export(&mut self, id: &str) -> Result<Arc<Disk>, Error> {
        self.check_not_busy(id)?;
        if self.attachments(id).iter().any(|(_, ro)| !ro) {
            return Err(Error::Busy(
                id.to_owned(),
                "it is attached read-write; export a snapshot instead".to_owned(),
            ));
        }
        let disk = self.disk(id)?;
        self.busy.insert(id.to_owned(), "an export");
        Ok(disk)
    }

    /// Ends an export of volume `id`.
    pub fn end_export(&mut self, id: &str) {
        self.busy.remove(id);
    }

    /// A read view of snapshot `snap`'s contents (it never changes).
    pub fn snapshot_disk(&mut self, snap: &str) -> Result<Arc<Disk>, Error> {
        let (v, s) = self.pool.snapshot(snap)?;
        let (vid, layer, size) = (v.id.clone(), s.layer.clone(), s.size);
        let layers = self
            .pool
            .chain_of(&vid, &layer)?
            .iter()
            .map(|l| self.layer(&l.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Disk::new(size, layers)))
    }

    /// Layer `id`, opened once and shared.
    fn layer(&mut self, id: &str) -> Result<Arc<Layer>, Error> {
        if let Some(l) = self.layers.get(id).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let l = Arc::new(self.pool.open_layer(id)?);
        self.layers.insert(id.to_owned(), Arc::downgrade(&l));
        Ok(l)
    }

    /// The chain of volume `id`: the attached one, or freshly opened.
    fn disk(&mut self, id: &str) -> Result<Arc<Disk>, Error> {
        if let Some(d) = self.disks.get(id) {
            return Ok(d.clone());
        }
        let size = self.pool.get(id)?.size;
        let layers = self
            .pool
            .chain(id)?
            .iter()
            .map(|l| self.layer(&l.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Disk::new(size, layers)))
    }

    /// Creates a volume.
    pub fn create(&mut self, name: &str, size: u64) -> Result<VolumeMeta, Error> {
        Ok(self.pool.create(name, size)?)
    }

    /// Deletes a volume that has no attachment, with its snapshots; layers that
    /// clones still use stay until nothing does.
    pub fn delete(&mut self, id: &str) -> Result<(), Error> {
        if self.busy.get(id).is_none_or(|w| *w != "an import") {
            self.check_not_busy(id)?;
        }
        if self.attached(id) {
            return Err(Error::Busy(id.to_owned(), "detach it first".to_owned()));
        }
        self.pool.delete(id)?;
        self.limiters.remove(id);
        self.attachments.remove(id);
        self.disks.remove(id);
        self.collect()
    }

    /// Freezes volume `id` as snapshot `name` (attached or not: guest I/O pauses
    /// for the switch to a new top layer, which is a few file creations).
    pub fn snapshot(&mut self, id: &str, name: &str) -> Result<SnapshotMeta, Error> {
        let Some(disk) = self.disks.get(id).cloned() else {
            let (snap, _) = self.pool.take_snapshot(id, name)?;
            return Ok(snap);
        };
        let mut chain = disk.lock().map_err(|e| Error::Io(id.to_owned(), e))?;
        if let Some(top) = chain.layers.last() {
            top.flush().map_err(|e| Error::Io(id.to_owned(), e))?;
        }
        let (snap, top) = self.pool.take_snapshot(id, name)?;
        chain.layers.push(self.layer(&top.id)?);
        tracing::info!(volume = id, snapshot = %snap.id, "snapshot taken");
        Ok(snap)
    }

    /// Returns volume `id` (not attached) to snapshot `snap`.
    pub fn rollback(&mut self, id: &str, snap: &str) -> Result<VolumeMeta, Error> {
        self.check_not_busy(id)?;
        if self.attached(id) {
            return Err(Error::Busy(
                id.to_owned(),
                "detach it before rolling back".to_owned(),
            ));
        }
        let meta = self.pool.rollback(id, snap)?;
        self.collect()?;
        tracing::info!(volume = id, snapshot = snap, "rolled back");
        Ok(meta)
    }

    /// Creates volume `name` from snapshot `snap`.
    pub fn clone_snapshot(&mut self, snap: &str, name: &str) -> Result<VolumeMeta, Error> {
        Ok(self.pool.clone_snapshot(snap, name)?)
    }

    /// Deletes snapshot `snap`, reclaiming its space when nothing else uses it.
    pub fn delete_snapshot(&mut self, snap: &str) -> Result<VolumeMeta, Error> {
        let meta = self.pool.delete_snapshot(snap)?;
        self.collect()?;
        Ok(meta)
    }

    /// Removes unneeded layers and merges unnamed ones into their only child,
    /// also under attached volumes (their I/O goes on during the copy).
    fn collect(&mut self) -> Result<(), Error> {
        loop {
            let merges = self.pool.collect()?;
            let Some(m) = merges.first() else {
                return Ok(());
            };
            self.merge(m)?;
        }
    }

    fn merge(&mut self, m: &Merge) -> Result<(), Error> {
        let lower = self.layer(&m.layer)?;
        let child = self.layer(&m.child)?;
        // If the child is an attached volume's top, its asynchronous writes are
        // held off batch by batch while clusters are copied in.
        let live = self
            .disks
            .values()
            .find(|d| d.layer_ids().last() == Some(&m.child))
            .cloned();
        let copied = child
            .absorb(&lower, || live.as_ref().map(|d| d.lock()).transpose())
            .map_err(|e| Error::Io(m.child.clone(), e))?;
        for disk in self.disks.values() {
            disk.lock()
                .map_err(|e| Error::Io(m.child.clone(), e))?
                .layers
                .retain(|l| l.id() != m.layer);
        }
        self.pool.finish_merge(m)?;
        self.layers.remove(&m.layer);
        tracing::info!(layer = %m.layer, into = %m.child, clusters = copied, "layer merged");
        Ok(())
    }

    /// The limiter of volume `id`, shared by all its attachments.
    fn limiter(&mut self, id: &str) -> Result<Limiter, Error> {
        let spec = self.pool.get(id)?.qos;
        Ok(self
            .limiters
            .entry(id.to_owned())
            .or_insert_with(|| Limiter::new(spec))
            .clone())
    }

    /// Validates, persists and applies new QoS limits; attached frontends are
    /// throttled by them from their next request.
    pub fn set_qos(&mut self, id: &str, limits: &BTreeMap<String, u64>) -> Result<QosSpec, Error> {
        let spec = QosSpec::from_map(limits).map_err(|e| Error::Qos(id.to_owned(), e))?;
        self.pool.set_qos(id, spec)?;
        self.limiter(id)?.set(spec);
        tracing::info!(volume = id, ?spec, "QoS changed");
        Ok(spec)
    }

    /// Grows volume `id`, attached or not; attached frontends are told of the
    /// new capacity.
    pub fn resize(&mut self, id: &str, size: u64) -> Result<VolumeMeta, Error> {
        self.check_not_busy(id)?;
        let current = self.pool.get(id)?.size;
        if size < current || size == 0 || size % crate::volume::SECTOR != 0 {
            // Let the pool produce the precise error.
            return Ok(self.pool.resize(id, size)?);
        }
        let disk = self.disk(id)?;
        let mut chain = disk.lock().map_err(|e| Error::Io(id.to_owned(), e))?;
        let top = chain
            .layers
            .last()
            .cloned()
            .ok_or_else(|| Error::Io(id.to_owned(), std::io::Error::other("no layers")))?;
        top.flush().map_err(|e| Error::Io(id.to_owned(), e))?;
        let top_id = top.id().to_owned();
        layer::grow(&self.pool.layer_dir(&top_id), size)
            .map_err(|e| Error::Io(id.to_owned(), e))?;
        // Reopen the top layer so it sees its new length.
        drop(top);
        chain.layers.pop();
        self.layers.remove(&top_id);
        chain.layers.push(self.layer(&top_id)?);
        let meta = self.pool.resize(id, size)?;
        chain.capacity = size;
        drop(chain);
        for (att, _) in self
            .attachments
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            att.config_changed();
        }
        tracing::info!(volume = id, size, "volume resized");
        Ok(meta)
    }

    /// Serves volume `id` on a new socket. Any number of read-only attachments, or
    /// exactly one read-write one.
    pub fn attach(&mut self, id: &str, read_only: bool) -> Result<PathBuf, Error> {
        self.pool.get(id)?;
        if !read_only || self.busy.get(id).is_some_and(|w| *w == "an import") {
            self.check_not_busy(id)?;
        }
        let current = self
            .attachments
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if current.iter().any(|(_, ro)| !ro) {
            return Err(Error::Busy(
                id.to_owned(),
                "it has a read-write attachment".to_owned(),
            ));
        }
        if !read_only && !current.is_empty() {
            return Err(Error::Busy(
                id.to_owned(),
                "it has read-only attachments".to_owned(),
            ));
        }
        let disk = self.disk(id)?;
        self.next_socket += 1;
        let short: String = id.chars().take(8).collect();
        let socket = self
            .run_dir
            .join(format!("{short}-{}.sock", self.next_socket));
        let limiter = self.limiter(id)?;
        let att = Attachment::start(&socket, disk.clone(), read_only, NUM_QUEUES, id, limiter)
            .map_err(|e| Error::Attach(id.to_owned(), e))?;
        tracing::info!(volume = id, socket = %socket.display(), read_only, "volume attached");
        self.disks.insert(id.to_owned(), disk);
        self.attachments
            .entry(id.to_owned())
            .or_default()
            .push((att, read_only));
        Ok(socket)
    }

    /// Stops serving the attachment of `id` at `socket`. The last detach syncs
    /// the volume's top layer.
    pub fn detach(&mut self, id: &str, socket: &str) -> Result<(), Error> {
        let list = self.attachments.entry(id.to_owned()).or_default();
        let pos = list
            .iter()
            .position(|(a, _)| a.socket() == Path::new(socket))
            .ok_or_else(|| Error::NoAttachment(id.to_owned(), socket.to_owned()))?;
        let (att, _) = list.remove(pos);
        att.detach();
        if list.is_empty() {
            if let Some(disk) = self.disks.remove(id) {
                disk.flush().map_err(|e| Error::Io(id.to_owned(), e))?;
            }
        }
        tracing::info!(volume = id, socket, "volume detached");
        Ok(())
    }

    /// I/O counters of volume `id`, summed over its attachments (since each was
    /// made): read_ops, read_bytes, write_ops, write_bytes, flush_ops,
    /// discard_ops, errors, malformed.
    pub fn counters(&self, id: &str) -> BTreeMap<String, u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = BTreeMap::new();
        for (att, _) in self
            .attachments
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let c = att.counters();
            for (k, v) in [
                ("read_ops", &c.read_ops),
                ("read_bytes", &c.read_bytes),
                ("write_ops", &c.write_ops),
                ("write_bytes", &c.write_bytes),
                ("flush_ops", &c.flush_ops),
                ("discard_ops", &c.discard_ops),
                ("errors", &c.errors),
                ("malformed", &c.malformed),
            ] {
                *out.entry(k.to_owned()).or_insert(0) += v.load(Relaxed);
            }
        }
        out
    }

    /// Sockets of volume `id` with their read-only flag.
    pub fn attachments(&self, id: &str) -> Vec<(String, bool)> {
        self.attachments
            .get(id)
            .map(|l| {
                l.iter()
                    .map(|(a, ro)| (a.socket().display().to_string(), *ro))
                    .collect()
            })
            .unwrap_or_default()
    }
}
