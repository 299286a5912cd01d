//! What a vhost-user-blk device serves: a volume's chain of layers seen as one
//! block device.
//!
//! Reads take each cluster from the topmost layer that holds it (zeros if none
//! does); runs of clusters from the same layer are one vectored read. Writes go to
//! the top layer: clusters it already holds, or that the write covers completely,
//! are written in place; a partly written cluster is first copied up from below.
//! A volume without snapshots is a single bottom layer and every request is one
//! `preadv`/`pwritev` on its file.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::cmap::CLUSTER;
use crate::layer::{read_full, write_full, Layer};
use crate::volume::IoSlice;

/// A volume's layers, bottom first, and its size.
#[derive(Debug)]
pub struct Chain {
    /// Capacity in bytes as the guest sees it.
    pub capacity: u64,
    /// Bottom first; the last one takes the writes.
    pub layers: Vec<Arc<Layer>>,
}

/// A chain shared by the queue workers of every attachment of one volume.
///
/// Requests either run synchronously under the chain's read lock, or (see
/// [`Disk::direct`]) are handed to io_uring against one layer's file and counted
/// as in flight until they complete. [`Disk::lock`] first stops new direct
/// requests and waits for the ones in flight, so a chain change (snapshot,
/// resize, merge) never races with I/O on the old layout.
#[derive(Debug)]
pub struct Disk {
    chain: RwLock<Chain>,
    inflight: Arc<AtomicUsize>,
    quiesce: AtomicBool,
}

/// How long [`Disk::lock`] waits for direct requests to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A request that one layer's file can serve as is: no copy-up, no mix of layers.
/// Counts as in flight until dropped.
#[derive(Debug)]
pub struct Direct {
    /// The layer whose data file serves the whole range.
    pub layer: Arc<Layer>,
    /// Clusters of the layer's map to mark as held once the write succeeds (a
    /// first write of whole clusters to a copy-on-write top layer).
    pub mark: Option<std::ops::Range<u64>>,
    _inflight: Inflight,
}

impl Direct {
    /// Records a successful write: marks its new clusters in the layer's map.
    pub fn written(&self) {
        if let (Some(range), Some(map)) = (&self.mark, self.layer.map()) {
            map.set(range.clone());
        }
    }
}

/// One request in flight, counted until dropped.
#[derive(Debug)]
struct Inflight(Arc<AtomicUsize>);

impl Inflight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exclusive access to a disk's chain; direct requests resume when dropped.
#[derive(Debug)]
pub struct ChainGuard<'a> {
    guard: RwLockWriteGuard<'a, Chain>,
    quiesce: &'a AtomicBool,
}

impl std::ops::Deref for ChainGuard<'_> {
    type Target = Chain;
    fn deref(&self) -> &Chain {
        &self.guard
    }
}

impl std::ops::DerefMut for ChainGuard<'_> {
    fn deref_mut(&mut self) -> &mut Chain {
        &mut self.guard
    }
}

impl Drop for ChainGuard<'_> {
    fn drop(&mut self) {
        self.quiesce.store(false, Ordering::Release);
    }
}

fn total(iov: &[IoSlice]) -> u64 {
    iov.iter().map(|s| s.len as u64).sum()
}

/// The part `[skip, skip + len)` of the memory described by `iov`.
fn slice(iov: &[IoSlice], mut skip: u64, mut len: u64) -> Vec<IoSlice> {
    let mut out = Vec::new();
    for s in iov {
        if len == 0 {
            break;
        }
        let l = s.len as u64;
        if skip >= l {
            skip -= l;
            continue;
        }
        let take = (l - skip).min(len);
        let (skip_us, take_us) = (
            usize::try_from(skip).unwrap_or(0),
            usize::try_from(take).unwrap_or(0),
        );
        out.push(IoSlice {
            // SAFETY: `skip < s.len`, so the pointer stays inside the same buffer.
            ptr: unsafe { s.ptr.add(skip_us) },
            len: take_us,
        });
        len -= take;
        skip = 0;
    }
    out
}

