//! CPU pools in a system file, in the manner of Xen's cpupools: each pool
//! is a set of host CPUs with one scheduling policy, and guests are put in
//! it.
//!
//! ```toml
//! [pools.general]
//! cpus = "0"
//! policy = "credit"      # weights and caps (the fair class)
//!
//! [pools.control]
//! cpus = "1"
//! policy = "partition"   # time windows in one major frame
//! frame = "20ms"
//!
//! [guests.web]
//! kernel = "vmlinuz"
//! [guests.web.sched]
//! pool = "general"
//! ```
//!
//! Policies: `credit` (members may set weight and cap, nothing real-time),
//! `rt` (every member sets `priority`: SCHED_FIFO or SCHED_RR; deadline
//! reservations are refused in any pool, because the kernel admits a
//! deadline thread only on every CPU of its root domain), `partition` (every member
//! declares `[sched.partition]` windows in the pool's frame; no two
//! members' windows overlap; all share one epoch), `null` (Xen's null
//! scheduler: every vCPU of every member gets a host CPU of its own).
//! Pools may not share CPUs. A member's `[sched]` gets the pool's CPUs as
//! its cpuset (`cpus`), and with `null` its vCPUs' affinity.

use vmm::config::parse_cpu_list;
use vmm::gate::Window;
use vmm::sched::format_duration;

use crate::fields::Fields;
use crate::system::SystemGuest;
use crate::FileError;

/// A pool's one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolPolicy {
    Credit,
    Rt,
    Partition,
    Null,
}

impl PoolPolicy {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "credit" => Some(Self::Credit),
            "rt" => Some(Self::Rt),
            "partition" => Some(Self::Partition),
            "null" => Some(Self::Null),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Credit => "credit",
            Self::Rt => "rt",
            Self::Partition => "partition",
            Self::Null => "null",
        }
    }
}

/// One pool of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub cpus: Vec<usize>,
    pub policy: PoolPolicy,
    /// The major frame of a `partition` pool.
    pub frame_ns: Option<u64>,
}

/// Reads the `[pools]` table.
pub(crate) fn pools(table: Option<Fields>, origin: &str) -> Result<Vec<Pool>, FileError> {
    let Some(mut table) = table else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Pool> = Vec::new();
    for name in table.remaining_keys() {
        let mut p = table.named_table(&name)?;
        if crate::check_guest_name(&name).is_err() {
            return Err(FileError::Field {
                origin: origin.to_string(),
                field: format!("pools.{name}"),
                problem: "is not a pool name (1 to 32 characters: a-z, 0-9 and -)".into(),
            });
        }
        let cpus_text = p.required_string("cpus")?;
        let cpus = parse_cpu_list(&cpus_text).map_err(|e| p.error("cpus", e.to_string()))?;
        let policy_text = p.required_string("policy")?;
        let policy = PoolPolicy::parse(&policy_text).ok_or_else(|| {
            p.error(
                "policy",
                format!("'{policy_text}' is not credit, rt, partition or null"),
            )
        })?;
        let frame_ns = match p.string("frame")? {
            None if policy == PoolPolicy::Partition => {
                return Err(p.error("frame", "is required in a partition pool"))
            }
            None => None,
            Some(_) if policy != PoolPolicy::Partition => {
                return Err(p.error("frame", "only a partition pool has a frame"))
            }
            Some(text) => Some(
                vmm::sched::parse_duration(&text).map_err(|e| p.error("frame", e.to_string()))?,
            ),
        };
        if let Some(other) = out.iter().find(|o| o.cpus.iter().any(|c| cpus.contains(c))) {
            return Err(p.error("cpus", format!("shares CPUs with pool '{}'", other.name)));
        }
        p.finish()?;
        out.push(Pool {
            name,
            cpus,
            policy,
            frame_ns,
        });
    }
    Ok(out)
}

