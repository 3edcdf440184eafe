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
//! run on any CPU of the new pool. Moving into a `partition` pool needs
//! windows in its frame, given only at start, and is refused.
//!
//! The daemon keeps which host CPUs each running guest's vCPUs are pinned
//! to (its description's `affinity`, or a move's), so that two guests never
//! share a CPU of a `null` pool.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};

/// A pool as `PUT /pools/NAME` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    pub cpus: Vec<usize>,
    /// `credit`, `rt`, `partition` or `null`.
    pub policy: String,
}

static POOLS: Mutex<BTreeMap<String, PoolDef>> = Mutex::new(BTreeMap::new());
/// Per running guest: the host CPU each of its vCPUs is pinned to.
static PINS: Mutex<BTreeMap<String, Vec<usize>>> = Mutex::new(BTreeMap::new());

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

/// Reads a `PUT /pools/NAME` body: `{"cpus": "0-1", "policy": "credit"}`.
pub fn parse_def(body: &Value) -> Result<PoolDef, String> {
    let cpus = body["cpus"]
        .as_str()
        .ok_or("cpus: is required: a list of host CPUs such as \"0-1\"")?;
    let cpus = vmm::config::parse_cpu_list(cpus).map_err(|e| format!("cpus: {e}"))?;
    let policy = match body["policy"].as_str() {
        Some(p @ ("credit" | "rt" | "partition" | "null")) => p.to_string(),
        _ => return Err("policy: is required: credit, rt, partition or null".into()),
    };
    Ok(PoolDef { cpus, policy })
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
    let shown = json!({
        "name": name,
        "cpus": vmm::config::format_cpu_list(&def.cpus),
        "policy": def.policy,
    });
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
}

/// Checks that guest `guest`, `vcpus` vCPUs in `class`, may move into
/// pool `name`, and says where it goes.
pub fn plan_move(name: &str, guest: &str, class: Class, vcpus: usize) -> Result<Move, String> {
    let Some(pool) = pools().get(name).cloned() else {
        return Err(format!(
            "pool: no pool '{name}' is defined (ferrovisor up defines a system file's pools)"
        ));
    };
    let whole = |pins| {
        Ok(Move {
            cpus: pool.cpus.clone(),
            pins,
        })
    };
    match (pool.policy.as_str(), class) {
        ("credit", Class::Fair) | ("rt", Class::Fixed) => whole(None),
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
            "pool: a running guest cannot move into '{name}', a {policy} pool: its windows are set when it starts"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_defined_once_without_sharing_cpus_and_moves_follow_the_policy() {
        let def = |cpus: &str, policy: &str| parse_def(&json!({"cpus": cpus, "policy": policy}));
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
        let plan = |pool, class, vcpus| plan_move(pool, "t-guest", class, vcpus);
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
            ("t-part", Class::Fair),
            ("t-null", Class::Deadline),
            ("t-none", Class::Fair),
        ] {
            let e = plan(pool, class, 1).unwrap_err();
            assert!(e.starts_with("pool: "), "{e}");
        }
    }

    #[test]
    fn only_one_cpu_per_vcpu_is_a_pin() {
        assert_eq!(pins_of_affinity(&[vec![3], vec![1]]), vec![3, 1]);
        assert!(pins_of_affinity(&[vec![0, 1]]).is_empty());
        assert!(pins_of_affinity(&[]).is_empty());
    }
}
