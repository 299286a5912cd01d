//! Atoll's management daemon and the `atoll` command.
//!
//! `mgmtd` serves the REST API and the web UI over HTTPS, keeps the node's state in
//! SQLite, and reads the other daemons through their D-Bus proxies (`vmm`, `netd`,
//! `stord` are its only Atoll dependencies). `atoll up` runs a whole single-node
//! Atoll on a developer machine: a private D-Bus broker and the four daemons as
//! supervised child processes.

pub mod cli;
pub mod daemon;
pub mod db;
pub mod dbus;
pub mod http;
pub mod report;
pub mod supervisor;
pub mod tls;

/// Version of this crate, reported on D-Bus and in the API.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
