//! CPU pools the daemon knows (a system file's `[pools.NAME]`, defined
//! through `PUT /pools/NAME` by `ferrovisor up`), so that a running guest
//! can be moved into one (`ferrovisor sched NAME --pool P`). A guest's
//! pool at start comes from its description, whose `[sched]` the system
//! file filled in; a move changes its group's cpuset to the new pool's
//! CPUs, and the kernel migrates its threads.
//!
//! A move is taken into a `credit` pool (the guest must be in the fair
//! class), an `rt` pool (it must run at a fixed priority) or a `null` pool
//! (Xen's null scheduler: each vCPU gets a host CPU of the pool that no
//! other guest's vCPU is pinned to, and is pinned there; not for deadline
//! vCPUs). A guest moved out of a `null` pool is unpinned: its vCPUs may
//! run on any CPU of the new pool. A move into a `partition` pool gives
//! the guest windows in the pool's frame (those the request names, else
//! the guest's own if it has some in that frame), counted from the pool's
//! epoch, and none of them may overlap another member's; a move into any
//! other pool ends the guest's windows.
//!
//! The daemon keeps which host CPUs each running guest's vCPUs are pinned
//! to (its description's `affinity`, or a move's), so that two guests never
//! share a CPU of a `null` pool, and which windows each guest owns in which
//! `partition` pool, so that two never share a moment of a frame.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};
use vmm::gate::{Partition, Window};

/// A pool as `PUT /pools/NAME` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    pub cpus: Vec<usize>,
    /// `credit`, `rt`, `partition` or `null`.
    pub policy: String,
    /// A `partition` pool's major frame.
    pub frame_ns: Option<u64>,
}

static POOLS: Mutex<BTreeMap<String, PoolDef>> = Mutex::new(BTreeMap::new());
/// Per running guest: the host CPU each of its vCPUs is pinned to.
static PINS: Mutex<BTreeMap<String, Vec<usize>>> = Mutex::new(BTreeMap::new());
/// Per running guest in a `partition` pool: the pool, and its windows.
static WINDOWS: Mutex<BTreeMap<String, (String, Vec<Window>)>> = Mutex::new(BTreeMap::new());

