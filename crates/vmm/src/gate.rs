//! Time partitions in the manner of ARINC 653: a major frame cut into
//! windows, and a gate that lets the guest's vCPUs run only inside the
//! windows it owns.
//!
//! The gate is one thread per VMM (`gate`), a SCHED_DEADLINE thread (1 ms
//! in every 10 ms, so that it preempts deadline vCPUs too; SCHED_FIFO 98
//! where the kernel refuses that). It sleeps on CLOCK_MONOTONIC until just
//! before the next window edge and spins to it (absolute times, so errors
//! do not accumulate), all counted from a common epoch: guests of one pool
//! share it (CLOCK_MONOTONIC's zero), so their frames line up.
//! [`CLOSE_LEAD_NS`] before a window's end it closes the gate
//! (`Control::set_gate_closed`), kicks every vCPU out of KVM_RUN and waits
//! until all are parked; at a window's start it opens the gate and they run
//! again. Parked vCPUs keep their state in KVM, exactly as when paused.
//!
//! What it measures: how late each window starts (from the edge until the
//! gate released the vCPUs, and until each vCPU ran again), how long the
//! vCPUs ran past a window's end (an overrun when longer than
//! [`OVERRUN_SLACK_NS`]), and whether the guest made progress while its
//! window was closed (exits counted at the close and again just before the
//! next open; it must not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::control::Control;
use crate::sched::{self, format_duration, Priority, RtBudget, RtClass, ThreadPolicy};

/// A window end the vCPUs miss by more than this counts as an overrun.
pub const OVERRUN_SLACK_NS: u64 = 100_000;
/// The gate thread's SCHED_FIFO priority: above any guest's vCPU.
pub const GATE_PRIORITY: u8 = 98;
/// The gate wakes this long before an edge and spins to it: the host's
/// timer wake-up alone is late by tens of microseconds.
pub const SPIN_NS: u64 = 200_000;
/// A window is closed this long before its end (the time the vCPUs take
/// to leave KVM_RUN and park, measured on PVM at about 100 µs at the
/// median), so that the guest does not outrun its window.
pub const CLOSE_LEAD_NS: u64 = 120_000;
/// Window-start samples kept for percentiles.
const SAMPLES: usize = 8192;
/// The shortest window and frame the gate accepts.
pub const MIN_WINDOW_NS: u64 = 500_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("frame {0} is out of range (1ms to 10s)")]
    Frame(String),
    #[error("window {index}: {problem}")]
    Window { index: usize, problem: String },
    #[error("no windows: a partitioned guest needs at least one")]
    NoWindows,
}

/// One window of the frame: `[start, start + length)`, from the frame's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub length_ns: u64,
}

/// The guest's windows in a repeating major frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub frame_ns: u64,
    /// Sorted by start, not overlapping, inside the frame.
    pub windows: Vec<Window>,
    /// CLOCK_MONOTONIC time of a frame start, shared by the guests of one
    /// pool; `None`: the VMM's own start.
    pub epoch_ns: Option<u64>,
}

impl Partition {
    /// Checks and sorts the windows.
    pub fn new(
        frame_ns: u64,
        mut windows: Vec<Window>,
        epoch_ns: Option<u64>,
    ) -> Result<Self, PartitionError> {
        if !(1_000_000..=10_000_000_000).contains(&frame_ns) {
            return Err(PartitionError::Frame(format_duration(frame_ns)));
        }
        if windows.is_empty() {
            return Err(PartitionError::NoWindows);
        }
        for (index, w) in windows.iter().enumerate() {
            let problem = if w.length_ns < MIN_WINDOW_NS {
                format!(
                    "length {} is under {}",
                    format_duration(w.length_ns),
                    format_duration(MIN_WINDOW_NS)
                )
            } else if w.start_ns.saturating_add(w.length_ns) > frame_ns {
                format!(
                    "ends at {}, past the frame's {}",
                    format_duration(w.start_ns + w.length_ns),
                    format_duration(frame_ns)
                )
            } else {
                continue;
            };
            return Err(PartitionError::Window { index, problem });
        }
        windows.sort_by_key(|w| w.start_ns);
        for (index, pair) in windows.windows(2).enumerate() {
            if pair[0].start_ns + pair[0].length_ns > pair[1].start_ns {
                return Err(PartitionError::Window {
                    index: index + 1,
                    problem: "overlaps the window before it".into(),
                });
            }
        }
        Ok(Self {
            frame_ns,
            windows,
            epoch_ns,
        })
    }

