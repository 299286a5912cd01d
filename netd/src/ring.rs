//! The data path's view of a split virtqueue: its three areas mapped once
//! per burst (not looked up in guest memory for every field), descriptors
//! read straight from the table, used entries written one by one and made
//! visible to the driver with a single index store.
//!
//! Ring state (next available, next used) lives in the virtio-queue `Queue`
//! that vhost-user-backend owns; a `Ring` takes it at `open` and gives it
//! back at `close`, so the frontend's GET_VRING_BASE and the notification
//! helpers keep working on the same numbers.
//!
//! Everything here comes from the guest: a head or next index outside the
//! table, a chain that loops or runs longer than [`MAX_CHAIN`], and areas
//! outside guest memory or misaligned are errors, never a panic or an
//! access outside the mapping.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// Descriptors one chain may have (Linux sends at most 19 without
/// indirect descriptors, which ports do not offer).
pub const MAX_CHAIN: usize = 32;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor: where in guest memory, how long, written by the device or
/// read by it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Bytes the device may write into `descs`.
pub fn writable_len(descs: &[Desc]) -> usize {
    descs
        .iter()
        .filter(|d| d.write)
        .fold(0usize, |n, d| n.saturating_add(d.len as usize))
}

/// Why a chain could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or next index past the table.
    #[error("descriptor index {0} outside the ring")]
    Index(u16),
    /// More descriptors than [`MAX_CHAIN`], or a loop.
    #[error("descriptor chain too long")]
    TooLong,
    /// An indirect descriptor (not offered).
    #[error("indirect descriptor not negotiated")]
    Indirect,
}

/// A queue's areas in host memory for the length of a burst.
pub struct Ring<'m> {
    mem: &'m GuestMemoryMmap,
    regions: Regions,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    /// A power of two (`open` checks), so slots are indexes masked.
    size: u16,
    next_avail: u16,
    /// The driver's available index as last read: chains up to it are
    /// taken without reading it again (it sits on a cache line the driver
    /// keeps writing).
    avail_seen: u16,
    next_used: u16,
    event_idx: bool,
}

/// Regions translated without vm-memory's lookup, at most (a VM has one
/// or two; more fall back to the lookup).
const FAST_REGIONS: usize = 4;

/// The guest's memory regions as (guest start, length, host address),
/// for the per-frame translations of the data path.
#[derive(Clone, Copy)]
struct Regions {
    n: usize,
    r: [(u64, u64, usize); FAST_REGIONS],
}

impl Regions {
    fn of(mem: &GuestMemoryMmap) -> Self {
        let mut out = Self {
            n: 0,
            r: [(0, 0, 0); FAST_REGIONS],
        };
        for region in mem.iter() {
            let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) else {
                return Self { n: 0, ..out };
            };
            let Some(slot) = out.r.get_mut(out.n) else {
                return Self { n: 0, ..out };
            };
            *slot = (region.start_addr().0, region.len(), base as usize);
            out.n += 1;
        }
        out
    }

    /// The host address of `len` bytes at `addr` when they lie in one
    /// region.
    fn host(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let len = u64::try_from(len).ok()?;
        self.r[..self.n].iter().find_map(|&(start, size, base)| {
            let off = addr.checked_sub(start)?;
            if off.checked_add(len)? > size {
                return None;
            }
            Some(base.checked_add(usize::try_from(off).ok()?)? as *mut u8)
        })
    }
}

/// A host pointer to `len` bytes of guest memory at `addr`, aligned to
/// `align`; None if that range is not in one region.
fn host(mem: &GuestMemoryMmap, addr: u64, len: usize, align: usize) -> Option<*mut u8> {
    let s = mem.get_slice(GuestAddress(addr), len).ok()?;
    let p = s.ptr_guard_mut().as_ptr();
    (p as usize % align == 0).then_some(p)
}

