//! `cargo xtask bench boot`: boot the guest kit under Ferrovisor and under
//! QEMU (microvm and q35) in one lab session, and print a side-by-side table.
//!
//! The host part ships this very xtask binary into the lab and runs its
//! `bench-in-lab` command there, which does the measuring.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guestkit;
use crate::lab::{self, Spec, LAB_FERROVISOR, LAB_INITRAMFS, LAB_KERNEL};
use crate::util::{Context, Result};

const INIT_LINE: &str = "ferrovisor-guest: init reached";
const MEMORY_MIB: u64 = 512;
/// KVM's debugfs sum over the VMs that exist: it is polled (every 250 ms)
/// while the VMM runs, one VMM at a time, since a VM's counts vanish with it;
/// the last quarter second before exit is therefore not counted.
const EXITS_COUNTER: &str = "/sys/kernel/debug/kvm/exits";
/// One boot may take this long before it is abandoned.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ferrovisor,
    QemuMicrovm,
    QemuQ35,
}

impl Vmm {
    /// q35 is left out by default: inner QEMU q35 boots have wedged the lab.
    const DEFAULT: [Vmm; 2] = [Vmm::Ferrovisor, Vmm::QemuMicrovm];

    fn name(self) -> &'static str {
        match self {
            Vmm::Ferrovisor => "ferrovisor",
            Vmm::QemuMicrovm => "qemu-microvm",
            Vmm::QemuQ35 => "qemu-q35",
        }
    }
}

/// What one boot measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    /// From VMM start to the guest's write to port 0x80 (ms).
    marker_ms: Option<f64>,
    /// From VMM start to the /init console line reaching the VMM's stdout (ms).
    console_ms: Option<f64>,
    /// From VMM start to its exit after the guest powered off (ms).
    total_ms: f64,
    /// KVM exits of all kinds during the boot (debugfs counter).
    kvm_exits: Option<u64>,
    /// Exits that reached the VMM in user space, as ferrovisor reports them.
    user_exits: Option<u64>,
    /// Peak resident memory outside guest RAM (KiB): the VMM's own.
    vmm_kib: u64,
    /// Peak resident guest RAM (KiB): the memfd mappings.
    guest_kib: u64,
}

fn guest_cmdline() -> String {
    format!("{} ferrovisor.run=true", guestkit::DEFAULT_CMDLINE)
}

fn command_for(vmm: Vmm, marker_file: &Path) -> Command {
    let memory = format!("{MEMORY_MIB}M");
    if vmm == Vmm::Ferrovisor {
        let mut cmd = Command::new(LAB_FERROVISOR);
        cmd.args(["run", "--kernel", LAB_KERNEL, "--initramfs", LAB_INITRAMFS])
            .args(["--cmdline", &guest_cmdline(), "--cpus", "1"])
            .args(["--memory", &memory, "--stats"]);
        return cmd;
    }
    let machine = match vmm {
        Vmm::QemuMicrovm => "microvm,acpi=on,memory-backend=ram",
        _ => "q35,memory-backend=ram",
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", machine, "-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &memory])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=ram,size={memory}"),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-serial",
            "stdio",
            "-kernel",
            LAB_KERNEL,
            "-initrd",
            LAB_INITRAMFS,
        ])
        .args(["-append", &guest_cmdline()])
        .arg("-chardev")
        .arg(format!("file,id=marker,path={}", marker_file.display()))
        .args(["-device", "isa-debugcon,iobase=0x80,chardev=marker"]);
    cmd
}

fn read_counter(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Splits a process's resident memory, from its `/proc/PID/smaps`, into
/// (the VMM's own, guest RAM) in KiB. Guest RAM is every `/memfd:` mapping:
/// both VMMs back it with a memfd. Everything else (heap, stacks, the binary
/// and its libraries, wherever they live) is the VMM's own.
fn split_rss(smaps: &str) -> (u64, u64) {
    let (mut own, mut guest) = (0, 0);
    let mut in_memfd = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_memfd = words.nth(4).is_some_and(|path| path.starts_with("/memfd:"));
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if in_memfd {
                guest += kib;
            } else {
                own += kib;
            }
        }
    }
    (own, guest)
}

/// (the VMM's own, guest RAM) resident memory in KiB.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(split_rss(&smaps))
}

