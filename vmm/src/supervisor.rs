//! The node's VM supervisor: one `vmm run` process per running VM, its state
//! directory, lifecycle requests over its control socket, reaping, restart
//! after a guest reboot, and re-adoption of VM processes that outlived a
//! previous supervisor.
//!
//! ```text
//! STATE/<id>/config.json   the VM's config (written at CreateVm)
//! STATE/<id>/vm.log        the VM process's standard output and error
//! STATE/<id>/run/          --state-dir of the VM process: pid, api.sock, exit.json
//! ```

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::config::VmConfig;

/// Lifecycle states of a VM as the supervisor reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No process.
    Stopped,
    /// Process starting.
    Starting,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// The VM or its process failed; ExitReason says why.
    Crashed,
}

impl State {
    /// The D-Bus spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Crashed => "crashed",
        }
    }
}

/// A supervisor request failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The request does not fit the VM's state.
    #[error("VM {id} is {state}: cannot {what}")]
    State {
        /// VM id.
        id: String,
        /// Its state.
        state: &'static str,
        /// The request.
        what: &'static str,
    },
    /// The VM process failed to start or answer.
    #[error("VM {id}: {why}")]
    Process {
        /// VM id.
        id: String,
        /// What happened.
        why: String,
    },
    /// A state file could not be written or read.
    #[error("{what} {}", path.display())]
    Io {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let path = path.to_owned();
    move |source| SupervisorError::Io { what, path, source }
}

/// Mutable facts about one VM.
#[derive(Debug, Clone)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Why it last ended ("" if it never did).
    pub exit_reason: String,
    /// Process id while a process exists.
    pub pid: Option<u32>,
    /// When the current process started.
    pub since: Option<Instant>,
    /// Processes started for this VM (guest reboots count).
    pub boots: u32,
    /// Whether the operator wants it running (guest reboots restart it).
    pub want_running: bool,
    /// Bumped on every process start, so a stale watcher can tell.
    generation: u64,
}

/// One VM known to the supervisor.
#[derive(Debug)]
pub struct VmEntry {
    /// Identifier (a UUID).
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: VmConfig,
    status: Mutex<Status>,
}

impl Status {
    fn stopped() -> Self {
        Self {
            state: State::Stopped,
            exit_reason: String::new(),
            pid: None,
            since: None,
            boots: 0,
            want_running: false,
            generation: 0,
        }
    }
}