impl<'m> Ring<'m> {
    /// Maps `q`'s areas in `mem`; None if the queue is not ready or its
    /// areas are not where the driver said (outside memory, misaligned).
    pub fn open(q: &Queue, mem: &'m GuestMemoryMmap) -> Option<Self> {
        if !q.ready() {
            return None;
        }
        let size = q.size();
        let n = usize::from(size);
        if n == 0 || !n.is_power_of_two() {
            return None;
        }
        Some(Self {
            mem,
            regions: Regions::of(mem),
            desc: host(mem, q.desc_table(), 16 * n, 16)?,
            avail: host(mem, q.avail_ring(), 6 + 2 * n, 2)?,
            used: host(mem, q.used_ring(), 6 + 8 * n, 4)?,
            size,
            next_avail: q.next_avail(),
            avail_seen: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        })
    }

    /// Hands the indexes back to `q`.
    pub fn close(&self, q: &mut Queue) {
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
    }

    /// Guest memory.
    pub fn mem(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    /// Copies guest memory at `addr` into `dst`; false if the guest
    /// pointed outside its memory.
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> bool {
        match self.regions.host(addr, dst.len()) {
            // SAFETY: `len` bytes at `p` lie in one region of the guest's
            // memory, mapped while `mem` is borrowed; `dst` is ours. The
            // guest may write them meanwhile (it gets what it wrote), as
            // with vm-memory's own bulk copies.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(p.cast_const(), dst.as_mut_ptr(), dst.len());
                true
            },
            None => read_guest(self.mem, addr, dst),
        }
    }

