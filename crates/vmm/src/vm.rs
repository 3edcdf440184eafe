//! VM assembly and lifecycle: builds the machine from a [`VmConfig`], runs
//! its vCPUs, and returns how the run ended.
//!
//! Boot sequence: KVM VM with in-kernel irqchip and PIT; memfd guest RAM;
//! ACPI tables; kernel, initramfs and command line; boot page tables; legacy
//! devices on the port bus; vCPUs configured and started on their own threads.
//! The main thread then waits for a reason to stop, kicking the vCPUs now and
//! then so that a guest that halted for good is noticed.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use arch::memmap::{self, MemMapError};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::coalesced::CoalescedRing;
use crate::config::VmConfig;
use crate::control::Control;
use crate::exit::VmExit;
use crate::loader::{self, BootSpec, LoaderError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::pci::{self, PciDevices};
use crate::runtime::{RunOptions, Runtime, RuntimeError, VmParts};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{self, Vcpu, VcpuError};
use crate::{console, gate, machine};

/// How often the main thread kicks vCPUs to see whether they can still run.
const LIVENESS_PERIOD: Duration = Duration::from_millis(200);
/// How long stopping vCPUs may take before the VMM stops waiting for them.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The most vCPUs a VM may have (the MADT's APIC ids are 8-bit).
pub const MAX_VCPUS: u8 = 254;

/// Errors from building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// Buffered port writes could not be set up.
    #[error(transparent)]
    Coalesced(#[from] crate::coalesced::CoalescedError),
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm,
    /// /dev/kvm is not accessible to this user.
    #[error("/dev/kvm is not accessible: add this user to the kvm group, or run as root")]
    KvmDenied,
    /// Opening /dev/kvm failed in some other way.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM call that builds the VM failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The vCPU count is out of range.
    #[error("--cpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Cpus(u8),
    #[error(transparent)]
    MemMap(#[from] MemMapError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error(transparent)]
    Pci(#[from] pci::PciError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("sched: {0}")]
    Sched(#[from] crate::sched::SchedError),
    /// A VMM thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("jail")]
    Jail(#[from] jail::JailError),
}

/// How a run ended, and what it measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub exit: VmExit,
    /// Microseconds from VMM start to the guest's first boot marker.
    pub boot_marker_us: Option<u64>,
    /// Microseconds from VMM start until the vCPU threads were started: the
    /// VMM's own setup, before the first guest instruction.
    pub setup_us: u64,
    /// Exits that reached the VMM.
    pub exits_io: u64,
    pub exits_mmio: u64,
    pub exits_other: u64,
    /// Guest RAM's backing and its use of huge pages near the end of the run.
    pub memory: MemoryReport,
    /// After an exit fatal to the guest: the vCPU's state as text, and where
    /// it was saved in the runtime directory (or why it could not be).
    pub dump: Option<(String, Option<Result<PathBuf, String>>)>,
}

/// What backed guest RAM and how much of it was on huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    pub backing: memory::Backing,
    pub usage: memory::HugeUsage,
}

/// Creates guest RAM with the backing the configuration asks for, says once
/// why it gets no huge pages when it gets none, and registers it with KVM.
fn create_memory(
    vm: &VmFd,
    config: &VmConfig,
    regions: &[(u64, u64)],
    shared: bool,
) -> Result<memory::GuestRam, VmError> {
    // Shared when a switch port (another process) maps guest RAM.
    let backing = memory::Backing::choose(config.memory_backing, config.hugepages, shared)?;
    let ram = memory::create(regions, backing)?;
    if let Some(why) = &ram.no_huge_pages {
        eprintln!("ferrovisor: guest RAM gets no huge pages: {why}");
    }
    memory::register(vm, &ram.mem)?;
    Ok(ram)
}

fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmDenied,
        _ => VmError::KvmOpen(e),
    })
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create a KVM VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    // Only Intel hosts need the identity map; elsewhere the call may be refused.
    let _ = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS);
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the in-kernel interrupt controllers", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;
    Ok(vm)
}

/// Builds the VM and runs it until it stops, its console on the terminal.
/// `start` is when the VMM started, for the boot-marker time.
pub fn run(config: &VmConfig, start: Instant) -> Result<RunReport, VmError> {
    run_with(config, start, &RunOptions::default())
}

