//! The storage pool: a directory of volumes on the node's data disk.
//!
//! ```text
//! <pool>/volumes/<uuid>/meta.json   name, size, creation time (written atomically)
//! <pool>/volumes/<uuid>/data        the thin volume (sparse file)
//! ```
//!
//! Creation builds the volume under `.new-<uuid>` and renames it into place;
//! deletion renames it to `.gone-<uuid>` before removing it. Both renames are
//! atomic and followed by a directory fsync, so after a crash a volume is either
//! wholly there or wholly absent, and opening the pool sweeps the leftovers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::qos::QosSpec;
use crate::volume::{self, Volume, SECTOR};

/// Longest volume name.
const NAME_MAX: usize = 64;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on the pool failed.
    #[error("pool I/O on {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The volume name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid volume name {0:?}: use 1-{NAME_MAX} characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A volume with this name exists.
    #[error("a volume named {0:?} already exists")]
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
    /// A volume's metadata is unreadable.
    #[error("corrupt metadata in {0}")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    /// The data file failed.
    #[error(transparent)]
    Volume(#[from] volume::Error),
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
}

/// An open pool.
#[derive(Debug)]
pub struct Pool {
    _lock: nix::fcntl::Flock<fs::File>,
    dir: PathBuf,
    volumes: BTreeMap<String, VolumeMeta>,
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

fn write_meta(dir: &Path, meta: &VolumeMeta) -> Result<(), Error> {
    let path = dir.join("meta.json");
    let tmp = dir.join("meta.json.tmp");
    let body = serde_json::to_vec_pretty(meta).map_err(|e| Error::Corrupt(path.clone(), e))?;
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
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

impl Pool {
    /// Opens (creating if needed) the pool in `dir`, sweeping half-created and
    /// half-deleted volumes.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let vdir = dir.join("volumes");
        fs::create_dir_all(&vdir).map_err(io(&vdir))?;
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
        let mut volumes = BTreeMap::new();
        let mut broken = Vec::new();
        for entry in fs::read_dir(&vdir).map_err(io(&vdir))? {
            let entry = entry.map_err(io(&vdir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".new-") || name.starts_with(".gone-") {
                tracing::info!(path = %path.display(), "removing an interrupted volume operation");
                fs::remove_dir_all(&path).map_err(io(&path))?;
                continue;
            }
            let meta_path = path.join("meta.json");
            let meta = fs::read(&meta_path)
                .map_err(io(&meta_path))
                .and_then(|text| {
                    serde_json::from_slice::<VolumeMeta>(&text)
                        .map_err(|e| Error::Corrupt(meta_path.clone(), e))
                });
            match meta {
                Ok(meta) => {
                    volumes.insert(meta.id.clone(), meta);
                }
                // One bad volume must not take the others down: report it and go on.
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::error!(volume = %path.display(), error = %msg, "volume skipped");
                    broken.push(msg);
                }
            }
        }
        Ok(Self {
            _lock: lock,
            dir: dir.to_owned(),
            volumes,
            broken,
        })
    }

    /// Volumes that could not be opened, with the reason; left on disk untouched.
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

    /// Path of the data file of volume `id`.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("data")
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

    /// Total and free bytes of the pool's file system.
    pub fn space(&self) -> Result<(u64, u64), Error> {
        let st = nix_statvfs(&self.dir)?;
        Ok(st)
    }

    /// Bytes volume `id` occupies.
    pub fn used(&self, id: &str) -> Result<u64, Error> {
        use std::os::unix::fs::MetadataExt;
        let p = self.data_path(id);
        Ok(fs::metadata(&p).map_err(io(&p))?.blocks() * 512)
    }

    /// Creates an empty thin volume.
    pub fn create(&mut self, name: &str, size: u64) -> Result<VolumeMeta, Error> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_owned()));
        }
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize(size));
        }
        if self.volumes.values().any(|v| v.name == name) {
            return Err(Error::NameTaken(name.to_owned()));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let vdir = self.dir.join("volumes");
        let tmp = vdir.join(format!(".new-{id}"));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        let meta = VolumeMeta {
            id: id.clone(),
            name: name.to_owned(),
            size,
            created_at_us: now_us(),
            qos: QosSpec::default(),
        };
        let built = Volume::create(&tmp.join("data"), size)
            .map_err(Error::from)
            .and_then(|_| write_meta(&tmp, &meta));
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dest = self.volume_dir(&id);
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(&vdir)?;
        self.volumes.insert(id, meta.clone());
        Ok(meta)
    }

    /// Grows volume `id` to `size` bytes.
    pub fn resize(&mut self, id: &str, size: u64) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize(size));
        }
        if size < meta.size {
            return Err(Error::Shrink {
                id: id.to_owned(),
                current: meta.size,
                requested: size,
            });
        }
        let mut vol = Volume::open(&self.data_path(id), false)?;
        vol.resize(size)?;
        meta.size = size;
        write_meta(&self.volume_dir(id), &meta)?;
        self.volumes.insert(id.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Records new QoS limits for volume `id`.
    pub fn set_qos(&mut self, id: &str, qos: QosSpec) -> Result<VolumeMeta, Error> {
        let mut meta = self.get(id)?.clone();
        meta.qos = qos;
        write_meta(&self.volume_dir(id), &meta)?;
        self.volumes.insert(id.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Deletes volume `id` and frees its space.
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
        // A crash in the middle of a create and of a delete.
        fs::create_dir(dir.path().join("volumes/.new-x")).unwrap();
        fs::create_dir(dir.path().join("volumes/.gone-y")).unwrap();
        assert!(
            matches!(Pool::open(dir.path()), Err(Error::Locked(_))),
            "a second opener must be refused"
        );
        drop(pool);
        let pool = Pool::open(dir.path()).unwrap();
        let ids: Vec<_> = pool.volumes().map(|v| (v.name.clone(), v.size)).collect();
        assert_eq!(ids, vec![("disk-b".to_owned(), 4 << 20)]);
        assert!(!dir.path().join("volumes/.new-x").exists());
        assert_eq!(
            Volume::open(&pool.data_path(&b.id), true)
                .unwrap()
                .capacity(),
            4 << 20
        );
        let (total, free) = pool.space().unwrap();
        assert!(total > 0 && free <= total);
    }

    #[test]
    fn a_volume_with_corrupt_metadata_is_skipped_and_kept() {
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
    }
}
