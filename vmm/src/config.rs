//! The configuration of one VM (`vmm run --config`), as JSON.
//!
//! Every field a user can get wrong is checked by [`VmConfig::validate`] before
//! anything is created, so a bad config ends in one precise error message.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest vCPU count accepted (the MP table and APIC IDs are sized for it).
pub const MAX_VCPUS: u8 = 64;
/// Smallest guest memory accepted, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory accepted, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// What is wrong with a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON did not parse or has unknown or mistyped fields.
    #[error("invalid VM config: {0}")]
    Parse(#[from] serde_json::Error),
    /// A value is out of range or inconsistent.
    #[error("invalid VM config: {0}")]
    Invalid(String),
}

/// One VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name used in logs.
    #[serde(default = "default_name")]
    pub name: String,
    /// Number of vCPUs.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Back guest memory with huge pages (hugetlbfs memfd).
    #[serde(default)]
    pub hugepages: bool,
    /// Host CPUs each vCPU may run on (index = vCPU); empty: no pinning.
    #[serde(default)]
    pub cpu_affinity: Vec<Vec<usize>>,
    /// What to boot.
    pub boot: BootConfig,
    /// The 16550 serial port (COM1).
    #[serde(default)]
    pub serial: SerialConfig,
    /// vhost-user-blk disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<VhostUserConfig>,
    /// vhost-user-net NICs.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Read-only virtio-blk disks on local files (ISO or seed media).
    #[serde(default)]
    pub media: Vec<MediaConfig>,
    /// Offer a virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// Let the guest end the VM with a status byte written to port 0x501
    /// (test guests; off for real VMs).
    #[serde(default)]
    pub debug_exit: bool,
    /// Describe the machine with ACPI tables too (power button for a graceful
    /// shutdown, S5 poweroff, reset register, the legacy devices' interrupts).
    /// On by default; without them the guest finds the machine through the MP
    /// table and has no power button.
    #[serde(default = "yes")]
    pub acpi: bool,
}

/// Direct kernel boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// A bzImage, a PVH `vmlinux`, or a 64-bit ELF entered in long mode.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// Where the serial port's bytes go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Unix stream socket a console client can attach to at any time.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Bytes of output kept while nobody is attached (replayed on attach).
    #[serde(default = "default_ring")]
    pub buffer_bytes: usize,
}

/// A vhost-user device reached over a Unix socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VhostUserConfig {
    /// The backend's socket.
    pub socket: PathBuf,
    /// Queues to use (at most what the backend offers).
    #[serde(default = "one_u16")]
    pub num_queues: u16,
    /// Size of each queue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

/// A vhost-user-net NIC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The backend's socket; `num_queues` counts data queues, two per
    /// queue pair (default one pair; more pairs add a control queue the
    /// vmm answers).
    #[serde(flatten)]
    pub vhost: VhostUserConfig,
    /// MAC address offered to the guest, `52:54:00:12:34:56` form.
    pub mac: String,
}

/// A read-only local disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MediaConfig {
    /// Image file, served raw.
    pub path: PathBuf,
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            socket: None,
            buffer_bytes: default_ring(),
        }
    }
}

fn default_name() -> String {
    "vm".into()
}
fn one() -> u8 {
    1
}
fn yes() -> bool {
    true
}

fn one_u16() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}
fn default_ring() -> usize {
    64 << 10
}

impl VmConfig {
    /// Parses and validates a JSON config.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and consistency; files are checked when they are opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_VCPUS}, not {}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, not {}",
                self.memory_mib
            ));
        }
        if self.hugepages && self.memory_mib % 2 != 0 {
            return bad("memory_mib must be a multiple of 2 with hugepages".into());
        }
        if !self.cpu_affinity.is_empty() && self.cpu_affinity.len() != usize::from(self.vcpus) {
            return bad(format!(
                "cpu_affinity has {} entries for {} vCPUs",
                self.cpu_affinity.len(),
                self.vcpus
            ));
        }
        if self.cpu_affinity.iter().any(Vec::is_empty) {
            return bad("cpu_affinity entries must name at least one host CPU".into());
        }
        if self.boot.kernel.as_os_str().is_empty() {
            return bad("boot.kernel is empty".into());
        }
        if self.serial.buffer_bytes > 64 << 20 {
            return bad("serial.buffer_bytes is above 64 MiB".into());
        }
        for (i, d) in self
            .disks
            .iter()
            .chain(self.nets.iter().map(|n| &n.vhost))
            .enumerate()
        {
            if d.num_queues == 0 || d.num_queues > 64 {
                return bad(format!("device {i}: num_queues must be 1..=64"));
            }
            if !d.queue_size.is_power_of_two() || d.queue_size > 32768 {
                return bad(format!(
                    "device {i}: queue_size must be a power of two up to 32768"
                ));
            }
        }
        for n in &self.nets {
            parse_mac(&n.mac).map_err(ConfigError::Invalid)?;
        }
        if self.devices() > crate::pci::MAX_DEVICES {
            return bad(format!(
                "{} devices do not fit on the PCI bus (at most {})",
                self.devices(),
                crate::pci::MAX_DEVICES
            ));
        }
        Ok(())
    }

    /// PCI devices this config asks for (not counting the host bridge).
    pub fn devices(&self) -> usize {
        self.disks.len() + self.nets.len() + self.media.len() + usize::from(self.rng)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} is not six hex bytes separated by ':'"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC {s:?} has a bad byte {p:?}"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({"memory_mib": 64, "boot": {"kernel": "/k"}})
    }

    fn err(v: serde_json::Value) -> String {
        VmConfig::from_json(&v.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = VmConfig::from_json(&base().to_string()).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.serial.buffer_bytes, 64 << 10);
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn rejects_bad_values_precisely() {
        let mut v = base();
        v["vcpus"] = 0.into();
        assert!(err(v).contains("vcpus must be 1..=64, not 0"));
        let mut v = base();
        v["memory_mib"] = 1.into();
        assert!(err(v).contains("memory_mib must be"));
        let mut v = base();
        v["bogus"] = 1.into();
        assert!(err(v).contains("unknown field `bogus`"));
        let mut v = base();
        v["nets"] =
            serde_json::json!([{"socket": "/s", "mac": "01:00:00:00:00:01", "num_queues": 2}]);
        assert!(err(v).contains("multicast"));
        let mut v = base();
        v["nets"] =
            serde_json::json!([{"socket": "/s", "mac": "52:54:00:00:00:zz", "num_queues": 2}]);
        assert!(err(v).contains("bad byte"));
        let mut v = base();
        v["disks"] = serde_json::json!([{"socket": "/s", "queue_size": 100}]);
        assert!(err(v).contains("power of two"));
        let mut v = base();
        v["cpu_affinity"] = serde_json::json!([[0], [1]]);
        assert!(err(v).contains("2 entries for 1 vCPUs"));
        assert!(VmConfig::from_json("{")
            .unwrap_err()
            .to_string()
            .contains("EOF"));
    }
}
