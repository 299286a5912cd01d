//! The VM process's seccomp filter, installed on every thread once the VM is
//! built: only the system calls a running VM needs (KVM ioctls by request
//! number, eventfds, sockets already open, memory management, threads for
//! devices started later). Anything else kills the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building the BPF program failed.
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused it.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

// ioctl request numbers (include/uapi/linux/kvm.h, asm-generic/ioctls.h).
const KVM_RUN: u64 = 0xae80;
const KVM_IRQFD: u64 = 0x4020_ae76;
const KVM_IOEVENTFD: u64 = 0x4040_ae79;
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
const TCGETS: u64 = 0x5401;

/// System calls allowed with any arguments.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The BPF program for this process.
pub fn filter() -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    let mut ioctls = Vec::new();
    for req in [
        KVM_RUN,
        KVM_IRQFD,
        KVM_IOEVENTFD,
        KVM_SET_GSI_ROUTING,
        KVM_SIGNAL_MSI,
        FIONBIO,
        FIOCLEX,
        TCGETS,
    ] {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
            .map_err(build)?;
        ioctls.push(SeccompRule::new(vec![cond]).map_err(build)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    // A NIC reconnects to a backend that restarted: Unix sockets only
    // (connect needs no rule of its own: it takes the socket made here).
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(build)?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![unix]).map_err(build)?],
    );
    rules.insert(libc::SYS_connect, Vec::new());
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(f).map_err(build)
}

/// Installs the filter on every thread of the process.
pub fn install() -> Result<(), SeccompError> {
    let prog = filter()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Install)
}
