//! vCPU threads: run KVM, dispatch port and MMIO exits to the buses, turn
//! terminal exits into the VM's exit reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, warn};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::vm::{Exit, ExitReason};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// Index (and APIC ID).
    pub index: u8,
    /// Port I/O bus.
    pub io: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where terminal exits are reported.
    pub exit: Arc<Exit>,
    /// Set when the VM is being stopped.
    pub stop: Arc<AtomicBool>,
    /// Host CPUs to run on (empty: any).
    pub affinity: Vec<usize>,
}

impl VcpuThread {
    /// Starts running `fd` on a new thread.
    pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", ctx.index))
            .spawn(move || {
                if !ctx.affinity.is_empty() {
                    pin(&ctx.affinity);
                }
                run(fd, &ctx);
            })?;
        Ok(Self { handle })
    }

    /// Interrupts `KVM_RUN` (the stop flag must already be set) and joins.
    pub fn stop(self) {
        while !self.handle.is_finished() {
            // A signal delivered just before KVM_RUN is entered is lost; repeat.
            let _ = self.handle.kill(kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.handle.join();
    }
}

fn pin(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: `c` is within the set's size.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: `set` is a valid cpu_set_t; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        warn!(
            "cannot pin vCPU to {cpus:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn run(mut fd: VcpuFd, ctx: &VcpuContext) {
    let reason = loop {
        if ctx.stop.load(Ordering::Acquire) || ctx.exit.is_set() {
            return;
        }
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.io.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.io.write(u64::from(port), data) {
                    debug!(port, "write to an unclaimed port");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    debug!(addr, "write to unclaimed MMIO");
                }
            }
            Ok(VcpuExit::Shutdown) => break ExitReason::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => break ExitReason::Poweroff,
                KVM_SYSTEM_EVENT_RESET => break ExitReason::Reset,
                k => break ExitReason::Crashed(format!("unknown system event {k}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break ExitReason::Crashed(format!(
                "vCPU {} failed to enter the guest (hardware reason {reason:#x}, host CPU {cpu})",
                ctx.index
            ))
            }
            Ok(VcpuExit::InternalError) => {
                break ExitReason::Crashed(format!(
                    "KVM internal error on vCPU {} (instruction emulation failed)",
                    ctx.index
                ))
            }
            Ok(VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => {}
            Ok(other) => {
                break ExitReason::Crashed(format!(
                    "unexpected exit on vCPU {}: {other:?}",
                    ctx.index
                ))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => break ExitReason::Crashed(format!("KVM_RUN on vCPU {}: {e}", ctx.index)),
        }
    };
    debug!(vcpu = ctx.index, %reason, "vCPU stopped");
    ctx.exit.set(reason);
}
