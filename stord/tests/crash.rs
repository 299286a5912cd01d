//! Crash consistency: a writer issues random writes and flushes through a real
//! vhost-user-blk frontend while stord is killed with SIGKILL at random points, many
//! times. After every restart each acknowledged-and-flushed write reads back, every
//! block holds a value that was actually written to it, and no volume is lost.
//!
//! Blocks are half a cluster, so in the copy-on-write layers that the snapshots
//! taken along the way put on top, every write copies the rest of its cluster up:
//! the cluster maps' crash consistency is what is under test there. Some rounds
//! delete the oldest snapshot, merging layers under the live volume.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{pattern, Frontend, Rig};
use stord::Storage1Proxy;

const BLOCK: usize = 2048;
const BLOCKS: u64 = 2048; // 4 MiB volume
const ROUNDS: u64 = 25;

/// What a block may hold: the last flushed generation, plus generations written
/// after it (acknowledged or in flight when stord died).
#[derive(Default, Clone)]
struct Block {
    durable: Option<u64>,
    maybe: Vec<u64>,
}

fn content(block: u64, generation: Option<u64>) -> Vec<u8> {
    match generation {
        Some(g) => pattern(block << 32 | g, BLOCK),
        None => vec![0; BLOCK],
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn flushed_writes_survive_sigkill_of_stord() {
    let rig = Rig::new();
    let (rt, conn) = (&rig.rt, &rig.conn);
    let _guard = rt.enter();
    let mut daemon = rig.spawn_stord();
    let storage = rt.block_on(Storage1Proxy::new(conn)).unwrap();
    let path = rt
        .block_on(storage.create_volume("crash", BLOCKS * BLOCK as u64))
        .unwrap();
    let spare = rt
        .block_on(storage.create_volume("bystander", 1 << 20))
        .unwrap();

    let mut model: HashMap<u64, Block> = HashMap::new();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut generation = 0u64;
    for round in 0..ROUNDS {
        let vol = rig.volume(&path);
        let socket = rt.block_on(vol.attach(false)).unwrap();
        let mut fe = Frontend::connect(Path::new(&socket), 1).unwrap();
        if round % 3 == 1 {
            rt.block_on(vol.snapshot(&format!("r{round}"))).unwrap();
        }
        if round % 6 == 4 {
            let oldest = rt.block_on(vol.snapshots()).unwrap()[0].clone();
            let snap = rig.snapshot(&oldest);
            rt.block_on(snap.delete()).unwrap();
        }

        // Everything that must be there is there; nothing that was never written is.
        for (&b, state) in &model {
            let got = fe.read(b * BLOCK as u64, BLOCK).unwrap();
            let ok = got == content(b, state.durable)
                || state.maybe.iter().any(|&g| got == content(b, Some(g)));
            assert!(
                ok,
                "round {round}: block {b} lost its flushed data (durable {:?}, maybe {:?})",
                state.durable, state.maybe
            );
        }
        // What survived becomes the new durable state.
        for (&b, state) in model.iter_mut() {
            let got = fe.read(b * BLOCK as u64, BLOCK).unwrap();
            let g = std::iter::once(state.durable)
                .chain(state.maybe.iter().map(|&g| Some(g)))
                .find(|&g| got == content(b, g));
            state.durable = g.flatten();
            state.maybe.clear();
        }

        // A few acknowledged write+flush batches, then a batch left in flight while
        // stord is killed.
        let batches = 1 + rng.next() % 4;
        for batch in 0..=batches {
            let n = 1 + (rng.next() % 32) as usize;
            let mut written = Vec::new();
            for slot in 0..n {
                let b = rng.next() % BLOCKS;
                generation += 1;
                fe.submit_write(slot, b * BLOCK as u64, &content(b, Some(generation)));
                written.push((b, generation));
                model.entry(b).or_default().maybe.push(generation);
            }
            if batch == batches {
                // Kill while these are being processed, after a random spin.
                let spin = Duration::from_micros(rng.next() % 3000);
                let start = Instant::now();
                let _ = fe.reap(0, Duration::ZERO);
                while start.elapsed() < spin {
                    std::hint::spin_loop();
                }
                daemon.kill().unwrap();
                daemon.wait().unwrap();
                break;
            }
            let done = fe.reap(n, Duration::from_secs(10));
            assert_eq!(done.len(), n, "round {round}: writes did not complete");
            assert!(
                done.iter().all(|&(_, r)| r == 0),
                "round {round}: write failed: {done:?}"
            );
            fe.submit_flush(usize::MAX);
            let f = fe.reap(1, Duration::from_secs(10));
            assert_eq!(f, vec![(usize::MAX, 0)], "round {round}: flush failed");
            // Flushed: the newest generation per block is now durable.
            for (b, g) in written {
                let s = model.get_mut(&b).unwrap();
                if s.maybe.last() == Some(&g) {
                    s.durable = Some(g);
                    s.maybe.clear();
                }
            }
        }
        drop(fe);
        daemon = rig.spawn_stord();
    }

    // No volume was lost along the way.
    let objects = rig.volume_paths();
    assert!(objects.contains(&path) && objects.contains(&spare));
    assert_eq!(rt.block_on(storage.health()).unwrap(), "ok");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
