//! State shared by the VMM's threads: the first reason to stop, the exit
//! counters, the boot marker, what each vCPU reported in the latest
//! liveness round, each vCPU's thread id and host CPU affinity, and whether
//! the guest is paused.
//!
//! Pausing: [`Control::request_pause`] raises the flag, the caller kicks
//! every vCPU out of KVM_RUN, and each vCPU thread parks in
//! [`Control::park_if_paused`] until [`Control::resume`] (or a stop). The
//! guest's state stays in KVM untouched meanwhile. A parked vCPU answers no
//! liveness round, so a paused guest is never judged halted.
//!
//! Liveness works in rounds. The main thread starts a round and kicks every
//! vCPU out of KVM_RUN; each vCPU answers with the round's number and what it
//! is doing. A vCPU busy outside KVM_RUN misses the kick and keeps an older
//! round's answer, which never counts, so stale answers cannot add up to a
//! wrong verdict.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

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

/// Why a pause or resume request was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("already paused")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
    #[error("the VM is stopping")]
    Stopping,
}

/// How many vCPUs are parked.
#[derive(Debug, Default)]
struct PauseState {
    parked: usize,
}

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
    /// Per vCPU: its thread id once its thread has started, else 0.
    tids: Vec<AtomicI32>,
    /// Per vCPU: the host CPUs it may run on (empty: not pinned).
    affinity: Vec<Vec<usize>>,
    /// Whether the guest should be paused. Read without a lock by every vCPU
    /// on every exit; written only with `pause` held, so that the condition
    /// variable's waiters see each change.
    pause_requested: AtomicBool,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
    /// The first vCPU dump taken at a fatal exit.
    dump: Mutex<Option<String>>,
    /// Closed by a time-partition gate outside the guest's windows: vCPUs
    /// park as when paused. Written with `pause` held, like `pause_requested`.
    gate_closed: AtomicBool,
    /// The CLOCK_MONOTONIC edge the gate last opened at (0: closed, or no gate).
    gate_edge_ns: AtomicU64,
    gate: std::sync::OnceLock<std::sync::Arc<crate::gate::GateStats>>,
    /// The guest's scheduling policy, as last applied.
    sched: Mutex<crate::sched::SchedConfig>,
    /// Whether vCPU threads take their own deadline overruns (see
    /// `sched::overruns`): derived from `sched` whenever it is set.
    overruns_on_threads: AtomicBool,
    /// Counts changes of `sched`; the gate waits on `sched_changed` for one.
    sched_generation: AtomicU64,
    sched_changed: Condvar,
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
            tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
            affinity: Vec::new(),
            pause: Mutex::new(PauseState::default()),
            pause_requested: AtomicBool::new(false),
            pause_changed: Condvar::new(),
            dump: Mutex::new(None),
            gate_closed: AtomicBool::new(false),
            gate_edge_ns: AtomicU64::new(0),
            gate: std::sync::OnceLock::new(),
            sched: Mutex::new(crate::sched::SchedConfig::default()),
            overruns_on_threads: AtomicBool::new(true),
            sched_generation: AtomicU64::new(0),
            sched_changed: Condvar::new(),
        }
    }

    /// Sets the guest's scheduling policy (applied by each vCPU thread as it starts).
    pub fn with_sched(self, sched: crate::sched::SchedConfig) -> Self {
        self.set_sched(sched);
        self
    }

    /// The guest's scheduling policy.
    pub fn sched(&self) -> crate::sched::SchedConfig {
        self.sched.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the guest's scheduling policy after it was applied.
    pub fn set_sched(&self, sched: crate::sched::SchedConfig) {
        let lone = sched.lone_deadline_vcpu(self.tids.len()).is_some();
        let mut current = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        *current = sched;
        self.overruns_on_threads.store(!lone, Ordering::Relaxed);
        // Under the lock, so that a waiter never misses it.
        self.sched_generation.fetch_add(1, Ordering::Release);
        drop(current);
        self.sched_changed.notify_all();
    }

    /// How many times the policy changed so far.
    pub fn sched_generation(&self) -> u64 {
        self.sched_generation.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the policy to change after generation
    /// `seen` (or for a stop, which also wakes the waiters).
    pub fn wait_sched_change(&self, seen: u64, timeout: Duration) {
        let guard = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        if self.sched_generation() != seen || self.is_stopping() {
            return;
        }
        let _ = self.sched_changed.wait_timeout(guard, timeout);
    }

    /// Whether vCPU threads take their own deadline overruns: all but a
    /// guest's only deadline vCPU do (see `sched::overruns`).
    pub fn overruns_on_threads(&self) -> bool {
        self.overruns_on_threads.load(Ordering::Relaxed)
    }

    /// Sets the host CPUs each vCPU may run on, by vCPU index.
    pub fn with_affinity(mut self, affinity: Vec<Vec<usize>>) -> Self {
        self.affinity = affinity;
        self
    }

    /// The host CPUs vCPU `index` may run on; empty when it is not pinned.
    pub fn affinity(&self, index: usize) -> &[usize] {
        self.affinity.get(index).map_or(&[], |v| v.as_slice())
    }

    /// When the VMM started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records the thread id of vCPU `index`'s thread.
    pub fn set_tid(&self, index: usize, tid: i32) {
        if let Some(slot) = self.tids.get(index) {
            slot.store(tid, Ordering::SeqCst);
        }
    }

    /// The vCPU threads' ids, by vCPU index; 0 for a thread not started yet.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.tids.iter().map(|t| t.load(Ordering::SeqCst)).collect()
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to park. The caller then kicks them out of KVM_RUN
    /// and waits with [`Control::wait_parked`].
    pub fn request_pause(&self) -> Result<(), PauseError> {
        let _state = self.pause_state();
        if self.is_stopping() {
            return Err(PauseError::Stopping);
        }
        if self.is_paused() {
            return Err(PauseError::AlreadyPaused);
        }
        self.pause_requested.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let _state = self.pause_state();
        if !self.is_paused() {
            return Err(PauseError::NotPaused);
        }
        self.pause_requested.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
        Ok(())
    }

    /// Whether the guest is paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until every vCPU is parked. False on timeout,
    /// or when the pause was withdrawn or the VM is stopping.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let all = self.tids.len();
        let state = self.pause_state();
        let (state, _) = self
            .pause_changed
            .wait_timeout_while(state, timeout, |s| {
                self.is_paused() && s.parked < all && !self.is_stopping()
            })
            .unwrap_or_else(|p| p.into_inner());
        self.is_paused() && state.parked == all && !self.is_stopping()
    }

    /// Called by a vCPU thread outside KVM_RUN: while the guest is paused,
    /// blocks here. Returns at once otherwise, and when the VM stops.
    pub fn park_if_paused(&self) {
        if !self.must_park() {
            return;
        }
        let mut state = self.pause_state();
        if !self.must_park() || self.is_stopping() {
            return;
        }
        state.parked += 1;
        self.pause_changed.notify_all();
        while self.must_park() && !self.is_stopping() {
            state = self
                .pause_changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        drop(state);
        // Released by the gate: how late this vCPU resumes after its window's edge.
        if let (Some(stats), edge) = (self.gate.get(), self.gate_edge_ns.load(Ordering::SeqCst)) {
            if edge != 0 && !self.is_stopping() {
                stats.record_vcpu_start(crate::gate::monotonic_ns().saturating_sub(edge));
            }
        }
    }

    /// Hands the gate's figures to the vCPUs, which record when they resume.
    pub fn set_gate_stats(&self, stats: std::sync::Arc<crate::gate::GateStats>) {
        let _ = self.gate.set(stats);
    }

    /// Whether a vCPU must stay outside KVM_RUN: paused, or its time
    /// partition's window is closed.
    pub fn must_park(&self) -> bool {
        self.is_paused() || self.gate_closed.load(Ordering::SeqCst)
    }

    /// Closes (true) or opens the time-partition gate. Closing only raises
    /// the flag: the caller kicks the vCPUs and waits with
    /// [`Control::wait_all_parked`]; opening wakes them.
    pub fn set_gate_closed(&self, closed: bool, edge_ns: u64) {
        let state = self.pause_state();
        self.gate_closed.store(closed, Ordering::SeqCst);
        self.gate_edge_ns
            .store(if closed { 0 } else { edge_ns }, Ordering::SeqCst);
        // Woken vCPUs take the lock first thing: let it go before waking them.
        drop(state);
        if !closed {
            self.pause_changed.notify_all();
        }
    }

    /// Waits up to `timeout` until every started vCPU is parked (for the
    /// gate: a vCPU thread not started yet parks before it first runs).
    pub fn wait_all_parked(&self, timeout: Duration) -> bool {
        let all = self
            .tids
            .iter()
            .filter(|t| t.load(Ordering::SeqCst) != 0)
            .count();
        let state = self.pause_state();
        let (state, _) = self
            .pause_changed
            .wait_timeout_while(state, timeout, |s| s.parked < all && !self.is_stopping())
            .unwrap_or_else(|p| p.into_inner());
        state.parked == all
    }

    /// Asks the VM to stop. The first reason given is the one that counts.
    pub fn request_exit(&self, why: VmExit) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(why);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.exit_ready.notify_all();
        drop(exit);
        // Parked vCPUs wake up to stop. Taking the lock orders this after
        // any park that already checked `stopping`.
        let _state = self.pause_state();
        self.pause_changed.notify_all();
    }

    /// Keeps a vCPU's dump: the one that failed first, then those of the
    /// vCPUs stopped because of it, in order.
    pub fn add_dump(&self, text: String) {
        let mut dump = self.dump.lock().unwrap_or_else(|p| p.into_inner());
        match dump.as_mut() {
            Some(all) => all.push_str(&text),
            None => *dump = Some(text),
        }
    }

    /// Takes the dumps kept by [`Control::add_dump`], if any.
    pub fn take_dump(&self) -> Option<String> {
        self.dump.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether a vCPU has left a dump: the VM is stopping for a failure.
    pub fn has_dump(&self) -> bool {
        self.dump
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
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
    fn pause_and_resume_refuse_the_wrong_state() {
        let control = Control::new(1, Instant::now());
        assert_eq!(control.resume(), Err(PauseError::NotPaused));
        control.request_pause().unwrap();
        assert!(control.is_paused());
        assert_eq!(control.request_pause(), Err(PauseError::AlreadyPaused));
        control.resume().unwrap();
        assert!(!control.is_paused());
    }

    #[test]
    fn park_returns_at_once_when_not_paused() {
        let control = Control::new(1, Instant::now());
        control.park_if_paused();
        assert!(!control.wait_parked(Duration::from_millis(1)));
    }

    #[test]
    fn a_stopping_vm_cannot_be_paused() {
        let control = Control::new(1, Instant::now());
        control.request_exit(VmExit::PowerOff);
        assert_eq!(control.request_pause(), Err(PauseError::Stopping));
    }

    #[test]
    fn tids_and_affinity_are_kept_per_vcpu() {
        let control = Control::new(2, Instant::now()).with_affinity(vec![vec![1, 2]]);
        assert_eq!(control.vcpu_tids(), vec![0, 0]);
        control.set_tid(1, 4242);
        assert_eq!(control.vcpu_tids(), vec![0, 4242]);
        assert_eq!(control.affinity(0), &[1, 2]);
        assert!(control.affinity(1).is_empty());
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
