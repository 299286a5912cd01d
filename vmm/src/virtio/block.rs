//! A read-only virtio-blk disk on a local file (installer ISO, cloud-init
//! seed). Writes fail with an I/O error status, as on a read-only disk.

// Guest-visible lengths and addresses are 32/64-bit fields bounded by the
// checks next to each cast (SIZE_MAX, request caps, queue sizes).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::worker::{Chain, QueueHandler, Served};
use super::{features, types, Activation, VirtioDevice, VirtioError};

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// Largest data segment accepted (advertised as size_max).
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The read-only disk.
#[derive(Debug)]
pub struct Media {
    file: Option<File>,
    id: String,
    sectors: u64,
    mem: GuestMemoryMmap,
    served: Served,
    path: String,
}

impl Media {
    /// Opens `path` read-only.
    pub fn open(path: &Path, index: usize, mem: GuestMemoryMmap) -> Result<Self, VirtioError> {
        let setup = |source| VirtioError::Setup {
            what: "cannot open a media image",
            source,
        };
        let file = File::open(path).map_err(setup)?;
        let len = file.metadata().map_err(setup)?.len();
        Ok(Self {
            file: Some(file),
            id: format!("atoll-media{index}"),
            sectors: len / SECTOR,
            mem,
            served: Served::default(),
            path: path.display().to_string(),
        })
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c
    }
}

/// Serves requests against the file.
pub struct Server {
    file: File,
    id: String,
    bytes: u64,
}

impl Server {
    /// A server for `file` of `bytes` bytes answering GET_ID with `id`.
    pub fn new(file: File, id: String, bytes: u64) -> Self {
        Self { file, id, bytes }
    }

    fn read(&self, mem: &GuestMemoryMmap, data: &[(u64, u32)], mut offset: u64) -> Result<u32, u8> {
        let mut buf = vec![0u8; 64 << 10];
        let mut done = 0u32;
        for &(addr, len) in data {
            let end = offset.checked_add(u64::from(len)).ok_or(S_IOERR)?;
            if len > SIZE_MAX || end > self.bytes {
                return Err(S_IOERR);
            }
            let mut at = 0u64;
            while at < u64::from(len) {
                let n = (u64::from(len) - at).min(buf.len() as u64) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], offset + at)
                    .map_err(|_| S_IOERR)?;
                mem.write_slice(&buf[..n], GuestAddress(addr + at))
                    .map_err(|_| S_IOERR)?;
                at += n as u64;
            }
            offset = end;
            done += len;
        }
        Ok(done)
    }
}

impl QueueHandler for Server {
    fn handle(&mut self, _queue: u16, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let descs: Vec<_> = chain.collect();
        // Header, (data), status: anything shorter has nowhere to answer.
        let (Some(head), Some(status)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || !status.is_write_only() || status.len() < 1 {
            return 0;
        }
        let status_addr = GuestAddress(status.addr().0 + u64::from(status.len()) - 1);
        let header = if head.is_write_only() || head.len() < 16 {
            None
        } else {
            let t: Option<u32> = mem.read_obj(head.addr()).ok();
            let s: Option<u64> = head
                .addr()
                .0
                .checked_add(8)
                .and_then(|a| mem.read_obj(GuestAddress(a)).ok());
            t.zip(s)
        };
        let data: Vec<(u64, u32, bool)> = descs[1..descs.len() - 1]
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        let (st, written) = match header {
            None => (S_IOERR, 0),
            Some((T_IN, sector)) => {
                if data.iter().any(|d| !d.2) || data.len() > SEG_MAX as usize {
                    (S_IOERR, 0)
                } else {
                    let segs: Vec<(u64, u32)> = data.iter().map(|d| (d.0, d.1)).collect();
                    match sector
                        .checked_mul(SECTOR)
                        .ok_or(S_IOERR)
                        .and_then(|off| self.read(mem, &segs, off))
                    {
                        Ok(n) => (S_OK, n),
                        Err(s) => (s, 0),
                    }
                }
            }
            Some((T_GET_ID, _)) => match data.first() {
                Some(&(addr, len, true)) => {
                    let mut id = [0u8; 20];
                    let n = self.id.len().min(20);
                    id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                    let n = (len as usize).min(20);
                    match mem.write_slice(&id[..n], GuestAddress(addr)) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            Some((T_OUT | T_FLUSH | T_DISCARD | T_WRITE_ZEROES, _)) => (S_IOERR, 0),
            Some(_) => (S_UNSUPP, 0),
        };
        match mem.write_obj(st, status_addr) {
            Ok(()) => written + 1,
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for Media {
    fn device_type(&self) -> u32 {
        types::BLOCK
    }

    fn queues(&self) -> (u16, u16) {
        (1, QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_RO
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let file = self
            .file
            .as_ref()
            .ok_or(VirtioError::Unsupported("closed media"))?
            .try_clone()
            .map_err(|source| VirtioError::Setup {
                what: "cannot duplicate a media file",
                source,
            })?;
        let server = Server::new(file, self.id.clone(), self.sectors * SECTOR);
        self.served
            .start("media", self.mem.clone(), a, QUEUE_SIZE, server)
    }

    fn reset(&mut self) {
        self.served.stop();
    }

    fn pause(&mut self) {
        self.served.pause();
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.served.resume();
        Ok(())
    }

    fn describe(&self) -> String {
        format!("virtio-blk read-only {}", self.path)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.served.counters()
    }
}
