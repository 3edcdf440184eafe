//! The guest's CPUID: the TSC-deadline timer, the host's brand string, and
//! the features `--cpu-features` and `[cpu] features` remove or add back.
//! A tiny guest runs CPUID and writes the raw registers to the serial port.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use vmm::cpu::{Feature, FEATURES};

/// The leaves (subleaf 0) the guest reports, in order.
const LEAVES: [u32; 6] = [1, 7, 0x8000_0001, 0x8000_0002, 0x8000_0003, 0x8000_0004];
/// Where the guest keeps CPUID's output before printing it.
const SCRATCH: u32 = 0x20_0000;

/// A guest that prints EAX, EBX, ECX and EDX of each leaf in [`LEAVES`]
/// (16 bytes per leaf, little-endian) and exits with debug-exit value 0.
fn cpuid_kernel() -> Vec<u8> {
    let mut asm = Asm::default();
    // Touch the scratch page once first: on PVM the first guest store to
    // a page has been seen to leave no trace.
    asm.store32(SCRATCH, 0);
    for leaf in LEAVES {
        asm.mov_eax(leaf)
            .bytes(&[0x31, 0xc9]) // xor ecx, ecx
            .bytes(&[0x0f, 0xa2]) // cpuid
            .bytes(&[0xa3]) // mov [SCRATCH], eax
            .bytes(&SCRATCH.to_le_bytes());
        for (modrm, at) in [(0x1d, 4u32), (0x0d, 8), (0x15, 12)] {
            // mov [SCRATCH + at], ebx / ecx / edx
            asm.bytes(&[0x89, modrm])
                .bytes(&(SCRATCH + at).to_le_bytes());
        }
        asm.mov_dx(0x3f8);
        for i in 0..16 {
            // mov al, [SCRATCH + i]; out dx, al
            asm.bytes(&[0xa0]).bytes(&(SCRATCH + i).to_le_bytes());
            asm.out_dx_al();
        }
    }
    asm.debug_exit(0);
    multiboot_kernel(0x10_0000, &[], &asm.finish(), 0)
}

/// What the guest saw: EAX..EDX of each leaf.
struct GuestCpuid(Vec<[u32; 4]>);

impl GuestCpuid {
    fn leaf(&self, leaf: u32) -> [u32; 4] {
        self.0[LEAVES.iter().position(|&l| l == leaf).unwrap()]
    }

    fn has(&self, name: &str) -> bool {
        let f = feature(name);
        self.has_feature(f)
    }

    fn has_feature(&self, f: &Feature) -> bool {
        let regs = self.leaf(f.leaf);
        let reg = match f.reg {
            vmm::cpu::Reg::Eax => regs[0],
            vmm::cpu::Reg::Ebx => regs[1],
            vmm::cpu::Reg::Ecx => regs[2],
            vmm::cpu::Reg::Edx => regs[3],
        };
        reg & (1 << f.bit) != 0
    }

    fn brand(&self) -> String {
        let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004)
            .flat_map(|l| self.leaf(l))
            .flat_map(u32::to_le_bytes)
            .collect();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).trim().to_string()
    }
}

fn feature(name: &str) -> &'static Feature {
    FEATURES.iter().find(|f| f.name == name).unwrap()
}

fn parse_output(out: &std::process::Output) -> GuestCpuid {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    assert_eq!(
        out.stdout.len(),
        LEAVES.len() * 16,
        "stdout: {:?}",
        out.stdout
    );
    let words: Vec<u32> = out
        .stdout
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    GuestCpuid(words.chunks(4).map(|r| [r[0], r[1], r[2], r[3]]).collect())
}

/// Boots the CPUID guest with `extra` flags and returns what it saw.
fn guest_cpuid(extra: &[&str]) -> GuestCpuid {
    parse_output(&boot_tiny(&cpuid_kernel(), extra))
}

fn host_model_name() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .expect("the host's /proc/cpuinfo has a model name")
}

