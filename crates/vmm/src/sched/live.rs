//! The running guest's policy on the control socket: `info` shows what each
//! vCPU thread was promised and what it received; `sched` changes the
//! threads' class, all or nothing.

use serde_json::{json, Map, Value};

use super::{
    apply, overruns, read, thread_cpu_ns, Priority, RtBudget, RtClass, SchedConfig, ThreadPolicy,
};
use crate::control::Control;
use crate::gate::{GateStats, Partition, Window};

/// The fields a `sched` request may carry.
const FIELDS: &str = "rt, priority, policy, fair, affinity, partition";

/// The `sched` object of `info`: the declaration, and per vCPU its thread's
/// policy as the kernel reports it and the CPU time it received; the
/// guest's deadline overruns and misses (per vCPU too).
pub fn info(control: &Control, gate: Option<&GateStats>) -> Map<String, Value> {
    let config = control.sched();
    let uptime_ns = control.start().elapsed().as_nanos() as u64;
    let mut map = Map::new();
    map.insert("weight".into(), config.weight.into());
    map.insert("cap_percent".into(), config.cap.into());
    map.insert("locked".into(), config.locked.into());
    map.insert("uptime_ns".into(), uptime_ns.into());
    map.insert("overruns".into(), overruns().into());
    let partition_share = config.partition.as_ref().map(|p| p.share());
    let vcpus: Vec<Value> = control
        .vcpu_tids()
        .into_iter()
        .enumerate()
        .map(|(index, tid)| {
            let declared = config.thread_policy(index);
            let kernel = (tid > 0).then(|| read(tid).ok()).flatten();
            let (cpu_ns, wait_ns) = thread_cpu_ns(tid).unwrap_or((0, 0));
            let (deadline_checks, deadline_misses) = super::misses::of(index);
            json!({
                "index": index,
                "tid": tid,
                "policy": declared.describe(),
                "kernel_policy": kernel.map(|p| p.describe()),
                "promised_share": promised_share(&config, declared, partition_share),
                "cpu_ns": cpu_ns,
                "wait_ns": wait_ns,
                "deadline_checks": deadline_checks,
                "deadline_misses": deadline_misses,
                "overruns": super::vcpu_overruns(index),
                "affinity": crate::vcpu::thread_cpus(tid)
                    .ok()
                    .filter(|_| tid > 0)
                    .map(|c| crate::config::format_cpu_list(&c)),
            })
        })
        .collect();
    // The guest's total is the sum of the figures shown per vCPU, read once,
    // so the two never disagree while the watcher is counting.
    let misses: u64 = vcpus
        .iter()
        .filter_map(|v| v["deadline_misses"].as_u64())
        .sum();
    map.insert("deadline_misses".into(), misses.into());
    map.insert("vcpus".into(), vcpus.into());
    if let (Some(p), Some(stats)) = (&config.partition, gate) {
        use std::sync::atomic::Ordering::Relaxed;
        let jitter = stats.jitter();
        let vcpu = stats.vcpu_jitter();
        let close = stats.close_latency();
        map.insert(
            "partition".into(),
            json!({
                "frame_ns": p.frame_ns,
                "share": p.share(),
                "windows": stats.windows.load(Relaxed),
                "start_late_p50_ns": jitter.p50_ns,
                "start_late_p99_ns": jitter.p99_ns,
                "start_late_max_ns": jitter.max_ns,
                "vcpu_start_late_p50_ns": vcpu.p50_ns,
                "vcpu_start_late_p99_ns": vcpu.p99_ns,
                "vcpu_start_late_max_ns": vcpu.max_ns,
                "overruns": stats.overruns.load(Relaxed),
                "end_late_p50_ns": close.p50_ns,
                "end_late_p99_ns": close.p99_ns,
                "worst_overrun_ns": stats.worst_overrun_ns.load(Relaxed),
                "closed_progress": stats.closed_progress.load(Relaxed),
                "closed_cpu_ns": stats.closed_cpu_ns.load(Relaxed),
            }),
        );
    }
    map
}

/// The share of one CPU a vCPU is promised, where the policy promises one:
/// its reservation, the partition's share, or at most the cap split evenly.
fn promised_share(
    config: &SchedConfig,
    policy: ThreadPolicy,
    partition: Option<f64>,
) -> Option<f64> {
    if let ThreadPolicy::Deadline(rt) = policy {
        return Some(rt.utilization());
    }
    if let Some(share) = partition {
        return Some(share);
    }
    config.cap.map(|c| f64::from(c) / 100.0)
}

