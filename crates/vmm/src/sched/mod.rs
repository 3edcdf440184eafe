//! Scheduling policy of a guest: what it declares (`[sched]` in the guest
//! file, `--sched` on the command line) and how its vCPU threads get it.
//!
//! Group policy (CPU weight and cap, memory limit) lives on the guest's
//! cgroup and is applied by whoever creates the group (crate `cgroup`).
//! Thread policy is applied here, by each vCPU thread to itself before it
//! first enters the guest, and again on request at run time:
//! - `rt = { budget, period }`: SCHED_DEADLINE with the budget as runtime and
//!   the period as both deadline and period, and SCHED_FLAG_DL_OVERRUN so
//!   that the kernel signals SIGXCPU when a vCPU thread overran its budget
//!   (counted per vCPU: see `overruns`);
//! - `priority = N` with `policy = "fifo"` or `"rr"`: SCHED_FIFO or SCHED_RR;
//! - neither: SCHED_OTHER, the kernel's fair class (weight and cap apply).

mod live;
pub mod misses;
mod overruns;

pub use live::{change, info, partition_of, partition_value, rt_of, windows_of};
pub use overruns::{follow_overrun_mode, overruns, track_overruns, vcpu_overruns};

use std::str::FromStr;

use thiserror::Error;

/// Linux scheduling classes (`include/uapi/linux/sched.h`).
const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;
const SCHED_RR: u32 = 2;
const SCHED_DEADLINE: u32 = 6;
/// Children of a real-time thread start in SCHED_OTHER.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
/// The kernel signals SIGXCPU to a deadline thread that overran its runtime.
const SCHED_FLAG_DL_OVERRUN: u64 = 0x04;
/// The smallest budget and period SCHED_DEADLINE accepts is 1 µs (the
/// kernel's `DL_SCALE`); below 100 µs the timer's own cost dominates.
pub const MIN_RT_NS: u64 = 100_000;
/// Periods longer than 4 s are refused by the kernel (`sched_dl_period_max`).
pub const MAX_RT_PERIOD_NS: u64 = 4_000_000_000;
/// SCHED_FIFO/SCHED_RR priorities.
pub const MAX_PRIORITY: u8 = 99;

/// Errors in a scheduling declaration, or from applying it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("'{0}' is not a duration like 2ms, 500us or 1s")]
    BadDuration(String),
    #[error("budget {budget} is more than its period {period}")]
    BudgetOverPeriod { budget: String, period: String },
    #[error("{what} {value} is out of range ({min} to {max})")]
    RtRange {
        what: &'static str,
        value: String,
        min: String,
        max: String,
    },
    #[error("'{0}' is not budget=DURATION,period=DURATION (or budget/period)")]
    BadRt(String),
    #[error("priority {0} is out of range: use 1-99")]
    BadPriority(u32),
    #[error("'{0}' is not fifo or rr")]
    BadPolicy(String),
    #[error("rt and priority cannot both be set: a vCPU thread has one scheduling class")]
    RtAndPriority,
    #[error("rt for vCPU {index}, but the guest has {cpus} vCPU(s)")]
    RtVcpuOutOfRange { index: usize, cpus: usize },
    #[error("cannot set {policy} on thread {tid}: {reason}")]
    Apply {
        policy: String,
        tid: i32,
        reason: String,
    },
}

/// A real-time reservation: `budget` of CPU time in every `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtBudget {
    pub budget_ns: u64,
    pub period_ns: u64,
}

impl RtBudget {
    /// Checks the kernel's limits and that the budget fits in the period.
    pub fn new(budget_ns: u64, period_ns: u64) -> Result<Self, SchedError> {
        for (what, value) in [("budget", budget_ns), ("period", period_ns)] {
            if !(MIN_RT_NS..=MAX_RT_PERIOD_NS).contains(&value) {
                return Err(SchedError::RtRange {
                    what,
                    value: format_duration(value),
                    min: format_duration(MIN_RT_NS),
                    max: format_duration(MAX_RT_PERIOD_NS),
                });
            }
        }
        if budget_ns > period_ns {
            return Err(SchedError::BudgetOverPeriod {
                budget: format_duration(budget_ns),
                period: format_duration(period_ns),
            });
        }
        Ok(Self {
            budget_ns,
            period_ns,
        })
    }

    /// The share of one CPU it reserves, 0.0-1.0.
    pub fn utilization(&self) -> f64 {
        self.budget_ns as f64 / self.period_ns as f64
    }
}

impl FromStr for RtBudget {
    type Err = SchedError;

