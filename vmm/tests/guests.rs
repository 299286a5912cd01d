//! Small x86-64 guest programs (tests/guests/*.c, built here with gcc) run in
//! the real `vmm run` process on /dev/kvm: serial console, PCI enumeration,
//! virtio-blk through a real vhost-user-blk backend (qemu-storage-daemon),
//! reset, hostile queue programming, and bad configs.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

mod common;
use common::guest;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A VM config for `guest` with debug exit on, merged with `extra`.
fn config(dir: &Path, guest_name: &str, extra: serde_json::Value) -> PathBuf {
    let mut c = serde_json::json!({
        "name": guest_name,
        "memory_mib": 64,
        "boot": {"kernel": guest(guest_name)},
        "debug_exit": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    let path = dir.join(format!("{guest_name}.json"));
    std::fs::write(&path, c.to_string()).unwrap();
    path
}

fn vmm(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.args(["--log-level", "info", "run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs the VM to its end (at most 60 s).
fn run(config: &Path) -> Output {
    let mut child = vmm(config).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("VM did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The exit reason (last stdout line) and the console lines before it.
fn outcome(out: &Output) -> (serde_json::Value, Vec<String>) {
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let last = lines.pop().unwrap_or_default();
    let exit = serde_json::from_str(&last).unwrap_or_else(|_| {
        panic!(
            "no exit line; stdout {text:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (exit, lines)
}

/// qemu-storage-daemon exporting `file` as vhost-user-blk; `--daemonize`
/// returns once the export listens.
struct Qsd {
    pid: i32,
    socket: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, file: &Path) -> Self {
        let socket = dir.join("qsd.sock");
        let pidfile = dir.join("qsd.pid");
        let st = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=n0,filename={}",
                file.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ))
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&pidfile)
            .status()
            .expect("qemu-storage-daemon (Debian qemu-utils)");
        assert!(st.success());
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Self { pid, socket }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the daemon's pid.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
    }
}

/// A 4 MiB raw disk whose first 4 KiB hold `i % 251`.
fn disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    data.resize(4 << 20, 0);
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn serial_output_waits_for_the_console_and_input_reaches_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let cfg = config(
        dir.path(),
        "hello",
        serde_json::json!({"serial": {"socket": sock}}),
    );
    let child: Child = vmm(&cfg).spawn().unwrap();
    // The guest prints before anyone attaches; the ring buffer keeps it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("console socket never appeared: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest\r\n");
    (&stream).write_all(b"Z").unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "got Z\r\n");
    let out = child.wait_with_output().unwrap();
    let (exit, _) = outcome(&out);
    assert_eq!(
        exit["exit"],
        serde_json::json!({"reason": "guest-exit", "detail": 7})
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("boot timer") && log.contains("stage=85"),
        "the guest's boot timer stamp is logged: {log}"
    );
    assert!(out.status.success());
    let mut rest = Vec::new();
    let _ = lines.read_to_end(&mut rest);
}

#[test]
fn i8042_reset_ends_the_vm_with_reason_reset() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&config(dir.path(), "reset", serde_json::json!({})));
    let (exit, lines) = outcome(&out);
    assert_eq!(exit["exit"], serde_json::json!({"reason": "reset"}));
    assert_eq!(lines, ["resetting"], "nothing runs after the reset");
}

#[test]
fn pci_bus_enumerates_the_host_bridge_and_virtio_blk() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &disk(dir.path()));
    let out = run(&config(
        dir.path(),
        "pci",
        serde_json::json!({"disks": [{"socket": qsd.socket}]}),
    ));
    let (exit, lines) = outcome(&out);
    assert_eq!(exit["exit"]["reason"], "guest-exit");
    assert_eq!(
        lines,
        [
            "slot 0 id 1b36:0008 class 060000 bar0 0000000000000000 flags 0 size 00000000 caps",
            // Modern virtio-blk: 64-bit BAR of 64 KiB in the PCI window, the four
            // virtio structures (common, notify, ISR, device) and MSI-X.
            "slot 1 id 1af4:1042 class 018000 bar0 00000000c0000000 flags 4 size 00010000 caps 09/1 09/2 09/3 09/4 11",
            "done",
        ]
    );
}

#[test]
fn virtio_blk_requests_round_trip_through_a_vhost_user_backend() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path());
    let qsd = Qsd::start(dir.path(), &file);
    let out = run(&config(
        dir.path(),
        "blk",
        serde_json::json!({"disks": [{"socket": qsd.socket}]}),
    ));
    let (exit, lines) = outcome(&out);
    assert_eq!(exit["exit"]["reason"], "guest-exit", "{lines:?}");
    assert_eq!(
        lines,
        [
            "status 0f",
            "capacity 8192",
            "read0 status 0 pattern ok",
            "write8 status 0",
            "flush status 0",
            "read8 status 0 pattern ok",
            "past-end status 1",
        ]
    );
    drop(qsd);
    // What the guest wrote is in the file.
    let data = std::fs::read(&file).unwrap();
    let expect: Vec<u8> = (0..4096).map(|i| 0xa5 ^ (i as u8)).collect();
    assert_eq!(&data[8 * 512..8 * 512 + 4096], &expect[..]);
}

