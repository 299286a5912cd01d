//! A vhost-user-blk frontend for tests: the `blkio` crate (pure-Rust libblkio), the
//! same code path a VM's virtio-blk driver takes through the socket.

#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Size of the shared buffer every request goes through.
pub const BUF: usize = 2 << 20;

pub struct Frontend {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Frontend {
    pub fn connect(socket: &Path, num_queues: i32) -> Result<Self, blkio::Error> {
        Self::connect_with(socket, num_queues, false)
    }

    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        read_only: bool,
    ) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let queues = blkio.start()?.queues;
        let region = blkio.alloc_mem_region(BUF)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            blkio,
            queues,
            region,
        })
    }

    /// Moves the request buffer to a newly mapped region (the frontend adds
    /// it to the backend's memory table); the old one stays mapped until
    /// [`Frontend::release`] (requests in flight may still use it).
    pub fn remap(&mut self) -> Result<MemoryRegion, blkio::Error> {
        let region = self.blkio.alloc_mem_region(BUF)?;
        self.blkio.map_mem_region(&region)?;
        Ok(std::mem::replace(&mut self.region, region))
    }

    /// Unmaps and frees a region [`Frontend::remap`] gave back.
    pub fn release(&mut self, old: &MemoryRegion) {
        self.blkio.unmap_mem_region(old);
        self.blkio.free_mem_region(old);
    }

    /// Submits what is queued without waiting; returns (tag, result) of
    /// any requests already complete.
    pub fn submit(&mut self) -> Vec<(usize, i32)> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 64];
        let mut zero = Duration::ZERO;
        let k = self.queues[0]
            .do_io(&mut done, 0, Some(&mut zero), None)
            .unwrap_or(0);
        done[..k]
            .iter()
            // SAFETY: do_io initialised the first `k` completions.
            .map(|c| unsafe { c.assume_init_ref() })
            .map(|c| (c.user_data, c.ret))
            .collect()
    }

    /// Queues a read of `len` bytes into slot `slot` (4 KiB slots of the
    /// buffer) without waiting; [`Frontend::slot`] has the bytes after.
    pub fn submit_read(&mut self, slot: usize, offset: u64, len: usize) {
        assert!(len <= 4096 && (slot + 1) * 4096 <= BUF);
        // SAFETY: the slot lies inside the BUF-byte region we own.
        let dst = unsafe { self.buf().add(slot * 4096) };
        self.queues[0].read(offset, dst, len, slot, ReqFlags::empty());
    }

    /// The first `len` bytes of slot `slot`.
    pub fn slot(&self, slot: usize, len: usize) -> Vec<u8> {
        assert!(len <= 4096 && (slot + 1) * 4096 <= BUF);
        let mut out = vec![0u8; len];
        // SAFETY: the slot lies inside the BUF-byte region we own.
        unsafe {
            std::ptr::copy_nonoverlapping(self.buf().add(slot * 4096), out.as_mut_ptr(), len)
        };
        out
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    pub fn read_only(&self) -> bool {
        self.blkio.get_bool("read-only").unwrap()
    }

    fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    /// Submits what `enqueue` queued on queue `q` and waits for its completion.
    fn complete(&mut self, q: usize) -> i32 {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = Duration::from_secs(10);
        let n = self.queues[q]
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "request did not complete within 10 s");
        // SAFETY: do_io initialised `n` completions.
        unsafe { done[0].assume_init_ref() }.ret
    }

    pub fn write_on(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= BUF);
        // SAFETY: the region is BUF bytes of mapped memory we own.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(), data.len()) };
        let buf = self.buf();
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.complete(q)
    }

    /// Queues a write of `data` staged at `slot` (4 KiB slots of the buffer) without
    /// waiting for it.
    pub fn submit_write(&mut self, slot: usize, offset: u64, data: &[u8]) {
        assert!(data.len() <= 4096 && (slot + 1) * 4096 <= BUF);
        // SAFETY: the slot lies inside the BUF-byte region we own.
        let dst = unsafe { self.buf().add(slot * 4096) };
        // SAFETY: `dst` has room for 4096 bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        self.queues[0].write(offset, dst, data.len(), slot, ReqFlags::empty());
    }

    /// Queues a flush without waiting for it.
    pub fn submit_flush(&mut self, tag: usize) {
        self.queues[0].flush(tag, ReqFlags::empty());
    }

    /// Submits what is queued and waits up to `timeout` for `n` completions; returns
    /// (tag, result) of those that completed.
    pub fn reap(&mut self, n: usize, timeout: Duration) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut left = timeout;
        while out.len() < n {
            let mut done = [const { MaybeUninit::<Completion>::uninit() }; 64];
            let before = left;
            match self.queues[0].do_io(&mut done, 1, Some(&mut left), None) {
                Ok(k) if k > 0 => {
                    for c in &done[..k] {
                        // SAFETY: do_io initialised the first `k` completions.
                        let c = unsafe { c.assume_init_ref() };
                        out.push((c.user_data, c.ret));
                    }
                }
                _ => break,
            }
            if left.is_zero() || left == before && out.is_empty() {
                break;
            }
        }
        out
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.write_on(0, offset, data)
    }

    pub fn read_on(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= BUF);
        let buf = self.buf();
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        match self.complete(q) {
            0 => {
                let mut out = vec![0u8; len];
                // SAFETY: as in write_on.
                unsafe { std::ptr::copy_nonoverlapping(self.buf(), out.as_mut_ptr(), len) };
                Ok(out)
            }
            e => Err(e),
        }
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.read_on(0, offset, len)
    }

    pub fn flush(&mut self) -> i32 {
        self.queues[0].flush(0, ReqFlags::empty());
        self.complete(0)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.queues[0].discard(offset, len, 0, ReqFlags::empty());
        self.complete(0)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> i32 {
        self.queues[0].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete(0)
    }
}

