//! Shared by the vmm integration tests: the test guests, built once with gcc.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds every guest once per test process; returns the directory of ELFs.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-guests");
        std::fs::create_dir_all(&out).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "c") {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let elf = out.join(format!("{name}.elf"));
            let st = Command::new("gcc")
                .args([
                    "-ffreestanding",
                    "-nostdlib",
                    "-static",
                    "-fno-pic",
                    "-no-pie",
                    "-mno-red-zone",
                    "-mgeneral-regs-only",
                    "-O2",
                    "-fno-stack-protector",
                    "-fno-asynchronous-unwind-tables",
                    "-Wall",
                    "-Werror",
                    "-Wno-unused-function",
                    "-Wl,--build-id=none,--no-warn-rwx-segments,-z,noexecstack",
                    "-T",
                ])
                .arg(src.join("link.ld"))
                .arg("-o")
                .arg(&elf)
                .arg(src.join("start.S"))
                .arg(&path)
                .status()
                .expect("gcc builds the test guests");
            assert!(st.success(), "building guest {name}");
        }
        out
    })
}

/// The ELF of guest `name`.
pub fn guest(name: &str) -> PathBuf {
    guests().join(format!("{name}.elf"))
}
