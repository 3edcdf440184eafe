//! Deadline misses of SCHED_DEADLINE vCPUs, observed from the outside.
//!
//! The kernel signals an overrun (a thread that used up its budget) but
//! keeps no count of the periods in which a thread did *not* get its
//! budget. The `dl-watch` thread derives one from each vCPU thread's
//! `/proc/self/task/TID/schedstat` (CPU time received, and time spent
//! runnable but not running, which includes time throttled after the
//! budget ran out), sampled once every [`PERIODS`] periods of the vCPU's
//! reservation:
//!
//! - a check interval counts when the thread was runnable (running or
//!   waiting) for all of it: it wanted the CPU the whole time, and every
//!   whole period of the kernel's own (not aligned with ours) inside the
//!   interval promised it a full budget;
//! - it is a **miss** when in such an interval the thread received less
//!   than those budgets, less one for the counters' lag (see [`judge`]).
//!
//! A vCPU that halts or waits on I/O part of the interval is not checked
//! in that interval, so misses of short periodic jobs inside a mostly idle
//! vCPU are not seen here (the benchmark measures those in the guest).
//!
//! The same thread counts the overruns of a guest's only deadline vCPU,
//! whose thread blocks SIGXCPU (see `overruns`): each one lands on another
//! thread and wakes the watcher.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{thread_cpu_ns, RtBudget, ThreadPolicy};
use crate::control::Control;

/// Slack of the checks: 1/20th (5%) of the interval and of the budget,
/// for the sampling thread's own wake-up lateness.
pub const SLACK_DIV: u64 = 20;
/// A check interval lasts this many periods of the vCPU's reservation.
pub const PERIODS: u64 = 10;
/// How often the watcher looks again when no vCPU has a reservation.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Per vCPU: check intervals counted, and misses among them.
#[derive(Debug, Default)]
pub struct VcpuMisses {
    pub checks: AtomicU64,
    pub misses: AtomicU64,
}

static COUNTS: Mutex<Vec<Arc<VcpuMisses>>> = Mutex::new(Vec::new());

/// The counts of vCPU `index` (zero until the watcher has seen it).
pub fn of(index: usize) -> (u64, u64) {
    let counts = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    counts.get(index).map_or((0, 0), |c| {
        (
            c.checks.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
        )
    })
}

/// The counters of vCPU `index`, created on first use.
fn counts(index: usize) -> Arc<VcpuMisses> {
    let mut all = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    while all.len() <= index {
        all.push(Arc::default());
    }
    all[index].clone()
}

/// What one check interval shows: `None` when the thread was not runnable
/// throughout (not checked), else whether it missed its budget.
///
/// schedstat's counters lag: CPU time is brought up to date when the
/// thread is throttled or scheduled out (at most one budget late), waiting
/// time when it runs again (at most one period late). So a thread counts
/// as runnable throughout when its running and waiting add up to the
/// interval less one period, and the interval's whole periods of the
/// kernel (one fewer than fit in it) less one budget for the lag must have
/// brought it their budget.
pub fn judge(rt: RtBudget, interval_ns: u64, run_ns: u64, wait_ns: u64) -> Option<bool> {
    let wanted = run_ns.saturating_add(wait_ns) + rt.period_ns + interval_ns / SLACK_DIV;
    if wanted < interval_ns {
        return None;
    }
    let promised = (interval_ns / rt.period_ns).saturating_sub(2) * rt.budget_ns;
    Some(run_ns + rt.budget_ns / SLACK_DIV < promised)
}

/// The last sample of one vCPU thread.
#[derive(Clone, Copy)]
struct Sample {
    tid: i32,
    rt: RtBudget,
    interval_ns: u64,
    at_ns: u64,
    run_ns: u64,
    wait_ns: u64,
}

