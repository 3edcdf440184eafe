//! The system calls each kind of VMM thread may make once its filter is
//! installed. Every entry names the code path that needs it. The lists were
//! found by tracing the host KVM tests and the lab tests (`strace -f`,
//! `--seccomp log`) and by reading the code paths they did not reach.
//!
//! A thread's filter applies to the threads it starts too (filters are
//! inherited and stack), so only the device launcher, which starts the
//! device workers, may create threads, and its list holds the workers' own.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events,
};
use libc::c_long;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// A filter's rules: system call number → rules (empty: always allowed;
/// else allowed when any rule matches).
pub type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// A condition on one argument: `arg & mask == value`.
#[derive(Debug, Clone, Copy)]
struct Arg {
    index: u8,
    mask: u64,
    value: u64,
}

/// Argument `index` equals `value` (compared as a 32-bit int, as the
/// kernel reads `int` and `unsigned int` arguments).
const fn eq(index: u8, value: u64) -> Arg {
    Arg {
        index,
        mask: 0xffff_ffff,
        value,
    }
}

/// The bits of `mask` in argument `index` are clear.
const fn clear(index: u8, mask: u64) -> Arg {
    Arg {
        index,
        mask,
        value: 0,
    }
}

/// Builds filters rule by rule; a call allowed outright stays allowed
/// whatever conditional rules other groups add for it.
#[derive(Default)]
struct Builder {
    rules: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
}

impl Builder {
    /// Allows `nr` with any arguments.
    fn allow(&mut self, nr: c_long) -> &mut Self {
        self.rules.insert(nr, None);
        self
    }

    /// Allows `nr` when all of `args` hold.
    fn allow_if(&mut self, nr: c_long, args: &[Arg]) -> &mut Self {
        let entry = self.rules.entry(nr).or_insert_with(|| Some(Vec::new()));
        if let Some(list) = entry {
            list.push(args.to_vec());
        }
        self
    }

    /// Allows `ioctl` with each of `requests`, on any descriptor.
    fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        for &request in requests {
            self.allow_if(libc::SYS_ioctl, &[eq(1, request)]);
        }
        self
    }

    fn build(&self) -> Result<RuleMap, seccompiler::BackendError> {
        let mut map = RuleMap::new();
        for (&nr, rules) in &self.rules {
            let compiled = match rules {
                None => Vec::new(),
                Some(list) => list
                    .iter()
                    .map(|args| {
                        let conditions = args
                            .iter()
                            .map(|a| {
                                let op = if a.mask == 0xffff_ffff {
                                    SeccompCmpOp::Eq
                                } else {
                                    SeccompCmpOp::MaskedEq(a.mask)
                                };
                                SeccompCondition::new(a.index, SeccompCmpArgLen::Dword, op, a.value)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            map.insert(nr, compiled);
        }
        Ok(map)
    }
}

/// `_IOC(dir, type, nr, size)` as the kernel encodes ioctl requests.
const fn ioc(dir: u64, kind: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (kind << 8) | nr
}
const fn io(kind: u64, nr: u64) -> u64 {
    ioc(0, kind, nr, 0)
}
const fn iow(kind: u64, nr: u64, size: usize) -> u64 {
    ioc(1, kind, nr, size)
}
const fn ior(kind: u64, nr: u64, size: usize) -> u64 {
    ioc(2, kind, nr, size)
}

const KVMIO: u64 = 0xAE;
const KVM_RUN: u64 = io(KVMIO, 0x80);
const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, size_of::<kvm_sregs>());
const KVM_GET_MP_STATE: u64 = ior(KVMIO, 0x98, size_of::<kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, size_of::<kvm_vcpu_events>());
const KVM_SET_GSI_ROUTING: u64 = iow(KVMIO, 0x6a, size_of::<kvm_irq_routing>());
const KVM_IOEVENTFD: u64 = iow(KVMIO, 0x79, size_of::<kvm_ioeventfd>());
const KVM_IRQFD: u64 = iow(KVMIO, 0x76, size_of::<kvm_irqfd>());
const KVM_SET_USER_MEMORY_REGION: u64 = iow(KVMIO, 0x46, size_of::<kvm_userspace_memory_region>());
const TUNSETOFFLOAD: u64 = iow(b'T' as u64, 208, size_of::<libc::c_uint>());
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const FIONBIO: u64 = 0x5421;
/// `seccomp(SECCOMP_SET_MODE_FILTER, ...)`.
const SECCOMP_SET_MODE_FILTER: u64 = 1;
/// `prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, ...)`.
const PR_SET_VMA: u64 = 0x5356_4d41;

/// What every filtered thread needs, whatever its work.
fn base(b: &mut Builder) {
    b
        // Mutexes, condition variables, channels and thread joins.
        .allow(libc::SYS_futex)
        // The allocator (glibc's per-thread arenas grow and trim with
        // mmap, mprotect, madvise and brk); never executable memory.
        .allow_if(libc::SYS_mmap, &[clear(2, libc::PROT_EXEC as u64)])
        .allow_if(libc::SYS_mprotect, &[clear(2, libc::PROT_EXEC as u64)])
        .allow(libc::SYS_munmap)
        .allow(libc::SYS_mremap)
        .allow(libc::SYS_madvise)
        .allow(libc::SYS_brk)
        // glibc names each new malloc arena's mapping (a thread's first
        // allocation may create one).
        .allow_if(libc::SYS_prctl, &[eq(0, PR_SET_VMA)])
        // A thread's end: std frees its signal stack, then the thread exits;
        // the process ends with exit_group (also the blocked-call handler).
        .allow(libc::SYS_sigaltstack)
        .allow(libc::SYS_exit)
        .allow(libc::SYS_exit_group)
        .allow(libc::SYS_rt_sigprocmask)
        // Return from a signal handler: the vCPU kick signal.
        .allow(libc::SYS_rt_sigreturn)
        // A timed sleep or wait (clock_nanosleep, poll, futex) that a
        // signal interrupted, resumed by the kernel with the time left.
        // The deadline-overrun SIGXCPU (sched::on_overrun) is sent to the
        // process, so any thread may take it, not only the vCPU's.
        .allow(libc::SYS_restart_syscall)
        // One-line messages on stderr; every eventfd and irqfd signal.
        .allow(libc::SYS_write)
        // Dropping any descriptor.
        .allow(libc::SYS_close)
        // std's check (debug builds) that a descriptor is open before it
        // is closed.
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_GETFD as u64)])
        // thread::sleep, timeouts, Instant (when the vDSO falls back).
        .allow(libc::SYS_clock_gettime)
        .allow(libc::SYS_clock_nanosleep)
        .allow(libc::SYS_nanosleep)
        .allow(libc::SYS_sched_yield)
        // Thread ids (vcpu::current_tid) and the process id for tgkill.
        .allow(libc::SYS_gettid)
        .allow(libc::SYS_getpid)
        // HashMap's random keys, seeded once per thread.
        .allow(libc::SYS_getrandom)
        // console::restore_terminal (the panic hook, the blocked-call
        // handler) puts stdin's terminal back to its saved mode.
        .allow_if(libc::SYS_ioctl, &[eq(0, 0), eq(1, TCSETS)])
        .allow_if(libc::SYS_ioctl, &[eq(0, 0), eq(1, TCGETS)]);
}

