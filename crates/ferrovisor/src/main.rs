//! `ferrovisor`: the command-line front end. It parses arguments and hands a
//! VM configuration to the VMM; everything else lives in the library crates.

mod args;
mod cli;
mod jailed;
mod placement;

use std::error::Error;
use std::process::ExitCode;
use std::time::Instant;

use args::{Command, Guest, RunArgs};
use vmm::{RunOptions, RunReport, VmExit};

const USAGE: &str = "\
ferrovisor: a hypervisor for Linux hosts with KVM

Usage:
  ferrovisor run --kernel PATH [--initramfs PATH] [--cmdline STR] [--cpus N] [--memory SIZE]
                 [--memory-backing auto|anonymous|memfd] [--hugepages 2M|1G]
                 [--disk path=FILE[,readonly=on]]... [--net tap=NAME[,mac=MAC]]...
                 [--console serial|virtio] [--rng] [--vsock cid=N,socket=PATH]
                 [--affinity CPUS | --affinity VCPU=CPUS...] [--cpu-features -NAME,+NAME...]
                 [--uuid UUID] [--netns NAME] [--seccomp on|log|off]
                 [--runtime-dir DIR] [--stats] [--jail DIR [--jail-uid UID[:GID]]] [--name NAME]
  ferrovisor run --config GUEST.toml [--seccomp on|log|off] [--runtime-dir DIR] [--stats] [--jail DIR ...]
  ferrovisor daemon [--socket PATH] [--state-dir DIR] [--images DIR[,block=on]]...
                    [--taps NAME|PREFIX*,...] [--group NAME] [--uid-range A-B] [--no-jail]
  ferrovisor up SYSTEM.toml | create FILE [--name N] [--start]
  ferrovisor start|pause|resume|stop|kill|delete|info|console NAME
  ferrovisor list | top
  ferrovisor limit NAME DEVICE [--bandwidth RATE] [--ops N] [--burst SIZE] ...
  ferrovisor --help | --version

The management commands talk to the daemon; 'ferrovisor list --help' lists
their options (docs/control-plane.md).
";

const RUN_USAGE: &str = "\
Usage: ferrovisor run --kernel PATH [options]
       ferrovisor run --config GUEST.toml [--seccomp on|log|off] [--runtime-dir DIR] [--stats]

Boots one guest in the foreground. Its serial console is this terminal;
Ctrl-A x stops it.

  --kernel PATH      bzImage, PVH ELF (vmlinux) or multiboot kernel
  --initramfs PATH   initramfs (multiboot: the first module)
  --cmdline STR      kernel command line (default: \"console=ttyS0 reboot=k panic=1\")
  --cpus N           vCPUs, 1-254 (default 1)
  --memory SIZE      guest RAM, e.g. 512M or 2G (default 512M)
  --memory-backing auto|anonymous|memfd
                     what backs guest RAM (default auto: anonymous memory,
                     a memfd when something shares it)
  --hugepages 2M|1G  guest RAM on the host's reserved hugetlb pages
  --disk path=FILE[,readonly=on]
                     a virtio-blk disk backed by a raw image (repeatable); a
                     rate limit: ,bandwidth=20MiB/s,ops=500,burst=64MiB,
                     ops_burst=N,refill_time=100ms
  --net tap=NAME[,mac=MAC]
                     a virtio-net interface on a host tap device (repeatable);
                     rate limits as for disks, rx_ or tx_ first (rx_bandwidth=
                     100Mbit/s limits frames to the guest)
  --console serial|virtio
                     where the console is: the UART (ttyS0, default) or
                     virtio-console (hvc0)
  --rng              a virtio-rng device fed from the host's getrandom
  --vsock cid=N,socket=PATH
                     a virtio-vsock device; host side on the unix socket PATH
  --affinity CPUS    pin every vCPU thread to these host CPUs (e.g. 2-3)
  --affinity VCPU=CPUS
                     pin one vCPU thread (repeatable, e.g. 0=2 1=3)
  --cpu-features -NAME,+NAME...
                     remove (-) or add back (+) CPU features, named as in
                     /proc/cpuinfo flags (e.g. -x2apic,-rdtscp); adding
                     needs the host's KVM to support the feature
  --uuid UUID        the system UUID in SMBIOS (the guest's product_uuid;
                     its first group is the serial number); random if absent
  --netns NAME       join the network namespace /run/netns/NAME before
                     opening taps
  --config FILE      read the guest from a TOML guest file (docs/config.md)
                     instead of the flags above
  --seccomp on|log|off
                     seccomp filters on every VMM thread: on (default; a
                     blocked call ends the VMM with status 148), log (the
                     kernel logs calls outside the filters), off
  --runtime-dir DIR  serve DIR/control.sock, write the console to
                     DIR/console.log and DIR/console.sock, and DIR/exit.json
                     at exit (docs/running.md)
  --region-fds name=N,fd=FD,id=ID,readonly=on|off,own=FD+FD,peers=ID:FD+FD/...
                     a shared region the daemon owns, as descriptors this
                     process inherited (repeatable; docs/fabric.md)
  --stats            print run statistics as JSON on stderr at exit
  --jail DIR         run jailed (as root): new namespaces, a root of its own
                     mounted on DIR/NAME, an unprivileged uid with no
                     capabilities, its own cgroup (docs/running.md)
  --jail-uid UID[:GID]
                     the jailed VMM's uid and gid (default: one from
                     100000-165535 chosen by the name)
  --jail-cgroup own|caller
                     own: create the cgroup ferrovisor/NAME (default);
                     caller: the caller already placed this process
  --name NAME        the guest's name for the jail (default: the guest
                     file's name, else run-PID)

