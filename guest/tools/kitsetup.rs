//! `kitsetup`: the guest kit's /init chores that would otherwise each start
//! a busybox process: mounting the early filesystems, loading the kit's
//! modules, and powering off.
//!
//! Every process that links a C library probes the CPU with dozens of
//! `cpuid` instructions at start, and each one is a VM exit. This helper is
//! freestanding (no libc, like `portio`), so it costs the guest none, and one
//! run of it loads every module where `insmod` took a process per module.
//!
//! Usage:
//!   kitsetup mounts            proc on /proc, sysfs on /sys, devtmpfs on
//!                              /dev, tmpfs on /tmp (each failure is skipped)
//!   kitsetup modules LIST DIR  load DIR/NAME.ko for each NAME line of LIST,
//!                              in order; a missing or refused module is
//!                              skipped quietly, as the kit's modules are
//!                              optional
//!   kitsetup poweroff          sync, then power the machine off
//!   kitsetup run PROGRAM [ARGS...]
//!                              run PROGRAM (a path, or a name looked up in
//!                              /bin, /usr/bin, /sbin, /usr/sbin) with SIGINT
//!                              and SIGQUIT at their default action: a shell
//!                              without job control starts its background
//!                              jobs with both ignored and cannot undo it
//! Exit status: 0, or 1 on bad arguments, 2 when LIST cannot be read, 127
//! when PROGRAM cannot run.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

// The process entry point: hand the initial stack pointer (argc, argv...) to Rust.
global_asm!(
    ".globl _start",
    "_start:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym kitsetup_main,
);

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_OPEN: usize = 2;
const SYS_CLOSE: usize = 3;
const SYS_SYNC: usize = 162;
const SYS_MOUNT: usize = 165;
const SYS_REBOOT: usize = 169;
const SYS_EXIT_GROUP: usize = 231;
const SYS_RT_SIGACTION: usize = 13;
const SYS_EXECVE: usize = 59;
const SIGINT: usize = 2;
const SIGQUIT: usize = 3;
const SYS_FINIT_MODULE: usize = 313;

const O_RDONLY_CLOEXEC: usize = 0o2_000_000;
const REBOOT_MAGIC1: usize = 0xfee1_dead;
const REBOOT_MAGIC2: usize = 672_274_793;
const REBOOT_POWER_OFF: usize = 0x4321_fedc;

/// Invokes a Linux system call with up to five arguments.
///
/// # Safety
/// The caller must pass arguments that are valid for system call `nr`.
unsafe fn syscall5(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller guarantees the arguments suit the system call; the
    // registers the kernel clobbers (rcx, r11) are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            in("r8") e,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

fn exit(code: usize) -> ! {
    // SAFETY: exit_group takes a plain integer and does not return.
    unsafe {
        syscall5(SYS_EXIT_GROUP, code, 0, 0, 0, 0);
    }
    loop {}
}

fn fail(msg: &[u8], code: usize) -> ! {
    // SAFETY: the buffer is valid for `msg.len()` bytes for the call's duration.
    unsafe {
        syscall5(SYS_WRITE, 2, msg.as_ptr() as usize, msg.len(), 0, 0);
    }
    exit(code)
}

/// Returns the NUL-terminated string at `p` as a byte slice.
///
/// # Safety
/// `p` must point to a NUL-terminated string that outlives the program.
unsafe fn c_str(p: *const u8) -> &'static [u8] {
    let mut len = 0;
    // SAFETY: the caller guarantees a terminating NUL within the allocation.
    unsafe {
        // A volatile read keeps the compiler from turning this loop into a
        // call to `strlen`, which does not exist without libc.
        while core::ptr::read_volatile(p.add(len)) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(p, len)
    }
}

/// A path built in a fixed buffer, NUL-terminated.
struct PathBuf {
    bytes: [u8; 256],
    len: usize,
}

impl PathBuf {
    fn new() -> Self {
        PathBuf {
            bytes: [0; 256],
            len: 0,
        }
    }

    /// Appends `part`; false when the path would not fit.
    fn push(&mut self, part: &[u8]) -> bool {
        if self.len + part.len() >= self.bytes.len() {
            return false;
        }
        let mut i = 0;
        while i < part.len() {
            self.bytes[self.len + i] = part[i];
            i += 1;
        }
        self.len += part.len();
        self.bytes[self.len] = 0;
        true
    }

