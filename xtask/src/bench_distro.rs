//! `cargo xtask bench boot --distro [--runs N]`: boots the Debian image
//! (`cargo xtask guest-kit --distro`) N times in a row under Ferrovisor in one
//! lab session, then a few times under QEMU, and reports the time to
//! multi-user (systemd finished starting) of every boot and every boot that
//! failed, with how it ended.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench::{print_medians, Metric};
use crate::distro::{self, DISTRO_CMDLINE, LAB_IMAGE, LAB_INITRD, LAB_KERNEL, POWEROFF_WORD};
use crate::lab::LAB_FERROVISOR;
use crate::util::Result;

/// One boot may take this long before it counts as failed. QEMU gets
/// longer: in the lab its boots have taken more than 240 s.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
const QEMU_BOOT_LIMIT: Duration = Duration::from_secs(600);
/// QEMU boots by default, for the comparison: fewer, since they mostly
/// give the ratio.
pub const QEMU_RUNS: usize = 3;

/// One boot: when systemd reported, and how the VMM ended.
#[derive(Debug, Default, Clone)]
struct Boot {
    /// VMM start to the "system running" line (ms).
    ready_ms: Option<f64>,
    /// The guest's own uptime in that line (ms).
    guest_ms: Option<f64>,
    /// The line itself.
    line: String,
}

fn command_for(qemu: bool) -> Command {
    let cmdline = format!("{DISTRO_CMDLINE} {POWEROFF_WORD}");
    if !qemu {
        let mut cmd = Command::new(LAB_FERROVISOR);
        cmd.args(["run", "--kernel", LAB_KERNEL, "--initramfs", LAB_INITRD])
            .args(["--cmdline", &cmdline, "--cpus", "2", "--memory", "1G"])
            .args(["--disk", &format!("path={LAB_IMAGE}")]);
        return cmd;
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M", "pc", "-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "1G",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-serial", "stdio", "-kernel", LAB_KERNEL, "-initrd", LAB_INITRD,
    ])
    .args(["-append", &cmdline])
    .args([
        "-drive",
        &format!("file={LAB_IMAGE},format=raw,if=none,id=root,cache=writeback"),
        "-device",
        "virtio-blk-pci,drive=root",
    ]);
    cmd
}

/// The seconds in `... after 12.34 s; ...`, in ms.
fn uptime_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find(" after ")? + " after ".len()..];
    rest.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|s| s * 1000.0)
}

/// Whether the image's report says "running" with no failed unit. The
/// report is read from the whole console, not one line: agetty's banner
/// can land in the middle of it on the shared serial port.
fn reported_healthy(console: &str) -> bool {
    let Some(at) = console.find(distro::READY_LINE) else {
        return false;
    };
    let report = &console[at..];
    let Some(list) = report.find("failed units: [") else {
        return false;
    };
    report[..list].contains("running after") && report[list..].starts_with("failed units: []")
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots once; `Err` says how a failed boot ended, with its console tail
/// and the VMM's stderr (where Ferrovisor writes a register dump), and
/// with `trace`, KVM's last events for each vCPU.
fn boot(qemu: bool, trace: bool) -> std::result::Result<Boot, String> {
    let recorder = trace.then(crate::kvm_trace::Recorder::start).transpose()?;
    let start = Instant::now();
    let mut child = command_for(qemu)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let console = Arc::new(Mutex::new(String::new()));
    let seen = Arc::new(Mutex::new(Boot::default()));
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (console_w, seen_w) = (console.clone(), seen.clone());
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if line.contains(distro::READY_LINE) {
                let mut boot = seen_w.lock().unwrap_or_else(|e| e.into_inner());
                boot.ready_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
                boot.guest_ms = uptime_ms(&line);
                boot.line = line.clone();
            }
            let mut text = console_w.lock().unwrap_or_else(|e| e.into_inner());
            text.push_str(&line);
            text.push('\n');
        }
    });
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let limit = if qemu { QEMU_BOOT_LIMIT } else { BOOT_LIMIT };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("cannot wait: {e}")),
        }
    };
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let boot = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let console = console.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let healthy = reported_healthy(&console);
    match status {
        Some(s) if s.success() && healthy => Ok(boot),
        how => {
            let ended = how.map_or(format!("no end within {} s", limit.as_secs()), |s| {
                format!("ended with {s}")
            });
            let events = recorder.map_or(String::new(), |r| {
                format!("\n--- KVM's events ---\n{}", r.report())
            });
            Err(format!(
                "{ended}; systemd said: {:?}\n--- console (tail) ---\n{}\n\
                 --- VMM stderr (tail) ---\n{}{events}",
                boot.line,
                last_lines(&console, 15),
                last_lines(&stderr, 120),
            ))
        }
    }
}

