//! The storage pool: a directory of volumes and the copy-on-write layers they
//! are made of, on the node's data disk.
//!
//! ```text
//! <pool>/volumes/<uuid>/meta.json   name, size, top layer, snapshots, QoS
//! <pool>/layers/<uuid>/layer.json   parent layer (none for a bottom layer)
//! <pool>/layers/<uuid>/data         the layer's data (sparse file, volume-sized)
//! <pool>/layers/<uuid>/map          which clusters it holds (layers with a map)
//! ```
//!
//! A volume is its top layer and the chain of parents below it. A snapshot freezes
//! the top layer and puts a new empty one over it; a clone is a new volume whose
//! top layer sits on a snapshot's layer; rollback replaces the top layer with a new
//! one on the snapshot's. A layer that nothing names (no volume top, no snapshot)
//! is garbage when it has no child, and is merged into its child when it has one.
//!
//! Every directory is built under `.new-<uuid>` and renamed into place; removal
//! renames to `.gone-<uuid>` first. Each rename is followed by a directory fsync,
//! and JSON files are replaced by rename. Every step leaves a pool that opens and
//! reads the same as before or after it; opening sweeps what was left half done.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layer::{self, Layer};
use crate::qos::QosSpec;
use crate::volume::SECTOR;

/// Longest volume or snapshot name.
const NAME_MAX: usize = 64;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on the pool failed.
    #[error("pool I/O on {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid name {0:?}: use 1-{NAME_MAX} characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A volume (or a snapshot of this volume) with this name exists.
    #[error("the name {0:?} is already taken")]
    NameTaken(String),
    /// The size is unusable.
    #[error("invalid size {0}: must be a positive multiple of {SECTOR} bytes")]
    BadSize(u64),
    /// The new size is smaller than the current one.
    #[error("volume {id} is {current} bytes; shrinking to {requested} is not supported")]
    Shrink {
        /// Volume id.
        id: String,
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
    /// No such volume.
    #[error("no volume {0}")]
    NotFound(String),
    /// No such snapshot.
    #[error("no snapshot {0}")]
    NoSnapshot(String),
    /// The pool's file system has too little free space.
    #[error("pool has {free} bytes free, {needed} needed")]
    Full {
        /// Free bytes.
        free: u64,
        /// Bytes the operation needs.
        needed: u64,
    },
    /// Another process has the pool open.
    #[error("pool {0} is in use by another stord")]
    Locked(PathBuf),
    /// A metadata file is unreadable.
    #[error("corrupt metadata in {0}")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    /// A volume's chain of layers is broken.
    #[error("volume {0}: layer {1} is missing or unreadable")]
    BrokenChain(String, String),
    /// A layer's files failed.
    #[error("layer {0}")]
    Layer(String, #[source] layer::Error),
}

/// A frozen point in a volume's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Unique id (UUID).
    pub id: String,
    /// Operator-chosen name, unique among the volume's snapshots.
    pub name: String,
    /// The frozen layer.
    pub layer: String,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at_us: u64,
}

/// What is recorded about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Unique id (UUID).
    pub id: String,
    /// Operator-chosen name, unique in the pool.
    pub name: String,
    /// Capacity in bytes.
    pub size: u64,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at_us: u64,
    /// QoS limits (all 0 = unlimited).
    #[serde(default)]
    pub qos: QosSpec,
    /// The layer that takes the writes.
    pub top: String,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotMeta>,
    /// Being filled from an image; a volume still marked so when the pool opens
    /// is the remains of an interrupted import and is removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub importing: bool,
}

/// What is recorded about a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// Unique id (UUID).
    pub id: String,
    /// The layer below, if any.
    pub parent: Option<String>,
    /// Whether the layer has a cluster map (every layer made over a parent has).
    pub cow: bool,
    /// Creation time, microseconds since the Unix epoch.
    pub created_at_us: u64,
}

/// A layer that nothing names and that has exactly one child: its data must be
/// copied into the child before it can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The layer to remove.
    pub layer: String,
    /// Its only child, which absorbs it.
    pub child: String,
}

/// An open pool.
#[derive(Debug)]
pub struct Pool {
    _lock: nix::fcntl::Flock<fs::File>,
    dir: PathBuf,
    volumes: BTreeMap<String, VolumeMeta>,
    layers: BTreeMap<String, LayerMeta>,
    broken: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io(path.to_owned(), e)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), Error> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let body = serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt(path.clone(), e))?;
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let text = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| Error::Corrupt(path.to_owned(), e))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_size(size: u64) -> Result<(), Error> {
    if size == 0 || size % SECTOR != 0 {
        Err(Error::BadSize(size))
    } else {
        Ok(())
    }
}