    /// `budget=2ms,period=10ms`, or the short form `2ms/10ms`.
    fn from_str(text: &str) -> Result<Self, SchedError> {
        let bad = || SchedError::BadRt(text.to_string());
        let (budget, period) = if let Some((b, p)) = text.split_once('/') {
            (b, p)
        } else {
            let mut budget = None;
            let mut period = None;
            for item in text.split(',') {
                match item.split_once('=') {
                    Some(("budget", v)) if budget.is_none() => budget = Some(v),
                    Some(("period", v)) if period.is_none() => period = Some(v),
                    _ => return Err(bad()),
                }
            }
            (budget.ok_or_else(bad)?, period.ok_or_else(bad)?)
        };
        RtBudget::new(parse_duration(budget)?, parse_duration(period)?)
    }
}

/// The real-time class of a priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtClass {
    #[default]
    Fifo,
    /// Round-robin among threads of equal priority (Xvisor's priority round-robin).
    Rr,
}

impl RtClass {
    pub fn name(self) -> &'static str {
        match self {
            RtClass::Fifo => "fifo",
            RtClass::Rr => "rr",
        }
    }
}

impl FromStr for RtClass {
    type Err = SchedError;

    fn from_str(text: &str) -> Result<Self, SchedError> {
        match text {
            "fifo" => Ok(RtClass::Fifo),
            "rr" => Ok(RtClass::Rr),
            _ => Err(SchedError::BadPolicy(text.to_string())),
        }
    }
}

/// A fixed real-time priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub class: RtClass,
    pub level: u8,
}

impl Priority {
    pub fn new(class: RtClass, level: u32) -> Result<Self, SchedError> {
        match u8::try_from(level) {
            Ok(l) if (1..=MAX_PRIORITY).contains(&l) => Ok(Self { class, level: l }),
            _ => Err(SchedError::BadPriority(level)),
        }
    }
}

/// The kernel policy of one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadPolicy {
    /// SCHED_OTHER: the fair class, under the group's weight and cap.
    #[default]
    Fair,
    Fixed(Priority),
    Deadline(RtBudget),
}

impl ThreadPolicy {
    /// A short human form: `fair`, `fifo:10`, `deadline 2ms/10ms`.
    pub fn describe(&self) -> String {
        match self {
            ThreadPolicy::Fair => "fair".into(),
            ThreadPolicy::Fixed(p) => format!("{}:{}", p.class.name(), p.level),
            ThreadPolicy::Deadline(rt) => format!(
                "deadline {}/{}",
                format_duration(rt.budget_ns),
                format_duration(rt.period_ns)
            ),
        }
    }
}

/// A guest's scheduling and memory-isolation declaration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SchedConfig {
    /// CPU weight, 1-10000 (100 is the default share).
    pub weight: Option<u32>,
    /// CPU cap in per cent of one host CPU.
    pub cap: Option<u32>,
    /// A reservation for every vCPU.
    pub rt: Option<RtBudget>,
    /// Per-vCPU reservations, by vCPU index; they override `rt`.
    pub vcpu_rt: Vec<Option<RtBudget>>,
    pub priority: Option<Priority>,
    /// Prefault and lock guest RAM.
    pub locked: bool,
    /// A memory limit on the guest's cgroup, in bytes (overrides the default).
    pub memory_limit: Option<u64>,
    /// Time partitions: run only inside these windows.
    pub partition: Option<crate::gate::Partition>,
    /// The CPU pool the guest belongs to (a system file's `[pools.NAME]`).
    pub pool: Option<String>,
    /// Host CPUs of the guest's cpuset (its pool's); empty: every CPU.
    pub cpus: Vec<usize>,
}

impl SchedConfig {
    /// Checks the combination against a guest of `cpus` vCPUs.
    pub fn check(&self, cpus: usize) -> Result<(), SchedError> {
        let any_rt = self.rt.is_some() || self.vcpu_rt.iter().any(Option::is_some);
        if any_rt && self.priority.is_some() {
            return Err(SchedError::RtAndPriority);
        }
        if let Some(index) = self.vcpu_rt.iter().rposition(Option::is_some) {
            if index >= cpus {
                return Err(SchedError::RtVcpuOutOfRange { index, cpus });
            }
        }
        Ok(())
    }

    /// The policy vCPU `index`'s thread gets.
    pub fn thread_policy(&self, index: usize) -> ThreadPolicy {
        if let Some(Some(rt)) = self.vcpu_rt.get(index) {
            return ThreadPolicy::Deadline(*rt);
        }
        if let Some(rt) = self.rt {
            return ThreadPolicy::Deadline(rt);
        }
        match self.priority {
            Some(p) => ThreadPolicy::Fixed(p),
            None => ThreadPolicy::Fair,
        }
    }

