//! Small pieces shared by the `mgmtd` and `atoll` binaries.

use std::process::ExitCode;

/// Prints a clap error as one line prefixed by the program name; help and version
/// requests are printed unchanged and succeed.
pub fn usage_error(program: &str, e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        print!("{e}");
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    eprintln!(
        "{program}: {} (see {program} --help)",
        first.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// Sets up `tracing` to print plain lines on stderr (no colours; no timestamps when
/// journald captures the stream, since it stamps every line itself).
pub fn init_logging(level: &str) -> Result<(), String> {
    // A plain level, or full `target=level` directives for debugging.
    let valid = level.parse::<tracing::Level>().is_ok() || level.contains('=');
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| {
            format!("invalid --log-level {level:?} (use error, warn, info, debug or trace)")
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// The node identifier from `/etc/machine-id`, or `unknown`.
pub fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