/// Reads every `<dir>/<uuid>/<file>` JSON, removing `.new-`/`.gone-` leftovers;
/// unreadable entries are reported in `broken`.
fn load_dir<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    file: &str,
    broken: &mut Vec<String>,
) -> Result<Vec<T>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(".new-") || name.starts_with(".gone-") {
            tracing::info!(path = %path.display(), "removing an interrupted pool operation");
            fs::remove_dir_all(&path).map_err(io(&path))?;
            continue;
        }
        match read_json(&path.join(file)) {
            Ok(v) => out.push(v),
            // One bad entry must not take the others down: report it and go on.
            Err(e) => {
                let msg = crate::error_chain(&e);
                tracing::error!(path = %path.display(), error = %msg, "skipped");
                broken.push(msg);
            }
        }
    }
    Ok(out)
}

impl Pool {
    /// Opens (creating if needed) the pool in `dir`, sweeping half-done
    /// operations and removing layers nothing needs.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let vdir = dir.join("volumes");
        let ldir = dir.join("layers");
        for d in [&vdir, &ldir] {
            fs::create_dir_all(d).map_err(io(d))?;
        }
        let lock_path = dir.join(".lock");
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(Error::Locked(dir.to_owned())),
            Err((_, e)) => return Err(Error::Io(lock_path, e.into())),
        };
        let mut broken = Vec::new();
        let layers = load_dir::<LayerMeta>(&ldir, "layer.json", &mut broken)?
            .into_iter()
            .map(|l| (l.id.clone(), l))
            .collect();
        let loaded = load_dir::<VolumeMeta>(&vdir, "meta.json", &mut broken)?;
        let mut pool = Self {
            _lock: lock,
            dir: dir.to_owned(),
            volumes: BTreeMap::new(),
            layers,
            broken,
        };
        for v in loaded {
            if v.importing {
                tracing::info!(volume = %v.id, name = %v.name, "removing an interrupted import");
                pool.volumes.insert(v.id.clone(), v.clone());
                pool.delete(&v.id)?;
                continue;
            }
            let whole = std::iter::once(v.top.as_str())
                .chain(v.snapshots.iter().map(|s| s.layer.as_str()))
                .try_for_each(|l| pool.chain_of(&v.id, l).map(drop));
            match whole {
                Ok(()) => {
                    pool.volumes.insert(v.id.clone(), v);
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::error!(volume = %v.id, error = %msg, "volume skipped");
                    pool.broken.push(msg);
                }
            }
        }
        pool.collect()?;
        Ok(pool)
    }

    /// Volumes and layers that could not be opened, with the reason; left on
    /// disk untouched.
    pub fn broken(&self) -> &[String] {
        &self.broken
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.dir.join("volumes").join(id)
    }

    /// The directory of layer `id`.
    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.dir.join("layers").join(id)
    }

    /// Every volume, by id.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeMeta> {
        self.volumes.values()
    }

    /// Volume `id`.
    pub fn get(&self, id: &str) -> Result<&VolumeMeta, Error> {
        self.volumes
            .get(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// Layer `id`.
    pub fn layer(&self, id: &str) -> Option<&LayerMeta> {
        self.layers.get(id)
    }

    /// The volume owning snapshot `snap`, and the snapshot.
    pub fn snapshot(&self, snap: &str) -> Result<(&VolumeMeta, &SnapshotMeta), Error> {
        self.volumes
            .values()
            .find_map(|v| v.snapshots.iter().find(|s| s.id == snap).map(|s| (v, s)))
            .ok_or_else(|| Error::NoSnapshot(snap.to_owned()))
    }

    /// The layers under (and including) `top`, bottom first (`volume` names the
    /// owner in errors).
    pub fn chain_of(&self, volume: &str, top: &str) -> Result<Vec<LayerMeta>, Error> {
        let mut out = Vec::new();
        let mut cur = Some(top.to_owned());
        while let Some(id) = cur {
            let l = self
                .layers
                .get(&id)
                .filter(|_| out.len() <= self.layers.len())
                .ok_or_else(|| Error::BrokenChain(volume.to_owned(), id.clone()))?;
            cur = l.parent.clone();
            out.push(l.clone());
        }
        out.reverse();
        Ok(out)
    }

    /// Volume `id`'s layers, bottom first.
    pub fn chain(&self, id: &str) -> Result<Vec<LayerMeta>, Error> {
        self.chain_of(id, &self.get(id)?.top)
    }

    /// Opens layer `id`'s files.
    pub fn open_layer(&self, id: &str) -> Result<Layer, Error> {
        let meta = self
            .layers
            .get(id)
            .ok_or_else(|| Error::BrokenChain(String::new(), id.to_owned()))?;
        Layer::open(&self.layer_dir(id), id, meta.cow).map_err(|e| Error::Layer(id.to_owned(), e))
    }

    /// Total and free bytes of the pool's file system.
    pub fn space(&self) -> Result<(u64, u64), Error> {
        nix_statvfs(&self.dir)
    }

    /// Bytes layer `id` occupies.
    pub fn layer_used(&self, id: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.layer_dir(id);
        ["data", "map"]
            .iter()
            .filter_map(|f| fs::metadata(dir.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Bytes volume `id` occupies: its layers that no other volume shares.
    pub fn used(&self, id: &str) -> Result<u64, Error> {
        let v = self.get(id)?;
        let mine: std::collections::BTreeSet<String> = std::iter::once(v.top.as_str())
            .chain(v.snapshots.iter().map(|s| s.layer.as_str()))
            .flat_map(|l| self.chain_of(id, l).unwrap_or_default())
            .map(|l| l.id)
            .collect();
        let shared: std::collections::BTreeSet<String> = self
            .volumes
            .values()
            .filter(|o| o.id != id)
            .flat_map(|o| {
                std::iter::once(o.top.clone())
                    .chain(o.snapshots.iter().map(|s| s.layer.clone()))
                    .flat_map(|l| self.chain_of(&o.id, &l).unwrap_or_default())
                    .map(|l| l.id)
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(mine.difference(&shared).map(|l| self.layer_used(l)).sum())
    }

    /// Creates a layer of `size` bytes over `parent`.
    fn new_layer(&mut self, parent: Option<&str>, size: u64) -> Result<LayerMeta, Error> {
        let meta = LayerMeta {
            id: uuid::Uuid::new_v4().to_string(),
            parent: parent.map(str::to_owned),
            cow: parent.is_some(),
            created_at_us: now_us(),
        };
        let ldir = self.dir.join("layers");
        let tmp = ldir.join(format!(".new-{}", meta.id));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        let built = Layer::create(&tmp, size, meta.cow)
            .map_err(|e| Error::Layer(meta.id.clone(), e))
            .and_then(|()| write_json(&tmp, "layer.json", &meta));
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dest = self.layer_dir(&meta.id);
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(&ldir)?;
        self.layers.insert(meta.id.clone(), meta.clone());
        Ok(meta)
    }

    fn check_new_name(&self, name: &str) -> Result<(), Error> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_owned()));
        }
        if self.volumes.values().any(|v| v.name == name) {
            return Err(Error::NameTaken(name.to_owned()));
        }
        Ok(())
    }

    /// Writes a new volume's directory.
    fn add_volume(&mut self, meta: VolumeMeta) -> Result<VolumeMeta, Error> {
        let vdir = self.dir.join("volumes");
        let tmp = vdir.join(format!(".new-{}", meta.id));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        if let Err(e) = write_json(&tmp, "meta.json", &meta) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dest = self.volume_dir(&meta.id);
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(&vdir)?;
        self.volumes.insert(meta.id.clone(), meta.clone());
        Ok(meta)
    }

    fn save(&mut self, meta: VolumeMeta) -> Result<VolumeMeta, Error> {
        write_json(&self.volume_dir(&meta.id), "meta.json", &meta)?;
        self.volumes.insert(meta.id.clone(), meta.clone());
        Ok(meta)
    }

    /// Creates an empty thin volume.
    pub fn create(&mut self, name: &str, size: u64) -> Result<VolumeMeta, Error> {
        self.create_volume(name, size, false)
    }

    /// Creates an empty volume to be filled by an import, marked so until
    /// [`finish_import`](Self::finish_import).
    pub fn create_for_import(&mut self, name: &str, size: u64) -> Result<VolumeMeta, Error> {
        self.create_volume(name, size, true)
    }

    /// Clears the import mark of volume `id`.
    pub fn finish_import(&mut self, id: &str) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        meta.importing = false;
        self.save(meta)
    }

    fn create_volume(
        &mut self,
        name: &str,
        size: u64,
        importing: bool,
    ) -> Result<VolumeMeta, Error> {
        self.check_new_name(name)?;
        check_size(size)?;
        let top = self.new_layer(None, size)?;
        self.add_volume(VolumeMeta {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            size,
            created_at_us: now_us(),
            qos: QosSpec::default(),
            top: top.id,
            snapshots: Vec::new(),
            importing,
        })
    }

    /// Records volume `id`'s new size; the caller has grown its top layer's files.
    pub fn resize(&mut self, id: &str, size: u64) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        check_size(size)?;
        if size < meta.size {
            return Err(Error::Shrink {
                id: id.to_owned(),
                current: meta.size,
                requested: size,
            });
        }
        meta.size = size;
        self.save(meta)
    }

    /// Records new QoS limits for volume `id`.
    pub fn set_qos(&mut self, id: &str, qos: QosSpec) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        meta.qos = qos;
        self.save(meta)
    }

    /// Freezes volume `id`'s top layer as snapshot `name` and puts a new empty
    /// layer over it. The caller has flushed the top layer. Returns the
    /// snapshot and the new top layer.
    pub fn take_snapshot(
        &mut self,
        id: &str,
        name: &str,
    ) -> Result<(SnapshotMeta, LayerMeta), Error> {
        let mut meta = self.get(id)?.clone();
        if !valid_name(name) {
            return Err(Error::BadName(name.to_owned()));
        }
        if meta.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::NameTaken(name.to_owned()));
        }
        let top = self.new_layer(Some(&meta.top), meta.size)?;
        let snap = SnapshotMeta {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            layer: std::mem::replace(&mut meta.top, top.id.clone()),
            size: meta.size,
            created_at_us: now_us(),
        };
        meta.snapshots.push(snap.clone());
        self.save(meta)?;
        Ok((snap, top))
    }

    /// Points volume `id` at a new empty layer over snapshot `snap`'s, dropping
    /// what was written since. The caller makes sure nothing is attached.
    pub fn rollback(&mut self, id: &str, snap: &str) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        let s = meta
            .snapshots
            .iter()
            .find(|s| s.id == snap)
            .cloned()
            .ok_or_else(|| Error::NoSnapshot(snap.to_owned()))?;
        let top = self.new_layer(Some(&s.layer), s.size)?;
        meta.top = top.id;
        meta.size = s.size;
        self.save(meta)
    }

    /// Creates volume `name` from snapshot `snap`, sharing its data.
    pub fn clone_snapshot(&mut self, snap: &str, name: &str) -> Result<VolumeMeta, Error> {
        self.check_new_name(name)?;
        let (_, s) = self.snapshot(snap)?;
        let s = s.clone();
        let top = self.new_layer(Some(&s.layer), s.size)?;
        self.add_volume(VolumeMeta {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            size: s.size,
            created_at_us: now_us(),
            qos: QosSpec::default(),
            top: top.id,
            snapshots: Vec::new(),
            importing: false,
        })
    }

    /// Forgets snapshot `snap`; its layer goes at the next [`collect`](Self::collect).
    pub fn delete_snapshot(&mut self, snap: &str) -> Result<VolumeMeta, Error> {
        let (v, _) = self.snapshot(snap)?;
        let mut meta = v.clone();
        meta.snapshots.retain(|s| s.id != snap);
        self.save(meta)
    }

    /// Deletes volume `id` (its snapshots too); its layers go at the next
    /// [`collect`](Self::collect).
    pub fn delete(&mut self, id: &str) -> Result<(), Error> {
        self.get(id)?;
        let vdir = self.dir.join("volumes");
        let gone = vdir.join(format!(".gone-{id}"));
        let src = self.volume_dir(id);
        fs::rename(&src, &gone).map_err(io(&src))?;
        sync_dir(&vdir)?;
        self.volumes.remove(id);
        fs::remove_dir_all(&gone).map_err(io(&gone))?;
        Ok(())
    }

    /// Makes layer `child`'s parent its grandparent; the caller has copied the
    /// parent's data into it.
    pub fn reparent(&mut self, child: &str, parent: Option<&str>) -> Result<(), Error> {
        let mut meta = self
            .layers
            .get(child)
            .cloned()
            .ok_or_else(|| Error::BrokenChain(String::new(), child.to_owned()))?;
        meta.parent = parent.map(str::to_owned);
        write_json(&self.layer_dir(child), "layer.json", &meta)?;
        self.layers.insert(child.to_owned(), meta);
        Ok(())
    }

    fn remove_layer(&mut self, id: &str) -> Result<(), Error> {
        let ldir = self.dir.join("layers");
        let gone = ldir.join(format!(".gone-{id}"));
        let src = self.layer_dir(id);
        fs::rename(&src, &gone).map_err(io(&src))?;
        sync_dir(&ldir)?;
        self.layers.remove(id);
        fs::remove_dir_all(&gone).map_err(io(&gone))?;
        tracing::info!(layer = id, "layer removed");
        Ok(())
    }

    /// Removes every layer nothing needs and returns the merges still to do
    /// (layers nothing names that have one child). Does nothing while any volume
    /// or layer is unreadable: its layers might look unneeded.
    pub fn collect(&mut self) -> Result<Vec<Merge>, Error> {
        if !self.broken.is_empty() {
            return Ok(Vec::new());
        }
        loop {
            let named: std::collections::BTreeSet<&str> = self
                .volumes
                .values()
                .flat_map(|v| {
                    std::iter::once(v.top.as_str())
                        .chain(v.snapshots.iter().map(|s| s.layer.as_str()))
                })
                .collect();
            let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for l in self.layers.values() {
                if let Some(p) = &l.parent {
                    children.entry(p.as_str()).or_default().push(l.id.as_str());
                }
            }
            let unnamed = self.layers.keys().filter(|id| !named.contains(id.as_str()));
            let mut dead = Vec::new();
            let mut merges = Vec::new();
            for id in unnamed {
                match children.get(id.as_str()).map(Vec::as_slice) {
                    None | Some([]) => dead.push(id.clone()),
                    Some([only]) => merges.push(Merge {
                        layer: id.clone(),
                        child: (*only).to_owned(),
                    }),
                    Some(_) => {}
                }
            }
            if dead.is_empty() {
                return Ok(merges);
            }
            for id in dead {
                self.remove_layer(&id)?;
            }
        }
    }

    /// Finishes a merge the caller did (the child holds every cluster of
    /// `m.layer`): the child takes the layer's parent and the layer goes.
    pub fn finish_merge(&mut self, m: &Merge) -> Result<(), Error> {
        let parent = self.layers.get(&m.layer).and_then(|l| l.parent.clone());
        self.reparent(&m.child, parent.as_deref())?;
        self.remove_layer(&m.layer)
    }
}

