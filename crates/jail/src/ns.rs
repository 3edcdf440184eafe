//! Namespaces and the two processes of a jailed run: the parent that
//! waits, and the child that is pid 1 of a new PID namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::{sys, JailError, Result};

/// Where `ip netns add NAME` keeps a network namespace.
pub const NETNS_DIR: &str = "/run/netns";

/// The signals the parent passes on to the child.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Moves the calling thread into the network namespace `NETNS_DIR/NAME`.
/// Call it before any thread starts and before taps are opened: taps are
/// looked up in the namespace of the thread that opens them.
pub fn join_netns(name: &str) -> Result<()> {
    if !crate::valid_name(name) {
        return Err(JailError::BadNetns(name.to_string()));
    }
    let path = PathBuf::from(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|source| JailError::NetnsOpen {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    // SAFETY: `file` is an open descriptor; setns only changes this
    // thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(sys(format!("join network namespace {}", path.display())));
    }
    Ok(())
}

/// Which side of the fork the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The child: pid 1 of the new PID namespace.
    Child,
    /// The parent, with the child's pid as the host sees it.
    Parent(libc::pid_t),
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: `set` is valid storage and `signal` a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Forks a child into new PID, mount, IPC and UTS namespaces (the parent
/// stays in the host's). Call it while the process has one thread. The
/// forwarded signals stay blocked in both processes: the parent waits for
/// them, and the VMM receives them on its signal thread.
pub fn fork_into_namespaces() -> Result<Fork> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let mut blocked = FORWARDED.to_vec();
    blocked.push(libc::SIGCHLD);
    let set = signal_set(&blocked);
    // SAFETY: `set` is a valid signal set; a null old set is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: unshare only changes the namespaces of this process's
    // children-to-be.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(sys("create the jail's PID namespace"));
    }
    // SAFETY: the process has one thread (the caller's promise), so the
    // child may go on running ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(sys("fork the jailed VMM")),
        0 => {
            let child = signal_set(&[libc::SIGCHLD]);
            // SAFETY: `child` is a valid signal set.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &child, std::ptr::null_mut()) };
            die_with_parent()?;
            let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            // SAFETY: unshare only changes this process's namespaces.
            if unsafe { libc::unshare(flags) } != 0 {
                return Err(sys("create the jail's namespaces"));
            }
            Ok(Fork::Child)
        }
        pid => Ok(Fork::Parent(pid)),
    }
}

/// Asks the kernel to kill this process when its parent ends (a daemon's
/// SIGKILL reaches the parent only). A change of user clears the request,
/// so the lock-down makes it again.
pub(crate) fn die_with_parent() -> Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(sys("ask to end with the parent"));
    }
    Ok(())
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// The parent's whole job: waits for the child, forwarding the stop
/// signals to it, and returns how it ended.
pub fn wait_child(pid: libc::pid_t) -> ChildEnd {
    let mut watched = FORWARDED.to_vec();
    watched.push(libc::SIGCHLD);
    let set = signal_set(&watched);
    loop {
        if let Some(end) = reap(pid) {
            return end;
        }
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is blocked in this thread and `signal` valid storage.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        if signal != libc::SIGCHLD {
            // SAFETY: kill has no memory effects; `pid` is our own child.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

fn reap(pid: libc::pid_t) -> Option<ChildEnd> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is valid storage.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if got == pid {
        if libc::WIFEXITED(status) {
            return Some(ChildEnd::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Some(ChildEnd::Signaled(libc::WTERMSIG(status)));
        }
    } else if got < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
        return Some(ChildEnd::Exited(2));
    }
    None
}

/// The usual name of signal `n`.
pub fn signal_name(n: i32) -> String {
    let name = match n {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGSYS => "SIGSYS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        _ => return format!("signal {n}"),
    };
    name.to_string()
}