fn windows() -> MutexGuard<'static, BTreeMap<String, (String, Vec<Window>)>> {
    WINDOWS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records the windows guest `name` owns in partition pool `pool` (none:
/// it is in no partition pool).
pub fn set_windows(name: &str, place: Option<(String, Vec<Window>)>) {
    match place {
        Some(place) => windows().insert(name.to_string(), place),
        None => windows().remove(name),
    };
}

fn pins() -> MutexGuard<'static, BTreeMap<String, Vec<usize>>> {
    PINS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records that guest `name`'s vCPUs are pinned to `cpus` (none: not pinned).
pub fn set_pins(name: &str, cpus: Vec<usize>) {
    if cpus.is_empty() {
        pins().remove(name);
    } else {
        pins().insert(name.to_string(), cpus);
    }
}

/// The CPUs guest `name`'s vCPUs are pinned to, if they are.
pub fn pins_of(name: &str) -> Option<Vec<usize>> {
    pins().get(name).cloned()
}

/// The pins a description's `affinity` gives: one CPU per vCPU, each vCPU
/// held to a single CPU; anything looser is not a pin.
pub fn pins_of_affinity(affinity: &[Vec<usize>]) -> Vec<usize> {
    if affinity.iter().all(|l| l.len() == 1) {
        affinity.iter().map(|l| l[0]).collect()
    } else {
        Vec::new()
    }
}

fn pools() -> MutexGuard<'static, BTreeMap<String, PoolDef>> {
    POOLS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a `PUT /pools/NAME` body: `{"cpus": "0-1", "policy": "credit"}`,
/// and `"frame": "20ms"` for a partition pool.
pub fn parse_def(body: &Value) -> Result<PoolDef, String> {
    let cpus = body["cpus"]
        .as_str()
        .ok_or("cpus: is required: a list of host CPUs such as \"0-1\"")?;
    let cpus = vmm::config::parse_cpu_list(cpus).map_err(|e| format!("cpus: {e}"))?;
    let policy = match body["policy"].as_str() {
        Some(p @ ("credit" | "rt" | "partition" | "null")) => p.to_string(),
        _ => return Err("policy: is required: credit, rt, partition or null".into()),
    };
    let frame_ns = match (body.get("frame"), policy.as_str()) {
        (None, "partition") => return Err("frame: is required in a partition pool".into()),
        (None, _) => None,
        (Some(_), p) if p != "partition" => {
            return Err("frame: only a partition pool has a frame".into())
        }
        (Some(v), _) => Some(
            v.as_str()
                .ok_or(format!("frame: {v} is not a duration like \"20ms\""))
                .and_then(|f| vmm::sched::parse_duration(f).map_err(|e| format!("frame: {e}")))?,
        ),
    };
    Ok(PoolDef {
        cpus,
        policy,
        frame_ns,
    })
}

/// Defines pool `name`; the same again is fine, another definition or
/// CPUs shared with another pool is a conflict. Returns whether it is new.
pub fn define(name: &str, def: PoolDef) -> Result<bool, (u16, String)> {
    crate::daemon::check_name(name).map_err(|e| (400, format!("name: {e}")))?;
    let mut all = pools();
    if let Some(known) = all.get(name) {
        return if *known == def {
            Ok(false)
        } else {
            Err((
                409,
                format!("pool '{name}' exists with other CPUs or policy"),
            ))
        };
    }
    if let Some((other, _)) = all
        .iter()
        .find(|(_, p)| p.cpus.iter().any(|c| def.cpus.contains(c)))
    {
        return Err((
            409,
            format!("cpus: pool '{name}' shares CPUs with pool '{other}'"),
        ));
    }
    all.insert(name.to_string(), def);
    Ok(true)
}

/// `PUT /pools/NAME`.
pub fn put(name: &str, body: &[u8]) -> crate::api::Reply {
    use crate::api::Reply;
    let def = match serde_json::from_slice::<Value>(body) {
        Ok(v) => parse_def(&v),
        Err(e) => Err(format!("bad request body: {e}")),
    };
    let def = match def {
        Ok(d) => d,
        Err(e) => return Reply::error(400, e),
    };
    let mut shown = json!({
        "name": name,
        "cpus": vmm::config::format_cpu_list(&def.cpus),
        "policy": def.policy,
    });
    if let Some(frame) = def.frame_ns {
        shown["frame"] = vmm::sched::format_duration(frame).into();
    }
    match define(name, def) {
        Ok(new) => Reply {
            status: if new { 201 } else { 200 },
            body: shown,
        },
        Err((status, e)) => Reply::error(status, e),
    }
}

/// The class a guest's vCPUs are in, as far as pools care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Fair,
    Fixed,
    Deadline,
}

/// Where a move puts a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The pool's CPUs: the guest group's cpuset.
    pub cpus: Vec<usize>,
    /// In a `null` pool, the CPU each vCPU is pinned to.
    pub pins: Option<Vec<usize>>,
    /// In a `partition` pool, the guest's windows in its frame (elsewhere
    /// none: a move out of a partition pool ends them).
    pub partition: Option<Partition>,
}

/// Who is moving: the guest's name, its vCPUs and their class, the
/// windows the request gives it, and the partition it has now.
#[derive(Debug, Clone, Copy)]
pub struct Mover<'a> {
    pub name: &'a str,
    pub vcpus: usize,
    pub class: Class,
    pub windows: Option<&'a [Window]>,
    pub current: Option<&'a Partition>,
}

