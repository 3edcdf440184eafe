//! `cargo xtask bench boot`: boot the guest kit under Ferrovisor and under
//! QEMU microvm (and q35 on request) in one lab session, and print a
//! side-by-side table: time to /init, the guest's own uptime there, KVM's
//! exits by kind and nested page faults, and memory.
//!
//! The host part ships this very xtask binary into the lab and runs its
//! `bench-in-lab` command there, which does the measuring.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guestkit;
use crate::lab::{self, Spec, LAB_FERROVISOR, LAB_INITRAMFS, LAB_KERNEL, LAB_VMLINUX};
use crate::util::{Context, Result};

const INIT_LINE: &str = "ferrovisor-guest: init reached";
const MEMORY_MIB: u64 = 512;
/// KVM's debugfs counters, summed over the VMs that exist: they are polled
/// (every 20 ms) while the VMM runs, one VMM at a time, since a VM's counts
/// vanish with it; the last poll before the VM is destroyed is the figure.
const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
/// The counters read, in table order. `exits` is every exit; the others are
/// the kinds KVM counts (`pf_taken`: nested page faults handled).
const KVM_COUNTERS: [&str; 10] = [
    "exits",
    "pf_taken",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "signal_exits",
    "hypercalls",
    "insn_emulation",
];
/// A mapping at least this large is guest RAM, whatever backs it.
const GUEST_RAM_MIN_KIB: u64 = 64 << 10;
/// The jailed column's `--jail` directory.
const JAIL_DIR: &str = "/tmp/bench-jail";
/// One boot may take this long before it is abandoned.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ferrovisor,
    /// Ferrovisor with `--seccomp off`: what the filters cost.
    FerrovisorNoSeccomp,
    /// `ferrovisor run --jail`: the VMM in its jail, with its waiting parent.
    FerrovisorJailed,
    QemuMicrovm,
    QemuQ35,
}

/// The kernel image booted: the PVH ELF (`vmlinux`) or the bzImage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Image {
    Pvh,
    BzImage,
}

/// What backs a QEMU guest's RAM: QEMU's default (anonymous memory) or a
/// memfd, as Ferrovisor's shared backing would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QemuRam {
    Default,
    Memfd,
}

/// One column of the table: a VMM booting one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    vmm: Vmm,
    image: Image,
    ram: QemuRam,
}

impl Peer {
    const fn new(vmm: Vmm, image: Image, ram: QemuRam) -> Self {
        Self { vmm, image, ram }
    }

    /// The columns of a default run; q35 is added on request (inner QEMU
    /// q35 boots have wedged the lab).
    const DEFAULT: [Peer; 7] = [
        Peer::new(Vmm::Ferrovisor, Image::Pvh, QemuRam::Default),
        Peer::new(Vmm::FerrovisorNoSeccomp, Image::Pvh, QemuRam::Default),
        Peer::new(Vmm::FerrovisorJailed, Image::Pvh, QemuRam::Default),
        Peer::new(Vmm::Ferrovisor, Image::BzImage, QemuRam::Default),
        Peer::new(Vmm::QemuMicrovm, Image::Pvh, QemuRam::Default),
        Peer::new(Vmm::QemuMicrovm, Image::Pvh, QemuRam::Memfd),
        Peer::new(Vmm::QemuMicrovm, Image::BzImage, QemuRam::Default),
    ];
    const Q35: Peer = Peer::new(Vmm::QemuQ35, Image::BzImage, QemuRam::Default);

    fn is_ferrovisor(self) -> bool {
        matches!(
            self.vmm,
            Vmm::Ferrovisor | Vmm::FerrovisorNoSeccomp | Vmm::FerrovisorJailed
        )
    }

    fn name(self) -> String {
        let vmm = match self.vmm {
            Vmm::Ferrovisor => "ferrovisor",
            Vmm::FerrovisorNoSeccomp => "ferrovisor no-seccomp",
            Vmm::FerrovisorJailed => "jailed",
            Vmm::QemuMicrovm => "microvm",
            Vmm::QemuQ35 => "q35",
        };
        let image = match self.image {
            Image::Pvh => "pvh",
            Image::BzImage => "bzImage",
        };
        let ram = match (self.vmm, self.ram) {
            (Vmm::Ferrovisor | Vmm::FerrovisorNoSeccomp | Vmm::FerrovisorJailed, _)
            | (_, QemuRam::Default) => "",
            (_, QemuRam::Memfd) => " memfd",
        };
        format!("{vmm} {image}{ram}")
    }
}

