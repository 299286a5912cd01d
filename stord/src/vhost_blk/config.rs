//! The virtio-blk configuration space (virtio 1.2 §5.2.4), laid out by hand in
//! little-endian so no `unsafe` transmute is needed.

/// Maximum segments per request we advertise (`seg_max`).
pub const SEG_MAX: u32 = 126;
/// Longest discard or write-zeroes range, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
/// Segments per discard/write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Values the backend publishes in the device's configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
}

impl BlkConfig {
    /// The 60-byte configuration structure.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(60);
        b.extend_from_slice(&self.capacity_sectors.to_le_bytes()); // capacity
        b.extend_from_slice(&0u32.to_le_bytes()); // size_max (F_SIZE_MAX not offered)
        b.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        b.extend_from_slice(&[0, 0, 0, 0]); // geometry: cylinders u16, heads, sectors
        b.extend_from_slice(&self.blk_size.to_le_bytes()); // blk_size
        b.extend_from_slice(&[0, 0]); // physical_block_exp, alignment_offset
        b.extend_from_slice(&0u16.to_le_bytes()); // min_io_size
        b.extend_from_slice(&0u32.to_le_bytes()); // opt_io_size
        b.extend_from_slice(&[0, 0]); // writeback, unused0
        b.extend_from_slice(&self.num_queues.to_le_bytes()); // num_queues
        b.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        b.extend_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        b.extend_from_slice(&(self.blk_size / 512).to_le_bytes()); // discard_sector_alignment
        b.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        b.extend_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        b.extend_from_slice(&[1, 0, 0, 0]); // write_zeroes_may_unmap, unused1[3]
        b
    }

    /// `size` bytes from `offset`, or nothing when the range is outside the structure
    /// (the frontend then sees an error instead of made-up bytes).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        bytes
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_virtio_spec() {
        let c = BlkConfig {
            capacity_sectors: 0x0102_0304,
            blk_size: 4096,
            num_queues: 3,
        };
        let b = c.to_bytes();
        assert_eq!(b.len(), 60);
        assert_eq!(&b[0..8], &0x0102_0304u64.to_le_bytes());
        assert_eq!(&b[12..16], &SEG_MAX.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(&b[34..36], &3u16.to_le_bytes());
        assert_eq!(b[56], 1);
        assert_eq!(c.read(0, 8), b[0..8].to_vec());
        assert!(c.read(58, 8).is_empty(), "reads past the end must fail");
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }
}
