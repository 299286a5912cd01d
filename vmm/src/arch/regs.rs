//! Initial vCPU state: segments, paging, FPU, MSRs and the local APIC.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// A vCPU register write failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("cannot set {what} of the vCPU")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot structures did not fit in guest memory.
    #[error("cannot write the boot page tables or GDT to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// The mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with an identity map (Linux 64-bit boot protocol).
    Long,
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
}

// Selectors of the boot GDT.
const CODE64: u16 = 0x08;
const DATA: u16 = 0x10;
const TSS: u16 = 0x18;
const CODE32: u16 = 0x20;

/// A GDT entry from `flags` (access byte in bits 0-7, G/DB/L/AVL in 12-15),
/// base and (20-bit) limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
];

/// The `kvm_segment` KVM wants for GDT entry `index`.
fn segment(index: u16) -> kvm_segment {
    let e = GDT[usize::from(index >> 3)];
    let access = ((e >> 40) & 0xff) as u8;
    let high = ((e >> 52) & 0xf) as u8;
    let g = high >> 3 & 1;
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: 0,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index,
        type_: access & 0xf,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: (high >> 2) & 1,
        s: (access >> 4) & 1,
        l: (high >> 1) & 1,
        g,
        avl: high & 1,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and, for long mode, an identity map of the first 4 GiB
/// (2 MiB pages) into guest memory. Done once per boot, before vCPUs start.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT))
        .map_err(RegsError::Memory)?;
    mem.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))
        .map_err(RegsError::Memory)?;
    for gib in 0..4u64 {
        let pd = layout::PD + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(layout::PDPT + gib * 8))
            .map_err(RegsError::Memory)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = ((gib << 30) | (i << 21)) | 0x83;
            mem.write_obj(entry, GuestAddress(pd + i * 8))
                .map_err(RegsError::Memory)?;
        }
    }
    Ok(())
}

/// Sets segments, control registers and general registers so the vCPU starts
/// at `entry` in `mode`; `boot_info` goes to RSI (long mode, the zero page) or
/// RBX (PVH, the start info).
pub fn setup(vcpu: &VcpuFd, mode: EntryMode, entry: u64, boot_info: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let code = segment(if mode == EntryMode::Long {
        CODE64
    } else {
        CODE32
    });
    let data = segment(DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS);
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 7;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    match mode {
        EntryMode::Long => {
            sregs.cr3 = layout::PML4;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Long => {
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = boot_info;
        }
        EntryMode::Protected32 => regs.rbx = boot_info,
    }
    vcpu.set_regs(&regs).map_err(kvm("general registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

/// Sets the MSRs a freshly reset x86 CPU would have that KVM leaves at zero.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const FAST_STRINGS: u64 = 1;
    const IA32_TSC: u32 = 0x10;
    let entries = [
        kvm_msr_entry {
            index: IA32_MISC_ENABLE,
            data: FAST_STRINGS,
            ..Default::default()
        },
        kvm_msr_entry {
            index: IA32_TSC,
            data: 0,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Kvm {
        what: "MSRs",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Kvm {
            what: "MSRs",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}

/// Wires LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as firmware does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (reg, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_the_gdt() {
        let c = segment(CODE64);
        assert_eq!(
            (c.l, c.db, c.g, c.present, c.type_, c.s),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(c.limit, 0xffff_ffff);
        let c32 = segment(CODE32);
        assert_eq!((c32.l, c32.db), (0, 1));
        let d = segment(DATA);
        assert_eq!((d.type_, d.db), (3, 1));
        assert_eq!(segment(TSS).type_, 0xb);
    }
}
