//! Atoll's network daemon: a userspace virtual switch whose ports are vhost-user-net
//! sockets. This library is the crate's single door: it exports the D-Bus interface
//! `org.atoll.Net1`, the typed proxy that `mgmtd` uses, and the daemon's entry point.

pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod dbus;
pub mod dhcp;
pub mod dhcp6;
pub mod dns;
pub mod dnsfwd;
pub mod external6;
pub mod fabric;
pub mod flow;
pub mod frame;
pub mod fuzzing;
pub mod health;
pub mod l2;
pub(crate) mod memo;
pub mod metadata;
pub mod nat;
pub mod ndp;
pub mod objects;
pub mod offload;
pub mod overlay;
pub mod persist;
pub mod port;
pub mod qos;
pub mod ring;
pub mod router;
pub mod secgroup;
pub mod switch;
pub mod tunnel;
pub mod uplink;

pub use dbus::{Net1Proxy, BUS_NAME, OBJECT_PATH};

/// Version of this crate, reported on D-Bus.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
