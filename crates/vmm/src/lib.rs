//! The VMM: assembles a VM from its configuration (guest memory, vCPUs, boot,
//! devices) and runs it.

pub mod coalesced;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod dump;
pub mod exit;
pub mod gate;
pub mod guest_file;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod rate;
pub mod region;
pub mod region_fds;
pub mod runtime;
pub mod sched;
pub mod seccomp;
pub mod stats;
pub mod stderr_log;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use exit::{VmExit, STATUS_GUEST_FAILED};
pub use runtime::RunOptions;
pub use seccomp::{SeccompMode, STATUS_SECCOMP};
pub use vm::{run, run_with, RunReport, VmError};