/// Applies a `sched` request (`rt`, or `priority` with `policy`, or
/// `fair: true`; and `affinity`) to every vCPU thread. If any thread
/// refuses, the threads already changed get their old policy back and the
/// error names the field.
pub fn change(control: &Control, request: &Map<String, Value>) -> Result<(), String> {
    let mut request = request.clone();
    let affinity = request
        .remove("affinity")
        .map(|v| affinity_of(&v, control.vcpu_tids().len()))
        .transpose()?;
    let tids = control.vcpu_tids();
    let old = match &affinity {
        Some(affinity) => pin_all(&tids, affinity)?,
        None => Vec::new(),
    };
    if !request.is_empty() {
        if let Err(e) = change_class(control, &request) {
            let _ = pin_all(&tids, &old);
            return Err(e);
        }
    }
    Ok(())
}

/// `affinity`: one list of host CPUs for every vCPU (`[0, 1]`), or a list
/// per vCPU (`[[1], [2]]`), one entry for each.
fn affinity_of(value: &Value, vcpus: usize) -> Result<Vec<Vec<usize>>, String> {
    let cpus = |v: &Value| -> Option<Vec<usize>> {
        let list: Option<Vec<usize>> = v
            .as_array()?
            .iter()
            .map(|c| c.as_u64().map(|c| c as usize))
            .collect();
        list.filter(|l| !l.is_empty() && l.iter().all(|&c| c < crate::config::MAX_HOST_CPUS))
    };
    let per_vcpu = value
        .as_array()
        .filter(|a| a.first().is_some_and(Value::is_array));
    match per_vcpu {
        Some(lists) if lists.len() == vcpus => lists
            .iter()
            .map(|l| cpus(l).ok_or(format!("affinity: {l} is not a list of host CPUs")))
            .collect(),
        Some(lists) => Err(format!(
            "affinity: {} lists for {vcpus} vCPU(s)",
            lists.len()
        )),
        None => cpus(value)
            .map(|l| vec![l; vcpus])
            .ok_or(format!("affinity: {value} is not a list of host CPUs")),
    }
}

/// Pins vCPU thread `tids[i]` to `affinity[i]` and returns each one's old
/// CPUs; if one refuses, the threads already pinned get their old CPUs back.
fn pin_all(tids: &[i32], affinity: &[Vec<usize>]) -> Result<Vec<Vec<usize>>, String> {
    let mut done: Vec<Vec<usize>> = Vec::new();
    for (&tid, cpus) in tids.iter().zip(affinity) {
        let old = crate::vcpu::thread_cpus(tid).unwrap_or_default();
        if tid <= 0 || old.is_empty() {
            done.push(old);
            continue;
        }
        if let Err(e) = crate::vcpu::pin_thread(tid, cpus) {
            for (&t, back) in tids.iter().zip(&done) {
                if t > 0 && !back.is_empty() {
                    let _ = crate::vcpu::pin_thread(t, back);
                }
            }
            return Err(format!(
                "affinity: host CPUs {} refused ({e}); the old affinity stays",
                crate::config::format_cpu_list(cpus)
            ));
        }
        done.push(old);
    }
    Ok(done)
}

/// The class half of [`change`].
fn change_class(control: &Control, request: &Map<String, Value>) -> Result<(), String> {
    let old = control.sched();
    let new = requested(&old, request)?;
    new.check(control.vcpu_tids().len())
        .map_err(|e| e.to_string())?;
    let tids = control.vcpu_tids();
    for (index, &tid) in tids.iter().enumerate() {
        if tid <= 0 {
            continue;
        }
        if let Err(e) = apply(tid, new.thread_policy(index)) {
            for (back, &t) in tids.iter().enumerate().take(index) {
                if t > 0 {
                    let _ = apply(t, old.thread_policy(back));
                }
            }
            let field = if request.contains_key("rt") {
                "rt"
            } else {
                "priority"
            };
            return Err(format!("{field}: {e}; the old policy stays"));
        }
    }
    control.set_sched(new);
    // Each vCPU follows the guest's way of counting overruns at its kick.
    for &tid in &tids {
        crate::vcpu::kick_tid(tid);
    }
    Ok(())
}

