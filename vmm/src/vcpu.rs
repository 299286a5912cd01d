//! vCPU threads: run KVM, dispatch port and MMIO exits to the buses, turn
//! terminal exits into the VM's exit reason.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// Installs the (empty) handler of the kick signal; before seccomp.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Pause, resume and stop for all vCPUs of a VM.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<Ctl>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Ctl {
    paused: bool,
    stop: bool,
    parked: usize,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU between runs: parks while paused; false once stopping.
    fn checkpoint(&self) -> bool {
        let mut g = self.lock();
        if g.paused && !g.stop {
            g.parked += 1;
            self.cv.notify_all();
            while g.paused && !g.stop {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.parked -= 1;
        }
        !g.stop
    }

    /// Parks every vCPU of `threads`; returns once all are parked.
    pub fn pause(&self, threads: &[VcpuThread]) {
        self.lock().paused = true;
        loop {
            for t in threads.iter().filter(|t| !t.handle.is_finished()) {
                t.kick();
            }
            let g = self.lock();
            let running = threads.iter().filter(|t| !t.handle.is_finished()).count();
            if g.parked >= running || g.stop {
                return;
            }
            // Kicks can be lost just before KVM_RUN; wake up to repeat them.
            let _ = self
                .cv
                .wait_timeout(g, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }

    /// Whether the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.lock().paused
    }

    /// Makes every vCPU return (after [`VcpuThread::stop`] kicks it).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }
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
    /// Pause and stop.
    pub control: Arc<VcpuControl>,
    /// Host CPUs to run on (empty: any).
    pub affinity: Vec<usize>,
}

impl VcpuThread {
    /// Starts running `fd` on a new thread.
    pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let handle = std::thread::Builder::new()
            .stack_size(crate::VCPU_STACK)
            .name(format!("vcpu{}", ctx.index))
            .spawn(move || {
                if !ctx.affinity.is_empty() {
                    pin(&ctx.affinity);
                }
                run(fd, &ctx);
            })?;
        Ok(Self { handle })
    }

    /// Interrupts `KVM_RUN` once.
    pub fn kick(&self) {
        let _ = self.handle.kill(kick_signal());
    }

    /// Interrupts `KVM_RUN` ([`VcpuControl::stop`] must have been called) and joins.
    pub fn stop(self) {
        while !self.handle.is_finished() {
            // A signal delivered just before KVM_RUN is entered is lost; repeat.
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
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
        if ctx.exit.is_set() || !ctx.control.checkpoint() {
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
