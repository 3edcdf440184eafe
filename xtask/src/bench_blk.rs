//! `cargo xtask bench blk`: virtio-blk throughput and IOPS inside the guest,
//! under Ferrovisor and under QEMU, on the same raw image in one lab session.
//!
//! The guest kit's `blkbench` does the I/O (O_DIRECT in the guest, queue
//! depth 1): sequential 1 MiB writes then reads over the first SIZE MiB of
//! /dev/vda, then 4 KiB random reads for SECS seconds. See docs/benchmarks.md.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{print_medians, Metric};
use crate::guestkit;
use crate::lab::{LAB_FERROVISOR, LAB_INITRAMFS, LAB_KERNEL};
use crate::util::{self, Context, Result};

/// Where the image lives inside the lab (its tmpfs).
pub(crate) const IMAGE: &str = "/tmp/bench-blk.img";
const MEMORY: &str = "512M";
/// One boot with its I/O may take this long before it is abandoned.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// What the guest's blkbench printed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Sample {
    seq_write_mib_s: f64,
    seq_read_mib_s: f64,
    rand_read_iops: f64,
}

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ferrovisor,
    QemuPc,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferrovisor => "ferrovisor",
            Vmm::QemuPc => "qemu-pc",
        }
    }
}

fn cmdline(size_mib: u64, secs: u64) -> String {
    let run = format!("blkbench /dev/vda {size_mib} {secs}");
    format!(
        "{} ferrovisor.run64={}",
        guestkit::DEFAULT_CMDLINE,
        util::base64(run.as_bytes())
    )
}

fn command_for(vmm: Vmm, cmdline: &str) -> Command {
    match vmm {
        Vmm::Ferrovisor => {
            let mut cmd = ferrovisor_kit(cmdline, MEMORY);
            cmd.args(["--disk", &format!("path={IMAGE}")]);
            cmd
        }
        Vmm::QemuPc => {
            let mut cmd = qemu_pc_kit(cmdline, MEMORY);
            // The host page cache with guest flushes honoured, as
            // Ferrovisor does (plain pread/pwrite, fdatasync on FLUSH).
            cmd.arg("-drive")
                .arg(format!(
                    "file={IMAGE},format=raw,if=none,id=d0,cache=writeback,aio=threads"
                ))
                .args(["-device", "virtio-blk-pci,drive=d0"]);
            cmd
        }
    }
}

/// `ferrovisor run` booting the guest kit's bzImage in the lab with
/// `cmdline`, 1 vCPU and `memory`; the caller adds devices.
pub(crate) fn ferrovisor_kit(cmdline: &str, memory: &str) -> Command {
    let mut cmd = Command::new(LAB_FERROVISOR);
    cmd.args(["run", "--kernel", LAB_KERNEL, "--initramfs", LAB_INITRAMFS])
        .args(["--cmdline", cmdline, "--cpus", "1", "--memory", memory]);
    cmd
}

/// QEMU `-M pc` booting the same, its console on stdout, no default
/// devices; the caller adds devices.
pub(crate) fn qemu_pc_kit(cmdline: &str, memory: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "pc", "-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", memory, "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .args(["-kernel", LAB_KERNEL, "-initrd", LAB_INITRAMFS])
        .args(["-append", cmdline]);
    cmd
}