#[test]
fn the_guest_has_the_tsc_deadline_timer_and_the_hosts_brand() {
    let cpuid = guest_cpuid(&[]);
    // This host's KVM (PVM included) has KVM_CAP_TSC_DEADLINE_TIMER; a
    // host without it fails here rather than skipping.
    assert!(
        cpuid.has("tsc_deadline_timer"),
        "leaf 1 ECX = {:#x}: no TSC-deadline bit (does this KVM lack KVM_CAP_TSC_DEADLINE_TIMER?)",
        cpuid.leaf(1)[2]
    );
    assert!(cpuid.has("hypervisor"));
    assert_eq!(cpuid.brand(), host_model_name());
}

#[test]
fn removed_features_are_gone_and_added_back_ones_return() {
    let plain = guest_cpuid(&[]);
    assert!(plain.has("x2apic") && plain.has("syscall"));
    let removed = guest_cpuid(&["--cpu-features", "-x2apic,-rdtscp,-syscall"]);
    assert!(!removed.has("x2apic"));
    assert!(!removed.has("rdtscp"));
    assert!(!removed.has("syscall"));
    assert!(removed.has("lm"), "features not named stay");
    assert_eq!(removed.brand(), plain.brand());

    let back = guest_cpuid(&["--cpu-features=-x2apic,-tsc_deadline_timer,+x2apic"]);
    assert!(back.has("x2apic"), "the last edit wins");
    assert!(!back.has("tsc_deadline_timer"));
    let added = guest_cpuid(&["--cpu-features", "-x2apic,+tsc_deadline_timer,+x2apic"]);
    assert!(added.has("tsc_deadline_timer") && added.has("x2apic"));
}

#[test]
fn the_guest_file_cpu_table_removes_features() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cpuid.elf"), cpuid_kernel()).unwrap();
    let file = dir.join("guest.toml");
    std::fs::write(
        &file,
        "kernel = \"cpuid.elf\"\nmemory = \"32M\"\n\n[cpu]\nfeatures = [\"-x2apic\"]\n",
    )
    .unwrap();
    let cpuid = parse_output(&ferrovisor(&["run", "--config", file.to_str().unwrap()]));
    assert!(!cpuid.has("x2apic"));
    assert!(cpuid.has("tsc_deadline_timer"));

    std::fs::write(
        &file,
        "kernel = \"cpuid.elf\"\n\n[cpu]\nfeatures = [\"-x2apic\", \"+warp\"]\n",
    )
    .unwrap();
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "ferrovisor: {}: cpu.features: 'warp' is not a CPU feature this VMM knows \
             (names as in /proc/cpuinfo flags)\n",
            file.display()
        )
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// One line on stderr (besides the PVM warning) and status 2.
fn assert_one_line(out: &std::process::Output, line: &str) {
    let err = stderr(out);
    let lines: Vec<_> = err.lines().filter(|l| !l.contains("warning:")).collect();
    assert_eq!(lines, [line], "stderr: {err}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unknown_feature_is_one_line_and_status_2() {
    let out = boot_tiny(&cpuid_kernel(), &["--cpu-features", "-x2apic,+warp"]);
    assert_one_line(
        &out,
        "ferrovisor: --cpu-features: 'warp' is not a CPU feature this VMM knows \
         (names as in /proc/cpuinfo flags)",
    );
    let out = boot_tiny(&cpuid_kernel(), &["--cpu-features", "x2apic"]);
    assert_one_line(
        &out,
        "ferrovisor: --cpu-features: 'x2apic' needs + (add) or - (remove) in front of the feature name",
    );
}

#[test]
fn adding_a_feature_the_host_lacks_is_one_line_and_status_2() {
    // A feature in the table that this host's guests do not get.
    let plain = guest_cpuid(&[]);
    let missing = FEATURES
        .iter()
        .find(|f| LEAVES.contains(&f.leaf) && f.subleaf == 0 && !plain.has_feature(f))
        .expect("some known feature is missing on this host");
    let flag = format!("+{}", missing.name);
    let out = boot_tiny(&cpuid_kernel(), &["--cpu-features", &flag]);
    assert_one_line(
        &out,
        &format!(
            "ferrovisor: CPU features: +{}: this host's KVM does not support that feature",
            missing.name
        ),
    );
}
