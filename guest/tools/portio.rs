//! `portio`: write one value to an x86 I/O port from user space.
//!
//! The guest kernel is built without `/dev/port`, so the guest kit carries this
//! tiny static helper instead. It is freestanding (no libc): the guest kit's
//! build compiles it with `rustc` alone.
//!
//! Usage: `portio outb|outw|outl PORT VALUE` (numbers in decimal or 0x-hex).
//! Exit status: 0 after the write, 1 on bad arguments, 2 if `ioperm` failed.
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
    main = sym portio_main,
);

const SYS_WRITE: usize = 1;
const SYS_IOPERM: usize = 173;
const SYS_EXIT_GROUP: usize = 231;

/// Invokes a Linux system call with up to three arguments.
///
/// # Safety
/// The caller must pass arguments that are valid for system call `nr`.
unsafe fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
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
        syscall3(SYS_EXIT_GROUP, code, 0, 0);
    }
    loop {}
}

fn fail(msg: &[u8]) -> ! {
    // SAFETY: the buffer is valid for `msg.len()` bytes for the call's duration.
    unsafe {
        syscall3(SYS_WRITE, 2, msg.as_ptr() as usize, msg.len());
    }
    exit(1)
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

fn parse_number(s: &[u8]) -> Option<u32> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        value = value.checked_mul(radix)?.checked_add(d)?;
    }
    Some(value)
}

#[no_mangle]
extern "C" fn portio_main(sp: *const usize) -> ! {
    const USAGE: &[u8] = b"usage: portio outb|outw|outl PORT VALUE\n";
    // SAFETY: at process entry the stack holds argc followed by argc pointers
    // to NUL-terminated argument strings (System V x86-64 ABI).
    let args = unsafe {
        let argc = *sp;
        if argc != 4 {
            fail(USAGE);
        }
        let argv = sp.add(1) as *const *const u8;
        [c_str(*argv.add(1)), c_str(*argv.add(2)), c_str(*argv.add(3))]
    };
    let width = match args[0] {
        b"outb" => 1,
        b"outw" => 2,
        b"outl" => 4,
        _ => fail(USAGE),
    };
    let (Some(port), Some(value)) = (parse_number(args[1]), parse_number(args[2])) else {
        fail(USAGE)
    };
    if port > 0xffff {
        fail(USAGE);
    }
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { syscall3(SYS_IOPERM, port as usize, width, 1) } != 0 {
        fail(b"portio: ioperm failed (needs CAP_SYS_RAWIO)\n");
    }
    let port = port as u16;
    // SAFETY: ioperm granted access to these ports; writing an I/O port has no
    // effect on this process's memory.
    unsafe {
        match width {
            1 => asm!("out dx, al", in("dx") port, in("al") value as u8, options(nostack)),
            2 => asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nostack)),
            _ => asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack)),
        }
    }
    exit(0)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(3)
}
