//! Atoll's network daemon: a userspace virtual switch whose ports are vhost-user-net
//! sockets. This library is the crate's single door: it exports the D-Bus interface
//! `org.atoll.Net1`, the typed proxy that `mgmtd` uses, and the daemon's entry point.

pub mod daemon;
pub mod dbus;
pub mod dhcp;
pub mod frame;
pub mod fuzzing;
pub mod health;
pub mod l2;
pub mod port;
pub mod switch;

pub use dbus::{Net1Proxy, BUS_NAME, OBJECT_PATH};

/// Version of this crate, reported on D-Bus.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
