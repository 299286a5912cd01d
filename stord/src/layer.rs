//! One layer of a volume's copy-on-write chain: a sparse data file addressed like
//! the volume itself, plus (for every layer that has or had a parent) the cluster
//! map saying which clusters it holds. A layer without a map is a chain's bottom
//! and holds everything up to its length (its holes read as zeros).

use std::io;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::cmap::{self, ClusterMap, CLUSTER};
use crate::volume::{self, IoSlice, Volume};

/// Why a layer could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data file.
    #[error(transparent)]
    Data(#[from] volume::Error),
    /// The cluster map.
    #[error(transparent)]
    Map(#[from] cmap::Error),
}

/// An open layer.
#[derive(Debug)]
pub struct Layer {
    id: String,
    data: Volume,
    map: Option<ClusterMap>,
    /// Held exclusively while clusters are filled from below (copy-up, merges),
    /// so nobody else fills or writes a cluster being filled; shared by writers
    /// of whole new clusters.
    alloc: RwLock<()>,
}

/// `size` rounded up to whole clusters.
pub fn round_up(size: u64) -> u64 {
    size.div_ceil(CLUSTER).saturating_mul(CLUSTER)
}

impl Layer {
    /// Creates the files of a layer of `size` bytes in `dir`; `cow` adds a cluster map.
    pub fn create(dir: &Path, size: u64, cow: bool) -> Result<(), Error> {
        let len = round_up(size);
        drop(Volume::create(&dir.join("data"), len)?);
        if cow {
            drop(ClusterMap::create(&dir.join("map"), len / CLUSTER)?);
        }
        Ok(())
    }

    /// Opens the layer `id` whose files are in `dir`.
    pub fn open(dir: &Path, id: &str, cow: bool) -> Result<Self, Error> {
        let data = Volume::open(&dir.join("data"), false)?;
        let map = if cow {
            Some(ClusterMap::open(
                &dir.join("map"),
                data.capacity() / CLUSTER,
            )?)
        } else {
            None
        };
        Ok(Self::new(id, data, map))
    }

    /// A bottom layer over an already open volume (benchmarks, tests).
    pub fn from_volume(id: &str, data: Volume) -> Self {
        Self::new(id, data, None)
    }

    fn new(id: &str, data: Volume, map: Option<ClusterMap>) -> Self {
        Self {
            id: id.to_owned(),
            data,
            map,
            alloc: RwLock::new(()),
        }
    }

    /// The layer's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The data file.
    pub fn data(&self) -> &Volume {
        &self.data
    }

    /// The cluster map, if the layer has one.
    pub fn map(&self) -> Option<&ClusterMap> {
        self.map.as_ref()
    }

    /// Whether reads of cluster `c` are answered by this layer.
    pub fn has(&self, c: u64) -> bool {
        match &self.map {
            Some(m) => m.get(c),
            None => c.saturating_mul(CLUSTER) < self.data.capacity(),
        }
    }

    /// Takes the allocation lock exclusively (copy-up, merge).
    pub fn lock_alloc(&self) -> RwLockWriteGuard<'_, ()> {
        self.alloc
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the allocation lock shared (writes of whole clusters).
    pub fn lock_alloc_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.alloc
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every write so far durable, map included.
    pub fn flush(&self) -> io::Result<()> {
        match &self.map {
            Some(m) => m.persist(|| self.data.flush()),
            None => self.data.flush(),
        }
    }

    /// Bytes of storage the layer occupies.
    pub fn used(&self) -> u64 {
        self.data.used().unwrap_or(0)
    }

    /// Clusters this layer holds whose data is not all holes, as runs
    /// `[first, end)`, in order. For a bottom layer this walks the file's data
    /// extents, so a mostly empty thin layer costs nothing.
    pub fn data_runs(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match runs.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => runs.push((a, b)),
        };
        if let Some(m) = &self.map {
            for c in m.iter_set() {
                push(c, c + 1);
            }
            return Ok(runs);
        }
        let Some(fd) = self.data.raw_fd() else {
            return Ok(runs);
        };
        for (start, end) in crate::volume::data_extents(fd, self.data.capacity())? {
            push(start / CLUSTER, end.div_ceil(CLUSTER));
        }
        Ok(runs)
    }

    /// Copies into this layer every cluster of `lower` (the layer directly below)
    /// that this one does not hold, so `lower` can leave the chain. Runs while
    /// guest I/O goes on: each batch is taken under the allocation lock and
    /// re-checked, and the result is flushed before returning.
    ///
    /// `pause` is called before each batch and its result held while the batch
    /// is copied: the caller uses it to hold asynchronous writes to this layer
    /// off (they set their map bits only when they complete).
    pub fn absorb<G>(
        &self,
        lower: &Layer,
        mut pause: impl FnMut() -> io::Result<G>,
    ) -> io::Result<u64> {
        let Some(map) = &self.map else {
            return Err(io::Error::other("a bottom layer cannot absorb another"));
        };
        let mut buf = vec![0u8; 256 * usize::try_from(CLUSTER).unwrap_or(4096)];
        let mut copied = 0u64;
        let limit = map.clusters().min(self.data.capacity() / CLUSTER);
        for (first, end) in lower.data_runs()? {
            let mut c = first;
            while c < end.min(limit) {
                let batch_end = (c + 256).min(end).min(limit);
                let _paused = pause()?;
                let _g = self.lock_alloc();
                let mut i = c;
                while i < batch_end {
                    if self.has(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < batch_end && !self.has(j) {
                        j += 1;
                    }
                    let n = usize::try_from((j - i) * CLUSTER).unwrap_or(0);
                    let off = i * CLUSTER;
                    let piece = [IoSlice {
                        ptr: buf.as_mut_ptr(),
                        len: n,
                    }];
                    // SAFETY: `buf` is at least `n` bytes and outlives both calls.
                    unsafe {
                        if lower.has(i) {
                            read_full(&lower.data, &piece, off)?;
                        } else {
                            buf[..n].fill(0);
                        }
                        write_full(&self.data, &piece, off)?;
                    }
                    map.set(i..j);
                    copied += j - i;
                    i = j;
                }
                c = batch_end;
            }
        }
        self.flush()?;
        Ok(copied)
    }
}

/// Grows the data file of the layer in `dir` to hold `size` bytes (the map
/// needs nothing: clusters past its end read as not held).
pub fn grow(dir: &Path, size: u64) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("data"))?;
    let len = round_up(size);
    if f.metadata()?.len() < len {
        f.set_len(len)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Reads exactly the length of `iov` at `off`.
///
/// # Safety
/// As [`Volume::read_vectored`].
pub unsafe fn read_full(v: &Volume, iov: &[IoSlice], off: u64) -> io::Result<()> {
    let want: usize = iov.iter().map(|s| s.len).sum();
    // SAFETY: forwarded from the caller.
    let n = unsafe { v.read_vectored(iov, off)? };
    if n == want {
        Ok(())
    } else {
        Err(io::Error::from(io::ErrorKind::UnexpectedEof))
    }
}

/// Writes exactly the length of `iov` at `off`.
///
/// # Safety
/// As [`Volume::write_vectored`].
pub unsafe fn write_full(v: &Volume, iov: &[IoSlice], off: u64) -> io::Result<()> {
    let want: usize = iov.iter().map(|s| s.len).sum();
    // SAFETY: forwarded from the caller.
    let n = unsafe { v.write_vectored(iov, off)? };
    if n == want {
        Ok(())
    } else {
        Err(io::Error::from(io::ErrorKind::WriteZero))
    }
}