/// Copies the memory `iov` describes into `buf`.
///
/// # Safety
/// Every slice must be valid for reads of its length.
unsafe fn gather(iov: &[IoSlice], buf: &mut [u8]) {
    let mut at = 0usize;
    for s in iov {
        let n = s.len.min(buf.len() - at);
        // SAFETY: `s` is valid for `n` bytes (caller) and `buf[at..at + n]` exists;
        // the two never overlap (guest memory and a host buffer).
        unsafe { std::ptr::copy_nonoverlapping(s.ptr, buf.as_mut_ptr().add(at), n) };
        at += n;
    }
}

fn cluster_buf() -> Vec<u8> {
    vec![0u8; usize::try_from(CLUSTER).unwrap_or(4096)]
}

thread_local! {
    /// A small ring per thread for reads that span several layers.
    static BATCH_RING: std::cell::RefCell<Option<io_uring::IoUring>> =
        const { std::cell::RefCell::new(None) };
}

/// Most reads one batch submits.
const BATCH_MAX: usize = 64;
/// The same, as the ring size.
const BATCH_RING_ENTRIES: u32 = 64;

/// Runs `reads` (volume, memory, offset): one is a plain vectored read; several
/// go to the kernel together in one io_uring submission (one syscall instead of
/// one each), and any that fails or comes up short is redone synchronously.
///
/// # Safety
/// Every slice must be valid for writes of its length for the whole call.
unsafe fn read_batch(reads: &[(&crate::volume::Volume, Vec<IoSlice>, u64)]) -> io::Result<()> {
    let sync = |(v, part, off): &(&crate::volume::Volume, Vec<IoSlice>, u64)| {
        // SAFETY: forwarded from the caller.
        unsafe { read_full(v, part, *off) }
    };
    // Buffered files (tmpfs) are faster read by plain syscalls: io_uring may
    // hand buffered reads to its worker threads.
    if reads.len() < 2
        || reads.len() > BATCH_MAX
        || reads
            .iter()
            .any(|r| r.0.raw_fd().is_none() || !r.0.direct())
    {
        return reads.iter().try_for_each(sync);
    }
    let iovecs: Vec<Vec<libc::iovec>> = reads
        .iter()
        .map(|(_, part, _)| {
            part.iter()
                .map(|s| libc::iovec {
                    iov_base: s.ptr.cast(),
                    iov_len: s.len,
                })
                .collect()
        })
        .collect();
    let results = BATCH_RING.with(|cell| -> Option<Vec<i32>> {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = io_uring::IoUring::new(BATCH_RING_ENTRIES).ok();
        }
        let ring = cell.as_mut()?;
        let mut entries = Vec::with_capacity(reads.len());
        for (i, ((v, _, off), iov)) in reads.iter().zip(&iovecs).enumerate() {
            let entry = io_uring::opcode::Readv::new(
                io_uring::types::Fd(v.raw_fd()?),
                iov.as_ptr(),
                u32::try_from(iov.len()).ok()?,
            )
            .offset(*off)
            .build()
            .user_data(i as u64);
            entries.push(entry);
        }
        // SAFETY: the entries point at `iovecs` and the caller's memory, both
        // valid until every completion is reaped below. The queue is empty here
        // (everything is always submitted) and holds BATCH_MAX entries.
        if unsafe { ring.submission().push_multiple(&entries) }.is_err() {
            return None;
        }
        let mut results = vec![i32::MIN; reads.len()];
        let mut got = 0;
        while got < reads.len() {
            if let Err(e) = ring.submit_and_wait(reads.len() - got) {
                let again = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                );
                if !again {
                    // Requests may still be in flight into the caller's memory:
                    // never reuse (or close and reap) this ring; leave it be.
                    std::mem::forget(cell.take());
                    return None;
                }
            }
            for c in ring.completion() {
                if let Some(r) = usize::try_from(c.user_data())
                    .ok()
                    .and_then(|i| results.get_mut(i))
                {
                    *r = c.result();
                    got += 1;
                }
            }
        }
        Some(results)
    });
    match results {
        Some(results) => {
            for (r, res) in reads.iter().zip(results) {
                if u64::try_from(res).ok() != Some(total(&r.1)) {
                    sync(r)?;
                }
            }
            Ok(())
        }
        None => reads.iter().try_for_each(sync),
    }
}

