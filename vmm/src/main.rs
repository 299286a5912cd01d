//! The `vmm` binary: `vmm daemon` (node supervisor) and `vmm run` (one VM).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vmm", version, about = "Atoll hypervisor")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node's VM supervisor; it owns org.atoll.Vmm1 on D-Bus.
    Daemon {
        /// D-Bus address to connect to (default: the system bus).
        #[arg(long, value_name = "ADDRESS")]
        bus: Option<String>,
        /// Identifier of this node (default: /etc/machine-id).
        #[arg(long)]
        node_id: Option<String>,
        /// Directory for VM configs and runtime files.
        #[arg(long, value_name = "DIR", default_value = "/run/atoll/vmm")]
        state_dir: std::path::PathBuf,
    },
    /// Run one VM in this process until it ends; prints the exit reason as JSON.
    Run {
        /// VM config (JSON): a file path, or `fd:N` for an inherited descriptor.
        #[arg(long, value_name = "FILE|fd:N")]
        config: String,
        /// Directory for the control socket (api.sock), pid and exit.json.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<std::path::PathBuf>,
        /// Do not install the seccomp filter (debugging only).
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Send one request to a running VM's control socket and print the reply.
    Ctl {
        /// The VM's --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: std::path::PathBuf,
        /// state, info, pause, resume, shutdown, reboot or stop.
        op: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("vmm: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Ctl { state_dir, op } => ctl(&state_dir, &op),
        Command::Run {
            config,
            state_dir,
            no_seccomp,
        } => run_vm(&config, state_dir.as_deref(), !no_seccomp),
        Command::Daemon {
            bus,
            node_id,
            state_dir,
        } => {
            let vmm_bin = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("vmm: cannot find my own executable: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = vmm::daemon::Options {
                bus,
                node_id: node_id.unwrap_or_else(machine_id),
                state_dir,
                vmm_bin,
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vmm: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(vmm::daemon::run(opts)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmm: {:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn ctl(state_dir: &std::path::Path, op: &str) -> ExitCode {
    use std::io::{BufRead, Write};
    let path = state_dir.join("api.sock");
    let reply = std::os::unix::net::UnixStream::connect(&path).and_then(|mut s| {
        writeln!(s, "{}", serde_json::json!({ "op": op }))?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    });
    match reply {
        Ok(line) => {
            print!("{line}");
            let ok =
                serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|v| v["ok"] == true);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmm: cannot reach {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `vmm run` when the VM could not be created.
const EXIT_SETUP: u8 = 1;
/// Exit status when the VM crashed (the guest's own endings are 0).
const EXIT_CRASHED: u8 = 3;

fn read_config(arg: &str) -> anyhow::Result<vmm::config::VmConfig> {
    use anyhow::Context;
    use std::io::Read;
    let text = match arg.strip_prefix("fd:") {
        Some(n) => {
            let fd: i32 = n.parse().context("fd:N needs a descriptor number")?;
            if fd < 3 {
                anyhow::bail!("fd:{fd} is a standard stream, not a config");
            }
            // SAFETY: the caller handed this descriptor to us for the config;
            // nothing else in the process uses it.
            let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mut s = String::new();
            f.read_to_string(&mut s)
                .with_context(|| format!("cannot read the config from fd {fd}"))?;
            s
        }
        None => std::fs::read_to_string(arg)
            .with_context(|| format!("cannot read the config file {arg}"))?,
    };
    Ok(vmm::config::VmConfig::from_json(&text)?)
}

fn run_vm(config: &str, state_dir: Option<&std::path::Path>, seccomp: bool) -> ExitCode {
    use std::io::Write;
    let start = std::time::Instant::now();
    let cfg = match read_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let vm = match vmm::vm::Vm::new(&cfg, start) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // Files are opened now: after the seccomp filter, nothing can be opened.
    let mut exit_file = None;
    if let Some(dir) = state_dir {
        let opened = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(dir.join("pid"), format!("{}\n", std::process::id())))
            .and_then(|()| std::fs::File::create(dir.join("exit.json")));
        match opened {
            Ok(f) => exit_file = Some(f),
            Err(e) => {
                eprintln!("vmm: cannot use the state directory {}: {e}", dir.display());
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    let opts = vmm::vm::RunOptions {
        api_socket: state_dir.map(|d| d.join("api.sock")),
        seccomp,
    };
    match vm.run(opts) {
        Ok(reason) => {
            let line = serde_json::json!({ "exit": reason, "text": reason.to_string() });
            println!("{line}");
            if let Some(f) = exit_file.as_mut() {
                let _ = writeln!(f, "{line}").and_then(|()| f.sync_all());
            }
            if matches!(reason, vmm::vm::ExitReason::Crashed(_)) {
                ExitCode::from(EXIT_CRASHED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vmm: {:#}", anyhow::Error::from(e));
            ExitCode::from(EXIT_SETUP)
        }
    }
}

/// Prints a clap error as one line (help and version go out unchanged).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        print!("{e}");
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    eprintln!(
        "vmm: {} (see vmm --help)",
        first.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    // A plain level, or full `target=level` directives for debugging.
    let valid = level.parse::<tracing::Level>().is_ok() || level.contains('=');
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| {
            anyhow::anyhow!("invalid --log-level {level:?} (use error, warn, info, debug or trace)")
        })?;
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
    Ok(())
}
