//! The `[sched]` table of a guest: CPU policy, time partitions and memory
//! isolation.
//!
//! ```toml
//! [sched]
//! weight = 200                  # CPU weight 1-10000 (100 is the default)
//! cap = 50                      # at most 50% of one host CPU
//! rt = { budget = "2ms", period = "10ms" }   # SCHED_DEADLINE, every vCPU;
//!                               # or one per vCPU: [{...}, "none"]
//! priority = 10                 # SCHED_FIFO 1-99 (not with rt)
//! policy = "rr"                 # "fifo" (default) or "rr" for priority
//! locked = true                 # prefault and lock guest RAM
//! memory_limit = "1G"           # the guest cgroup's memory limit
//! pool = "rt"                   # its CPU pool (set from a system file's pools)
//! cpus = "2-3"                  # its cgroup's cpuset (set from the pool)
//!
//! [sched.partition]             # ARINC 653-style time windows
//! frame = "20ms"
//! windows = [{ start = "0ms", length = "5ms" }]
//! epoch = 123456789000          # CLOCK_MONOTONIC ns of a frame start (optional)
//! ```

use toml::Value;
use vmm::gate::{Partition, Window};
use vmm::sched::{self, Priority, RtBudget, RtClass, SchedConfig};

use crate::fields::{kind, Fields};
use crate::FileError;

/// A per-vCPU `rt` entry that leaves the vCPU without a reservation.
const NO_RT: &str = "none";

/// Reads the `[sched]` table, if any.
pub(crate) fn sched_fields(f: &mut Fields, cpus: u8) -> Result<SchedConfig, FileError> {
    let Some(mut s) = f.table("sched")? else {
        return Ok(SchedConfig::default());
    };
    let weight = bounded(&mut s, "weight", 1, 10_000)?;
    let cap = bounded(&mut s, "cap", 1, i64::from(cgroup::MAX_CAP_PERCENT))?;
    let (rt, vcpu_rt) = rt(&mut s, cpus)?;
    let class = match s.string("policy")? {
        None => None,
        Some(text) => Some(
            text.parse::<RtClass>()
                .map_err(|e| s.error("policy", e.to_string()))?,
        ),
    };
    let priority = match bounded(&mut s, "priority", 1, 99)? {
        None if class.is_some() => return Err(s.error("policy", "needs a priority")),
        None => None,
        Some(level) => Some(
            Priority::new(class.unwrap_or_default(), level)
                .map_err(|e| s.error("priority", e.to_string()))?,
        ),
    };
    let locked = s.boolean("locked")?.unwrap_or(false);
    let memory_limit = match s.string("memory_limit")? {
        None => None,
        Some(text) => Some(vmm::config::parse_size(&text).ok_or_else(|| {
            s.error(
                "memory_limit",
                format!("'{text}' is not a size (examples: 512M, 2G)"),
            )
        })?),
    };
    let partition = match s.table("partition")? {
        None => None,
        Some(p) => Some(partition(p)?),
    };
    let pool = s.string("pool")?;
    if let Some(name) = &pool {
        crate::check_guest_name(name).map_err(|_| {
            s.error(
                "pool",
                format!("'{name}' is not a pool name (1 to 32 characters: a-z, 0-9 and -)"),
            )
        })?;
    }
    let host_cpus = match s.string("cpus")? {
        None => Vec::new(),
        Some(text) => {
            vmm::config::parse_cpu_list(&text).map_err(|e| s.error("cpus", e.to_string()))?
        }
    };
    let config = SchedConfig {
        weight,
        cap,
        rt,
        vcpu_rt,
        priority,
        locked,
        memory_limit,
        partition,
        pool,
        cpus: host_cpus,
    };
    config
        .check(usize::from(cpus))
        .map_err(|e| s.error("rt", e.to_string()))?;
    s.finish()?;
    Ok(config)
}

fn bounded(
    s: &mut Fields,
    key: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<u32>, FileError> {
    match s.integer(key)? {
        None => Ok(None),
        Some(n) if (min..=max).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(s.error(key, format!("{n} is out of range ({min} to {max})"))),
    }
}

/// `rt = { budget, period }` for every vCPU, or an array with one entry
/// per vCPU (a table or `"none"`).
fn rt(s: &mut Fields, cpus: u8) -> Result<(Option<RtBudget>, Vec<Option<RtBudget>>), FileError> {
    match s.take("rt") {
        None => Ok((None, Vec::new())),
        Some(Value::Array(items)) => {
            if items.len() > usize::from(cpus) {
                return Err(s.error("rt", format!("{} entries for {cpus} vCPU(s)", items.len())));
            }
            let each = items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(t) if t == NO_RT => Ok(None),
                    other => budget(other)
                        .map(Some)
                        .map_err(|e| s.item_error("rt", i, e)),
                })
                .collect::<Result<_, _>>()?;
            Ok((None, each))
        }
        Some(other) => Ok((
            Some(budget(&other).map_err(|e| s.error("rt", e))?),
            Vec::new(),
        )),
    }
}

