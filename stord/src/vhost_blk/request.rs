//! One virtio-blk request: parsing a descriptor chain a guest controls, and running
//! it against a [`Disk`].
//!
//! The chain is flattened into segments; the first 16 bytes are the request header
//! (readable), the last byte is the status (writable), the bytes between are data.
//! Anything else (too short, wrong direction, addresses outside guest memory, more
//! segments than advertised, ranges past the end of the volume) fails that request
//! with a status, or, when not even a status byte can be found, completes it with
//! no bytes written. The backend itself never stops for a bad request.

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::disk::{Direct, Disk};
use crate::qos::{Dir, Limiter};
use crate::vhost_blk::config::{MAX_DISCARD_SEG, SEG_MAX};
use crate::volume::{IoSlice, SECTOR};

/// Length of the request header.
const HEADER_LEN: u64 = 16;
/// Length of one discard/write-zeroes range.
const RANGE_LEN: u64 = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;
/// Longest serial returned by GET_ID.
const ID_LEN: usize = 20;

/// Per-attachment I/O counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Completed reads.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed writes.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flush_ops: AtomicU64,
    /// Completed discards and write-zeroes.
    pub discard_ops: AtomicU64,
    /// Requests that ended with an error status.
    pub errors: AtomicU64,
    /// Chains so broken that not even a status could be written.
    pub malformed: AtomicU64,
}

/// A contiguous piece of the chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
    write: bool,
}

/// Why a request failed; mapped to a virtio status.
#[derive(Debug, PartialEq, Eq)]
enum Fail {
    IoErr,
    Unsupported,
}

/// Cuts `[from, from + len)` of the flattened chain out of `segs`.
fn range(segs: &[Segment], mut from: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if from >= s.len {
            from -= s.len;
            continue;
        }
        let take = (s.len - from).min(len);
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + from),
            len: take,
            write: s.write,
        });
        len -= take;
        from = 0;
    }
    out
}

/// Guest memory of `segs` as host slices; fails if any byte is outside guest memory.
fn host_slices<M: GuestMemory>(mem: &M, segs: &[Segment]) -> Result<Vec<IoSlice>, Fail> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| Fail::IoErr)?;
        let access = if s.write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for slice in mem
            .get_slices(s.addr, len, access)
            .map_err(|_| Fail::IoErr)?
        {
            let slice = slice.map_err(|_| Fail::IoErr)?;
            // The mmap backend hands out plain pointers; the guard is a no-op that
            // only matters for foreign (Xen) mappings, which stord does not use.
            let ptr = slice.ptr_guard_mut().as_ptr();
            out.push(IoSlice {
                ptr,
                len: slice.len(),
            });
        }
    }
    Ok(out)
}

fn read_bytes<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> Result<(), Fail> {
    let mut done = 0usize;
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| Fail::IoErr)?;
        let end = done.checked_add(len).ok_or(Fail::IoErr)?;
        let dst = buf.get_mut(done..end).ok_or(Fail::IoErr)?;
        mem.read_slice(dst, s.addr).map_err(|_| Fail::IoErr)?;
        done = end;
    }
    Ok(())
}

fn write_bytes<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &[u8]) -> Result<(), Fail> {
    let mut done = 0usize;
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| Fail::IoErr)?;
        let end = done.checked_add(len).ok_or(Fail::IoErr)?;
        let src = buf.get(done..end).ok_or(Fail::IoErr)?;
        mem.write_slice(src, s.addr).map_err(|_| Fail::IoErr)?;
        done = end;
    }
    Ok(())
}

/// What a request runs against.
#[derive(Debug)]
pub struct Context<'a> {
    /// The volume's chain.
    pub disk: &'a Disk,
    /// Whether writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// What GET_ID returns (first 20 bytes).
    pub serial: &'a [u8],
    /// Counters to update.
    pub counters: &'a Counters,
    /// QoS limits to wait for before reads and writes.
    pub limiter: Option<&'a Limiter>,
    /// Whether reads and writes that one layer file can serve may be returned as
    /// [`Outcome::Async`] instead of being run here.
    pub allow_async: bool,
}

/// A read or write handed to the caller to run asynchronously; the status is
/// written by [`complete`] when it ends.
#[derive(Debug)]
pub struct Pending {
    /// The layer serving it (counted in flight while this lives).
    pub direct: Direct,
    /// Write (else read).
    pub write: bool,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Guest buffers, resolved to host memory.
    pub iov: Vec<IoSlice>,
    /// Bytes to move.
    pub len: u64,
    /// Where the status byte goes.
    status: GuestAddress,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// Finished; the used length to report.
    Done(u32),
    /// Runs asynchronously; finish it with [`complete`].
    Async(Pending),
}

