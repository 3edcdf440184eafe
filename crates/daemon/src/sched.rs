//! Scheduling under the daemon: each guest's cgroup, real-time admission
//! control, and policy changes of running guests.
//!
//! - **The group.** Before a guest's VMM is spawned, the daemon creates the
//!   guest's group (`<the daemon's cgroup>/ferrovisor/<guest>/`, crate
//!   `cgroup`) and writes the group half of its `[sched]` policy (weight,
//!   cap, memory limit, real-time runtime). The VMM is placed in it between
//!   fork and exec, so no thread of it ever runs outside. The group is
//!   removed after the VMM is reaped and when the guest is deleted, and
//!   written again when a restarted daemon re-adopts a running guest.
//! - **Thread policy** (`rt`, `priority`) is applied by the VMM to its own
//!   vCPU threads from the description; after a re-adoption or a change the
//!   daemon sends it on the control socket (`{"op":"sched",...}`).
//! - **Admission control.** SCHED_DEADLINE reservations of all running
//!   guests must fit in the host's real-time capacity (its CPUs times the
//!   kernel's `sched_rt_runtime_us / sched_rt_period_us`); a start or change
//!   that would exceed it is refused in one line naming every guest and its
//!   utilization, and nothing changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cgroup::{GuestCgroup, Hierarchy};
use serde_json::{json, Map, Value};
use vmm::sched::{RtBudget, SchedConfig};

use crate::process;

/// Real-time runtime per second given to a guest whose vCPUs use
/// SCHED_FIFO/RR, when it declares no cap: half of each CPU.
pub const DEFAULT_RT_RUNTIME_US: u64 = 500_000;
/// Real-time runtime per second for a time partition's gate thread alone.
pub const GATE_RT_RUNTIME_US: u64 = 50_000;
/// How long a policy request to a VMM may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// In a guest's directory: the changes made to its running VMM, applied
/// again when a restarted daemon re-adopts it, dropped when it stops.
pub const CHANGES: &str = "sched-changes.json";

/// The daemon's hierarchy, read once, in the daemon (the creator of every
/// guest group), before any process is placed.
fn hierarchy() -> Option<&'static Hierarchy> {
    static HIERARCHY: OnceLock<Option<Hierarchy>> = OnceLock::new();
    HIERARCHY
        .get_or_init(|| {
            let hierarchy = Hierarchy::detect().ok()?;
            hierarchy.reclaim_rt_runtime();
            Some(hierarchy)
        })
        .as_ref()
}

