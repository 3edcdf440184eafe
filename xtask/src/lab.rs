//! The lab: an emulated machine (QEMU TCG with AMD SVM and nested paging) in
//! which KVM works, for booting Linux guests where the host's KVM cannot.
//! See docs/lab.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cpio::Archive;
use crate::guestkit::{self, Kit};
use crate::kmod::{self, ModuleTree};
use crate::util::{self, Context, Result};
use crate::watchdog::{self, Ending, Watch};

/// The lab's /init script.
const INIT: &str = include_str!("../../lab/init");
/// The line the lab's init prints after the command, followed by its status.
pub const STATUS_MARKER: &str = "@@ferrovisor-lab@@ exit-status=";
/// The lab's first own line; console output before it is firmware noise.
const HELLO: &str = "ferrovisor-lab: up";
/// Modules the lab loads (dependencies are added): KVM, tun for the taps
/// of guests' network interfaces, and the Linux bridge that joins taps in
/// the fabric benchmark.
const LAB_MODULES: &[&str] = &["kvm_amd", "tun", "bridge"];
/// The lab kernel's command line.
/// `loglevel=2` keeps the lab kernel's KVM chatter about nested guests off the
/// console; its own panics still show.
const LAB_CMDLINE: &str = "console=ttyS0 loglevel=2 panic=-1 io_delay=none";

/// Where things are inside the lab.
pub const LAB_FERROVISOR: &str = "/lab/bin/ferrovisor";
pub const LAB_KERNEL: &str = "/lab/guest/vmlinuz";
pub const LAB_VMLINUX: &str = "/lab/guest/vmlinux";
pub const LAB_INITRAMFS: &str = "/lab/guest/initramfs.cpio";

/// What to run in the lab and how.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Shell text to run; `None` gives an interactive shell.
    pub command: Option<String>,
    /// Pass the terminal through (for a shell, or an interactive guest).
    pub interactive: bool,
    /// Also ship the host's qemu-system-x86_64 (for comparisons).
    pub with_qemu: bool,
    /// Extra files: (host path, lab path).
    pub files: Vec<(PathBuf, String)>,
    /// Extra data files, shipped as they are (no libraries looked up).
    pub data: Vec<(PathBuf, String)>,
    /// Extra environment for the command.
    pub env: Vec<(String, String)>,
    /// Hard limit for one lab boot.
    pub deadline: Duration,
}

impl Spec {
    pub fn new(command: Option<String>) -> Self {
        Spec {
            interactive: command.is_none(),
            command,
            with_qemu: false,
            files: Vec::new(),
            data: Vec::new(),
            env: Vec::new(),
            deadline: Duration::from_secs(30 * 60),
        }
    }
}

/// What a lab run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status, as reported by the lab.
    pub status: i32,
    /// The lab console (carriage returns and escape sequences removed).
    pub console: String,
}

/// Builds the release VMM binary.
pub fn build_ferrovisor() -> Result<PathBuf> {
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "ferrovisor"])
            .current_dir(util::workspace_root()),
    )?;
    let bin = util::target_dir().join("release/ferrovisor");
    if !bin.is_file() {
        return Err(fail!("cargo built no {}", bin.display()));
    }
    Ok(bin)
}

/// The shared libraries (and dynamic loader) a host binary needs, per `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .ctx(|| "cannot run ldd".to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Adds a host binary and its libraries at `lab_path`.
fn add_program(archive: &mut Archive, host: &Path, lab_path: &str) -> Result<()> {
    archive.host_file(lab_path, 0o755, host);
    for lib in shared_libraries(host)? {
        let at = lib.to_string_lossy().into_owned();
        archive.host_file(&at, 0o755, &lib);
    }
    Ok(())
}

/// Adds the host's QEMU, its libraries and the firmware files it loads.
fn add_qemu(archive: &mut Archive) -> Result<()> {
    let qemu = util::which("qemu-system-x86_64")
        .ok_or_else(|| fail!("qemu-system-x86_64 is not installed"))?;
    add_program(archive, &qemu, "/usr/bin/qemu-system-x86_64")?;
    let firmware = [
        "/usr/share/seabios/bios-256k.bin",
        "/usr/share/seabios/bios-microvm.bin",
        "/usr/share/qemu/qboot.rom",
        "/usr/share/qemu/linuxboot_dma.bin",
        "/usr/share/qemu/linuxboot.bin",
        "/usr/share/qemu/kvmvapic.bin",
        "/usr/share/qemu/pvh.bin",
        "/usr/share/qemu/multiboot_dma.bin",
    ];
    for file in firmware.iter().map(Path::new).filter(|p| p.exists()) {
        archive.host_file(&file.to_string_lossy(), 0o644, file);
    }
    archive.symlink("/usr/share/qemu/bios-microvm.bin", "qboot.rom");
    Ok(())
}

