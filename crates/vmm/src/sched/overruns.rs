//! Deadline overruns, per vCPU.
//!
//! With `SCHED_FLAG_DL_OVERRUN` the kernel sends SIGXCPU when a deadline
//! vCPU thread has run out of its budget: at a tick some time later (the
//! first that finds the thread running again, often in its next period), to
//! the process, and to that thread unless it blocks the signal. There are
//! two ways to count it, and the VMM picks one per guest:
//!
//! - **on the vCPU thread** (a guest with several deadline vCPUs, or none):
//!   each vCPU thread takes the signal itself and the handler counts it for
//!   that vCPU. Exact, but each overrun also throws the vCPU out of
//!   KVM_RUN once;
//! - **blocked** (a guest with exactly one deadline vCPU): vCPU threads
//!   block it, so it lands on another thread of the VMM, whose handler wakes
//!   the `dl-watch` thread (see `misses`) to count it for that vCPU. No
//!   exit; on a PVM host, taking the signal on the vCPU thread more than
//!   doubled the time a periodic guest job took when it overran.
//!
//! A change of policy at run time kicks every vCPU out of the guest, and
//! each one follows the guest's new way before it enters it again
//! ([`follow_overrun_mode`], checked at every exit like a pause).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// vCPUs counted one by one (the VMM's own limit is 254).
const COUNTED_VCPUS: usize = 256;
/// `OWN_VCPU` of a thread that is no vCPU.
const NO_VCPU: usize = usize::MAX;

/// Every overrun of the guest.
static OVERRUNS: AtomicU64 = AtomicU64::new(0);
/// Per vCPU index: its overruns.
static VCPU_OVERRUNS: [AtomicU64; COUNTED_VCPUS] = [const { AtomicU64::new(0) }; COUNTED_VCPUS];
/// The eventfd the handler signals, or -1 while no watcher listens.
static OVERRUN_WAKE: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The vCPU the calling thread runs (`NO_VCPU`: none).
    static VCPU_INDEX: Cell<usize> = const { Cell::new(NO_VCPU) };
    /// The vCPU the handler counts an overrun on this thread for: the
    /// thread's own while it takes them, else `NO_VCPU`.
    static COUNT_HERE: Cell<usize> = const { Cell::new(NO_VCPU) };
}

extern "C" fn on_overrun(_: libc::c_int) {
    OVERRUNS.fetch_add(1, Ordering::Relaxed);
    if let Some(count) = VCPU_OVERRUNS.get(COUNT_HERE.with(Cell::get)) {
        count.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let fd = OVERRUN_WAKE.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes,
        // the size an eventfd takes. A failed wake-up only loses the
        // vCPU's share of this overrun, never the guest's count.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// From now on an overrun taken off the vCPU threads signals eventfd `fd`
/// (-1: nobody listens).
pub(super) fn wake_on_overrun(fd: RawFd) {
    OVERRUN_WAKE.store(fd, Ordering::Relaxed);
}

/// Counts `n` overruns (taken off the vCPU threads) for vCPU `index`.
pub(super) fn add_vcpu_overruns(index: usize, n: u64) {
    if let Some(count) = VCPU_OVERRUNS.get(index) {
        count.fetch_add(n, Ordering::Relaxed);
    }
}

/// Deadline overruns counted in this VMM (every vCPU's).
pub fn overruns() -> u64 {
    OVERRUNS.load(Ordering::Relaxed)
}

/// Deadline overruns of vCPU `index`.
pub fn vcpu_overruns(index: usize) -> u64 {
    VCPU_OVERRUNS
        .get(index)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Installs the handler once per process, and makes the calling thread the
/// one of vCPU `index`, taking its own overruns or not (`on_thread`).
pub fn track_overruns(index: usize, on_thread: bool) -> std::io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to start from.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_overrun as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is initialised and its handler only touches
        // atomics, thread-locals without destructors, and write(2).
        if unsafe { libc::sigaction(libc::SIGXCPU, &action, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result?;
    VCPU_INDEX.with(|own| own.set(index));
    set_mode(index, on_thread);
    Ok(())
}

/// Makes the calling vCPU thread take its own overruns (`on_thread`) or
/// block them, if it does not already.
pub fn follow_overrun_mode(on_thread: bool) {
    let index = VCPU_INDEX.with(Cell::get);
    let taking = COUNT_HERE.with(Cell::get) != NO_VCPU;
    if index != NO_VCPU && taking != on_thread {
        set_mode(index, on_thread);
    }
}

fn set_mode(index: usize, on_thread: bool) {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage and SIGXCPU a valid signal.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGXCPU);
    }
    let how = if on_thread {
        // Counted here from the moment the signal can arrive.
        COUNT_HERE.with(|c| c.set(index));
        libc::SIG_UNBLOCK
    } else {
        libc::SIG_BLOCK
    };
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if !on_thread {
        COUNT_HERE.with(|c| c.set(NO_VCPU));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends SIGXCPU to the calling thread, as the kernel does at an overrun.
    fn overrun_here() {
        // SAFETY: tgkill to this process's own thread, with a signal whose
        // handler `track_overruns` installed.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGXCPU,
            )
        };
    }

    #[test]
    fn a_vcpu_thread_counts_its_own_overruns_only_while_it_takes_them() {
        std::thread::spawn(|| {
            // vCPU 200: no other test uses it.
            track_overruns(200, true).unwrap();
            overrun_here();
            assert_eq!(vcpu_overruns(200), 1);
            follow_overrun_mode(false);
            overrun_here();
            assert_eq!(vcpu_overruns(200), 1, "blocked: left to the watcher");
            // SAFETY: an all-zero sigset_t is valid storage for sigpending.
            let mut pending: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: `pending` is valid storage.
            unsafe { libc::sigpending(&mut pending) };
            // SAFETY: `pending` was filled in by sigpending.
            assert_eq!(unsafe { libc::sigismember(&pending, libc::SIGXCPU) }, 1);
        })
        .join()
        .unwrap();
        add_vcpu_overruns(200, 2);
        assert_eq!(vcpu_overruns(200), 3);
        assert_eq!(vcpu_overruns(COUNTED_VCPUS), 0);
    }
}
