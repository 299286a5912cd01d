//! A type-0 PCI configuration space: 256 bytes with a write mask, BARs with
//! the sizing protocol, and a capability list.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

/// One memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Guest physical address.
    pub addr: u64,
    /// Size, a power of two.
    pub size: u64,
    /// Uses two BAR registers.
    pub is_64: bool,
}

/// A BAR the guest moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub bar: usize,
    /// Where it was.
    pub old: u64,
    /// Where it is now.
    pub new: u64,
}

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class, subclass and programming interface.
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
const STATUS_CAP_LIST: u16 = 0x10;
/// Memory space enable in the command register.
pub const COMMAND_MEMORY: u16 = 0x2;
const FIRST_CAP: usize = 0x40;

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct PciConfig {
    regs: [u8; 256],
    mask: [u8; 256],
    bars: [Option<Bar>; 6],
    /// Set while the guest sizes a BAR (wrote all ones to its low register).
    sizing: [bool; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfig {
    /// A function with the given identity and no BARs or capabilities.
    pub fn new(ids: Ids) -> Self {
        let mut c = Self {
            regs: [0; 256],
            mask: [0; 256],
            bars: [None; 6],
            sizing: [false; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        c.set16(0x00, ids.vendor);
        c.set16(0x02, ids.device);
        c.regs[0x08] = ids.revision;
        c.regs[0x09] = ids.class as u8;
        c.regs[0x0a] = (ids.class >> 8) as u8;
        c.regs[0x0b] = (ids.class >> 16) as u8;
        c.set16(0x2c, ids.subsystem_vendor);
        c.set16(0x2e, ids.subsystem);
        // I/O, memory, bus master, INTx disable are the guest's to set.
        c.mask[COMMAND] = 0x07;
        c.mask[COMMAND + 1] = 0x04;
        // Interrupt line is scratch for the guest.
        c.mask[0x3c] = 0xff;
        c
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// A 16-bit register.
    pub fn read16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    /// Adds a memory BAR at index `bar` placed at `addr`.
    pub fn add_bar(&mut self, bar: usize, b: Bar) {
        debug_assert!(b.size.is_power_of_two() && b.size >= 16);
        self.bars[bar] = Some(b);
        self.write_bar_regs(bar);
    }

    fn write_bar_regs(&mut self, bar: usize) {
        let Some(b) = self.bars[bar] else { return };
        let flags = if b.is_64 { 0x4 } else { 0 };
        let lo = (b.addr as u32 & !0xf) | flags;
        self.regs[BAR0 + 4 * bar..BAR0 + 4 * bar + 4].copy_from_slice(&lo.to_le_bytes());
        if b.is_64 {
            let hi = (b.addr >> 32) as u32;
            self.regs[BAR0 + 4 * bar + 4..BAR0 + 4 * bar + 8].copy_from_slice(&hi.to_le_bytes());
        }
    }

    /// The BAR at `bar`.
    pub fn bar(&self, bar: usize) -> Option<Bar> {
        self.bars.get(bar).copied().flatten()
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.read16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID and
    /// next pointer); `writable` marks bytes of the body the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        assert!(
            at + len <= 256,
            "capabilities overflow the configuration space"
        );
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + 2 + body.len()].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate() {
            self.mask[at + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.regs[prev + 1] = at as u8,
            None => {
                self.regs[CAP_PTR] = at as u8;
                let st = self.read16(STATUS) | STATUS_CAP_LIST;
                self.set16(STATUS, st);
            }
        }
        self.last_cap = Some(at);
        self.next_cap = at + len;
        at
    }

    /// Raw bytes (for capability state the device reads back).
    pub fn bytes(&self, at: usize, len: usize) -> &[u8] {
        &self.regs[at..at + len]
    }

    /// A guest read of `data.len()` bytes at `at`.
    pub fn read(&self, at: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(at + i).copied().unwrap_or(0xff);
        }
        // A BAR being sized reads back its size mask.
        for (bar, sizing) in self.sizing.iter().enumerate() {
            if !*sizing {
                continue;
            }
            let Some(b) = self.bars[bar] else { continue };
            let mask = !(b.size - 1);
            let flags = if b.is_64 { 0x4u64 } else { 0 };
            let reg = BAR0 + 4 * bar;
            let value = [((mask as u32) & !0xf) | flags as u32, (mask >> 32) as u32];
            for (i, b) in data.iter_mut().enumerate() {
                let off = at + i;
                for (r, v) in value.iter().enumerate() {
                    if (reg + 4 * r..reg + 4 * r + 4).contains(&off) {
                        *b = v.to_le_bytes()[off - reg - 4 * r];
                    }
                }
            }
        }
    }

    /// A guest write; reports a BAR the write moved.
    pub fn write(&mut self, at: usize, data: &[u8]) -> Option<BarMove> {
        if (BAR0..BAR0 + 24).contains(&at) {
            return self.write_bar(at, data);
        }
        for (i, v) in data.iter().enumerate() {
            let Some(m) = self.mask.get(at + i).copied() else {
                break;
            };
            self.regs[at + i] = (self.regs[at + i] & !m) | (v & m);
        }
        None
    }

    fn write_bar(&mut self, at: usize, data: &[u8]) -> Option<BarMove> {
        if data.len() != 4 || at % 4 != 0 {
            return None; // BARs are written as whole dwords
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let idx = (at - BAR0) / 4;
        // The register is a BAR's low half, or the high half of the BAR before.
        let (bar, high) = match (
            self.bars[idx],
            idx.checked_sub(1).and_then(|p| self.bars[p]),
        ) {
            (Some(_), _) => (idx, false),
            (None, Some(p)) if p.is_64 => (idx - 1, true),
            _ => return None,
        };
        let b = self.bars[bar]?;
        if v == 0xffff_ffff {
            self.sizing[bar] = true;
            return None;
        }
        self.sizing[bar] = false;
        let mask = !(b.size - 1);
        let new = if high {
            (b.addr & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (b.addr & !0xffff_ffff) | u64::from(v & !0xf)
        } & mask;
        if new == b.addr {
            return None;
        }
        self.bars[bar] = Some(Bar { addr: new, ..b });
        self.write_bar_regs(bar);
        Some(BarMove {
            bar,
            old: b.addr,
            new,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    fn r32(c: &PciConfig, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_caps_and_read_only_fields() {
        let mut c = PciConfig::new(ids());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8) >> 8, 0x01_80_00);
        let at = c.add_capability(0x09, &[1, 2, 3], &[]);
        let at2 = c.add_capability(0x11, &[0, 0], &[0, 0xc0]);
        assert_eq!(c.bytes(0x34, 1)[0] as usize, at);
        assert_eq!(c.bytes(at + 1, 1)[0] as usize, at2);
        assert_ne!(c.read16(0x06) & 0x10, 0);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(r32(&c, 0), 0x1042_1af4, "IDs are read-only");
        c.write(at2 + 3, &[0xff]);
        assert_eq!(
            c.bytes(at2 + 3, 1)[0],
            0xc0,
            "only the writable bits change"
        );
        c.write(4, &[0xff, 0xff]);
        assert_eq!(c.read16(4), 0x0407);
    }

    #[test]
    fn bar_sizing_and_moves() {
        let mut c = PciConfig::new(ids());
        c.add_bar(
            0,
            Bar {
                addr: 0xc000_0000,
                size: 0x1_0000,
                is_64: true,
            },
        );
        assert_eq!(r32(&c, 0x10), 0xc000_0004);
        assert_eq!(c.write(0x10, &0xffff_ffffu32.to_le_bytes()), None);
        assert_eq!(r32(&c, 0x10), 0xffff_0004);
        assert_eq!(c.write(0x14, &0xffff_ffffu32.to_le_bytes()), None);
        assert_eq!(r32(&c, 0x14), 0xffff_ffff);
        let m = c.write(0x10, &0xd000_0000u32.to_le_bytes()).unwrap();
        assert_eq!((m.old, m.new), (0xc000_0000, 0xd000_0000));
        assert_eq!(r32(&c, 0x10), 0xd000_0004);
        let m = c.write(0x14, &1u32.to_le_bytes()).unwrap();
        assert_eq!(m.new, 0x1_d000_0000);
        // A BAR register with no BAR behind it reads zero and ignores writes.
        assert_eq!(c.write(0x18, &0xffff_ffffu32.to_le_bytes()), None);
        assert_eq!(r32(&c, 0x18), 0);
    }
}