/// Reads `blkbench: NAME VALUE UNIT ...` lines.
fn parse(console: &str) -> Option<Sample> {
    let value = |name: &str| -> Option<f64> {
        console.lines().find_map(|l| {
            let rest = l[l.find("blkbench: ")? + "blkbench: ".len()..].strip_prefix(name)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    Some(Sample {
        seq_write_mib_s: value("seq_write ")?,
        seq_read_mib_s: value("seq_read ")?,
        rand_read_iops: value("rand_read ")?,
    })
}

fn measure(vmm: Vmm, size_mib: u64, secs: u64) -> Result<Sample> {
    let (console, stderr, status) =
        run_to_end(vmm.name(), command_for(vmm, &cmdline(size_mib, secs)))?;
    for line in console.lines().filter(|l| l.contains("blkbench")) {
        println!("bench: {}: {}", vmm.name(), line.trim_end_matches('\r'));
    }
    parse(&console).ok_or_else(|| {
        fail!(
            "{} ({status}) printed no blkbench results; console tail: {}; stderr: {}",
            vmm.name(),
            console
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | "),
            stderr.lines().last().unwrap_or("")
        )
    })
}

/// Runs a VMM (`name` in messages) to its end, at most [`RUN_LIMIT`];
/// returns its console (stdout), its stderr and its exit status.
pub(crate) fn run_to_end(
    name: &str,
    mut command: Command,
) -> Result<(String, String, std::process::ExitStatus)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot start {name}"))?;
    let mut stdout = child.stdout.take().ok_or_else(|| fail!("no stdout"))?;
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut stderr = child.stderr.take().ok_or_else(|| fail!("no stderr"))?;
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().ctx(|| "wait".to_string())? {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail!(
                "{name} did not finish within {} s",
                RUN_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok((
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
        status,
    ))
}

const METRICS: [Metric<Sample>; 3] = [
    ("sequential write, 1 MiB requests, MiB/s", |s| {
        Some(s.seq_write_mib_s)
    }),
    ("sequential read, 1 MiB requests, MiB/s", |s| {
        Some(s.seq_read_mib_s)
    }),
    ("random read, 4 KiB requests, QD1, IOPS", |s| {
        Some(s.rand_read_iops)
    }),
];

fn print_table(results: &[(Vmm, Vec<Sample>)], size_mib: u64, secs: u64) {
    println!();
    println!(
        "block benchmark: guest kit, 1 vCPU, {MEMORY}, virtio-blk on a raw image in the lab's \
         tmpfs, {size_mib} MiB sequential, {secs} s random; O_DIRECT in the guest, host page \
         cache in the VMM; median of the runs; nested KVM inside the lab (emulated AMD SVM)"
    );
    let runs: Vec<(&str, &[Sample])> = results
        .iter()
        .map(|(vmm, samples)| (vmm.name(), samples.as_slice()))
        .collect();
    print_medians(44, &runs, &METRICS);
    println!("(xN) = that VMM's figure divided by ferrovisor's; higher is better for all three.");
}

/// Makes the image and writes it through once, so that no VMM pays for
/// the tmpfs allocating its pages.
pub(crate) fn make_image(size_mib: u64) -> Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut data = Vec::with_capacity(chunk.len() * size_mib as usize);
    for _ in 0..size_mib {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(IMAGE, data).ctx(|| format!("cannot write {IMAGE}"))
}

/// `xtask bench-in-lab blk RUNS SIZE_MIB SECS`: the measuring half.
pub fn in_lab(args: &[String]) -> Result<u8> {
    let number = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let (runs, size_mib, secs) = (number(1, 3), number(2, 256), number(3, 10));
    make_image(size_mib)?;
    let mut results = Vec::new();
    for vmm in [Vmm::Ferrovisor, Vmm::QemuPc] {
        let mut samples = Vec::new();
        for run in 1..=runs {
            match measure(vmm, size_mib, secs) {
                Ok(s) => samples.push(s),
                Err(e) => println!("bench: {} run {run} failed: {e}", vmm.name()),
            }
        }
        results.push((vmm, samples));
    }
    print_table(&results, size_mib, secs);
    let complete = results.iter().all(|(_, s)| !s.is_empty());
    Ok(if complete { 0 } else { 1 })
}

/// Refuses an image too large for the lab's RAM.
pub(crate) fn check_image_size(size_mib: u64) -> Result<()> {
    if size_mib > 1024 {
        return Err(fail!(
            "--size: at most 1024 MiB (the image lives in the lab's RAM)"
        ));
    }
    Ok(())
}

/// Reads `--NAME N` options, each a positive number, into `options`.
pub(crate) fn positive_options(
    args: &[String],
    options: &mut [(&str, &mut u64)],
    usage: &str,
) -> Result<()> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some((_, target)) = options.iter_mut().find(|(name, _)| name == arg) else {
            return Err(fail!("{usage}"));
        };
        let value = it.next().ok_or_else(|| fail!("{usage}"))?;
        **target = value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| fail!("{arg}: `{value}` is not a positive number"))?;
    }
    Ok(())
}

/// `cargo xtask bench blk [--runs N] [--size MIB] [--secs N]`.
pub fn command(args: &[String]) -> Result<u8> {
    let usage = "usage: cargo xtask bench blk [--runs N] [--size MIB] [--secs N]";
    let (mut runs, mut size, mut secs) = (3u64, 256u64, 10u64);
    positive_options(
        args,
        &mut [
            ("--runs", &mut runs),
            ("--size", &mut size),
            ("--secs", &mut secs),
        ],
        usage,
    )?;
    check_image_size(size)?;
    crate::bench::run_in_lab(
        &format!("blk {runs} {size} {secs}"),
        Duration::from_secs(25 * 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blkbench_lines() {
        let console = "\
[    1.0] noise
blkbench: seq_write 101.5 MiB/s (64 MiB in 0.630 s, 1 MiB requests, then fdatasync)\r
blkbench: seq_read 230.0 MiB/s (64 MiB in 0.278 s, 1 MiB requests)
blkbench: rand_read 4012 IOPS (40120 reads of 4 KiB in 10.000 s, queue depth 1)
ferrovisor-guest: exit status 0";
        assert_eq!(
            parse(console),
            Some(Sample {
                seq_write_mib_s: 101.5,
                seq_read_mib_s: 230.0,
                rand_read_iops: 4012.0
            })
        );
        assert_eq!(parse("blkbench: seq_write 1 MiB/s"), None);
    }

    #[test]
    fn guest_command_rides_on_the_command_line() {
        let line = cmdline(64, 10);
        assert!(line.starts_with(guestkit::DEFAULT_CMDLINE));
        assert!(line.ends_with(&util::base64(b"blkbench /dev/vda 64 10")));
    }
}