/// Reading a small file in /proc and the like (`std::fs::read_to_string`).
fn read_files(b: &mut Builder) {
    b.allow(libc::SYS_openat)
        .allow(libc::SYS_read)
        .allow(libc::SYS_lseek)
        .allow(libc::SYS_statx)
        .allow(libc::SYS_fstat)
        .allow(libc::SYS_newfstatat);
}

/// vCPU threads: `vcpu::Vcpu::run` and the exit handlers, which run the
/// device models, including a virtio device's activation and reset.
fn vcpu(b: &mut Builder) {
    b.ioctls(&[
        // vcpu::Vcpu::run: the run loop.
        KVM_RUN,
        // vcpu liveness answers (halted with interrupts off?) and the dump
        // of a vCPU that died (vmm::dump).
        KVM_GET_MP_STATE,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_VCPU_EVENTS,
        // pci::GsiRouter: the guest programs an MSI-X vector.
        KVM_SET_GSI_ROUTING,
        // pci::KvmIoEvents: the guest moves a BAR, so the queue notify
        // ioeventfds move with it.
        KVM_IOEVENTFD,
        // region::KvmRegion: the guest moves a shared region's BAR 2 (or
        // turns memory decoding off and on), so its memory slot moves.
        KVM_SET_USER_MEMORY_REGION,
        // region::PeerMsi: a shared region's vector whose peers ring it
        // straight through its irqfd is detached while the guest masks it
        // and attached again on unmask.
        KVM_IRQFD,
        // virtio::net activation: the tap's offloads follow the features
        // the driver accepted.
        TUNSETOFFLOAD,
    ]);
    // virtio activation: queue::Worker::spawn (stop eventfd, epoll set);
    // vsock's Muxer::new (epoll, timerfd made non-blocking, listener clone).
    b.allow(libc::SYS_eventfd2)
        .allow(libc::SYS_epoll_create1)
        .allow(libc::SYS_epoll_ctl)
        .allow(libc::SYS_timerfd_create)
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_SETFL as u64)])
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_GETFL as u64)])
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_DUPFD_CLOEXEC as u64)])
        // Reading eventfds (an irqfd resample, a worker's stop).
        .allow(libc::SYS_read)
        // virtio::net::VhostUserNet activation and reset: requests to the
        // switch port, the memfd and eventfds attached, and its replies.
        .allow(libc::SYS_sendmsg)
        .allow(libc::SYS_recvmsg);
}