impl Chain {
    fn top(&self) -> io::Result<&Arc<Layer>> {
        self.layers
            .last()
            .ok_or_else(|| io::Error::other("volume has no layers"))
    }

    /// The topmost of `layers[..below]` holding cluster `c`.
    fn source(&self, c: u64, below: usize) -> Option<usize> {
        self.layers[..below.min(self.layers.len())]
            .iter()
            .rposition(|l| l.has(c))
    }

    /// Reads `[offset, offset + len(iov))` as seen by `layers[..below]`.
    ///
    /// # Safety
    /// Every slice must be valid for writes of its length.
    unsafe fn read_below(&self, below: usize, iov: &[IoSlice], offset: u64) -> io::Result<()> {
        let len = total(iov);
        let end = offset + len;
        let mut pos = offset;
        let mut reads = Vec::new();
        while pos < end {
            let src = self.source(pos / CLUSTER, below);
            let mut run_end = (pos / CLUSTER + 1) * CLUSTER;
            while run_end < end && self.source(run_end / CLUSTER, below) == src {
                run_end += CLUSTER;
            }
            let run_end = run_end.min(end);
            let part = slice(iov, pos - offset, run_end - pos);
            match src {
                Some(i) => reads.push((self.layers[i].data(), part, pos)),
                None => {
                    for s in &part {
                        // SAFETY: `part` lies inside `iov` (caller's guarantee).
                        unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
                    }
                }
            }
            pos = run_end;
        }
        // SAFETY: every piece lies inside `iov` (caller's guarantee).
        unsafe { read_batch(&reads) }
    }

