//! Entry points for the fuzz targets in `vmm/fuzz` (and the quick in-tree run
//! of the same code in `cargo test`): guest-controlled bytes into the
//! virtqueue walker and device request parsers, and into PCI configuration
//! space.
#![doc(hidden)]
// Ring addresses are built from fuzzer bytes and fit 32 bits by construction.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::FromRawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::pci::config::{Bar, Ids, PciConfig};
use crate::virtio::block::Server;
use crate::virtio::worker::drain;

const MEM: usize = 64 << 10;

fn media_file() -> Option<std::fs::File> {
    // SAFETY: the name is a valid C string; the fd is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-media".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned here.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(1 << 20).ok()?;
    Some(f)
}

/// Guest memory filled with `data`, one queue whose geometry also comes from
/// `data`, served by the read-only block server and the rng.
pub fn virtqueue(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let b = |i: usize| u64::from(data.get(i).copied().unwrap_or(0));
    let size = 1u16 << (b(0) % 9);
    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(size);
    // Ring addresses mostly inside memory, sometimes not.
    let desc = (b(1) << 8 | b(2)) * 16;
    let avail = (b(3) << 8 | b(4)) * 2;
    let used = (b(5) << 8 | b(6)) * 4;
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_event_idx(b(7) & 1 == 1);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let Some(file) = media_file() else { return };
    let mut server = Server::new(file, "fuzz".into(), 1 << 20);
    let _ = drain(&mut q, 0, &mem, &mut server);
    let mut rng = crate::virtio::rng::fuzz_handler();
    let _ = drain(&mut q, 0, &mem, &mut rng);
}

/// A sequence of configuration reads and writes (offset, length, value)
/// against a function with a 64-bit BAR and two capabilities.
pub fn pci_config(data: &[u8]) {
    let mut c = PciConfig::new(Ids {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: 0x01_80_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    });
    c.add_bar(
        0,
        Bar {
            addr: 0xc000_0000,
            size: 0x1_0000,
            is_64: true,
        },
    );
    c.add_capability(0x09, &[16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x3c, 0, 0, 0], &[]);
    c.add_capability(0x11, &[1, 0, 0, 0x80, 0, 0, 0, 0xc0, 0, 0], &[0, 0xc0]);
    for op in data.chunks(6) {
        let [at, len, v0, v1, v2, v3] = <[u8; 6]>::try_from(op).unwrap_or([0; 6]);
        let len = [1usize, 2, 4][usize::from(len % 3)];
        let at = usize::from(at) & !(len - 1);
        if at + len > 256 {
            continue;
        }
        if v0 & 1 == 0 {
            let mut out = [0u8; 4];
            c.read(at, &mut out[..len]);
        } else if let Some(m) = c.write(at, &[v0, v1, v2, v3][..len]) {
            assert!(m.new % 0x1_0000 == 0, "BARs stay aligned to their size");
        }
    }
    let b = c.bar(0).map_or(0, |b| b.addr);
    assert_eq!(b % 0x1_0000, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(n: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n).map(move |_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
    }

    #[test]
    fn virtqueue_parsers_take_random_memory() {
        for mut d in inputs(300, 16 << 10) {
            // Keep the rings inside the first pages often enough to walk chains.
            d[1] = 0;
            d[3] &= 0x1;
            d[5] &= 0x1;
            virtqueue(&d);
        }
    }

    #[test]
    fn pci_config_takes_random_accesses() {
        for d in inputs(2000, 600) {
            pci_config(&d);
        }
    }
}
