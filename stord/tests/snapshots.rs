//! Snapshots, clones, rollback and snapshot deletion driven over D-Bus on the
//! `stord` binary, with every byte of every volume checked through a real
//! vhost-user-blk frontend against an in-memory model, across a restart.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use common::{error_name, pattern, Frontend, Rig};
use stord::{SnapshotProxy, Storage1Proxy, VolumeProxy};
use zbus::zvariant::OwnedObjectPath;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Writes that exercise whole clusters, partial clusters (copy-up from below),
/// runs crossing cluster edges and single sectors.
fn scribble(fe: &mut Frontend, model: &mut [u8], seed: u64) {
    let cases: [(u64, usize); 6] = [
        (seed * 8192 % MIB, 4096),
        (MIB + 512 * (seed % 7), 512),
        (2 * MIB + 1024, 3 * 4096),
        (5 * MIB + 4096 * seed, 128 << 10),
        (SIZE - 8192, 1536),
        ((7 + seed) * MIB + 2560, 4096),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(seed * 100 + i as u64, len);
        assert_eq!(fe.write(off, &data), 0, "write {off}+{len}");
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert_eq!(fe.flush(), 0);
}

/// Reads the whole volume and compares it with `model`, naming the first
/// differing byte.
fn check(fe: &mut Frontend, model: &[u8], what: &str) {
    for chunk in 0..model.len() / MIB as usize {
        let off = chunk * MIB as usize;
        let got = fe.read(off as u64, MIB as usize).unwrap();
        if got != model[off..off + MIB as usize] {
            let i = got
                .iter()
                .zip(&model[off..])
                .position(|(a, b)| a != b)
                .unwrap();
            panic!("{what}: byte {} differs", off + i);
        }
    }
}

struct Vol<'a> {
    rig: &'a Rig,
    proxy: VolumeProxy<'static>,
}

impl<'a> Vol<'a> {
    fn new(rig: &'a Rig, path: &OwnedObjectPath) -> Self {
        Self {
            rig,
            proxy: rig.volume(path),
        }
    }

    /// Attaches read-write and runs `f` with a connected frontend.
    fn with<T>(&self, f: impl FnOnce(&mut Frontend) -> T) -> T {
        let socket = self.rig.block_on(self.proxy.attach(false)).unwrap();
        let mut fe = Frontend::connect(Path::new(&socket), 1).unwrap();
        let out = f(&mut fe);
        drop(fe);
        self.rig.block_on(self.proxy.detach(&socket)).unwrap();
        out
    }

    fn snapshot(&self, name: &str) -> SnapshotProxy<'static> {
        self.rig
            .snapshot(&self.rig.block_on(self.proxy.snapshot(name)).unwrap())
    }
}

fn layers(rig: &Rig) -> usize {
    std::fs::read_dir(rig.dir.path().join("pool/layers"))
        .unwrap()
        .count()
}

