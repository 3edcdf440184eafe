//! Lab tier: Debian's stock kernel with the guest kit, booted by Ferrovisor in
//! the lab. Plain `cargo test` lists these as ignored; `cargo xtask test` runs
//! them inside one lab boot with `--ignored`.

use lab_tests::{run_guest, tail, Exit, Guest, GuestConfig, KernelImage, INIT_MARKER};

fn describe(exit: &Exit) -> String {
    format!(
        "VMM {}\n--- console (tail) ---\n{}\n--- VMM stderr ---\n{}",
        exit.status,
        tail(&exit.console, 40),
        tail(&exit.stderr, 10)
    )
}

fn boot(config: GuestConfig) -> Exit {
    match run_guest(&config) {
        Ok(exit) => exit,
        Err(e) => panic!("guest with cmdline {:?}: {e}", config.cmdline()),
    }
}

fn running(run: &str) -> GuestConfig {
    GuestConfig {
        run: Some(run.to_string()),
        ..GuestConfig::default()
    }
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn bzimage_with_one_vcpu_reaches_init_and_powers_off() {
    let exit = boot(running("echo hello-from-guest"));
    let d = describe(&exit);
    assert!(exit.console.contains(INIT_MARKER), "{d}");
    assert!(exit.command_output().contains(&"hello-from-guest"), "{d}");
    assert_eq!(exit.reported_status(), Some(0), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn pvh_with_two_vcpus_guest_sees_two_processors() {
    let exit = boot(GuestConfig {
        image: KernelImage::Pvh,
        cpus: 2,
        ..running("echo cpus=$(grep -c ^processor /proc/cpuinfo)")
    });
    let d = describe(&exit);
    assert!(exit.console.contains(INIT_MARKER), "{d}");
    assert!(exit.command_output().contains(&"cpus=2"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn bzimage_with_two_vcpus_guest_sees_two_processors() {
    let exit = boot(GuestConfig {
        cpus: 2,
        ..running("echo cpus=$(grep -c ^processor /proc/cpuinfo)")
    });
    let d = describe(&exit);
    assert!(exit.command_output().contains(&"cpus=2"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

/// The lab machine's own model name, which its guests should see too.
fn lab_model_name() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guest_cpu_has_the_tsc_deadline_timer_and_the_hosts_model_name() {
    let exit = boot(running(
        "echo \"model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-)\"; \
         grep -qw tsc_deadline_timer /proc/cpuinfo && echo tsc-deadline=yes || echo tsc-deadline=no",
    ));
    let d = describe(&exit);
    let out = exit.command_output();
    let host = lab_model_name();
    assert!(!host.is_empty(), "the lab has no model name");
    let guest = out.iter().find_map(|l| l.strip_prefix("model="));
    assert_eq!(guest.map(str::trim), Some(host.as_str()), "{d}");
    assert!(out.contains(&"tsc-deadline=yes"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn removed_cpu_features_are_not_in_the_guests_flags() {
    let exit = boot(GuestConfig {
        cpu_features: Some("-x2apic,-tsc_deadline_timer,-avx2".into()),
        ..running(
            "for f in x2apic tsc_deadline_timer avx2 lm; do \
             grep -qw $f /proc/cpuinfo && echo has-$f || echo no-$f; done",
        )
    });
    let d = describe(&exit);
    let out = exit.command_output();
    for line in ["no-x2apic", "no-tsc_deadline_timer", "no-avx2", "has-lm"] {
        assert!(out.contains(&line), "{line}: {d}");
    }
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guest_sees_its_memory_size() {
    let exit = boot(GuestConfig {
        memory: "384M".to_string(),
        ..running("grep MemTotal /proc/meminfo")
    });
    let d = describe(&exit);
    let kib: u64 = exit
        .command_output()
        .iter()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line\n{d}"));
    // The kernel keeps some memory for itself; what is left must be most of it.
    let mib = kib / 1024;
    assert!(
        (300..=384).contains(&mib),
        "MemTotal {mib} MiB for 384M\n{d}"
    );
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guest_sees_its_command_line() {
    let exit = boot(GuestConfig {
        extra_cmdline: vec!["ferrovisor.labtest=cmdline-42".to_string()],
        ..running("cat /proc/cmdline")
    });
    let d = describe(&exit);
    let line = exit
        .command_output()
        .into_iter()
        .find(|l| l.contains("console=ttyS0"))
        .unwrap_or_else(|| panic!("no /proc/cmdline output\n{d}"));
    assert!(line.contains("ferrovisor.labtest=cmdline-42"), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn poweroff_in_the_guest_ends_the_vmm_with_status_zero() {
    let exit = boot(running("echo powering-off; poweroff -f; sleep 600"));
    let d = describe(&exit);
    assert!(exit.command_output().contains(&"powering-off"), "{d}");
    // The guest went down before /init could report the command's end.
    assert_eq!(exit.reported_status(), None, "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn debug_exit_port_carries_the_command_status() {
    let exit = boot(GuestConfig {
        debug_exit: true,
        ..running("exit 7")
    });
    let d = describe(&exit);
    assert_eq!(exit.reported_status(), Some(7), "{d}");
    assert_eq!(exit.status.code(), Some((7 << 1) | 1), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn kernel_panic_ends_the_vmm_with_a_failure() {
    // The guest kit loads pvpanic, so the panic reaches the VMM through the
    // pvpanic port before the kernel's own reboot (panic=-1) would.
    let exit = boot(running("echo c > /proc/sysrq-trigger"));
    let d = describe(&exit);
    assert!(exit.console.contains("Kernel panic"), "{d}");
    assert_eq!(exit.status.code(), Some(2), "{d}");
    assert!(exit.stderr.contains("guest kernel panicked"), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn triple_fault_in_the_guest_ends_the_vmm_with_a_failure() {
    // reboot=t reboots through a triple fault; the VMM tells that apart from
    // an orderly reboot.
    let exit = boot(GuestConfig {
        extra_cmdline: vec!["reboot=t".to_string()],
        ..running("reboot -f")
    });
    let d = describe(&exit);
    assert_eq!(exit.status.code(), Some(2), "{d}");
    assert!(exit.stderr.contains("triple-faulted"), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn reboot_in_the_guest_ends_the_vmm_with_status_zero() {
    let exit = boot(running("echo rebooting; reboot -f; sleep 600"));
    let d = describe(&exit);
    assert!(exit.command_output().contains(&"rebooting"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    assert!(!exit.stderr.contains("triple"), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn serial_console_takes_input() {
    let mut guest = Guest::start(&GuestConfig::default()).expect("start the VMM");
    guest.wait_for("guest# ").expect("the shell prompt");
    guest
        .send("echo sum=$((40 + 2))\n")
        .expect("type a command");
    guest.wait_for("sum=42").expect("the command's output");
    guest.send("poweroff -f\n").expect("type poweroff");
    let exit = guest.wait_exit().expect("the VMM exits");
    assert_eq!(exit.status.code(), Some(0), "{}", describe(&exit));
}