Exit status: 0 when the guest powers off, reboots or halts, or on SIGINT/SIGTERM;
(v << 1) | 1 when the guest writes v to the debug-exit port (0xf4);
2 when the guest fails (triple fault, panic, KVM error) or on a usage error;
148 when seccomp blocked a system call (one line names it).
";

/// One line: the error and each of its causes. A newline inside (from a
/// path or argument) is shown escaped, so that the message stays one line.
fn one_line(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line.replace('\n', "\\n")
}

/// Warns once when the host's KVM is PVM, where guest kernel mode is emulated.
fn warn_if_pvm() {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "ferrovisor: warning: this host's KVM is PVM, which emulates guest kernel mode; \
             unmodified kernels run very slowly here: use the lab (cargo xtask lab) to boot Linux"
        );
    }
}

fn print_stats(report: &RunReport) {
    let marker = report
        .boot_marker_us
        .map_or_else(|| "null".to_string(), |us| us.to_string());
    let rss = vmm::stats::resident_memory();
    let mem = &report.memory;
    eprintln!(
        "ferrovisor-stats: {{\"exit\":\"{}\",\"boot_marker_us\":{},\"setup_us\":{},\"exits\":{},\"exits_io\":{},\"exits_mmio\":{},\"exits_other\":{},\"rss_anon_kib\":{},\"rss_file_kib\":{},\"rss_shmem_kib\":{},\"memory_backing\":\"{}\",\"guest_resident_kib\":{},\"guest_huge_kib\":{}}}",
        report.exit,
        marker,
        report.setup_us,
        report.exits_io + report.exits_mmio + report.exits_other,
        report.exits_io,
        report.exits_mmio,
        report.exits_other,
        rss.anon_kib,
        rss.file_kib,
        rss.shmem_kib,
        mem.backing.name(),
        mem.usage.resident_kib,
        mem.usage.huge_kib,
    );
}

/// The state of a vCPU that died, after the one-line reason: on stderr,
/// and where it was saved.
fn print_dump(text: &str, saved: Option<&Result<std::path::PathBuf, String>>) {
    eprint!("{text}");
    match saved {
        Some(Ok(path)) => eprintln!("(this dump is also in {})", path.display()),
        Some(Err(e)) => eprintln!("(this dump could not be saved in the runtime directory: {e})"),
        None => {}
    }
}

