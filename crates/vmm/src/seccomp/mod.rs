//! Seccomp filters for every VMM thread, one per kind of thread.
//!
//! [`prepare`] compiles every filter once, before any thread touches guest
//! data, and installs the handler for blocked calls. Each thread then calls
//! [`enter`] with its kind as the first thing it does (the main thread once
//! the vCPUs run). Filters are inherited by the threads a thread starts and
//! can only be narrowed, so only the device launcher ([`launcher`]) starts
//! threads after the filters are in: it starts each device worker when the
//! guest activates a device, and the worker then narrows its filter to its
//! own list.
//!
//! - `on` (the default): a call outside the list raises SIGSYS
//!   (`SECCOMP_RET_TRAP`); its handler writes one line naming the call and
//!   the thread's kind to stderr, restores the terminal, and ends the
//!   process with [`STATUS_SECCOMP`]. Nothing else runs in the VMM after it.
//! - `log`: the call is allowed and the kernel logs it (`SECCOMP_RET_LOG`,
//!   seen in the kernel log / audit log), to find what a filter misses.
//! - `off`: no filter.

mod launcher;
mod names;
mod rules;

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

/// The process status after a blocked system call. Even, so that it is
/// never a debug-exit status (always odd), and apart from 0 and 2.
pub const STATUS_SECCOMP: i32 = 148;

/// The start of the line the handler writes; the daemon looks for it in
/// the VMM's stderr.
pub const BLOCKED_LINE: &str = "ferrovisor: seccomp blocked syscall ";

/// Whether and how the VMM's threads are filtered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A call outside a thread's list ends the VMM.
    #[default]
    On,
    /// A call outside a thread's list is allowed and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("'{other}' is not on, log or off")),
        }
    }
}

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread, once the vCPUs run: supervision and the end.
    Main,
    /// A vCPU thread, with the device models its exits reach.
    Vcpu,
    /// A device worker: virtio queue workers, `virtio-console-out`,
    /// `pci-intx`.
    Worker,
    /// The thread that starts device workers.
    Launcher,
    /// The control socket server and the signal waiter.
    Control,
    /// The console server and the stdin reader.
    Console,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Launcher,
        ThreadKind::Control,
        ThreadKind::Console,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Worker => "device worker",
            ThreadKind::Launcher => "device launcher",
            ThreadKind::Control => "control",
            ThreadKind::Console => "console",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Errors from preparing the filters.
#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {} threads", .0.name())]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the handler for calls seccomp blocks")]
    Handler(#[source] std::io::Error),
    #[error("cannot start the device launcher thread")]
    Launcher(#[source] std::io::Error),
}

/// The compiled filters, once [`prepare`] ran with a mode other than off.
struct Filters {
    programs: Vec<BpfProgram>,
    /// Test builds: the kind of thread that makes a call outside its
    /// filter right after installing it.
    #[cfg(feature = "test-hooks")]
    violate: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the blocked-call line (a plain TLS read in
    /// the handler: const-initialised, no destructor).
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Compiles the filter of `kind` for `mode`.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let build = |e| SeccompError::Build(kind, e);
    let filter = SeccompFilter::new(
        rules::rules(kind).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Compiles every filter, installs the blocked-call handler and, with
/// filters on, starts the device launcher. Call once, before any VMM
/// thread starts; with `off` it does nothing.
pub fn prepare(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off || FILTERS.get().is_some() {
        return Ok(());
    }
    let programs = ThreadKind::ALL
        .iter()
        .map(|&kind| compile(kind, mode))
        .collect::<Result<Vec<_>, _>>()?;
    if mode == SeccompMode::On {
        install_handler().map_err(SeccompError::Handler)?;
    }
    fix_malloc_arena_limit();
    let _ = FILTERS.set(Filters {
        programs,
        #[cfg(feature = "test-hooks")]
        violate: hook::requested(),
    });
    launcher::start().map_err(SeccompError::Launcher)
}

/// Installs the filter of `kind` on the calling thread, if [`prepare`]
/// compiled filters. A thread whose filter cannot be installed must not go
/// on unfiltered: the VMM ends with one line and status 2.
pub fn enter(kind: ThreadKind) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    KIND.with(|k| k.set(kind as u8));
    if let Err(e) = seccompiler::apply_filter(&filters.programs[kind.index()]) {
        crate::console::restore_terminal();
        eprintln!(
            "ferrovisor: cannot install the seccomp filter of a {} thread: {e}",
            kind.name()
        );
        // SAFETY: _exit ends the process at once; nothing is left to run.
        unsafe { libc::_exit(crate::exit::STATUS_GUEST_FAILED) };
    }
    #[cfg(feature = "test-hooks")]
    if filters.violate == Some(kind) {
        hook::violate();
    }
}

/// glibc works out how many malloc arenas it may make the first time a
/// thread needs one beyond the eighth, by reading
/// `/sys/devices/system/cpu/online`: in a filtered thread that open would
/// be blocked. Setting the limit now (glibc's own default, 8 per CPU) means
/// it is never worked out later.
fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let limit = libc::c_int::try_from(8 * cpus).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) };
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; the fields are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_blocked_call as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is valid storage.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: the handler only calls async-signal-safe functions.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: signo, errno,
/// code, padding, then `_sigsys { void *call_addr; int syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Appends `bytes` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    let n = bytes.len().min(buf.len() - *len);
    buf[*len..*len + n].copy_from_slice(&bytes[..n]);
    *len += n;
}

