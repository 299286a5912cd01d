//! Guest RAM: one memfd (optionally hugetlbfs), mapped shared so vhost-user
//! backends can map the same pages, registered with KVM slot by slot.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout;

/// Guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed (no hugepages reserved, out of memory).
    #[error("cannot allocate {mib} MiB of guest memory{}", if *.hugepages { " from hugepages" } else { "" })]
    Allocate {
        /// Size asked for.
        mib: u64,
        /// Whether hugepages were asked for.
        hugepages: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory with KVM")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// The guest's RAM and the file behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapping.
    pub mem: GuestMemoryMmap,
    /// The memfd, shared with vhost-user backends.
    pub file: File,
    /// Size in bytes.
    pub size: u64,
}

impl GuestRam {
    /// Allocates `mib` MiB and maps it.
    pub fn new(mib: u64, hugepages: bool) -> Result<Self, MemoryError> {
        let size = mib << 20;
        let alloc = |source| MemoryError::Allocate {
            mib,
            hugepages,
            source,
        };
        const NAME: &CStr = c"atoll-guest-ram";
        let mut flags = libc::MFD_CLOEXEC;
        if hugepages {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: NAME is a valid C string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
        if fd < 0 {
            return Err(alloc(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(alloc)?;
        if hugepages {
            // The mapping is MAP_NORESERVE: take every huge page now, so a
            // shortage is this error and not a SIGBUS in the middle of a run.
            let len = libc::off_t::try_from(size)
                .map_err(|_| alloc(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
            // SAFETY: fallocate on our own memfd with a valid range.
            let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
            if rc != 0 {
                return Err(alloc(std::io::Error::last_os_error()));
            }
        }
        let mut ranges = Vec::new();
        let mut file_off = 0u64;
        for (start, len) in layout::ram_ranges(size) {
            let len_usize = usize::try_from(len)
                .map_err(|_| alloc(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
            let dup = file.try_clone().map_err(alloc)?;
            ranges.push((
                GuestAddress(start),
                len_usize,
                Some(FileOffset::new(dup, file_off)),
            ));
            file_off += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        if !hugepages {
            for region in mem.iter() {
                advise_huge(region.as_ptr(), region.len());
            }
        }
        Ok(Self { mem, file, size })
    }

    /// Whether guest RAM can get transparent huge pages on this host: the
    /// memfd is shmem, whose THP policy is the host's `shmem_enabled` (it must
    /// be `advise`, `within_size`, `always` or `force`; kernels default to
    /// `never`, and then every 4 KiB of guest RAM costs its own nested-paging
    /// fault the first time the guest touches it).
    pub fn host_shmem_thp() -> Option<String> {
        let s =
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
        let start = s.find('[')?;
        let end = s[start..].find(']')?;
        Some(s[start + 1..start + end].to_string())
    }

    /// Registers every region as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region stays mapped for as long as the VM exists (both
            // live in the same `Vm`, memory dropped after the VM fd).
            unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::Kvm)?;
        }
        Ok(())
    }
}

/// Asks for transparent huge pages on a mapping of guest RAM. Fewer, larger
/// pages mean fewer faults while the guest first touches its memory and a
/// smaller nested page table; a host that does not allow THP for shmem simply
/// keeps 4 KiB pages.
fn advise_huge(ptr: *mut u8, len: u64) {
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    // SAFETY: the range is one mapping we own for the life of the guest;
    // MADV_HUGEPAGE changes only the page size the kernel may use for it.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) on guest RAM failed");
    }
}
