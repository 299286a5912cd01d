//! qcow2 disk images: reading (import) and writing (export) of VM disk images.
//!
//! All numbers in a qcow2 file are big-endian. A file is a sequence of host clusters of
//! `1 << cluster_bits` bytes; the header sits in cluster 0, a two-level table (L1 → L2)
//! maps each guest cluster to a host cluster, and refcount tables count the users of
//! each host cluster.
//!
//! # Reading: [`Qcow2Reader`]
//!
//! Supported: versions 2 and 3; cluster sizes 512 B to 2 MiB; deflate-compressed
//! clusters; v3 zero clusters (with or without a preallocated host cluster); images with
//! the dirty or corrupt bit set (they are only read, and every entry used is checked);
//! internal snapshots and header extensions are ignored (only the active layer is read).
//! Refcounts are not consulted.
//!
//! Refused with [`Qcow2Error::Unsupported`]: backing files, encryption, external data
//! files, extended L2 entries (subclusters), compression types other than deflate,
//! unknown incompatible feature bits, cluster sizes above 2 MiB, virtual sizes above
//! [`MAX_VIRTUAL_SIZE`] or needing an L1 table larger than 32 MiB.
//!
//! The file is untrusted input and never causes a panic. Every header field is
//! range-checked, offset arithmetic cannot overflow, every L1 and L2 entry used is
//! checked for reserved bits, alignment (where the format requires it) and pointing
//! inside the file, and a compressed cluster must inflate to exactly one cluster;
//! violations are [`Qcow2Error::Corrupt`] naming the table, index and offset, found
//! when the entry is first used (`open` checks the header and the L1 table's place;
//! [`Qcow2Reader::allocated_bytes`] checks all entries without reading data).
//!
//! Memory is bounded: only the L1 entries that cover the virtual size are loaded (at
//! most 32 MiB, and only after checking they lie inside the file), plus one L2 table,
//! one cluster and one compressed cluster (at most two clusters) at a time. Running time is bounded by the virtual
//! size, not by the file size: a small hostile file may map one host cluster at every
//! guest cluster, so a 64 TiB virtual disk can yield 64 TiB of data. Callers that care
//! should bound the virtual size they accept.
//!
//! # Writing: [`Qcow2Writer`]
//!
//! Writes a version 3 image with 64 KiB clusters and 16-bit refcounts, no compression,
//! strictly sequentially: data clusters are appended in guest order, each L2 table is
//! appended as soon as the writer moves past the 512 MiB of guest space it covers, and
//! the L1 table, refcount table and refcount blocks are appended by
//! [`Qcow2Writer::finish`], which writes the header last. Until then cluster 0 is zero,
//! so an interrupted export is never mistaken for a valid image. All-zero clusters are
//! not stored. The virtual size must be a multiple of 512 (QEMU rounds sizes to whole
//! sectors). Memory use is one L2 table plus the L1 table (1 MiB for 64 TiB).

use std::fs::File;
use std::os::unix::fs::FileExt;

use flate2::{Decompress, FlushDecompress};

/// Largest virtual disk size this module reads or writes: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest L1 table loaded, in entries (32 MiB of table).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const SECTOR: u64 = 512;
/// Length of a version 2 header; version 3 headers are at least `V3_HEADER_LEN`.
const V2_HEADER_LEN: u64 = 72;
const V3_HEADER_LEN: u64 = 104;

/// L1 and L2 entries: host offset, bits 9..=55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero: 0..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero: 1..=8 and 56..=61 (bit 0 too in version 2).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Standard L2 entry, version 3: the cluster reads as zeros.
const L2_ZERO: u64 = 1;
const COMPRESSED: u64 = 1 << 62;
/// "Refcount is exactly one": set on every entry the writer makes.
const COPIED: u64 = 1 << 63;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Errors from reading or writing a qcow2 image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The file could not be read or written.
    #[error("qcow2 image I/O")]
    Io(#[from] std::io::Error),
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// A qcow2 version other than 2 and 3.
    #[error("unsupported qcow2 version {0} (2 and 3 are supported)")]
    UnsupportedVersion(u32),
    /// A valid image using a feature this module refuses.
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    /// The image violates the format; the message names the table, index and offset.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// The caller's request is invalid (misaligned, out of order, past the end).
    #[error("invalid qcow2 request: {0}")]
    InvalidArgument(String),
}

fn corrupt(msg: String) -> Qcow2Error {
    Qcow2Error::Corrupt(msg)
}

fn be32(b: &[u8; 112], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// `v` as usize; only called on values already bounded by a cluster size or table limit.
fn small(v: u64) -> Result<usize, Qcow2Error> {
    usize::try_from(v)
        .map_err(|_| Qcow2Error::Unsupported(format!("{v} exceeds the address space")))
}

/// What one L2 entry says about its guest cluster.
#[derive(Clone, Copy)]
enum Cluster {
    Unallocated,
    Zero,
    /// Host offset of an uncompressed cluster, checked to hold the guest bytes.
    Data(u64),
    /// Host offset and byte count (clipped to the file) of deflate data.
    Compressed(u64, u64),
}

/// Reads a qcow2 image (version 2 and 3). See the module documentation.
pub struct Qcow2Reader {
    file: File,
    file_len: u64,
    version: u32,
    cluster_bits: u32,
    virtual_size: u64,
    /// The L1 entries covering the virtual size (possibly fewer than `l1_size`).
    l1: Vec<u64>,
    /// Host offset of the L2 table held in `l2`.
    l2_at: Option<u64>,
    l2: Vec<u64>,
    /// Scratch: raw L2 table bytes, compressed input.
    raw: Vec<u8>,
    /// Host offset of the compressed cluster held in `inflated`.
    inflated_at: Option<u64>,
    /// One cluster plus one byte, to detect data that inflates to too much.
    inflated: Vec<u8>,
    inflater: Decompress,
}

impl std::fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field("version", &self.version)
            .field("cluster_size", &self.cluster_size())
            .field("virtual_size", &self.virtual_size)
            .field("file_len", &self.file_len)
            .finish_non_exhaustive()
    }
}

