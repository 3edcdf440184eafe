//! Lab tier: a real distribution, booted the way its users boot it: Debian
//! bookworm with systemd and udev, the cloud kernel with its own
//! initramfs-tools initrd, root on virtio-blk, 2 vCPUs and 1 GiB (built by
//! `cargo xtask guest-kit --distro`). Plain `cargo test` lists these as
//! ignored; `cargo xtask test` runs them inside the lab with the image.

use std::path::PathBuf;
use std::process::Command;

use lab_tests::{tail, Disk, Guest, GuestConfig, KernelImage};

/// What the image prints once systemd has finished starting.
const READY: &str = "ferrovisor-distro: system ";

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set: run with `cargo xtask test`"))
}

/// The image's guest: its own kernel, initrd and command line, the image
/// as its root disk.
fn distro_guest() -> GuestConfig {
    GuestConfig {
        image: KernelImage::BzImage,
        cpus: 2,
        memory: "1G".to_string(),
        disks: vec![Disk {
            path: PathBuf::from(env("FERROVISOR_DISTRO_IMAGE")),
            readonly: false,
        }],
        kernel_override: Some((
            PathBuf::from(env("FERROVISOR_DISTRO_KERNEL")),
            PathBuf::from(env("FERROVISOR_DISTRO_INITRD")),
            env("FERROVISOR_DISTRO_CMDLINE"),
        )),
        ..GuestConfig::default()
    }
}

/// What the image reported once systemd finished starting: the text from
/// [`READY`] to the closing bracket of its failed-unit list. The report is
/// one `echo` to the console, but agetty writes its banner to the same
/// serial port at about the same moment, so another line may land inside
/// it; both ends are looked for rather than one whole line.
fn readiness_report(guest: &Guest) -> (String, String) {
    const FAILED: &str = "failed units: [";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let console = guest.console();
        if let Some(at) = console.find(READY) {
            let report = &console[at..];
            if let Some(list) = report.find(FAILED) {
                if let Some(end) = report[list..].find(']') {
                    let failed = &report[list + FAILED.len()..list + end];
                    return (report[..list + end + 1].to_string(), failed.to_string());
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the report after {READY:?} never ended:\n{}",
            tail(&console, 20)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn debian_with_systemd_reaches_multi_user_with_no_failed_units_and_powers_off() {
    let mut guest = Guest::start(&distro_guest()).expect("start the VMM");
    guest
        .wait_for(READY)
        .unwrap_or_else(|e| panic!("systemd never finished starting: {e}"));
    let (report, failed) = readiness_report(&guest);
    assert!(
        report.contains("running after"),
        "systemd's state: {report}\n{}",
        tail(&guest.console(), 40)
    );
    assert!(failed.trim().is_empty(), "failed units: {failed}");
    // The autologin shell on the serial console takes a command.
    guest
        .wait_for("root@ferrovisor-guest")
        .expect("the autologin prompt");
    guest
        .send("echo units=$(systemctl list-units --state=failed --no-legend | wc -l)\n")
        .expect("type a command");
    guest.wait_for("units=0").expect("no failed unit");
    guest.send("poweroff\n").expect("type poweroff");
    let exit = guest.wait_exit().expect("the VMM exits");
    assert_eq!(
        exit.status.code(),
        Some(0),
        "VMM stderr: {}\n{}",
        tail(&exit.stderr, 20),
        tail(&exit.console, 30)
    );
    let fsck = Command::new("/lab/bin/e2fsck")
        .args(["-fn", &env("FERROVISOR_DISTRO_IMAGE")])
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