/// Checks that a guest may move into pool `name`, and says where it goes.
pub fn plan_move(name: &str, mover: Mover<'_>) -> Result<Move, String> {
    let Mover {
        name: guest,
        vcpus,
        class,
        ..
    } = mover;
    let Some(pool) = pools().get(name).cloned() else {
        return Err(format!(
            "pool: no pool '{name}' is defined (ferrovisor up defines a system file's pools)"
        ));
    };
    if mover.windows.is_some() && pool.policy != "partition" {
        return Err(format!(
            "windows: '{name}' is a {} pool; windows belong to a partition pool",
            pool.policy
        ));
    }
    let whole = |pins| {
        Ok(Move {
            cpus: pool.cpus.clone(),
            pins,
            partition: None,
        })
    };
    match (pool.policy.as_str(), class) {
        ("credit", Class::Fair) | ("rt", Class::Fixed) => whole(None),
        ("partition", Class::Fair | Class::Fixed) => Ok(Move {
            partition: Some(windows_in(name, &pool, mover)?),
            ..whole(None)?
        }),
        ("null", Class::Fair | Class::Fixed) => {
            let taken: Vec<usize> = pins()
                .iter()
                .filter(|(other, _)| *other != guest)
                .flat_map(|(_, cpus)| cpus.iter().copied())
                .collect();
            let free: Vec<usize> = pool
                .cpus
                .iter()
                .copied()
                .filter(|c| !taken.contains(c))
                .take(vcpus)
                .collect();
            if free.len() < vcpus {
                return Err(format!(
                    "pool: null pool '{name}' has {} free CPU(s) for the guest's {vcpus} vCPU(s)",
                    free.len()
                ));
            }
            whole(Some(free))
        }
        ("credit", _) => Err(format!(
            "pool: '{name}' is a credit pool and the guest is real-time: make it --fair first"
        )),
        ("rt", _) => Err(format!(
            "pool: '{name}' is an rt pool: give the guest a --priority first"
        )),
        ("null", _) => Err(format!(
            "pool: '{name}' is a null pool: a deadline reservation cannot be pinned; make the guest --fair or give it a --priority first"
        )),
        (policy, _) => Err(format!(
            "pool: '{name}' is a {policy} pool: a deadline reservation cannot be in a pool; make the guest --fair or give it a --priority first"
        )),
    }
}