#[test]
fn a_queue_outside_guest_memory_breaks_only_that_device_until_reset() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(dir.path(), &disk(dir.path()));
    let out = run(&config(
        dir.path(),
        "badring",
        serde_json::json!({"disks": [{"socket": qsd.socket}]}),
    ));
    let (exit, lines) = outcome(&out);
    assert_eq!(exit["exit"]["reason"], "guest-exit", "{lines:?}");
    assert_eq!(
        lines,
        [
            // DEVICE_NEEDS_RESET (0x40) on top of what the driver set.
            "bad ring status 4f",
            "oversized queue size 256",
            "queue 99 size 0",
            "after reset status 0f",
        ]
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("descriptor table outside guest memory"),
        "{log}"
    );
}

fn setup_error(dir: &Path, name: &str, cfg: &str) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, cfg).unwrap();
    let out = vmm(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{name}: exit status");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configs_fail_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = guest("hello");
    let k = kernel.display();
    let e = setup_error(d, "syntax", "{\"memory_mib\": 64,");
    assert!(e.contains("invalid VM config"), "{e}");
    let e = setup_error(
        d,
        "range",
        &format!("{{\"memory_mib\": 1, \"boot\": {{\"kernel\": \"{k}\"}}}}"),
    );
    assert!(e.contains("memory_mib must be 16..="), "{e}");
    let e = setup_error(
        d,
        "nokernel",
        "{\"memory_mib\": 64, \"boot\": {\"kernel\": \"/nonexistent/vmlinux\"}}",
    );
    assert!(e.contains("cannot read /nonexistent/vmlinux"), "{e}");
    let junk = d.join("junk.bin");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    let e = setup_error(
        d,
        "junk",
        &format!(
            "{{\"memory_mib\": 64, \"boot\": {{\"kernel\": \"{}\"}}}}",
            junk.display()
        ),
    );
    assert!(e.contains("is not a bootable kernel"), "{e}");
    let e = setup_error(
        d,
        "nobackend",
        &format!(
            "{{\"memory_mib\": 64, \"boot\": {{\"kernel\": \"{k}\"}}, \"disks\": [{{\"socket\": \"{}\"}}]}}",
            d.join("nobody.sock").display()
        ),
    );
    assert!(e.contains("cannot reach the vhost-user backend"), "{e}");
    let e = setup_error(d, "fd", "");
    assert!(e.contains("invalid VM config"), "{e}");
}

#[test]
fn media_and_rng_survive_hostile_chains() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&config(
        dir.path(),
        "media",
        serde_json::json!({"media": [{"path": disk(dir.path())}], "rng": true}),
    ));
    let (exit, lines) = outcome(&out);
    assert_eq!(exit["exit"]["reason"], "guest-exit", "{lines:?}");
    assert_eq!(
        lines,
        [
            "media status 0f capacity 8192",
            "read pattern ok used 4097 status 00",
            // Read-only: writes fail with VIRTIO_BLK_S_IOERR.
            "write used 1 status 01",
            "id atoll-media0",
            "get-id used 21 status 00",
            "past end used 1 status 01",
            "outside memory used 1 status 01",
            "oversized used 1 status 01",
            // No answer is possible (no writable status byte): used, length 0.
            "loop used 0 status ff",
            "no status used 0 status ff",
            "still serving used 513 status 00",
            "rng used 64 random",
        ]
    );
}

