//! Atoll's storage daemon: thin copy-on-write volumes served as vhost-user-blk
//! sockets. This library is the crate's single door: it exports the D-Bus interface
//! `org.atoll.Storage1`, the typed proxy that `mgmtd` uses, and the daemon's entry point.

pub mod cmap;
pub mod daemon;
pub mod dbus;
pub mod disk;
pub mod health;
pub mod image;
pub mod job;
pub mod layer;
pub mod pool;
pub mod qos;
pub mod store;
pub mod vhost_blk;
pub mod volume;

pub use dbus::{SnapshotProxy, Storage1Proxy, VolumeProxy, BUS_NAME, OBJECT_PATH};
pub use job::JobProxy;

/// Version of this crate, reported on D-Bus.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its causes as one line: `error: cause: cause`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