    /// Fills cluster `c` of the top layer from below, lets `edit` change the
    /// cluster's bytes, writes it. The caller holds the top's allocation lock
    /// and sets the map bit.
    fn copy_up(&self, c: u64, edit: impl FnOnce(&mut [u8])) -> io::Result<()> {
        let top = self.top()?;
        let mut buf = cluster_buf();
        let one = [IoSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // SAFETY: `buf` is valid for its length and outlives the call.
        unsafe { self.read_below(self.layers.len() - 1, &one, c * CLUSTER)? };
        edit(&mut buf);
        let one = [IoSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // SAFETY: as above.
        unsafe { write_full(top.data(), &one, c * CLUSTER) }
    }

    /// Runs `op` over `[offset, offset + len)` of the top layer, cluster by
    /// cluster: clusters the top holds or `[offset, offset + len)` covers whole go
    /// to `direct` in runs `(start, end)`; the others are copied up with
    /// `partial(cluster buffer, start, end)` applied. Then sets the map bits.
    fn allocate(
        &self,
        offset: u64,
        len: u64,
        mut direct: impl FnMut(u64, u64) -> io::Result<()>,
        mut partial: impl FnMut(&mut [u8], u64, u64),
    ) -> io::Result<()> {
        let top = self.top()?;
        let Some(map) = top.map() else {
            return direct(offset, offset + len);
        };
        let end = offset + len;
        let (c0, c1) = (offset / CLUSTER, (end - 1) / CLUSTER);
        if (c0..=c1).all(|c| map.get(c)) {
            return direct(offset, end);
        }
        // Only the first and last clusters can be partly covered. When neither
        // needs copying up, writers of whole clusters share the lock (they
        // exclude copy-ups and merges, not each other).
        let whole = |c: u64| {
            let (cs, ce) = (c * CLUSTER, (c + 1) * CLUSTER);
            map.get(c) || (offset <= cs && end >= ce)
        };
        if whole(c0) && whole(c1) {
            let _g = top.lock_alloc_shared();
            direct(offset, end)?;
            map.set(c0..c1 + 1);
            return Ok(());
        }
        let _g = top.lock_alloc();
        let mut run: Option<u64> = None;
        for c in c0..=c1 {
            let (cs, ce) = (c * CLUSTER, (c + 1) * CLUSTER);
            let (a, b) = (offset.max(cs), end.min(ce));
            if map.get(c) || (a == cs && b == ce) {
                run.get_or_insert(a);
                continue;
            }
            if let Some(start) = run.take() {
                direct(start, a)?;
            }
            self.copy_up(c, |buf| partial(buf, a, b))?;
        }
        if let Some(start) = run {
            direct(start, end)?;
        }
        map.set(c0..c1 + 1);
        Ok(())
    }
}

impl Disk {
    /// A disk over `layers` (bottom first) of `capacity` bytes.
    pub fn new(capacity: u64, layers: Vec<Arc<Layer>>) -> Self {
        Self {
            chain: RwLock::new(Chain { capacity, layers }),
            inflight: Arc::new(AtomicUsize::new(0)),
            quiesce: AtomicBool::new(false),
        }
    }

    /// A single-layer disk over an open volume (benchmarks, tests).
    pub fn from_volume(vol: crate::volume::Volume) -> Self {
        let cap = vol.capacity();
        Self::new(cap, vec![Arc::new(Layer::from_volume("volume", vol))])
    }

    fn read(&self) -> RwLockReadGuard<'_, Chain> {
        self.chain
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Exclusive access to the chain: stops new direct requests, waits for those
    /// in flight (failing after 30 s if they never complete) and for synchronous
    /// ones, and holds new ones until the guard is dropped.
    pub fn lock(&self) -> io::Result<ChainGuard<'_>> {
        self.quiesce.store(true, Ordering::Release);
        let start = Instant::now();
        while self.inflight.load(Ordering::Acquire) != 0 {
            if start.elapsed() > DRAIN_TIMEOUT {
                self.quiesce.store(false, Ordering::Release);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "requests in flight did not complete",
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let guard = self
            .chain
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(ChainGuard {
            guard,
            quiesce: &self.quiesce,
        })
    }

    /// If one layer's file can serve `[offset, offset + len)` as is (a read whose
    /// clusters all come from the same layer, a write to clusters the top layer
    /// already holds or to a bottom-only top), that layer, counted in flight.
    /// None while the chain is being changed, or when the request needs the
    /// synchronous path.
    pub fn direct(&self, offset: u64, len: u64, write: bool) -> Option<Direct> {
        if self.quiesce.load(Ordering::Acquire) || len == 0 {
            return None;
        }
        let inflight = Inflight::new(&self.inflight);
        let chain = self.read();
        let (c0, c1) = (offset / CLUSTER, (offset + len - 1) / CLUSTER);
        let mut mark = None;
        let layer = if write {
            let top = chain.layers.last()?;
            match top.map() {
                None => top,
                Some(m) if (c0..=c1).all(|c| m.get(c)) => top,
                // Whole new clusters need no copy-up: write them, then mark them.
                Some(m)
                    if (offset % CLUSTER == 0 || m.get(c0))
                        && ((offset + len) % CLUSTER == 0 || m.get(c1)) =>
                {
                    mark = Some(c0..c1 + 1);
                    top
                }
                Some(_) => return None,
            }
        } else {
            let src = chain.source(c0, chain.layers.len())?;
            if !(c0 + 1..=c1).all(|c| chain.source(c, chain.layers.len()) == Some(src)) {
                return None;
            }
            &chain.layers[src]
        };
        // Buffered files and memory file systems are served faster by a plain
        // syscall than by io_uring, which hands such requests to worker threads.
        if !layer.data().prefers_uring() {
            return None;
        }
        layer.data().raw_fd()?;
        Some(Direct {
            layer: layer.clone(),
            mark,
            _inflight: inflight,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.read().capacity
    }

    /// Whether `[offset, offset + len)` lies inside the disk.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.read().capacity)
    }

    /// Ids of the layers, bottom first.
    pub fn layer_ids(&self) -> Vec<String> {
        self.read()
            .layers
            .iter()
            .map(|l| l.id().to_owned())
            .collect()
    }

    /// Byte ranges, in order, that some layer holds data for (everything else
    /// reads as zeros), clipped to the capacity.
    pub fn allocated_runs(&self) -> io::Result<Vec<(u64, u64)>> {
        let chain = self.read();
        let mut all = Vec::new();
        for l in &chain.layers {
            all.extend(l.data_runs()?);
        }
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, b) in all {
            let (a, b) = (a * CLUSTER, (b * CLUSTER).min(chain.capacity));
            if a >= b {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Ok(out)
    }

    /// Whether any layer's file is served through io_uring (see
    /// [`Volume::prefers_uring`](crate::volume::Volume::prefers_uring)).
    pub fn uses_direct_io(&self) -> bool {
        self.read().layers.iter().any(|l| l.data().prefers_uring())
    }

    /// Bytes the layers occupy.
    pub fn used(&self) -> u64 {
        self.read().layers.iter().map(|l| l.used()).sum()
    }

    /// Reads into `iov` from byte `offset`; the range must be inside the disk.
    ///
    /// # Safety
    /// Every slice must be valid for writes of its length for the whole call.
    pub unsafe fn read_vectored(&self, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
        let chain = self.read();
        let len = total(iov);
        if chain.layers.len() == 1 {
            // SAFETY: forwarded from the caller.
            return unsafe { chain.layers[0].data().read_vectored(iov, offset) };
        }
        // SAFETY: forwarded from the caller.
        unsafe { chain.read_below(chain.layers.len(), iov, offset)? };
        usize::try_from(len).map_err(io::Error::other)
    }

    /// Writes `iov` at byte `offset`; the range must be inside the disk.
    ///
    /// # Safety
    /// Every slice must be valid for reads of its length for the whole call.
    pub unsafe fn write_vectored(&self, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
        let chain = self.read();
        let len = total(iov);
        if len == 0 {
            return Ok(0);
        }
        let top = chain.top()?;
        chain.allocate(
            offset,
            len,
            // SAFETY: the parts lie inside `iov` (caller's guarantee).
            |a, b| unsafe { write_full(top.data(), &slice(iov, a - offset, b - a), a) },
            |buf, a, b| {
                let cs = a / CLUSTER * CLUSTER;
                let part = slice(iov, a - offset, b - a);
                let (lo, hi) = (
                    usize::try_from(a - cs).unwrap_or(0),
                    usize::try_from(b - cs).unwrap_or(0),
                );
                // SAFETY: as above; `buf[lo..hi]` is exactly as long as `part`.
                unsafe { gather(&part, &mut buf[lo..hi]) };
            },
        )?;
        usize::try_from(len).map_err(io::Error::other)
    }

    /// Makes `[offset, offset + len)` read as zeros, freeing the space where whole
    /// clusters (or the bottom layer) allow it.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chain = self.read();
        if len == 0 {
            return Ok(());
        }
        let top = chain.top()?;
        chain.allocate(
            offset,
            len,
            |a, b| top.data().discard(a, b - a),
            |buf, a, b| {
                let cs = a / CLUSTER * CLUSTER;
                let lo = usize::try_from(a - cs).unwrap_or(0);
                let hi = usize::try_from(b - cs).unwrap_or(0);
                buf[lo..hi].fill(0);
            },
        )
    }

    /// Deallocates `[offset, offset + len)` (it reads as zeros afterwards).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.read().top()?.flush()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn layer(dir: &std::path::Path, name: &str, size: u64, cow: bool) -> Arc<Layer> {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        Layer::create(&d, size, cow).unwrap();
        Arc::new(Layer::open(&d, name, cow).unwrap())
    }

    fn io(buf: &mut [u8]) -> [IoSlice; 1] {
        [IoSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }]
    }

    fn write(d: &Disk, off: u64, data: &[u8]) {
        let mut v = data.to_vec();
        // SAFETY: `v` outlives the call.
        unsafe { d.write_vectored(&io(&mut v), off).unwrap() };
    }

    fn read(d: &Disk, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0xeeu8; len];
        // SAFETY: `v` outlives the call.
        unsafe { d.read_vectored(&io(&mut v), off).unwrap() };
        v
    }

    #[test]
    fn a_layer_on_top_shows_through_and_copies_up_partial_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let base = layer(dir.path(), "base", size, false);
        let d = Disk::new(size, vec![base.clone()]);
        write(&d, 0, &vec![1u8; 64 << 10]);
        let top = layer(dir.path(), "top", size, true);
        let d = Disk::new(size, vec![base.clone(), top.clone()]);
        // Everything shows through.
        assert_eq!(read(&d, 0, 64 << 10), vec![1u8; 64 << 10]);
        // A 512-byte write in the middle of cluster 2 copies the rest of it up.
        write(&d, 2 * CLUSTER + 512, &[2u8; 512]);
        let got = read(&d, 2 * CLUSTER, CLUSTER as usize);
        assert!(got[..512].iter().all(|&b| b == 1));
        assert!(got[512..1024].iter().all(|&b| b == 2));
        assert!(got[1024..].iter().all(|&b| b == 1));
        // The bottom layer is untouched.
        let below = Disk::new(size, vec![base.clone()]);
        assert_eq!(read(&below, 2 * CLUSTER, CLUSTER as usize), vec![1u8; 4096]);
        // A write spanning a partial, two whole and a partial cluster.
        write(&d, 5 * CLUSTER + 1024, &vec![3u8; 3 * CLUSTER as usize]);
        let got = read(&d, 5 * CLUSTER, 4 * CLUSTER as usize);
        assert!(got[..1024].iter().all(|&b| b == 1));
        assert!(got[1024..1024 + 3 * 4096].iter().all(|&b| b == 3));
        assert!(got[1024 + 3 * 4096..].iter().all(|&b| b == 1));
        // Zeroing in the top layer hides the data below without touching it.
        d.write_zeroes(0, 2 * CLUSTER + 100).unwrap();
        let got = read(&d, 0, 3 * CLUSTER as usize);
        assert!(got[..2 * 4096 + 100].iter().all(|&b| b == 0));
        assert!(got[2 * 4096 + 100..2 * 4096 + 512].iter().all(|&b| b == 1));
        assert_eq!(read(&below, 0, 4096), vec![1u8; 4096]);
        // Past the bottom layer's end (after a resize) reads zeros.
        let big = Disk::new(2 * size, vec![base, top]);
        assert!(read(&big, size, 8192).iter().all(|&b| b == 0));
    }

