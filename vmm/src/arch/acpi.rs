//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and a
//! DSDT with `_S5` and a power button signalled through a Generic Event Device.
//! The guest powers off by writing S5 to the FADT's sleep control register and
//! resets through its reset register, both on [`PmDevice`]'s ports.

// Firmware tables pack values into fixed-width fields: truncating casts
// here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::aml::{self, Aml};
use super::layout;
use crate::bus::BusDevice;
use crate::devices::serial::{COM1_BASE, COM1_IRQ};
use crate::vm::{Exit, ExitReason};

/// Where the RSDP goes (the BIOS area Linux also scans).
pub const RSDP: u64 = 0xe_0000;
/// First port of the power management block.
pub const PM_BASE: u64 = 0x600;
/// Ports it covers: sleep control, sleep status, reset.
pub const PM_LEN: u64 = 3;
/// IOAPIC pin of the Generic Event Device (the power button).
pub const GED_GSI: u32 = 5;
const RESET_VALUE: u8 = 0x1;
const SLP_EN: u8 = 1 << 5;
const S5: u8 = 5;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A table with its header; the checksum is filled in by `finish`.
fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(b"ATOLL ");
    let mut id = *b"ATOLLVM ";
    id[..4].copy_from_slice(sig);
    t.extend_from_slice(&id);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"ATOL");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for one byte in I/O space.
