//! Paths of the workspace's binaries.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

const BINARIES: [&str; 6] = ["atoll", "mgmtd", "vmm", "netd", "stord", "atoll-net-echo"];

/// The cargo output directory of the running test (`target/<profile>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of workspace binary `name`, building the binaries once if a partial build
/// (`cargo test -p one-crate`) left them out.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let path = target_dir().join(name);
    if !BINARIES.iter().all(|b| target_dir().join(b).is_file()) {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--workspace", "--bins"]);
            if target_dir().ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build --workspace --bins failed");
        });
    }
    assert!(
        path.is_file(),
        "{} is missing after the build",
        path.display()
    );
    path
}
