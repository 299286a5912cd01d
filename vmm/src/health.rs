//! What the VM supervisor checks to call itself healthy.

use kvm_ioctls::Kvm;

/// Health of the VM supervisor, as published in the `Health` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `ok`, `degraded` or `failed`.
    pub state: &'static str,
    /// Why the state is not `ok`; empty when it is.
    pub detail: String,
    /// `KVM_GET_API_VERSION`, or 0 when `/dev/kvm` cannot be used.
    pub kvm_api_version: u32,
}

/// Probes `/dev/kvm`: the node cannot run VMs without it, but the supervisor still
/// serves its interface so the operator sees why.
pub fn probe() -> Health {
    match Kvm::new() {
        Ok(kvm) => {
            let version = u32::try_from(kvm.get_api_version()).unwrap_or(0);
            if version == 12 {
                Health {
                    state: "ok",
                    detail: String::new(),
                    kvm_api_version: version,
                }
            } else {
                Health {
                    state: "degraded",
                    detail: format!("unexpected KVM API version {version} (want 12)"),
                    kvm_api_version: version,
                }
            }
        }
        Err(e) => Health {
            state: "degraded",
            detail: format!("/dev/kvm unavailable: {e}"),
            kvm_api_version: 0,
        },
    }
}