    #[test]
    fn absorbing_the_layer_below_keeps_what_the_chain_reads() {
        let dir = tempfile::tempdir().unwrap();
        let size = 256 << 10;
        let base = layer(dir.path(), "base", size, false);
        let mid = layer(dir.path(), "mid", size, true);
        let top = layer(dir.path(), "top", size, true);
        write(
            &Disk::new(size, vec![base.clone()]),
            0,
            &vec![1u8; 128 << 10],
        );
        write(
            &Disk::new(size, vec![base.clone(), mid.clone()]),
            8192,
            &[2u8; 8192],
        );
        let d = Disk::new(size, vec![base.clone(), mid.clone(), top.clone()]);
        write(&d, 12288, &[3u8; 100]);
        let before = read(&d, 0, size as usize);
        top.absorb(&mid, || Ok(())).unwrap();
        let d = Disk::new(size, vec![base.clone(), top.clone()]);
        assert_eq!(read(&d, 0, size as usize), before);
        top.absorb(&base, || Ok(())).unwrap();
        let d = Disk::new(size, vec![top.clone()]);
        assert_eq!(read(&d, 0, size as usize), before);
        // And it is durable: a fresh open of the files sees the same.
        let reopened = Arc::new(Layer::open(&dir.path().join("top"), "top", true).unwrap());
        assert_eq!(
            read(&Disk::new(size, vec![reopened]), 0, size as usize),
            before
        );
    }
}
