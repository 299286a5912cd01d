//! Atoll's storage daemon: thin copy-on-write volumes served as vhost-user-blk
//! sockets. This library is the crate's single door: it exports the D-Bus interface
//! `org.atoll.Storage1`, the typed proxy that `mgmtd` uses, and the daemon's entry point.

pub mod daemon;
pub mod dbus;
pub mod health;
pub mod vhost_blk;
pub mod volume;

pub use dbus::{Storage1Proxy, BUS_NAME, OBJECT_PATH};

/// Version of this crate, reported on D-Bus.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
