//! The guest physical address map (x86-64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, PDPT, 4 page directories
//! 0x0000_0520  IDT (empty)              0x0002_0000  kernel command line
//! 0x0000_6000  PVH start info + memmap  0x0009_fc00  MP table (EBDA) .. 1 MiB reserved
//! 0x0000_7000  Linux zero page          0x0010_0000  kernel (or its own load address)
//! 0x0000_8ff0  boot stack               RAM up to 3 GiB, the rest from 4 GiB
//! 0xc000_0000  PCI memory window (32-bit BARs) up to the IOAPIC at 0xfec0_0000
//! ```

/// Global descriptor table written for the boot vCPU.
pub const GDT: u64 = 0x500;
/// Interrupt descriptor table (empty; the guest installs its own).
pub const IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH module list (the initrd), after the start info.
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map, after the module list.
pub const PVH_MEMMAP: u64 = 0x6080;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for guests entered in long mode.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page map level 4 of the identity map built for long-mode entry.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB identity-mapped).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Room for the command line.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA: u64 = 0x9_fc00;
/// Start of high memory: kernels load at or above it.
pub const HIMEM: u64 = 0x10_0000;
/// End of RAM below 4 GiB; the PCI hole starts here.
pub const MMIO32_START: u64 = 0xc000_0000;
/// End of the 32-bit PCI memory window.
pub const MMIO32_END: u64 = 0xfec0_0000;
/// IOAPIC registers.
pub const IOAPIC: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC: u64 = 0xfee0_0000;
/// Where RAM above the hole continues.
pub const HIGH_RAM: u64 = 0x1_0000_0000;

/// The RAM ranges `(start, len)` for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO32_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO32_START), (HIGH_RAM, size - MMIO32_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_pci_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO32_START), (HIGH_RAM, (4 << 30) - MMIO32_START)]
        );
    }
}
