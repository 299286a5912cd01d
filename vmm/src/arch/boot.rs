//! Direct kernel boot: loads the kernel, initrd and command line into guest
//! memory and writes the structures its boot protocol reads (Linux zero page
//! with an e820 map, or the PVH start info with a memory map), plus an MP table
//! so the guest finds every vCPU and the IOAPIC without ACPI.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;
use super::regs::EntryMode;
use crate::config::BootConfig;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file could not be opened or read.
    #[error("cannot read {}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("{} is not a bootable kernel (ELF: {elf}; bzImage: {bzimage})", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// The initrd does not fit in guest memory below the limit the kernel allows.
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is too long or has characters the kernel cannot take.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure into guest memory failed (memory too small).
    #[error("guest memory is too small for the boot structures")]
    Memory,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// CPU mode at entry.
    pub mode: EntryMode,
    /// Entry point.
    pub rip: u64,
    /// Zero page (long mode) or PVH start info address.
    pub boot_info: u64,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::File {
        path: path.into(),
        source,
    }
}

fn mem_err<E>(_: E) -> BootError {
    BootError::Memory
}

/// Loads `boot` into `mem` (of `mem_size` bytes) for `vcpus` vCPUs.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    boot: &BootConfig,
    vcpus: u8,
    rsdp: Option<u64>,
) -> Result<Entry, BootError> {
    let path = &boot.kernel;
    let mut kernel = File::open(path).map_err(file_err(path))?;
    let himem = Some(GuestAddress(layout::HIMEM));
    let (loaded, kind) = match Elf::load(mem, None, &mut kernel, himem) {
        Ok(r) => {
            let kind = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Kind::Pvh(a.raw_value()),
                _ => Kind::Elf64,
            };
            (r, kind)
        }
        Err(elf) => match BzImage::load(mem, None, &mut kernel, himem) {
            Ok(r) => (r, Kind::BzImage),
            Err(bzimage) => {
                return Err(BootError::Format {
                    path: path.clone(),
                    elf,
                    bzimage,
                })
            }
        },
    };

    let low_end = mem_size.min(layout::MMIO32_START);
    let cmdline_cap = loaded
        .setup_header
        .map_or(layout::CMDLINE_MAX, |h| {
            (h.cmdline_size as usize + 1).min(layout::CMDLINE_MAX)
        })
        .max(2);
    let cmdline = Cmdline::try_from(boot.cmdline.as_str(), cmdline_cap)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = boot.cmdline.len() as u64;

    let initrd = match &boot.initrd {
        Some(p) => Some(load_initrd(mem, p, &loaded, low_end)?),
        None => None,
    };
    write_mptable(mem, vcpus)?;
    let ram = e820(mem_size);

    match kind {
        Kind::Pvh(rip) => {
            write_pvh_info(mem, initrd, &ram, rsdp)?;
            Ok(Entry {
                mode: EntryMode::Protected32,
                rip,
                boot_info: layout::PVH_INFO,
            })
        }
        Kind::Elf64 | Kind::BzImage => {
            let mut params = boot_params::default();
            if let Some(h) = loaded.setup_header {
                params.hdr = h;
            } else {
                params.hdr.boot_flag = 0xaa55;
                params.hdr.header = 0x5372_6448; // "HdrS"
                params.hdr.kernel_alignment = 0x0100_0000;
            }
            params.hdr.type_of_loader = 0xff;
            params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&ram) {
                *slot = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *kind,
                };
            }
            params.e820_entries = ram.len() as u8;
            params.acpi_rsdp_addr = rsdp.unwrap_or(0);
            mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
                .map_err(mem_err)?;
            let rip = match kind {
                // startup_64 sits 0x200 into the protected-mode kernel.
                Kind::BzImage => loaded.kernel_load.raw_value() + 0x200,
                _ => loaded.kernel_load.raw_value(),
            };
            Ok(Entry {
                mode: EntryMode::Long,
                rip,
                boot_info: layout::ZERO_PAGE,
            })
        }
    }
}