/// Boots `runs` times, printing each; returns the good boots and the
/// number that failed.
fn series(name: &str, qemu: bool, runs: usize, trace: bool) -> (Vec<Boot>, usize) {
    let mut good = Vec::new();
    let mut failed = 0;
    for run in 1..=runs {
        match boot(qemu, trace) {
            Ok(b) => {
                println!(
                    "bench: {name} boot {run}: multi-user at {:.0} ms (guest clock {:.0} ms)",
                    b.ready_ms.unwrap_or(0.0),
                    b.guest_ms.unwrap_or(0.0)
                );
                good.push(b);
            }
            Err(why) => {
                failed += 1;
                println!("bench: {name} boot {run} FAILED: {why}");
            }
        }
    }
    (good, failed)
}

const METRICS: [Metric<Boot>; 2] = [
    ("VMM start -> multi-user (systemd done), ms", |b| b.ready_ms),
    ("guest uptime at multi-user, ms", |b| b.guest_ms),
];

/// `xtask bench-in-lab distro RUNS QEMU_RUNS [trace]`: the measuring half,
/// in the lab.
pub fn in_lab(args: &[String]) -> Result<u8> {
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    let qemu_runs: usize = args
        .get(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(QEMU_RUNS);
    let trace = args.get(3).map(String::as_str) == Some("trace");
    if trace {
        // Once, before the boots: a lab that cannot trace says so in one
        // line rather than failing every boot.
        crate::kvm_trace::Recorder::start().map_err(|e| fail!("{e}"))?;
    }
    let (ours, our_failures) = series("ferrovisor", false, runs, trace);
    let (theirs, their_failures) = series("qemu-pc", true, qemu_runs, false);
    println!();
    println!(
        "distribution boot: Debian bookworm (systemd, udev, cloud kernel and its initrd), \
         root on virtio-blk, 2 vCPUs, 1 GiB; medians; inside the lab"
    );
    print_medians(
        46,
        &[("ferrovisor", &ours[..]), ("qemu-pc", &theirs[..])],
        &METRICS,
    );
    println!(
        "failed boots: ferrovisor {our_failures} of {runs}, qemu-pc {their_failures} of {qemu_runs}"
    );
    Ok(u8::from(our_failures > 0))
}

/// `cargo xtask bench boot --distro [--runs N] [--qemu-runs N] [--trace]`.
pub fn command(runs: usize, qemu_runs: usize, trace: bool) -> Result<u8> {
    let built = distro::build()?;
    let trace = if trace { " trace" } else { "" };
    crate::bench::run_in_lab_with(
        &format!("distro {runs} {qemu_runs}{trace}"),
        Duration::from_secs(60 * 60),
        |spec| built.add_to(spec),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_gives_the_guest_uptime() {
        let line = "ferrovisor-distro: system running after 27.41 s; failed units: []";
        assert_eq!(uptime_ms(line), Some(27410.0));
        assert_eq!(uptime_ms("ferrovisor-distro: system"), None);
    }

    #[test]
    fn a_report_split_by_the_login_banner_still_counts_and_a_failed_unit_does_not() {
        let split = "x\nferrovisor-distro: system running after 20.35 s;\r\n\
                     Debian GNU/Linux 12 ferrovisor-guest ttyS0\n failed units: []\n";
        assert!(reported_healthy(split));
        let failed = "ferrovisor-distro: system running after 2 s; failed units: [a.service]\n";
        assert!(!reported_healthy(failed));
        let degraded = "ferrovisor-distro: system degraded after 2 s; failed units: []\n";
        assert!(!reported_healthy(degraded));
        assert!(!reported_healthy(
            "ferrovisor-distro: system running after 2 s;"
        ));
    }

    #[test]
    fn both_vmms_boot_the_same_image_kernel_and_command_line() {
        for qemu in [false, true] {
            let args: Vec<String> = command_for(qemu)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let joined = args.join(" ");
            assert!(joined.contains(LAB_IMAGE), "{joined}");
            assert!(joined.contains(LAB_KERNEL), "{joined}");
            assert!(
                joined.contains(&format!("{DISTRO_CMDLINE} {POWEROFF_WORD}")),
                "{joined}"
            );
        }
    }
}