impl Qcow2Reader {
    /// Opens an image, validating its header and loading its L1 table.
    pub fn open(file: File) -> Result<Self, Qcow2Error> {
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 112];
        let have = small(file_len.min(112))?;
        file.read_exact_at(&mut h[..have], 0)?;
        if have < 4 || h[..4] != MAGIC {
            return Err(Qcow2Error::BadMagic);
        }
        let version = be32(&h, 4);
        if !(2..=3).contains(&version) {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let (header_len, min_len) = match version {
            2 => (V2_HEADER_LEN, V2_HEADER_LEN),
            _ => (u64::from(be32(&h, 100)), V3_HEADER_LEN),
        };
        let need = header_len.max(min_len);
        if file_len < need {
            return Err(corrupt(format!(
                "file is {file_len} bytes, too short for the {need}-byte version {version} header"
            )));
        }
        if version == 3 && header_len < V3_HEADER_LEN {
            return Err(corrupt(format!(
                "header_length {header_len} is below {V3_HEADER_LEN}"
            )));
        }
        let backing_offset = be64(&h, 8);
        let cluster_bits = be32(&h, 20);
        let virtual_size = be64(&h, 24);
        let crypt_method = be32(&h, 32);
        let l1_size = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);

        // Features this module refuses, before judging the layout.
        if backing_offset != 0 {
            return Err(Qcow2Error::Unsupported("image has a backing file".into()));
        }
        if crypt_method != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "encrypted image (crypt_method {crypt_method})"
            )));
        }
        if version == 3 {
            let incompat = be64(&h, 72);
            let known = INCOMPAT_DIRTY
                | INCOMPAT_CORRUPT
                | INCOMPAT_DATA_FILE
                | INCOMPAT_COMPRESSION
                | INCOMPAT_EXTENDED_L2;
            if incompat & !known != 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "unknown incompatible feature bits {:#x}",
                    incompat & !known
                )));
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return Err(Qcow2Error::Unsupported("external data file".into()));
            }
            if incompat & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(Qcow2Error::Unsupported(
                    "extended L2 entries (subclusters)".into(),
                ));
            }
            let compression = if header_len > V3_HEADER_LEN {
                h[104]
            } else {
                0
            };
            match compression {
                0 if incompat & INCOMPAT_COMPRESSION != 0 => {
                    return Err(corrupt(
                        "compression type feature bit set with the default compression type".into(),
                    ))
                }
                0 => {}
                1 => return Err(Qcow2Error::Unsupported("zstd compression".into())),
                t => return Err(Qcow2Error::Unsupported(format!("compression type {t}"))),
            }
            let refcount_order = be32(&h, 96);
            if refcount_order > 6 {
                return Err(corrupt(format!(
                    "refcount_order {refcount_order} is above 6"
                )));
            }
        }
        if cluster_bits < MIN_CLUSTER_BITS {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is below {MIN_CLUSTER_BITS}"
            )));
        }
        if cluster_bits > MAX_CLUSTER_BITS {
            return Err(Qcow2Error::Unsupported(format!(
                "cluster_bits {cluster_bits} (clusters above 2 MiB)"
            )));
        }
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Unsupported(format!(
                "virtual size {virtual_size} exceeds the {MAX_VIRTUAL_SIZE}-byte limit"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if header_len > cluster_size {
            return Err(corrupt(format!(
                "header_length {header_len} exceeds the cluster size {cluster_size}"
            )));
        }

        // The L1 table: only the entries covering the virtual size are loaded.
        let l2_entries = cluster_size / 8;
        let needed = virtual_size.div_ceil(cluster_size).div_ceil(l2_entries);
        if needed > MAX_L1_ENTRIES {
            return Err(Qcow2Error::Unsupported(format!(
                "virtual size {virtual_size} with {cluster_size}-byte clusters needs {needed} L1 \
                 entries, above the limit of {MAX_L1_ENTRIES}"
            )));
        }
        if l1_size > MAX_L1_ENTRIES {
            return Err(corrupt(format!(
                "l1_size {l1_size} exceeds the limit of {MAX_L1_ENTRIES}"
            )));
        }
        if l1_size < needed {
            return Err(corrupt(format!(
                "l1_size {l1_size} is too small for virtual size {virtual_size} (needs {needed})"
            )));
        }
        let mut l1 = Vec::new();
        if needed > 0 {
            if l1_offset == 0 || l1_offset % cluster_size != 0 {
                return Err(corrupt(format!(
                    "L1 table offset {l1_offset:#x} is not a non-zero multiple of the cluster size"
                )));
            }
            let l1_end = l1_offset.checked_add(needed * 8).filter(|&e| e <= file_len);
            if l1_end.is_none() {
                return Err(corrupt(format!(
                    "L1 table at {l1_offset:#x} ({needed} entries) extends past the end of the \
                     {file_len}-byte file"
                )));
            }
            let mut bytes = vec![0u8; small(needed * 8)?];
            file.read_exact_at(&mut bytes, l1_offset)?;
            l1 = bytes.chunks_exact(8).map(|c| be64(c, 0)).collect();
        }
        Ok(Self {
            file,
            file_len,
            version,
            cluster_bits,
            virtual_size,
            l1,
            l2_at: None,
            l2: Vec::new(),
            raw: Vec::new(),
            inflated_at: None,
            inflated: Vec::new(),
            inflater: Decompress::new(false),
        })
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size of the image in bytes (512 B to 2 MiB).
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Guest offset and guest byte count of guest cluster `index` (the last may be short).
    fn extent(&self, index: u64) -> (u64, u64) {
        let start = index << self.cluster_bits;
        (
            start,
            self.cluster_size()
                .min(self.virtual_size.saturating_sub(start)),
        )
    }

    /// Host offset of the L2 table of L1 entry `index`, if it has one.
    fn l2_table(&self, index: usize) -> Result<Option<u64>, Qcow2Error> {
        let entry = self.l1.get(index).copied().unwrap_or(0);
        if entry & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {index} ({entry:#018x}) has reserved bits set"
            )));
        }
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if offset % self.cluster_size() != 0 {
            return Err(corrupt(format!(
                "L1 entry {index}: L2 table offset {offset:#x} is not cluster-aligned"
            )));
        }
        if offset
            .checked_add(self.cluster_size())
            .is_none_or(|e| e > self.file_len)
        {
            return Err(corrupt(format!(
                "L1 entry {index}: L2 table at {offset:#x} extends past the end of the {}-byte file",
                self.file_len
            )));
        }
        Ok(Some(offset))
    }

    fn load_l2(&mut self, offset: u64) -> Result<(), Qcow2Error> {
        if self.l2_at == Some(offset) {
            return Ok(());
        }
        self.l2_at = None;
        let size = small(self.cluster_size())?;
        self.raw.resize(size, 0);
        self.file.read_exact_at(&mut self.raw[..size], offset)?;
        self.l2.clear();
        self.l2
            .extend(self.raw[..size].chunks_exact(8).map(|c| be64(c, 0)));
        self.l2_at = Some(offset);
        Ok(())
    }

    /// Decodes and checks L2 entry `l2_index` of the table of L1 entry `l1_index`, which
    /// maps guest cluster `index`.
    fn classify(
        &self,
        entry: u64,
        l1_index: usize,
        l2_index: usize,
        index: u64,
    ) -> Result<Cluster, Qcow2Error> {
        let (guest, len) = self.extent(index);
        let at = || {
            format!(
                "L2 table at {:#x} (L1 entry {l1_index}), entry {l2_index} (guest offset {guest:#x})",
                self.l2_at.unwrap_or(0)
            )
        };
        if entry & COMPRESSED != 0 {
            let offset_bits = 70 - self.cluster_bits;
            let offset = entry & ((1 << offset_bits) - 1);
            let sectors = (entry >> offset_bits) & ((1 << (self.cluster_bits - 8)) - 1);
            if offset >= self.file_len {
                return Err(corrupt(format!(
                    "{}: compressed data at {offset:#x} is past the end of the {}-byte file",
                    at(),
                    self.file_len
                )));
            }
            // Ends `sectors` sectors after the one holding `offset`; the final sector may
            // be cut short by the end of the file.
            let end = (offset - offset % SECTOR + (sectors + 1) * SECTOR).min(self.file_len);
            return Ok(Cluster::Compressed(offset, end - offset));
        }
        let reserved = if self.version == 2 {
            L2_RESERVED | L2_ZERO
        } else {
            L2_RESERVED
        };
        if entry & reserved != 0 {
            return Err(corrupt(format!(
                "{}: entry {entry:#018x} has reserved bits set",
                at()
            )));
        }
        if entry & L2_ZERO != 0 {
            return Ok(Cluster::Zero);
        }
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(Cluster::Unallocated);
        }
        if offset % self.cluster_size() != 0 {
            return Err(corrupt(format!(
                "{}: data cluster offset {offset:#x} is not cluster-aligned",
                at()
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.file_len) {
            return Err(corrupt(format!(
                "{}: data cluster at {offset:#x} extends past the end of the {}-byte file",
                at(),
                self.file_len
            )));
        }
        Ok(Cluster::Data(offset))
    }

    /// The mapping of guest cluster `index` (which must be below the virtual size).
    fn lookup(&mut self, index: u64) -> Result<Cluster, Qcow2Error> {
        let l1_index = small(index / self.l2_entries())?;
        let l2_index = small(index % self.l2_entries())?;
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(Cluster::Unallocated);
        };
        self.load_l2(table)?;
        let entry = self.l2.get(l2_index).copied().unwrap_or(0);
        self.classify(entry, l1_index, l2_index, index)
    }

    /// Calls `visit(self, guest_offset, guest_len, cluster)` for each data or compressed
    /// cluster, in guest order.
    fn walk<E: From<Qcow2Error>>(
        &mut self,
        mut visit: impl FnMut(&mut Self, u64, u64, Cluster) -> Result<(), E>,
    ) -> Result<(), E> {
        let per_table = self.l2_entries();
        let total = self.virtual_size.div_ceil(self.cluster_size());
        for l1_index in 0..self.l1.len() {
            let Some(table) = self.l2_table(l1_index)? else {
                continue;
            };
            self.load_l2(table)?;
            let first = l1_index as u64 * per_table;
            let count = small(per_table.min(total.saturating_sub(first)))?;
            for l2_index in 0..count {
                let entry = self.l2.get(l2_index).copied().unwrap_or(0);
                let index = first + l2_index as u64;
                match self.classify(entry, l1_index, l2_index, index)? {
                    Cluster::Unallocated | Cluster::Zero => {}
                    cluster => {
                        let (guest, len) = self.extent(index);
                        visit(self, guest, len, cluster)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Inflates the compressed cluster at `offset` (`len` bytes of input) into `inflated`.
    fn inflate(&mut self, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if self.inflated_at == Some(offset) {
            return Ok(());
        }
        self.inflated_at = None;
        let input = small(len)?;
        let size = small(self.cluster_size())?;
        self.raw.resize(input, 0);
        self.file.read_exact_at(&mut self.raw[..input], offset)?;
        self.inflated.resize(size + 1, 0);
        self.inflater.reset(false);
        let result = self.inflater.decompress(
            &self.raw[..input],
            &mut self.inflated,
            FlushDecompress::Finish,
        );
        let produced = self.inflater.total_out();
        let problem = match result {
            Err(e) => Some(format!("invalid deflate data ({e})")),
            Ok(_) if produced > size as u64 => Some(format!("inflates to more than {size} bytes")),
            Ok(_) if produced < size as u64 => {
                Some(format!("inflates to {produced} bytes instead of {size}"))
            }
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            return Err(corrupt(format!(
                "compressed cluster at {offset:#x} ({len} bytes): {problem}"
            )));
        }
        self.inflated_at = Some(offset);
        Ok(())
    }

    /// Reads bytes `skip..skip + out.len()` of a data or compressed cluster.
    fn read_cluster(
        &mut self,
        cluster: Cluster,
        skip: u64,
        out: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        match cluster {
            Cluster::Unallocated | Cluster::Zero => out.fill(0),
            Cluster::Data(host) => self.file.read_exact_at(out, host + skip)?,
            Cluster::Compressed(offset, len) => {
                self.inflate(offset, len)?;
                let skip = small(skip)?;
                let src = self.inflated.get(skip..skip + out.len());
                out.copy_from_slice(src.ok_or_else(|| corrupt("read beyond a cluster".into()))?);
            }
        }
        Ok(())
    }

    /// Calls `f(guest_offset, data)` for every allocated cluster in increasing guest offset
    /// order; `data` is `cluster_size` bytes except for the last cluster of a virtual
    /// size that is not a multiple of it. Unallocated and zero clusters are skipped (the
    /// caller's target must be zero-filled); compressed clusters are inflated. An error
    /// from `f` stops the walk and is returned.
    pub fn for_each_allocated<E: From<Qcow2Error>>(
        &mut self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = vec![0u8; small(self.cluster_size())?];
        self.walk(|reader, guest, len, cluster| {
            let data = &mut buf[..small(len)?];
            reader.read_cluster(cluster, 0, data)?;
            f(guest, data)
        })
    }

    /// Total guest bytes that [`Self::for_each_allocated`] delivers, from the L1 and L2
    /// tables alone (which are checked the same way).
    pub fn allocated_bytes(&mut self) -> Result<u64, Qcow2Error> {
        let mut total = 0u64;
        self.walk(|_, _, len, _| {
            total += len;
            Ok::<(), Qcow2Error>(())
        })?;
        Ok(total)
    }

    /// Reads guest bytes at `guest_offset`; unallocated and zero clusters read as zeros.
    /// Reading past the virtual size is [`Qcow2Error::InvalidArgument`].
    pub fn read_at(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        if guest_offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(Qcow2Error::InvalidArgument(format!(
                "read of {} bytes at {guest_offset:#x} exceeds the virtual size {}",
                buf.len(),
                self.virtual_size
            )));
        }
        let mut pos = guest_offset;
        let mut done = 0;
        while done < buf.len() {
            let skip = pos % self.cluster_size();
            let n = small(self.cluster_size() - skip)?.min(buf.len() - done);
            let cluster = self.lookup(pos >> self.cluster_bits)?;
            self.read_cluster(cluster, skip, &mut buf[done..done + n])?;
            done += n;
            pos += n as u64;
        }
        Ok(())
    }
}

const W_CLUSTER_BITS: u32 = 16;
const W_CLUSTER: u64 = 1 << W_CLUSTER_BITS;
const W_L2_ENTRIES: u64 = W_CLUSTER / 8;
/// 16-bit refcounts: clusters covered by one refcount block.
const W_REFCOUNTS_PER_BLOCK: u64 = W_CLUSTER / 2;

/// Writes a qcow2 v3 image, uncompressed, cluster size 64 KiB, sequentially. See the
/// module documentation for the layout.
pub struct Qcow2Writer {
    file: File,
    virtual_size: u64,
    l1: Vec<u64>,
    /// The L2 table being filled and its L1 index.
    l2: Vec<u64>,
    l2_index: Option<usize>,
    /// Next free host cluster.
    next_cluster: u64,
    /// Lowest guest offset `write_cluster` accepts next.
    next_guest: u64,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("virtual_size", &self.virtual_size)
            .field("next_guest", &self.next_guest)
            .field("clusters", &self.next_cluster)
            .finish_non_exhaustive()
    }
}

impl Qcow2Writer {
    /// Starts an image of `virtual_size` bytes (a multiple of 512, at most
    /// [`MAX_VIRTUAL_SIZE`]) in `file`, which is truncated.
    pub fn create(file: File, virtual_size: u64) -> Result<Self, Qcow2Error> {
        if virtual_size % SECTOR != 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::InvalidArgument(format!(
                "virtual size {virtual_size} must be a multiple of {SECTOR} up to {MAX_VIRTUAL_SIZE}"
            )));
        }
        file.set_len(0)?;
        let l1_len = small(virtual_size.div_ceil(W_CLUSTER).div_ceil(W_L2_ENTRIES))?;
        Ok(Self {
            file,
            virtual_size,
            l1: vec![0; l1_len],
            l2: vec![0; small(W_L2_ENTRIES)?],
            l2_index: None,
            next_cluster: 1,
            next_guest: 0,
        })
    }

    /// Writes one cluster of guest data at `guest_offset`, a multiple of 64 KiB not below
    /// the end of the previous call's cluster. `data` is at most 64 KiB and must not
    /// extend past the virtual size; a shorter `data` is zero-padded. Clusters the caller
    /// never writes read as zeros, and the writer itself skips clusters that are all
    /// zeros, so callers may pass them or not.
    pub fn write_cluster(&mut self, guest_offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        let invalid = |why: &str| {
            Qcow2Error::InvalidArgument(format!(
                "write of {} bytes at {guest_offset:#x}: {why}",
                data.len()
            ))
        };
        if guest_offset % W_CLUSTER != 0 {
            return Err(invalid("offset is not a multiple of 64 KiB"));
        }
        if data.len() as u64 > W_CLUSTER {
            return Err(invalid("more than one 64 KiB cluster"));
        }
        if guest_offset < self.next_guest {
            return Err(invalid("offsets must increase"));
        }
        if guest_offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(invalid("past the virtual size"));
        }
        self.next_guest = guest_offset + W_CLUSTER;
        if data.iter().fold(0, |acc, &b| acc | b) == 0 {
            return Ok(());
        }
        let index = guest_offset / W_CLUSTER;
        let l1_index = small(index / W_L2_ENTRIES)?;
        if self.l2_index != Some(l1_index) {
            self.flush_l2()?;
            self.l2_index = Some(l1_index);
        }
        let host = self.next_cluster * W_CLUSTER;
        self.file.write_all_at(data, host)?;
        self.next_cluster += 1;
        if let Some(entry) = self.l2.get_mut(small(index % W_L2_ENTRIES)?) {
            *entry = host | COPIED;
        }
        Ok(())
    }

    /// Appends `clusters` whole clusters holding `bytes` (zero-padded).
    fn append(&mut self, bytes: &[u8], clusters: u64) -> Result<u64, Qcow2Error> {
        let at = self.next_cluster * W_CLUSTER;
        let mut padded = bytes.to_vec();
        padded.resize(small(clusters * W_CLUSTER)?, 0);
        self.file.write_all_at(&padded, at)?;
        self.next_cluster += clusters;
        Ok(at)
    }

    /// Appends the L2 table being filled, if any, and points its L1 entry at it.
    fn flush_l2(&mut self) -> Result<(), Qcow2Error> {
        let Some(l1_index) = self.l2_index.take() else {
            return Ok(());
        };
        let bytes: Vec<u8> = self.l2.iter().flat_map(|e| e.to_be_bytes()).collect();
        let at = self.append(&bytes, 1)?;
        if let Some(entry) = self.l1.get_mut(l1_index) {
            *entry = at | COPIED;
        }
        self.l2.fill(0);
        Ok(())
    }

    /// Appends the last L2 table, the L1 table, the refcount table and blocks (every
    /// cluster of the file is used exactly once), then writes the header and fsyncs.
    pub fn finish(mut self) -> Result<(), Qcow2Error> {
        self.flush_l2()?;
        let l1_bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_offset = if self.l1.is_empty() {
            0
        } else {
            self.append(&l1_bytes, (l1_bytes.len() as u64).div_ceil(W_CLUSTER))?
        };

        // Refcount table and blocks must also cover themselves: iterate to a fixed point.
        let used = self.next_cluster;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let new_blocks = (used + blocks + table).div_ceil(W_REFCOUNTS_PER_BLOCK);
            let new_table = (new_blocks * 8).div_ceil(W_CLUSTER);
            if (new_blocks, new_table) == (blocks, table) {
                break;
            }
            (blocks, table) = (new_blocks, new_table);
        }
        let total = used + blocks + table;
        let table_offset = self.next_cluster * W_CLUSTER;
        let first_block = table_offset + table * W_CLUSTER;
        let entries: Vec<u8> = (0..blocks)
            .flat_map(|b| (first_block + b * W_CLUSTER).to_be_bytes())
            .collect();
        self.append(&entries, table)?;
        for block in 0..blocks {
            let counted = (total - block * W_REFCOUNTS_PER_BLOCK).min(W_REFCOUNTS_PER_BLOCK);
            let refcounts: Vec<u8> = (0..counted).flat_map(|_| 1u16.to_be_bytes()).collect();
            self.append(&refcounts, 1)?;
        }
        self.file.set_len(total * W_CLUSTER)?;
        self.file.sync_data()?;

        let mut h = [0u8; 112]; // the last 8 bytes: end of header extensions
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &MAGIC);
        put(4, &3u32.to_be_bytes());
        put(20, &W_CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(
            36,
            &u32::try_from(self.l1.len())
                .map_err(|_| invalid_size())?
                .to_be_bytes(),
        );
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(
            56,
            &u32::try_from(table)
                .map_err(|_| invalid_size())?
                .to_be_bytes(),
        );
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
        put(
            100,
            &u32::try_from(V3_HEADER_LEN)
                .map_err(|_| invalid_size())?
                .to_be_bytes(),
        );
        self.file.write_all_at(&h, 0)?;
        self.file.sync_all()?;
        Ok(())
    }
}

