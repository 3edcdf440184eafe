//! Host KVM tests: tiny guests exercise exits, devices and exit statuses
//! through the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn serial_output_reaches_the_console() {
    let code = Asm::default()
        .print("hello from the guest\n")
        .debug_exit(0)
        .finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(stdout(&out), "hello from the guest\n");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn debug_exit_write_sets_the_process_status() {
    let code = Asm::default().debug_exit(0x10).finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(out.status.code(), Some(0x21), "stderr: {}", stderr(&out));
}

#[test]
fn narrow_debug_exit_write_is_zero_extended() {
    // out dx, al with al = 3 → status 7.
    let code = Asm::default().mov_dx(0xf4).mov_al(3).out_dx_al().finish();
    assert_eq!(boot_tiny(&code, &[]).status.code(), Some(7));
}

#[test]
fn i8042_reset_command_ends_the_run_cleanly() {
    let code = Asm::default()
        .mov_dx(0x64)
        .mov_al(0xfe)
        .out_dx_al()
        .cli_hlt()
        .finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn acpi_s5_write_powers_off() {
    // PM1a control: SLP_TYP = 5, SLP_EN.
    let value: u16 = (5 << 10) | (1 << 13);
    let code = Asm::default()
        .mov_dx(0x604)
        .bytes(&[0x66, 0xb8])
        .bytes(&value.to_le_bytes())
        .out_dx_ax()
        .cli_hlt()
        .finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn rtc_reports_valid_ram_and_time() {
    // Read CMOS register D: bit 7 (valid RAM and time) must be set.
    let code = Asm::default()
        .mov_dx(0x70)
        .mov_al(0x0d)
        .out_dx_al()
        .mov_dx(0x71)
        .in_al_dx()
        .bytes(&[0xa8, 0x80]) // test al, 0x80
        .jump(0x74, "bad") // jz bad
        .verdict(0x20)
        .finish();
    assert_eq!(boot_tiny(&code, &[]).status.code(), Some(0x41));
}

#[test]
fn unclaimed_port_reads_as_all_ones() {
    let code = Asm::default()
        .mov_dx(0x2e8)
        .in_al_dx()
        .bytes(&[0x3c, 0xff]) // cmp al, 0xff
        .jump(0x75, "bad") // jne bad
        .verdict(0x30)
        .finish();
    assert_eq!(boot_tiny(&code, &[]).status.code(), Some(0x61));
}

#[test]
fn halt_with_interrupts_disabled_is_reported() {
    let code = Asm::default().print("halting\n").cli_hlt().finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(stdout(&out), "halting\n");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("halted with interrupts disabled"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn triple_fault_is_reported_as_a_failure() {
    // ud2 with an IDT whose only entry is not present: #UD, #NP, #DF, shutdown.
    let code = Asm::default()
        .print("faulting\n")
        .bytes(&[0x0f, 0x0b])
        .finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(stdout(&out), "faulting\n");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("triple-faulted"), "stderr: {err}");
    assert_eq!(
        err.lines().filter(|l| !l.contains("warning")).count(),
        1,
        "one line: {err}"
    );
}

#[test]
fn pm_timer_counts_at_3_579545_mhz() {
    // The guest prints "A", spins on the PM timer (port 0x608, 32 bits)
    // until one second's worth of ticks has passed, then prints "B". The
    // host times the two lines: a correctness check of the rate, with a
    // generous tolerance, not a benchmark.
    const TICKS: u32 = 3_579_545;
    let code = Asm::default()
        .print("A\n")
        .mov_dx(0x608)
        .bytes(&[0xed]) // in eax, dx
        .bytes(&[0x89, 0xc3]) // mov ebx, eax
        .label("spin")
        .bytes(&[0xed]) // in eax, dx
        .bytes(&[0x29, 0xd8]) // sub eax, ebx (wraps like the counter)
        .bytes(&[0x3d])
        .bytes(&TICKS.to_le_bytes()) // cmp eax, TICKS
        .jump(0x72, "spin") // jb spin
        .print("B\n")
        .debug_exit(0x10)
        .finish();
    let kernel = write_temp("pmtimer.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // A guest whose timer never advances would spin forever: kill it
    // after a minute, unless the lines have all come by then.
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog_done = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !watchdog_done.load(std::sync::atomic::Ordering::SeqCst) {
            if std::time::Instant::now() > deadline {
                // SAFETY: kill has no memory-safety preconditions; the child
                // is not reaped before `done` is set, so the pid is its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    let lines: Vec<(String, std::time::Instant)> = {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map(|l| (l.unwrap(), std::time::Instant::now()))
            .collect()
    };
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0x21));
    let seen: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(seen, ["A", "B"]);
    let elapsed = lines[1].1 - lines[0].1;
    assert!(
        (0.9..1.1).contains(&elapsed.as_secs_f64()),
        "one second of PM timer ticks took {elapsed:?} of host time"
    );
}
