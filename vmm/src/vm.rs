//! One VM: KVM objects, memory, buses and devices, vCPU threads, and why it ended.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;
use tracing::info;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{Api, Request};
use crate::arch::{boot, cpuid, regs};
use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::devices::console::Console;
use crate::devices::debug::{BootTimer, DebugExit, Stamp, BOOT_TIMER, DEBUG_EXIT};
use crate::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ};
use crate::devices::{cmos, i8042};
use crate::interrupts::{IrqError, IrqRouting};
use crate::memory::{GuestRam, MemoryError};
use crate::pci::{ConfigIo, PciError, PciRoot};
use crate::seccomp::SeccompError;
use crate::vcpu::{VcpuContext, VcpuControl, VcpuThread};

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "detail")]
pub enum ExitReason {
    /// The guest powered off.
    Poweroff,
    /// The guest reset the machine (i8042 or KVM reset event).
    Reset,
    /// The guest triple-faulted (also how some guests reboot).
    TripleFault,
    /// A test guest wrote this status to the debug exit port.
    GuestExit(u8),
    /// The host stopped the VM.
    Stopped,
    /// The VM could not go on; the text says why.
    Crashed(String),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Poweroff => f.write_str("poweroff"),
            Self::Reset => f.write_str("reset"),
            Self::TripleFault => f.write_str("triple-fault"),
            Self::GuestExit(c) => write!(f, "guest-exit({c})"),
            Self::Stopped => f.write_str("stopped"),
            Self::Crashed(why) => write!(f, "crashed: {why}"),
        }
    }
}

/// The first exit reason reported wins; the eventfd wakes the VM's owner.
#[derive(Debug)]
pub struct Exit {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
    set: AtomicBool,
}

