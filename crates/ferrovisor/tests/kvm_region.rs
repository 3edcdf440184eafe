//! Host KVM tests of shared regions (`[[region]]` in the guest file): tiny
//! guests find the ivshmem device, read and write the region's file through
//! BAR 2, and a read-only guest's writes do not land.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// With the region the only device, it sits in slot 1; BAR 0 (256 B) at
/// the window's start, BAR 1 (4 KiB) after it, BAR 2 (1 MiB) aligned to
/// its size.
const BAR0: u32 = 0xc000_0000;
const BAR2: u32 = 0xc010_0000;
const REGION_SIZE: u64 = 1 << 20;
const IVSHMEM_IDS: u32 = 0x1110_1af4;
const SEED: u32 = 0x1122_3344;
/// What a passing guest's debug exit turns into.
const PASSED: i32 = (PASS as i32) << 1 | 1;

/// A directory of its own for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("region-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A 1 MiB region file with `SEED` in its first word.
fn region_file(dir: &Path) -> PathBuf {
    let path = dir.join("region");
    let mut bytes = vec![0u8; REGION_SIZE as usize];
    bytes[..4].copy_from_slice(&SEED.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    path
}

fn word_at(path: &Path, offset: usize) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

/// Runs the guest `code` from a guest file with one region.
fn run(dir: &Path, name: &str, code: &[u8], region: &Path, id: u16, readonly: bool) -> i32 {
    std::fs::write(
        dir.join(format!("{name}.elf")),
        multiboot_kernel(0x10_0000, &[], code, 0),
    )
    .unwrap();
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "kernel = \"{name}.elf\"\nmemory = \"32M\"\n\n[[region]]\npath = {:?}\nid = {id}\nreadonly = {readonly}\n",
        region.display().to_string()
    );
    std::fs::write(&file, text).unwrap();
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert!(out.status.code().is_some(), "stderr: {}", stderr(&out));
    let complaints: Vec<String> = stderr(&out)
        .lines()
        .filter(|l| !l.starts_with("ferrovisor: warning:"))
        .map(String::from)
        .collect();
    assert!(complaints.is_empty(), "the VMM complained: {complaints:?}");
    out.status.code().unwrap()
}

#[test]
fn a_guest_finds_the_device_and_reads_and_writes_the_file() {
    let dir = scratch("rw");
    let region = region_file(&dir);
    let mut c = Checks::new();
    c.port_read(1, 0)
        .eax_is(IVSHMEM_IDS)
        // BAR 2: 64-bit prefetchable, where the VMM put it.
        .port_read(1, 0x18)
        .eax_is(BAR2 | 0b1100)
        .mmio_read32(BAR2)
        .eax_is(SEED)
        .mmio_write32(BAR2 + 4, 0xcafe_f00d)
        .mmio_read32(BAR2 + 4)
        .eax_is(0xcafe_f00d)
        // IVPosition is the id from the file.
        .mmio_read32(BAR0 + 8)
        .eax_is(5)
        // A doorbell to a peer that does not exist reaches nobody.
        .mmio_write32(BAR0 + 12, 1 << 16)
        .mmio_read32(BAR2)
        .eax_is(SEED);
    let code = c.finish();
    assert_eq!(run(&dir, "rw", &code, &region, 5, false), PASSED);
    assert_eq!(word_at(&region, 4), 0xcafe_f00d);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn what_one_guest_writes_another_reads() {
    let dir = scratch("two");
    let region = region_file(&dir);
    let writer = Checks::new()
        .mmio_write32(BAR2 + 0x100, 0x600d_f00d)
        .finish();
    assert_eq!(run(&dir, "writer", &writer, &region, 0, false), PASSED);
    let reader = Checks::new()
        .mmio_read32(BAR2 + 0x100)
        .eax_is(0x600d_f00d)
        .mmio_read32(BAR0 + 8)
        .eax_is(1)
        .finish();
    assert_eq!(run(&dir, "reader", &reader, &region, 1, true), PASSED);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_read_only_guests_writes_do_not_land() {
    let dir = scratch("ro");
    let region = region_file(&dir);
    let code = Checks::new()
        .mmio_read32(BAR2)
        .eax_is(SEED)
        .mmio_write32(BAR2, 0xdead_beef)
        .mmio_write32(BAR2 + 4, 0xdead_beef)
        .mmio_read32(BAR2)
        .eax_is(SEED)
        .mmio_read32(BAR2 + 4)
        .eax_is(0)
        .finish();
    assert_eq!(run(&dir, "ro", &code, &region, 0, true), PASSED);
    assert_eq!(word_at(&region, 0), SEED);
    assert_eq!(word_at(&region, 4), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_region_file_of_a_bad_size_is_one_line_and_nothing_starts() {
    let dir = scratch("bad");
    let region = dir.join("region");
    std::fs::write(&region, vec![0u8; 0x3000]).unwrap();
    std::fs::write(
        dir.join("k.elf"),
        multiboot_kernel(0x10_0000, &[], &Checks::new().finish(), 0),
    )
    .unwrap();
    let file = dir.join("guest.toml");
    let text = format!(
        "kernel = \"k.elf\"\n[[region]]\npath = {:?}\n",
        region.display().to_string()
    );
    std::fs::write(&file, text).unwrap();
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let all = stderr(&out);
    let err: Vec<&str> = all
        .lines()
        .filter(|l| !l.starts_with("ferrovisor: warning:"))
        .collect();
    assert_eq!(err.len(), 1, "{all}");
    let err = err[0];
    assert!(
        err.contains(&format!(
            "[[region]] path = {:?}: {} holds 12288 bytes",
            region.display().to_string(),
            region.display()
        )),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_region_follows_bar2_when_the_guest_moves_it() {
    let dir = scratch("move");
    let region = region_file(&dir);
    let ecam_bar2 = 0xe000_0000 | 1 << 15 | 0x18;
    let moved = 0xc080_0000;
    let code = Checks::new()
        .mmio_write32(ecam_bar2, moved)
        .mmio_read32(moved)
        .eax_is(SEED)
        // Nothing decodes at the old place any more.
        .mmio_read32(BAR2)
        .eax_is(u32::MAX)
        .finish();
    assert_eq!(run(&dir, "move", &code, &region, 0, false), PASSED);
    std::fs::remove_dir_all(dir).unwrap();
}
