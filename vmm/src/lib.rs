//! Atoll's hypervisor.
//!
//! The `vmm` binary has two roles: `vmm daemon` is the node's VM supervisor that owns
//! `org.atoll.Vmm1` on D-Bus; `vmm run` is the process of one VM. This library
//! is the crate's single door: it exports the D-Bus interface and the typed proxy that
//! `mgmtd` uses, and the supervisor's entry point.

pub mod api;
pub mod arch;
pub mod bus;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod devices;
pub mod fuzzing;
pub mod health;
pub mod interrupts;
pub mod memory;
pub mod pci;
pub mod seccomp;
pub mod supervisor;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use dbus::{VmProxy, Vmm1Proxy, BUS_NAME, OBJECT_PATH};

/// Version of this crate, reported on D-Bus.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Stack of a vCPU thread. Rust's default (2 MiB) is more than device
/// emulation needs, and on a host with transparent huge pages set to
/// `always` a 2 MiB-aligned stack becomes one huge page of resident memory.
pub const VCPU_STACK: usize = 512 << 10;
/// Stack of the VMM's other threads (device queues, console).
pub const DEVICE_STACK: usize = 256 << 10;