/// [`run`], with options such as a runtime directory (see `runtime`).
pub fn run_with(
    config: &VmConfig,
    start: Instant,
    options: &RunOptions,
) -> Result<RunReport, VmError> {
    if config.cpus == 0 || config.cpus > MAX_VCPUS {
        return Err(VmError::Cpus(config.cpus));
    }
    vcpu::check_affinity(&config.affinity, config.cpus)?;
    config.sched.check(usize::from(config.cpus))?;
    let regions = memmap::ram_regions(config.memory)?;
    let pci_devices = pci::devices_from_config(config)?;
    // Unlocked memory more than the host has is only a warning.
    if !memory::check_host_fits(config.memory, config.sched.locked)? {
        eprintln!(
            "warning: guest memory of {} MiB is more than this host's RAM; it is committed as the guest touches it",
            config.memory >> 20
        );
    }
    let kvm = open_kvm()?;
    let vm = Arc::new(create_vm(&kvm)?);
    let cpuid = crate::cpu::guest_cpuid(&kvm, &vm, &config.cpu_features)?;
    let ram = create_memory(&vm, config, &regions, config.needs_shared_ram())?;
    let (mem, backing, ranges) = (ram.mem.clone(), ram.backing, ram.host_ranges());
    if config.needs_shared_ram() {
        if let Some(file) = ram.file {
            let _ = pci_devices
                .shared_ram
                .set(virtio::net::SharedRam::new(file, &mem));
        }
    }
    if config.sched.locked {
        memory::lock(&ranges)?;
    }

    let kernel = load_guest(&mem, config, &regions)?;

    let control = Arc::new(
        Control::new(usize::from(config.cpus), start)
            .with_affinity(config.affinity.clone())
            .with_sched(config.sched.clone()),
    );
    let mut runtime = options
        .runtime_dir
        .as_deref()
        .map(Runtime::open)
        .transpose()?;
    let interactive = runtime.is_none() && console::stdin_is_tty();
    // Every file, device and tap is open and no other thread runs yet:
    // the jail first, while the VMM is one thread (every thread it starts
    // inherits it), then seccomp.
    if let Some(jail) = &options.jail {
        lock_down(jail)?;
    }
    // Before any VMM thread starts: each installs its filter as it starts.
    seccomp::prepare(config.seccomp)?;
    let devices = machine::LegacyDevices::create(&vm)?;
    let limits = pci_devices.limits.clone();
    let pci = PciDevices::create(&vm, &mem, pci_devices)?;
    let (io_bus, mmio_bus) = machine::buses(&devices, &pci)?;
    let (io_bus, mmio_bus) = (Arc::new(io_bus), Arc::new(mmio_bus));

    let vcpus = create_vcpus(
        (&kvm, &cpuid),
        &vm,
        config.cpus,
        &kernel,
        (io_bus, mmio_bus),
        &control,
    )?;

    vcpu::install_kick_handler()?;
    block_stop_signals();
    spawn_signal_waiter(control.clone())?;
    crate::sched::misses::start(control.clone())
        .map_err(|e| VmError::Thread("deadline watcher", e))?;
    let _raw = if interactive && console::enter_raw_mode().is_ok() {
        Some(console::RawModeGuard)
    } else {
        None
    };
    let console_input = pci
        .console_input()
        .unwrap_or_else(|| devices.console_input());
    let gate =
        Some(gate::start(control.clone()).map_err(|e| VmError::Thread("partition gate", e))?);
    match runtime.as_mut() {
        Some(rt) => rt.start(VmParts {
            control: control.clone(),
            keyboard: devices.keyboard(),
            input: console_input,
            memory_bytes: config.memory,
            memory_backing: backing,
            memory_ranges: ranges.clone(),
            limits,
            gate,
        })?,
        None => console::spawn_stdin_reader(console_input, control.clone(), interactive),
    }

    let setup_us = start.elapsed().as_micros() as u64;
    let threads = match start_vcpus(vcpus) {
        Ok(threads) => threads,
        Err((threads, e)) => {
            // Stop the vCPUs already running before guest memory goes.
            control.request_exit(VmExit::Stopped("a failed vCPU start".into()));
            stop_vcpus(threads, mem);
            return Err(VmError::Thread("vCPU", e));
        }
    };

    // Every thread is started: the main thread narrows to its own list.
    seccomp::enter(ThreadKind::Main);
    let exit = supervise(&control, &threads);
    let memory = MemoryReport {
        backing,
        usage: memory::huge_usage(&ranges),
    };
    stop_vcpus(threads, mem);
    Ok(finish_run(&control, runtime, exit, setup_us, memory))
}