#[test]
fn snapshot_clone_rollback_and_delete_keep_every_byte() {
    let rig = Rig::new();
    let _guard = rig.rt.enter();
    let mut daemon = rig.spawn_stord();
    let storage = rig.block_on(Storage1Proxy::new(&rig.conn)).unwrap();
    let vpath = rig.block_on(storage.create_volume("vm1", SIZE)).unwrap();
    let vol = Vol::new(&rig, &vpath);
    let mut now = vec![0u8; SIZE as usize];

    // Snapshots are taken while the volume is attached and written to.
    let socket = rig.block_on(vol.proxy.attach(false)).unwrap();
    let mut fe = Frontend::connect(Path::new(&socket), 2).unwrap();
    scribble(&mut fe, &mut now, 1);
    let s1 = vol.snapshot("s1");
    let at_s1 = now.clone();
    scribble(&mut fe, &mut now, 2);
    check(&mut fe, &now, "after writes over s1");
    let s2 = vol.snapshot("s2");
    let at_s2 = now.clone();
    scribble(&mut fe, &mut now, 3);
    let s3 = vol.snapshot("s3");
    scribble(&mut fe, &mut now, 4);
    check(&mut fe, &now, "live volume over three snapshots");
    let e = error_name(rig.block_on(vol.proxy.snapshot("s1")).unwrap_err());
    assert!(e.contains("InvalidArgument") && e.contains("taken"), "{e}");
    let e = error_name(
        rig.block_on(vol.proxy.rollback(&s1.inner().path().to_owned()))
            .unwrap_err(),
    );
    assert!(e.contains("Busy"), "rollback under a VM: {e}");
    drop(fe);
    rig.block_on(vol.proxy.detach(&socket)).unwrap();
    assert_eq!(
        rig.block_on(vol.proxy.snapshots()).unwrap(),
        vec![
            s1.inner().path().to_owned().into(),
            s2.inner().path().to_owned().into(),
            s3.inner().path().to_owned().into()
        ]
    );
    assert_eq!(rig.block_on(s2.name()).unwrap(), "s2");
    assert_eq!(rig.block_on(s2.volume()).unwrap(), vpath);

    // A clone of s1 reads s1's contents; writes to it leave the original alone.
    let cpath = rig.block_on(s1.clone_to("vm1-clone")).unwrap();
    let clone = Vol::new(&rig, &cpath);
    let mut in_clone = at_s1.clone();
    clone.with(|fe| {
        check(fe, &in_clone, "clone of s1");
        scribble(fe, &mut in_clone, 5);
        check(fe, &in_clone, "clone after writes");
    });
    vol.with(|fe| check(fe, &now, "original after the clone's writes"));

    // Rollback to s1, then to s2 (later snapshots survive a rollback).
    rig.block_on(vol.proxy.rollback(&s1.inner().path().to_owned()))
        .unwrap();
    vol.with(|fe| check(fe, &at_s1, "rolled back to s1"));
    rig.block_on(vol.proxy.rollback(&s2.inner().path().to_owned()))
        .unwrap();
    now = at_s2.clone();
    vol.with(|fe| {
        check(fe, &now, "rolled back to s2");
        scribble(fe, &mut now, 6);
    });

    // Deleting snapshots: s3 had nothing above it but data, s1 is shared with the
    // clone; the volume and the clone read the same afterwards, and layers go.
    let before = layers(&rig);
    rig.block_on(s3.delete()).unwrap();
    assert!(layers(&rig) < before, "deleting s3 freed no layer");
    rig.block_on(s1.delete()).unwrap();
    vol.with(|fe| check(fe, &now, "after deleting s1 and s3"));
    clone.with(|fe| check(fe, &in_clone, "clone after deleting s1"));
    let e = error_name(rig.block_on(s1.delete()).unwrap_err());
    assert!(
        e.contains("UnknownObject"),
        "a deleted snapshot's object must go: {e}"
    );

    // Everything survives a restart.
    let stop = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    stop.unwrap();
    assert!(daemon.wait().unwrap().success());
    daemon = rig.spawn_stord();
    let vol = Vol::new(&rig, &vpath);
    assert_eq!(rig.block_on(vol.proxy.snapshots()).unwrap().len(), 1);
    vol.with(|fe| check(fe, &now, "volume after restart"));
    let clone = Vol::new(&rig, &cpath);
    clone.with(|fe| check(fe, &in_clone, "clone after restart"));

    // Deleting the clone merges the layer it shared into the volume's chain
    // where needed; deleting the last snapshot and the volume frees everything.
    rig.block_on(clone.proxy.delete()).unwrap();
    vol.with(|fe| check(fe, &now, "volume after deleting the clone"));
    let s2 = rig.block_on(vol.proxy.snapshots()).unwrap();
    let s2 = rig.snapshot(&s2[0]);
    rig.block_on(s2.delete()).unwrap();
    assert_eq!(layers(&rig), 1, "a volume without snapshots is one layer");
    vol.with(|fe| check(fe, &now, "volume after deleting every snapshot"));
    rig.block_on(vol.proxy.delete()).unwrap();
    assert_eq!(layers(&rig), 0);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn snapshots_taken_under_in_flight_io_lose_nothing() {
    let rig = Rig::new();
    let _guard = rig.rt.enter();
    let mut daemon = rig.spawn_stord();
    let storage = rig.block_on(Storage1Proxy::new(&rig.conn)).unwrap();
    let vpath = rig.block_on(storage.create_volume("busy", SIZE)).unwrap();
    let vol = Vol::new(&rig, &vpath);
    let socket = rig.block_on(vol.proxy.attach(false)).unwrap();
    let mut fe = Frontend::connect(Path::new(&socket), 1).unwrap();
    let mut now = vec![0u8; SIZE as usize];
    // Rounds of 32 writes left in flight while a snapshot is taken, some of
    // them to clusters the new top layer does not hold yet.
    for round in 0..8u64 {
        for slot in 0..32usize {
            let off = ((round * 37 + slot as u64 * 13) % (SIZE / 4096)) * 4096;
            let data = pattern(round * 1000 + slot as u64, 4096);
            fe.submit_write(slot, off, &data);
            now[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
        vol.snapshot(&format!("s{round}"));
        let done = fe.reap(32, std::time::Duration::from_secs(10));
        assert_eq!(
            done.len(),
            32,
            "round {round}: writes lost across a snapshot"
        );
        assert!(done.iter().all(|&(_, r)| r == 0), "round {round}: {done:?}");
    }
    check(&mut fe, &now, "volume written across eight snapshots");
    drop(fe);
    rig.block_on(vol.proxy.detach(&socket)).unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
