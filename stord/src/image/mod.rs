//! Disk image import and export (raw and qcow2), with progress and cancellation.
//!
//! Import writes only the data the image holds (holes in a raw file, unallocated
//! and zero clusters in a qcow2 image stay holes in the thin volume). Export reads
//! only the clusters some layer of the chain holds and writes to `<path>.part`,
//! renamed to `<path>` when complete, so a failed or cancelled export leaves no
//! file that looks finished.

pub mod qcow2;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::disk::Disk;
use crate::volume::{IoSlice, SECTOR};
use qcow2::{Qcow2Error, Qcow2Reader, Qcow2Writer};

/// Bytes moved per step.
const CHUNK: usize = 1 << 20;
/// qcow2 export cluster size.
const QCOW2_CLUSTER: usize = 64 << 10;

/// An image file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// Parses `raw`, `qcow2`, or `""`/`auto` (None: detect on import).
    pub fn parse(s: &str) -> Result<Option<Self>, Error> {
        match s {
            "raw" => Ok(Some(Self::Raw)),
            "qcow2" => Ok(Some(Self::Qcow2)),
            "" | "auto" => Ok(None),
            other => Err(Error::BadFormat(other.to_owned())),
        }
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// Why an import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(PathBuf, #[source] io::Error),
    /// Reading or writing the volume failed.
    #[error("volume I/O")]
    Volume(#[source] io::Error),
    /// The qcow2 image is unusable.
    #[error("qcow2 image")]
    Qcow2(#[from] Qcow2Error),
    /// Unknown format name.
    #[error("unknown image format {0:?}: use raw, qcow2 or auto")]
    BadFormat(String),
    /// The path is unusable.
    #[error("{0}: {1}")]
    BadPath(PathBuf, &'static str),
    /// The image is empty.
    #[error("{0} is empty")]
    Empty(PathBuf),
    /// Stopped on request.
    #[error("cancelled")]
    Cancelled,
}

/// Shared between a running import/export and whoever watches it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes handled so far.
    pub done: AtomicU64,
    /// Bytes to handle in all (known once the work starts).
    pub total: AtomicU64,
    /// Set to stop at the next step.
    pub cancel: AtomicBool,
}

impl Progress {
    fn step(&self, n: u64) -> Result<(), Error> {
        self.done.fetch_add(n, Ordering::Relaxed);
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// An image opened for import.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    format: Format,
    size: u64,
}

fn check_absolute(path: &Path) -> Result<(), Error> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Error::BadPath(path.to_owned(), "the path must be absolute"))
    }
}

impl Source {
    /// Opens `path`, detecting the format if `format` is None. The volume size is
    /// the image's virtual size rounded up to a sector.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Self, Error> {
        check_absolute(path)?;
        let io_err = |e| Error::Io(path.to_owned(), e);
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(Error::BadPath(path.to_owned(), "not a regular file"));
        }
        let format = match format {
            Some(f) => f,
            None => {
                let mut magic = [0u8; 4];
                match file.read_exact_at(&mut magic, 0) {
                    Ok(()) if &magic == b"QFI\xfb" => Format::Qcow2,
                    _ => Format::Raw,
                }
            }
        };
        let size = match format {
            Format::Raw => meta.len(),
            Format::Qcow2 => {
                let r = Qcow2Reader::open(file.try_clone().map_err(io_err)?)?;
                r.virtual_size()
            }
        };
        if size == 0 {
            return Err(Error::Empty(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            format,
            size: size.div_ceil(SECTOR) * SECTOR,
        })
    }

    /// Size the volume needs.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Writes the image into `disk` (a new, empty volume of [`size`](Self::size)).
    pub fn import(self, disk: &Disk, progress: &Progress) -> Result<(), Error> {
        let put = |off: u64, data: &[u8]| -> Result<(), Error> {
            if data.iter().all(|&b| b == 0) {
                return Ok(());
            }
            let mut owned;
            let data = if data.len() as u64 % SECTOR == 0 {
                data
            } else {
                // The tail of an image whose size is not whole sectors.
                owned = data.to_vec();
                owned.resize(data.len().div_ceil(512) * 512, 0);
                &owned[..]
            };
            let iov = [IoSlice {
                ptr: data.as_ptr().cast_mut(),
                len: data.len(),
            }];
            // SAFETY: `data` is valid for its length for the call; writes only read it.
            unsafe { disk.write_vectored(&iov, off) }.map_err(Error::Volume)?;
            Ok(())
        };
        match self.format {
            Format::Raw => {
                let runs = data_runs(&self.file, self.size)
                    .map_err(|e| Error::Io(self.path.clone(), e))?;
                progress
                    .total
                    .store(runs.iter().map(|(a, b)| b - a).sum(), Ordering::Relaxed);
                let mut buf = vec![0u8; CHUNK];
                for (start, end) in runs {
                    let mut off = start;
                    while off < end {
                        let n = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
                        let got = read_some(&self.file, &mut buf[..n], off)
                            .map_err(|e| Error::Io(self.path.clone(), e))?;
                        put(off, &buf[..got])?;
                        off += n as u64;
                        progress.step(n as u64)?;
                    }
                }
            }
            Format::Qcow2 => {
                let mut r = Qcow2Reader::open(self.file)?;
                progress
                    .total
                    .store(r.allocated_bytes()?, Ordering::Relaxed);
                r.for_each_allocated(|off, data| {
                    put(off, data)?;
                    progress.step(data.len() as u64)
                })?;
            }
        }
        disk.flush().map_err(Error::Volume)
    }
}