fn nix_statvfs(dir: &Path) -> Result<(u64, u64), Error> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        Error::Io(
            dir.to_owned(),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )
    })?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs buffer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Io(dir.to_owned(), std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs succeeded, so it filled the structure.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok((st.f_blocks * frsize, st.f_bavail * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_survive_reopen_and_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::open(dir.path()).unwrap();
        let a = pool.create("disk-a", 1 << 20).unwrap();
        let b = pool.create("disk-b", 2 << 20).unwrap();
        assert!(matches!(
            pool.create("disk-a", 4096),
            Err(Error::NameTaken(_))
        ));
        assert!(matches!(
            pool.create("bad/name", 4096),
            Err(Error::BadName(_))
        ));
        assert!(matches!(pool.create("", 4096), Err(Error::BadName(_))));
        assert!(matches!(pool.create("x", 1000), Err(Error::BadSize(1000))));
        pool.resize(&b.id, 4 << 20).unwrap();
        assert!(matches!(
            pool.resize(&b.id, 1 << 20),
            Err(Error::Shrink { .. })
        ));
        pool.delete(&a.id).unwrap();
        assert!(matches!(pool.delete(&a.id), Err(Error::NotFound(_))));
        assert_eq!(pool.collect().unwrap(), vec![]);
        assert_eq!(pool.layers.len(), 1, "the deleted volume's layer must go");
        // A crash in the middle of a create and of a delete.
        fs::create_dir(dir.path().join("volumes/.new-x")).unwrap();
        fs::create_dir(dir.path().join("layers/.gone-y")).unwrap();
        assert!(
            matches!(Pool::open(dir.path()), Err(Error::Locked(_))),
            "a second opener must be refused"
        );
        drop(pool);
        let pool = Pool::open(dir.path()).unwrap();
        let ids: Vec<_> = pool.volumes().map(|v| (v.name.clone(), v.size)).collect();
        assert_eq!(ids, vec![("disk-b".to_owned(), 4 << 20)]);
        assert!(!dir.path().join("volumes/.new-x").exists());
        assert!(!dir.path().join("layers/.gone-y").exists());
        assert_eq!(pool.chain(&b.id).unwrap().len(), 1);
        let (total, free) = pool.space().unwrap();
        assert!(total > 0 && free <= total);
    }

    #[test]
    fn snapshots_clones_and_rollbacks_keep_exactly_the_layers_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::open(dir.path()).unwrap();
        let v = pool.create("v", 1 << 20).unwrap();
        let base = v.top.clone();
        let (s1, t1) = pool.take_snapshot(&v.id, "s1").unwrap();
        assert!(matches!(
            pool.take_snapshot(&v.id, "s1"),
            Err(Error::NameTaken(_))
        ));
        let (s2, t2) = pool.take_snapshot(&v.id, "s2").unwrap();
        assert_eq!(s1.layer, base);
        assert_eq!(s2.layer, t1.id);
        let ids = |c: Vec<LayerMeta>| c.into_iter().map(|l| l.id).collect::<Vec<_>>();
        assert_eq!(
            ids(pool.chain(&v.id).unwrap()),
            vec![base.clone(), t1.id.clone(), t2.id.clone()]
        );
        let c = pool.clone_snapshot(&s1.id, "c").unwrap();
        assert_eq!(pool.chain(&c.id).unwrap()[0].id, base);
        // Rolling back to s1 drops the live top (nothing else uses it).
        let v2 = pool.rollback(&v.id, &s1.id).unwrap();
        assert_eq!(pool.collect().unwrap(), vec![]);
        assert!(pool.layer(&t2.id).is_none());
        assert_eq!(pool.chain(&v.id).unwrap()[0].id, base);
        // Deleting s2 leaves t1 unnamed and childless: it goes.
        pool.delete_snapshot(&s2.id).unwrap();
        assert_eq!(pool.collect().unwrap(), vec![]);
        assert!(pool.layer(&t1.id).is_none());
        // Deleting s1: the base still has two children (v and c), so it stays.
        pool.delete_snapshot(&s1.id).unwrap();
        assert_eq!(pool.collect().unwrap(), vec![]);
        assert!(pool.layer(&base).is_some());
        // Deleting v leaves the base with one child (c's top): a merge.
        pool.delete(&v.id).unwrap();
        let merges = pool.collect().unwrap();
        assert_eq!(
            merges,
            vec![Merge {
                layer: base.clone(),
                child: c.top.clone()
            }]
        );
        pool.finish_merge(&merges[0]).unwrap();
        assert!(pool.layer(&base).is_none());
        assert!(pool.layer(&v2.top).is_none());
        drop(pool);
        let pool = Pool::open(dir.path()).unwrap();
        assert_eq!(ids(pool.chain(&c.id).unwrap()), vec![c.top.clone()]);
        assert_eq!(pool.layers.len(), 1);
    }

    #[test]
    fn an_interrupted_import_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::open(dir.path()).unwrap();
        let half = pool.create_for_import("half", 1 << 20).unwrap();
        let done = pool.create_for_import("done", 1 << 20).unwrap();
        pool.finish_import(&done.id).unwrap();
        drop(pool);
        let pool = Pool::open(dir.path()).unwrap();
        let names: Vec<_> = pool.volumes().map(|v| v.name.clone()).collect();
        assert_eq!(names, vec!["done".to_owned()]);
        assert!(pool.layer(&half.top).is_none(), "its layer must go too");
        assert!(!pool.layer_dir(&half.top).exists());
    }

    #[test]
    fn a_volume_with_corrupt_metadata_is_skipped_and_nothing_is_collected() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::open(dir.path()).unwrap();
        let v = pool.create("v", 4096).unwrap();
        let good = pool.create("w", 4096).unwrap();
        fs::write(
            dir.path().join("volumes").join(&v.id).join("meta.json"),
            b"{not json",
        )
        .unwrap();
        drop(pool);
        let pool = Pool::open(dir.path()).unwrap();
        assert_eq!(
            pool.volumes().map(|m| m.id.clone()).collect::<Vec<_>>(),
            vec![good.id]
        );
        assert_eq!(pool.broken().len(), 1);
        assert!(
            pool.broken()[0].contains("meta.json"),
            "{:?}",
            pool.broken()
        );
        assert!(
            dir.path().join("volumes").join(&v.id).exists(),
            "a broken volume must be kept"
        );
        assert!(
            pool.layer(&v.top).is_some() && pool.layer_dir(&v.top).exists(),
            "the layers of an unreadable volume must not be collected"
        );
    }
}