/// Device workers: `virtio::queue::Worker` threads (blk, net, rng,
/// console, vsock), `virtio-console-out`, and `pci-intx`.
fn worker(b: &mut Builder) {
    b
        // queue::event_loop, pci::spawn_resampler: wait for kicks and
        // backend fds.
        .allow(libc::SYS_epoll_wait)
        .allow(libc::SYS_epoll_pwait)
        // vsock muxer: connections join and leave its epoll set.
        .allow(libc::SYS_epoll_ctl)
        // Eventfds (kicks, stop), the tap (net::tap recv/send), sockets.
        .allow(libc::SYS_read)
        .allow(libc::SYS_readv)
        .allow(libc::SYS_writev)
        // virtio::block: reads and writes at an offset, flush (fdatasync),
        // discard and write-zeroes (fallocate).
        .allow(libc::SYS_pread64)
        .allow(libc::SYS_pwrite64)
        .allow(libc::SYS_preadv)
        .allow(libc::SYS_pwritev)
        .allow(libc::SYS_fdatasync)
        .allow(libc::SYS_fsync)
        .allow(libc::SYS_fallocate)
        // virtio::vsock: guest connections reach the unix sockets beside
        // the device's socket (muxer connect_unix); host programs connect
        // in (listener accept, set non-blocking); data both ways, without
        // SIGPIPE (conn::send); half-close (conn shutdown); the credit
        // timer.
        .allow_if(libc::SYS_socket, &[eq(0, libc::AF_UNIX as u64)])
        .allow(libc::SYS_connect)
        .allow(libc::SYS_accept4)
        .allow(libc::SYS_recvfrom)
        // The router's answer: a line with the peer's stream attached.
        .allow(libc::SYS_recvmsg)
        .allow(libc::SYS_sendto)
        .allow(libc::SYS_shutdown)
        .allow(libc::SYS_getsockopt)
        .allow(libc::SYS_timerfd_settime)
        .allow(libc::SYS_timerfd_gettime)
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_SETFL as u64)])
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_GETFL as u64)])
        .ioctls(&[FIONBIO]);
}

/// The device launcher (`seccomp::launcher`): starts each device worker
/// thread when the guest activates a device. The workers inherit this
/// filter, so it holds theirs too.
fn launcher(b: &mut Builder) {
    worker(b);
    b
        // std::thread::Builder::spawn: the thread, its stack and guard page.
        .allow(libc::SYS_clone3)
        .allow(libc::SYS_clone)
        // The new thread's start (glibc and std): robust futex list,
        // restartable sequences, its name, its stack bounds.
        .allow(libc::SYS_set_robust_list)
        .allow(libc::SYS_rseq)
        .allow_if(libc::SYS_prctl, &[eq(0, libc::PR_SET_NAME as u64)])
        .allow(libc::SYS_sched_getaffinity)
        // seccomp::enter in each new worker: it adds the worker filter on
        // top of this one (filters only ever narrow).
        .allow_if(libc::SYS_prctl, &[eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)])
        .allow_if(libc::SYS_seccomp, &[eq(0, SECCOMP_SET_MODE_FILTER)]);
}

/// The control socket server (`runtime::serve_control`) and the signal
/// waiter (`vm::spawn_signal_waiter`).
fn control(b: &mut Builder) {
    read_files(b);
    b
        // Each request: accept, time limits, the line, the reply.
        .allow(libc::SYS_accept4)
        .allow(libc::SYS_setsockopt)
        .allow(libc::SYS_recvfrom)
        .allow(libc::SYS_sendto)
        .allow(libc::SYS_shutdown)
        .allow(libc::SYS_poll)
        // pause: kick every vCPU out of KVM_RUN (vcpu::kick); the partition
        // gate (which runs under this filter) does the same at each window end.
        .allow(libc::SYS_tgkill)
        // sched::change and sched::info: the vCPU threads' class, set and
        // read back.
        .allow(libc::SYS_sched_setattr)
        .allow(libc::SYS_sched_getattr)
        // sched's affinity (a move into or out of a null pool) and info's
        // per-vCPU affinity.
        .allow(libc::SYS_sched_setaffinity)
        .allow(libc::SYS_sched_getaffinity)
        // limit: a request waiting under the old rate limit is woken at once
        // through its limiter's timerfd (rate::Limits::apply).
        .allow(libc::SYS_timerfd_settime)
        // The signal waiter: sigwait.
        .allow(libc::SYS_rt_sigtimedwait);
}

