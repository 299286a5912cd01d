//! A thin volume's data: a sparse file whose length is the volume's capacity.
//!
//! Space is used only where data was written (the file system's holes are the
//! thin-provisioning map); discard punches holes back. Flush is `fdatasync`. Layered
//! copy-on-write snapshots build on this per-layer file (see `docs/stord.md`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Logical sector size of every volume.
pub const SECTOR: u64 = 512;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data file could not be opened or created.
    #[error("cannot open volume data")]
    Open(#[source] io::Error),
    /// The size is zero or not a multiple of the sector size.
    #[error("volume size {0} is not a positive multiple of {SECTOR} bytes")]
    BadSize(u64),
    /// The data file could not be resized.
    #[error("cannot resize volume data")]
    Resize(#[source] io::Error),
    /// The file system refused to report on the file.
    #[error("cannot stat volume data")]
    Stat(#[source] io::Error),
}

/// An open thin volume.
#[derive(Debug)]
pub struct Volume {
    /// `None` for a null volume: I/O succeeds without touching anything (used to
    /// measure the protocol path alone).
    file: Option<File>,
    /// The same file without O_DIRECT, for requests whose buffers or offsets are not
    /// aligned the way direct I/O needs.
    buffered: Option<File>,
    capacity: u64,
    read_only: bool,
    direct: bool,
    /// Whether the file lives in memory (tmpfs, ramfs): I/O completes at once in
    /// a plain syscall, which beats handing it to io_uring.
    in_memory: bool,
}

/// One piece of memory taking part in a vectored request.
#[derive(Debug, Clone, Copy)]
pub struct IoSlice {
    /// Start of the memory.
    pub ptr: *mut u8,
    /// Its length.
    pub len: usize,
}

impl Volume {
    /// Creates a volume of `size` bytes at `path` (fails if the file exists).
    pub fn create(path: &Path, size: u64) -> Result<Self, Error> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize(size));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Error::Open)?;
        file.set_len(size).map_err(Error::Resize)?;
        file.sync_all().map_err(Error::Resize)?;
        drop(file);
        Self::open(path, false)
    }

    /// Opens the volume at `path`; O_DIRECT where the file system allows it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            // tmpfs and some others refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open(false).map_err(Error::Open)?, false)
            }
            Err(e) => return Err(Error::Open(e)),
        };
        let capacity = file.metadata().map_err(Error::Stat)?.len();
        let in_memory = in_memory_fs(&file);
        let buffered = if direct {
            Some(open(false).map_err(Error::Open)?)
        } else {
            None
        };
        Ok(Self {
            file: Some(file),
            buffered,
            capacity,
            read_only,
            direct,
            in_memory,
        })
    }

    /// A volume of `capacity` bytes that stores nothing: reads leave the buffers
    /// untouched and writes are dropped (like QEMU's `null-co`).
    pub fn null(capacity: u64) -> Self {
        Self {
            file: None,
            buffered: None,
            capacity,
            read_only: false,
            direct: false,
            in_memory: true,
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether requests are worth submitting to io_uring: direct I/O on a file
    /// backed by a device (not tmpfs, where io_uring hands O_DIRECT requests to
    /// worker threads and a plain syscall is twice as fast at queue depth 1).
    pub fn prefers_uring(&self) -> bool {
        self.direct && !self.in_memory
    }

    /// The data file's descriptor (`None` for a null volume).
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Bytes of storage the volume occupies.
    pub fn used(&self) -> Result<u64, Error> {
        match &self.file {
            Some(f) => Ok(f.metadata().map_err(Error::Stat)?.blocks() * 512),
            None => Ok(0),
        }
    }

    /// Whether `[offset, offset + len)` lies inside the volume.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.capacity)
    }

    /// Grows the volume to `size` bytes (shrinking is refused by the caller).
    pub fn resize(&mut self, size: u64) -> Result<(), Error> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize(size));
        }
        if let Some(f) = &self.file {
            f.set_len(size).map_err(Error::Resize)?;
            f.sync_all().map_err(Error::Resize)?;
        }
        self.capacity = size;
        Ok(())
    }

    fn vectored(&self, write: bool, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
        let Some(file) = &self.file else {
            return Ok(iov.iter().map(|s| s.len).sum());
        };
        match Self::vectored_on(file, write, iov, offset) {
            // Direct I/O refuses unaligned buffers, offsets or lengths.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match &self.buffered {
                Some(f) => Self::vectored_on(f, write, iov, offset),
                None => Err(e),
            },
            r => r,
        }
    }

    fn vectored_on(
        file: &File,
        write: bool,
        iov: &[IoSlice],
        mut offset: u64,
    ) -> io::Result<usize> {
        let mut vecs: Vec<libc::iovec> = iov
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| libc::iovec {
                iov_base: s.ptr.cast(),
                iov_len: s.len,
            })
            .collect();
        let total: usize = vecs.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let count = i32::try_from((vecs.len() - first).min(1024)).unwrap_or(1024);
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: every iovec points into memory the caller vouched for (guest memory
            // mapped for the whole request, see `IoSlice`), and `count` entries starting
            // at `first` exist in `vecs`.
            let n = unsafe {
                if write {
                    libc::pwritev(file.as_raw_fd(), vecs.as_ptr().add(first), count, off)
                } else {
                    libc::preadv(file.as_raw_fd(), vecs.as_ptr().add(first), count, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                // Past the end of the file: only possible if it shrank under us.
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n;
            offset += n as u64;
            while n > 0 && first < vecs.len() {
                let v = &mut vecs[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing inside the same buffer by fewer than its length.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(done)
    }

    /// Reads into `iov` from byte `offset`.
    ///
    /// # Safety
    /// Every slice must be valid for writes of its length for the whole call.
    pub unsafe fn read_vectored(&self, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
        self.vectored(false, iov, offset)
    }

    /// Writes `iov` at byte `offset`.
    ///
    /// # Safety
    /// Every slice must be valid for reads of its length for the whole call.
    pub unsafe fn write_vectored(&self, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.vectored(true, iov, offset)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.as_ref().map_or(Ok(()), File::sync_data)
    }

    /// Deallocates `[offset, offset + len)`; it reads as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (off, len) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let Some(file) = &self.file else {
            return Ok(());
        };
        // SAFETY: fallocate on our own descriptor with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Makes `[offset, offset + len)` read as zeros (by punching a hole, which also
    /// frees the space).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discard(offset, len)
    }
}

/// The byte ranges of the file behind `fd`, up to `len`, that hold data (not
/// holes), found with `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(fd: std::os::fd::RawFd, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
        let off =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek with plain integer arguments on a descriptor the caller owns.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `pos`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        runs.push((start, end));
        pos = end.max(start + 1);
    }
    Ok(runs)
}