/// The per-run environment file sourced by the lab's init.
fn env_file(spec: &Spec) -> String {
    let mut env = vec![
        ("FERROVISOR_BIN", LAB_FERROVISOR.to_string()),
        ("FERROVISOR_KERNEL", LAB_KERNEL.to_string()),
        ("FERROVISOR_VMLINUX", LAB_VMLINUX.to_string()),
        ("FERROVISOR_INITRAMFS", LAB_INITRAMFS.to_string()),
        ("FERROVISOR_CMDLINE", guestkit::DEFAULT_CMDLINE.to_string()),
        ("FERROVISOR_IN_LAB", "1".to_string()),
    ];
    env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    env.iter()
        .map(|(k, v)| format!("export {k}={}\n", util::shell_quote(v)))
        .collect()
}

/// Writes the lab's initramfs for one run.
fn build_initramfs(
    spec: &Spec,
    kit: &Kit,
    ferrovisor: Option<&Path>,
    run_dir: &RunDir,
) -> Result<PathBuf> {
    let mut archive = Archive::new();
    guestkit::add_busybox(&mut archive, &kit.busybox)?;
    archive.host_file("/bin/portio", 0o755, &kit.portio);
    archive.bytes("/init", 0o755, INIT);
    let (tree, _) = ModuleTree::open(&kit.kernel_root)?;
    let (modules, missing) = tree.load_order(LAB_MODULES)?;
    if !missing.is_empty() {
        return Err(fail!("the kernel package lacks {}", missing.join(", ")));
    }
    kmod::add_to_archive(&mut archive, "/lab/modules", modules);
    if let Some(ferrovisor) = ferrovisor {
        add_program(&mut archive, ferrovisor, LAB_FERROVISOR)?;
    }
    archive.host_file(LAB_KERNEL, 0o644, &kit.vmlinuz);
    archive.host_file(LAB_VMLINUX, 0o644, &kit.vmlinux);
    archive.host_file(LAB_INITRAMFS, 0o644, &kit.initramfs);
    if spec.with_qemu {
        add_qemu(&mut archive)?;
    }
    for (host, lab_path) in &spec.files {
        if !host.is_file() {
            return Err(fail!("{} does not exist", host.display()));
        }
        add_program(&mut archive, host, lab_path)?;
    }
    for (host, lab_path) in &spec.data {
        if !host.is_file() {
            return Err(fail!("{} does not exist", host.display()));
        }
        archive.host_file(lab_path, 0o644, host);
    }
    archive.bytes("/lab/env", 0o644, env_file(spec));
    if let Some(command) = &spec.command {
        archive.bytes("/lab/cmd", 0o644, format!("{command}\n"));
    }
    let out = run_dir.initramfs();
    archive.write_to(&out)?;
    Ok(out)
}

/// One lab run's own directory, `target/lab/run-PID-N/`, for everything it
/// writes (its initramfs, its heartbeat), so that labs started at the same
/// time in one tree never share a path. Removed when the run ends.
#[derive(Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new() -> Result<Self> {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let labs = util::target_dir().join("lab");
        remove_orphans(&labs);
        let dir = labs.join(format!("run-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        util::mkdir(&dir)?;
        Ok(Self(dir))
    }

    fn initramfs(&self) -> PathBuf {
        self.0.join("initramfs.cpio")
    }

    fn heartbeat(&self) -> PathBuf {
        self.0.join("heartbeat")
    }
}