/// After the vCPUs stopped: saves a fatal exit's dump in the runtime
/// directory, closes the runtime, and gathers the run's report.
fn finish_run(
    control: &Control,
    runtime: Option<Runtime>,
    exit: VmExit,
    setup_us: u64,
    memory: MemoryReport,
) -> RunReport {
    let dump = control.take_dump().map(|text| {
        let saved = runtime
            .as_ref()
            .map(|rt| rt.write_dump(&text).map_err(|e| e.to_string()));
        (text, saved)
    });
    if let Some(rt) = runtime {
        rt.finish();
    }
    let exits = &control.exits;
    use std::sync::atomic::Ordering::Relaxed;
    RunReport {
        exit,
        boot_marker_us: control.boot_marker_us(),
        setup_us,
        exits_io: exits.io.load(Relaxed),
        exits_mmio: exits.mmio.load(Relaxed),
        exits_other: exits.other.load(Relaxed),
        memory,
        dump,
    }
}

/// Locks the VMM down in its jail; says once when the kernel has no Landlock.
fn lock_down(jail: &jail::Jail) -> Result<(), VmError> {
    let done = jail.lock_down()?;
    if done.landlock.is_none() {
        eprintln!(
            "ferrovisor: this kernel has no Landlock; the jail goes without that second wall"
        );
    }
    Ok(())
}

/// Writes the ACPI and SMBIOS tables, loads the kernel, initramfs and command line, and
/// writes the boot tables for the kernel's entry mode.
fn load_guest(
    mem: &GuestMemory,
    config: &VmConfig,
    regions: &[(u64, u64)],
) -> Result<loader::LoadedKernel, VmError> {
    let rsdp = machine::write_acpi_tables(mem, config.cpus)?;
    machine::write_smbios_tables(mem, config.uuid)?;
    let e820 = memmap::e820_map(regions);
    let kernel = loader::load(
        mem,
        &BootSpec {
            kernel: &config.kernel,
            initramfs: config.initramfs.as_deref(),
            cmdline: &config.cmdline,
            e820: &e820,
            low_ram_end: memmap::low_ram_end(regions),
            mem_size: config.memory,
            rsdp_addr: rsdp,
        },
    )?;
    machine::write_boot_tables(mem, kernel.mode)?;
    Ok(kernel)
}

/// Creates and configures every vCPU; the first gets the kernel's entry.
fn create_vcpus(
    (kvm, supported): (&Kvm, &kvm_bindings::CpuId),
    vm: &VmFd,
    cpus: u8,
    kernel: &loader::LoadedKernel,
    (io_bus, mmio_bus): (Arc<devices::Bus>, Arc<devices::Bus>),
    control: &Arc<Control>,
) -> Result<Vec<Vcpu>, VmError> {
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    let mut buffered = None;
    for index in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::Kvm("create a vCPU", e))?;
        if index == 0 {
            buffered = CoalescedRing::set_up(kvm, vm, &fd)?.map(Arc::new);
        }
        let vcpu = Vcpu::new(index, fd, io_bus.clone(), mmio_bus.clone(), control.clone())
            .with_buffered_writes(buffered.clone());
        vcpu.configure(supported, cpus, (index == 0).then_some(kernel))?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Starts a thread per vCPU. On failure, returns the threads already started
/// with the error, so that the caller stops them before guest memory goes.
type StartFailure = (Vec<JoinHandle<()>>, std::io::Error);
fn start_vcpus(vcpus: Vec<Vcpu>) -> Result<Vec<JoinHandle<()>>, StartFailure> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let spawned = std::thread::Builder::new()
            .name("vcpu".into())
            .spawn(move || vcpu.run());
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => return Err((threads, e)),
        }
    }
    Ok(threads)
}

