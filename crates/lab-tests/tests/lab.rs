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
fn guest_sees_the_firmware_tables() {
    // SMBIOS (DMI) with the configured UUID, the PM timer from the FADT, and
    // the legacy devices the DSDT describes, as PNP devices.
    let uuid = "6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b";
    let dmi = "/sys/class/dmi/id";
    let exit = boot(GuestConfig {
        uuid: Some(uuid.to_string()),
        ..running(&format!(
            "for f in sys_vendor product_name product_uuid product_serial; do \
               echo dmi.$f=$(cat {dmi}/$f); done; \
             echo pnp=$(cat /sys/bus/pnp/devices/*/id); \
             dmesg | grep -e DMI -e PM-Timer | sed 's/^[^]]*] /dmesg: /'"
        ))
    });
    let d = describe(&exit);
    let out = exit.command_output();
    for expected in [
        "dmi.sys_vendor=Ferrovisor".to_string(),
        "dmi.product_name=Ferrovisor VM".to_string(),
        format!("dmi.product_uuid={uuid}"),
        "dmi.product_serial=6f1c2e3d".to_string(),
    ] {
        assert!(out.contains(&expected.as_str()), "no '{expected}'\n{d}");
    }
    assert!(!out.iter().any(|l| l.contains("DMI not present")), "{d}");
    assert!(
        out.iter()
            .any(|l| l.starts_with("dmesg: DMI: Ferrovisor Ferrovisor VM")),
        "{d}"
    );
    assert!(
        out.iter()
            .any(|l| l.starts_with("dmesg:") && l.contains("PM-Timer IO Port: 0x608")),
        "{d}"
    );
    let pnp = out
        .iter()
        .find_map(|l| l.strip_prefix("pnp="))
        .unwrap_or_else(|| panic!("no PNP list\n{d}"))
        .to_uppercase();
    for id in ["PNP0303", "PNP0501", "PNP0B00"] {
        assert!(pnp.contains(id), "{id} not in {pnp}\n{d}");
    }
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
    // The dump follows the line: registers, segments and the last exits.
    assert!(exit.stderr.contains("rip=0x"), "{d}");
    assert!(exit.stderr.contains("  cs   sel="), "{d}");
    assert!(exit.stderr.contains("last exits to the VMM"), "{d}");
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

/// KVM's count of nested page faults handled, summed over the VMs that
/// exist (debugfs, mounted by the lab's init).
fn nested_faults() -> u64 {
    std::fs::read_to_string("/sys/kernel/debug/kvm/pf_taken")
        .expect("KVM's debugfs counters")
        .trim()
        .parse()
        .expect("a number")
}

/// The VMM's guest RAM mappings (64 MiB or more) from its smaps: resident
/// and on transparent huge pages, in KiB.
fn guest_ram_in_smaps(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut resident, mut huge, mut big) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or("");
        let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match key {
            "Size:" => big = kib >= 64 << 10,
            "Rss:" if big => resident += kib,
            "AnonHugePages:" | "ShmemPmdMapped:" if big => huge += kib,
            _ => {}
        }
    }
    (resident, huge)
}

/// Boots the kit to its shell with `extra` flags, and reads the nested page
/// faults taken so far and the guest RAM mappings, then powers off.
fn faults_and_ram_at_the_shell(extra: &[&str]) -> (u64, (u64, u64), Exit) {
    let before = nested_faults();
    let mut guest = Guest::start(&GuestConfig {
        image: KernelImage::Pvh,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..GuestConfig::default()
    })
    .expect("start the VMM");
    guest.wait_for("guest# ").expect("the shell prompt");
    let faults = nested_faults().saturating_sub(before);
    let ram = guest_ram_in_smaps(guest.pid());
    guest.send("poweroff -f\n").expect("type poweroff");
    (faults, ram, guest.wait_exit().expect("the VMM exits"))
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn the_guest_kit_boots_on_huge_pages_with_few_nested_faults() {
    let (faults, (resident, huge), exit) = faults_and_ram_at_the_shell(&[]);
    let d = describe(&exit);
    assert_eq!(exit.status.code(), Some(0), "{d}");
    // On 4 KiB pages the same boot takes about 21,000 nested faults.
    assert!(faults < 2_000, "{faults} nested page faults: {d}");
    assert!(resident > 16 << 10, "{resident} KiB of guest RAM resident");
    assert!(
        huge * 2 > resident,
        "{huge} of {resident} KiB of guest RAM on huge pages"
    );
    assert!(!exit.stderr.contains("no huge pages"), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn a_shared_memfd_guest_says_once_why_it_has_no_huge_pages() {
    // The lab keeps Debian's default: shmem_enabled = never.
    let (faults, (resident, huge), exit) =
        faults_and_ram_at_the_shell(&["--memory-backing", "memfd"]);
    let d = describe(&exit);
    assert_eq!(exit.status.code(), Some(0), "{d}");
    let why: Vec<&str> = exit
        .stderr
        .lines()
        .filter(|l| l.contains("gets no huge pages"))
        .collect();
    assert_eq!(why.len(), 1, "{d}");
    assert!(why[0].contains("shmem_enabled is never"), "{d}");
    assert_eq!(huge, 0, "{resident} KiB resident");
    assert!(faults > 2_000, "{faults} nested page faults on 4 KiB pages");
}