    /// Whether the guest's process needs a cgroup of its own for this policy.
    pub fn needs_cgroup(&self) -> bool {
        self.weight.is_some()
            || self.cap.is_some()
            || self.memory_limit.is_some()
            || self.priority.is_some()
            || !self.cpus.is_empty()
    }

    /// Whether any vCPU thread leaves the fair class.
    pub fn is_real_time(&self) -> bool {
        self.priority.is_some() || self.rt.is_some() || self.vcpu_rt.iter().any(Option::is_some)
    }

    /// The index of the only one of `cpus` vCPUs with a deadline
    /// reservation, if exactly one has one: whose the guest's overruns are.
    pub fn lone_deadline_vcpu(&self, cpus: usize) -> Option<usize> {
        let mut deadline =
            (0..cpus).filter(|&i| matches!(self.thread_policy(i), ThreadPolicy::Deadline(_)));
        match (deadline.next(), deadline.next()) {
            (Some(index), None) => Some(index),
            _ => None,
        }
    }

    /// The CPU time the guest reserves, in CPUs (deadline reservations only).
    pub fn reserved_cpus(&self, cpus: usize) -> f64 {
        (0..cpus)
            .filter_map(|i| match self.thread_policy(i) {
                ThreadPolicy::Deadline(rt) => Some(rt.utilization()),
                _ => None,
            })
            .sum()
    }
}

/// Parses `2ms`, `500us`, `1s`, `250000ns` (a bare number is microseconds).
pub fn parse_duration(text: &str) -> Result<u64, SchedError> {
    let bad = || SchedError::BadDuration(text.to_string());
    let t = text.trim();
    let (digits, scale) = [("ns", 1), ("us", 1_000), ("µs", 1_000), ("ms", 1_000_000)]
        .iter()
        .find_map(|(suffix, scale)| t.strip_suffix(suffix).map(|d| (d, *scale)))
        .or_else(|| t.strip_suffix('s').map(|d| (d, 1_000_000_000)))
        .unwrap_or((t, 1_000));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let value: f64 = digits.parse().map_err(|_| bad())?;
    let ns = (value * scale as f64).round();
    if !(0.0..1e18).contains(&ns) {
        return Err(bad());
    }
    Ok(ns as u64)
}

/// Formats nanoseconds in the largest unit that keeps it whole-ish.
pub fn format_duration(ns: u64) -> String {
    if ns.is_multiple_of(1_000_000_000) && ns > 0 {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) && ns > 0 {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// The kernel's `struct sched_attr`, first version (48 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Sets thread `tid`'s policy (0: the calling thread); a deadline thread
/// is signalled its overruns.
pub fn apply(tid: i32, policy: ThreadPolicy) -> Result<(), SchedError> {
    set_attr(tid, policy, SCHED_FLAG_DL_OVERRUN)
}

/// Sets the calling thread's policy with no overrun signal: for the VMM's
/// own deadline threads (the partition gate), whose overruns are not the
/// guest's.
pub fn apply_unsignalled(policy: ThreadPolicy) -> Result<(), SchedError> {
    set_attr(0, policy, 0)
}

fn set_attr(tid: i32, policy: ThreadPolicy, overrun_flag: u64) -> Result<(), SchedError> {
    let mut attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        ..Default::default()
    };
    match policy {
        ThreadPolicy::Fair => attr.sched_policy = SCHED_OTHER,
        ThreadPolicy::Fixed(p) => {
            attr.sched_policy = match p.class {
                RtClass::Fifo => SCHED_FIFO,
                RtClass::Rr => SCHED_RR,
            };
            attr.sched_priority = u32::from(p.level);
            attr.sched_flags = SCHED_FLAG_RESET_ON_FORK;
        }
        ThreadPolicy::Deadline(rt) => {
            attr.sched_policy = SCHED_DEADLINE;
            attr.sched_flags = SCHED_FLAG_RESET_ON_FORK | overrun_flag;
            attr.sched_runtime = rt.budget_ns;
            attr.sched_deadline = rt.period_ns;
            attr.sched_period = rt.period_ns;
        }
    }
    // SAFETY: `attr` is a valid sched_attr whose `size` field says how much
    // of it the kernel may read; the kernel does not keep the pointer.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let reason = match err.raw_os_error() {
            Some(libc::EBUSY) => "the host's real-time capacity is used up (admission refused)".into(),
            Some(libc::EPERM) => format!("{err}: needs root (CAP_SYS_NICE), real-time runtime in the thread's cpu cgroup, and for deadline a thread allowed on every CPU of its cpuset"),
            _ => err.to_string(),
        };
        return Err(SchedError::Apply {
            policy: policy.describe(),
            tid,
            reason,
        });
    }
    Ok(())
}

