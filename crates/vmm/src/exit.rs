//! How a VM run ends, and the process status each ending maps to.
//!
//! Statuses are chosen so that a debug-exit status, always odd, is never
//! mistaken for anything else: 0 is a clean end, 2 is a failure.

use std::fmt;

/// The status for a guest that failed (triple fault, panic, internal error).
pub const STATUS_GUEST_FAILED: i32 = 2;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// The guest wrote a value to the debug-exit port.
    DebugExit(u32),
    /// Every vCPU halted with interrupts disabled: the guest cannot go on.
    Halted,
    /// The guest reported a kernel panic through the pvpanic port.
    Panicked,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM could not enter or emulate for the guest.
    InternalError { vcpu: u8, detail: String },
    /// A signal (SIGINT, SIGTERM) or the console escape asked the VMM to stop.
    Stopped(String),
}

impl VmExit {
    /// The VMM's process exit status for this ending.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Halted | VmExit::Stopped(_) => 0,
            VmExit::DebugExit(v) => ((v << 1) | 1) as i32 & 0xff,
            VmExit::Panicked | VmExit::TripleFault { .. } | VmExit::InternalError { .. } => {
                STATUS_GUEST_FAILED
            }
        }
    }

    /// Whether this ending is a failure that deserves a line on stderr.
    pub fn is_failure(&self) -> bool {
        self.status() == STATUS_GUEST_FAILED
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::DebugExit(v) => write!(f, "guest wrote {v:#x} to the debug-exit port"),
            VmExit::Halted => write!(f, "every vCPU halted with interrupts disabled"),
            VmExit::Panicked => write!(f, "guest kernel panicked"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExit::InternalError { vcpu, detail } => {
                write!(f, "vCPU {vcpu}: KVM internal error: {detail}")
            }
            VmExit::Stopped(why) => write!(f, "stopped by {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_status_matches_qemu() {
        assert_eq!(VmExit::DebugExit(0).status(), 1);
        assert_eq!(VmExit::DebugExit(0x10).status(), 0x21);
        assert_eq!(VmExit::DebugExit(0x7f).status(), 0xff);
    }

    #[test]
    fn clean_endings_are_zero_and_failures_are_two() {
        assert_eq!(VmExit::PowerOff.status(), 0);
        assert_eq!(VmExit::Reset.status(), 0);
        assert_eq!(VmExit::Stopped("SIGTERM".into()).status(), 0);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.status(), 2);
        assert_eq!(VmExit::Panicked.status(), 2);
        assert!(VmExit::TripleFault { vcpu: 1 }.is_failure());
        assert!(!VmExit::Halted.is_failure());
    }
}
