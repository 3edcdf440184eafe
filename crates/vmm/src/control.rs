//! State shared by the VMM's threads: the first reason to stop, the exit
//! counters, the boot marker, and what each vCPU was last seen doing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use crate::exit::VmExit;

/// What a vCPU was last seen doing, for deciding whether the guest can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuActivity {
    /// Running, or halted with interrupts enabled.
    Live = 0,
    /// Halted with interrupts disabled and no NMI pending: only a reset wakes it.
    DeadHalt = 1,
    /// Never started: an application processor still waiting for INIT/SIPI.
    WaitingForSipi = 2,
}

/// Counts of the exits that reached the VMM, by kind.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    /// Every exit counted so far.
    pub fn total(&self) -> u64 {
        self.io.load(Ordering::Relaxed)
            + self.mmio.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

const NO_MARKER: u64 = u64::MAX;

/// Shared between the main thread, the vCPU threads and the helpers.
#[derive(Debug)]
pub struct Control {
    start: Instant,
    stopping: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    exit_ready: Condvar,
    boot_marker_us: AtomicU64,
    activity: Vec<AtomicU8>,
    pub exits: ExitCounters,
}

impl Control {
    /// Control for a VM with `vcpus` vCPUs, its clock starting at `start`.
    pub fn new(vcpus: usize, start: Instant) -> Self {
        Self {
            start,
            stopping: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_ready: Condvar::new(),
            boot_marker_us: AtomicU64::new(NO_MARKER),
            activity: (0..vcpus)
                .map(|_| AtomicU8::new(VcpuActivity::Live as u8))
                .collect(),
            exits: ExitCounters::default(),
        }
    }

    /// Asks the VM to stop. The first reason given is the one that counts.
    pub fn request_exit(&self, why: VmExit) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(why);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.exit_ready.notify_all();
    }

    /// Whether the VM is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until some thread asks the VM to stop, and returns why.
    pub fn wait_exit(&self) -> VmExit {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(why) = exit.clone() {
                return why;
            }
            exit = self
                .exit_ready
                .wait(exit)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `timeout` for a reason to stop.
    pub fn wait_exit_timeout(&self, timeout: std::time::Duration) -> Option<VmExit> {
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let (exit, _) = self
            .exit_ready
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(|p| p.into_inner());
        exit.clone()
    }

    /// Records the first boot marker, in microseconds since the VMM started.
    pub fn record_boot_marker(&self) {
        let us = self.start.elapsed().as_micros() as u64;
        let _ =
            self.boot_marker_us
                .compare_exchange(NO_MARKER, us, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Microseconds from VMM start to the guest's first boot marker.
    pub fn boot_marker_us(&self) -> Option<u64> {
        match self.boot_marker_us.load(Ordering::SeqCst) {
            NO_MARKER => None,
            us => Some(us),
        }
    }

    /// Records what vCPU `index` is doing. Returns true when, with this, no
    /// vCPU can run again: at least one is halted for good and the others are
    /// halted too or were never started.
    pub fn set_activity(&self, index: usize, activity: VcpuActivity) -> bool {
        if let Some(slot) = self.activity.get(index) {
            slot.store(activity as u8, Ordering::SeqCst);
        }
        let states: Vec<u8> = self
            .activity
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        states.contains(&(VcpuActivity::DeadHalt as u8))
            && !states.contains(&(VcpuActivity::Live as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_reason_wins() {
        let control = Control::new(1, Instant::now());
        control.request_exit(VmExit::PowerOff);
        control.request_exit(VmExit::Reset);
        assert!(control.is_stopping());
        assert_eq!(control.wait_exit(), VmExit::PowerOff);
    }

    #[test]
    fn guest_is_dead_only_when_no_vcpu_can_run() {
        let control = Control::new(3, Instant::now());
        assert!(!control.set_activity(0, VcpuActivity::DeadHalt));
        assert!(!control.set_activity(1, VcpuActivity::WaitingForSipi));
        assert!(control.set_activity(2, VcpuActivity::WaitingForSipi));
        assert!(!control.set_activity(2, VcpuActivity::Live));
        let waiting_only = Control::new(1, Instant::now());
        assert!(!waiting_only.set_activity(0, VcpuActivity::WaitingForSipi));
    }

    #[test]
    fn only_the_first_boot_marker_is_kept() {
        let control = Control::new(1, Instant::now());
        assert_eq!(control.boot_marker_us(), None);
        control.record_boot_marker();
        let first = control.boot_marker_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        control.record_boot_marker();
        assert_eq!(control.boot_marker_us(), Some(first));
    }
}