fn budget(value: &Value) -> Result<RtBudget, String> {
    match value {
        Value::Table(t) => {
            if let Some(key) = t.keys().find(|k| *k != "budget" && *k != "period") {
                return Err(format!("unknown field '{key}' (known: budget, period)"));
            }
            let field = |k: &str| match t.get(k) {
                Some(Value::String(text)) => sched::parse_duration(text).map_err(|e| e.to_string()),
                Some(other) => Err(format!(
                    "{k}: expected a duration like \"2ms\", found {}",
                    kind(other)
                )),
                None => Err(format!("{k} is missing")),
            };
            RtBudget::new(field("budget")?, field("period")?).map_err(|e| e.to_string())
        }
        Value::String(text) => text.parse().map_err(|e: sched::SchedError| e.to_string()),
        other => Err(format!(
            "expected {{ budget = \"2ms\", period = \"10ms\" }}, found {}",
            kind(other)
        )),
    }
}

fn duration(f: &Fields, key: &str, text: &str) -> Result<u64, FileError> {
    sched::parse_duration(text).map_err(|e| f.error(key, e.to_string()))
}

fn partition(mut p: Fields) -> Result<Partition, FileError> {
    let frame_text = p.required_string("frame")?;
    let frame = duration(&p, "frame", &frame_text)?;
    let epoch = match p.integer("epoch")? {
        None => None,
        Some(n) => Some(
            u64::try_from(n)
                .map_err(|_| p.error("epoch", format!("{n} is not a CLOCK_MONOTONIC time")))?,
        ),
    };
    let mut windows = Vec::new();
    for mut w in p.tables("windows")? {
        let start = w.required_string("start")?;
        let length = w.required_string("length")?;
        windows.push(Window {
            start_ns: duration(&w, "start", &start)?,
            length_ns: duration(&w, "length", &length)?,
        });
        w.finish()?;
    }
    let partition =
        Partition::new(frame, windows, epoch).map_err(|e| p.error("windows", e.to_string()))?;
    p.finish()?;
    Ok(partition)
}

fn budget_text(rt: &RtBudget) -> String {
    format!(
        "{{ budget = \"{}\", period = \"{}\" }}",
        sched::format_duration(rt.budget_ns),
        sched::format_duration(rt.period_ns)
    )
}

/// Writes the `[sched]` table back (nothing when the guest declares none),
/// so that it reads back to the same value.
pub(crate) fn write_sched(out: &mut String, config: &SchedConfig, prefix: &str) {
    use std::fmt::Write as _;
    if *config == SchedConfig::default() {
        return;
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, "\n[{prefix}sched]");
    if let Some(w) = config.weight {
        let _ = writeln!(out, "weight = {w}");
    }
    if let Some(c) = config.cap {
        let _ = writeln!(out, "cap = {c}");
    }
    if let Some(rt) = &config.rt {
        let _ = writeln!(out, "rt = {}", budget_text(rt));
    } else if !config.vcpu_rt.is_empty() {
        let each: Vec<String> = config
            .vcpu_rt
            .iter()
            .map(|r| {
                r.as_ref()
                    .map_or_else(|| format!("\"{NO_RT}\""), budget_text)
            })
            .collect();
        let _ = writeln!(out, "rt = [{}]", each.join(", "));
    }
    if let Some(p) = config.priority {
        let _ = writeln!(
            out,
            "priority = {}\npolicy = \"{}\"",
            p.level,
            p.class.name()
        );
    }
    if config.locked {
        let _ = writeln!(out, "locked = true");
    }
    if let Some(limit) = config.memory_limit {
        let _ = writeln!(out, "memory_limit = \"{}K\"", limit >> 10);
    }
    if let Some(pool) = &config.pool {
        let _ = writeln!(out, "pool = \"{pool}\"");
    }
    if !config.cpus.is_empty() {
        let _ = writeln!(
            out,
            "cpus = \"{}\"",
            vmm::config::format_cpu_list(&config.cpus)
        );
    }
    if let Some(p) = &config.partition {
        let _ = writeln!(out, "\n[{prefix}sched.partition]");
        let _ = writeln!(out, "frame = \"{}\"", sched::format_duration(p.frame_ns));
        if let Some(epoch) = p.epoch_ns {
            let _ = writeln!(out, "epoch = {epoch}");
        }
        let windows: Vec<String> = p
            .windows
            .iter()
            .map(|w| {
                format!(
                    "{{ start = \"{}\", length = \"{}\" }}",
                    sched::format_duration(w.start_ns),
                    sched::format_duration(w.length_ns)
                )
            })
            .collect();
        let _ = writeln!(out, "windows = [{}]", windows.join(", "));
    }
}