/// The policy a request asks for, on top of `old`.
fn requested(old: &SchedConfig, request: &Map<String, Value>) -> Result<SchedConfig, String> {
    if let Some(key) = request
        .keys()
        .find(|k| !FIELDS.split(", ").any(|f| f == *k))
    {
        return Err(format!("unknown field '{key}' (known: {FIELDS})"));
    }
    let mut new = old.clone();
    if request.get("fair") == Some(&Value::Bool(true)) {
        new.rt = None;
        new.vcpu_rt.clear();
        new.priority = None;
    } else if let Some(other) = request.get("fair") {
        return Err(format!("fair: expected true, found {other}"));
    }
    if let Some(rt) = request.get("rt") {
        new.rt = Some(rt_of(rt).map_err(|e| format!("rt: {e}"))?);
        new.vcpu_rt.clear();
        new.priority = None;
    }
    let class = match request.get("policy") {
        None => old.priority.map_or(RtClass::Fifo, |p| p.class),
        Some(Value::String(s)) => s.parse().map_err(|e| format!("policy: {e}"))?,
        Some(other) => {
            return Err(format!(
                "policy: expected \"fifo\" or \"rr\", found {other}"
            ))
        }
    };
    match request.get("priority") {
        None if request.contains_key("policy") => {
            let level = old.priority.map(|p| p.level).ok_or(
                "policy: give a priority with it (no real-time priority is set)".to_string(),
            )?;
            new.priority = Some(Priority { class, level });
        }
        None => {}
        Some(value) => {
            let level = value
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or(format!("priority: expected a number 1-99, found {value}"))?;
            new.priority = Some(Priority::new(class, level).map_err(|e| format!("priority: {e}"))?);
            new.rt = None;
            new.vcpu_rt.clear();
        }
    }
    if request.contains_key("rt") && request.contains_key("priority") {
        return Err("rt: cannot be given with priority".into());
    }
    if let Some(p) = request.get("partition") {
        new.partition = partition_of(p).map_err(|e| format!("partition: {e}"))?;
    }
    Ok(new)
}

/// A duration field: `"5ms"` and the like.
fn duration_of(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::String(s) => super::parse_duration(s).map_err(|e| format!("{what}: {e}")),
        other => Err(format!(
            "{what}: expected a duration like \"5ms\", found {other}"
        )),
    }
}

/// `[{"start": "0ms", "length": "5ms"}, ...]`: windows of a frame.
pub fn windows_of(value: &Value) -> Result<Vec<Window>, String> {
    value
        .as_array()
        .ok_or("windows: expected a list of {\"start\", \"length\"}")?
        .iter()
        .map(|w| {
            Ok(Window {
                start_ns: duration_of(&w["start"], "windows: start")?,
                length_ns: duration_of(&w["length"], "windows: length")?,
            })
        })
        .collect()
}

/// `{"frame": "20ms", "windows": [{"start": "0ms", "length": "5ms"}],
/// "epoch": NS}` (epoch optional: the VMM's start), or `null` for none.
pub fn partition_of(value: &Value) -> Result<Option<Partition>, String> {
    let fields = match value {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => return Err(format!("expected an object or null, found {other}")),
    };
    if let Some(key) = fields
        .keys()
        .find(|k| !["frame", "windows", "epoch"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field '{key}' (known: frame, windows, epoch)"
        ));
    }
    let frame = duration_of(fields.get("frame").unwrap_or(&Value::Null), "frame")?;
    let windows = windows_of(fields.get("windows").unwrap_or(&Value::Null))?;
    let epoch = match fields.get("epoch") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or(format!("epoch: {v} is not nanoseconds"))?),
    };
    Partition::new(frame, windows, epoch)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The form [`partition_of`] reads back.
pub fn partition_value(p: &Partition) -> Value {
    let windows: Vec<Value> = p
        .windows
        .iter()
        .map(|w| {
            json!({
                "start": super::format_duration(w.start_ns),
                "length": super::format_duration(w.length_ns),
            })
        })
        .collect();
    json!({ "frame": super::format_duration(p.frame_ns), "windows": windows, "epoch": p.epoch_ns })
}