    /// The share of the frame the guest owns, 0.0-1.0.
    pub fn share(&self) -> f64 {
        let owned: u64 = self.windows.iter().map(|w| w.length_ns).sum();
        owned as f64 / self.frame_ns as f64
    }

    /// The next edge strictly after `now`: its time and whether it opens.
    /// Adjacent windows merge: an end that is also a start is no edge.
    pub fn next_edge(&self, epoch: u64, now: u64) -> (u64, bool) {
        let since = now.saturating_sub(epoch);
        let frame_start = epoch + since / self.frame_ns * self.frame_ns;
        for frame in [frame_start, frame_start + self.frame_ns] {
            for (i, w) in self.windows.iter().enumerate() {
                let open = frame + w.start_ns;
                let close = open + w.length_ns;
                let merged_open = i > 0 && {
                    let p = self.windows[i - 1];
                    p.start_ns + p.length_ns == w.start_ns
                };
                if open > now && !merged_open {
                    return (open, true);
                }
                let next_starts_here = self
                    .windows
                    .get(i + 1)
                    .is_some_and(|n| n.start_ns == w.start_ns + w.length_ns);
                if close > now && !next_starts_here {
                    return (close, false);
                }
            }
        }
        // Unreachable for a checked partition: the next frame has an edge.
        (frame_start + 2 * self.frame_ns, true)
    }

    /// Whether `now` falls inside one of the windows.
    pub fn is_open_at(&self, epoch: u64, now: u64) -> bool {
        let offset = now.saturating_sub(epoch) % self.frame_ns;
        self.windows
            .iter()
            .any(|w| (w.start_ns..w.start_ns + w.length_ns).contains(&offset))
    }
}

/// What the gate measured.
#[derive(Debug, Default)]
pub struct GateStats {
    pub windows: AtomicU64,
    pub overruns: AtomicU64,
    /// The longest time past a window's end before every vCPU was parked.
    pub worst_overrun_ns: AtomicU64,
    /// Exits the guest made while its window was closed (must stay 0).
    pub closed_progress: AtomicU64,
    /// CPU time the vCPU threads received while the window was closed.
    pub closed_cpu_ns: AtomicU64,
    /// Window-start lateness of the gate's release, in nanoseconds (the
    /// latest [`SAMPLES`]).
    starts: Mutex<Samples>,
    /// Window-start lateness as each vCPU saw it: from the edge until the
    /// vCPU thread ran again, on its way back into the guest.
    vcpu_starts: Mutex<Samples>,
    /// Time from each window's end until every vCPU was parked.
    closes: Mutex<Samples>,
}

