//! The cluster map of a copy-on-write layer: which 4 KiB clusters the layer holds.
//!
//! ```text
//! map file: [0, 4096)  header: "ATOLLMAP", version u32, cluster size u32, crc32 u32
//!           [4096, …)  one bit per cluster, bit c = byte c / 8, bit c % 8
//! ```
//!
//! Bits only ever go from 0 to 1 while the layer lives (discard in a layer with a
//! parent keeps the bit and punches a hole in the data instead), so any mix of old
//! and new bitmap sectors after a torn write is a valid map. What makes the map
//! crash-consistent is the order: a writer sets a bit only after its data write
//! returned, then flags the bit's page dirty; [`ClusterMap::persist`] copies the
//! dirty pages first, then syncs the data file, and only then writes and syncs
//! the copied pages. A bit on disk therefore never points at data that was not
//! durable; a cluster whose bit was lost in a crash reads from the layer below, as
//! it did before the unflushed write. Setting a bit costs two atomic operations.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes per cluster, the copy-on-write unit.
pub const CLUSTER: u64 = 4096;

const MAGIC: &[u8; 8] = b"ATOLLMAP";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
/// Bitmap bytes written back as one unit.
const PAGE: usize = 4096;

/// Why a map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the map file failed.
    #[error("cluster map I/O")]
    Io(#[from] io::Error),
    /// The header is not ours or fails its checksum.
    #[error("cluster map header is corrupt ({0})")]
    Corrupt(&'static str),
}

/// An open cluster map.
#[derive(Debug)]
pub struct ClusterMap {
    file: File,
    bits: Vec<AtomicU64>,
    /// One flag per bitmap page: set after a bit in it went from 0 to 1.
    dirty: Vec<AtomicBool>,
    /// The bitmap as last written to disk; held by `persist`.
    disk: Mutex<Vec<u8>>,
}

fn header() -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&u32::try_from(CLUSTER).unwrap_or(0).to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn words_for(clusters: u64) -> usize {
    usize::try_from(clusters.div_ceil(64)).unwrap_or(usize::MAX)
}

impl ClusterMap {
    /// Creates an empty map at `path` (fails if it exists).
    pub fn create(path: &Path, clusters: u64) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.write_all_at(&header(), 0)?;
        file.sync_all()?;
        Ok(Self::from_bits(file, clusters, Vec::new()))
    }

    /// Opens the map at `path` for a layer of `clusters` clusters.
    pub fn open(path: &Path, clusters: u64) -> Result<Self, Error> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut h = [0u8; 20];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| Error::Corrupt("truncated"))?;
        if &h[..8] != MAGIC {
            return Err(Error::Corrupt("bad magic"));
        }
        if h != header() {
            return Err(Error::Corrupt("bad version, cluster size or checksum"));
        }
        let want = words_for(clusters) * 8;
        let len = usize::try_from(file.metadata()?.len().saturating_sub(HEADER)).unwrap_or(0);
        let mut disk = vec![0u8; want.min(len)];
        file.read_exact_at(&mut disk, HEADER)?;
        Ok(Self::from_bits(file, clusters, disk))
    }

    fn from_bits(file: File, clusters: u64, disk: Vec<u8>) -> Self {
        let mut bits: Vec<AtomicU64> = (0..words_for(clusters))
            .map(|_| AtomicU64::new(0))
            .collect();
        for (w, chunk) in bits.iter_mut().zip(disk.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w.get_mut() = u64::from_le_bytes(b);
        }
        let pages = (bits.len() * 8).div_ceil(PAGE);
        Self {
            file,
            bits,
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            disk: Mutex::new(disk),
        }
    }

    /// Clusters the map covers.
    pub fn clusters(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Whether the layer holds cluster `c`.
    pub fn get(&self, c: u64) -> bool {
        let Ok(i) = usize::try_from(c / 64) else {
            return false;
        };
        self.bits
            .get(i)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    /// Records that the data of clusters `range` is written (call only after
    /// the data write returned); their bits reach the disk at the next
    /// [`persist`](Self::persist). Clusters outside the map are ignored (the caller
    /// checks bounds).
    pub fn set(&self, range: std::ops::Range<u64>) {
        let mut c = range.start;
        while c < range.end {
            let Some(w) = usize::try_from(c / 64)
                .ok()
                .filter(|&i| i < self.bits.len())
            else {
                return;
            };
            // All bits of this word inside the range, at once.
            let lo = c % 64;
            let hi = (range.end - (c - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.bits[w].fetch_or(mask, Ordering::AcqRel);
            if old & mask != mask {
                if let Some(d) = self.dirty.get(w * 8 / PAGE) {
                    d.store(true, Ordering::Release);
                }
            }
            c += hi - lo;
        }
    }

    /// Makes every bit set so far durable: copies the dirty bitmap pages, runs
    /// `sync_data` (the layer's data sync), then writes and syncs those pages.
    pub fn persist(&self, sync_data: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut disk = self
            .disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let need = self.bits.len() * 8;
        if disk.len() < need {
            disk.resize(need, 0);
        }
        let mut pages = Vec::new();
        for (p, d) in self.dirty.iter().enumerate() {
            if !d.swap(false, Ordering::AcqRel) {
                continue;
            }
            let words = p * PAGE / 8..((p + 1) * PAGE / 8).min(self.bits.len());
            for w in words {
                let v = self.bits[w].load(Ordering::Acquire);
                disk[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            pages.push(p);
        }
        let redirty = |pages: &[usize]| {
            for &p in pages {
                if let Some(d) = self.dirty.get(p) {
                    d.store(true, Ordering::Release);
                }
            }
        };
        if let Err(e) = sync_data() {
            redirty(&pages);
            return Err(e);
        }
        if pages.is_empty() {
            return Ok(());
        }
        let res = (|| {
            for &p in &pages {
                let start = p * PAGE;
                let end = (start + PAGE).min(disk.len());
                self.file
                    .write_all_at(&disk[start..end], HEADER + start as u64)?;
            }
            self.file.sync_data()
        })();
        if res.is_err() {
            // Try again at the next flush; the bits stay set in memory.
            redirty(&pages);
        }
        res
    }

    /// Every cluster the map holds, in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, w)| {
            let v = w.load(Ordering::Acquire);
            (0..64u64)
                .filter(move |b| v & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_reach_disk_only_through_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map");
        let m = ClusterMap::create(&path, 100_000).unwrap();
        m.set(3..5);
        m.set(70_000..70_001);
        assert!(m.get(3) && m.get(4) && !m.get(5) && m.get(70_000));
        // Not persisted: a reopen sees nothing.
        assert!(!ClusterMap::open(&path, 100_000).unwrap().get(3));
        let mut synced = false;
        m.persist(|| {
            synced = true;
            Ok(())
        })
        .unwrap();
        assert!(synced, "the data sync must run before the bits are written");
        let again = ClusterMap::open(&path, 100_000).unwrap();
        assert_eq!(again.iter_set().collect::<Vec<_>>(), vec![3, 4, 70_000]);
        // A failed data sync keeps the bits pending.
        m.set(9..10);
        assert!(m.persist(|| Err(io::Error::other("disk gone"))).is_err());
        assert!(!ClusterMap::open(&path, 100_000).unwrap().get(9));
        m.persist(|| Ok(())).unwrap();
        assert!(ClusterMap::open(&path, 100_000).unwrap().get(9));
        // Ranges spanning words set exactly their bits.
        m.set(60..200);
        m.persist(|| Ok(())).unwrap();
        let again = ClusterMap::open(&path, 100_000).unwrap();
        let set: Vec<u64> = again.iter_set().collect();
        assert_eq!(set.len(), 3 + 140 + 1, "{set:?}");
        assert!(!again.get(59) && again.get(60) && again.get(199) && !again.get(200));
        // A bigger layer (after a resize) reads the old bits and zeros beyond.
        let grown = ClusterMap::open(&path, 1_000_000).unwrap();
        assert!(grown.get(70_000) && !grown.get(900_000));
    }

    #[test]
    fn a_damaged_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map");
        drop(ClusterMap::create(&path, 10).unwrap());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 9).unwrap();
        assert!(matches!(
            ClusterMap::open(&path, 10),
            Err(Error::Corrupt(_))
        ));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            ClusterMap::open(&path, 10),
            Err(Error::Corrupt("truncated"))
        ));
    }
}