/// What one boot measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    /// From VMM start to its first guest instruction (ms), as Ferrovisor
    /// reports it.
    setup_ms: Option<f64>,
    /// From VMM start to the guest's write to port 0x80 (ms).
    marker_ms: Option<f64>,
    /// From VMM start to the /init console line reaching the VMM's stdout (ms).
    console_ms: Option<f64>,
    /// The guest's own uptime when its /init ran (ms): guest-kernel time.
    guest_uptime_ms: Option<f64>,
    /// From VMM start to its exit after the guest powered off (ms).
    total_ms: f64,
    /// KVM's exits and nested page faults from VMM start to the /init line.
    exits_to_init: Option<u64>,
    faults_to_init: Option<u64>,
    /// KVM's counters during the boot (debugfs), by name.
    kvm: BTreeMap<&'static str, u64>,
    /// Exits that reached the VMM in user space, as ferrovisor reports them.
    user_exits: Option<u64>,
    /// Peak resident memory outside guest RAM (KiB): the VMM's own.
    vmm_kib: u64,
    /// Peak resident guest RAM (KiB), and the part of it on huge pages.
    guest_kib: u64,
    guest_huge_kib: u64,
}

fn guest_cmdline() -> String {
    format!("{} ferrovisor.run=true", guestkit::DEFAULT_CMDLINE)
}

fn kernel_path(image: Image) -> &'static str {
    match image {
        Image::Pvh => LAB_VMLINUX,
        Image::BzImage => LAB_KERNEL,
    }
}

fn command_for(peer: Peer, marker_file: &Path) -> Command {
    let memory = format!("{MEMORY_MIB}M");
    let kernel = kernel_path(peer.image);
    if peer.is_ferrovisor() {
        let mut cmd = Command::new(LAB_FERROVISOR);
        cmd.args(["run", "--kernel", kernel, "--initramfs", LAB_INITRAMFS])
            .args(["--cmdline", &guest_cmdline(), "--cpus", "1"])
            .args(["--memory", &memory, "--stats"]);
        if peer.vmm == Vmm::FerrovisorNoSeccomp {
            cmd.args(["--seccomp", "off"]);
        }
        if peer.vmm == Vmm::FerrovisorJailed {
            cmd.args(["--jail", JAIL_DIR]);
        }
        return cmd;
    }
    let machine = match (peer.vmm, peer.ram) {
        (Vmm::QemuMicrovm, QemuRam::Memfd) => "microvm,acpi=on,memory-backend=ram",
        (Vmm::QemuMicrovm, QemuRam::Default) => "microvm,acpi=on",
        (_, QemuRam::Memfd) => "q35,memory-backend=ram",
        (_, QemuRam::Default) => "q35",
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", machine, "-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &memory]);
    if peer.ram == QemuRam::Memfd {
        cmd.args([
            "-object",
            &format!("memory-backend-memfd,id=ram,size={memory}"),
        ]);
    }
    cmd.args([
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
        kernel,
        "-initrd",
        LAB_INITRAMFS,
    ])
    .args(["-append", &guest_cmdline()])
    .arg("-chardev")
    .arg(format!("file,id=marker,path={}", marker_file.display()))
    .args(["-device", "isa-debugcon,iobase=0x80,chardev=marker"]);
    cmd
}

fn read_counter(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{KVM_DEBUGFS}/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn read_counters() -> BTreeMap<&'static str, u64> {
    KVM_COUNTERS
        .iter()
        .filter_map(|&name| Some((name, read_counter(name)?)))
        .collect()
}

/// A process's resident memory from its `/proc/PID/smaps`, split into
/// the VMM's own and guest RAM, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RssSplit {
    own: u64,
    guest: u64,
    /// The part of guest RAM on huge pages.
    guest_huge: u64,
}

/// Splits smaps into the VMM's own memory and guest RAM. Guest RAM is every
/// `/memfd:` mapping and every mapping of at least [`GUEST_RAM_MIN_KIB`]:
/// the VMMs back it with a memfd or with one large anonymous mapping per
/// region. Everything else (heap, stacks, the binary and its libraries) is
/// the VMM's own.
fn split_rss(smaps: &str) -> RssSplit {
    let mut split = RssSplit::default();
    let mut in_memfd = false;
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        let value = || -> u64 {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_memfd = words.nth(4).is_some_and(|path| path.starts_with("/memfd:"));
            in_guest = in_memfd;
        } else if first == "Size:" {
            in_guest = in_memfd || value() >= GUEST_RAM_MIN_KIB;
        } else if first == "Rss:" {
            if in_guest {
                split.guest += value();
            } else {
                split.own += value();
            }
        } else if in_guest
            && matches!(
                first,
                "AnonHugePages:" | "ShmemPmdMapped:" | "FilePmdMapped:"
            )
        {
            split.guest_huge += value();
        }
    }
    split
}

