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
fn triple_fault_is_reported_as_a_failure_with_a_register_dump() {
    // ud2 with an IDT whose only entry is not present: #UD, #NP, #DF, shutdown.
    let code = Asm::default()
        .print("faulting\n")
        .bytes(&[0x0f, 0x0b])
        .finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(stdout(&out), "faulting\n");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("ferrovisor:") && !l.contains("warning"))
        .collect();
    assert_eq!(
        own,
        ["ferrovisor: vCPU 0 triple-faulted"],
        "one line: {err}"
    );
    // The code is loaded at 1 MiB: the faulting ud2 is just past the print.
    let rip = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("rip="))
        .and_then(|v| u64::from_str_radix(&v[2..18], 16).ok())
        .unwrap_or_else(|| panic!("no rip in: {err}"));
    assert!((0x10_0000..0x10_1000).contains(&rip), "rip {rip:#x}: {err}");
    assert!(err.contains("  cs   sel="), "segments: {err}");
    assert!(err.contains("cr0="), "control registers: {err}");
    assert!(err.contains("exception: injected="), "events: {err}");
    // The print went out through the UART: its last exits show it.
    assert!(
        err.contains("out port 0x03f8 len 1 value 0x0a"),
        "exits: {err}"
    );
}

#[test]
fn a_triple_fault_leaves_its_dump_in_the_runtime_directory() {
    let code = Asm::default().bytes(&[0x0f, 0x0b]).finish();
    let dir = write_temp("dump-dir", b"");
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let out = boot_tiny(&code, &["--runtime-dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let saved = std::fs::read_to_string(dir.join("vcpu-dump.txt")).unwrap();
    assert!(
        saved.starts_with("vCPU 0 state at the exit (vCPU 0 triple-faulted):\n"),
        "{saved}"
    );
    assert!(saved.contains("rip=0x00000000001"), "{saved}");
    assert!(stderr(&out).contains("vcpu-dump.txt"), "{}", stderr(&out));
    let record = std::fs::read_to_string(dir.join("exit.json")).unwrap();
    assert!(record.contains("triple-faulted"), "{record}");
}

/// The `"key":"value"` string of the `--stats` line.
fn stats_string(err: &str, key: &str) -> Option<String> {
    let line = err.lines().find(|l| l.starts_with("ferrovisor-stats:"))?;
    let quoted = format!("\"{key}\":\"");
    let rest = &line[line.find(&quoted)? + quoted.len()..];
    Some(rest[..rest.find('"')?].to_string())
}

#[test]
fn anonymous_and_memfd_backings_both_boot_and_are_reported() {
    let code = Asm::default().print("up\n").debug_exit(0).finish();
    for (flag, reported) in [
        ("anonymous", "anonymous"),
        ("memfd", "memfd"),
        ("auto", "anonymous"),
    ] {
        let out = boot_tiny(&code, &["--memory-backing", flag, "--stats"]);
        let err = stderr(&out);
        assert_eq!(stdout(&out), "up\n", "{flag}: {err}");
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert_eq!(
            stats_string(&err, "memory_backing").as_deref(),
            Some(reported),
            "{flag}: {err}"
        );
    }
}

#[test]
fn hugepages_without_a_reserved_pool_are_refused_in_one_line() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map(|t| t.trim().parse().unwrap_or(0))
            .unwrap_or(0);
    // 32 MiB of guest RAM needs 16 pages of 2 MiB.
    assert!(
        free < 16,
        "this host has {free} free 2 MiB pages reserved; the test needs fewer"
    );
    let code = Asm::default().debug_exit(0).finish();
    let out = boot_tiny(&code, &["--hugepages", "2M"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let own: Vec<&str> = err.lines().filter(|l| !l.contains("warning")).collect();
    assert_eq!(own.len(), 1, "{err}");
    assert!(
        own[0].contains("needs 16 free huge pages of 2M and the host has"),
        "{err}"
    );
}

/// The `"key":number` of the `--stats` line.
fn stats_number(err: &str, key: &str) -> Option<u64> {
    let line = err.lines().find(|l| l.starts_with("ferrovisor-stats:"))?;
    let quoted = format!("\"{key}\":");
    let rest = &line[line.find(&quoted)? + quoted.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[test]
fn index_writes_are_buffered_without_exits_and_applied_in_order() {
    // CMOS NVRAM byte 0x40 := 0x5a (the data write exits); then 100 index
    // writes to 0x41, which KVM buffers; then index 0x40 again and a read,
    // which must see 0x5a: the buffered writes reached the RTC in order.
    let mut asm = Asm::default();
    asm.mov_dx(0x70).mov_al(0x40).out_dx_al();
    asm.mov_dx(0x71).mov_al(0x5a).out_dx_al();
    asm.mov_dx(0x70);
    for _ in 0..100 {
        asm.mov_al(0x41).out_dx_al();
    }
    asm.mov_al(0x40).out_dx_al();
    asm.mov_dx(0x71).in_al_dx();
    asm.bytes(&[0x3c, 0x5a]) // cmp al, 0x5a
        .jump(0x75, "bad") // jne bad
        .verdict(0x20);
    let out = boot_tiny(&asm.finish(), &["--stats"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0x41), "{err}");
    let io = stats_number(&err, "exits_io").expect("exits_io in the stats");
    // Two index writes and two data accesses would exit without buffering,
    // plus the verdict's debug-exit write; the 101 index writes do not.
    assert!(io < 20, "{io} port exits: {err}");
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
