//! What the storage daemon checks to call itself healthy.

/// Health of the storage daemon, as published in the `Health` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `ok`, `degraded` or `failed`.
    pub state: &'static str,
    /// Why the state is not `ok`; empty when it is.
    pub detail: String,
    /// Whether the kernel lets this process set up an io_uring.
    pub io_uring_available: bool,
}

/// Probes io_uring, which every volume's I/O path runs on.
pub fn probe() -> Health {
    match io_uring::IoUring::new(2) {
        Ok(_) => Health {
            state: "ok",
            detail: String::new(),
            io_uring_available: true,
        },
        Err(e) => Health {
            state: "degraded",
            detail: format!("io_uring unavailable: {e}"),
            io_uring_available: false,
        },
    }
}
