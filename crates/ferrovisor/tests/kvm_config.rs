//! `ferrovisor run --config GUEST.toml` boots the guest the file describes,
//! with paths relative to the file, and a bad file is one line and status 2.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;

/// A directory of its own for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A guest that prints a greeting and exits with debug-exit value 5.
fn greeting_kernel() -> Vec<u8> {
    let code = Asm::default()
        .print("hello from a file\n")
        .debug_exit(5)
        .finish();
    multiboot_kernel(0x10_0000, &[], &code, 0)
}

#[test]
fn run_config_boots_the_guest_the_file_describes() {
    let dir = scratch("boot");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/tiny.elf"), greeting_kernel()).unwrap();
    let file = dir.join("guest.toml");
    std::fs::write(
        &file,
        "kernel = \"images/tiny.elf\"\nmemory = \"32M\"\ncpus = 2\ncmdline = \"quiet\"\n",
    )
    .unwrap();
    // Run from elsewhere: the kernel path is relative to the file.
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(11), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a file\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_bad_guest_file_is_one_line_naming_file_and_field() {
    let dir = scratch("bad");
    let file = dir.join("guest.toml");
    std::fs::write(&file, "kernel = \"k\"\nmemory = \"12X\"\n").unwrap();
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "ferrovisor: {}: memory: '12X' is not a size (examples: 512M, 2G, 1048576K)\n",
            file.display()
        )
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_guest_file_is_one_line() {
    let out = ferrovisor(&["run", "--config", "/nonexistent/guest.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "ferrovisor: /nonexistent/guest.toml: cannot read: No such file or directory (os error 2)\n"
    );
}

#[test]
fn config_and_machine_flags_do_not_mix() {
    let out = ferrovisor(&["run", "--config", "g.toml", "--memory", "64M"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "ferrovisor: --config cannot be combined with --memory: give it in the guest file instead\n"
    );
}