/// The console server (`runtime::ConsoleServer`) and the stdin reader
/// (`console::spawn_stdin_reader`).
fn console(b: &mut Builder) {
    read_files(b);
    b
        // One poll loop over the wake-up eventfd, the listener, the clients.
        .allow(libc::SYS_poll)
        .allow(libc::SYS_ppoll)
        .allow(libc::SYS_accept4)
        .allow(libc::SYS_recvfrom)
        .allow(libc::SYS_sendto)
        .ioctls(&[FIONBIO])
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_SETFL as u64)])
        .allow_if(libc::SYS_fcntl, &[eq(1, libc::F_GETFL as u64)])
        // runtime::ConsoleLog: appended to; past its limit rewritten into a
        // new file renamed over it.
        .allow(libc::SYS_rename)
        .allow(libc::SYS_renameat)
        .allow(libc::SYS_renameat2)
        .allow(libc::SYS_ftruncate)
        .allow(libc::SYS_fsync)
        // stderr_log::bound: vmm.err past its limit is cut in place: its
        // tail read (fstat, pread), the file truncated, the tail written.
        .allow(libc::SYS_pread64);
}

/// The main thread once the vCPUs run: `vm::supervise`, `vm::stop_vcpus`,
/// `vm::finish_run` and the end of `main`.
fn main(b: &mut Builder) {
    read_files(b);
    b
        // vm::supervise: kick the vCPUs for a liveness round, and at stop.
        .allow(libc::SYS_tgkill)
        // Runtime::finish: wake the control thread's accept.
        .allow(libc::SYS_shutdown)
        // Runtime::write_dump, runtime::write_exit_record (a temporary file
        // synced and renamed), the sockets removed on drop.
        .allow(libc::SYS_fsync)
        .allow(libc::SYS_rename)
        .allow(libc::SYS_renameat)
        .allow(libc::SYS_renameat2)
        .allow(libc::SYS_unlink)
        .allow(libc::SYS_unlinkat)
        // The end of a `ferrovisor run` with a CPU policy: it leaves its own
        // guest cgroup (a write to the parent's cgroup.procs) and removes it.
        .allow(libc::SYS_rmdir)
        // runtime::dir_in_use: is another VMM serving the directory?
        .allow_if(libc::SYS_socket, &[eq(0, libc::AF_UNIX as u64)])
        .allow(libc::SYS_connect);
}

/// The rules of `kind`'s filter.
pub fn rules(kind: ThreadKind) -> Result<RuleMap, seccompiler::BackendError> {
    let mut b = Builder::default();
    base(&mut b);
    match kind {
        ThreadKind::Main => main(&mut b),
        ThreadKind::Vcpu => vcpu(&mut b),
        ThreadKind::Worker => worker(&mut b),
        ThreadKind::Launcher => launcher(&mut b),
        ThreadKind::Control => control(&mut b),
        ThreadKind::Console => console(&mut b),
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> and <linux/if_tun.h> on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    }

    #[test]
    fn only_the_launcher_may_start_threads() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind).unwrap();
            let can_clone = rules.contains_key(&libc::SYS_clone3);
            assert_eq!(can_clone, kind == ThreadKind::Launcher, "{kind:?}");
        }
    }

    #[test]
    fn rate_limiter_timers_may_be_armed_by_workers_and_by_a_limit_change() {
        // Workers arm the timer when a request runs out of tokens; the
        // control thread when a limit change wakes a waiting request.
        for kind in [
            ThreadKind::Worker,
            ThreadKind::Launcher,
            ThreadKind::Control,
        ] {
            let rules = rules(kind).unwrap();
            assert!(rules.contains_key(&libc::SYS_timerfd_settime), "{kind:?}");
        }
    }

    #[test]
    fn the_launcher_allows_all_a_worker_does() {
        let worker = rules(ThreadKind::Worker).unwrap();
        let launcher = rules(ThreadKind::Launcher).unwrap();
        for nr in worker.keys() {
            assert!(launcher.contains_key(nr), "syscall {nr}");
        }
    }

    #[test]
    fn only_vcpus_run_guests_and_no_thread_executes_new_code() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind).unwrap();
            assert!(!rules.contains_key(&libc::SYS_execve), "{kind:?}");
            assert!(!rules.contains_key(&libc::SYS_ptrace), "{kind:?}");
            assert!(!rules[&libc::SYS_mmap].is_empty(), "{kind:?}");
            let ioctl_rules = rules[&libc::SYS_ioctl].len();
            // Terminal restore (2) is all that non-vCPU threads get, plus
            // FIONBIO where sockets are made non-blocking.
            if kind != ThreadKind::Vcpu {
                assert!(ioctl_rules <= 3, "{kind:?}: {ioctl_rules}");
            }
        }
    }
}