/// Appends `v` in decimal.
fn push_number(buf: &mut [u8], len: &mut usize, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The line for a blocked call `nr` on a thread of `kind`.
fn blocked_line(nr: i32, kind: u8, buf: &mut [u8]) -> usize {
    let mut len = 0;
    push(buf, &mut len, BLOCKED_LINE.as_bytes());
    let name = usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .filter(|n| !n.is_empty());
    match name {
        Some(name) => push(buf, &mut len, name.as_bytes()),
        None => push(buf, &mut len, b"?"),
    }
    push(buf, &mut len, b" (");
    push_number(buf, &mut len, nr as u32);
    push(buf, &mut len, b") in a ");
    let kind = ThreadKind::ALL
        .get(usize::from(kind))
        // Every thread sets its kind before its filter, except a device
        // thread that the launcher just started and that has not yet
        // reached its own.
        .map_or("starting device", |k| k.name());
    push(buf, &mut len, kind.as_bytes());
    push(buf, &mut len, b" thread\n");
    len
}

/// SIGSYS handler: one line naming the call, the terminal restored, and
/// the process ends. Async-signal-safe: no allocation, no lock, only
/// write, tcsetattr and _exit, which every filter allows.
extern "C" fn on_blocked_call(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose
    // si_syscall lies at this offset on x86_64.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let kind = KIND.with(Cell::get);
    let mut buf = [0u8; 160];
    let len = blocked_line(nr, kind, &mut buf);
    crate::console::restore_terminal_from_signal_handler();
    // SAFETY: `buf[..len]` is initialised; write and _exit are
    // async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(STATUS_SECCOMP);
    }
}

#[cfg(feature = "test-hooks")]
mod hook {
    //! Test builds only: `FERROVISOR_TEST_SECCOMP_VIOLATION=KIND` (main,
    //! vcpu, worker, launcher, control, console) makes the first thread of
    //! that kind call `personality(0xffffffff)` (a harmless query that no
    //! filter allows) right after its filter is in.
    use super::ThreadKind;

    pub fn requested() -> Option<ThreadKind> {
        let want = std::env::var("FERROVISOR_TEST_SECCOMP_VIOLATION").ok()?;
        ThreadKind::ALL
            .into_iter()
            .find(|k| k.name().split(' ').next_back() == Some(want.as_str()) || k.name() == want)
    }

    pub fn violate() {
        // SAFETY: personality(0xffffffff) only reads the persona.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        assert_eq!(
            "yes".parse::<SeccompMode>(),
            Err("'yes' is not on, log or off".to_string())
        );
        assert_eq!(SeccompMode::default(), SeccompMode::On);
    }

    #[test]
    fn every_filter_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let program = compile(kind, mode).unwrap();
                assert!(program.len() > 10, "{kind:?}");
            }
        }
    }

    #[test]
    fn the_blocked_line_names_the_call_and_the_thread() {
        let mut buf = [0u8; 160];
        let len = blocked_line(
            libc::SYS_personality as i32,
            ThreadKind::Vcpu as u8,
            &mut buf,
        );
        let line = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(
            line,
            "ferrovisor: seccomp blocked syscall personality (135) in a vcpu thread\n"
        );
        let len = blocked_line(9999, 200, &mut buf);
        let line = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(
            line,
            "ferrovisor: seccomp blocked syscall ? (9999) in a starting device thread\n"
        );
    }
}