    /// Copies `src` to guest memory at `addr`; false if outside its memory.
    pub fn write(&self, addr: u64, src: &[u8]) -> bool {
        match self.regions.host(addr, src.len()) {
            // SAFETY: as in `read`, the other way.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len());
                true
            },
            None => write_guest(self.mem, addr, src),
        }
    }

    /// As [`Ring::write`], but up to 16 bytes that already hold `src` are
    /// left alone (longer runs are written): the line is only read, so it stays in the driver's cache too
    /// and need not travel back when the driver reads it. For the headers
    /// of receive buffers, which mostly hold what the last frame in that
    /// buffer was given.
    pub fn write_if_changed(&self, addr: u64, src: &[u8]) -> bool {
        match self.regions.host(addr, src.len()) {
            Some(p) => {
                // Copied out first, as `read` does: no reference is made to
                // memory the guest may write meanwhile.
                let mut had = [0u8; 16];
                let same = match had.get_mut(..src.len()) {
                    Some(had) => {
                        // SAFETY: as in `read`; `had` is ours. The guest
                        // may change the bytes between the look and the
                        // write, as it may after any write.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                p.cast_const(),
                                had.as_mut_ptr(),
                                had.len(),
                            );
                        }
                        had == src
                    }
                    // Longer than a header: written.
                    None => false,
                };
                if !same {
                    // SAFETY: as in `write`.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
                }
                true
            }
            None => write_guest(self.mem, addr, src),
        }
    }

    /// Where `len` bytes of guest memory at `addr` are in this process,
    /// if they lie in one region (mapped while `mem` is borrowed; the guest
    /// may write them meanwhile).
    pub fn host_ptr(&self, addr: u64, len: usize) -> Option<*const u8> {
        self.regions.host(addr, len).map(<*mut u8>::cast_const)
    }

    /// Copies `len` bytes at `src` to guest memory at `addr`; false if
    /// outside its memory.
    ///
    /// # Safety
    /// `len` bytes at `src` are mapped (another guest's memory: it may
    /// write them meanwhile, and the copy then holds some of each).
    pub unsafe fn write_raw(&self, addr: u64, src: *const u8, len: usize) -> bool {
        match self.regions.host(addr, len) {
            // SAFETY: `len` bytes at `p` lie in one region of the guest's
            // memory; `src` as this function's contract says.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(src, p, len);
                true
            },
            None => {
                let mut tmp = vec![0u8; len];
                // SAFETY: as above; `tmp` is ours.
                unsafe { std::ptr::copy_nonoverlapping(src, tmp.as_mut_ptr(), len) };
                write_guest(self.mem, addr, &tmp)
            }
        }
    }

    /// Asks the CPU to start loading the guest memory at `addr` (a frame
    /// about to be read), so that loads for a burst overlap.
    pub fn prefetch(&self, addr: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = self.regions.host(addr, 1) {
            // SAFETY: a prefetch is a hint; it never faults and reads
            // nothing into the program.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.cast_const().cast(),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = addr;
    }

    fn u16_at(p: *const u8) -> u16 {
        // SAFETY: `p` lies inside an area `open` checked is mapped and
        // 2-aligned for the ring's size; the guest writes it concurrently,
        // hence volatile.
        u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
    }

    /// The driver's available index.
    fn avail_idx(&self) -> u16 {
        // SAFETY: offset 2 of the available ring, mapped and 2-aligned
        // (`open`); an AtomicU16 has the layout of a u16.
        let idx = unsafe { &*self.avail.add(2).cast::<AtomicU16>() };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// How many chains the driver says wait at available index `idx`; 0
    /// for a ring it broke (an index more than the ring's size ahead).
    fn waiting(&self, idx: u16) -> u16 {
        let n = idx.wrapping_sub(self.next_avail);
        if n > self.size {
            0
        } else {
            n
        }
    }

    /// Whether the driver has posted chains not taken yet.
    pub fn has_avail(&self) -> bool {
        self.waiting(self.avail_idx()) > 0
    }

    /// The next available chain: its head, its descriptors appended to
    /// `descs`; None when the ring is empty. A broken chain is consumed and
    /// reported with its head, so the caller can return it unused (what it
    /// appended is removed).
    pub fn pop(&mut self, descs: &mut Vec<Desc>) -> Option<Result<u16, (u16, ChainError)>> {
        if self.avail_seen == self.next_avail {
            let idx = self.avail_idx();
            if self.waiting(idx) == 0 {
                return None;
            }
            self.avail_seen = idx;
        }
        let slot = usize::from(self.next_avail & (self.size - 1));
        let head = Self::u16_at(self.avail.wrapping_add(4 + 2 * slot));
        self.next_avail = self.next_avail.wrapping_add(1);
        let start = descs.len();
        Some(match self.chain(head, descs) {
            Ok(()) => Ok(head),
            Err(e) => {
                descs.truncate(start);
                Err((head, e))
            }
        })
    }

    fn chain(&self, head: u16, descs: &mut Vec<Desc>) -> Result<(), ChainError> {
        let mut i = head;
        for _ in 0..MAX_CHAIN {
            if i >= self.size {
                return Err(ChainError::Index(i));
            }
            let p = self.desc.wrapping_add(16 * usize::from(i));
            // SAFETY: entry i < size of the descriptor table, mapped and
            // 16-aligned (`open`).
            let (addr, len, flags, next) = unsafe {
                (
                    u64::from_le(std::ptr::read_volatile(p.cast::<u64>())),
                    u32::from_le(std::ptr::read_volatile(p.add(8).cast::<u32>())),
                    u16::from_le(std::ptr::read_volatile(p.add(12).cast::<u16>())),
                    u16::from_le(std::ptr::read_volatile(p.add(14).cast::<u16>())),
                )
            };
            if flags & F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let d = Desc {
                addr,
                len,
                write: flags & F_WRITE != 0,
            };
            descs.push(d);
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            i = next;
        }
        Err(ChainError::TooLong)
    }

    /// Puts chains back: the next `n` pops give the same chains again.
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Writes a used entry (not yet visible: see [`Ring::publish`]).
    ///
    /// An entry that already holds these values (the same chain in that
    /// slot a lap ago, with the same length: always so for transmit
    /// chains, taken in order and used with length 0) is only read, so the
    /// driver's copy of the line stays good.
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used & (self.size - 1));
        let p = self.used.wrapping_add(4 + 8 * slot);
        let id = u32::from(head).to_le();
        let len = len.to_le();
        // SAFETY: entry slot < size of the used ring, mapped and 4-aligned
        // (`open`).
        unsafe {
            let had = (
                std::ptr::read_volatile(p.cast::<u32>()),
                std::ptr::read_volatile(p.add(4).cast::<u32>()),
            );
            if had != (id, len) {
                std::ptr::write_volatile(p.cast::<u32>(), id);
                std::ptr::write_volatile(p.add(4).cast::<u32>(), len);
            }
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Makes every used entry written so far visible to the driver.
    pub fn publish(&self) {
        // SAFETY: offset 2 of the used ring, mapped and 4-aligned (`open`).
        let idx = unsafe { &*self.used.add(2).cast::<AtomicU16>() };
        idx.store(self.next_used.to_le(), Ordering::Release);
    }

    /// The used index as published.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Whether the driver wants a signal for the entries published since
    /// `since` (the used index at the last signal decision): its used-event
    /// index with EVENT_IDX, its NO_INTERRUPT flag without.
    pub fn needs_signal(&self, since: u16) -> bool {
        if self.next_used == since {
            return false;
        }
        fence(Ordering::SeqCst);
        let n = usize::from(self.size);
        if self.event_idx {
            let used_event = Self::u16_at(self.avail.wrapping_add(4 + 2 * n));
            let new = self.next_used;
            return new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(since);
        }
        Self::u16_at(self.avail) & AVAIL_F_NO_INTERRUPT == 0
    }

    /// Asks the driver to kick when it adds chains (or not); true if it
    /// added some meanwhile (then there is work without a kick).
    pub fn notify(&self, on: bool) -> bool {
        let n = usize::from(self.size);
        if self.event_idx {
            if on {
                let p = self.used.wrapping_add(4 + 8 * n);
                // SAFETY: the avail_event field after the used ring's
                // entries, inside the area `open` mapped (6 + 8n bytes),
                // 2-aligned.
                unsafe { std::ptr::write_volatile(p.cast::<u16>(), self.next_avail.to_le()) };
            }
        } else {
            let flags = if on { 0 } else { USED_F_NO_NOTIFY };
            // SAFETY: the used ring's flags, mapped and 4-aligned (`open`).
            unsafe { std::ptr::write_volatile(self.used.cast::<u16>(), flags.to_le()) };
        }
        if !on {
            return false;
        }
        fence(Ordering::SeqCst);
        self.has_avail()
    }
}

/// Most pieces a frame read in part may leave in guest memory.
pub const PIECES: usize = 4;

/// The part of a frame left where the guest put it: up to [`PIECES`]
/// ranges of this process's memory, in order (the guest's, mapped while
/// its ring is served).
#[derive(Debug, Clone, Copy)]
pub struct Pieces {
    at: [(*const u8, usize); PIECES],
    n: usize,
}

impl Pieces {
    /// None yet.
    pub const EMPTY: Self = Self {
        at: [(std::ptr::null(), 0); PIECES],
        n: 0,
    };

    /// Adds `len` bytes at `p`; false when there is no room for another
    /// piece.
    pub fn push(&mut self, p: *const u8, len: usize) -> bool {
        match self.at.get_mut(self.n) {
            Some(slot) => {
                *slot = (p, len);
                self.n += 1;
                true
            }
            None => false,
        }
    }

    /// The pieces.
    pub fn as_slice(&self) -> &[(*const u8, usize)] {
        self.at.get(..self.n).unwrap_or_default()
    }

    /// Copies bytes `from..from + dst.len()` of the pieces (counted from
    /// the first) into `dst`; false if they have fewer.
    ///
    /// # Safety
    /// The pieces are mapped.
    pub unsafe fn read(&self, from: usize, dst: &mut [u8]) -> bool {
        let to = dst.as_mut_ptr();
        self.spans(from, dst.len(), |p, n, at| {
            // SAFETY: `n` bytes at `p` lie in a piece (mapped, this
            // function's contract) and `dst` has room for them at `at`.
            unsafe { std::ptr::copy_nonoverlapping(p, to.add(at), n) };
            true
        })
    }

    /// Copies bytes `from..from + len` of the pieces to guest memory at
    /// `addr` through `ring`; false if they have fewer or `addr` is
    /// outside its memory.
    ///
    /// # Safety
    /// The pieces are mapped.
    pub unsafe fn write_to(&self, ring: &Ring<'_>, addr: u64, from: usize, len: usize) -> bool {
        self.spans(from, len, |p, n, at| {
            // SAFETY: `n` bytes at `p` lie in a piece, mapped (this
            // function's contract).
            addr.checked_add(at as u64)
                .is_some_and(|to| unsafe { ring.write_raw(to, p, n) })
        })
    }

    /// Hands `f` the spans of bytes `from..from + len` of the pieces, in
    /// order: where each starts, its length and its offset from `from`;
    /// true if `f` took them all and the pieces had them.
    fn spans(
        &self,
        from: usize,
        len: usize,
        mut f: impl FnMut(*const u8, usize, usize) -> bool,
    ) -> bool {
        let (mut base, mut done) = (0usize, 0usize);
        for &(p, n) in self.as_slice() {
            if done == len {
                break;
            }
            let pos = from + done;
            if pos < base + n {
                let skip = pos - base;
                let k = (n - skip).min(len - done);
                if !f(p.wrapping_add(skip), k, done) {
                    return false;
                }
                done += k;
            }
            base += n;
        }
        done == len
    }
}

/// Copies guest memory at `addr` into `dst` (one memcpy when the range
/// lies in one region); false if the guest pointed outside its memory.
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, dst: &mut [u8]) -> bool {
    use vm_memory::Bytes;
    match mem.get_slice(GuestAddress(addr), dst.len()) {
        Ok(s) => s.copy_to(dst) == dst.len(),
        Err(_) => mem.read_slice(dst, GuestAddress(addr)).is_ok(),
    }
}