fn kick(threads: &[JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // SAFETY: the pthread handle belongs to a thread that has not been
        // joined, so it is valid; the kick signal has a handler installed.
        unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
    }
}

/// Waits for a reason to stop. Each period it judges the last liveness round
/// and starts the next one; two stuck rounds in a row mean no vCPU can ever
/// run again.
fn supervise(control: &Control, threads: &[JoinHandle<()>]) -> VmExit {
    let mut round = 0;
    let mut stuck_rounds = 0;
    loop {
        if let Some(exit) = control.wait_exit_timeout(LIVENESS_PERIOD) {
            return exit;
        }
        // Parked vCPUs answer no round: a paused guest is never judged.
        if control.is_paused() {
            stuck_rounds = 0;
            continue;
        }
        // A vCPU thread that is running (or runnable) is executing guest
        // code, not halted: no round is needed, and no kick, which would
        // cost the guest two exits.
        if some_vcpu_runs(&control.vcpu_tids()) {
            stuck_rounds = 0;
            round = 0;
            continue;
        }
        if round > 0 && control.all_stuck_in(round) {
            stuck_rounds += 1;
        } else {
            stuck_rounds = 0;
        }
        if stuck_rounds >= 2 {
            control.request_exit(VmExit::Halted);
            return control.wait_exit();
        }
        round = control.begin_round();
        kick(threads);
    }
}

/// The scheduler state of thread `tid` of this process (`R` running or
/// runnable, `S` sleeping...), from `/proc/self/task/TID/stat`.
fn thread_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "TID (COMM) STATE ...": COMM may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether some vCPU thread is running or runnable, that is, not blocked
/// in a halt or parked.
fn some_vcpu_runs(tids: &[i32]) -> bool {
    tids.iter()
        .any(|&tid| tid > 0 && thread_state(tid) == Some('R'))
}

/// Stops and joins the vCPU threads, then releases guest memory. A vCPU
/// thread that does not stop in time may still be inside KVM_RUN, where KVM
/// would touch the memory: then the memory is leaked rather than unmapped
/// (the process is about to exit anyway).
fn stop_vcpus(threads: Vec<JoinHandle<()>>, mem: GuestMemory) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        kick(&threads);
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_stopped = threads.iter().all(|t| t.is_finished());
    for t in threads.into_iter().filter(|t| t.is_finished()) {
        let _ = t.join();
    }
    if !all_stopped {
        std::mem::forget(mem);
    }
}

/// The signals that stop the VMM cleanly: every one whose default action
/// would otherwise end the process with the terminal left in raw mode.
const STOP_SIGNALS: [(libc::c_int, &str); 4] = [
    (libc::SIGINT, "SIGINT"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGQUIT, "SIGQUIT"),
];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage.
    unsafe { libc::sigemptyset(&mut set) };
    for (signal, _) in STOP_SIGNALS {
        // SAFETY: `set` is valid storage and `signal` a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Blocks the stop signals in this thread and every thread it starts, so
/// that only the signal waiter receives them.
pub(crate) fn block_stop_signals() {
    let set = stop_signal_set();
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn spawn_signal_waiter(control: Arc<Control>) -> Result<(), VmError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::enter(ThreadKind::Control);
            let set = stop_signal_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set blocked in this thread, and
            // `signal` is valid storage for the result.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                let name = STOP_SIGNALS
                    .iter()
                    .find(|(s, _)| *s == signal)
                    .map_or("a signal", |(_, name)| name);
                control.request_exit(VmExit::Stopped(name.into()));
            }
        })
        .map(drop)
        .map_err(|e| VmError::Thread("signal", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_tid() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    #[test]
    fn a_running_thread_reads_as_running() {
        assert_eq!(thread_state(current_tid()), Some('R'));
        assert!(some_vcpu_runs(&[0, current_tid()]));
    }

    #[test]
    fn a_blocked_thread_reads_as_sleeping_and_no_thread_as_unknown() {
        let (tx, rx) = std::sync::mpsc::channel::<i32>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            tx.send(current_tid()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while thread_state(tid) != Some('S') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(thread_state(tid), Some('S'));
        assert!(!some_vcpu_runs(&[0, tid]));
        done_tx.send(()).unwrap();
        sleeper.join().unwrap();
        assert_eq!(thread_state(tid), None);
    }
}