/// Successful result of running a request here or handing it off.
enum Exec {
    /// Bytes written into guest buffers.
    Done(u64),
    /// Handed off; the status byte is written later.
    Async(Pending),
}

/// Finishes an asynchronous request that moved `result` bytes: retries it
/// synchronously if direct I/O refused it or it came up short, writes the
/// status and counts it. Returns the used length.
pub fn complete<M: GuestMemory>(
    mem: &M,
    p: Pending,
    result: std::io::Result<usize>,
    counters: &Counters,
) -> u32 {
    let want = usize::try_from(p.len).unwrap_or(usize::MAX);
    let result = match result {
        Ok(n) if n == want => Ok(n),
        // EINVAL (alignment for O_DIRECT) or a short transfer: the volume's own
        // path falls back to buffered I/O and loops over short transfers.
        _ => {
            let vol = p.direct.layer.data();
            // SAFETY: the buffers are guest memory that the caller keeps mapped
            // (the ring slot holds the mapping) for this call.
            unsafe {
                if p.write {
                    vol.write_vectored(&p.iov, p.offset)
                } else {
                    vol.read_vectored(&p.iov, p.offset)
                }
            }
        }
    };
    let ok = matches!(result, Ok(n) if n == want);
    if !ok {
        tracing::warn!(
            write = p.write,
            offset = p.offset,
            len = p.len,
            "direct I/O failed: {result:?}"
        );
    }
    if ok && p.write {
        p.direct.written();
    }
    if ok {
        let (ops, bytes) = if p.write {
            (&counters.write_ops, &counters.write_bytes)
        } else {
            (&counters.read_ops, &counters.read_bytes)
        };
        ops.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(p.len, Ordering::Relaxed);
    } else {
        counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    let status = if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    };
    if mem
        .write_obj(u8::try_from(status).unwrap_or(u8::MAX), p.status)
        .is_err()
    {
        counters.malformed.fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    let written = if ok && !p.write { p.len } else { 0 };
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Checks direction and bounds, then runs the request. Returns bytes written into
/// guest buffers (excluding the status byte).
fn execute<M: GuestMemory>(
    mem: &M,
    ctx: &Context<'_>,
    kind: u32,
    sector: u64,
    data: &[Segment],
    status: GuestAddress,
) -> Result<Exec, Fail> {
    let (vol, serial, counters) = (ctx.disk, ctx.serial, ctx.counters);
    let data_len: u64 = data.iter().map(|s| s.len).sum();
    let need_write = |want: bool| -> Result<(), Fail> {
        if data.iter().all(|s| s.write == want) {
            Ok(())
        } else {
            Err(Fail::IoErr)
        }
    };
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            need_write(!write)?;
            if write && ctx.read_only {
                return Err(Fail::IoErr);
            }
            let offset = sector.checked_mul(SECTOR).ok_or(Fail::IoErr)?;
            if data_len % SECTOR != 0 || !vol.in_range(offset, data_len) {
                return Err(Fail::IoErr);
            }
            let iov = host_slices(mem, data)?;
            if let Some(l) = ctx.limiter {
                l.admit(if write { Dir::Write } else { Dir::Read }, data_len);
            }
            if ctx.allow_async {
                if let Some(direct) = vol.direct(offset, data_len, write) {
                    return Ok(Exec::Async(Pending {
                        direct,
                        write,
                        offset,
                        iov,
                        len: data_len,
                        status,
                    }));
                }
            }
            // SAFETY: `host_slices` resolved every segment inside the guest memory
            // mapping `mem`, which stays mapped while the request runs.
            let res = unsafe {
                if write {
                    vol.write_vectored(&iov, offset)
                } else {
                    vol.read_vectored(&iov, offset)
                }
            };
            match res {
                Ok(n) if n as u64 == data_len => {}
                other => {
                    tracing::warn!(write, offset, len = data_len, "I/O failed: {other:?}");
                    return Err(Fail::IoErr);
                }
            }
            let (ops, bytes) = if write {
                (&counters.write_ops, &counters.write_bytes)
            } else {
                (&counters.read_ops, &counters.read_bytes)
            };
            ops.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(data_len, Ordering::Relaxed);
            Ok(Exec::Done(if write { 0 } else { data_len }))
        }
        VIRTIO_BLK_T_FLUSH => {
            vol.flush().map_err(|_| Fail::IoErr)?;
            counters.flush_ops.fetch_add(1, Ordering::Relaxed);
            Ok(Exec::Done(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            need_write(true)?;
            let n = usize::try_from(data_len).unwrap_or(usize::MAX).min(ID_LEN);
            let mut id = [0u8; ID_LEN];
            let len = serial.len().min(ID_LEN);
            id[..len].copy_from_slice(&serial[..len]);
            write_bytes(mem, &range(data, 0, n as u64), &id[..n])?;
            Ok(Exec::Done(n as u64))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            need_write(false)?;
            if ctx.read_only {
                return Err(Fail::IoErr);
            }
            if data_len == 0
                || data_len % RANGE_LEN != 0
                || data_len / RANGE_LEN > u64::from(MAX_DISCARD_SEG)
            {
                return Err(Fail::IoErr);
            }
            let mut buf = vec![0u8; usize::try_from(data_len).map_err(|_| Fail::IoErr)?];
            read_bytes(mem, data, &mut buf)?;
            for r in buf.chunks_exact(16) {
                let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
                let (start, sectors, flags) = (le64(&r[0..8]), le32(&r[8..12]), le32(&r[12..16]));
                let allowed = if kind == VIRTIO_BLK_T_DISCARD {
                    0
                } else {
                    FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(Fail::Unsupported);
                }
                let offset = start.checked_mul(SECTOR).ok_or(Fail::IoErr)?;
                let len = u64::from(sectors) * SECTOR;
                if !vol.in_range(offset, len) {
                    return Err(Fail::IoErr);
                }
                let res = if kind == VIRTIO_BLK_T_DISCARD {
                    vol.discard(offset, len)
                } else {
                    vol.write_zeroes(offset, len)
                };
                res.map_err(|_| Fail::IoErr)?;
            }
            counters.discard_ops.fetch_add(1, Ordering::Relaxed);
            Ok(Exec::Done(0))
        }
        _ => Err(Fail::Unsupported),
    }
}

/// Runs the request made of `descs` and writes its status, returning the number
/// of bytes the device wrote into the chain (the used length); or hands a read or
/// write off to run asynchronously (see [`Context::allow_async`]).
pub fn process<M: GuestMemory>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    ctx: &Context<'_>,
) -> Outcome {
    let counters = ctx.counters;
    // The iterator is bounded by the queue (and indirect table) size and stops at
    // loops, so collecting it is bounded too.
    let mut segs = Vec::new();
    for d in descs {
        if d.len() > 0 {
            segs.push(Segment {
                addr: d.addr(),
                len: u64::from(d.len()),
                write: d.is_write_only(),
            });
        }
    }
    let too_many = segs.len() > usize::try_from(SEG_MAX).unwrap_or(usize::MAX) + 2;
    let total: u64 = segs.iter().map(|s| s.len).sum();
    // The status byte: the chain's last byte, which must be device-writable.
    let status_seg = segs.last().copied().filter(|s| s.write);
    let Some(status_seg) = status_seg.filter(|_| total > HEADER_LEN) else {
        counters.malformed.fetch_add(1, Ordering::Relaxed);
        return Outcome::Done(0);
    };
    let status_addr = GuestAddress(status_seg.addr.0 + status_seg.len - 1);
    let result = (|| {
        if too_many {
            return Err(Fail::IoErr);
        }
        let header_segs = range(&segs, 0, HEADER_LEN);
        if header_segs.iter().any(|s| s.write) {
            return Err(Fail::IoErr);
        }
        let mut header = [0u8; 16];
        read_bytes(mem, &header_segs, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let data = range(&segs, HEADER_LEN, total - HEADER_LEN - 1);
        execute(mem, ctx, kind, sector, &data, status_addr)
    })();
    let (status, written) = match result {
        Ok(Exec::Async(p)) => return Outcome::Async(p),
        Ok(Exec::Done(n)) => (VIRTIO_BLK_S_OK, n),
        Err(f) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            let s = if f == Fail::Unsupported {
                VIRTIO_BLK_S_UNSUPP
            } else {
                VIRTIO_BLK_S_IOERR
            };
            (s, 0)
        }
    };
    let status = u8::try_from(status).unwrap_or(u8::MAX);
    if mem.write_obj(status, status_addr).is_err() {
        counters.malformed.fetch_add(1, Ordering::Relaxed);
        return Outcome::Done(0);
    }
    Outcome::Done(u32::try_from(written + 1).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Volume;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2; // VRING_DESC_F_WRITE
    const _: () = assert!(virtio_bindings::virtio_ring::VRING_DESC_F_WRITE == 2);
    const MEM: u64 = 1 << 20;

    struct Rig {
        mem: GuestMemoryMmap<()>,
        vol: Disk,
        counters: Counters,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        drop(Volume::create(&path, 64 * 1024).unwrap());
        let vol = Disk::from_volume(Volume::open(&path, false).unwrap());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Rig {
            mem,
            vol,
            counters: Counters::default(),
            _dir: dir,
        }
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn run(r: &Rig, descs: Vec<Descriptor>) -> u32 {
        let ctx = Context {
            disk: &r.vol,
            read_only: false,
            serial: b"serial-0123456789abcdef",
            counters: &r.counters,
            limiter: None,
            allow_async: false,
        };
        match process(&r.mem, descs.into_iter(), &ctx) {
            Outcome::Done(n) => n,
            Outcome::Async(_) => unreachable!("async is off"),
        }
    }

    fn status(r: &Rig, at: u64) -> u32 {
        u32::from(r.mem.read_obj::<u8>(GuestAddress(at)).unwrap())
    }

    #[test]
    fn write_then_read_round_trips() {
        let r = rig();
        header(&r.mem, 0x1000, VIRTIO_BLK_T_OUT, 3);
        r.mem
            .write_slice(&[0xabu8; 1024], GuestAddress(0x2000))
            .unwrap();
        let used = run(
            &r,
            vec![d(0x1000, 16, 0), d(0x2000, 1024, 0), d(0x3000, 1, W)],
        );
        assert_eq!((used, status(&r, 0x3000)), (1, VIRTIO_BLK_S_OK));
        header(&r.mem, 0x1000, VIRTIO_BLK_T_IN, 3);
        // Data split over two descriptors, the status sharing the last one.
        let used = run(
            &r,
            vec![d(0x1000, 16, 0), d(0x4000, 512, W), d(0x5000, 513, W)],
        );
        assert_eq!((used, status(&r, 0x5000 + 512)), (1025, VIRTIO_BLK_S_OK));
        let mut back = [0u8; 512];
        r.mem.read_slice(&mut back, GuestAddress(0x5000)).unwrap();
        assert_eq!(back, [0xab; 512]);
    }

    #[test]
    fn hostile_chains_fail_with_a_status_and_touch_nothing() {
        let r = rig();
        let out = |sector| {
            header(&r.mem, 0x1000, VIRTIO_BLK_T_OUT, sector);
        };
        // Data in the wrong direction.
        out(0);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 512, W), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // Header in a device-writable buffer.
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, W), d(0x2000, 512, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // Data outside guest memory, and straddling its end.
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x10_0000_0000, 512, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(MEM - 256, 512, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // Past the end of the volume, and a sector number that overflows.
        out(127);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 1024, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        out(u64::MAX);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // Not a whole number of sectors.
        out(0);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 100, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // More segments than advertised.
        let mut many = vec![d(0x1000, 16, 0)];
        many.extend((0..200).map(|i| d(0x2000 + i * 512, 512, 0)));
        many.push(d(0x3000, 1, W));
        assert_eq!(run(&r, many), 1);
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR);
        // Unknown request type.
        header(&r.mem, 0x1000, 99, 0);
        assert_eq!(run(&r, vec![d(0x1000, 16, 0), d(0x3000, 1, W)]), 1);
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(r.counters.errors.load(Ordering::Relaxed), 9);
        assert_eq!(r.counters.write_ops.load(Ordering::Relaxed), 0);
        assert_eq!(r.vol.used(), 0, "a failed request wrote to the volume");
    }

    #[test]
    fn chains_without_a_status_byte_are_dropped() {
        let r = rig();
        header(&r.mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        // Last descriptor not writable; header only; status outside memory; empty.
        assert_eq!(run(&r, vec![d(0x1000, 16, 0), d(0x2000, 512, 0)]), 0);
        assert_eq!(run(&r, vec![d(0x1000, 16, 0)]), 0);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 512, W), d(0x20_0000_0000, 1, W)]
            ),
            0
        );
        assert_eq!(run(&r, vec![]), 0);
        assert_eq!(r.counters.malformed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn discard_checks_flags_and_ranges_and_get_id_returns_the_serial() {
        let r = rig();
        let range = |at: u64, sector: u64, n: u32, flags: u32| {
            r.mem.write_obj(sector, GuestAddress(at)).unwrap();
            r.mem.write_obj(n, GuestAddress(at + 8)).unwrap();
            r.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        };
        header(&r.mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        range(0x2000, 0, 8, FLAG_UNMAP);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)]
            ),
            1
        );
        assert_eq!(
            status(&r, 0x3000),
            VIRTIO_BLK_S_UNSUPP,
            "UNMAP is not a discard flag"
        );
        range(0x2000, 120, 16, 0);
        run(
            &r,
            vec![d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)],
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_IOERR, "range past the end");
        header(&r.mem, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(0x2000, 0, 8, FLAG_UNMAP);
        run(
            &r,
            vec![d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)],
        );
        assert_eq!(status(&r, 0x3000), VIRTIO_BLK_S_OK);

        header(&r.mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            run(
                &r,
                vec![d(0x1000, 16, 0), d(0x2000, 20, W), d(0x3000, 1, W)]
            ),
            21
        );
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
    }
}
