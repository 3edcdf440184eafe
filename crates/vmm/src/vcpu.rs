//! vCPUs: their boot state, and the thread that runs each one.
//!
//! A vCPU thread loops on KVM_RUN and hands every exit that reaches user space
//! to a small handler. It stops when the VM is stopping; the main thread kicks
//! it out of KVM_RUN with [`kick_signal`]. The same kick, sent now and then,
//! lets a halted vCPU say whether it can run again (see `control`), and
//! parks it while the guest is paused.
//!
//! Each vCPU thread records its thread id and, when the VM configuration
//! pins it, restricts itself to its host CPUs before it first enters the
//! guest. [`check_affinity`] refuses CPUs the host does not have before
//! any of that starts.

use std::sync::Arc;

use arch::regs::{self, EntryMode};
use devices::{Bus, VmAction};
use kvm_bindings::{
    CpuId, Msrs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::coalesced::CoalescedRing;
use crate::control::{Control, VcpuActivity};
use crate::dump::{self, ExitEntry, ExitRing, VcpuState};
use crate::exit::VmExit;
use crate::loader::LoadedKernel;

/// KVM_SYSTEM_EVENT types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Errors from setting up a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM call that configures the vCPU failed.
    #[error("cannot set up vCPU {index}: {what}")]
    Setup {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Not every boot MSR was accepted.
    #[error("vCPU {index}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The affinity names more vCPUs than the VM has.
    #[error("affinity: {given} entries for {cpus} vCPU(s)")]
    AffinityTooLong { given: usize, cpus: u8 },
    /// A vCPU is pinned to a host CPU this process may not use.
    #[error(
        "affinity: vCPU {index}: host CPU {cpu} is not available here (available: {available})"
    )]
    NoSuchHostCpu {
        index: usize,
        cpu: usize,
        available: String,
    },
}

/// The host CPUs this process may run on.
pub fn available_host_cpus() -> Vec<usize> {
    thread_cpus(0).unwrap_or_default()
}

/// Checks a VM's affinity before it starts: no more entries than vCPUs,
/// and only host CPUs this process may use.
pub fn check_affinity(affinity: &[Vec<usize>], cpus: u8) -> Result<(), VcpuError> {
    if affinity.len() > usize::from(cpus) {
        return Err(VcpuError::AffinityTooLong {
            given: affinity.len(),
            cpus,
        });
    }
    if affinity.iter().all(|l| l.is_empty()) {
        return Ok(());
    }
    let available = available_host_cpus();
    for (index, list) in affinity.iter().enumerate() {
        if let Some(&cpu) = list.iter().find(|c| !available.contains(c)) {
            return Err(VcpuError::NoSuchHostCpu {
                index,
                cpu,
                available: crate::config::format_cpu_list(&available),
            });
        }
    }
    Ok(())
}

/// Restricts the calling thread to `cpus`.
fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    pin_thread(0, cpus)
}

/// Restricts thread `tid` of this process (0: the calling thread) to `cpus`.
pub fn pin_thread(tid: i32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < crate::config::MAX_HOST_CPUS) {
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is valid.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The host CPUs thread `tid` of this process may run on.
pub fn thread_cpus(tid: i32) -> std::io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..crate::config::MAX_HOST_CPUS)
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// The calling thread's id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Kicks the vCPU thread `tid` of this process out of KVM_RUN.
pub fn kick_tid(tid: i32) {
    if tid <= 0 {
        return;
    }
    // SAFETY: tgkill only delivers a signal; naming this process's id means
    // it can reach no other process, and the kick signal has a handler.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) kick handler, without SA_RESTART so that KVM_RUN
/// returns EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    // SAFETY: an all-zero sigaction is a valid value to start from.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
    action.sa_flags = 0;
    // SAFETY: `action` is fully initialised and `on_kick` is async-signal-safe
    // (it does nothing).
    let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VcpuError::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One vCPU and what its exits reach.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    control: Arc<Control>,
    /// The latest exits, for the dump at a fatal one.
    ring: ExitRing,
    /// KVM's buffer of port writes that did not exit, shared by the vCPUs.
    buffered: Option<Arc<CoalescedRing>>,
}