/// Removes the directories of runs whose process is gone (killed before
/// it could clean up), leaving those of live runs alone.
fn remove_orphans(labs: &Path) {
    let Ok(entries) = std::fs::read_dir(labs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("run-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether QEMU may run the lab with one host thread per vCPU.
fn multi_threaded_tcg() -> bool {
    std::env::var("FERROVISOR_LAB_MTTCG").map_or(true, |v| v != "0")
}

fn qemu_command(spec: &Spec, kit: &Kit, run_dir: &RunDir) -> Command {
    let initramfs = run_dir.initramfs();
    let mut cmd = match crate::lab_qemu::get() {
        Some(qemu) => qemu.command(),
        None => Command::new("qemu-system-x86_64"),
    };
    let accel = if multi_threaded_tcg() {
        "tcg,thread=multi"
    } else {
        "tcg,thread=single"
    };
    cmd.args([
        "-accel",
        accel,
        "-cpu",
        "EPYC,+svm,+npt",
        "-smp",
        "2",
        "-m",
        "4096",
    ])
    .args(["-M", "pc", "-nodefaults", "-display", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(&kit.vmlinuz)
    .arg("-initrd")
    .arg(&initramfs)
    .args(["-append", LAB_CMDLINE]);
    if spec.interactive {
        // Ctrl-A x quits; Ctrl-C goes to the lab.
        cmd.args(["-chardev", "stdio,id=console,mux=on,signal=off"])
            .args(["-serial", "chardev:console", "-mon", "chardev=console"]);
    } else {
        cmd.args(["-chardev", "stdio,id=console,signal=off"])
            .args(["-serial", "chardev:console"]);
    }
    // The second UART (ttyS1 in the lab) carries the lab's heartbeat.
    cmd.arg("-chardev")
        .arg(format!(
            "file,id=heartbeat,path={}",
            run_dir.heartbeat().display()
        ))
        .args(["-serial", "chardev:heartbeat"]);
    cmd
}

/// Why an attempt failed, and whether another attempt may help. A
/// retryable failure carries the console up to the failure.
enum Failure {
    Retry(String, String),
    Fatal(String),
}

fn attempt(
    spec: &Spec,
    kit: &Kit,
    run_dir: &RunDir,
) -> Result<std::result::Result<Outcome, Failure>> {
    let watch = Watch {
        stall: (!spec.interactive).then_some(Duration::from_secs(90)),
        deadline: (!spec.interactive).then_some(spec.deadline),
        interactive: spec.interactive,
        hold_until: Some(HELLO),
        heartbeat: Some(run_dir.heartbeat()),
    };
    let _ = std::fs::remove_file(run_dir.heartbeat());
    let report = watchdog::supervise(qemu_command(spec, kit, run_dir), &watch)?;
    let status = report.stdout.lines().rev().find_map(|l| {
        let at = l.find(STATUS_MARKER)?;
        l[at + STATUS_MARKER.len()..].trim().parse::<i32>().ok()
    });
    let tail = || {
        let lines: Vec<&str> = report.stdout.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    Ok(match (&report.ending, status) {
        (Ending::Exited { .. }, Some(status)) => Ok(Outcome {
            status,
            console: report.stdout,
        }),
        (Ending::Stalled(idle), _) => Err(Failure::Retry(
            format!(
                "the lab hung: no console output and no CPU progress, no heartbeat, or \
                 one of its CPUs stuck (a soft lockup), for {} s; killed it",
                idle.as_secs()
            ),
            report.stdout.clone(),
        )),
        (Ending::TimedOut(t), _) => Err(Failure::Fatal(format!(
            "the lab ran past its {} s deadline; killed it",
            t.as_secs()
        ))),
        (Ending::Exited { code, signal }, None) => {
            let tcg = report.stderr.contains("tcg") || report.stderr.contains("Assertion");
            // The lab's init always reports a status unless its own kernel
            // died under it (seen: a stack-guard fault in the lab kernel while
            // it ran a nested guest). An inner guest's panic cannot stop the
            // lab's init from reporting, so a panic seen here is the lab's.
            let lab_panic = report.stdout.contains("Kernel panic - not syncing");
            let why = match (signal, tcg, lab_panic) {
                (_, true, _) => "QEMU aborted on an internal TCG error".to_string(),
                (Some(sig), _, _) => format!("QEMU died of signal {sig}"),
                (None, _, true) => "the lab's own kernel panicked".to_string(),
                (None, _, false) => {
                    format!("the lab stopped without reporting a status (QEMU exit {code:?})")
                }
            };
            if !report.released {
                eprintln!("xtask: lab console before it failed:\n{}", tail());
            }
            Err(Failure::Retry(why, report.stdout.clone()))
        }
    })
}

/// A lab boot that failed in a way another boot may not: the reason, and the
/// console up to the failure.
#[derive(Debug)]
pub struct LabFailure {
    pub why: String,
    pub console: String,
}

/// Boots the lab once and runs `spec.command` in it. `Ok(Err(..))` is a hung
/// or crashed lab, which the caller may boot again; `Err` is final.
pub fn run_once(
    spec: &Spec,
    kit: &Kit,
    ferrovisor: Option<&Path>,
) -> Result<std::result::Result<Outcome, LabFailure>> {
    util::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let run_dir = RunDir::new()?;
    build_initramfs(spec, kit, ferrovisor, &run_dir)?;
    match attempt(spec, kit, &run_dir)? {
        Ok(outcome) => Ok(Ok(outcome)),
        Err(Failure::Fatal(why)) => Err(fail!("{why}")),
        Err(Failure::Retry(why, console)) => Ok(Err(LabFailure { why, console })),
    }
}

/// How many times a hung or crashed lab is booted in all.
const ATTEMPTS: u32 = 3;

/// Boots the lab, runs `spec.command` in it and returns its status. A hung
/// or crashed lab is booted again, up to [`ATTEMPTS`] times in all.
pub fn run(spec: &Spec, kit: &Kit, ferrovisor: Option<&Path>) -> Result<Outcome> {
    util::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let run_dir = RunDir::new()?;
    build_initramfs(spec, kit, ferrovisor, &run_dir)?;
    let mut last = String::new();
    for try_number in 1..=ATTEMPTS {
        match attempt(spec, kit, &run_dir)? {
            Ok(outcome) => return Ok(outcome),
            Err(Failure::Fatal(why)) => return Err(fail!("{why}")),
            Err(Failure::Retry(why, _)) => {
                if try_number < ATTEMPTS {
                    eprintln!(
                        "\nxtask: LAB FAILURE: {why}. Booting it again (attempt {} of {ATTEMPTS}).",
                        try_number + 1
                    );
                }
                last = why;
            }
        }
    }
    Err(fail!("the lab failed {ATTEMPTS} times; last time: {last}"))
}

/// `cargo xtask lab [--qemu] [--add HOST[:LABPATH]]... [-- CMD...]`.
pub fn command(args: &[String]) -> Result<u8> {
    let (opts, words) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let command = (!words.is_empty()).then(|| words.join(" "));
    let mut spec = Spec::new(command);
    let mut opts = opts.iter();
    while let Some(opt) = opts.next() {
        match opt.as_str() {
            "--qemu" => spec.with_qemu = true,
            "--add" => {
                let value = opts
                    .next()
                    .ok_or_else(|| fail!("--add needs HOST[:LABPATH]"))?;
                let (host, lab_path) = match value.split_once(':') {
                    Some((h, l)) => (h.to_string(), l.to_string()),
                    None => {
                        let name = Path::new(value).file_name().map(|n| n.to_string_lossy());
                        let name = name.ok_or_else(|| fail!("--add {value}: not a file"))?;
                        (value.clone(), format!("/lab/bin/{name}"))
                    }
                };
                spec.files.push((PathBuf::from(host), lab_path));
            }
            other => return Err(fail!("unknown lab option `{other}` (CMD goes after `--`)")),
        }
    }
    let kit = guestkit::build()?;
    // The lab is useful without the VMM too (e.g. with --qemu), so a VMM that
    // does not build is reported but does not stop it.
    let ferrovisor = match build_ferrovisor() {
        Ok(bin) => Some(bin),
        Err(e) => {
            eprintln!("xtask: warning: {e}; the lab will have no ferrovisor binary");
            None
        }
    };
    let outcome = run(&spec, &kit, ferrovisor.as_deref())?;
    Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_runs_never_share_an_initramfs_or_a_heartbeat() {
        let (a, b) = (RunDir::new().unwrap(), RunDir::new().unwrap());
        assert_ne!(a.initramfs(), b.initramfs());
        assert_ne!(a.heartbeat(), b.heartbeat());
        assert!(a.initramfs().starts_with(&a.0) && a.heartbeat().starts_with(&a.0));
        assert!(a.0.is_dir() && b.0.is_dir());
        let gone = a.0.clone();
        std::fs::write(a.heartbeat(), b"x").unwrap();
        drop(a);
        assert!(!gone.exists(), "a run's directory goes with it");
        assert!(b.0.is_dir(), "and leaves the other run's alone");
    }

    #[test]
    fn a_killed_run_leaves_nothing_behind_the_next() {
        let labs = util::target_dir().join("lab");
        // No process has pid 0x3fffffff (above the kernel's pid_max).
        let orphan = labs.join("run-1073741823-0");
        util::mkdir(&orphan).unwrap();
        let live = RunDir::new().unwrap();
        assert!(!orphan.exists(), "the dead run's directory is gone");
        assert!(live.0.is_dir());
    }
}