/// Reads thread `tid`'s policy back from the kernel (`sched_getattr`).
pub fn read(tid: i32) -> std::io::Result<ThreadPolicy> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is writable storage of the size passed; the kernel
    // writes at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(match attr.sched_policy {
        SCHED_FIFO | SCHED_RR => ThreadPolicy::Fixed(Priority {
            class: if attr.sched_policy == SCHED_FIFO {
                RtClass::Fifo
            } else {
                RtClass::Rr
            },
            level: attr.sched_priority as u8,
        }),
        SCHED_DEADLINE => ThreadPolicy::Deadline(RtBudget {
            budget_ns: attr.sched_runtime,
            period_ns: attr.sched_period,
        }),
        _ => ThreadPolicy::Fair,
    })
}

/// CPU time thread `tid` of this process has received, in nanoseconds,
/// and the time it waited runnable (`/proc/self/task/TID/schedstat`).
pub fn thread_cpu_ns(tid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_default_to_microseconds() {
        assert_eq!(parse_duration("2ms"), Ok(2_000_000));
        assert_eq!(parse_duration("500us"), Ok(500_000));
        assert_eq!(parse_duration("1s"), Ok(1_000_000_000));
        assert_eq!(parse_duration("1.5ms"), Ok(1_500_000));
        assert_eq!(parse_duration("250"), Ok(250_000));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1ms").is_err());
        assert_eq!(format_duration(2_000_000), "2ms");
        assert_eq!(format_duration(1_500_000), "1500us");
    }

    #[test]
    fn rt_budgets_parse_in_both_forms_and_are_checked() {
        let rt: RtBudget = "budget=2ms,period=10ms".parse().unwrap();
        assert_eq!((rt.budget_ns, rt.period_ns), (2_000_000, 10_000_000));
        assert_eq!("2ms/10ms".parse::<RtBudget>().unwrap(), rt);
        assert!((rt.utilization() - 0.2).abs() < 1e-9);
        assert!(matches!(
            "11ms/10ms".parse::<RtBudget>(),
            Err(SchedError::BudgetOverPeriod { .. })
        ));
        assert!(matches!(
            "10us/10ms".parse::<RtBudget>(),
            Err(SchedError::RtRange { what: "budget", .. })
        ));
        assert!(matches!(
            "budget=2ms".parse::<RtBudget>(),
            Err(SchedError::BadRt(_))
        ));
    }

    #[test]
    fn per_vcpu_rt_overrides_the_guest_wide_one() {
        let all: RtBudget = "1ms/10ms".parse().unwrap();
        let one: RtBudget = "5ms/10ms".parse().unwrap();
        let config = SchedConfig {
            rt: Some(all),
            vcpu_rt: vec![None, Some(one)],
            ..Default::default()
        };
        assert_eq!(config.thread_policy(0), ThreadPolicy::Deadline(all));
        assert_eq!(config.thread_policy(1), ThreadPolicy::Deadline(one));
        assert!((config.reserved_cpus(2) - 0.6).abs() < 1e-9);
        assert_eq!(config.lone_deadline_vcpu(2), None, "two reservations");
        let one_only = SchedConfig {
            vcpu_rt: vec![None, Some(one)],
            ..Default::default()
        };
        assert_eq!(one_only.lone_deadline_vcpu(2), Some(1));
        assert_eq!(SchedConfig::default().lone_deadline_vcpu(2), None);
        assert_eq!(
            config.check(1),
            Err(SchedError::RtVcpuOutOfRange { index: 1, cpus: 1 })
        );
    }

    #[test]
    fn rt_and_priority_together_are_refused() {
        let config = SchedConfig {
            rt: Some("1ms/10ms".parse().unwrap()),
            priority: Some(Priority::new(RtClass::Rr, 5).unwrap()),
            ..Default::default()
        };
        assert_eq!(config.check(1), Err(SchedError::RtAndPriority));
        assert_eq!(
            Priority::new(RtClass::Fifo, 100),
            Err(SchedError::BadPriority(100))
        );
    }

    #[test]
    fn a_thread_without_policy_reads_as_fair() {
        assert_eq!(read(0).unwrap(), ThreadPolicy::Fair);
    }
}