fn field_error(origin: &str, guest: &str, field: &str, problem: String) -> FileError {
    FileError::Field {
        origin: origin.to_string(),
        field: format!("guests.{guest}.sched.{field}"),
        problem,
    }
}

/// Puts each guest that names a pool in it: checks the pool's policy and
/// gives the guest the pool's CPUs (and, for `null`, a CPU per vCPU).
pub(crate) fn place(
    pools: &[Pool],
    guests: &mut [SystemGuest],
    origin: &str,
) -> Result<(), FileError> {
    let mut taken_cpus: Vec<(usize, String)> = Vec::new();
    let mut windows: Vec<(Window, String, String)> = Vec::new();
    for guest in guests.iter_mut() {
        let Some(name) = guest.config.sched.pool.clone() else {
            continue;
        };
        let fail = |field: &str, problem: String| field_error(origin, &guest.name, field, problem);
        let pool = pools
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| fail("pool", format!("no pool named '{name}' in [pools]")))?;
        let sched = &mut guest.config.sched;
        if sched.rt.is_some() || sched.vcpu_rt.iter().any(Option::is_some) {
            return Err(fail(
                "rt",
                "a deadline reservation cannot be in a pool: the kernel admits deadline threads only on all the CPUs of their root domain; use priority in an rt pool".into(),
            ));
        }
        let real_time = sched.is_real_time() || sched.partition.is_some();
        match pool.policy {
            PoolPolicy::Credit if real_time => {
                return Err(fail(
                    "pool",
                    format!(
                    "'{name}' is a credit pool: rt, priority and partition are not allowed in it"
                ),
                ))
            }
            PoolPolicy::Rt if !sched.is_real_time() => {
                return Err(fail(
                    "pool",
                    format!("'{name}' is an rt pool: set priority"),
                ))
            }
            PoolPolicy::Partition => {
                let Some(p) = sched.partition.as_mut() else {
                    return Err(fail(
                        "pool",
                        format!("'{name}' is a partition pool: declare [sched.partition] windows"),
                    ));
                };
                let frame = pool.frame_ns.unwrap_or(p.frame_ns);
                if p.frame_ns != frame {
                    return Err(fail(
                        "partition.frame",
                        format!(
                            "{} is not pool '{name}''s frame {}",
                            format_duration(p.frame_ns),
                            format_duration(frame)
                        ),
                    ));
                }
                // One epoch for the whole pool: CLOCK_MONOTONIC's zero.
                p.epoch_ns = Some(p.epoch_ns.unwrap_or(0));
                for w in &p.windows {
                    let clash = windows.iter().find(|(o, pool_name, _)| {
                        *pool_name == name
                            && w.start_ns < o.start_ns + o.length_ns
                            && o.start_ns < w.start_ns + w.length_ns
                    });
                    if let Some((_, _, owner)) = clash {
                        return Err(fail(
                            "partition.windows",
                            format!("overlaps a window of guest '{owner}' in pool '{name}'"),
                        ));
                    }
                    windows.push((*w, name.clone(), guest.name.clone()));
                }
            }
            PoolPolicy::Null => {
                let mut mine = Vec::new();
                for cpu in &pool.cpus {
                    if mine.len() < usize::from(guest.config.cpus)
                        && !taken_cpus.iter().any(|(c, _)| c == cpu)
                    {
                        mine.push(*cpu);
                    }
                }
                if mine.len() < usize::from(guest.config.cpus) {
                    return Err(fail(
                        "pool",
                        format!(
                            "null pool '{name}' has no free CPU left for each of its {} vCPU(s)",
                            guest.config.cpus
                        ),
                    ));
                }
                for cpu in &mine {
                    taken_cpus.push((*cpu, guest.name.clone()));
                }
                guest.config.affinity = mine.iter().map(|c| vec![*c]).collect();
            }
            _ => {}
        }
        guest.config.sched.cpus = pool.cpus.clone();
    }
    Ok(())
}