/// Starts the `dl-watch` thread; it ends when the VM stops.
pub fn start(control: Arc<Control>) -> std::io::Result<()> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    super::overruns::wake_on_overrun(wake.as_raw_fd());
    std::thread::Builder::new()
        .name("dl-watch".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Control);
            watch(&control, &wake);
            super::overruns::wake_on_overrun(-1);
        })?;
    Ok(())
}

fn watch(control: &Control, wake: &EventFd) {
    let mut last: Vec<Option<Sample>> = Vec::new();
    while !control.is_stopping() {
        let tids = control.vcpu_tids();
        let config = control.sched();
        last.resize(tids.len(), None);
        let now = crate::gate::monotonic_ns();
        let mut next = now + IDLE_POLL.as_nanos() as u64;
        for (index, &tid) in tids.iter().enumerate() {
            let ThreadPolicy::Deadline(rt) = config.thread_policy(index) else {
                last[index] = None;
                continue;
            };
            let interval_ns = PERIODS * rt.period_ns;
            let Some((run_ns, wait_ns)) = (tid > 0).then(|| thread_cpu_ns(tid)).flatten() else {
                continue;
            };
            let sample = Sample {
                tid,
                rt,
                interval_ns,
                at_ns: now,
                run_ns,
                wait_ns,
            };
            match last[index] {
                Some(old) if old.tid == tid && old.rt == rt && old.interval_ns == interval_ns => {
                    if now - old.at_ns < interval_ns {
                        next = next.min(old.at_ns + interval_ns);
                        continue;
                    }
                    record(index, &old, &sample);
                }
                _ => {}
            }
            last[index] = Some(sample);
            next = next.min(now + interval_ns);
        }
        let sleep = next.saturating_sub(crate::gate::monotonic_ns());
        if wait(wake, Duration::from_nanos(sleep)) {
            // Only a lone deadline vCPU blocks the signal: these are its.
            let signals = wake.read().unwrap_or(0);
            if let Some(index) = config.lone_deadline_vcpu(tids.len()) {
                super::overruns::add_vcpu_overruns(index, signals);
            }
        }
    }
}

/// Sleeps up to `limit`, or until an overrun signals `wake`; true then.
fn wait(wake: &EventFd, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}

/// Judges the interval between two samples and counts it.
fn record(index: usize, old: &Sample, new: &Sample) {
    let verdict = judge(
        old.rt,
        new.at_ns - old.at_ns,
        new.run_ns.saturating_sub(old.run_ns),
        new.wait_ns.saturating_sub(old.wait_ns),
    );
    let Some(missed) = verdict else {
        return;
    };
    let counts = counts(index);
    counts.checks.fetch_add(1, Ordering::Relaxed);
    if missed {
        counts.misses.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const RT: RtBudget = RtBudget {
        budget_ns: 2 * MS,
        period_ns: 10 * MS,
    };

    #[test]
    fn a_runnable_thread_short_of_its_budgets_missed() {
        // Runnable the whole 100 ms, ran 10 ms where 18 ms are promised.
        assert_eq!(judge(RT, 100 * MS, 10 * MS, 90 * MS), Some(true));
        // Its waiting time not yet counted (it has not run since).
        assert_eq!(judge(RT, 100 * MS, 10 * MS, 82 * MS), Some(true));
    }

    #[test]
    fn a_thread_that_got_its_budgets_did_not_miss() {
        // Busy, throttled after each budget: 20 ms run, 80 ms waiting.
        assert_eq!(judge(RT, 100 * MS, 20 * MS, 80 * MS), Some(false));
        // The last budget not yet counted, nor the wait since.
        assert_eq!(judge(RT, 100 * MS, 16 * MS, 76 * MS), Some(false));
    }

    #[test]
    fn a_thread_idle_part_of_the_interval_is_not_checked() {
        // A 1 ms job every period, each waiting 0.5 ms, then sleeping.
        assert_eq!(judge(RT, 100 * MS, 10 * MS, 5 * MS), None);
        assert_eq!(judge(RT, 100 * MS, 0, 0), None);
    }
}
