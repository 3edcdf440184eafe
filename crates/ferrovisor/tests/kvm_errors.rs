//! Bad input gets one clear line on stderr and a non-zero status.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let err = stderr(out);
    let lines: Vec<_> = err.lines().filter(|l| !l.contains("warning:")).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
}

fn tiny_kernel() -> String {
    let code = Asm::default().debug_exit(0).finish();
    let path = write_temp("ok.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    path.to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file() {
    let out = ferrovisor(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_one_line_error(&out, "/nonexistent/vmlinuz");
}

#[test]
fn file_that_is_not_a_kernel() {
    let path = write_temp("notes.txt", b"just some text, not a kernel\n");
    let out = ferrovisor(&["run", "--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&out, "is not a kernel");
}

#[test]
fn truncated_bzimage() {
    let mut image = vec![0u8; 0x400];
    image[0x1f1] = 4; // setup_sects
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // loadflags: loaded high
    let path = write_temp("truncated.bzimage", &image);
    let out = ferrovisor(&["run", "--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&out, "cannot load bzImage");
}

#[test]
fn truncated_multiboot_kernel() {
    let code = Asm::default().debug_exit(0).finish();
    let mut image = multiboot_kernel(0x10_0000, &[], &code, 0);
    // Claim more file than there is.
    let end = 0x10_0000u32 + 4096;
    image[20..24].copy_from_slice(&end.to_le_bytes());
    let path = write_temp("short.elf", &image);
    let out = ferrovisor(&["run", "--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&out, "multiboot");
}

#[test]
fn zero_cpus() {
    let out = ferrovisor(&["run", "--kernel", &tiny_kernel(), "--cpus", "0"]);
    assert_one_line_error(&out, "--cpus");
}

#[test]
fn memory_too_small() {
    let out = ferrovisor(&["run", "--kernel", &tiny_kernel(), "--memory", "1M"]);
    assert_one_line_error(&out, "too small");
}

/// The host's RAM in GiB, rounded up, from /proc/meminfo.
fn host_memory_gib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib.div_ceil(1 << 20)
}

#[test]
fn memory_larger_than_the_host_runs_with_one_warning() {
    // Memory is committed as the guest touches it: twice the host's RAM
    // boots (the tiny guest touches a few pages) after one warning line.
    let memory = format!("{}G", host_memory_gib() * 2);
    let out = ferrovisor(&["run", "--kernel", &tiny_kernel(), "--memory", &memory]);
    let err = stderr(&out);
    // The guest wrote 0 to the debug-exit port: status (0 << 1) | 1.
    assert_eq!(out.status.code(), Some(1), "{err}");
    let warnings: Vec<_> = err
        .lines()
        .filter(|l| l.contains("more than this host's RAM"))
        .collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].starts_with("warning:"), "{err}");
}

#[test]
fn unknown_flag() {
    let out = ferrovisor(&["run", "--kernel", &tiny_kernel(), "--turbo"]);
    assert_one_line_error(&out, "--turbo");
}

#[test]
fn missing_dev_kvm() {
    // A private mount namespace with an empty /dev.
    let kernel = tiny_kernel();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {kernel}",
        env!("CARGO_BIN_EXE_ferrovisor")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    assert_one_line_error(&out, "/dev/kvm does not exist");
}

#[test]
fn dev_kvm_not_accessible() {
    // /dev/kvm is root-only here; run as nobody.
    let kernel = tiny_kernel();
    std::fs::set_permissions(&kernel, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_ferrovisor"),
            "run",
            "--kernel",
            &kernel,
        ])
        .output()
        .expect("setpriv runs");
    assert_one_line_error(&out, "/dev/kvm is not accessible");
}

#[test]
fn argument_that_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--kernel"])
        .arg(std::ffi::OsStr::from_bytes(b"/tmp/\xff"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "not valid UTF-8");
}

#[test]
fn path_with_a_newline_stays_on_one_line() {
    let out = ferrovisor(&["run", "--kernel", "/no/such\nkernel"]);
    assert_one_line_error(&out, "/no/such\\nkernel");
}

#[test]
fn initramfs_that_is_not_a_regular_file() {
    let out = ferrovisor(&["run", "--kernel", &tiny_kernel(), "--initramfs", "/tmp"]);
    assert_one_line_error(&out, "not a regular file");
}