impl Vcpu {
    /// Wraps a KVM vCPU.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        control: Arc<Control>,
    ) -> Self {
        Self {
            index,
            fd,
            io_bus,
            mmio_bus,
            control,
            ring: ExitRing::default(),
            buffered: None,
        }
    }

    /// Applies `ring`'s buffered port writes before each exit is handled.
    pub fn with_buffered_writes(mut self, ring: Option<Arc<CoalescedRing>>) -> Self {
        self.buffered = ring;
        self
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID, MSRs and the local APIC; for the boot vCPU, also the entry
    /// registers for the loaded kernel. Application processors wait for
    /// INIT/SIPI from the guest, as on real hardware.
    pub fn configure(
        &self,
        supported: &CpuId,
        count: u8,
        boot: Option<&LoadedKernel>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        arch::cpuid::shape(cpuid.as_mut_slice(), self.index, count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("CPUID"))?;

        let entries = regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            index: self.index,
            set: 0,
            wanted: entries.len(),
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.setup_err("MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                wanted: entries.len(),
            });
        }

        let mut lapic = self.fd.get_lapic().map_err(self.setup_err("local APIC"))?;
        regs::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("local APIC"))?;

        if let Some(kernel) = boot {
            self.set_entry(kernel.mode, kernel.entry)?;
        }
        Ok(())
    }

    fn set_entry(&self, mode: EntryMode, entry: u64) -> Result<(), VcpuError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.setup_err("segment registers"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs, mode))
            .map_err(self.setup_err("segment registers"))?;
        self.fd
            .set_regs(&regs::boot_regs(mode, entry))
            .map_err(self.setup_err("registers"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.setup_err("FPU"))?;
        Ok(())
    }

    /// The vCPU thread's body: runs until the VM stops.
    pub fn run(mut self) {
        let index = usize::from(self.index);
        self.control.set_tid(index, current_tid());
        let cpus = self.control.affinity(index);
        if !cpus.is_empty() {
            if let Err(e) = pin_current_thread(cpus) {
                self.control.request_exit(VmExit::InternalError {
                    vcpu: self.index,
                    detail: format!("cannot pin the vCPU thread to host CPUs {cpus:?}: {e}"),
                });
                return;
            }
        }
        if let Err(detail) = self.apply_policy() {
            self.control.request_exit(VmExit::InternalError {
                vcpu: self.index,
                detail,
            });
            return;
        }
        // Pinned, in its scheduling class, and not yet in the guest: from
        // here on, the vCPU filter.
        crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
        while !self.control.is_stopping() {
            self.control.park_if_paused();
            // Two loads, as cheap as the pause check: a change of policy
            // that changes how overruns are counted reaches this vCPU at
            // its next exit (the change kicks it out of the guest too).
            crate::sched::follow_overrun_mode(self.control.overruns_on_threads());
            if self.control.is_stopping() {
                break;
            }
            let outcome = match self.fd.run() {
                Ok(exit) => {
                    self.ring.record(ExitEntry::of(&exit));
                    apply_buffered(self.buffered.as_deref(), &self.io_bus, &self.control).or_else(
                        || {
                            handle_exit(
                                self.index,
                                exit,
                                &self.io_bus,
                                &self.mmio_bus,
                                &self.control,
                            )
                        },
                    )
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.on_kick();
                    None
                }
                Err(e) => Some(VmExit::InternalError {
                    vcpu: self.index,
                    detail: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Some(why) = outcome {
                if matches!(
                    why,
                    VmExit::TripleFault { .. } | VmExit::InternalError { .. }
                ) {
                    self.record_dump(&why.to_string());
                }
                self.control.request_exit(why);
                return;
            }
        }
        // Stopped because another vCPU died: this one's state, which KVM
        // has not reset, shows what the rest of the guest was doing.
        if self.control.has_dump() {
            self.record_dump("stopped by the VMM after another vCPU's failure");
        }
    }

    /// Gives this thread the guest's policy for it, before the guest runs;
    /// a deadline thread's overruns are counted from then on.
    fn apply_policy(&self) -> Result<(), String> {
        let index = usize::from(self.index);
        crate::sched::track_overruns(index, self.control.overruns_on_threads())
            .map_err(|e| format!("cannot count deadline overruns: {e}"))?;
        let policy = self.control.sched().thread_policy(index);
        if policy == crate::sched::ThreadPolicy::Fair {
            return Ok(());
        }
        crate::sched::apply(0, policy).map_err(|e| e.to_string())
    }

    /// Reads this vCPU's state from KVM and keeps its dump for the VMM to
    /// print and save.
    fn record_dump(&self, why: &str) {
        let state = VcpuState {
            regs: self.fd.get_regs().ok(),
            sregs: self.fd.get_sregs().ok(),
            events: self.fd.get_vcpu_events().ok(),
        };
        let text = dump::format(self.index, why, &state, &self.ring);
        self.control.add_dump(text);
    }

    /// After a kick: answers the current liveness round.
    fn on_kick(&mut self) {
        // A kick to park (pause, or a closed partition window) needs no
        // liveness answer: the vCPU leaves the guest at once.
        if self.control.must_park() {
            return;
        }
        self.control
            .answer(usize::from(self.index), self.activity());
    }

    fn activity(&self) -> VcpuActivity {
        let Ok(mp) = self.fd.get_mp_state() else {
            return VcpuActivity::Live;
        };
        match mp.mp_state {
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => VcpuActivity::WaitingForSipi,
            KVM_MP_STATE_HALTED => {
                let interrupts_off = self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0);
                let nmi_pending = self
                    .fd
                    .get_vcpu_events()
                    .map_or(true, |e| e.nmi.pending != 0);
                if interrupts_off && !nmi_pending {
                    VcpuActivity::DeadHalt
                } else {
                    VcpuActivity::Live
                }
            }
            _ => VcpuActivity::Live,
        }
    }
}

/// Hands the port writes KVM buffered (see `coalesced`) to the port bus,
/// in order, before the exit that follows them is handled.
fn apply_buffered(ring: Option<&CoalescedRing>, io_bus: &Bus, control: &Control) -> Option<VmExit> {
    ring?.drain(|write| {
        io_bus
            .write(write.addr, write.bytes())
            .flatten()
            .and_then(|a| apply_action(a, control))
    })
}

/// Acts on a device's request after a bus write.
fn apply_action(action: VmAction, control: &Control) -> Option<VmExit> {
    match action {
        VmAction::PowerOff => Some(VmExit::PowerOff),
        VmAction::Reset => Some(VmExit::Reset),
        VmAction::DebugExit(v) => Some(VmExit::DebugExit(v)),
        VmAction::Panicked => Some(VmExit::Panicked),
        VmAction::BootMarker(_) => {
            control.record_boot_marker();
            None
        }
    }
}

/// Handles one exit. Returns a reason to stop the VM, if the exit is one.
pub fn handle_exit(
    index: u8,
    exit: VcpuExit,
    io_bus: &Bus,
    mmio_bus: &Bus,
    control: &Control,
) -> Option<VmExit> {
    use std::sync::atomic::Ordering::Relaxed;
    match exit {
        VcpuExit::IoIn(port, data) => {
            control.exits.io.fetch_add(1, Relaxed);
            io_bus.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            control.exits.io.fetch_add(1, Relaxed);
            io_bus
                .write(u64::from(port), data)
                .flatten()
                .and_then(|a| apply_action(a, control))
        }
        VcpuExit::MmioRead(addr, data) => {
            control.exits.mmio.fetch_add(1, Relaxed);
            mmio_bus.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            control.exits.mmio.fetch_add(1, Relaxed);
            mmio_bus
                .write(addr, data)
                .flatten()
                .and_then(|a| apply_action(a, control))
        }
        other => {
            control.exits.other.fetch_add(1, Relaxed);
            handle_other_exit(index, other)
        }
    }
}

fn handle_other_exit(index: u8, exit: VcpuExit) -> Option<VmExit> {
    match exit {
        // Without an in-kernel local APIC, HLT comes here; nothing can wake it.
        VcpuExit::Hlt => Some(VmExit::Halted),
        VcpuExit::Shutdown => Some(VmExit::TripleFault { vcpu: index }),
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _) => Some(VmExit::PowerOff),
        VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _) => Some(VmExit::Reset),
        VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH, _) => Some(VmExit::Panicked),
        VcpuExit::FailEntry(reason, cpu) => Some(VmExit::InternalError {
            vcpu: index,
            detail: format!("entry failed, hardware reason {reason:#x} on host CPU {cpu}"),
        }),
        VcpuExit::InternalError => Some(VmExit::InternalError {
            vcpu: index,
            detail: "emulation failure".into(),
        }),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        other => Some(VmExit::InternalError {
            vcpu: index,
            detail: format!("unexpected exit {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    struct Port(Option<VmAction>);
    impl devices::BusDevice for Port {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmAction> {
            self.0
        }
    }

    fn bus_with(action: Option<VmAction>) -> Bus {
        let mut bus = Bus::new();
        bus.insert(0xf4, 4, Arc::new(Mutex::new(Port(action))))
            .unwrap();
        bus
    }

    #[test]
    fn port_write_action_becomes_vm_exit() {
        let control = Control::new(1, Instant::now());
        let io = bus_with(Some(VmAction::DebugExit(3)));
        let exit = handle_exit(
            0,
            VcpuExit::IoOut(0xf4, &[3, 0, 0, 0]),
            &io,
            &Bus::new(),
            &control,
        );
        assert_eq!(exit, Some(VmExit::DebugExit(3)));
        assert_eq!(control.exits.total(), 1);
    }

    #[test]
    fn port_read_is_served_by_the_device() {
        let control = Control::new(1, Instant::now());
        let io = bus_with(None);
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::IoIn(0xf5, &mut data),
                &io,
                &Bus::new(),
                &control
            ),
            None
        );
        assert_eq!(data, [0x42, 0x42]);
    }

    #[test]
    fn boot_marker_is_recorded_and_does_not_stop() {
        let control = Control::new(1, Instant::now());
        let io = bus_with(Some(VmAction::BootMarker(1)));
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0xf4, &[1]), &io, &Bus::new(), &control),
            None
        );
        assert!(control.boot_marker_us().is_some());
    }

    #[test]
    fn shutdown_is_a_triple_fault() {
        let control = Control::new(2, Instant::now());
        let exit = handle_exit(1, VcpuExit::Shutdown, &Bus::new(), &Bus::new(), &control);
        assert_eq!(exit, Some(VmExit::TripleFault { vcpu: 1 }));
    }
}