fn rss(pid: u32) -> Option<RssSplit> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(split_rss(&smaps))
}

/// The memory of `pid` and its children: a jailed VMM is the child of the
/// process started, which waits for it, and both count.
fn rss_with_children(pid: u32) -> Option<RssSplit> {
    let mut total = rss(pid)?;
    let parent = format!("PPid:\t{pid}\n");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if status.contains(&parent) {
            if let Some(split) = rss(child) {
                total.own += split.own;
                total.guest += split.guest;
                total.guest_huge += split.guest_huge;
            }
        }
    }
    Some(total)
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

/// The guest's uptime in the /init line, `... (uptime 1.23 s)`, in ms.
fn uptime_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find("uptime ")? + "uptime ".len()..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].parse::<f64>().ok().map(|s| s * 1000.0)
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
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    })
}

/// What the console reader saw when the /init line came: the time, the
/// guest's uptime in the line, and KVM's exits and nested faults so far.
#[derive(Debug, Clone, Copy)]
struct AtInit {
    ms: f64,
    uptime_ms: Option<f64>,
    exits: Option<u64>,
    faults: Option<u64>,
}

type InitSeen = Arc<Mutex<Option<AtInit>>>;

fn read_console(
    stdout: impl Read + Send + 'static,
    start: Instant,
    before: BTreeMap<&'static str, u64>,
    seen: InitSeen,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if line.contains(INIT_LINE) {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                let since =
                    |name: &str| Some(read_counter(name)?.saturating_sub(*before.get(name)?));
                let facts = AtInit {
                    ms,
                    uptime_ms: uptime_ms(&line),
                    exits: since("exits"),
                    faults: since("pf_taken"),
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.get_or_insert(facts);
            }
        }
    })
}