/// Reads up to `buf.len()` bytes at `off`, stopping early only at end of file.
fn read_some(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[got..].fill(0);
    Ok(got)
}

/// The byte ranges of `f` (up to `len`) that hold data.
fn data_runs(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    crate::volume::data_extents(f.as_raw_fd(), len)
}

/// Writes the contents of `disk` to a new file at `path` in `format`.
pub fn export(disk: &Disk, path: &Path, format: Format, progress: &Progress) -> Result<(), Error> {
    check_absolute(path)?;
    if path.exists() {
        return Err(Error::BadPath(path.to_owned(), "already exists"));
    }
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let res = export_to(disk, &part, format, progress).and_then(|()| {
        std::fs::rename(&part, path).map_err(|e| Error::Io(path.to_owned(), e))?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::Io(dir.to_owned(), e))?;
        }
        Ok(())
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    res
}

/// `runs` widened to multiples of `align`, clipped to `size`, merged.
fn aligned(runs: Vec<(u64, u64)>, align: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in runs {
        let (a, b) = (
            a / align * align,
            b.div_ceil(align).saturating_mul(align).min(size),
        );
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn export_to(disk: &Disk, part: &Path, format: Format, progress: &Progress) -> Result<(), Error> {
    let io_err = |e| Error::Io(part.to_owned(), e);
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(part)
        .map_err(io_err)?;
    let size = disk.capacity();
    let align = match format {
        Format::Raw => 1,
        Format::Qcow2 => QCOW2_CLUSTER as u64,
    };
    let runs = aligned(disk.allocated_runs().map_err(Error::Volume)?, align, size);
    progress
        .total
        .store(runs.iter().map(|(a, b)| b - a).sum(), Ordering::Relaxed);
    let mut writer = match format {
        Format::Raw => {
            file.set_len(size).map_err(io_err)?;
            None
        }
        Format::Qcow2 => Some(Qcow2Writer::create(
            file.try_clone().map_err(io_err)?,
            size,
        )?),
    };
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in runs {
        let mut off = start;
        while off < end {
            let n = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let iov = [IoSlice {
                ptr: buf.as_mut_ptr(),
                len: n,
            }];
            // SAFETY: `buf` is valid for `n` bytes for the call.
            unsafe { disk.read_vectored(&iov, off) }.map_err(Error::Volume)?;
            match &mut writer {
                None => {
                    if buf[..n].iter().any(|&b| b != 0) {
                        file.write_all_at(&buf[..n], off).map_err(io_err)?;
                    }
                }
                Some(w) => {
                    for (i, c) in buf[..n].chunks(QCOW2_CLUSTER).enumerate() {
                        w.write_cluster(off + (i * QCOW2_CLUSTER) as u64, c)?;
                    }
                }
            }
            off += n as u64;
            progress.step(n as u64)?;
        }
    }
    match writer {
        Some(w) => w.finish()?,
        None => file.sync_all().map_err(io_err)?,
    }
    Ok(())
}