/// The guest's configuration with `--seccomp` applied, or the status and
/// one-line reason it has none.
fn load_vm(args: &RunArgs) -> Result<vmm::VmConfig, (i32, String)> {
    let mut vm = match &args.guest {
        Guest::Flags(vm) => (**vm).clone(),
        Guest::File(path) => config::load_guest(path).map_err(|e| {
            let reason = one_line(&e);
            eprintln!("ferrovisor: {reason}");
            (2, reason)
        })?,
    };
    if let Some(mode) = args.seccomp {
        vm.seccomp = mode;
    }
    vm.regions.extend(args.region_fds.iter().cloned());
    // Under the daemon, its router listens in the runtime directory; run
    // alone, nothing does, and other guests stay unreachable.
    if let (Some(vsock), Some(dir)) = (vm.vsock.as_mut(), &args.runtime_dir) {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        vsock.route = Some(dir.join(vmm::runtime::VSOCK_ROUTE));
    }
    Ok(vm)
}

/// Runs the guest; returns the exit status and its one-line reason.
fn run_guest(args: RunArgs, start: Instant) -> (i32, String) {
    let vm = match load_vm(&args) {
        Ok(vm) => vm,
        Err(end) => return end,
    };
    if let Some(name) = &vm.netns {
        if let Err(e) = jail::join_netns(name) {
            let reason = one_line(&e);
            eprintln!("ferrovisor: {reason}");
            return (2, reason);
        }
    }
    let file = match &args.guest {
        Guest::File(path) => Some(path.clone()),
        Guest::Flags(_) => None,
    };
    let options = RunOptions {
        runtime_dir: args.runtime_dir,
        jail: None,
    };
    let group = match placement::enter(&placement::group_name(file.as_deref()), &vm.sched) {
        Ok(group) => group,
        Err(reason) => {
            eprintln!("ferrovisor: {reason}");
            return (2, reason);
        }
    };
    let result = run_vm(&vm, start, &options, args.stats);
    if let Some(group) = group {
        placement::leave(group);
    }
    result
}

/// Runs `vm`; returns the exit status and its one-line reason.
fn run_vm(vm: &vmm::VmConfig, start: Instant, options: &RunOptions, stats: bool) -> (i32, String) {
    warn_if_pvm();
    match vmm::run_with(vm, start, options) {
        Ok(report) => {
            if stats {
                print_stats(&report);
            }
            if report.exit.is_failure()
                || matches!(report.exit, VmExit::Halted | VmExit::Stopped(_))
            {
                eprintln!("ferrovisor: {}", report.exit);
            }
            if let Some((text, saved)) = &report.dump {
                print_dump(text, saved.as_ref());
            }
            (report.exit.status(), report.exit.to_string())
        }
        Err(e) => {
            let reason = one_line(&e);
            eprintln!("ferrovisor: {reason}");
            (vmm::STATUS_GUEST_FAILED, reason)
        }
    }
}

fn run(args: RunArgs, start: Instant) -> ExitCode {
    if args.jail.is_some() {
        return jailed::run(args, start);
    }
    let runtime_dir = args.runtime_dir.clone();
    let (status, reason) = run_guest(args, start);
    record_exit(runtime_dir.as_deref(), status, &reason);
    ExitCode::from(status as u8)
}

/// Writes the exit record in the runtime directory, if there is one.
fn record_exit(runtime_dir: Option<&std::path::Path>, status: i32, reason: &str) {
    // Without the directory there is nowhere to write the record, and a
    // directory another VMM serves is not ours to write in; the error line
    // already said why.
    if let Some(dir) = runtime_dir.filter(|d| d.is_dir() && !vmm::runtime::dir_in_use(d)) {
        if let Err(e) = vmm::runtime::write_exit_record(dir, status, reason) {
            eprintln!(
                "ferrovisor: cannot write {}: {e}",
                dir.join(vmm::runtime::EXIT_RECORD).display()
            );
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    std::panic::set_hook(Box::new(|info| {
        vmm::console::restore_terminal();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let place = info.location().map(|l| l.to_string()).unwrap_or_default();
        eprintln!(
            "ferrovisor: internal error at {place}: {}",
            what.replace('\n', " ")
        );
    }));
    let words: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let Ok(words) = words else {
        eprintln!("ferrovisor: an argument is not valid UTF-8");
        return ExitCode::from(2);
    };
    if words.first().is_some_and(|w| cli::is_management(w)) {
        return cli::main(&words);
    }
    match args::parse(words) {
        Ok(Command::Run(run_args)) => run(*run_args, start),
        Ok(Command::Help) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::RunHelp) => {
            print!("{RUN_USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("ferrovisor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrovisor: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}