#[test]
fn device_counters_show_what_the_guest_did() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Without debug_exit the guest halts at its end and the VM stays up.
    let cfg = config(
        dir.path(),
        "media",
        serde_json::json!({"media": [{"path": disk(dir.path())}], "rng": true, "debug_exit": false}),
    );
    let mut cmd = vmm(&cfg);
    cmd.arg("--state-dir").arg(&state);
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("rng used") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the guest stopped early"
        );
    }
    let mut api = ApiClient::connect(&state.join("api.sock"));
    let info = api.call(r#"{"op":"info"}"#);
    let devices = info["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{info}");
    let (media, rng) = (&devices[0], &devices[1]);
    assert_eq!(media["slot"], 1);
    assert!(
        media["kind"]
            .as_str()
            .unwrap()
            .starts_with("virtio-blk read-only "),
        "{media}"
    );
    // The guest reset the disk (its driver's first write and once more
    // before reusing the ring memory for the rng).
    assert_eq!(media["state"], "idle");
    let c = &media["counters"];
    assert_eq!(c["activations"], 1, "{media}");
    assert_eq!(c["resets"], 2, "{media}");
    assert_eq!(c["failed_activations"], 0, "{media}");
    // Every request the guest made was answered, the hostile ones included.
    assert_eq!(c["requests"], 9, "{media}");
    assert!(
        c["bytes_to_guest"].as_u64().unwrap() >= 4097 + 513,
        "{media}"
    );
    assert_eq!(c["broken_queues"], 0, "{media}");
    assert_eq!(rng["kind"], "virtio-rng");
    assert_eq!(rng["state"], "active");
    assert_eq!(rng["counters"]["requests"], 1, "{rng}");
    assert_eq!(rng["counters"]["bytes_to_guest"], 64, "{rng}");
    api.call(r#"{"op":"stop"}"#);
    let status = child.wait().unwrap();
    assert!(status.success());
}

struct ApiClient {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl ApiClient {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no API socket at {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    fn call(&mut self, req: &str) -> serde_json::Value {
        writeln!(self.stream, "{req}").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

fn next_tick(console: &mut BufReader<UnixStream>) -> u64 {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(console.read_line(&mut line).unwrap() > 0, "console closed");
        if let Some(n) = line.trim().strip_prefix("tick ") {
            return n.parse().unwrap();
        }
    }
}

#[test]
fn pause_resume_info_and_stop_through_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let console = dir.path().join("console.sock");
    let cfg = config(
        dir.path(),
        "spin",
        serde_json::json!({"vcpus": 2, "acpi": true, "serial": {"socket": console}}),
    );
    let mut cmd = vmm(&cfg);
    cmd.arg("--state-dir").arg(&state);
    let child = cmd.spawn().unwrap();
    let child_pid = child.id();
    let mut api = ApiClient::connect(&state.join("api.sock"));
    let c = UnixStream::connect(&console).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut ticks = BufReader::new(c);
    next_tick(&mut ticks);

    assert_eq!(api.call(r#"{"op":"state"}"#)["state"], "running");
    assert_eq!(
        api.call(r#"{"op":"pause"}"#),
        serde_json::json!({"ok": true, "state": "paused"})
    );
    // Drain what was printed before the pause took effect, then expect silence.
    ticks
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut seen = String::new();
    while ticks.read_line(&mut seen).is_ok_and(|n| n > 0) {}
    let mut more = String::new();
    let silent = ticks.read_line(&mut more);
    assert!(
        silent.is_err() && more.is_empty(),
        "a paused guest printed {more:?}"
    );
    ticks
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(api.call(r#"{"op":"resume"}"#)["state"], "running");
    next_tick(&mut ticks);

    let info = api.call(r#"{"op":"info"}"#);
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 64);
    assert_eq!(info["boot_stamps"][0]["stage"], 85);
    let bad = api.call(r#"{"op":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"].as_str().unwrap().contains("unknown variant"),
        "{bad}"
    );
    let bad = api.call("not json");
    assert_eq!(bad["ok"], false);
    // The power button is pressed; this guest ignores it and keeps ticking.
    let sd = api.call(r#"{"op":"shutdown"}"#);
    assert_eq!(sd["ok"], true, "{sd}");
    next_tick(&mut ticks);

    // The same socket from the command line.
    let ctl = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["ctl", "--state-dir"])
        .arg(&state)
        .arg("state")
        .output()
        .unwrap();
    assert!(ctl.status.success());
    let v: serde_json::Value = serde_json::from_slice(&ctl.stdout).unwrap();
    assert_eq!(v["state"], "running");

    assert_eq!(api.call(r#"{"op":"stop"}"#)["ok"], true);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("exit.json")).unwrap()).unwrap();
    assert_eq!(recorded["exit"]["reason"], "stopped");
    let pid: u32 = std::fs::read_to_string(state.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, child_pid);
}

fn hugepages_free() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

const NR: &str = "/proc/sys/vm/nr_hugepages";

/// Puts the machine's huge page reservation back, whatever the test did.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, self.0.trim());
    }
}

#[test]
fn hugepage_memory_is_taken_up_front_or_refused_clearly() {
    let _restore = Restore(std::fs::read_to_string(NR).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "spin", serde_json::json!({"hugepages": true}));

    // None reserved: a precise error before anything runs.
    std::fs::write(NR, "0").unwrap();
    let out = vmm(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot allocate 64 MiB of guest memory from hugepages"),
        "{err}"
    );

    // Enough reserved: all 32 pages are the VM's while it runs.
    std::fs::write(NR, "40").unwrap();
    let free = hugepages_free();
    let state = dir.path().join("state");
    let mut cmd = vmm(&cfg);
    cmd.arg("--state-dir").arg(&state);
    let child = cmd.spawn().unwrap();
    let mut api = ApiClient::connect(&state.join("api.sock"));
    assert_eq!(api.call(r#"{"op":"state"}"#)["state"], "running");
    assert_eq!(free - hugepages_free(), 32);
    api.call(r#"{"op":"stop"}"#);
    assert!(child.wait_with_output().unwrap().status.success());
}

#[test]
fn acpi_tables_check_out_and_s5_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&config(
        dir.path(),
        "acpi",
        serde_json::json!({"vcpus": 3, "acpi": true}),
    ));
    let (exit, lines) = outcome(&out);
    assert_eq!(
        exit["exit"],
        serde_json::json!({"reason": "poweroff"}),
        "{lines:?}"
    );
    assert_eq!(
        lines,
        [
            "rsdp ok",
            "xsdt ok entries 2",
            "fadt ok hw-reduced 1 dsdt ok",
            "madt ok cpus 3",
            "poweroff",
        ]
    );
}
