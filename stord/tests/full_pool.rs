//! A full pool: writes that find no space fail with an I/O error status, every
//! other volume keeps serving, flushed data survives, and deleting a volume gives
//! the space back. The pool is a 16 MiB tmpfs mounted for the test (needs root,
//! as CI has).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pattern, Frontend, Rig};
use stord::Storage1Proxy;

const MIB: u64 = 1 << 20;

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a small tmpfs for the pool (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_pool_fails_writes_cleanly_and_recovers() {
    let rig = Rig::new();
    let _guard = rig.rt.enter();
    let _mount = Mount::tmpfs(&rig.dir.path().join("pool"), "16m");
    let mut daemon = rig.spawn_stord();
    let storage = rig.block_on(Storage1Proxy::new(&rig.conn)).unwrap();
    // Thin volumes promise more than the pool has.
    let a = rig.volume(&rig.block_on(storage.create_volume("a", 64 * MIB)).unwrap());
    let b = rig.volume(&rig.block_on(storage.create_volume("b", 64 * MIB)).unwrap());
    let sa = rig.block_on(a.attach(false)).unwrap();
    let mut fa = Frontend::connect(Path::new(&sa), 1).unwrap();
    let kept = pattern(1, 4 * MIB as usize);
    for i in 0..4 {
        let chunk = &kept[i * MIB as usize..(i + 1) * MIB as usize];
        assert_eq!(fa.write(i as u64 * MIB, chunk), 0);
    }
    assert_eq!(fa.flush(), 0);

    // Fill the pool through b until a write fails.
    let sb = rig.block_on(b.attach(false)).unwrap();
    let mut fb = Frontend::connect(Path::new(&sb), 1).unwrap();
    let mut failed = None;
    for i in 0..64 {
        let r = fb.write(i * MIB, &pattern(100 + i, MIB as usize));
        if r != 0 {
            failed = Some((i, r));
            break;
        }
    }
    let (at, errno) = failed.expect("64 MiB fit in a 16 MiB pool");
    assert_eq!(
        errno,
        -libc::EIO,
        "a write with no space left must fail with EIO"
    );
    assert!(at >= 4, "the pool filled after only {at} MiB");

    // Everything else goes on: a's data reads back, overwrites in place work,
    // b's earlier writes are intact, flush still answers.
    for i in 0..4 {
        let got = fa.read(i as u64 * MIB, MIB as usize).unwrap();
        assert!(
            got == kept[i * MIB as usize..(i + 1) * MIB as usize],
            "a lost data"
        );
    }
    assert_eq!(fa.write(0, &kept[..4096]), 0);
    assert_eq!(
        fb.read(0, MIB as usize).unwrap(),
        pattern(100, MIB as usize)
    );
    assert_eq!(fa.flush(), 0);
    // A snapshot needs a few KiB; whether it fits or not, the answer is clean.
    if let Err(e) = rig.block_on(a.snapshot("when-full")) {
        let text = e.to_string();
        assert!(text.contains("org.atoll.Storage1.Error.Failed"), "{text}");
    }

    // Deleting b gives the space back: a can grow into it.
    drop(fb);
    rig.block_on(b.detach(&sb)).unwrap();
    rig.block_on(b.delete()).unwrap();
    assert_eq!(fa.write(32 * MIB, &pattern(7, MIB as usize)), 0);
    assert_eq!(fa.flush(), 0);
    drop(fa);
    rig.block_on(a.detach(&sa)).unwrap();

    // And all of it is there after a restart.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let mut daemon = rig.spawn_stord();
    let paths = rig.volume_paths();
    assert_eq!(paths.len(), 1);
    let a = rig.volume(paths.iter().next().unwrap());
    let sa = rig.block_on(a.attach(true)).unwrap();
    let mut fa = Frontend::connect_with(Path::new(&sa), 1, true).unwrap();
    assert!(fa.read(MIB, MIB as usize).unwrap() == kept[MIB as usize..2 * MIB as usize]);
    assert_eq!(
        fa.read(32 * MIB, MIB as usize).unwrap(),
        pattern(7, MIB as usize)
    );
    drop(fa);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
