//! CPU pools the daemon knows (a system file's `[pools.NAME]`, defined
//! through `PUT /pools/NAME` by `ferrovisor up`), so that a running guest
//! can be moved into one (`ferrovisor sched NAME --pool P`). A guest's
//! pool at start comes from its description, whose `[sched]` the system
//! file filled in; a move changes its group's cpuset to the new pool's
//! CPUs, and the kernel migrates its threads.
//!
//! A move is taken into a `credit` pool (the guest must be in the fair
//! class) or an `rt` pool (it must run at a fixed priority). Moving into a
//! `partition` pool needs windows in its frame and into a `null` pool a
//! host CPU per vCPU, both given only at start; moving a guest whose vCPUs
//! are pinned (from a `null` pool) is refused too.

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

/// Checks that a guest in `class`, with pinned vCPUs or not, may move into
/// pool `name`; returns the pool's CPUs.
pub fn check_move(name: &str, class: Class, pinned: bool) -> Result<Vec<usize>, String> {
    let Some(pool) = pools().get(name).cloned() else {
        return Err(format!(
            "pool: no pool '{name}' is defined (ferrovisor up defines a system file's pools)"
        ));
    };
    if pinned {
        return Err(
            "pool: the guest's vCPUs are pinned (a null pool); it moves only when it starts again"
                .into(),
        );
    }
    match (pool.policy.as_str(), class) {
        ("credit", Class::Fair) | ("rt", Class::Fixed) => Ok(pool.cpus),
        ("credit", _) => Err(format!(
            "pool: '{name}' is a credit pool and the guest is real-time: make it --fair first"
        )),
        ("rt", _) => Err(format!(
            "pool: '{name}' is an rt pool: give the guest a --priority first"
        )),
        (policy, _) => Err(format!(
            "pool: a running guest cannot move into '{name}', a {policy} pool: its place there is set when it starts"
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
        assert_eq!(check_move("t-credit", Class::Fair, false), Ok(vec![100]));
        assert_eq!(check_move("t-rt", Class::Fixed, false), Ok(vec![102]));
        for (pool, class, pinned) in [
            ("t-credit", Class::Deadline, false),
            ("t-rt", Class::Fair, false),
            ("t-part", Class::Fair, false),
            ("t-credit", Class::Fair, true),
            ("t-none", Class::Fair, false),
        ] {
            let e = check_move(pool, class, pinned).unwrap_err();
            assert!(e.starts_with("pool: "), "{e}");
        }
    }
}
