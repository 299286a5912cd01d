//! A virtio-net NIC over vhost-user: a test guest sends a frame through a
//! real vhost-user-net backend (an echo device built on vhost-user-backend,
//! standing in for netd) and receives it back.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Echoes every transmitted frame into the next receive buffer.
#[derive(Default)]
struct Echo {
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    pending: Mutex<VecDeque<Vec<u8>>>,
    event_idx: AtomicBool,
}

impl Echo {
    fn pump(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (rxq, txq) = (&vrings[0], &vrings[1]);
        let mut pending = self.pending.lock().unwrap();
        loop {
            // The queue's lock is held only while popping.
            let next = txq
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut frame = Vec::new();
            for d in chain.clone().readable() {
                let mut buf = vec![0u8; d.len() as usize];
                mem.read_slice(&mut buf, d.addr())
                    .map_err(io::Error::other)?;
                frame.extend_from_slice(&buf);
            }
            pending.push_back(frame);
            txq.add_used(head, 0).map_err(io::Error::other)?;
        }
        txq.signal_used_queue()?;
        while let Some(frame) = pending.front() {
            let next = rxq
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain.writable() {
                let n = (d.len() as usize).min(frame.len() - written);
                mem.write_slice(&frame[written..written + n], d.addr())
                    .map_err(io::Error::other)?;
                written += n;
            }
            rxq.add_used(head, written as u32)
                .map_err(io::Error::other)?;
            pending.pop_front();
        }
        rxq.signal_used_queue()
    }
}

impl VhostUserBackend for Echo {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 15) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        self.pump(vrings)
    }
}

#[test]
fn a_frame_round_trips_through_a_vhost_user_net_backend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let backend = Arc::new(Echo::default());
    let mut daemon = VhostUserDaemon::new(
        "echo-net".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let s2 = sock.clone();
    let server = std::thread::spawn(move || daemon.serve(&s2));
    atoll_tests::wait_until("the backend socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    let cfg = serde_json::json!({
        "memory_mib": 64,
        "boot": {"kernel": common::guest("net")},
        "debug_exit": true,
        "nets": [{"socket": sock, "mac": "52:54:00:12:34:56"}],
    });
    let path = dir.path().join("net.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = run(&path);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "status 0f mac 52:54:00:12:34:56 link 1",
            // 12-byte virtio-net header + 14-byte Ethernet header + 10 bytes.
            "tx used 0 rx len 36 type 88b5 payload atoll echo",
            r#"{"exit":{"detail":0,"reason":"guest-exit"},"text":"guest-exit(0)"}"#,
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The backend thread stays behind with its listener; the test process ends it.
    drop(server);
}

fn run(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}