/// Polls the running VMM: KVM's counters every 20 ms, and its memory once,
/// at the first poll after the /init line: reading smaps walks the VMM's
/// mappings under its memory-map lock, and sampling it every 250 ms while
/// the guest booted slowed QEMU's boot far more than Ferrovisor's
/// (docs/benchmarks.md). Returns the VMM's exit status.
fn poll_until_exit(
    child: &mut std::process::Child,
    start: Instant,
    before: &BTreeMap<&'static str, u64>,
    init_seen: &InitSeen,
    sample: &mut Sample,
) -> Result<std::process::ExitStatus> {
    let mut memory_read = false;
    loop {
        if let Some(status) = child.try_wait().ctx(|| "wait".to_string())? {
            return Ok(status);
        }
        for (name, now) in read_counters() {
            let delta = now.saturating_sub(before.get(name).copied().unwrap_or(now));
            let slot = sample.kvm.entry(name).or_insert(0);
            *slot = (*slot).max(delta);
        }
        if !memory_read
            && init_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        {
            memory_read = true;
            if let Some(split) = rss_with_children(child.id()) {
                sample.vmm_kib = split.own;
                sample.guest_kib = split.guest;
                sample.guest_huge_kib = split.guest_huge;
            }
        }
        if start.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail!("did not finish within {} s", BOOT_LIMIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restricts the calling thread to `cpus`.
fn restrict_to(cpus: impl Iterator<Item = usize>) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: `set` is valid storage and `cpu` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the set is valid for the size given.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// With two or more CPUs, the measuring threads keep to CPU 0, so that
/// their polling leaves the other CPUs to the VMM under test (a host
/// interrupt on the vCPU's CPU is a VM exit); the VMM may run anywhere, as
/// it would alone. The same for every VMM.
fn keep_measuring_aside(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 || restrict_to(0..1).is_err() {
        return;
    }
    // SAFETY: the hook runs in the child between fork and exec and only
    // makes the sched_setaffinity system call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || restrict_to(0..cpus.min(libc::CPU_SETSIZE as usize)));
    }
}

fn measure(peer: Peer) -> Result<Sample> {
    let marker_file = PathBuf::from("/tmp/bench-marker");
    let _ = std::fs::remove_file(&marker_file);
    let mut cmd = command_for(peer, &marker_file);
    let before = read_counters();
    keep_measuring_aside(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .ctx(|| format!("cannot start {}", peer.name()))?;
    let done = Arc::new(AtomicBool::new(false));
    // Ferrovisor times its own marker; QEMU's is its debugcon file, polled.
    let marker = (!peer.is_ferrovisor()).then(|| watch_marker(marker_file, start, done.clone()));
    let stdout = child.stdout.take().ok_or_else(|| fail!("no stdout"))?;
    let init_seen: InitSeen = Arc::new(Mutex::new(None));
    let reader = read_console(stdout, start, before.clone(), init_seen.clone());
    let mut stderr = child.stderr.take().ok_or_else(|| fail!("no stderr"))?;
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut sample = Sample::default();
    let polled = poll_until_exit(&mut child, start, &before, &init_seen, &mut sample);
    sample.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let status = polled.map_err(|e| fail!("{}: {e}", peer.name()))?;
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let init = *init_seen.lock().unwrap_or_else(|e| e.into_inner());
    sample.console_ms = init.map(|i| i.ms);
    sample.guest_uptime_ms = init.and_then(|i| i.uptime_ms);
    sample.exits_to_init = init.and_then(|i| i.exits);
    sample.faults_to_init = init.and_then(|i| i.faults);
    let stats = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ferrovisor-stats:"));
    sample.setup_ms = stats
        .and_then(|json| json_number(json, "setup_us"))
        .map(|us| us / 1000.0);
    sample.user_exits = stats
        .and_then(|json| json_number(json, "exits"))
        .map(|v| v as u64);
    sample.marker_ms = if peer.is_ferrovisor() {
        stats
            .and_then(|json| json_number(json, "boot_marker_us"))
            .map(|us| us / 1000.0)
    } else {
        marker.and_then(|m| m.join().ok().flatten())
    };
    if !status.success() || sample.console_ms.is_none() {
        return Err(fail!(
            "{} ended with {status} (init line seen: {}); stderr: {}",
            peer.name(),
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
        // A space first, so that long names never run together.
        print!(" {:>25}", format!("{name} (n={})", samples.len()));
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
            print!(" {cell:>25}");
        }
        println!();
    }
}

/// A row of a benchmark table: its label and how to read it from one run.
pub type Metric<S> = (&'static str, fn(&S) -> Option<f64>);

/// A KVM counter of a sample, as a table cell.
fn kvm(s: &Sample, name: &str) -> Option<f64> {
    s.kvm.get(name).map(|&v| v as f64)
}

/// KVM exits that none of the counted kinds covers (MSR and CPUID
/// intercepts, interrupt windows of other kinds, and the like).
fn other_exits(s: &Sample) -> Option<f64> {
    let total = *s.kvm.get("exits")?;
    let counted: u64 = KVM_COUNTERS[1..]
        .iter()
        .filter(|&&n| n != "hypercalls" && n != "insn_emulation")
        .filter_map(|n| s.kvm.get(n))
        .sum();
    Some(total.saturating_sub(counted) as f64)
}

const METRICS: [Metric<Sample>; 23] = [
    ("VMM start -> first guest instruction, ms", |s| s.setup_ms),
    ("VMM start -> /init marker (port 0x80), ms", |s| s.marker_ms),
    ("VMM start -> /init console line, ms", |s| s.console_ms),
    ("guest uptime at /init (guest clock), ms", |s| {
        s.guest_uptime_ms
    }),
    ("VMM start -> guest clock start, ms", |s| {
        Some(s.console_ms? - s.guest_uptime_ms?)
    }),
    ("VMM start -> exit after poweroff, ms", |s| Some(s.total_ms)),
    ("KVM exits, VMM start -> /init", |s| {
        s.exits_to_init.map(|v| v as f64)
    }),
    ("nested page faults, VMM start -> /init", |s| {
        s.faults_to_init.map(|v| v as f64)
    }),
    ("KVM exits to poweroff, all kinds (debugfs)", |s| {
        kvm(s, "exits")
    }),
    ("  nested page faults (pf_taken)", |s| kvm(s, "pf_taken")),
    ("  port I/O (io_exits)", |s| kvm(s, "io_exits")),
    ("  MMIO (mmio_exits)", |s| kvm(s, "mmio_exits")),
    ("  HLT (halt_exits)", |s| kvm(s, "halt_exits")),
    ("  host interrupts (irq_exits)", |s| kvm(s, "irq_exits")),
    ("  interrupt windows (irq_window_exits)", |s| {
        kvm(s, "irq_window_exits")
    }),
    ("  signals (signal_exits)", |s| kvm(s, "signal_exits")),
    ("  other (MSR, CPUID, hypercalls, ...)", other_exits),
    ("hypercalls", |s| kvm(s, "hypercalls")),
    ("instructions emulated by KVM", |s| kvm(s, "insn_emulation")),
    ("exits handled in user space (VMM-reported)", |s| {
        s.user_exits.map(|v| v as f64)
    }),
    ("VMM memory beyond guest RAM (smaps Rss), MiB", |s| {
        Some(s.vmm_kib as f64 / 1024.0)
    }),
    ("guest RAM resident (smaps Rss), MiB", |s| {
        Some(s.guest_kib as f64 / 1024.0)
    }),
    ("guest RAM on huge pages, MiB", |s| {
        Some(s.guest_huge_kib as f64 / 1024.0)
    }),
];

fn print_table(results: &[(Peer, Vec<Sample>)], runs: usize) {
    println!();
    println!(
        "boot benchmark: guest kit, 1 vCPU, {MEMORY_MIB} MiB, median of up to {runs} runs; \
         nested KVM inside the lab (emulated AMD SVM), so absolute times are far above hardware"
    );
    let names: Vec<String> = results.iter().map(|(peer, _)| peer.name()).collect();
    let runs: Vec<(&str, &[Sample])> = results
        .iter()
        .zip(&names)
        .map(|((_, samples), name)| (name.as_str(), samples.as_slice()))
        .collect();
    print_medians(46, &runs, &METRICS);
    println!("(xN) = that column's figure divided by the first column's. pvh boots the kit's");
    println!("vmlinux through its PVH entry, bzImage the compressed kernel; QEMU runs on its");
    println!("default (anonymous) RAM unless marked memfd. QEMU's marker is timed by polling");
    println!("its isa-debugcon output file; ferrovisor's is reported by the VMM itself.");
}

/// `xtask bench-in-lab boot [RUNS] [q35|jail]`: the measuring half, run inside the lab.
pub fn in_lab(args: &[String]) -> Result<u8> {
    match args.first().map(String::as_str) {
        Some("boot") => {}
        Some("blk") => return crate::bench_blk::in_lab(args),
        Some("rate") => return crate::bench_rate::in_lab(args),
        Some("distro") => return crate::bench_distro::in_lab(args),
        Some("fabric-guests") => return crate::bench_fabric_guests::in_lab(args),
        Some("sched-lab") => return crate::bench_sched::in_lab(args),
        _ => {
            return Err(fail!(
                "bench-in-lab: only `boot`, `distro`, `blk`, `rate`, `fabric-guests` and `sched-lab` are known"
            ))
        }
    }
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let mode = args.get(2).map(String::as_str);
    let mut peers = Peer::DEFAULT.to_vec();
    match mode {
        Some("q35") => peers.push(Peer::Q35),
        // The containment columns alone: more rounds fit in one session.
        Some("jail") => peers.retain(|p| p.is_ferrovisor() && p.image == Image::Pvh),
        _ => {}
    }
    let mut results: Vec<(Peer, Vec<Sample>)> = peers.iter().map(|&p| (p, Vec::new())).collect();
    // Rounds, each booting every peer once, so that a slow stretch of the
    // lab does not fall on one column.
    for run in 1..=runs {
        for (peer, samples) in results.iter_mut() {
            match measure(*peer) {
                Ok(s) => {
                    println!(
                        "bench: {} run {run}: init line at {:.0} ms, {} exits, {} nested faults",
                        peer.name(),
                        s.console_ms.unwrap_or(0.0),
                        s.kvm.get("exits").copied().unwrap_or(0),
                        s.kvm.get("pf_taken").copied().unwrap_or(0),
                    );
                    samples.push(s);
                }
                Err(e) => println!("bench: {} run {run} failed: {e}", peer.name()),
            }
        }
    }
    print_table(&results, runs);
    Ok(0)
}

/// `cargo xtask bench boot [--runs N] [--q35 | --jail]`.
pub fn command(args: &[String]) -> Result<u8> {
    if args.first().map(String::as_str) == Some("blk") {
        return crate::bench_blk::command(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("rate") {
        return crate::bench_rate::command(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("fabric") {
        return crate::bench_fabric::command(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("sched") {
        return crate::bench_sched::command(&args[1..]);
    }
    let usage = || {
        fail!(
            "usage: cargo xtask bench boot [--runs N] [--q35 | --jail] | \
             cargo xtask bench boot --distro [--runs N] [--qemu-runs N] [--trace] | \
             cargo xtask bench blk [--runs N] [--size MIB] [--secs N] | \
             cargo xtask bench rate [--size MIB] [--secs N] [--net MIB] | \
             cargo xtask bench fabric --switch-only [--secs N] | \
             cargo xtask bench fabric --guests [--runs N] [--secs N] [--tries N] | \
             cargo xtask bench sched"
        )
    };
    let mut runs = None;
    let mut mode = "";
    let mut distro = false;
    let mut qemu_runs = None;
    let mut trace = false;
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("boot") {
        return Err(usage());
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                let n = it.next().ok_or_else(usage)?;
                runs = Some(
                    n.parse()
                        .map_err(|_| fail!("--runs: `{n}` is not a number"))?,
                );
            }
            "--q35" if mode.is_empty() => mode = " q35",
            "--jail" if mode.is_empty() => mode = " jail",
            "--distro" => distro = true,
            "--trace" => trace = true,
            "--qemu-runs" => {
                let n = it.next().ok_or_else(usage)?;
                qemu_runs = Some(
                    n.parse()
                        .map_err(|_| fail!("--qemu-runs: `{n}` is not a number"))?,
                );
            }
            _ => return Err(usage()),
        }
    }
    if distro {
        if !mode.is_empty() {
            return Err(usage());
        }
        return crate::bench_distro::command(
            runs.unwrap_or(20),
            qemu_runs.unwrap_or(crate::bench_distro::QEMU_RUNS),
            trace,
        );
    }
    if qemu_runs.is_some() || trace {
        return Err(usage());
    }
    let runs = runs.unwrap_or(3);
    run_in_lab(&format!("boot {runs}{mode}"), Duration::from_secs(15 * 60))
}

/// Runs `xtask bench-in-lab ARGS` inside one lab session, with QEMU and
/// this xtask binary shipped in, and returns its exit status.
pub fn run_in_lab(args: &str, deadline: Duration) -> Result<u8> {
    run_in_lab_with(args, deadline, |_| {})
}

/// [`run_in_lab`], with `more` adding to the lab session (files, data).
pub fn run_in_lab_with(args: &str, deadline: Duration, more: impl FnOnce(&mut Spec)) -> Result<u8> {
    let kit = guestkit::build()?;
    let ferrovisor = lab::build_ferrovisor()?;
    let me = std::env::current_exe().ctx(|| "cannot find the xtask binary".to_string())?;
    let mut spec = Spec::new(Some(format!("/lab/bin/xtask bench-in-lab {args}")));
    spec.interactive = false;
    spec.with_qemu = true;
    spec.deadline = deadline;
    spec.files.push((me, "/lab/bin/xtask".to_string()));
    more(&mut spec);
    let outcome = lab::run(&spec, &kit, Some(&ferrovisor))?;
    Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_finds_guest_ram_in_memfds_and_large_mappings() {
        let smaps = "\
55d0a0000000-55d0a0200000 r-xp 00000000 00:02 12 /lab/bin/ferrovisor
Size:               2048 kB
Rss:                1500 kB
7f0000000000-7f0020000000 rw-s 00000000 00:01 99 /memfd:ferrovisor-guest-ram (deleted)
Size:             524288 kB
Rss:              120000 kB
ShmemPmdMapped:     4096 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  12 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 300 kB
AnonHugePages:         0 kB
7f2000000000-7f2020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:               90112 kB
AnonHugePages:     88064 kB
";
        assert_eq!(
            split_rss(smaps),
            RssSplit {
                own: 1500 + 12 + 300,
                guest: 120000 + 90112,
                guest_huge: 4096 + 88064
            }
        );
    }

    #[test]
    fn the_guest_uptime_is_read_from_the_init_line() {
        let line = "ferrovisor-guest: init reached (uptime 1.84 s)";
        assert_eq!(uptime_ms(line), Some(1840.0));
        assert_eq!(uptime_ms("ferrovisor-guest: init reached"), None);
    }

    #[test]
    fn other_exits_are_what_no_counted_kind_covers() {
        let mut s = Sample::default();
        s.kvm.insert("exits", 100);
        s.kvm.insert("pf_taken", 50);
        s.kvm.insert("io_exits", 30);
        s.kvm.insert("hypercalls", 7);
        assert_eq!(other_exits(&s), Some(20.0));
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