/// Copies `src` to guest memory at `addr`; false if outside its memory.
pub fn write_guest(mem: &GuestMemoryMmap, addr: u64, src: &[u8]) -> bool {
    use vm_memory::Bytes;
    match mem.get_slice(GuestAddress(addr), src.len()) {
        Ok(s) => {
            s.copy_from(src);
            true
        }
        Err(_) => mem.write_slice(src, GuestAddress(addr)).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::Bytes;

    const DESC: u32 = 0x0;
    const AVAIL: u32 = 0x1000;
    const USED: u32 = 0x2000;
    const SIZE: u16 = 8;

    /// Guest memory with an 8-entry ring, ready, EVENT_IDX as asked.
    fn setup(event_idx: bool) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC), Some(0));
        q.set_avail_ring_address(Some(AVAIL), Some(0));
        q.set_used_ring_address(Some(USED), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, q)
    }

    fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = u64::from(DESC) + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    #[test]
    fn guest_copies_translate_each_region_and_refuse_the_rest() {
        // Two regions with a hole between them, and a ring in the first.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x1000),
        ])
        .unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC), Some(0));
        q.set_avail_ring_address(Some(AVAIL), Some(0));
        q.set_used_ring_address(Some(USED), Some(0));
        q.set_ready(true);
        let ring = Ring::open(&q, &mem).unwrap();
        assert!(ring.write(0x20ff0, b"second region"));
        let mut back = [0u8; 13];
        assert!(ring.read(0x20ff0, &mut back));
        assert_eq!(&back, b"second region");
        assert_eq!(
            mem.read_obj::<[u8; 6]>(GuestAddress(0x20ff0)).unwrap(),
            *b"second"
        );
        assert!(ring.write(0x8000, b"first"));
        assert_eq!(
            mem.read_obj::<[u8; 5]>(GuestAddress(0x8000)).unwrap(),
            *b"first"
        );
        // A header write lands whether the bytes differ or not.
        for header in [b"hdr-one", b"hdr-one", b"hdr-two"] {
            assert!(ring.write_if_changed(0x9000, header));
            assert_eq!(
                mem.read_obj::<[u8; 7]>(GuestAddress(0x9000)).unwrap(),
                *header
            );
        }
        // Past the end of a region, in the hole, past all memory: refused.
        assert!(!ring.write(0x20ffa, b"0123456789"));
        assert!(!ring.write_if_changed(0x20ffa, b"0123456789"));
        assert!(!ring.read(0x18000, &mut back));
        assert!(!ring.read(u64::MAX - 4, &mut back));
        ring.prefetch(u64::MAX);
    }

    /// The driver makes `heads` available.
    fn offer(mem: &GuestMemoryMmap, heads: &[u16]) {
        let avail = u64::from(AVAIL);
        let mut idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        for h in heads {
            let slot = u64::from(idx % SIZE);
            mem.write_obj(*h, GuestAddress(avail + 4 + 2 * slot))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    #[test]
    fn chains_are_taken_and_returned_in_one_index_store() {
        let (mem, mut q) = setup(false);
        desc(&mem, 0, 0x4000, 12, F_NEXT, 1);
        desc(&mem, 1, 0x5000, 60, 0, 0);
        desc(&mem, 2, 0x6000, 2048, F_WRITE, 0);
        offer(&mem, &[0, 2]);
        let mut ring = Ring::open(&q, &mem).unwrap();
        let mut descs = Vec::new();
        assert_eq!(ring.pop(&mut descs).unwrap().unwrap(), 0);
        assert_eq!(descs.len(), 2);
        assert_eq!(
            (descs[1].addr, descs[1].len, descs[1].write),
            (0x5000, 60, false)
        );
        let start = descs.len();
        assert_eq!(ring.pop(&mut descs).unwrap().unwrap(), 2);
        assert_eq!(writable_len(&descs[start..]), 2048);
        assert!(ring.pop(&mut descs).is_none());
        ring.push_used(0, 0);
        ring.push_used(2, 100);
        let idx: u16 = mem.read_obj(GuestAddress(u64::from(USED) + 2)).unwrap();
        assert_eq!(idx, 0, "not visible before publish");
        ring.publish();
        let idx: u16 = mem.read_obj(GuestAddress(u64::from(USED) + 2)).unwrap();
        assert_eq!(idx, 2);
        let (id, len): (u32, u32) = (
            mem.read_obj(GuestAddress(u64::from(USED) + 12)).unwrap(),
            mem.read_obj(GuestAddress(u64::from(USED) + 16)).unwrap(),
        );
        assert_eq!((id, len), (2, 100));
        ring.close(&mut q);
        assert_eq!((q.next_avail(), q.next_used()), (2, 2));
    }

    #[test]
    fn hostile_chains_are_errors() {
        let (mem, q) = setup(false);
        // A loop, a next index past the table, an indirect descriptor, a
        // head past the table.
        desc(&mem, 0, 0x4000, 64, F_NEXT, 0);
        desc(&mem, 1, 0x4000, 64, F_NEXT, 200);
        desc(&mem, 2, 0x4000, 64, F_INDIRECT, 0);
        offer(&mem, &[0, 1, 2, 9]);
        let mut ring = Ring::open(&q, &mem).unwrap();
        let mut descs = Vec::new();
        let got: Vec<_> = std::iter::from_fn(|| ring.pop(&mut descs)).collect();
        assert_eq!(
            got,
            vec![
                Err((0, ChainError::TooLong)),
                Err((1, ChainError::Index(200))),
                Err((2, ChainError::Indirect)),
                Err((9, ChainError::Index(9))),
            ]
        );
        assert!(descs.is_empty(), "nothing of a broken chain is kept");
    }

    #[test]
    fn an_available_index_beyond_the_ring_is_no_work() {
        let (mem, q) = setup(false);
        mem.write_obj(100u16, GuestAddress(u64::from(AVAIL) + 2))
            .unwrap();
        let mut ring = Ring::open(&q, &mem).unwrap();
        assert!(!ring.has_avail());
        assert!(ring.pop(&mut Vec::new()).is_none());
    }

    #[test]
    fn rings_outside_memory_are_refused() {
        let (mem, mut q) = setup(false);
        q.set_ready(false);
        q.set_used_ring_address(Some(0xfffc), Some(0));
        q.set_ready(true);
        assert!(Ring::open(&q, &mem).is_none(), "used ring past the end");
        let (mem, mut q) = setup(false);
        q.set_ready(false);
        assert!(Ring::open(&q, &mem).is_none(), "not ready");
    }

    #[test]
    fn signals_follow_the_drivers_used_event() {
        let (mem, q) = setup(true);
        for i in 0..4 {
            desc(&mem, i, 0x4000, 64, F_WRITE, 0);
        }
        offer(&mem, &[0, 1, 2, 3]);
        // The driver wants a signal once entry 2 (index 3) is used.
        mem.write_obj(
            2u16,
            GuestAddress(u64::from(AVAIL) + 4 + 2 * u64::from(SIZE)),
        )
        .unwrap();
        let mut ring = Ring::open(&q, &mem).unwrap();
        let mut descs = Vec::new();
        let mut since = 0u16;
        for want in [false, false, true, false] {
            let head = ring.pop(&mut descs).unwrap().unwrap();
            ring.push_used(head, 64);
            ring.publish();
            assert_eq!(ring.needs_signal(since), want, "after {head}");
            since = ring.next_used();
        }
        // Without EVENT_IDX, the NO_INTERRUPT flag decides.
        let (mem, q) = setup(false);
        desc(&mem, 0, 0x4000, 64, F_WRITE, 0);
        offer(&mem, &[0]);
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(u64::from(AVAIL)))
            .unwrap();
        let mut ring = Ring::open(&q, &mem).unwrap();
        let head = ring.pop(&mut descs).unwrap().unwrap();
        ring.push_used(head, 64);
        ring.publish();
        assert!(!ring.needs_signal(0));
    }

    /// The pieces of a frame left in guest memory are read and written
    /// across piece boundaries from any offset, never past their end, and
    /// a write outside the receiver's memory is refused.
    #[test]
    fn pieces_copy_across_their_boundaries_and_no_further() {
        let src: Vec<u8> = (0..=255u8).collect();
        let mut pieces = Pieces::EMPTY;
        // 10 + 20 + 30 bytes from three places.
        for (at, n) in [(0usize, 10usize), (100, 20), (200, 30)] {
            assert!(pieces.push(src[at..].as_ptr(), n));
        }
        assert!(pieces.push(src.as_ptr(), 1));
        assert!(!pieces.push(src.as_ptr(), 1), "four pieces at most");
        let whole: Vec<u8> = [&src[0..10], &src[100..120], &src[200..230], &src[0..1]].concat();
        for from in [0usize, 5, 10, 29, 30, 59] {
            let mut dst = vec![0u8; whole.len() - from];
            // SAFETY: the pieces point into `src`, alive.
            assert!(unsafe { pieces.read(from, &mut dst) });
            assert_eq!(dst, whole[from..], "from {from}");
        }
        let mut too_long = vec![0u8; whole.len() + 1];
        // SAFETY: as above.
        assert!(!unsafe { pieces.read(0, &mut too_long) });

        let (mem, q) = setup(false);
        let ring = Ring::open(&q, &mem).unwrap();
        // SAFETY: as above.
        assert!(unsafe { pieces.write_to(&ring, 0x8000, 7, 40) });
        let mut got = vec![0u8; 40];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, whole[7..47]);
        // Past the pieces' end, or outside the guest's memory: refused.
        // SAFETY: as above.
        assert!(!unsafe { pieces.write_to(&ring, 0x8000, 50, 20) });
        // SAFETY: as above.
        assert!(!unsafe { pieces.write_to(&ring, 0xfff0, 0, 40) });
    }
}