/// Deterministic bytes that differ for every (seed, position).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A D-Bus error reply as `name: message`; panics on any other error.
pub fn error_name(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, msg, _) => format!("{name}: {}", msg.unwrap_or_default()),
        other => panic!("expected a D-Bus error reply, got {other}"),
    }
}

/// A private D-Bus broker, a client connection to it and a scratch directory, for
/// tests that drive the `stord` binary.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub bus: atoll_tests::TestBus,
    pub rt: tokio::runtime::Runtime,
    pub conn: zbus::Connection,
}

impl Rig {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus = atoll_tests::TestBus::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = rt
            .block_on(
                zbus::connection::Builder::address(bus.address())
                    .unwrap()
                    .build(),
            )
            .unwrap();
        Self { dir, bus, rt, conn }
    }

    /// Starts stord on the rig's pool and waits until it owns its name.
    pub fn spawn_stord(&self) -> std::process::Child {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stord"))
            .args([
                "--bus",
                self.bus.address(),
                "--log-level",
                "warn",
                "--data-dir",
            ])
            .arg(self.dir.path().join("pool"))
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.block_on(atoll_tests::contract::wait_owner(
            &self.conn,
            stord::BUS_NAME,
            true,
        ));
        child
    }

    /// Typed client of the volume object at `path`.
    pub fn volume(&self, path: &zbus::zvariant::OwnedObjectPath) -> stord::VolumeProxy<'static> {
        self.block_on(
            stord::VolumeProxy::builder(&self.conn)
                .path(path.clone())
                .unwrap()
                .build(),
        )
        .unwrap()
    }

    /// Typed client of the snapshot object at `path`.
    pub fn snapshot(
        &self,
        path: &zbus::zvariant::OwnedObjectPath,
    ) -> stord::SnapshotProxy<'static> {
        self.block_on(
            stord::SnapshotProxy::builder(&self.conn)
                .path(path.clone())
                .unwrap()
                .build(),
        )
        .unwrap()
    }

    /// Object paths of the volumes stord's ObjectManager announces.
    pub fn volume_paths(&self) -> std::collections::HashSet<zbus::zvariant::OwnedObjectPath> {
        let om = self
            .block_on(
                zbus::fdo::ObjectManagerProxy::builder(&self.conn)
                    .destination(stord::BUS_NAME)
                    .unwrap()
                    .path(stord::OBJECT_PATH)
                    .unwrap()
                    .build(),
            )
            .unwrap();
        let objects = self.block_on(om.get_managed_objects()).unwrap();
        objects
            .into_iter()
            .filter(|(_, ifaces)| {
                ifaces
                    .keys()
                    .any(|i| i.as_str() == "org.atoll.Storage1.Volume")
            })
            .map(|(path, _)| path)
            .collect()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
