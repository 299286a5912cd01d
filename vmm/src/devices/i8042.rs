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
const CMD_KBD_TEST: u8 = 0xab;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// Keyboard not inhibited (no "keylock").
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

/// What the next byte on the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Keyboard,
    Ctr,
    KbdOut,
    AuxOut,
}

/// The controller. Answers the configuration, self-test and loopback commands
/// Linux probes with, so its driver settles at once: not a multiplexer (the
/// AUX loopback echoes), no AUX port (the AUX disable bit never toggles).
/// Every poll of the status port is a VM exit: an unanswered probe costs
/// seconds of boot.
#[derive(Debug)]
pub struct I8042 {
    reset: Arc<Exit>,
    ctr: u8,
    out: Option<(u8, bool)>,
    expect: Expect,
}

impl I8042 {
    /// A controller ending the VM through `reset` when the guest resets the CPU.
    pub fn new(reset: Arc<Exit>) -> Self {
        Self {
            reset,
            ctr: 0x30, // both ports' clocks off, no interrupts
            out: None,
            expect: Expect::Keyboard,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.out.take().map_or(0, |(v, _)| v),
            4 => {
                let mut st = STATUS_SYS | STATUS_UNLOCKED;
                if let Some((_, aux)) = self.out {
                    st |= STATUS_OUT_FULL | if aux { STATUS_AUX_DATA } else { 0 };
                }
                st
            }
            _ => 0,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                match self.expect {
                    Expect::Ctr => self.ctr = v,
                    Expect::KbdOut => self.out = Some((v, false)),
                    Expect::AuxOut => self.out = Some((v, true)),
                    // Bytes for the keyboard itself: there is none to answer.
                    Expect::Keyboard => {}
                }
                self.expect = Expect::Keyboard;
            }
            4 => match v {
                // The vCPU stops right after this write, as the CPU would.
                CMD_RESET_CPU => self.reset.set(ExitReason::Reset),
                CMD_READ_CTR => self.out = Some((self.ctr, false)),
                CMD_WRITE_CTR => self.expect = Expect::Ctr,
                CMD_SELF_TEST => self.out = Some((0x55, false)),
                CMD_KBD_TEST => self.out = Some((0x00, false)),
                CMD_WRITE_KBD_OUT => self.expect = Expect::KbdOut,
                CMD_WRITE_AUX_OUT => self.expect = Expect::AuxOut,
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
        // AUX loopback echoes with the AUX data bit.
        k.write(BASE, 4, &[CMD_WRITE_AUX_OUT]);
        k.write(BASE, 0, &[0x5a]);
        k.read(BASE, 4, &mut b);
        assert_eq!(
            b[0] & (STATUS_OUT_FULL | STATUS_AUX_DATA | STATUS_UNLOCKED),
            0x31
        );
        k.read(BASE, 0, &mut b);
        assert_eq!(b[0], 0x5a);
        assert_eq!(exit.get(), None, "no reset yet");
        k.write(BASE, 4, &[CMD_RESET_CPU]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }
}