/// `"2ms/10ms"`, `"budget=2ms,period=10ms"` or `{"budget":"2ms","period":"10ms"}`.
pub fn rt_of(value: &Value) -> Result<RtBudget, String> {
    match value {
        Value::String(s) => s.parse().map_err(|e: super::SchedError| e.to_string()),
        Value::Object(o) => {
            let field = |k: &str| match o.get(k) {
                Some(Value::String(s)) => super::parse_duration(s).map_err(|e| e.to_string()),
                Some(other) => Err(format!(
                    "{k}: expected a duration like \"2ms\", found {other}"
                )),
                None => Err(format!("{k} is missing")),
            };
            if let Some(key) = o.keys().find(|k| *k != "budget" && *k != "period") {
                return Err(format!("unknown field '{key}' (known: budget, period)"));
            }
            RtBudget::new(field("budget")?, field("period")?).map_err(|e| e.to_string())
        }
        other => Err(format!(
            "expected {{\"budget\": \"2ms\", \"period\": \"10ms\"}}, found {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_request_replaces_the_thread_class() {
        let old = SchedConfig {
            rt: Some("1ms/10ms".parse().unwrap()),
            weight: Some(200),
            ..Default::default()
        };
        let new = requested(&old, &request(r#"{"priority": 10, "policy": "rr"}"#)).unwrap();
        assert_eq!(new.rt, None);
        assert_eq!(
            new.priority,
            Some(Priority {
                class: RtClass::Rr,
                level: 10
            })
        );
        assert_eq!(new.weight, Some(200), "group settings are kept");
        let parted = requested(
            &new,
            &request(r#"{"partition": {"frame": "20ms", "windows": [{"start": "5ms", "length": "5ms"}], "epoch": 0}}"#),
        )
        .unwrap();
        let p = parted.partition.clone().unwrap();
        assert_eq!(
            (p.frame_ns, p.epoch_ns, p.share()),
            (20_000_000, Some(0), 0.25)
        );
        assert_eq!(
            requested(&parted, &request(r#"{"partition": null}"#))
                .unwrap()
                .partition,
            None
        );
        assert_eq!(partition_of(&partition_value(&p)), Ok(Some(p.clone())));
        let fair = requested(&new, &request(r#"{"fair": true}"#)).unwrap();
        assert_eq!(fair.thread_policy(0), ThreadPolicy::Fair);
        let rt = requested(
            &fair,
            &request(r#"{"rt": {"budget": "2ms", "period": "10ms"}}"#),
        )
        .unwrap();
        assert_eq!(rt.rt, Some("2ms/10ms".parse().unwrap()));
    }

    #[test]
    fn bad_requests_name_their_field() {
        let old = SchedConfig::default();
        for (text, prefix) in [
            (r#"{"rt": "3ms/2ms"}"#, "rt:"),
            (r#"{"rt": {"budget": "2ms"}}"#, "rt:"),
            (r#"{"priority": 300}"#, "priority:"),
            (r#"{"priority": "high"}"#, "priority:"),
            (r#"{"policy": "edf"}"#, "policy:"),
            (r#"{"policy": "rr"}"#, "policy:"),
            (r#"{"weight": 5}"#, "unknown field 'weight'"),
            (r#"{"rt": "2ms/10ms", "priority": 5}"#, "rt:"),
            (
                r#"{"partition": {"frame": "20ms", "windows": []}}"#,
                "partition:",
            ),
            (
                r#"{"partition": {"frame": "20ms", "windows": [{"start": "15ms", "length": "10ms"}]}}"#,
                "partition:",
            ),
            (
                r#"{"partition": {"frame": "fast", "windows": []}}"#,
                "partition: frame",
            ),
            (
                r#"{"partition": {"frame": "20ms", "windows": [], "size": 1}}"#,
                "partition: unknown",
            ),
            (r#"{"partition": 5}"#, "partition:"),
        ] {
            let err = requested(&old, &request(text)).unwrap_err();
            assert!(err.starts_with(prefix), "{text}: {err}");
        }
    }

    #[test]
    fn affinity_is_one_list_for_all_vcpus_or_one_per_vcpu() {
        let v = |t: &str| serde_json::from_str::<Value>(t).unwrap();
        assert_eq!(affinity_of(&v("[0, 1]"), 2), Ok(vec![vec![0, 1]; 2]));
        assert_eq!(affinity_of(&v("[[1], [0]]"), 2), Ok(vec![vec![1], vec![0]]));
        for (text, vcpus) in [
            ("[[1]]", 2),
            ("[]", 1),
            ("[\"a\"]", 1),
            ("[[]]", 1),
            ("7", 1),
        ] {
            let err = affinity_of(&v(text), vcpus).unwrap_err();
            assert!(err.starts_with("affinity: "), "{text}: {err}");
        }
    }

    #[test]
    fn promised_share_comes_from_the_strongest_promise() {
        let config = SchedConfig {
            cap: Some(25),
            ..Default::default()
        };
        assert_eq!(
            promised_share(&config, ThreadPolicy::Fair, None),
            Some(0.25)
        );
        assert_eq!(
            promised_share(&config, ThreadPolicy::Fair, Some(0.5)),
            Some(0.5)
        );
        let rt: RtBudget = "2ms/10ms".parse().unwrap();
        assert_eq!(
            promised_share(&config, ThreadPolicy::Deadline(rt), None),
            Some(0.2)
        );
    }
}