/// The windows a mover gets in partition pool `name`: the request's, else
/// its own if they are in the pool's frame; none may overlap another
/// member's. They count from the pool's epoch (CLOCK_MONOTONIC's zero).
fn windows_in(name: &str, pool: &PoolDef, mover: Mover<'_>) -> Result<Partition, String> {
    let frame = pool.frame_ns.unwrap_or_default();
    let wanted: Vec<Window> = match (mover.windows, mover.current) {
        (Some(w), _) => w.to_vec(),
        (None, Some(p)) if p.frame_ns == frame => p.windows.clone(),
        _ => {
            return Err(format!(
                "windows: give the guest its windows in '{name}''s {} frame (--windows START+LENGTH,...)",
                vmm::sched::format_duration(frame)
            ))
        }
    };
    let partition = Partition::new(frame, wanted, Some(0)).map_err(|e| format!("windows: {e}"))?;
    let members = windows();
    for (other, (other_pool, theirs)) in members.iter() {
        if other == mover.name || other_pool != name {
            continue;
        }
        let clash = partition.windows.iter().any(|w| {
            theirs.iter().any(|o| {
                w.start_ns < o.start_ns + o.length_ns && o.start_ns < w.start_ns + w.length_ns
            })
        });
        if clash {
            return Err(format!(
                "windows: overlap a window of guest '{other}' in pool '{name}'"
            ));
        }
    }
    Ok(partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_defined_once_without_sharing_cpus_and_moves_follow_the_policy() {
        let def = |cpus: &str, policy: &str| {
            let mut body = json!({"cpus": cpus, "policy": policy});
            if policy == "partition" {
                body["frame"] = "20ms".into();
            }
            parse_def(&body)
        };
        assert!(parse_def(&json!({"cpus": "0", "policy": "partition"}))
            .unwrap_err()
            .starts_with("frame:"));
        assert!(
            parse_def(&json!({"cpus": "0", "policy": "credit", "frame": "20ms"}))
                .unwrap_err()
                .starts_with("frame:")
        );
        assert!(def("0", "credit").is_ok());
        assert!(def("x", "credit").unwrap_err().starts_with("cpus:"));
        assert!(def("0", "fifo").unwrap_err().starts_with("policy:"));
        assert_eq!(define("t-credit", def("100", "credit").unwrap()), Ok(true));
        assert_eq!(define("t-credit", def("100", "credit").unwrap()), Ok(false));
        assert_eq!(
            define("t-credit", def("101", "credit").unwrap())
                .unwrap_err()
                .0,
            409
        );
        assert_eq!(
            define("t-other", def("100-101", "rt").unwrap())
                .unwrap_err()
                .0,
            409
        );
        assert_eq!(define("t-rt", def("102", "rt").unwrap()), Ok(true));
        assert_eq!(define("t-part", def("103", "partition").unwrap()), Ok(true));
        assert_eq!(define("t-null", def("104-105", "null").unwrap()), Ok(true));
        let plan = |pool, class, vcpus| {
            plan_move(
                pool,
                Mover {
                    name: "t-guest",
                    vcpus,
                    class,
                    windows: None,
                    current: None,
                },
            )
        };
        assert_eq!(plan("t-credit", Class::Fair, 1).unwrap().cpus, vec![100]);
        assert_eq!(plan("t-rt", Class::Fixed, 2).unwrap().pins, None);
        // A null pool pins each vCPU to a CPU no other guest holds.
        set_pins("t-other", vec![104]);
        let null = plan("t-null", Class::Fixed, 1).unwrap();
        assert_eq!((null.cpus, null.pins), (vec![104, 105], Some(vec![105])));
        assert!(plan("t-null", Class::Fair, 2)
            .unwrap_err()
            .contains("1 free CPU"));
        set_pins("t-other", Vec::new());
        assert_eq!(pins_of("t-other"), None);
        assert_eq!(
            plan("t-null", Class::Fair, 2).unwrap().pins,
            Some(vec![104, 105])
        );
        for (pool, class) in [
            ("t-credit", Class::Deadline),
            ("t-rt", Class::Fair),
            ("t-part", Class::Deadline),
            ("t-null", Class::Deadline),
            ("t-none", Class::Fair),
        ] {
            let e = plan(pool, class, 1).unwrap_err();
            assert!(e.starts_with("pool: "), "{e}");
        }
        // Into a partition pool with no windows of its own: it must be given some.
        let e = plan("t-part", Class::Fair, 1).unwrap_err();
        assert!(e.starts_with("windows: "), "{e}");
    }

    #[test]
    fn a_move_into_a_partition_pool_takes_free_windows_in_its_frame() {
        let def = parse_def(&json!({"cpus": "110", "policy": "partition", "frame": "20ms"}));
        assert_eq!(define("t-frame", def.unwrap()), Ok(true));
        let ms = |start: u64, length: u64| Window {
            start_ns: start * 1_000_000,
            length_ns: length * 1_000_000,
        };
        set_windows("t-member", Some(("t-frame".into(), vec![ms(0, 5)])));
        let mover =
            |windows: Option<&'static [Window]>, current: Option<&'static Partition>| Mover {
                name: "t-mover",
                vcpus: 1,
                class: Class::Fair,
                windows,
                current,
            };
        let free: &'static [Window] = Box::leak(Box::new([ms(5, 5)]));
        let plan = plan_move("t-frame", mover(Some(free), None)).unwrap();
        let partition = plan.partition.unwrap();
        assert_eq!(
            (partition.frame_ns, partition.epoch_ns),
            (20_000_000, Some(0))
        );
        assert_eq!(partition.windows, free.to_vec());
        // Another member's window, none given, or past the frame: one line each.
        let taken: &'static [Window] = Box::leak(Box::new([ms(2, 5)]));
        let past: &'static [Window] = Box::leak(Box::new([ms(18, 5)]));
        for windows in [Some(taken), None, Some(past)] {
            let e = plan_move("t-frame", mover(windows, None)).unwrap_err();
            assert!(e.starts_with("windows: "), "{e}");
        }
        // Its own windows serve when they are in the pool's frame.
        let own: &'static Partition = Box::leak(Box::new(
            Partition::new(20_000_000, vec![ms(10, 5)], None).unwrap(),
        ));
        assert!(plan_move("t-frame", mover(None, Some(own))).is_ok());
        // Windows name a partition pool only.
        define(
            "t-plain",
            parse_def(&json!({"cpus": "111", "policy": "credit"})).unwrap(),
        )
        .unwrap();
        let e = plan_move("t-plain", mover(Some(free), None)).unwrap_err();
        assert!(e.starts_with("windows: "), "{e}");
        set_windows("t-member", None);
    }

    #[test]
    fn only_one_cpu_per_vcpu_is_a_pin() {
        assert_eq!(pins_of_affinity(&[vec![3], vec![1]]), vec![3, 1]);
        assert!(pins_of_affinity(&[vec![0, 1]]).is_empty());
        assert!(pins_of_affinity(&[]).is_empty());
    }
}