fn gas_io(port: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&port.to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    f[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // Legacy devices, no VGA; no 8042 for the guest to drive: the VMs have
    // no keyboard, and the reset through port 0x64 needs no driver.
    f[at(109)..at(111)].copy_from_slice(&0x5u16.to_le_bytes());
    // HW_REDUCED_ACPI, RESET_REG_SUP, power and sleep buttons are devices.
    let flags: u32 = (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5);
    f[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    f[at(116)..at(128)].copy_from_slice(&gas_io(PM_BASE + 2));
    f[at(128)] = RESET_VALUE;
    f[at(131)] = 3; // FADT minor version (ACPI 6.3)
    f[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    f[at(244)..at(256)].copy_from_slice(&gas_io(PM_BASE));
    f[at(256)..at(268)].copy_from_slice(&gas_io(PM_BASE + 1));
    f[at(268)..at(276)].copy_from_slice(b"ATOLLVMM");
    table(b"FACP", 6, &f)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(layout::LAPIC as u32).to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for id in 0..vcpus {
        m.extend_from_slice(&[0, 8, id, id]);
        m.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    m.extend_from_slice(&[1, 12, vcpus, 0]);
    m.extend_from_slice(&(layout::IOAPIC as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    table(b"APIC", 5, &m)
}

fn dsdt() -> Vec<u8> {
    let (pwrb_hid, ged_hid) = (aml::Str("PNP0C0C"), aml::Str("ACPI0013"));
    let pwrb_names = (aml::Name("_HID", &pwrb_hid), aml::Name("_UID", &0u64));
    let pwrb = aml::Device("PWRB", vec![&pwrb_names.0, &pwrb_names.1]);
    let crs = aml::interrupt_resource(GED_GSI);
    let notify = aml::Notify("\\_SB.PWRB", 0x80);
    let evt = aml::Method("_EVT", 1, vec![&notify]);
    let ged_names = (
        aml::Name("_HID", &ged_hid),
        aml::Name("_UID", &0u64),
        aml::Name("_CRS", &crs),
    );
    let ged = aml::Device("GED0", vec![&ged_names.0, &ged_names.1, &ged_names.2, &evt]);
    // The PCI host bridge: without it an ACPI guest finds no PCI bus.
    let pci_hid = aml::Str("PNP0A03");
    let pci_crs =
        aml::pci_root_resources((layout::MMIO32_START as u32, (layout::MMIO32_END - 1) as u32));
    let pci_names = (
        aml::Name("_HID", &pci_hid),
        aml::Name("_UID", &0u64),
        aml::Name("_BBN", &0u64),
        aml::Name("_SEG", &0u64),
        aml::Name("_CRS", &pci_crs),
    );
    let pci0 = aml::Device(
        "PCI0",
        vec![
            &pci_names.0,
            &pci_names.1,
            &pci_names.2,
            &pci_names.3,
            &pci_names.4,
        ],
    );
    // COM1. A hardware-reduced ACPI guest has no legacy PIC and maps only
    // the ISA interrupts that the tables name: without this device Linux
    // drives ttyS0 by polling for the kernel's messages but never gets IRQ 4,
    // so everything written through the tty layer (userspace) stalls.
    let com_hid = aml::Str("PNP0501");
    let com_crs = aml::isa_resources(COM1_BASE as u16, 8, COM1_IRQ as u8);
    let com_names = (
        aml::Name("_HID", &com_hid),
        aml::Name("_UID", &0u64),
        aml::Name("_CRS", &com_crs),
    );
    let com1 = aml::Device("COM1", vec![&com_names.0, &com_names.1, &com_names.2]);
    // The CMOS clock, for the same reason (IRQ 8): /dev/rtc0 in the guest.
    let rtc_hid = aml::Str("PNP0B00");
    let rtc_crs = aml::isa_resources(crate::devices::cmos::BASE as u16, 2, 8);
    let rtc_names = (
        aml::Name("_HID", &rtc_hid),
        aml::Name("_UID", &0u64),
        aml::Name("_CRS", &rtc_crs),
    );
    let rtc = aml::Device("RTC_", vec![&rtc_names.0, &rtc_names.1, &rtc_names.2]);
    let sb = aml::Scope("\\_SB", vec![&pci0, &com1, &rtc, &pwrb, &ged]);
    let s5 = aml::Name("_S5_", &aml::Package(vec![&5u64, &0u64]));
    let mut body = sb.to_bytes();
    s5.emit(&mut body);
    table(b"DSDT", 2, &body)
}

/// Writes every table from [`RSDP`] on; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, vm_memory::GuestMemoryError> {
    let xsdt_at = RSDP + 0x40;
    let fadt_at = xsdt_at + 0x40;
    let madt_at = fadt_at + 0x200;
    let dsdt_at = madt_at + 0x400;
    let fadt = fadt(dsdt_at);
    let madt = madt(vcpus);
    let dsdt = dsdt();
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_at.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);
    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(b"ATOLL ");
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    mem.write_slice(&rsdp, GuestAddress(RSDP))?;
    mem.write_slice(&xsdt, GuestAddress(xsdt_at))?;
    mem.write_slice(&fadt, GuestAddress(fadt_at))?;
    mem.write_slice(&madt, GuestAddress(madt_at))?;
    mem.write_slice(&dsdt, GuestAddress(dsdt_at))?;
    debug_assert!(dsdt_at + dsdt.len() as u64 <= layout::HIMEM);
    Ok(RSDP)
}

/// The hardware-reduced sleep and reset registers.
#[derive(Debug)]
pub struct PmDevice(pub Arc<Exit>);

impl BusDevice for PmDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Sleep control: SLP_TYP in bits 2-4, SLP_EN in bit 5.
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == S5 => self.0.set(ExitReason::Poweroff),
            2 if v == RESET_VALUE => self.0.set(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tables_check_out() {
        let f = fadt(0xe1000);
        assert_eq!(f.len(), 276);
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let m = madt(2);
        assert_eq!(m.len(), 36 + 8 + 2 * 8 + 12);
        assert_eq!(m.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let d = dsdt();
        assert_eq!(&d[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert!(d.windows(8).any(|w| w == b"ACPI0013"));
        assert!(d.windows(7).any(|w| w == b"PNP0501"));
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = Arc::new(Exit::new().unwrap());
        let mut pm = PmDevice(exit.clone());
        pm.write(PM_BASE, 0, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert_eq!(exit.get(), None);
        pm.write(PM_BASE, 0, &[(S5 << 2) | SLP_EN]);
        assert_eq!(exit.get(), Some(ExitReason::Poweroff));
        let exit = Arc::new(Exit::new().unwrap());
        let mut pm = PmDevice(exit.clone());
        pm.write(PM_BASE, 2, &[RESET_VALUE]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }
}