    fn as_ptr(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
}

fn mount(source: &[u8], target: &[u8], fstype: &[u8]) {
    // Each argument is a NUL-terminated literal.
    // SAFETY: the three strings are valid and NUL-terminated; mount reads them.
    unsafe {
        syscall5(
            SYS_MOUNT,
            source.as_ptr() as usize,
            target.as_ptr() as usize,
            fstype.as_ptr() as usize,
            0,
            0,
        );
    }
}

fn mounts() -> ! {
    mount(b"proc\0", b"/proc\0", b"proc\0");
    mount(b"sysfs\0", b"/sys\0", b"sysfs\0");
    mount(b"devtmpfs\0", b"/dev\0", b"devtmpfs\0");
    mount(b"tmpfs\0", b"/tmp\0", b"tmpfs\0");
    exit(0)
}

/// Loads DIR/NAME.ko; failures are skipped.
fn load_module(dir: &[u8], name: &[u8]) {
    let mut path = PathBuf::new();
    if !(path.push(dir) && path.push(b"/") && path.push(name) && path.push(b".ko")) {
        return;
    }
    // SAFETY: `path` is NUL-terminated and lives across the call.
    let fd = unsafe { syscall5(SYS_OPEN, path.as_ptr(), O_RDONLY_CLOEXEC, 0, 0, 0) };
    if fd < 0 {
        return;
    }
    let no_params = b"\0";
    // SAFETY: `fd` is an open module file and the parameter string is a
    // NUL-terminated literal.
    unsafe {
        syscall5(SYS_FINIT_MODULE, fd as usize, no_params.as_ptr() as usize, 0, 0, 0);
        syscall5(SYS_CLOSE, fd as usize, 0, 0, 0, 0);
    }
}

fn modules(list: &[u8], dir: &[u8]) -> ! {
    let mut path = PathBuf::new();
    if !path.push(list) {
        fail(b"kitsetup: module list path too long\n", 1);
    }
    // SAFETY: `path` is NUL-terminated and lives across the call.
    let fd = unsafe { syscall5(SYS_OPEN, path.as_ptr(), O_RDONLY_CLOEXEC, 0, 0, 0) };
    if fd < 0 {
        fail(b"kitsetup: cannot open the module list\n", 2);
    }
    let mut text = [0u8; 4096];
    let mut len = 0;
    while len < text.len() {
        // SAFETY: the buffer has `text.len() - len` bytes free from `len`.
        let n = unsafe {
            syscall5(
                SYS_READ,
                fd as usize,
                text.as_mut_ptr() as usize + len,
                text.len() - len,
                0,
                0,
            )
        };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: `fd` is this process's open file.
    unsafe {
        syscall5(SYS_CLOSE, fd as usize, 0, 0, 0, 0);
    }
    for line in text[..len].split(|&b| b == b'\n') {
        if !line.is_empty() {
            load_module(dir, line);
        }
    }
    exit(0)
}

fn poweroff() -> ! {
    // SAFETY: sync and reboot take plain integers; reboot needs the magic
    // numbers and does not return when it powers off.
    unsafe {
        syscall5(SYS_SYNC, 0, 0, 0, 0, 0);
        syscall5(
            SYS_REBOOT,
            REBOOT_MAGIC1,
            REBOOT_MAGIC2,
            REBOOT_POWER_OFF,
            0,
            0,
        );
    }
    fail(b"kitsetup: power-off failed\n", 2)
}

/// Resets SIGINT and SIGQUIT, then executes `argv[0]` with `argv` and
/// `envp` (both NULL-terminated arrays from this process's own stack).
///
/// # Safety
/// `argv` and `envp` must be the NULL-terminated pointer arrays of the
/// process's initial stack, and `argv[0]` must not be NULL.
unsafe fn run(argv: *const *const u8, envp: *const *const u8) -> ! {
    // The kernel's sigaction: handler, flags, restorer, mask; all zero is
    // SIG_DFL with no flags.
    let default_action = [0usize; 4];
    for signum in [SIGINT, SIGQUIT] {
        // SAFETY: the action is valid for reading, no old action is asked
        // for, and the mask size is the kernel's 8 bytes.
        unsafe {
            syscall5(
                SYS_RT_SIGACTION,
                signum,
                default_action.as_ptr() as usize,
                0,
                8,
                0,
            );
        }
    }
    // SAFETY: the caller guarantees argv[0] is a valid string.
    let program = unsafe { c_str(*argv) };
    let dirs: &[&[u8]] = if program.contains(&b'/') {
        &[b""]
    } else {
        &[b"/bin/", b"/usr/bin/", b"/sbin/", b"/usr/sbin/"]
    };
    for dir in dirs {
        let mut path = PathBuf::new();
        if path.push(dir) && path.push(program) {
            // SAFETY: `path` is NUL-terminated; argv and envp come from the
            // initial stack. execve returns only on failure.
            unsafe {
                syscall5(SYS_EXECVE, path.as_ptr(), argv as usize, envp as usize, 0, 0);
            }
        }
    }
    fail(b"kitsetup: cannot run the program\n", 127)
}

#[no_mangle]
extern "C" fn kitsetup_main(sp: *const usize) -> ! {
    const USAGE: &[u8] =
        b"usage: kitsetup mounts | modules LIST DIR | poweroff | run PROGRAM [ARGS...]\n";
    // SAFETY: at process entry the stack holds argc followed by argc pointers
    // to NUL-terminated argument strings (System V x86-64 ABI).
    let (argc, argv) = unsafe { (*sp, sp.add(1) as *const *const u8) };
    // SAFETY: argv holds `argc` valid string pointers.
    let arg = |i: usize| unsafe { c_str(*argv.add(i)) };
    match (argc, if argc > 1 { arg(1) } else { b"" }) {
        (2, b"mounts") => mounts(),
        (4, b"modules") => modules(arg(2), arg(3)),
        (2, b"poweroff") => poweroff(),
        // SAFETY: argv[2..] and the environment after argv's NULL are the
        // initial stack's arrays; argc > 2 makes argv[2] a string.
        (3.., b"run") => unsafe { run(argv.add(2), argv.add(argc + 1)) },
        _ => fail(USAGE, 1),
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(3)
}

// Without a C library the compiler's own calls for filling and copying
// memory land here. Volatile accesses keep these loops from being turned
// back into calls to themselves.

/// # Safety
/// `dest` must be valid for `n` bytes of writes.
#[no_mangle]
unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
        unsafe { core::ptr::write_volatile(dest.add(i), c as u8) };
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
        unsafe { core::ptr::write_volatile(dest.add(i), core::ptr::read_volatile(src.add(i))) };
    }
    dest
}

/// Referenced by the precompiled core library's unwind tables; with
/// `panic=abort` nothing ever unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