/// Parses `"key": number` out of the VMM's one-line JSON statistics.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let quoted = format!("\"{key}\"");
    let rest = json[json.find(&quoted)? + quoted.len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Times the first arrival of a 0x01 byte in `path` (QEMU's debugcon file).
fn watch_marker(
    path: PathBuf,
    start: Instant,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<f64>> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            // Checking the size is cheap; only a grown file is read.
            let grown = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
            if grown && std::fs::read(&path).is_ok_and(|d| d.contains(&1)) {
                return Some(start.elapsed().as_secs_f64() * 1000.0);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
}

fn measure(vmm: Vmm) -> Result<Sample> {
    let marker_file = PathBuf::from("/tmp/bench-marker");
    let _ = std::fs::remove_file(&marker_file);
    let exits_before = read_counter(EXITS_COUNTER);
    let mut exits_seen = exits_before;
    let mut polls = 0u32;
    let mut cmd = command_for(vmm, &marker_file);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().ctx(|| format!("cannot start {}", vmm.name()))?;
    let done = Arc::new(AtomicBool::new(false));
    let marker = watch_marker(marker_file, start, done.clone());
    let stdout = child.stdout.take().ok_or_else(|| fail!("no stdout"))?;
    let console_at = Arc::new(Mutex::new(None));
    let console_seen = console_at.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if line.contains(INIT_LINE) {
                let mut seen = console_seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.get_or_insert(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
    });
    let mut stderr = child.stderr.take().ok_or_else(|| fail!("no stderr"))?;
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut sample = Sample::default();
    let status = loop {
        if let Some(status) = child.try_wait().ctx(|| "wait".to_string())? {
            break status;
        }
        polls += 1;
        if polls.is_multiple_of(5) {
            if let Some(now) = read_counter(EXITS_COUNTER) {
                exits_seen = exits_seen.max(Some(now));
            }
        }
        // smaps walks page tables: sample it as rarely as the exit counter.
        if polls.is_multiple_of(5) {
            if let Some((own, guest)) = rss(child.id()) {
                sample.vmm_kib = sample.vmm_kib.max(own);
                sample.guest_kib = sample.guest_kib.max(guest);
            }
        }
        if start.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            done.store(true, Ordering::Relaxed);
            return Err(fail!(
                "{} did not finish within {} s",
                vmm.name(),
                BOOT_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    sample.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    sample.console_ms = *console_at.lock().unwrap_or_else(|e| e.into_inner());
    // A counter that never moved was not measurable (left blank, not 0).
    sample.kvm_exits = exits_before
        .zip(exits_seen)
        .map(|(a, b)| b.saturating_sub(a))
        .filter(|&d| d > 0);
    let stats = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ferrovisor-stats:"));
    sample.user_exits = stats
        .and_then(|json| json_number(json, "exits"))
        .map(|v| v as u64);
    sample.marker_ms = if vmm == Vmm::Ferrovisor {
        stats
            .and_then(|json| json_number(json, "boot_marker_us"))
            .map(|us| us / 1000.0)
    } else {
        marker.join().ok().flatten()
    };
    if !status.success() || sample.console_ms.is_none() {
        return Err(fail!(
            "{} ended with {status} (init line seen: {}); stderr: {}",
            vmm.name(),
            sample.console_ms.is_some(),
            stderr.lines().last().unwrap_or("")
        ));
    }
    Ok(sample)
}

/// The median of some figures; `None` for none.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Prints a table: a column per VMM (its name and run count), a row per
/// metric, each cell the median of that VMM's runs and, after the first
/// column, its ratio to the first VMM's. A metric may be missing from a run.
pub fn print_medians<S>(label_width: usize, runs: &[(&str, &[S])], metrics: &[Metric<S>]) {
    print!("{:<label_width$}", "metric");
    for (name, samples) in runs {
        print!("{:>22}", format!("{name} (n={})", samples.len()));
    }
    println!();
    for (label, get) in metrics {
        print!("{label:<label_width$}");
        let medians: Vec<Option<f64>> = runs
            .iter()
            .map(|(_, samples)| median(samples.iter().filter_map(get).collect()))
            .collect();
        let base = medians.first().copied().flatten();
        for (i, value) in medians.iter().enumerate() {
            let cell = match (value, base) {
                (None, _) => "-".to_string(),
                (Some(v), Some(b)) if i > 0 && b > 0.0 => format!("{v:.1} (x{:.2})", v / b),
                (Some(v), _) => format!("{v:.1}"),
            };
            print!("{cell:>22}");
        }
        println!();
    }
}

/// A row of a benchmark table: its label and how to read it from one run.
pub type Metric<S> = (&'static str, fn(&S) -> Option<f64>);

const METRICS: [Metric<Sample>; 7] = [
    ("VMM start -> /init marker (port 0x80), ms", |s| s.marker_ms),
    ("VMM start -> /init console line, ms", |s| s.console_ms),
    ("VMM start -> exit after poweroff, ms", |s| Some(s.total_ms)),
    ("KVM exits per boot (debugfs, all kinds)", |s| {
        s.kvm_exits.map(|v| v as f64)
    }),
    ("exits handled in user space (VMM-reported)", |s| {
        s.user_exits.map(|v| v as f64)
    }),
    (
        "VMM memory beyond guest RAM (smaps Rss, non-memfd), MiB",
        |s| Some(s.vmm_kib as f64 / 1024.0),
    ),
    ("guest RAM resident (smaps Rss, memfd), MiB", |s| {
        Some(s.guest_kib as f64 / 1024.0)
    }),
];

fn print_table(results: &[(Vmm, Vec<Sample>)], runs: usize) {
    println!();
    println!(
        "boot benchmark: guest kit, 1 vCPU, {MEMORY_MIB} MiB, median of up to {runs} runs; \
         nested KVM inside the lab (emulated AMD SVM), so absolute times are far above hardware"
    );
    let runs: Vec<(&str, &[Sample])> = results
        .iter()
        .map(|(vmm, samples)| (vmm.name(), samples.as_slice()))
        .collect();
    print_medians(52, &runs, &METRICS);
    println!("(xN) = that VMM's figure divided by ferrovisor's. QEMU's marker is timed by");
    println!("polling its isa-debugcon output file; ferrovisor's is reported by the VMM itself.");
}

/// `xtask bench-in-lab boot [RUNS]`: the measuring half, run inside the lab.
pub fn in_lab(args: &[String]) -> Result<u8> {
    match args.first().map(String::as_str) {
        Some("boot") => {}
        Some("blk") => return crate::bench_blk::in_lab(args),
        _ => return Err(fail!("bench-in-lab: only `boot` and `blk` are known")),
    }
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let with_q35 = args.get(2).is_some_and(|a| a == "q35");
    let mut results = Vec::new();
    let vmms: &[Vmm] = if with_q35 {
        &[Vmm::Ferrovisor, Vmm::QemuMicrovm, Vmm::QemuQ35]
    } else {
        &Vmm::DEFAULT
    };
    for &vmm in vmms {
        let mut samples = Vec::new();
        for run in 1..=runs {
            match measure(vmm) {
                Ok(s) => {
                    println!(
                        "bench: {} run {run}: init line at {:.0} ms",
                        vmm.name(),
                        s.console_ms.unwrap_or(0.0)
                    );
                    samples.push(s);
                }
                Err(e) => println!("bench: {} run {run} failed: {e}", vmm.name()),
            }
        }
        results.push((vmm, samples));
    }
    print_table(&results, runs);
    Ok(0)
}

/// `cargo xtask bench boot [--runs N] [--q35]`.
pub fn command(args: &[String]) -> Result<u8> {
    if args.first().map(String::as_str) == Some("blk") {
        return crate::bench_blk::command(&args[1..]);
    }
    let usage = || {
        fail!(
            "usage: cargo xtask bench boot [--runs N] [--q35] | \
             cargo xtask bench blk [--runs N] [--size MIB] [--secs N]"
        )
    };
    let mut runs = 3;
    let mut q35 = "";
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("boot") {
        return Err(usage());
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                let n = it.next().ok_or_else(usage)?;
                runs = n
                    .parse()
                    .map_err(|_| fail!("--runs: `{n}` is not a number"))?;
            }
            "--q35" => q35 = " q35",
            _ => return Err(usage()),
        }
    }
    run_in_lab(&format!("boot {runs}{q35}"), Duration::from_secs(15 * 60))
}

/// Runs `xtask bench-in-lab ARGS` inside one lab session, with QEMU and
/// this xtask binary shipped in, and returns its exit status.
pub fn run_in_lab(args: &str, deadline: Duration) -> Result<u8> {
    let kit = guestkit::build()?;
    let ferrovisor = lab::build_ferrovisor()?;
    let me = std::env::current_exe().ctx(|| "cannot find the xtask binary".to_string())?;
    let mut spec = Spec::new(Some(format!("/lab/bin/xtask bench-in-lab {args}")));
    spec.interactive = false;
    spec.with_qemu = true;
    spec.deadline = deadline;
    spec.files.push((me, "/lab/bin/xtask".to_string()));
    let outcome = lab::run(&spec, &kit, Some(&ferrovisor))?;
    Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_separates_memfd_guest_ram() {
        let smaps = "\
55d0a0000000-55d0a0200000 r-xp 00000000 00:02 12 /lab/bin/ferrovisor
Size:               2048 kB
Rss:                1500 kB
7f0000000000-7f0020000000 rw-s 00000000 00:01 99 /memfd:ferrovisor-guest-ram (deleted)
Size:             524288 kB
Rss:              120000 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Rss:                 300 kB
";
        assert_eq!(split_rss(smaps), (1500 + 12 + 300, 120000));
    }

    #[test]
    fn reads_numbers_from_stats_json() {
        let json = r#" {"boot_marker_us": 10523, "exits": 4711, "x": null}"#;
        assert_eq!(json_number(json, "boot_marker_us"), Some(10523.0));
        assert_eq!(json_number(json, "exits"), Some(4711.0));
        assert_eq!(json_number(json, "x"), None);
        assert_eq!(json_number(json, "missing"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