impl Exit {
    /// No reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
            set: AtomicBool::new(false),
        })
    }

    /// Records `r` unless a reason is already set.
    pub fn set(&self, r: ExitReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
            self.set.store(true, Ordering::Release);
            let _ = self.evt.write(1);
        }
    }

    /// Whether the VM is ending (cheap; checked by vCPUs after every exit).
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The reason, once set.
    pub fn get(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or not accessible.
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM refused to {what}")]
    KvmCall {
        /// What was being done.
        what: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Interrupt routing.
    #[error(transparent)]
    Irq(#[from] IrqError),
    /// A PCI device could not be created (for example an unreachable backend).
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Devices overlap on a bus (a bug).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd, thread or socket could not be created.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

fn os_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// A VM ready to run.
pub struct Vm {
    config: VmConfig,
    vm: Arc<VmFd>,
    // Declared after `vm` so it is unmapped after the VM fd is closed.
    ram: GuestRam,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<Exit>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    console: Console,
    stamps: Arc<Mutex<Vec<Stamp>>>,
    pci: Arc<PciRoot>,
    /// Raises the ACPI power button (Generic Event Device), with ACPI.
    power_button: Option<EventFd>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM described by `config`; `start` is when the process began
    /// (the boot timer counts from it).
    pub fn new(config: &VmConfig, start: Instant) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_call("create a VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_call("set the TSS address"))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_call("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_call("create the interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_call("create the PIT"))?;

        let ram = GuestRam::new(config.memory_mib, config.hugepages)?;
        ram.register(&vm)?;
        let irq = Arc::new(IrqRouting::new(vm.clone())?);

        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let exit = Arc::new(Exit::new().map_err(os_err("cannot create an eventfd"))?);

        let console = Console::new(config.serial.buffer_bytes)
            .map_err(os_err("cannot create the console"))?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os_err("cannot create an eventfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_call("wire the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.clone())));
        io.insert(serial.clone(), COM1_BASE, 8)?;
        if config.serial.socket.is_none() {
            console.use_stdout();
        }
        if let Some(path) = &config.serial.socket {
            let s = serial.clone();
            console
                .listen(path, Box::new(move |b| SerialDevice::input(&s, b)))
                .map_err(os_err(format!(
                    "cannot listen on the serial socket {}",
                    path.display()
                )))?;
        }
        io.insert(
            Arc::new(Mutex::new(i8042::I8042::new(exit.clone()))),
            i8042::BASE,
            i8042::LEN,
        )?;
        io.insert(
            Arc::new(Mutex::new(cmos::Cmos::new(ram.size))),
            cmos::BASE,
            cmos::LEN,
        )?;
        let stamps = Arc::new(Mutex::new(Vec::new()));
        io.insert(
            Arc::new(Mutex::new(BootTimer::new(start, stamps.clone()))),
            BOOT_TIMER,
            1,
        )?;
        if config.debug_exit {
            io.insert(Arc::new(Mutex::new(DebugExit(exit.clone()))), DEBUG_EXIT, 1)?;
        }

        let pci = PciRoot::new(&vm, &ram, &irq, &mmio, config)?;
        io.insert(
            Arc::new(Mutex::new(ConfigIo(pci.clone()))),
            crate::pci::CONFIG_ADDRESS,
            8,
        )?;

        regs::write_boot_tables(&ram.mem)?;
        let mut power_button = None;
        let rsdp = if config.acpi {
            let rsdp = crate::arch::acpi::write(&ram.mem, config.vcpus)
                .map_err(|_| boot::BootError::Memory)?;
            io.insert(
                Arc::new(Mutex::new(crate::arch::acpi::PmDevice(exit.clone()))),
                crate::arch::acpi::PM_BASE,
                crate::arch::acpi::PM_LEN,
            )?;
            let ged = EventFd::new(EFD_NONBLOCK).map_err(os_err("cannot create an eventfd"))?;
            vm.register_irqfd(&ged, crate::arch::acpi::GED_GSI)
                .map_err(kvm_call("wire the power button interrupt"))?;
            power_button = Some(ged);
            Some(rsdp)
        } else {
            None
        };
        let devices_ms = start.elapsed().as_millis();
        let entry = boot::load(&ram.mem, ram.size, &config.boot, config.vcpus, rsdp)?;
        let loaded_ms = start.elapsed().as_millis();
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_call("report its CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_call("create a vCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, i, config.vcpus))
                .map_err(kvm_call("set the CPUID"))?;
            regs::setup_msrs(&fd)?;
            regs::setup_lapic(&fd)?;
            if i == 0 {
                regs::setup(&fd, entry.mode, entry.rip, entry.boot_info)?;
            }
            vcpus.push(fd);
        }
        info!(
            name = %config.name,
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            entry = format!("{:#x}", entry.rip),
            mode = ?entry.mode,
            ram_pages = if config.hugepages {
                "hugetlb".to_string()
            } else {
                format!("shmem-thp-{}", GuestRam::host_shmem_thp().unwrap_or_else(|| "none".into()))
            },
            devices_ms,
            loaded_ms,
            created_ms = start.elapsed().as_millis(),
            "VM created"
        );
        Ok(Self {
            config: config.clone(),
            vm,
            ram,
            io,
            mmio,
            exit,
            vcpus,
            console,
            stamps,
            pci,
            power_button,
        })
    }

    /// Boot timer stamps so far.
    pub fn stamps(&self) -> Vec<Stamp> {
        self.stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The exit signal (to stop the VM from another thread: set `Stopped`).
    pub fn exit(&self) -> Arc<Exit> {
        self.exit.clone()
    }

    /// Runs the vCPUs until the VM ends; returns why. With `api`, serves the
    /// control socket meanwhile; with `seccomp`, filters system calls from
    /// here on.
    pub fn run(mut self, opts: RunOptions) -> Result<ExitReason, VmError> {
        let mut api = match &opts.api_socket {
            Some(p) => Some(Api::bind(p).map_err(os_err(format!(
                "cannot listen on the API socket {}",
                p.display()
            )))?),
            None => None,
        };
        crate::vcpu::install_kick_handler();
        if opts.seccomp {
            crate::seccomp::install()?;
        }
        let control = Arc::new(VcpuControl::default());
        let mut threads = Vec::new();
        for (i, fd) in (0u8..).zip(self.vcpus.drain(..)) {
            let ctx = VcpuContext {
                index: i,
                io: self.io.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                control: control.clone(),
                affinity: self
                    .config
                    .cpu_affinity
                    .get(usize::from(i))
                    .cloned()
                    .unwrap_or_default(),
            };
            threads.push(VcpuThread::spawn(fd, ctx).map_err(os_err("cannot start a vCPU thread"))?);
        }
        let started = Instant::now();
        let reason = loop {
            if let Some(r) = self.exit.get() {
                break r;
            }
            self.wait(api.as_ref());
            if let Some(api) = api.as_mut() {
                api.service(|req| self.handle(req, &control, &threads, started));
            }
        };
        control.stop();
        for t in threads {
            t.stop();
        }
        self.pci.shutdown();
        if self.config.serial.socket.is_none() && !self.console.at_line_start() {
            // Whatever follows on standard output starts on its own line.
            println!();
        }
        info!(name = %self.config.name, %reason, dropped_console_bytes = self.console.dropped(), "VM ended");
        let _ = (&self.vm, &self.ram);
        Ok(reason)
    }

    fn handle(
        &self,
        req: Result<Request, String>,
        control: &VcpuControl,
        threads: &[VcpuThread],
        started: Instant,
    ) -> serde_json::Value {
        let state = |c: &VcpuControl| if c.paused() { "paused" } else { "running" };
        let req = match req {
            Ok(r) => r,
            Err(e) => return serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        match req {
            Request::State => {}
            Request::Info => {
                return serde_json::json!({
                    "ok": true,
                    "state": state(control),
                    "name": self.config.name,
                    "vcpus": self.config.vcpus,
                    "memory_mib": self.config.memory_mib,
                    "uptime_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "boot_stamps": self.stamps().iter().map(|s| serde_json::json!({"stage": s.stage, "micros": s.micros})).collect::<Vec<_>>(),
                    "console_dropped_bytes": self.console.dropped(),
                    "devices": self.pci.devices(),
                })
            }
            Request::Pause => {
                if !control.paused() {
                    control.pause(threads);
                    self.pci.pause();
                }
            }
            Request::Resume => {
                if control.paused() {
                    self.pci.resume();
                    control.resume();
                }
            }
            Request::Stop => self.exit.set(ExitReason::Stopped),
            Request::Reboot => self.exit.set(ExitReason::Reset),
            Request::Shutdown => match &self.power_button {
                // The guest decides what a power button press means; the
                // VM ends when it writes S5 (reason "poweroff").
                Some(b) => {
                    if let Err(e) = b.write(1) {
                        return serde_json::json!({"ok": false, "error": format!("power button: {e}")});
                    }
                }
                None => {
                    return serde_json::json!({
                        "ok": false,
                        "error": "this VM has no ACPI (\"acpi\": false): nothing to press; use stop"
                    })
                }
            },
        }
        serde_json::json!({"ok": true, "state": state(control)})
    }

    /// Sleeps until the VM ends or the API has input.
    fn wait(&self, api: Option<&Api>) {
        use std::os::fd::AsRawFd;
        let mut fds = vec![libc::pollfd {
            fd: self.exit.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for fd in api.map(Api::fds).unwrap_or_default() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is valid for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            self.exit.set(ExitReason::Crashed(
                "poll failed in the VM's main loop".into(),
            ));
        }
    }
}

/// How [`Vm::run`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Control socket to serve.
    pub api_socket: Option<std::path::PathBuf>,
    /// Install the seccomp filter.
    pub seccomp: bool,
}