/// Percentiles of the window-start lateness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Jitter {
    pub samples: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl GateStats {
    fn record_start(&self, late_ns: u64) {
        push_sample(&self.starts, late_ns);
        self.windows.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how late a vCPU resumed after its window opened.
    pub fn record_vcpu_start(&self, late_ns: u64) {
        push_sample(&self.vcpu_starts, late_ns);
    }

    fn record_close(&self, late_ns: u64) {
        push_sample(&self.closes, late_ns);
        self.worst_overrun_ns.fetch_max(late_ns, Ordering::Relaxed);
        if late_ns > OVERRUN_SLACK_NS {
            self.overruns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The gate's window-start lateness so far.
    pub fn jitter(&self) -> Jitter {
        percentiles(&self.starts)
    }

    /// How long the vCPUs took to leave the guest after each window's end.
    pub fn close_latency(&self) -> Jitter {
        percentiles(&self.closes)
    }

    /// The vCPUs' window-start lateness so far.
    pub fn vcpu_jitter(&self) -> Jitter {
        percentiles(&self.vcpu_starts)
    }
}

/// The latest [`SAMPLES`] values, in a ring: recording one costs no more
/// than a store, on the gate's and the vCPUs' way back into the guest.
#[derive(Debug, Default)]
struct Samples {
    values: Vec<u64>,
    next: usize,
}

fn push_sample(samples: &Mutex<Samples>, value: u64) {
    let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
    if samples.values.len() < SAMPLES {
        if samples.values.is_empty() {
            samples.values.reserve_exact(SAMPLES);
        }
        samples.values.push(value);
    } else {
        let next = samples.next;
        samples.values[next] = value;
        samples.next = (next + 1) % SAMPLES;
    }
}

fn percentiles(samples: &Mutex<Samples>) -> Jitter {
    let mut sorted = samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values
        .clone();
    sorted.sort_unstable();
    let at = |q: f64| {
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or(0)
    };
    Jitter {
        samples: sorted.len(),
        p50_ns: at(0.5),
        p99_ns: at(0.99),
        max_ns: sorted.last().copied().unwrap_or(0),
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid storage for clock_gettime's result.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits until CLOCK_MONOTONIC reaches `at_ns`: sleeps until [`SPIN_NS`]
/// before it, runs `early` (slow work that must precede the edge), then
/// spins.
fn wait_until(at_ns: u64, early: impl FnOnce()) {
    sleep_until(at_ns.saturating_sub(SPIN_NS));
    early();
    while monotonic_ns() < at_ns {
        std::hint::spin_loop();
    }
}

/// Sleeps until CLOCK_MONOTONIC reaches `at_ns`.
fn sleep_until(at_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid absolute time; a null remainder is allowed
    // with TIMER_ABSTIME. Interrupted sleeps are retried.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
}

/// Starts the `gate` thread. It governs the vCPUs by the partition in the
/// guest's policy, and follows it when a `sched` request installs, changes
/// or removes one; with none it waits, the gate open, at the fair class.
pub fn start(control: Arc<Control>) -> std::io::Result<Arc<GateStats>> {
    let stats = Arc::new(GateStats::default());
    control.set_gate_stats(stats.clone());
    if let Some(p) = control.sched().partition {
        let epoch = p.epoch_ns.unwrap_or_else(monotonic_ns);
        control.set_gate_closed(!p.is_open_at(epoch, monotonic_ns()), 0);
    }
    let thread_stats = stats.clone();
    let started = monotonic_ns();
    std::thread::Builder::new()
        .name("gate".into())
        .spawn(move || {
            // It needs what the control thread needs: sleep, kick, read
            // /proc, and sched_setattr for its own class.
            crate::seccomp::enter(crate::seccomp::ThreadKind::Control);
            follow(&control, &thread_stats, started);
        })?;
    Ok(stats)
}

/// The gate thread's life: run the partition in force until the policy
/// changes, then the new one, or wait for one.
fn follow(control: &Control, stats: &GateStats, started: u64) {
    let mut raised = false;
    while !control.is_stopping() {
        let generation = control.sched_generation();
        let Some(partition) = control.sched().partition else {
            control.set_gate_closed(false, 0);
            if raised {
                let _ = sched::apply_unsignalled(ThreadPolicy::Fair);
                raised = false;
            }
            control.wait_sched_change(generation, Duration::from_secs(1));
            continue;
        };
        if !raised {
            if let Err(e) = raise_gate() {
                eprintln!("ferrovisor: the partition gate runs without real-time priority, so its windows start late under load: {e}");
            }
            raised = true;
        }
        let epoch = partition.epoch_ns.unwrap_or(started);
        run(&partition, epoch, control, stats, generation);
    }
    control.set_gate_closed(false, 0);
}

/// The gate thread's own reservation: SCHED_DEADLINE, so that it preempts
/// the vCPUs it governs even when they are real-time (deadline) threads
/// themselves; 1 ms in every 10 ms covers its spin before each edge.
const GATE_RESERVATION: RtBudget = RtBudget {
    budget_ns: 1_000_000,
    period_ns: 10_000_000,
};

/// Gives the calling (gate) thread its reservation, or where the kernel
/// refuses one (a pinned process, no capacity left), SCHED_FIFO.
fn raise_gate() -> Result<(), sched::SchedError> {
    if sched::apply_unsignalled(ThreadPolicy::Deadline(GATE_RESERVATION)).is_ok() {
        return Ok(());
    }
    let fifo = Priority {
        class: RtClass::Fifo,
        level: GATE_PRIORITY,
    };
    sched::apply(0, ThreadPolicy::Fixed(fifo))
}

/// Runs `partition` until the VM stops or the policy changes after
/// `generation` (seen at each edge).
fn run(partition: &Partition, epoch: u64, control: &Control, stats: &GateStats, generation: u64) {
    let mut closed_at: Option<(u64, u64)> = None;
    // Start in the state the partition says for now (it may have replaced
    // another one mid-window).
    let now = monotonic_ns();
    if partition.is_open_at(epoch, now) {
        control.set_gate_closed(false, now);
    } else {
        control.set_gate_closed(true, now);
        park_all(control, now);
    }
    while !control.is_stopping() && control.sched_generation() == generation {
        let (edge, opens) = partition.next_edge(epoch, monotonic_ns());
        // Just before a window opens, the guest's counters are read again:
        // what changed while it was closed is progress it must not make.
        let closed = closed_at.take().filter(|_| opens);
        // A window is closed a little early, so that the vCPUs are out of
        // the guest by its end: leaving KVM_RUN takes about that long.
        let at = if opens {
            edge
        } else {
            edge - CLOSE_LEAD_NS.min(edge)
        };
        wait_until(at, || {
            if let Some((exits, cpu)) = closed {
                let now_exits = control.exits.total();
                stats
                    .closed_progress
                    .fetch_add(now_exits.saturating_sub(exits), Ordering::Relaxed);
                let now_cpu = vcpu_cpu_ns(control);
                stats
                    .closed_cpu_ns
                    .fetch_add(now_cpu.saturating_sub(cpu), Ordering::Relaxed);
            }
        });
        if opens {
            control.set_gate_closed(false, edge);
            stats.record_start(monotonic_ns().saturating_sub(edge));
        } else {
            control.set_gate_closed(true, edge);
            if park_all(control, edge) {
                stats.record_close(monotonic_ns().saturating_sub(edge));
                closed_at = Some((control.exits.total(), vcpu_cpu_ns(control)));
            }
        }
    }
}

/// Kicks every vCPU until all are parked (a kick that lands just before a
/// vCPU enters KVM_RUN is lost, so it is repeated). False if the VM stops
/// or the window ends are missed by a whole second.
fn park_all(control: &Control, edge: u64) -> bool {
    loop {
        for tid in control.vcpu_tids() {
            crate::vcpu::kick_tid(tid);
        }
        if control.wait_all_parked(Duration::from_micros(50)) {
            return true;
        }
        if control.is_stopping() || monotonic_ns() > edge + 1_000_000_000 {
            return false;
        }
    }
}

/// CPU time of all vCPU threads so far.
fn vcpu_cpu_ns(control: &Control) -> u64 {
    control
        .vcpu_tids()
        .into_iter()
        .filter(|&t| t > 0)
        .filter_map(|t| sched::thread_cpu_ns(t).map(|(cpu, _)| cpu))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn w(start: u64, length: u64) -> Window {
        Window {
            start_ns: start * MS,
            length_ns: length * MS,
        }
    }

    #[test]
    fn edges_follow_the_windows_frame_after_frame() {
        let p = Partition::new(20 * MS, vec![w(5, 5)], None).unwrap();
        let epoch = 1_000 * MS;
        assert_eq!(p.next_edge(epoch, epoch), (epoch + 5 * MS, true));
        assert_eq!(p.next_edge(epoch, epoch + 5 * MS), (epoch + 10 * MS, false));
        assert_eq!(p.next_edge(epoch, epoch + 10 * MS), (epoch + 25 * MS, true));
        assert!(p.is_open_at(epoch, epoch + 27 * MS));
        assert!(!p.is_open_at(epoch, epoch + 31 * MS));
        assert!((p.share() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn adjacent_windows_merge_into_one_open_stretch() {
        let p = Partition::new(20 * MS, vec![w(5, 5), w(0, 5)], None).unwrap();
        let epoch = 0;
        assert_eq!(p.next_edge(epoch, 1), (10 * MS, false));
        assert_eq!(p.next_edge(epoch, 10 * MS), (20 * MS, true));
    }

    #[test]
    fn bad_windows_are_refused_by_index() {
        assert!(matches!(
            Partition::new(20 * MS, vec![w(15, 10)], None),
            Err(PartitionError::Window { index: 0, .. })
        ));
        assert!(matches!(
            Partition::new(20 * MS, vec![w(0, 5), w(4, 5)], None),
            Err(PartitionError::Window { index: 1, .. })
        ));
        assert_eq!(
            Partition::new(20 * MS, vec![], None),
            Err(PartitionError::NoWindows)
        );
        assert!(matches!(
            Partition::new(MS / 2, vec![w(0, 1)], None),
            Err(PartitionError::Frame(_))
        ));
    }

    #[test]
    fn samples_keep_the_latest_ones() {
        let stats = GateStats::default();
        for late in 0..SAMPLES as u64 + 10 {
            stats.record_start(if late < 10 { 1_000_000 } else { late });
        }
        let j = stats.jitter();
        assert_eq!(j.samples, SAMPLES);
        assert_eq!(j.max_ns, SAMPLES as u64 + 9, "the oldest were replaced");
    }

    #[test]
    fn jitter_percentiles_come_from_the_samples() {
        let stats = GateStats::default();
        for late in 1..=100 {
            stats.record_start(late * 1000);
        }
        let j = stats.jitter();
        assert_eq!(j.samples, 100);
        assert_eq!(j.max_ns, 100_000);
        assert_eq!(j.p99_ns, 99_000);
        assert_eq!(j.p50_ns, 51_000);
        stats.record_close(OVERRUN_SLACK_NS + 1);
        stats.record_close(10);
        assert_eq!(stats.overruns.load(Ordering::Relaxed), 1);
    }
}
