//! Host KVM tests of the PCI bus: tiny guests enumerate the host bridge and
//! a virtio device through the 0xCF8/0xCFC ports and through ECAM, size a
//! BAR, and read the virtio common configuration through it.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// ECAM base (layout::PCI_ECAM_START) and the first BAR the bus assigns.
const ECAM: u32 = 0xe000_0000;
const BAR0: u32 = 0xc000_0000;
/// The host bridge's and virtio-rng's vendor/device dwords.
const HOST_BRIDGE_IDS: u32 = 0x0008_1b36;
const VIRTIO_RNG_IDS: u32 = 0x1044_1af4;
fn status_of(code: &[u8], extra: &[&str]) -> i32 {
    let out = boot_tiny(code, extra);
    assert!(out.status.code().is_some(), "stderr: {}", stderr(&out));
    out.status.code().unwrap()
}

/// What a passing guest's debug exit turns into.
const PASSED: i32 = (PASS as i32) << 1 | 1;

#[test]
fn host_bridge_and_virtio_device_through_the_config_ports() {
    let code = Checks::new()
        .port_read(0, 0)
        .eax_is(HOST_BRIDGE_IDS)
        .port_read(0, 8)
        .eax_is(0x0600_0000)
        .port_read(1, 0)
        .eax_is(VIRTIO_RNG_IDS)
        // Class 0x00ff00 ("unclassified", as QEMU's virtio-rng), revision 1.
        .port_read(1, 8)
        .eax_is(0x00ff_0001)
        // An empty slot reads all ones.
        .port_read(2, 0)
        .eax_is(u32::MAX)
        .finish();
    assert_eq!(status_of(&code, &["--rng"]), PASSED);
}

#[test]
fn narrow_reads_of_the_data_port_pick_their_bytes() {
    let mut c = Checks::new();
    c.port_read(1, 0);
    // in ax, dx at 0xcfe: the device id; then in al, dx at 0xcfc.
    c.asm.mov_dx(0xcfe).mov_eax(0).bytes(&[0x66, 0xed]);
    c.eax_is(0x1044);
    c.asm.mov_dx(0xcfc).mov_eax(0).in_al_dx();
    c.eax_is(0xf4);
    // With the enable bit clear the data port reads all ones.
    c.asm
        .mov_dx(0xcf8)
        .mov_eax(1 << 11)
        .out_dx_eax()
        .mov_dx(0xcfc)
        .bytes(&[0xed]);
    c.eax_is(u32::MAX);
    let code = c.finish();
    assert_eq!(status_of(&code, &["--rng"]), PASSED);
}

#[test]
fn ecam_reaches_the_same_functions() {
    let code = Checks::new()
        .mmio_read32(ECAM)
        .eax_is(HOST_BRIDGE_IDS)
        .mmio_read32(ECAM | 1 << 15)
        .eax_is(VIRTIO_RNG_IDS)
        .mmio_read32(ECAM | 2 << 15)
        .eax_is(u32::MAX)
        // Function 1 of a present device is absent too.
        .mmio_read32(ECAM | 1 << 15 | 1 << 12)
        .eax_is(u32::MAX)
        // Capabilities: MSI-X first, at 0x40.
        .mmio_read32(ECAM | 1 << 15 | 0x34)
        .eax_is(0x40)
        .finish();
    assert_eq!(status_of(&code, &["--rng"]), PASSED);
}

#[test]
fn bar_sizing_through_ecam_then_the_bar_serves_the_common_config() {
    let bar = ECAM | 1 << 15 | 0x10;
    let code = Checks::new()
        // Assigned by the VMM: a 64-bit memory BAR at the window's start.
        .mmio_read32(bar)
        .eax_is(BAR0 | 0b100)
        .mmio_write32(bar, u32::MAX)
        .mmio_read32(bar)
        .eax_is(0xffff_8004)
        .mmio_write32(bar + 4, u32::MAX)
        .mmio_read32(bar + 4)
        .eax_is(u32::MAX)
        .mmio_write32(bar + 4, 0)
        .mmio_write32(bar, BAR0)
        // num_queues of virtio-rng through the BAR.
        .mmio_read16(BAR0 + 0x12)
        .eax_is(1)
        // The high feature word carries VERSION_1.
        .mmio_write32(BAR0, 1)
        .mmio_read32(BAR0 + 4)
        .eax_is(1)
        .finish();
    assert_eq!(status_of(&code, &["--rng"]), PASSED);
}

#[test]
fn a_moved_bar_decodes_at_its_new_address_only() {
    let bar = ECAM | 1 << 15 | 0x10;
    let moved = BAR0 + 0x10_0000;
    let code = Checks::new()
        .mmio_write32(bar, moved)
        .mmio_read16(moved + 0x12)
        .eax_is(1)
        .mmio_read32(BAR0 + 0x10)
        .eax_is(u32::MAX)
        // Memory decode off: the BAR is gone.
        .mmio_write32(ECAM | 1 << 15 | 0x04, 0)
        .mmio_read32(moved + 0x10)
        .eax_is(u32::MAX)
        .finish();
    assert_eq!(status_of(&code, &["--rng"]), PASSED);
}

#[test]
fn without_devices_only_the_host_bridge_is_there() {
    let code = Checks::new()
        .port_read(0, 0)
        .eax_is(HOST_BRIDGE_IDS)
        .port_read(1, 0)
        .eax_is(u32::MAX)
        .finish();
    assert_eq!(status_of(&code, &[]), PASSED);
}

#[test]
fn a_missing_disk_image_is_one_line_naming_the_flag() {
    let code = Checks::new().finish();
    let out = boot_tiny(&code, &["--disk", "path=/nonexistent/fv.img"]);
    let all = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {all}");
    // Leave out the host warning about PVM that some hosts add.
    let errors: Vec<&str> = all
        .lines()
        .filter(|l| !l.starts_with("ferrovisor: warning:"))
        .collect();
    assert_eq!(errors.len(), 1, "stderr: {all}");
    let err = errors[0];
    assert!(
        err.starts_with("ferrovisor: --disk path=/nonexistent/fv.img: "),
        "stderr: {err}"
    );
    assert!(err.contains("No such file or directory"), "stderr: {err}");
}

/// `exits_mmio` from the `--stats` line.
fn mmio_exits(out: &std::process::Output) -> u64 {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.starts_with("ferrovisor-stats:"))
        .unwrap_or_else(|| panic!("no stats line: {err}"));
    let at = line.find("\"exits_mmio\":").expect("exits_mmio") + "\"exits_mmio\":".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number")
}

#[test]
fn queue_kicks_go_to_an_ioeventfd_that_follows_the_bar() {
    const KICKS: u32 = 40;
    let notify = BAR0 + 0x3000;
    let moved = BAR0 + 0x10_0000;
    let mut c = Checks::new();
    for _ in 0..KICKS {
        c.mmio_write32(notify, 0);
    }
    // Move the BAR: one exit for the ECAM write.
    c.mmio_write32(ECAM | 1 << 15 | 0x10, moved);
    for _ in 0..KICKS {
        c.mmio_write32(moved + 0x3000, 0);
    }
    // The old notify address decodes nothing now: every write there exits.
    for _ in 0..KICKS {
        c.mmio_write32(notify, 0);
    }
    let code = c.finish();
    let out = boot_tiny(&code, &["--rng", "--stats"]);
    assert_eq!(out.status.code(), Some(PASSED), "stderr: {}", stderr(&out));
    let exits = mmio_exits(&out);
    let expected = u64::from(KICKS) + 1;
    assert_eq!(exits, expected, "stderr: {}", stderr(&out));
}
