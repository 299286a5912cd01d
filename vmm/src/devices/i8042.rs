//! The i8042 keyboard controller, reduced to what guests use on a server: the
//! CPU reset command (0xfe to port 0x64), which ends the VM with reason "reset".

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::vm::{Exit, ExitReason};

/// First port (data).
pub const BASE: u64 = 0x60;
/// Ports covered: 0x60 (data) .. 0x64 (command/status).
pub const LEN: u64 = 5;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;

/// The controller. Answers the configuration and self-test commands Linux
/// probes with, so its driver neither times out nor gives up noisily.
#[derive(Debug)]
pub struct I8042 {
    reset: Arc<Exit>,
    ctr: u8,
    out: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    /// A controller ending the VM through `reset` when the guest resets the CPU.
    pub fn new(reset: Arc<Exit>) -> Self {
        Self {
            reset,
            ctr: 0x30, // both ports' clocks off, no interrupts
            out: None,
            expect_ctr: false,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.out.take().unwrap_or(0),
            4 => {
                STATUS_SYS
                    | if self.out.is_some() {
                        STATUS_OUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if self.expect_ctr => {
                self.ctr = v;
                self.expect_ctr = false;
            }
            4 => match v {
                // The vCPU stops right after this write, as the CPU would.
                CMD_RESET_CPU => self.reset.set(ExitReason::Reset),
                CMD_READ_CTR => self.out = Some(self.ctr),
                CMD_WRITE_CTR => self.expect_ctr = true,
                CMD_SELF_TEST => self.out = Some(0x55),
                _ => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reset_and_ctr() {
        let exit = Arc::new(Exit::new().unwrap());
        let mut k = I8042::new(exit.clone());
        let mut b = [0u8];
        k.write(BASE, 4, &[CMD_READ_CTR]);
        k.read(BASE, 4, &mut b);
        assert_eq!(b[0] & STATUS_OUT_FULL, 1);
        k.read(BASE, 0, &mut b);
        assert_eq!(b[0], 0x30);
        k.write(BASE, 4, &[CMD_WRITE_CTR]);
        k.write(BASE, 0, &[0x45]);
        k.write(BASE, 4, &[CMD_READ_CTR]);
        k.read(BASE, 0, &mut b);
        assert_eq!(b[0], 0x45);
        assert_eq!(exit.get(), None, "no reset yet");
        k.write(BASE, 4, &[CMD_RESET_CPU]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }
}