enum Kind {
    Pvh(u64),
    Elf64,
    BzImage,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The memory map: low RAM, the EBDA/BIOS hole, RAM from 1 MiB.
fn e820(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA, E820_RAM),
        (layout::EBDA, layout::HIMEM - layout::EBDA, E820_RESERVED),
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (layout::HIMEM, len - layout::HIMEM)
        } else {
            (start, len)
        };
        map.push((start, len, E820_RAM));
    }
    map
}

/// Loads the initrd at the highest page-aligned address it fits below the
/// limit; returns `(address, size)`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &KernelLoaderResult,
    low_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(file_err(path))?;
    let size = f.metadata().map_err(file_err(path))?.len();
    let max = kernel
        .setup_header
        .map_or(0x7fff_ffff, |h| u64::from(h.initrd_addr_max))
        .min(low_end - 1);
    let top = (max + 1).saturating_sub(size) & !0xfff;
    if size == 0 || top < kernel.kernel_end.max(layout::HIMEM) {
        return Err(BootError::InitrdTooBig { size });
    }
    let size_usize = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(top), &mut f, size_usize)
        .map_err(|_| BootError::File {
            path: path.into(),
            source: std::io::Error::other("short read or guest memory too small"),
        })?;
    Ok((top, size))
}

/// Writes the PVH `hvm_start_info`, module list and memory map.
fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    ram: &[(u64, u64, u32)],
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    const MAGIC: u32 = 0x336e_c578;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes());
    info.extend_from_slice(&layout::PVH_MODLIST.to_le_bytes());
    info.extend_from_slice(&layout::CMDLINE.to_le_bytes());
    info.extend_from_slice(&rsdp.unwrap_or(0).to_le_bytes());
    info.extend_from_slice(&layout::PVH_MEMMAP.to_le_bytes());
    info.extend_from_slice(&(ram.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(layout::PVH_INFO))
        .map_err(mem_err)?;
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        for v in [addr, size, 0, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&m, GuestAddress(layout::PVH_MODLIST))
            .map_err(mem_err)?;
    }
    let mut map = Vec::with_capacity(24 * ram.len());
    for (addr, size, kind) in ram {
        map.extend_from_slice(&addr.to_le_bytes());
        map.extend_from_slice(&size.to_le_bytes());
        map.extend_from_slice(&kind.to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&map, GuestAddress(layout::PVH_MEMMAP))
        .map_err(mem_err)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP configuration (Intel MultiProcessor spec 1.4): one processor
/// entry per vCPU, an ISA bus, the IOAPIC and its 16 ISA interrupts, LINT0/1.
pub fn mptable(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&(layout::IOAPIC as u32).to_le_bytes());
    count += 2;
    for irq in 0..16u8 {
        // ISA IRQ n to IOAPIC pin n (pin 0 takes the PIC's ExtINT).
        let kind = if irq == 0 { 3 } else { 0 };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT to LINT0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI to LINT1
    count += 2;

    let table_addr = (layout::EBDA + 16) as u32;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"ATOLL   ");
    table.extend_from_slice(b"ATOLL VMM   ");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::LAPIC as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let bytes = mptable(vcpus);
    if layout::EBDA + bytes.len() as u64 > layout::HIMEM
        || mem.last_addr().raw_value() < layout::HIMEM
    {
        return Err(BootError::Memory);
    }
    mem.write_slice(&bytes, GuestAddress(layout::EBDA))
        .map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mptable_checksums_and_counts() {
        let t = mptable(2);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // 2 CPUs, bus, IOAPIC, 16 IRQs, 2 local interrupts.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 22);
    }

    #[test]
    fn e820_leaves_the_bios_hole() {
        let m = e820(512 << 20);
        assert_eq!(m[0], (0, layout::EBDA, E820_RAM));
        assert_eq!(m[2], (layout::HIMEM, (512 << 20) - layout::HIMEM, E820_RAM));
    }
}
