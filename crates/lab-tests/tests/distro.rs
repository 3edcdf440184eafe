//! Lab tier: a real distribution, booted the way its users boot it: Debian
//! bookworm with systemd and udev, the cloud kernel with its own
//! initramfs-tools initrd, root on virtio-blk, 2 vCPUs and 1 GiB (built by
//! `cargo xtask guest-kit --distro`). Plain `cargo test` lists these as
//! ignored; `cargo xtask test` runs them inside the lab with the image.

use std::path::PathBuf;
use std::process::Command;

use lab_tests::retry::{self, all_hold, retried, Try, TRIES};
use lab_tests::{tail, Disk, Exit, Guest, GuestConfig, KernelImage};

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
fn readiness_report(guest: &Guest) -> Result<(String, String), Try> {
    const FAILED: &str = "failed units: [";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let console = guest.console();
        if let Some(at) = console.find(READY) {
            let report = &console[at..];
            if let Some(list) = report.find(FAILED) {
                if let Some(end) = report[list..].find(']') {
                    let failed = &report[list + FAILED.len()..list + end];
                    return Ok((report[..list + end + 1].to_string(), failed.to_string()));
                }
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(Try::Failed(format!(
                "the report after {READY:?} never ended:\n{}",
                tail(&console, 20)
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits for `needle` on `guest`'s console. A wait that fails is the lab's
/// emulation fault when the guest died of one (see `lab_tests::retry`), the
/// test's own failure otherwise.
fn waited(mut guest: Guest, needle: &str, what: &str) -> Result<Guest, Try> {
    let Err(error) = guest.wait_for(needle) else {
        return Ok(guest);
    };
    if guest.is_running() {
        return Err(match retry::stalled_vcpu(&guest.console()) {
            Some(stall) => Try::Unstable(format!("{what}: {stall}")),
            None => Try::Failed(format!("{what}: {error}")),
        });
    }
    Err(ended(
        guest.wait_exit().ok().as_ref(),
        what,
        format!("{what}: {error}"),
    ))
}

/// A try whose VMM has ended too early: the lab's when its guest died of an
/// emulation fault (see `lab_tests::retry`), `otherwise` the test's own.
fn ended(exit: Option<&Exit>, what: &str, otherwise: String) -> Try {
    match exit.and_then(retry::died_of_emulation_fault) {
        Some(fault) => Try::Unstable(format!("{what}: {fault}")),
        None => Try::Failed(otherwise),
    }
}

/// One boot of the image: to multi-user with no failed unit, a command at
/// the autologin shell, power-off with status 0, and a clean file system.
fn boot_to_multi_user_and_power_off(_try: u32) -> Result<(), Try> {
    let failed = |what: &str| {
        let what = what.to_string();
        move |e: lab_tests::HarnessError| Try::Failed(format!("{what}: {e}"))
    };
    let guest = Guest::start(&distro_guest()).map_err(failed("start the VMM"))?;
    let guest = waited(guest, READY, "systemd never finished starting")?;
    let (report, failed_units) = readiness_report(&guest)?;
    let context = || tail(&guest.console(), 40);
    all_hold(
        &[
            (
                report.contains("running after"),
                "systemd's state is running",
            ),
            (failed_units.trim().is_empty(), "no unit failed"),
        ],
        || format!("{report}\n{}", context()),
    )?;
    // The autologin shell on the serial console takes a command.
    let mut guest = waited(guest, "root@ferrovisor-guest", "the autologin prompt")?;
    guest
        .send("echo units=$(systemctl list-units --state=failed --no-legend | wc -l)\n")
        .map_err(failed("type a command"))?;
    let mut guest = waited(guest, "units=0", "no failed unit at the shell")?;
    guest.send("poweroff\n").map_err(failed("type poweroff"))?;
    let exit = guest.wait_exit().map_err(failed("the VMM exits"))?;
    if exit.status.code() != Some(0) {
        let otherwise = format!(
            "the VMM ended with {}: {}\n{}",
            exit.status,
            tail(&exit.stderr, 20),
            tail(&exit.console, 30)
        );
        return Err(ended(Some(&exit), "powering off", otherwise));
    }
    let fsck = Command::new("/lab/bin/e2fsck")
        .args(["-fn", &env("FERROVISOR_DISTRO_IMAGE")])
        .output()
        .map_err(|e| Try::Failed(format!("run e2fsck: {e}")))?;
    all_hold(
        &[(fsck.status.success(), "e2fsck finds the image clean")],
        || {
            format!(
                "{}{}",
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr)
            )
        },
    )
}

/// A 2-vCPU guest in the lab meets the emulation's faults now and then
/// (docs/lab.md, "One guest at a time"): a boot whose guest died of a double
/// or triple fault, or stalled with a vCPU that stopped answering, is
/// printed and run again, at most [`TRIES`] times.
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn debian_with_systemd_reaches_multi_user_with_no_failed_units_and_powers_off() {
    let result = retried(
        "the distribution's boot",
        TRIES,
        boot_to_multi_user_and_power_off,
    );
    if let Err(why) = result {
        panic!("{why}");
    }
}
