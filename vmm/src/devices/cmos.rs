//! CMOS RAM and the real-time clock at ports 0x70/0x71 (MC146818 registers):
//! the current UTC time in BCD, 24-hour mode, never "update in progress";
//! memory size bytes for firmware-style probes; other bytes as plain NVRAM.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port.
pub const BASE: u64 = 0x70;
/// Index and data ports.
pub const LEN: u64 = 2;

/// The CMOS.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// (year, month, day) of the civil calendar for days since 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// A CMOS reporting `mem_size` bytes of guest RAM.
    pub fn new(mem_size: u64) -> Self {
        let mut nvram = [0u8; 128];
        let above_16m =
            (mem_size.min(crate::arch::layout::MMIO32_START)).saturating_sub(16 << 20) >> 16;
        let above_4g = mem_size.saturating_sub(crate::arch::layout::MMIO32_START) >> 16;
        let above_16m = above_16m.min(0xffff);
        nvram[0x34] = above_16m as u8;
        nvram[0x35] = (above_16m >> 8) as u8;
        nvram[0x5b] = above_4g as u8;
        nvram[0x5c] = (above_4g >> 8) as u8;
        nvram[0x5d] = (above_4g >> 16) as u8;
        Self { index: 0, nvram }
    }

    fn register(&self, index: u8, now: u64) -> u8 {
        let days = (now / 86_400) as i64;
        let secs = now % 86_400;
        let (y, m, d) = civil(days);
        match index {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            0x07 => bcd(u64::from(d)),
            0x08 => bcd(u64::from(m)),
            0x09 => bcd(y.unsigned_abs() % 100),
            0x32 => bcd(y.unsigned_abs() / 100),
            0x0a => 0x26,
            0x0b => 0x02,
            0x0c => 0,
            0x0d => 0x80,
            i => self.nvram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = if offset == 1 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.register(self.index, now)
        } else {
            self.index
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = v & 0x7f;
        } else if !matches!(self.index, 0x00..=0x0d | 0x32) {
            self.nvram[usize::from(self.index)] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_registers_in_bcd() {
        let c = Cmos::new(512 << 20);
        // 2026-11-25 15:04:05 UTC, a Wednesday.
        let t = 1_795_619_045;
        assert_eq!(c.register(0x09, t), 0x26);
        assert_eq!(c.register(0x32, t), 0x20);
        assert_eq!(c.register(0x08, t), 0x11);
        assert_eq!(c.register(0x07, t), 0x25);
        assert_eq!(c.register(0x04, t), 0x15);
        assert_eq!(c.register(0x02, t), 0x04);
        assert_eq!(c.register(0x00, t), 0x05);
        assert_eq!(c.register(0x06, t), 0x04);
        assert_eq!(c.register(0x0d, t), 0x80);
        // 512 MiB - 16 MiB in 64 KiB units.
        assert_eq!(
            u16::from_le_bytes([c.register(0x34, t), c.register(0x35, t)]),
            ((496u32 << 20) >> 16) as u16
        );
    }
}
