//! Scenarios with several nested vCPUs at once, tried again when the lab
//! itself fails them.
//!
//! Two nested vCPUs running side by side, of two guests or of one 2-vCPU
//! guest, make the lab's emulated machine fail now and then (docs/lab.md,
//! "One guest at a time"): a guest triple-faults, or its kernel dies of a
//! double fault, in ordinary kernel code, or it stalls before it has
//! booted. A test that cannot avoid running two vCPUs at once runs its
//! scenario through [`retried`]: a try that ends in one of those signatures
//! ([`Try::Unstable`]) is reported and run again from the start, with fresh
//! guests; any other failure ([`Try::Failed`]) fails the test at once.
//! Every unstable try is printed, so the count of lab failures stays
//! visible in the test's output.

use std::fmt;

/// How one try of a scenario failed.
#[derive(Debug)]
pub enum Try {
    /// The lab's known instability: a guest triple-faulted (its VMM ended
    /// with status 2) or never finished booting. The scenario is run again.
    Unstable(String),
    /// Anything else: what the test asserts did not hold.
    Failed(String),
}

impl fmt::Display for Try {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Try::Unstable(why) => write!(f, "the lab failed the guests: {why}"),
            Try::Failed(why) => f.write_str(why),
        }
    }
}

/// How many tries a scenario with several guests gets.
pub const TRIES: u32 = 3;

/// The first of `checks` (each a fact and what it means) that does not
/// hold, as a failed try with `context()` to show; `Ok` when all hold.
pub fn all_hold(checks: &[(bool, &str)], context: impl FnOnce() -> String) -> Result<(), Try> {
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, what)) => Err(Try::Failed(format!("not so: {what}\n{}", context()))),
        None => Ok(()),
    }
}

/// Runs `scenario` (given the try's number, from 1) until it succeeds, fails
/// for a reason of its own, or has met the lab's instability `tries` times.
/// The error lists every try's reason.
pub fn retried<T>(
    what: &str,
    tries: u32,
    mut scenario: impl FnMut(u32) -> Result<T, Try>,
) -> Result<T, String> {
    let mut reasons = Vec::new();
    for n in 1..=tries {
        match scenario(n) {
            Ok(value) => {
                if !reasons.is_empty() {
                    eprintln!(
                        "lab-tests: {what}: passed on try {n} of {tries}, after {} lab failure(s)",
                        reasons.len()
                    );
                }
                return Ok(value);
            }
            Err(Try::Failed(why)) => {
                reasons.push(format!("try {n}: {why}"));
                return Err(format!("{what}:\n{}", reasons.join("\n")));
            }
            Err(Try::Unstable(why)) => {
                eprintln!(
                    "lab-tests: {what}: try {n} of {tries}: the lab failed the guests ({why})"
                );
                reasons.push(format!("try {n}: the lab failed the guests: {why}"));
            }
        }
    }
    Err(format!(
        "{what}: every try met the lab's instability:\n{}",
        reasons.join("\n")
    ))
}

/// Whether a VMM's exit status is the triple fault a guest dies of when the
/// lab's emulation fails it (status 2, see docs/running.md).
pub fn is_triple_fault_status(code: Option<i32>) -> bool {
    code == Some(2)
}

/// Whether a guest that ended early died the way the lab's emulation kills
/// guests: its VMM ended with status 2 after a triple fault (the VMM's line
/// on stderr says so), or after the guest's kernel died of a double fault
/// (its console says so). A guest that died of anything else, or a VMM that
/// ended with another status, is the test's own failure.
pub fn died_of_emulation_fault(exit: &crate::Exit) -> Option<String> {
    if !is_triple_fault_status(exit.status.code()) {
        return None;
    }
    if let Some(line) = exit.stderr.lines().find(|l| l.contains("triple-faulted")) {
        return Some(line.trim().to_string());
    }
    let line = exit
        .console
        .lines()
        .find(|l| l.contains("PANIC: double fault"))?;
    Some(format!(
        "the guest's kernel died of a double fault: {}",
        line.trim()
    ))
}

/// Whether a guest that never got there had a vCPU stop answering: its
/// kernel's RCU stall or soft-lockup report, the first such line. In the
/// lab this is how a vCPU caught in the emulation's fault looks from the
/// guest's other vCPU (docs/lab.md).
pub fn stalled_vcpu(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| l.contains("rcu_preempt detected stalls") || l.contains("soft lockup"))
        .map(|l| format!("a vCPU stopped answering: {}", l.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstable_try_is_run_again_and_a_failed_one_is_not() {
        let mut seen = Vec::new();
        let result = retried("pair", 3, |n| {
            seen.push(n);
            if n == 1 {
                Err(Try::Unstable("guest a triple-faulted".into()))
            } else {
                Ok(n)
            }
        });
        assert_eq!(result, Ok(2));
        assert_eq!(seen, [1, 2]);

        let mut seen = Vec::new();
        let result: Result<(), _> = retried("pair", 3, |n| {
            seen.push(n);
            Err(Try::Failed("no reply from b".into()))
        });
        assert_eq!(seen, [1], "an assertion's failure is not retried");
        assert!(result.unwrap_err().contains("try 1: no reply from b"));
    }

    #[test]
    fn a_scenario_the_lab_always_fails_fails_with_every_reason() {
        let result: Result<(), _> =
            retried("pair", 2, |n| Err(Try::Unstable(format!("stall {n}"))));
        let error = result.unwrap_err();
        assert!(
            error.contains("every try met the lab's instability"),
            "{error}"
        );
        assert!(
            error.contains("stall 1") && error.contains("stall 2"),
            "{error}"
        );
        assert!(is_triple_fault_status(Some(2)));
        assert!(!is_triple_fault_status(Some(0)));
    }

    fn ended(code: i32, console: &str, stderr: &str) -> crate::Exit {
        use std::os::unix::process::ExitStatusExt;
        crate::Exit {
            status: std::process::ExitStatus::from_raw(code << 8),
            console: console.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn only_double_and_triple_faults_count_as_the_labs() {
        let df = ended(
            2,
            "login: root\n[ 12.6] traps: PANIC: double fault, error_code: 0x0\n[ 12.6] RIP",
            "ferrovisor: guest kernel panicked",
        );
        let why = died_of_emulation_fault(&df).expect("a double fault is the lab's");
        assert!(
            why.ends_with("PANIC: double fault, error_code: 0x0"),
            "{why}"
        );
        let tf = ended(
            2,
            "",
            "ferrovisor: vCPU 1 triple-faulted\nvCPU 1 state ...\n",
        );
        assert_eq!(
            died_of_emulation_fault(&tf).as_deref(),
            Some("ferrovisor: vCPU 1 triple-faulted")
        );
        // Another panic, or another status, fail the test.
        let oops = ended(2, "BUG: kernel NULL pointer", "guest kernel panicked");
        assert_eq!(died_of_emulation_fault(&oops), None);
        let clean = ended(0, "PANIC: double fault", "vCPU 0 triple-faulted");
        assert_eq!(died_of_emulation_fault(&clean), None);
    }

    #[test]
    fn a_stall_report_is_found_and_a_quiet_console_is_not_a_stall() {
        let console = "[ 40.1] systemd[1]: Starting...\n[ 102.3] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n";
        assert_eq!(
            stalled_vcpu(console).as_deref(),
            Some("a vCPU stopped answering: [ 102.3] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:")
        );
        assert!(
            stalled_vcpu("[ 137.4] watchdog: BUG: soft lockup - CPU#0 stuck for 112s!").is_some()
        );
        assert_eq!(stalled_vcpu("[ 9.0] systemd[1]: Started udev"), None);
    }
}