fn invalid_size() -> Qcow2Error {
    Qcow2Error::InvalidArgument("image too large".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `tool` runs; the tests that need it are skipped (loudly) otherwise.
    fn have(tool: &str) -> bool {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: {tool} is not installed");
        }
        ok
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A recognisable non-zero byte for guest position `pos`.
    fn pattern(pos: u64) -> u8 {
        (pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56).to_be_bytes()[7] | 1
    }

    /// A raw file of `size` bytes holding `pattern` in `regions` and zeros elsewhere.
    fn make_raw(dir: &Path, name: &str, size: u64, regions: &[(u64, u64)]) -> (PathBuf, Vec<u8>) {
        let mut data = vec![0u8; usize::try_from(size).unwrap()];
        for &(start, len) in regions {
            for pos in start..start + len {
                data[usize::try_from(pos).unwrap()] = pattern(pos);
            }
        }
        let path = dir.join(name);
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    fn open(path: &Path) -> Result<Qcow2Reader, Qcow2Error> {
        Qcow2Reader::open(File::open(path).unwrap())
    }

    fn open_err(path: &Path) -> Qcow2Error {
        match open(path) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e,
        }
    }

    /// Reads a whole image through `for_each_allocated`, checking the callback contract.
    fn read_all(path: &Path) -> Vec<u8> {
        let mut r = open(path).unwrap();
        let (size, cs) = (r.virtual_size(), r.cluster_size());
        let mut out = vec![0u8; usize::try_from(size).unwrap()];
        let mut next = 0;
        let mut delivered = 0;
        r.for_each_allocated(|off, data| {
            assert!(off >= next && off % cs == 0, "offset {off:#x}");
            assert_eq!(data.len() as u64, cs.min(size - off));
            let at = usize::try_from(off).unwrap();
            out[at..at + data.len()].copy_from_slice(data);
            next = off + cs;
            delivered += data.len() as u64;
            Ok::<(), Qcow2Error>(())
        })
        .unwrap();
        assert_eq!(r.allocated_bytes().unwrap(), delivered);
        out
    }

    /// 3 MiB + 2560 bytes: not a multiple of 4 KiB, 64 KiB or 2 MiB.
    const SIZE: u64 = (3 << 20) + 2560;
    const REGIONS: &[(u64, u64)] = &[
        (0, 4096),
        (3 * 65536 + 100, 70_000),
        ((1 << 20) + 1, 1),
        ((2 << 20) - 10, 20),
        (SIZE - 1000, 1000),
    ];

    fn check_convert(opts: &[&str]) {
        if !have("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (raw, data) = make_raw(dir.path(), "src.raw", SIZE, REGIONS);
        let img = dir.path().join("img.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw), s(&img)]);
        run("qemu-img", &args);
        assert_eq!(read_all(&img), data, "qemu-img {opts:?}");
        // Random access across cluster boundaries and region edges.
        let mut r = open(&img).unwrap();
        for &(start, len) in REGIONS {
            let from = start.saturating_sub(700);
            let to = (start + len + 700).min(SIZE);
            let mut buf = vec![0xaa; usize::try_from(to - from).unwrap()];
            r.read_at(from, &mut buf).unwrap();
            assert_eq!(
                buf[..],
                data[usize::try_from(from).unwrap()..usize::try_from(to).unwrap()]
            );
        }
        assert!(matches!(
            r.read_at(SIZE - 1, &mut [0; 2]),
            Err(Qcow2Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn reads_default() {
        check_convert(&[]);
    }

    #[test]
    fn reads_compressed() {
        check_convert(&["-c"]);
        check_convert(&["-c", "-o", "cluster_size=4096"]);
        check_convert(&["-c", "-o", "cluster_size=2M"]);
    }

    #[test]
    fn reads_v2() {
        check_convert(&["-o", "compat=0.10"]);
        check_convert(&["-c", "-o", "compat=0.10"]);
    }

    #[test]
    fn reads_cluster_sizes() {
        check_convert(&["-o", "cluster_size=512"]);
        check_convert(&["-o", "cluster_size=4096"]);
        check_convert(&["-o", "cluster_size=2M"]);
    }

    #[test]
    fn reads_empty() {
        if !have("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "10M"]);
        let mut r = open(&img).unwrap();
        assert_eq!((r.virtual_size(), r.cluster_size()), (10 << 20, 65536));
        assert_eq!(r.allocated_bytes().unwrap(), 0);
        r.for_each_allocated(|_, _| -> Result<(), Qcow2Error> { panic!("data in an empty image") })
            .unwrap();
        let mut buf = [1u8; 4096];
        r.read_at(5 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_zero_clusters_and_partial_writes() {
        if !have("qemu-img") || !have("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (raw, mut data) = make_raw(dir.path(), "src.raw", SIZE, &[(0, SIZE)]);
        let img = dir.path().join("z.qcow2");
        run(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)],
        );
        let before = open(&img).unwrap().allocated_bytes().unwrap();
        // Zero flag with and without a host cluster, and a partial-cluster zero write.
        let zeroed = [
            (0, 65536),
            (1 << 20, 131_072),
            (2 << 20, 65536),
            (300_000, 1000),
        ];
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -z 0 64k",
                "-c",
                "write -z 1M 128k",
                "-c",
                "write -z -u 2M 64k",
                "-c",
                "write -z 300000 1000",
                s(&img),
            ],
        );
        for (start, len) in zeroed {
            data[start..start + len].fill(0);
        }
        assert_eq!(read_all(&img), data);
        assert_eq!(
            open(&img).unwrap().allocated_bytes().unwrap(),
            before - 4 * 65536
        );

        // Partial-cluster writes into a fresh image, including its last cluster.
        let img = dir.path().join("p.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", s(&img), &SIZE.to_string()],
        );
        let last = SIZE - 512;
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 512 512",
                "-c",
                &format!("write -P 0x33 {last} 512"),
                s(&img),
            ],
        );
        let mut want = vec![0u8; usize::try_from(SIZE).unwrap()];
        want[512..1024].fill(0x11);
        want[usize::try_from(last).unwrap()..].fill(0x33);
        assert_eq!(read_all(&img), want);
    }

    /// Writes `raw` (a file of `size` bytes) through Qcow2Writer, passing the clusters
    /// touched by `regions` plus every seventh cluster (mostly zeros).
    fn write_image(raw: &Path, img: &Path, size: u64, regions: &[(u64, u64)]) -> u64 {
        let src = File::open(raw).unwrap();
        let mut w = Qcow2Writer::create(File::create(img).unwrap(), size).unwrap();
        let mut clusters: Vec<u64> = regions
            .iter()
            .flat_map(|&(start, len)| start / W_CLUSTER..(start + len).div_ceil(W_CLUSTER))
            .chain((0..size.div_ceil(W_CLUSTER)).step_by(7).take(50))
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        let mut stored = 0;
        for c in clusters {
            let off = c * W_CLUSTER;
            let mut buf = vec![0u8; usize::try_from(W_CLUSTER.min(size - off)).unwrap()];
            src.read_exact_at(&mut buf, off).unwrap();
            if buf.iter().any(|&b| b != 0) {
                stored += buf.len() as u64;
            }
            w.write_cluster(off, &buf).unwrap();
        }
        w.finish().unwrap();
        stored
    }

    /// `qemu-img compare` finds the qcow2 `img` equal to the raw `raw` (skipped without qemu-img).
    fn qemu_compare(raw: &Path, img: &Path) {
        if have("qemu-img") {
            run(
                "qemu-img",
                &["compare", "-q", "-f", "raw", "-F", "qcow2", s(raw), s(img)],
            );
        }
    }

    /// `qemu-img check` finds no error and no leak (skipped without qemu-img).
    fn qemu_check(img: &Path) {
        if !have("qemu-img") {
            return;
        }
        let out = run("qemu-img", &["check", "-f", "qcow2", s(img)]);
        assert!(out.contains("No errors were found"), "{out}");
    }

    #[test]
    fn writer_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let size = (5 << 20) + 1536;
        let regions = [
            (0, 10),
            (65536 * 5 - 3, 6),
            (1 << 20, 200_000),
            (size - 700, 700),
        ];
        let (raw, data) = make_raw(dir.path(), "src.raw", size, &regions);
        let img = dir.path().join("out.qcow2");
        let stored = write_image(&raw, &img, size, &regions);
        qemu_check(&img);
        qemu_compare(&raw, &img);
        assert_eq!(read_all(&img), data);
        let mut r = open(&img).unwrap();
        assert_eq!((r.virtual_size(), r.cluster_size()), (size, W_CLUSTER));
        assert_eq!(r.allocated_bytes().unwrap(), stored);
    }

    #[test]
    fn writer_multiple_l2_tables() {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = (1 << 30) + 65536 + 512;
        let regions = [(5, 5), ((512 << 20) - 100, 200), (1 << 30, 66_000)];
        let raw = dir.path().join("big.raw");
        let f = File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        for &(start, len) in &regions {
            let bytes: Vec<u8> = (start..start + len).map(pattern).collect();
            f.write_all_at(&bytes, start).unwrap();
        }
        let img = dir.path().join("big.qcow2");
        let stored = write_image(&raw, &img, size, &regions);
        qemu_check(&img);
        qemu_compare(&raw, &img);
        let mut r = open(&img).unwrap();
        assert_eq!(r.allocated_bytes().unwrap(), stored);
        let f = File::open(&raw).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut count = 0;
        r.for_each_allocated(|off, d| {
            f.read_exact_at(&mut buf[..d.len()], off).unwrap();
            assert_eq!(d, &buf[..d.len()]);
            count += 1;
            Ok::<(), Qcow2Error>(())
        })
        .unwrap();
        assert_eq!(count, 5);
    }

    #[test]
    fn writer_small_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0u64, 512, 65536] {
            let img = dir.path().join(format!("{size}.qcow2"));
            let mut w = Qcow2Writer::create(File::create(&img).unwrap(), size).unwrap();
            if size > 0 {
                w.write_cluster(0, &[7u8; 512]).unwrap();
            }
            w.finish().unwrap();
            qemu_check(&img);
            let data = read_all(&img);
            assert_eq!(data.len() as u64, size);
            assert!(data.iter().take(512).all(|&b| b == 7));
            assert!(data.iter().skip(512).all(|&b| b == 0));
        }
    }

    #[test]
    fn writer_rejects_bad_calls() {
        let dir = tempfile::tempdir().unwrap();
        let file = || File::create(dir.path().join("w.qcow2")).unwrap();
        assert!(matches!(
            Qcow2Writer::create(file(), 1000),
            Err(Qcow2Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Qcow2Writer::create(file(), MAX_VIRTUAL_SIZE + 512),
            Err(Qcow2Error::InvalidArgument(_))
        ));
        let mut w = Qcow2Writer::create(file(), 4 * W_CLUSTER - 512).unwrap();
        let bad =
            |r: Result<(), Qcow2Error>| assert!(matches!(r, Err(Qcow2Error::InvalidArgument(_))));
        bad(w.write_cluster(512, &[1]));
        bad(w.write_cluster(0, &vec![1; 65537]));
        bad(w.write_cluster(3 * W_CLUSTER, &vec![1; 65536]));
        bad(w.write_cluster(4 * W_CLUSTER, &[1]));
        w.write_cluster(W_CLUSTER, &[1]).unwrap();
        bad(w.write_cluster(W_CLUSTER, &[1]));
        bad(w.write_cluster(0, &[1]));
        w.write_cluster(3 * W_CLUSTER, &[2; 65024]).unwrap();
        w.finish().unwrap();
    }

    // ---- hostile images ----

    fn patch(path: &Path, at: u64, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    }

    fn be_at(path: &Path, at: u64) -> u64 {
        let mut b = [0u8; 8];
        File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    }

    /// A valid image (4 KiB clusters, 128 KiB) with data in its first cluster.
    fn small_image(dir: &Path, name: &str, opts: &[&str]) -> (PathBuf, Vec<u8>) {
        let (raw, data) = make_raw(
            dir,
            &format!("{name}.raw"),
            128 << 10,
            &[(0, 5000), (70_000, 9000)],
        );
        let img = dir.join(name);
        let mut args = vec![
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
        ];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw), s(&img)]);
        run("qemu-img", &args);
        (img, data)
    }

    fn copy(dir: &Path, from: &Path, name: &str) -> PathBuf {
        let to = dir.join(name);
        std::fs::copy(from, &to).unwrap();
        to
    }

    fn walk_err(path: &Path) -> Qcow2Error {
        let mut r = open(path).unwrap();
        let e = r
            .for_each_allocated(|_, _| Ok::<(), Qcow2Error>(()))
            .unwrap_err();
        assert!(
            r.allocated_bytes().is_err()
                || matches!(e, Qcow2Error::Corrupt(ref m) if m.contains("compressed"))
        );
        e
    }

    #[test]
    fn hostile_headers() {
        if !have("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (base, _) = small_image(d, "base.qcow2", &[]);
        let corrupt = |e: Qcow2Error| assert!(matches!(e, Qcow2Error::Corrupt(_)), "{e:?}");
        let unsupported = |e: Qcow2Error| assert!(matches!(e, Qcow2Error::Unsupported(_)), "{e:?}");

        let p = d.join("text");
        std::fs::write(&p, b"this is not a disk image at all, just some text").unwrap();
        assert!(matches!(open_err(&p), Qcow2Error::BadMagic));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(open_err(&p), Qcow2Error::BadMagic));

        for v in [0u32, 1, 4] {
            let p = copy(d, &base, "v.qcow2");
            patch(&p, 4, &v.to_be_bytes());
            assert!(matches!(open_err(&p), Qcow2Error::UnsupportedVersion(x) if x == v));
        }
        for len in [50, 80] {
            let p = d.join("trunc.qcow2");
            std::fs::write(&p, &std::fs::read(&base).unwrap()[..len]).unwrap();
            corrupt(open_err(&p));
        }
        let field = |at: u64, bytes: &[u8], check: &dyn Fn(Qcow2Error)| {
            let p = copy(d, &base, "f.qcow2");
            patch(&p, at, bytes);
            check(open_err(&p));
        };
        field(36, &u32::MAX.to_be_bytes(), &corrupt); // l1_size huge
        field(36, &0u32.to_be_bytes(), &corrupt); // l1_size too small
        field(40, &(1u64 << 40).to_be_bytes(), &corrupt); // L1 outside the file
        field(40, &(be_at(&base, 40) + 8).to_be_bytes(), &corrupt); // L1 unaligned
        field(20, &8u32.to_be_bytes(), &corrupt); // cluster_bits
        field(20, &22u32.to_be_bytes(), &unsupported);
        field(24, &(1u64 << 50).to_be_bytes(), &unsupported); // virtual size
        field(24, &(1u64 << 40).to_be_bytes(), &corrupt); // l1_size no longer enough
        field(8, &4096u64.to_be_bytes(), &unsupported); // backing file
        field(32, &1u32.to_be_bytes(), &unsupported); // AES
        field(32, &2u32.to_be_bytes(), &unsupported); // LUKS
        field(72, &(1u64 << 20).to_be_bytes(), &unsupported); // unknown incompatible bit
        field(72, &INCOMPAT_DATA_FILE.to_be_bytes(), &unsupported);
        field(72, &INCOMPAT_EXTENDED_L2.to_be_bytes(), &unsupported);
        field(72, &INCOMPAT_COMPRESSION.to_be_bytes(), &corrupt); // but compression type 0
        field(100, &64u32.to_be_bytes(), &corrupt); // header_length
        field(100, &(1u32 << 20).to_be_bytes(), &corrupt);
        // The dirty and corrupt bits alone do not stop reading.
        let p = copy(d, &base, "dirty.qcow2");
        patch(&p, 72, &(INCOMPAT_DIRTY | INCOMPAT_CORRUPT).to_be_bytes());
        read_all(&p);

        // Real images using refused features.
        let over = d.join("over.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&base),
                "-F",
                "qcow2",
                s(&over),
            ],
        );
        unsupported(open_err(&over));
        for (name, opt) in [
            ("ext.qcow2", format!("data_file={}", s(&d.join("ext.raw")))),
            ("sub.qcow2", "extended_l2=on".to_string()),
            ("zstd.qcow2", "compression_type=zstd".to_string()),
        ] {
            let p = d.join(name);
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &opt, s(&p), "1M"],
            );
            unsupported(open_err(&p));
        }
    }

    #[test]
    fn hostile_tables() {
        if !have("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (base, _) = small_image(d, "base.qcow2", &[]);
        let l1 = be_at(&base, 40);
        let l2 = be_at(&base, l1) & OFFSET_MASK;
        let len = std::fs::metadata(&base).unwrap().len();
        let corrupt = |e: Qcow2Error| assert!(matches!(e, Qcow2Error::Corrupt(_)), "{e:?}");

        let p = copy(d, &base, "eof.qcow2"); // L2 entry past EOF
        patch(&p, l2, &((len + 40960) | COPIED).to_be_bytes());
        corrupt(walk_err(&p));
        corrupt(open(&p).unwrap().read_at(0, &mut [0; 16]).unwrap_err());
        let p = copy(d, &base, "unal.qcow2"); // unaligned data cluster
        patch(&p, l2, &((be_at(&base, l2) + 512) | COPIED).to_be_bytes());
        corrupt(walk_err(&p));
        let p = copy(d, &base, "res2.qcow2"); // reserved L2 bits
        patch(&p, l2, &(be_at(&base, l2) | 2).to_be_bytes());
        corrupt(walk_err(&p));
        let p = copy(d, &base, "l2unal.qcow2"); // unaligned L2 table
        patch(&p, l1, &((l2 + 512) | COPIED).to_be_bytes());
        corrupt(walk_err(&p));
        let p = copy(d, &base, "l2eof.qcow2"); // L2 table past EOF
        patch(&p, l1, &((len + 4096 * 8) | COPIED).to_be_bytes());
        corrupt(walk_err(&p));
        let p = copy(d, &base, "res1.qcow2"); // reserved L1 bits
        patch(&p, l1, &(be_at(&base, l1) | 1).to_be_bytes());
        corrupt(walk_err(&p));
    }

    #[test]
    fn hostile_compressed() {
        if !have("qemu-img") {
            return;
        }
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (base, _) = small_image(d, "c.qcow2", &["-c"]);
        let l2 = be_at(&base, be_at(&base, 40)) & OFFSET_MASK;
        let entry = be_at(&base, l2);
        assert!(entry & COMPRESSED != 0);
        let offset = entry & ((1 << (70 - 12)) - 1);
        let corrupt_compressed = |p: &Path| {
            let e = walk_err(p);
            assert!(
                matches!(e, Qcow2Error::Corrupt(ref m) if m.contains("compressed")),
                "{e:?}"
            );
        };

        let p = copy(d, &base, "garbage.qcow2");
        patch(&p, offset, &[0xff; 64]);
        corrupt_compressed(&p);
        for n in [100usize, 4097] {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&vec![9u8; n]).unwrap();
            let p = copy(d, &base, "len.qcow2");
            patch(&p, offset, &enc.finish().unwrap());
            corrupt_compressed(&p);
        }
        let p = copy(d, &base, "off.qcow2"); // compressed data past EOF
        patch(&p, l2, &(COMPRESSED | (1 << 40)).to_be_bytes());
        assert!(matches!(walk_err(&p), Qcow2Error::Corrupt(_)));
    }

    /// Flips bytes of valid images at seeded pseudo-random places, a third of them in the
    /// header, a third in the L1 and L2 entries in use, a third anywhere in the first six
    /// clusters; opening and reading must fail cleanly or succeed, never panic.
    #[test]
    fn mutations_never_panic() {
        if !have("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let target = d.join("m.qcow2");
        let (mut opened, mut failed) = (0, 0);
        for opts in [&[][..], &["-c"][..], &["-o", "compat=0.10"][..]] {
            let (base, _) = small_image(d, "b.qcow2", opts);
            let bytes = std::fs::read(&base).unwrap();
            // Header, the L1 entry and the 32 L2 entries in use, the first six clusters.
            let l1 = be_at(&base, 40);
            let l2 = be_at(&base, l1) & OFFSET_MASK;
            let any = (0, bytes.len().min(6 * 4096) as u64);
            let hot = [(0, 112), (0, 112), (l1, 8), (l2, 32 * 8), any, any];
            for _ in 0..1000 {
                let mut m = bytes.clone();
                for _ in 0..=rand() % 4 {
                    let (start, len) = hot[usize::try_from(rand() % 6).unwrap()];
                    let at = usize::try_from(start + rand() % len).unwrap();
                    m[at] ^= rand().to_be_bytes()[0] | 1;
                }
                std::fs::write(&target, &m).unwrap();
                let Ok(mut r) = open(&target) else {
                    failed += 1;
                    continue;
                };
                opened += 1;
                let _ = r.allocated_bytes();
                let mut budget = 64u64 << 20;
                let walk = r.for_each_allocated(|_, data| {
                    budget = budget
                        .checked_sub(data.len() as u64)
                        .ok_or(Qcow2Error::InvalidArgument("enough".into()))?;
                    Ok::<(), Qcow2Error>(())
                });
                failed += u32::from(walk.is_err());
                let size = r.virtual_size();
                let mut buf = vec![0u8; 10_000];
                for at in [0, size / 2, size.saturating_sub(10_000)] {
                    let n = usize::try_from(size.saturating_sub(at).min(10_000)).unwrap();
                    let _ = r.read_at(at, &mut buf[..n]);
                }
            }
        }
        eprintln!("mutations: {opened} opened, {failed} rejected at open or while reading");
        assert!(
            opened > 300 && failed > 300,
            "mutations too mild or too harsh"
        );
    }
}