/// Whether `f` is on a memory file system (tmpfs, ramfs).
fn in_memory_fs(f: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs on our own descriptor into a writable statfs buffer.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled the structure.
    let kind = unsafe { st.assume_init() }.f_type;
    // `f_type` is i64 here but narrower on some targets.
    #[allow(clippy::useless_conversion)]
    let kind = i64::from(kind);
    matches!(kind, TMPFS_MAGIC | RAMFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(buf: &mut [u8]) -> [IoSlice; 1] {
        [IoSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }]
    }

    #[test]
    fn thin_volume_grows_with_data_and_shrinks_with_discard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let v = Volume::create(&path, 64 << 20).unwrap();
        assert_eq!(v.capacity(), 64 << 20);
        assert!(
            v.used().unwrap() < 64 << 10,
            "a new volume must use almost nothing"
        );
        let mut data = vec![0xa5u8; 1 << 20];
        // SAFETY: `data` outlives the call.
        unsafe { v.write_vectored(&io(&mut data), 8 << 20).unwrap() };
        v.flush().unwrap();
        assert!(v.used().unwrap() >= 1 << 20);
        let mut back = vec![0u8; 1 << 20];
        // SAFETY: `back` outlives the call.
        unsafe { v.read_vectored(&io(&mut back), 8 << 20).unwrap() };
        assert_eq!(back, data);
        v.discard(8 << 20, 1 << 20).unwrap();
        // SAFETY: as above.
        unsafe { v.read_vectored(&io(&mut back), 8 << 20).unwrap() };
        assert!(back.iter().all(|&b| b == 0));
        assert!(v.used().unwrap() < 64 << 10);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Volume::create(&dir.path().join("a"), 0),
            Err(Error::BadSize(0))
        ));
        assert!(matches!(
            Volume::create(&dir.path().join("b"), 1000),
            Err(Error::BadSize(1000))
        ));
    }

    #[test]
    fn read_only_volume_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        drop(Volume::create(&path, 1 << 20).unwrap());
        let v = Volume::open(&path, true).unwrap();
        let mut data = vec![1u8; 4096];
        // SAFETY: `data` outlives the call.
        let err = unsafe { v.write_vectored(&io(&mut data), 0) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        assert!(v.discard(0, 4096).is_err());
    }
}