/// Applies the group half of `sched` to `group` (created if needed).
pub fn apply_group_policy(group: &GuestCgroup, sched: &SchedConfig) -> cgroup::Result<()> {
    group.create()?;
    if let Some(w) = sched.weight {
        group.set_cpu_weight(w)?;
    }
    group.set_cpu_cap(sched.cap)?;
    if sched.memory_limit.is_some() {
        group.set_memory_limit(sched.memory_limit)?;
    }
    if !sched.cpus.is_empty() {
        group.set_cpus(&vmm::config::format_cpu_list(&sched.cpus))?;
    }
    if sched.priority.is_some() {
        let runtime = sched
            .cap
            .map_or(DEFAULT_RT_RUNTIME_US, |c| u64::from(c.min(100)) * 10_000);
        group.grant_rt_runtime(runtime)?;
    } else if sched.partition.is_some() {
        group.grant_rt_runtime(GATE_RT_RUNTIME_US)?;
    }
    Ok(())
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The running guests' deadline reservations, in CPUs, and each one's text.
fn reserved() -> std::sync::MutexGuard<'static, BTreeMap<String, (f64, String)>> {
    static RESERVED: OnceLock<Mutex<BTreeMap<String, (f64, String)>>> = OnceLock::new();
    RESERVED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The host's real-time capacity left for deadline reservations, in CPUs:
/// its CPUs times the kernel's real-time share, less what real-time guest
/// groups hold (the kernel counts both against the same bandwidth).
pub fn capacity() -> f64 {
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let runtime = read("/proc/sys/kernel/sched_rt_runtime_us").unwrap_or(950_000.0);
    let period = read("/proc/sys/kernel/sched_rt_period_us").unwrap_or(1_000_000.0);
    let ratio = if runtime < 0.0 { 1.0 } else { runtime / period };
    let groups = hierarchy().map_or(0, Hierarchy::guests_rt_runtime_us) as f64 / period;
    vmm::vcpu::available_host_cpus().len() as f64 * (ratio - groups).max(0.0)
}

/// The reservation of a guest with `cpus` vCPUs under `sched`, in CPUs,
/// with a short description.
fn reservation(sched: &SchedConfig, cpus: usize) -> (f64, String) {
    let total = sched.reserved_cpus(cpus);
    let each: Vec<String> = (0..cpus)
        .filter_map(|i| match sched.thread_policy(i) {
            vmm::sched::ThreadPolicy::Deadline(rt) => Some(budget_text(&rt)),
            _ => None,
        })
        .collect();
    (total, each.join("+"))
}

fn budget_text(rt: &RtBudget) -> String {
    format!(
        "{}/{}",
        vmm::sched::format_duration(rt.budget_ns),
        vmm::sched::format_duration(rt.period_ns)
    )
}

/// Admits guest `name` with reservation `want` (CPUs), or says why not in
/// one line naming every guest and its utilization. Admitted, it is recorded.
fn admit(name: &str, want: (f64, String)) -> Result<(), String> {
    let mut all = reserved();
    let capacity = capacity();
    let others: f64 = all
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .map(|(_, (u, _))| u)
        .sum();
    if want.0 > 0.0 && others + want.0 > capacity + 1e-9 {
        let mut parts: Vec<String> = all
            .iter()
            .filter(|(n, (u, _))| n.as_str() != name && *u > 0.0)
            .map(|(n, (u, text))| format!("{n} {u:.2} ({text})"))
            .collect();
        parts.push(format!("{name} {:.2} ({})", want.0, want.1));
        return Err(format!(
            "rt: refused: real-time reservations would total {:.2} CPUs, more than the {capacity:.2} this host admits: {}",
            others + want.0,
            parts.join(", ")
        ));
    }
    if want.0 > 0.0 {
        all.insert(name.to_string(), want);
    } else {
        all.remove(name);
    }
    Ok(())
}

fn parse(description: &str) -> Result<vmm::VmConfig, String> {
    config::parse_guest(description, "config", Path::new("/")).map_err(|e| e.to_string())
}

/// Before guest `name`'s VMM is spawned: admits its reservations and
/// creates its group with its policy. Returns the `cgroup.procs` files the
/// new process must write itself into.
pub fn prepare(name: &str, description: &str) -> Result<Vec<PathBuf>, String> {
    let config = parse(description)?;
    admit(name, reservation(&config.sched, usize::from(config.cpus)))?;
    crate::pools::set_pins(name, crate::pools::pins_of_affinity(&config.affinity));
    crate::pools::set_windows(
        name,
        pool_windows(&config.sched.pool, config.sched.partition.as_ref()),
    );
    let placed = (|| -> cgroup::Result<Vec<PathBuf>> {
        let Some(hierarchy) = hierarchy() else {
            return Ok(Vec::new());
        };
        let group = hierarchy.guest(name)?;
        apply_group_policy(&group, &config.sched)?;
        Ok(group
            .paths()
            .into_iter()
            .map(|(_, _, dir)| dir.join("cgroup.procs"))
            .collect())
    })();
    placed.or_else(|e| {
        if config.sched.needs_cgroup() {
            reserved().remove(name);
            Err(format!(
                "sched: cannot set up the guest's cgroup: {}",
                chain(&e)
            ))
        } else {
            Ok(Vec::new())
        }
    })
}

/// After guest `name`'s VMM is gone: forgets its reservations and run-time
/// changes (kept in `dir`) and removes its group.
pub fn release(name: &str, dir: &Path) {
    reserved().remove(name);
    crate::pools::set_pins(name, Vec::new());
    crate::pools::set_windows(name, None);
    let _ = std::fs::remove_file(dir.join(CHANGES));
    if let Some(group) = hierarchy().and_then(|h| h.guest(name).ok()) {
        // A v1 group may be busy for a moment after its last task is reaped.
        for _ in 0..50 {
            if group.remove().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// After a restarted daemon re-adopts running guest `name` (directory
/// `dir`): its reservations count again, and its group and its vCPU threads
/// get its policy again: the description's, then the changes made while it
/// ran.
pub fn readopt(name: &str, description: &str, dir: &Path, runtime: &Path) {
    let Ok(config) = parse(description) else {
        return;
    };
    let cpus = usize::from(config.cpus);
    let mut want = reservation(&config.sched, cpus);
    if let Some(group) = hierarchy().and_then(|h| h.guest(name).ok()) {
        let _ = apply_group_policy(&group, &config.sched);
    }
    let mut request = thread_request(&config.sched);
    let mut changes = kept_changes(dir);
    // Where the last move put the guest: its pool's CPUs, its vCPUs'
    // affinity and its windows, sent to the VMM beside its class.
    let mut placement = Map::new();
    let moved_to = changes
        .remove("pool")
        .and_then(|p| p.as_str().map(str::to_string));
    if let Some(cpus) = changes.remove(POOL_CPUS) {
        if let Some(cpus) = cpus
            .as_str()
            .and_then(|c| vmm::config::parse_cpu_list(c).ok())
        {
            let _ = set_pool_cpus(name, &cpus);
            placement.insert("affinity".into(), json!(cpus));
        }
    }
    let mut pins = crate::pools::pins_of_affinity(&config.affinity);
    if let Some(kept) = changes.remove(PINS) {
        pins = kept
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_u64())
                    .map(|c| c as usize)
                    .collect()
            })
            .unwrap_or_default();
        if !pins.is_empty() {
            let per_vcpu: Vec<Value> = pins.iter().map(|c| json!([c])).collect();
            placement.insert("affinity".into(), per_vcpu.into());
        }
    }
    crate::pools::set_pins(name, pins);
    let mut windows = pool_windows(&config.sched.pool, config.sched.partition.as_ref());
    if let Some(kept) = changes.remove(PARTITION) {
        let partition = vmm::sched::partition_of(&kept).ok().flatten();
        windows = moved_to.zip(partition.map(|p| p.windows));
        placement.insert(PARTITION.into(), kept);
    }
    crate::pools::set_windows(name, windows);
    if let Ok(change) = parse_change(&changes) {
        let _ = change_group(name, &change);
        if !change.thread.is_empty() {
            request = change.thread.clone();
            want = thread_reservation(&change, cpus).unwrap_or(want);
        }
    }
    request.extend(placement);
    if want.0 > 0.0 {
        reserved().insert(name.to_string(), want);
    }
    if !request.is_empty() {
        request.insert("op".into(), "sched".into());
        let _ = process::control(runtime, &Value::Object(request), CONTROL_TIMEOUT);
    }
}

/// The reservation a change's thread fields ask for: `None` when they
/// leave the class alone.
fn thread_reservation(change: &Change, cpus: usize) -> Option<(f64, String)> {
    if let Some(rt) = change.thread.get("rt") {
        let rt = vmm::sched::rt_of(rt).ok()?;
        let new = SchedConfig {
            rt: Some(rt),
            ..SchedConfig::default()
        };
        return Some(reservation(&new, cpus));
    }
    let leaves_deadline = ["priority", "fair"]
        .iter()
        .any(|k| change.thread.contains_key(*k));
    leaves_deadline.then(|| (0.0, String::new()))
}

/// The control-socket fields that give every vCPU thread `sched`'s class.
fn thread_request(sched: &SchedConfig) -> Map<String, Value> {
    let mut map = Map::new();
    if let Some(rt) = sched.rt {
        map.insert("rt".into(), budget_text(&rt).into());
    } else if let Some(p) = sched.priority {
        map.insert("priority".into(), p.level.into());
        map.insert("policy".into(), p.class.name().into());
    }
    map
}

/// A change asked for on `POST /guests/NAME/sched`.
#[derive(Debug, Default, PartialEq)]
pub struct Change {
    pub weight: Option<u32>,
    /// `Some(None)` lifts the cap.
    pub cap: Option<Option<u32>>,
    /// What goes to the VMM's control socket (`rt`, `priority`, `policy`, `fair`).
    pub thread: Map<String, Value>,
    /// The pool to move into.
    pub pool: Option<String>,
    /// The guest's windows in the frame of the partition pool it moves into.
    pub windows: Option<Vec<vmm::gate::Window>>,
}

/// In the kept changes: the CPUs of the pool the guest moved into (a
/// restarted daemon may not know the pool yet).
const POOL_CPUS: &str = "pool_cpus";
/// In the kept changes: the host CPU each vCPU was pinned to by a move into
/// a `null` pool (empty after a move out of one).
const PINS: &str = "pins";

/// The fields `POST /guests/NAME/sched` takes.
pub const FIELDS: &str = "weight, cap, rt, priority, policy, fair, pool, windows";
/// In the kept changes: the partition a move gave the guest (`null`: a
/// move ended its windows).
const PARTITION: &str = "partition";

/// Parses the body: every error names its field.
pub fn parse_change(body: &Map<String, Value>) -> Result<Change, String> {
    if let Some(key) = body
        .keys()
        .find(|k| !FIELDS.split(", ").any(|f| f == k.as_str()))
    {
        return Err(format!("{key}: unknown field (known: {FIELDS})"));
    }
    let mut change = Change::default();
    if let Some(v) = body.get("pool") {
        let name = v
            .as_str()
            .filter(|n| crate::daemon::check_name(n).is_ok())
            .ok_or(format!("pool: {v} is not a pool name"))?;
        change.pool = Some(name.to_string());
    }
    if let Some(v) = body.get("windows") {
        if change.pool.is_none() {
            return Err("windows: only with pool (the partition pool they are in)".into());
        }
        change.windows = Some(vmm::sched::windows_of(v)?);
    }
    if let Some(v) = body.get("weight") {
        let w = v
            .as_u64()
            .filter(|w| (1..=10_000).contains(w))
            .ok_or(format!("weight: {v} is not a weight from 1 to 10000"))?;
        change.weight = Some(w as u32);
    }
    if let Some(v) = body.get("cap") {
        change.cap = Some(match v {
            Value::Null => None,
            _ => Some(
                v.as_u64()
                    .filter(|c| (1..=u64::from(cgroup::MAX_CAP_PERCENT)).contains(c))
                    .ok_or(format!(
                        "cap: {v} is not a per cent from 1 to {} (or null for none)",
                        cgroup::MAX_CAP_PERCENT
                    ))? as u32,
            ),
        });
    }
    for key in ["rt", "priority", "policy", "fair"] {
        if let Some(v) = body.get(key) {
            change.thread.insert(key.into(), v.clone());
        }
    }
    if let Some(rt) = body.get("rt") {
        vmm::sched::rt_of(rt).map_err(|e| format!("rt: {e}"))?;
    }
    if body.is_empty() {
        return Err(format!("body: no change given (fields: {FIELDS})"));
    }
    Ok(change)
}

/// Applies `change` to running guest `name` (description `description`,
/// VMM runtime directory `runtime`): admission first, then the group, then
/// the threads. A refusal at any step puts back what was already changed.
pub fn apply_change(
    name: &str,
    description: &str,
    (dir, runtime): (&Path, &Path),
    change: &Change,
) -> Result<(), String> {
    let config = parse(description)?;
    let cpus = usize::from(config.cpus);
    let class = class_after(&config.sched, dir, change);
    let target = match &change.pool {
        Some(pool) => {
            let current = current_partition(&config, dir);
            let mover = crate::pools::Mover {
                name,
                vcpus: cpus,
                class,
                windows: change.windows.as_deref(),
                current: current.as_ref(),
            };
            Some(crate::pools::plan_move(pool, mover)?)
        }
        None => None,
    };
    let pinned_before = crate::pools::pins_of(name);
    let before = reserved().get(name).cloned();
    if let Some(want) = thread_reservation(change, cpus) {
        admit(name, want)?;
    }
    let undo_admission = || {
        let mut all = reserved();
        match &before {
            Some(b) => all.insert(name.to_string(), b.clone()),
            None => all.remove(name),
        };
    };
    if let Err(e) = change_group(name, change) {
        undo_admission();
        return Err(e);
    }
    let mut request = change.thread.clone();
    if let Some(target) = &target {
        let fixed = class == crate::pools::Class::Fixed;
        if let Err(e) = enter_pool(name, target, fixed, &mut request) {
            undo_admission();
            return Err(e);
        }
    }
    if !request.is_empty() {
        request.insert("op".into(), "sched".into());
        if let Err(e) = process::control(runtime, &Value::Object(request), CONTROL_TIMEOUT) {
            undo_admission();
            if target.is_some() {
                // Back to the old pool's CPUs, as far as the group knows them.
                restore_cpus(name, (dir, runtime), &config, pinned_before.as_deref());
            }
            return Err(match e {
                process::ProcessError::Refused(why) => why,
                other => format!("the guest's VMM did not take the change: {}", chain(&other)),
            });
        }
    }
    if let (Some(target), Some(pool)) = (&target, &change.pool) {
        crate::pools::set_pins(name, target.pins.clone().unwrap_or_default());
        let windows = target
            .partition
            .as_ref()
            .map(|p| (pool.clone(), p.windows.clone()));
        crate::pools::set_windows(name, windows);
    }
    remember(dir, change, target.as_ref());
    Ok(())
}

/// Puts guest `name`'s group on the CPUs of the pool it moves into, and
/// adds to its VMM `request` where its vCPUs go there: their affinity (a
/// CPU each in a null pool, else the whole pool, which also unpins a guest
/// leaving a null pool) and its partition (none outside a partition pool).
fn enter_pool(
    name: &str,
    target: &crate::pools::Move,
    fixed_priority: bool,
    request: &mut Map<String, Value>,
) -> Result<(), String> {
    set_pool_cpus(name, &target.cpus)?;
    let affinity = match &target.pins {
        Some(pins) => pins.iter().map(|c| json!([c])).collect(),
        None => json!(target.cpus),
    };
    request.insert("affinity".into(), affinity);
    let partition = target.partition.as_ref();
    request.insert(
        PARTITION.into(),
        partition.map_or(Value::Null, vmm::sched::partition_value),
    );
    if partition.is_some() && !fixed_priority {
        // The gate thread's runtime where it falls back to SCHED_FIFO (as a
        // partitioned guest gets at start); a guest at a fixed priority
        // has more already.
        if let Some(group) = hierarchy().and_then(|h| h.guest(name).ok()) {
            let _ = group.grant_rt_runtime(GATE_RT_RUNTIME_US);
        }
    }
    Ok(())
}

/// After a refused move: the group's CPUs as before it (the last move's
/// pool, else the description's), and the vCPUs' pins if they had some
/// (a cpuset change resets its threads' affinity).
fn restore_cpus(
    name: &str,
    (dir, runtime): (&Path, &Path),
    config: &vmm::VmConfig,
    pins: Option<&[usize]>,
) {
    let kept = kept_changes(dir);
    let cpus = kept
        .get(POOL_CPUS)
        .and_then(Value::as_str)
        .and_then(|c| vmm::config::parse_cpu_list(c).ok())
        .unwrap_or_else(|| config.sched.cpus.clone());
    if cpus.is_empty() || set_pool_cpus(name, &cpus).is_err() {
        return;
    }
    if let Some(pins) = pins {
        let affinity: Vec<Value> = pins.iter().map(|c| json!([c])).collect();
        let request = json!({ "op": "sched", "affinity": affinity });
        let _ = process::control(runtime, &request, CONTROL_TIMEOUT);
    }
}

/// The class the guest's vCPUs will be in once `change` is made: the
/// change's, else the last change's kept in `dir`, else the description's.
fn class_after(sched: &SchedConfig, dir: &Path, change: &Change) -> crate::pools::Class {
    use crate::pools::Class;
    let of = |thread: &Map<String, Value>| -> Option<Class> {
        if thread.contains_key("rt") {
            Some(Class::Deadline)
        } else if thread.contains_key("priority") {
            Some(Class::Fixed)
        } else if thread.contains_key("fair") {
            Some(Class::Fair)
        } else {
            None
        }
    };
    let kept = kept_changes(dir);
    of(&change.thread).or_else(|| of(&kept)).unwrap_or(
        if sched.rt.is_some() || sched.vcpu_rt.iter().any(Option::is_some) {
            Class::Deadline
        } else if sched.priority.is_some() {
            Class::Fixed
        } else {
            Class::Fair
        },
    )
}

/// Gives guest `name`'s group the CPUs of the pool it moves into.
fn set_pool_cpus(name: &str, cpus: &[usize]) -> Result<(), String> {
    let group = hierarchy()
        .and_then(|h| h.guest(name).ok())
        .ok_or("pool: this host has no cpuset cgroup controller")?;
    group
        .set_cpus(&vmm::config::format_cpu_list(cpus))
        .map_err(|e| format!("pool: {}", chain(&e)))
}

/// The windows a guest owns in its pool, when it is partitioned in one.
fn pool_windows(
    pool: &Option<String>,
    partition: Option<&vmm::gate::Partition>,
) -> Option<(String, Vec<vmm::gate::Window>)> {
    Some((pool.clone()?, partition?.windows.clone()))
}

/// The partition guest (description `config`, directory `dir`) runs under
/// now: the last move's, else its description's.
fn current_partition(config: &vmm::VmConfig, dir: &Path) -> Option<vmm::gate::Partition> {
    match kept_changes(dir).get(PARTITION) {
        Some(kept) => vmm::sched::partition_of(kept).ok().flatten(),
        None => config.sched.partition.clone(),
    }
}

/// The changes kept in guest directory `dir` (none when there are none).
fn kept_changes(dir: &Path) -> Map<String, Value> {
    std::fs::read(dir.join(CHANGES))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Adds `change` (and the CPUs of the pool it moved into) to the changes
/// kept for a re-adoption.
fn remember(dir: &Path, change: &Change, target: Option<&crate::pools::Move>) {
    let path = dir.join(CHANGES);
    let mut kept = kept_changes(dir);
    if let Some(w) = change.weight {
        kept.insert("weight".into(), w.into());
    }
    if let Some(cap) = change.cap {
        kept.insert("cap".into(), cap.map_or(Value::Null, Value::from));
    }
    if !change.thread.is_empty() {
        for key in ["rt", "priority", "policy", "fair"] {
            kept.remove(key);
        }
        kept.extend(change.thread.clone());
    }
    if let (Some(pool), Some(target)) = (&change.pool, target) {
        kept.insert("pool".into(), pool.clone().into());
        kept.insert(
            POOL_CPUS.into(),
            vmm::config::format_cpu_list(&target.cpus).into(),
        );
        kept.insert(PINS.into(), json!(target.pins.clone().unwrap_or_default()));
        kept.insert(
            PARTITION.into(),
            target
                .partition
                .as_ref()
                .map_or(Value::Null, vmm::sched::partition_value),
        );
    }
    let _ = std::fs::write(&path, Value::Object(kept).to_string());
}

/// Writes weight and cap to the guest's group, and gives it real-time
/// runtime when its threads move to SCHED_FIFO/RR.
fn change_group(name: &str, change: &Change) -> Result<(), String> {
    let fixed = change.thread.contains_key("priority");
    if change.weight.is_none() && change.cap.is_none() && !fixed {
        return Ok(());
    }
    let Some(group) = hierarchy().and_then(|h| h.guest(name).ok()) else {
        return if fixed {
            Ok(())
        } else {
            Err("weight: this host has no cpu cgroup controller".into())
        };
    };
    if fixed {
        let cap = change.cap.flatten();
        let runtime = cap.map_or(DEFAULT_RT_RUNTIME_US, |c| u64::from(c.min(100)) * 10_000);
        group
            .grant_rt_runtime(runtime)
            .map_err(|e| format!("priority: {}", chain(&e)))?;
    }
    if let Some(w) = change.weight {
        group
            .set_cpu_weight(w)
            .map_err(|e| format!("weight: {}", chain(&e)))?;
    }
    if let Some(cap) = change.cap {
        group
            .set_cpu_cap(cap)
            .map_err(|e| format!("cap: {}", chain(&e)))?;
    }
    Ok(())
}

/// `POST /guests/NAME/sched`: changes a running guest's policy. 400 for a
/// bad body (naming the field), 404 for no such guest, 409 when the guest
/// is not running or the change is refused (the old policy stays).
pub fn post(daemon: &crate::daemon::Daemon, name: &str, body: &[u8]) -> (u16, Value) {
    let error = |status: u16, message: String| (status, json!({ "error": message }));
    let guest = match daemon.get(name) {
        Ok(g) => g,
        Err(e) => return error(404, crate::description::one_line(&e)),
    };
    let fields: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return error(400, "bad request body: body: not a JSON object".into()),
        Err(e) => return error(400, format!("bad request body: body: not JSON: {e}")),
    };
    let change = match parse_change(&fields) {
        Ok(c) => c,
        Err(e) => return error(400, format!("bad request body: {e}")),
    };
    let _op = guest.begin();
    let state = guest.record().state;
    if !state.is_live() {
        return error(
            409,
            format!("guest '{name}' is {state}; cannot change its scheduling"),
        );
    }
    match apply_change(
        name,
        &guest.description,
        (&guest.dir, &guest.runtime()),
        &change,
    ) {
        Ok(()) => (200, guest.info(true)),
        Err(e) if e.ends_with("the old policy stays") => error(409, format!("guest '{name}': {e}")),
        Err(e) => error(409, format!("guest '{name}': {e}; the old policy stays")),
    }
}

/// The reservations admitted now, for `info`.
pub fn admitted() -> Value {
    let all = reserved();
    let guests: Map<String, Value> = all
        .iter()
        .map(|(n, (u, text))| (n.clone(), json!({ "cpus": u, "reservation": text })))
        .collect();
    json!({ "capacity_cpus": capacity(), "guests": guests })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_change_body_is_checked_field_by_field() {
        let c = parse_change(&body(r#"{"weight": 400, "cap": null, "rt": "2ms/10ms"}"#)).unwrap();
        assert_eq!(c.weight, Some(400));
        assert_eq!(c.cap, Some(None));
        assert_eq!(c.thread.get("rt"), Some(&json!("2ms/10ms")));
        for (text, prefix) in [
            (r#"{"weight": 0}"#, "weight:"),
            (r#"{"cap": 0}"#, "cap:"),
            (r#"{"cap": "half"}"#, "cap:"),
            (r#"{"rt": "20ms/10ms"}"#, "rt:"),
            (r#"{"shares": 3}"#, "shares: unknown field"),
            (r#"{"pool": 5}"#, "pool:"),
            (r#"{}"#, "body:"),
        ] {
            let err = parse_change(&body(text)).unwrap_err();
            assert!(err.starts_with(prefix), "{text}: {err}");
        }
    }

    #[test]
    fn admission_refuses_an_overcommitted_set_and_names_every_guest() {
        let capacity = capacity();
        let name = format!("adm-{}", std::process::id());
        let other = format!("{name}-other");
        admit(&other, (capacity - 0.1, "big".into())).unwrap();
        let err = admit(&name, (0.5, "2 x 2.5ms/10ms".into())).unwrap_err();
        assert!(
            err.starts_with("rt: refused: real-time reservations would total"),
            "{err}"
        );
        assert!(err.contains(&format!("{other} ")), "{err}");
        assert!(err.contains(&format!("{name} 0.50")), "{err}");
        assert!(
            !reserved().contains_key(&name),
            "a refused guest is not recorded"
        );
        admit(&name, (0.05, "fits".into())).unwrap();
        release(&other, Path::new("/nonexistent"));
        release(&name, Path::new("/nonexistent"));
    }
}