impl VmEntry {
    /// A snapshot of its status.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn state_err(&self, what: &'static str) -> SupervisorError {
        SupervisorError::State {
            id: self.id.clone(),
            state: self.lock().state.as_str(),
            what,
        }
    }

    /// Sends one control request to the VM process; returns its reply.
    pub fn api(&self, op: &str) -> Result<serde_json::Value, SupervisorError> {
        let fail = |why: String| SupervisorError::Process {
            id: self.id.clone(),
            why,
        };
        let sock = self.run_dir().join("api.sock");
        let mut s = UnixStream::connect(&sock)
            .map_err(|e| fail(format!("control socket {}: {e}", sock.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| fail(e.to_string()))?;
        writeln!(s, "{}", serde_json::json!({ "op": op })).map_err(|e| fail(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| fail(format!("no answer to {op}: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| fail(format!("bad answer to {op}: {e}")))?;
        if v["ok"] != true {
            return Err(fail(
                v["error"].as_str().unwrap_or("request failed").to_owned(),
            ));
        }
        Ok(v)
    }
}

/// Called after every state change (to emit D-Bus signals).
pub type Notify = Arc<dyn Fn(&Arc<VmEntry>) + Send + Sync>;

/// All VMs of the node.
pub struct Supervisor {
    dir: PathBuf,
    vmm_bin: PathBuf,
    vms: Mutex<Vec<Arc<VmEntry>>>,
    notify: Mutex<Option<Notify>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn pid_alive(pid: u32) -> bool {
    // A VM process of ours: alive and running `vmm run`.
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.iter().any(|a| *a == b"run")
            && !fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
    })
}

const NO_EXIT_LINE: &str = "the VM process ended without an exit reason";

/// The exit line a VM process left, as (state, reason).
fn read_exit(run_dir: &Path) -> (State, String) {
    let line = fs::read_to_string(run_dir.join("exit.json")).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(line.trim()) {
        Ok(v) => {
            let reason = v["text"].as_str().unwrap_or("unknown").to_owned();
            let state = if v["exit"]["reason"] == "crashed" {
                State::Crashed
            } else {
                State::Stopped
            };
            (state, reason)
        }
        Err(_) => (State::Crashed, format!("{NO_EXIT_LINE} (killed?)")),
    }
}

impl Supervisor {
    /// A supervisor keeping state under `dir`, starting VMs with `vmm_bin`;
    /// adopts what a previous supervisor left.
    pub fn open(dir: &Path, vmm_bin: PathBuf) -> Result<Arc<Self>, SupervisorError> {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let sup = Arc::new(Self {
            dir: dir.to_owned(),
            vmm_bin,
            vms: Mutex::new(Vec::new()),
            notify: Mutex::new(None),
        });
        let entries = fs::read_dir(dir).map_err(io_err("cannot read", dir))?;
        for e in entries.flatten() {
            let vm_dir = e.path();
            let Some(id) = vm_dir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            let cfg = match fs::read_to_string(vm_dir.join("config.json"))
                .map_err(|e| e.to_string())
                .and_then(|t| VmConfig::from_json(&t).map_err(|e| e.to_string()))
            {
                Ok(c) => c,
                Err(e) => {
                    warn!(vm = %id, "skipping a VM directory with an unusable config: {e}");
                    continue;
                }
            };
            let entry = Arc::new(VmEntry {
                id,
                dir: vm_dir,
                config: cfg,
                status: Mutex::new(Status::stopped()),
            });
            let run = entry.run_dir();
            let pid = fs::read_to_string(run.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            match pid {
                Some(pid) if pid_alive(pid) => {
                    let state = match entry.api("state") {
                        Ok(v) if v["state"] == "paused" => State::Paused,
                        _ => State::Running,
                    };
                    {
                        let mut st = entry.lock();
                        st.state = state;
                        st.pid = Some(pid);
                        st.since = Some(Instant::now());
                        st.want_running = true;
                        st.boots = 1;
                    }
                    info!(vm = %entry.id, pid, "re-adopted a running VM");
                    sup.vms_lock().push(entry.clone());
                    sup.watch(&entry, None, pid, 0);
                }
                _ => {
                    if run.join("exit.json").exists() {
                        let (state, reason) = read_exit(&run);
                        let mut st = entry.lock();
                        st.state = state;
                        st.exit_reason = reason;
                    }
                    sup.vms_lock().push(entry);
                }
            }
        }
        Ok(sup)
    }

    fn vms_lock(&self) -> MutexGuard<'_, Vec<Arc<VmEntry>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the callback run after every state change.
    pub fn set_notify(&self, n: Notify) {
        *self.notify.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    fn changed(&self, vm: &Arc<VmEntry>) {
        let n = self
            .notify
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(n) = n {
            n(vm);
        }
    }

    /// Every VM.
    pub fn list(&self) -> Vec<Arc<VmEntry>> {
        self.vms_lock().clone()
    }

    /// Registers a new (stopped) VM.
    pub fn create(&self, config_json: &str) -> Result<Arc<VmEntry>, SupervisorError> {
        let config = VmConfig::from_json(config_json)?;
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.dir.join(&id);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        let path = dir.join("config.json");
        fs::write(&path, text).map_err(io_err("cannot write", &path))?;
        let entry = Arc::new(VmEntry {
            id,
            dir,
            config,
            status: Mutex::new(Status::stopped()),
        });
        self.vms_lock().push(entry.clone());
        info!(vm = %entry.id, name = %entry.config.name, "VM created");
        Ok(entry)
    }

    /// Starts the VM's process and waits until it answers on its control socket.
    pub fn start(self: &Arc<Self>, vm: &Arc<VmEntry>) -> Result<(), SupervisorError> {
        {
            let mut st = vm.lock();
            if !matches!(st.state, State::Stopped | State::Crashed) {
                drop(st);
                return Err(vm.state_err("start"));
            }
            st.state = State::Starting;
            st.want_running = true;
        }
        // The caller (the D-Bus method) announces the outcome itself.
        self.spawn(vm, false).inspect_err(|e| {
            let mut st = vm.lock();
            st.state = State::Crashed;
            st.exit_reason = e.to_string();
            st.want_running = false;
        })
    }

    fn spawn(self: &Arc<Self>, vm: &Arc<VmEntry>, announce: bool) -> Result<(), SupervisorError> {
        let run = vm.run_dir();
        let _ = fs::remove_dir_all(&run);
        fs::create_dir_all(&run).map_err(io_err("cannot create", &run))?;
        let log_path = vm.dir.join("vm.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot open", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("cannot open", &log_path))?;
        let mut child = Command::new(&self.vmm_bin)
            .arg("run")
            .arg("--config")
            .arg(vm.dir.join("config.json"))
            .arg("--state-dir")
            .arg(&run)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: signals meant for the supervisor (or a
            // supervisor that dies) do not take the VM with it.
            .process_group(0)
            .spawn()
            .map_err(|e| SupervisorError::Process {
                id: vm.id.clone(),
                why: format!("cannot run {}: {e}", self.vmm_bin.display()),
            })?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let sock = run.join("api.sock");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if status.success() && run.join("exit.json").metadata().is_ok_and(|m| m.len() > 0) {
                    // It ran and ended (say, the guest reset at once): the
                    // watcher records why, as for any other ending.
                    break;
                }
                let tail = fs::read_to_string(&log_path).unwrap_or_default();
                let last = tail
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output")
                    .to_owned();
                return Err(SupervisorError::Process {
                    id: vm.id.clone(),
                    why: format!("vmm run exited ({status}) while starting: {last}"),
                });
            }
            if UnixStream::connect(&sock).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Process {
                    id: vm.id.clone(),
                    why: "vmm run did not open its control socket within 30 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let generation = {
            let mut st = vm.lock();
            st.state = State::Running;
            st.pid = Some(pid);
            st.since = Some(Instant::now());
            st.boots += 1;
            st.generation += 1;
            st.exit_reason.clear();
            st.generation
        };
        info!(vm = %vm.id, pid, "VM started");
        if announce {
            self.changed(vm);
        }
        if !vm.lock().want_running {
            // Stop was asked for while this process was starting.
            let _ = vm.api("stop");
        }
        self.watch(vm, Some(child), pid, generation);
        Ok(())
    }

    /// Waits for the VM process to end on a thread, then records why and
    /// restarts it after a guest reboot.
    fn watch(
        self: &Arc<Self>,
        vm: &Arc<VmEntry>,
        child: Option<std::process::Child>,
        pid: u32,
        generation: u64,
    ) {
        let sup = self.clone();
        let vm = vm.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || {
                match child {
                    Some(mut c) => {
                        let _ = c.wait();
                    }
                    None => wait_foreign(pid),
                }
                sup.ended(&vm, generation);
            });
        if let Err(e) = spawned {
            warn!("cannot watch VM process {pid}: {e}");
        }
    }

    fn ended(self: &Arc<Self>, vm: &Arc<VmEntry>, generation: u64) {
        let (mut state, mut reason) = read_exit(&vm.run_dir());
        let restart = {
            let mut st = vm.lock();
            if st.generation != generation {
                return;
            }
            if state == State::Crashed && !st.want_running && reason.starts_with(NO_EXIT_LINE) {
                // Killed by a Stop that could not be delivered politely.
                state = State::Stopped;
                reason = "stopped".into();
            }
            st.pid = None;
            st.since = None;
            st.exit_reason = reason.clone();
            let reboot = reason == "reset" || reason == "triple-fault";
            if reboot && st.want_running {
                st.state = State::Starting;
                true
            } else {
                st.state = state;
                st.want_running = false;
                false
            }
        };
        info!(vm = %vm.id, %reason, "VM process ended");
        self.changed(vm);
        if restart {
            if let Err(e) = self.spawn(vm, true) {
                warn!(vm = %vm.id, "restart after reboot failed: {e}");
                {
                    let mut st = vm.lock();
                    st.state = State::Crashed;
                    st.exit_reason = e.to_string();
                    st.want_running = false;
                }
                self.changed(vm);
            }
        }
    }

    /// Forwards a lifecycle request to the running VM.
    pub fn request(&self, vm: &Arc<VmEntry>, op: &'static str) -> Result<(), SupervisorError> {
        let state = vm.lock().state;
        let ok = match op {
            "pause" => state == State::Running,
            "resume" => state == State::Paused,
            // Stop also lands while a (re)start is under way.
            "stop" => matches!(state, State::Running | State::Paused | State::Starting),
            "reboot" | "shutdown" => matches!(state, State::Running | State::Paused),
            _ => false,
        };
        if !ok {
            return Err(vm.state_err(op));
        }
        if op == "stop" || op == "shutdown" {
            vm.lock().want_running = false;
        }
        if op == "stop" && state == State::Starting {
            // No process to ask yet: the start in progress sees the wish when
            // it completes, a restart after a reset does not happen.
            return Ok(());
        }
        let reply = match vm.api(op) {
            Ok(r) => r,
            // The process is ending under us (a guest reset, say) or does not
            // answer: Stop is a forced stop, so it ends now either way.
            Err(_) if op == "stop" => {
                if let Some(pid) = vm.lock().pid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on the VM process this supervisor runs.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if matches!(op, "pause" | "resume") {
            let mut st = vm.lock();
            st.state = if reply["state"] == "paused" {
                State::Paused
            } else {
                State::Running
            };
        }
        Ok(())
    }

    /// Forgets a stopped VM and removes its directory.
    pub fn delete(&self, vm: &Arc<VmEntry>) -> Result<(), SupervisorError> {
        if !matches!(vm.lock().state, State::Stopped | State::Crashed) {
            return Err(vm.state_err("delete"));
        }
        self.vms_lock().retain(|v| v.id != vm.id);
        fs::remove_dir_all(&vm.dir).map_err(io_err("cannot remove", &vm.dir))?;
        info!(vm = %vm.id, "VM deleted");
        Ok(())
    }
}

/// Waits for a process that is not our child (re-adopted) to end.
fn wait_foreign(pid: u32) {
    let Ok(pid_i) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_i, 0) };
    if fd < 0 {
        // Gone already (or no pidfd support): fall back to polling /proc.
        while pid_alive(pid) {
            std::thread::sleep(Duration::from_millis(200));
        }
        return;
    }
    let Ok(fd) = i32::try_from(fd) else { return };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    // SAFETY: closing the pidfd we opened.
    unsafe { libc::close(fd) };
}
