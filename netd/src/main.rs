//! The `netd` binary: the node's network daemon.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "netd", version, about = "Atoll network daemon")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// D-Bus address to connect to (default: the system bus).
    #[arg(long, value_name = "ADDRESS")]
    bus: Option<String>,
    /// Identifier of this node (default: /etc/machine-id).
    #[arg(long)]
    node_id: Option<String>,
    /// Directory for the ports' vhost-user sockets.
    #[arg(long, value_name = "DIR", default_value = "/run/atoll/netd")]
    run_dir: std::path::PathBuf,
    /// Directory for the configuration kept across restarts (netd.db):
    /// networks, subnets, ports, security groups, floating IPs.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/atoll/netd")]
    data_dir: std::path::PathBuf,
    /// Data-path threads polling the ports' queues (default: a quarter of
    /// the CPUs this process may use, 1 to 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    datapath_threads: Option<u16>,
    /// Requests each port may make to the switch's own services (DHCP,
    /// DHCPv6, DNS, neighbour discovery, metadata) a second; as many again
    /// may come at once. Beyond that they are dropped and counted.
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..))]
    service_rate: u32,
    /// A resolver the VPC routers forward DNS queries for names that are
    /// not the VPC's to (ADDR or ADDR:PORT; repeatable; "none" forwards
    /// nothing). Default: the nameservers of /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    dns_upstreams: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("netd: {e}");
        return ExitCode::from(2);
    }
    let opts = netd::daemon::Options {
        bus: cli.bus,
        node_id: cli.node_id.unwrap_or_else(machine_id),
        run_dir: cli.run_dir,
        data_dir: cli.data_dir,
        datapath_threads: cli
            .datapath_threads
            .map_or_else(default_datapath_threads, usize::from),
        service_limit: (
            f64::from(cli.service_rate),
            f64::from(cli.service_rate) / 2.0,
        ),
        dns_upstreams: match dns_upstreams(&cli.dns_upstreams) {
            Ok(u) => u,
            Err(bad) => {
                eprintln!("netd: --dns-upstream {bad:?}: want an address, ADDR:PORT or \"none\"");
                return ExitCode::from(2);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(netd::daemon::run(opts)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netd: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

/// Prints a clap error as one line (help and version go out unchanged).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        // A reader that stops early (`netd --help | grep -q`) is not an
        // error of ours.
        let _ = write!(std::io::stdout(), "{e}");
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    eprintln!(
        "netd: {} (see netd --help)",
        first.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// A quarter of the CPUs the process may run on (its affinity), 1 to 4:
/// polling threads leave the rest to the VMs.
/// The resolvers from `--dns-upstream` values (the host's when none are
/// given); Err names a value that is not an address.
fn dns_upstreams(given: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    if given.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        return Ok(netd::dnsfwd::nameservers(&conf));
    }
    if given == ["none"] {
        return Ok(Vec::new());
    }
    given
        .iter()
        .map(|g| {
            g.parse::<std::net::SocketAddr>()
                .or_else(|_| g.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| g.clone())
        })
        .collect()
}

fn default_datapath_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 4)
        .clamp(1, 4)
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
