//! State shared by the VMM's threads: the first reason to stop, the exit
//! counters, the boot marker, and what each vCPU reported in the latest
//! liveness round.
//!
//! Liveness works in rounds. The main thread starts a round and kicks every
//! vCPU out of KVM_RUN; each vCPU answers with the round's number and what it
//! is doing. A vCPU busy outside KVM_RUN misses the kick and keeps an older
//! round's answer, which never counts, so stale answers cannot add up to a
//! wrong verdict.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use crate::exit::VmExit;

/// What a vCPU was last seen doing, for deciding whether the guest can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuActivity {
    /// Running, or halted with interrupts enabled.
    Live = 0,
    /// Halted with interrupts disabled, and no NMI or paravirtual kick
    /// pending. Linux's paravirtual spinlocks halt this way for a moment
    /// while they wait for a kick, so one such answer alone proves nothing.
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
    round: AtomicU64,
    /// Per vCPU: `round << 8 | activity`.
    answers: Vec<AtomicU64>,
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
            round: AtomicU64::new(0),
            answers: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
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

    /// Starts a liveness round and returns its number.
    pub fn begin_round(&self) -> u64 {
        self.round.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records vCPU `index`'s answer to the current round.
    pub fn answer(&self, index: usize, activity: VcpuActivity) {
        let round = self.round.load(Ordering::SeqCst);
        if let Some(slot) = self.answers.get(index) {
            slot.store((round << 8) | activity as u64, Ordering::SeqCst);
        }
    }

    /// Whether every vCPU answered `round`, and none of them can run: at
    /// least one halted for good and the others halted too or never started.
    pub fn all_stuck_in(&self, round: u64) -> bool {
        let mut any_dead = false;
        for slot in &self.answers {
            let answer = slot.load(Ordering::SeqCst);
            if answer >> 8 != round {
                return false;
            }
            match answer & 0xff {
                a if a == VcpuActivity::DeadHalt as u64 => any_dead = true,
                a if a == VcpuActivity::WaitingForSipi as u64 => {}
                _ => return false,
            }
        }
        any_dead
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
    fn guest_is_stuck_only_when_every_vcpu_answers_the_same_round() {
        let control = Control::new(3, Instant::now());
        let round = control.begin_round();
        control.answer(0, VcpuActivity::DeadHalt);
        control.answer(1, VcpuActivity::WaitingForSipi);
        assert!(!control.all_stuck_in(round), "vCPU 2 has not answered");
        control.answer(2, VcpuActivity::WaitingForSipi);
        assert!(control.all_stuck_in(round));
        control.answer(2, VcpuActivity::Live);
        assert!(!control.all_stuck_in(round));
    }

    #[test]
    fn answers_from_an_older_round_do_not_count() {
        let control = Control::new(2, Instant::now());
        control.begin_round();
        control.answer(0, VcpuActivity::DeadHalt);
        let round = control.begin_round();
        control.answer(1, VcpuActivity::DeadHalt);
        assert!(!control.all_stuck_in(round), "vCPU 0's answer is stale");
    }

    #[test]
    fn never_started_vcpus_alone_are_not_stuck() {
        let control = Control::new(1, Instant::now());
        let round = control.begin_round();
        control.answer(0, VcpuActivity::WaitingForSipi);
        assert!(!control.all_stuck_in(round));
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
