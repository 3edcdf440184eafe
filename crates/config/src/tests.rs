//! Unit tests of the guest and system files: what each key means, and one
//! test per error, each checking the exact line a user sees.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use vmm::config::{ConsoleMode, DiskConfig, NetConfig, VsockConfig, DEFAULT_CMDLINE};

use super::*;
use vmm::rate::RateSpec;

const BASE: &str = "/srv/guests";

fn guest(text: &str) -> Result<VmConfig, FileError> {
    parse_guest(text, "guest.toml", Path::new(BASE))
}

fn guest_err(text: &str) -> String {
    guest(text).unwrap_err().to_string()
}

fn system(text: &str) -> Result<System, FileError> {
    parse_system(text, "system.toml", Path::new(BASE))
}

fn system_err(text: &str) -> String {
    system(text).unwrap_err().to_string()
}

const FULL: &str = r#"
kernel = "vmlinuz"
initramfs = "/boot/initrd.img"
cmdline = "console=hvc0 quiet"
cpus = 2
memory = "1G"
console = "virtio"
rng = true
affinity = ["0", "1-3"]
uuid = "6F1C2E3D-4b5a-4978-8a1b-0c2d3e4f5a6b"
seccomp = "log"
netns = "guests"

[[disk]]
path = "root.img"
readonly = true

[[disk]]
path = "data.img"
rate = { bandwidth = "20MiB/s", ops = 500, burst = "64MiB", refill_time = "50ms" }

[[net]]
tap = "fv0"
mac = "52:54:00:12:34:56"
rx_rate = { bandwidth = "100Mbit/s" }
tx_rate = { ops = 1000, ops_burst = 100 }

[vsock]
cid = 7
socket = "v.sock"

[cpu]
features = ["-x2apic", "+rdtscp", "-rdtscp"]
"#;

#[test]
fn a_full_guest_file_fills_every_field() {
    let c = guest(FULL).unwrap();
    assert_eq!(c.kernel, PathBuf::from("/srv/guests/vmlinuz"));
    assert_eq!(c.initramfs, Some(PathBuf::from("/boot/initrd.img")));
    assert_eq!(c.cmdline, "console=hvc0 quiet");
    assert_eq!((c.cpus, c.memory), (2, 1 << 30));
    assert_eq!(c.console, ConsoleMode::Virtio);
    assert!(c.rng);
    assert_eq!(c.affinity, vec![vec![0], vec![1, 2, 3]]);
    assert_eq!(
        c.uuid.map(|u| u.to_string()).as_deref(),
        Some("6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b")
    );
    assert_eq!(c.netns.as_deref(), Some("guests"));
    assert_eq!(
        c.disks,
        vec![
            DiskConfig {
                path: "/srv/guests/root.img".into(),
                readonly: true,
                rate: Default::default(),
            },
            DiskConfig {
                path: "/srv/guests/data.img".into(),
                readonly: false,
                rate: RateSpec {
                    bandwidth: Some(20 << 20),
                    burst: Some(64 << 20),
                    ops: Some(500),
                    ops_burst: None,
                    refill_time: Some(std::time::Duration::from_millis(50)),
                },
            }
        ]
    );
    assert_eq!(
        c.nets,
        vec![NetConfig {
            attach: vmm::config::NetAttach::Tap("fv0".into()),
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            rx_rate: RateSpec {
                bandwidth: Some(12_500_000),
                ..RateSpec::default()
            },
            tx_rate: RateSpec {
                ops: Some(1000),
                ops_burst: Some(100),
                ..RateSpec::default()
            },
        }]
    );
    assert_eq!(
        c.vsock,
        Some(VsockConfig {
            cid: 7,
            socket: "/srv/guests/v.sock".into(),
            route: None,
        })
    );
    let features: Vec<String> = c.cpu_features.iter().map(ToString::to_string).collect();
    assert_eq!(features, ["-x2apic", "+rdtscp", "-rdtscp"], "kept in order");
    assert_eq!(c.seccomp, vmm::SeccompMode::Log);
}

#[test]
fn a_minimal_guest_file_takes_the_run_defaults() {
    let c = guest("kernel = \"k\"").unwrap();
    assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    assert_eq!((c.cpus, c.memory), (1, 512 << 20));
    assert_eq!(c.console, ConsoleMode::Serial);
    assert!(!c.rng && c.disks.is_empty() && c.nets.is_empty() && c.vsock.is_none());
    assert!(c.affinity.is_empty());
    assert!(c.cpu_features.is_empty());
    assert_eq!(c.uuid, None, "a random one at each run");
    assert_eq!(c.seccomp, vmm::SeccompMode::On, "filters on by default");
}

#[test]
fn memory_may_be_a_byte_count() {
    assert_eq!(
        guest("kernel = \"k\"\nmemory = 33554432").unwrap().memory,
        32 << 20
    );
}

#[test]
fn one_affinity_string_pins_every_vcpu() {
    let c = guest("kernel = \"k\"\ncpus = 3\naffinity = \"0,2\"").unwrap();
    assert_eq!(c.affinity, vec![vec![0, 2]; 3]);
}

#[test]
fn any_leaves_one_vcpu_unpinned() {
    let c = guest("kernel = \"k\"\ncpus = 2\naffinity = [\"any\", \"1\"]").unwrap();
    assert_eq!(c.affinity, vec![vec![], vec![1]]);
}

#[test]
fn written_toml_reads_back_to_the_same_config() {
    for text in [
        FULL,
        "kernel = \"k\"",
        "kernel = \"k\"\ncpus = 2\naffinity = \"3\"\nmemory = 16781312",
        "kernel = \"k\"\nmemory_backing = \"memfd\"\nhugepages = \"2M\"",
        "kernel = \"k\"\nseccomp = \"off\"",
        "kernel = \"a \\\"quoted\\\" path\"\ncmdline = \"x='1' \\\\ y\"\naffinity = [\"any\"]",
        "kernel = \"k\"\n[[region]]\npath = \"/dev/shm/r\"\nid = 65535\nreadonly = true",
    ] {
        assert_reads_back(text);
    }
}

/// Parses `text`, writes it back, and checks the written text parses to the same.
fn assert_reads_back(text: &str) {
    let first = guest(text).unwrap();
    let written = to_guest_toml(&first);
    let again = parse_guest(&written, "written.toml", Path::new("/elsewhere")).unwrap();
    assert_eq!(again, first, "{written}");
}

#[test]
fn a_written_system_reads_back_with_guests_inline() {
    let text = format!(
        "[guests.web]\nstart = \"held\"\n{}\n[guests.db]\nkernel = \"k\"\n",
        FULL.replace("[[", "[[guests.web.")
            .replace("[vsock]", "[guests.web.vsock]")
            .replace("[cpu]", "[guests.web.cpu]")
    );
    let first = system(&text).unwrap();
    let written = to_system_toml(&first);
    let again = parse_system(&written, "written.toml", Path::new("/elsewhere")).unwrap();
    assert_eq!(again, first, "{written}");
}

#[test]
fn memory_is_written_with_a_suffix_when_exact() {
    let c = guest("kernel = \"k\"\nmemory = \"2G\"").unwrap();
    assert!(to_guest_toml(&c).contains("memory = \"2G\""));
}

#[test]
fn syntax_errors_give_line_and_column() {
    assert!(guest_err("kernel = \"k\"\ncpus = = 2").starts_with("guest.toml: line 2, column "));
    let err = guest_err("kernel = \"k\"\nkernel = \"j\"");
    assert!(err.starts_with("guest.toml: line 2, column 1: "), "{err}");
    assert!(!err.contains('\n'));
}

#[test]
fn guest_field_errors() {
    let cases = [
        ("cpus = 1", "guest.toml: kernel: is required"),
        ("kernel = \"\"", "guest.toml: kernel: is empty"),
        ("kernel = 3", "guest.toml: kernel: expected a string, found an integer"),
        ("kernel = \"k\"\ninitramfs = \"\"", "guest.toml: initramfs: is empty"),
        ("kernel = \"k\"\ncmdline = \"a\\u0000b\"", "guest.toml: cmdline: contains a NUL character"),
        ("kernel = \"k\"\ncpus = 0", "guest.toml: cpus: 0 is not a number of vCPUs from 1 to 254"),
        ("kernel = \"k\"\ncpus = 255", "guest.toml: cpus: 255 is not a number of vCPUs from 1 to 254"),
        ("kernel = \"k\"\ncpus = \"2\"", "guest.toml: cpus: expected an integer, found a string"),
        ("kernel = \"k\"\nmemory = \"12X\"", "guest.toml: memory: '12X' is not a size (examples: 512M, 2G, 1048576K)"),
        ("kernel = \"k\"\nmemory = -1", "guest.toml: memory: -1 is not a size"),
        ("kernel = \"k\"\nmemory = 1.5", "guest.toml: memory: expected a size such as \"512M\" or a byte count, found a float"),
        ("kernel = \"k\"\nmemory = \"1M\"", "guest.toml: memory: 1048576 bytes is too small: at least 16 MiB is needed"),
        ("kernel = \"k\"\nmemory = 16777217", "guest.toml: memory: 16777217 bytes is not a multiple of 4 KiB"),
        ("kernel = \"k\"\nconsole = \"hvc\"", "guest.toml: console: 'hvc' is not \"serial\" or \"virtio\""),
        ("kernel = \"k\"\nrng = \"yes\"", "guest.toml: rng: expected true or false, found a string"),
        ("kernel = \"k\"\nmemory_backing = \"shm\"", "guest.toml: memory_backing: 'shm' is not auto, anonymous or memfd"),
        ("kernel = \"k\"\nhugepages = \"4K\"", "guest.toml: hugepages: '4K' is not a huge page size (2M or 1G)"),
        ("kernel = \"k\"\nseccomp = \"yes\"", "guest.toml: seccomp: 'yes' is not on, log or off"),
        ("kernel = \"k\"\nseccomp = true", "guest.toml: seccomp: expected a string, found a boolean"),
        ("kernel = \"k\"\nuuid = \"1234\"", "guest.toml: uuid: '1234' is not a UUID (example: 123e4567-e89b-42d3-a456-426614174000)"),
        ("kernel = \"k\"\nnetns = \"../x\"", "guest.toml: netns: '../x' is not a network namespace name (letters, digits, '-', '_', '.')"),
        ("kernel = \"k\"\nsize = 3", "guest.toml: size: unknown field (known here: affinity, cmdline, console, cpu, cpus, disk, hugepages, initramfs, kernel, memory, memory_backing, net, netns, region, rng, sched, seccomp, uuid, vsock)"),
    ];
    for (text, expected) in cases {
        assert_eq!(guest_err(text), expected, "{text}");
    }
}

#[test]
fn affinity_errors() {
    let cases = [
        ("affinity = \"0-\"", "guest.toml: affinity: '0-' is not a list of host CPUs like 0,2-3 (each below 1024)"),
        ("affinity = [\"0\", \"x\"]", "guest.toml: affinity[1]: 'x' is not a list of host CPUs like 0,2-3 (each below 1024)"),
        ("affinity = [\"0\", \"1\", \"2\"]", "guest.toml: affinity: 3 entries for 2 vCPU(s)"),
        ("affinity = [0]", "guest.toml: affinity[0]: expected a CPU list such as \"0-3\", found an integer"),
        ("affinity = 1", "guest.toml: affinity: expected a CPU list such as \"0-3\" or an array of them, found an integer"),
    ];
    for (text, expected) in cases {
        let text = format!("kernel = \"k\"\ncpus = 2\n{text}");
        assert_eq!(guest_err(&text), expected, "{text}");
    }
}

#[test]
fn cpu_feature_errors() {
    let cases = [
        ("features = [\"-x2apic\", \"+warp\"]", "guest.toml: cpu.features: 'warp' is not a CPU feature this VMM knows (names as in /proc/cpuinfo flags)"),
        ("features = [\"x2apic\"]", "guest.toml: cpu.features: 'x2apic' needs + (add) or - (remove) in front of the feature name"),
        ("features = [\"-X2APIC\"]", "guest.toml: cpu.features: 'X2APIC' is not a CPU feature this VMM knows (names as in /proc/cpuinfo flags)"),
        ("features = [1]", "guest.toml: cpu.features: expected feature names such as \"-x2apic\", found an integer"),
        ("features = \"-x2apic\"", "guest.toml: cpu.features: expected an array such as [\"-x2apic\"], found a string"),
        ("model = \"epyc\"", "guest.toml: cpu.model: unknown field (known here: features)"),
    ];
    for (text, expected) in cases {
        let text = format!("kernel = \"k\"\n[cpu]\n{text}");
        assert_eq!(guest_err(&text), expected, "{text}");
    }
    assert_eq!(
        guest_err("kernel = \"k\"\ncpu = 2"),
        "guest.toml: cpu: expected a table, found an integer"
    );
    assert_eq!(
        system_err("[guests.web]\nkernel = \"k\"\n[guests.web.cpu]\nfeatures = [\"+warp\"]"),
        "system.toml: guests.web.cpu.features: 'warp' is not a CPU feature this VMM knows (names as in /proc/cpuinfo flags)"
    );
}

#[test]
fn a_region_takes_its_path_relative_to_the_file_and_defaults() {
    let config = guest("kernel = \"k\"\n[[region]]\npath = \"ring0\"").unwrap();
    assert_eq!(
        config.regions,
        vec![vmm::config::RegionConfig {
            path: "/srv/guests/ring0".into(),
            id: 0,
            readonly: false,
            fds: None,
        }]
    );
}

#[test]
fn device_errors() {
    let cases = [
        ("[[disk]]\nreadonly = true", "guest.toml: disk[0].path: is required"),
        ("[[disk]]\npath = \"a\"\n[[disk]]\npath = \"b\"\nsize = 1", "guest.toml: disk[1].size: unknown field (known here: path, rate, readonly)"),
        ("[[disk]]\npath = \"a\"\nrate = { bandwidth = \"fast\" }", "guest.toml: disk[0].rate.bandwidth: 'fast' is not a rate such as \"20MiB/s\" or \"100Mbit/s\""),
        ("[[disk]]\npath = \"a\"\nrate = { ops = 0 }", "guest.toml: disk[0].rate.ops: must be above 0 (operations per second); leave it out for no limit"),
        ("[[disk]]\npath = \"a\"\nrate = { ops = -3 }", "guest.toml: disk[0].rate.ops: -3 is not above 0"),
        ("[[disk]]\npath = \"a\"\nrate = { burst = \"1M\" }", "guest.toml: disk[0].rate.burst: needs a bandwidth"),
        ("[[disk]]\npath = \"a\"\nrate = { iops = 5 }", "guest.toml: disk[0].rate.iops: unknown field (known here: bandwidth, burst, ops, ops_burst, refill_time)"),
        ("[[disk]]\npath = \"a\"\nrate = 5", "guest.toml: disk[0].rate: expected a table, found an integer"),
        ("[[net]]\ntap = \"t\"\ntx_rate = { refill_time = \"1h\" }", "guest.toml: net[0].tx_rate.refill_time: '1h' is not a duration such as \"100ms\" or \"1s\""),
        ("[[disk]]\npath = \"a\"\nreadonly = \"on\"", "guest.toml: disk[0].readonly: expected true or false, found a string"),
        ("disk = \"a.img\"", "guest.toml: disk: expected an array of tables, found a string"),
        ("[[net]]\ntap = \"a/b\"", "guest.toml: net[0].tap: 'a/b' is not an interface name (1 to 15 characters, no '/', ':' or spaces)"),
        ("[[net]]\ntap = \"t\"\nmac = \"01:00:00:00:00:01\"", "guest.toml: net[0].mac: '01:00:00:00:00:01' is a multicast MAC address; a NIC needs a unicast one"),
        ("[[net]]\ntap = \"t\"\nmac = \"52:54\"", "guest.toml: net[0].mac: '52:54' is not a MAC address like 52:54:00:12:34:56"),
        ("[[net]]\nswitch = \"lan\"\nvlan = 5000", "guest.toml: net[0].vlan: 5000 is not a VLAN id (1 to 4094)"),
        ("[[net]]\nswitch = \"lan\"\nvlan = 10\nvlans = [10]", "guest.toml: net[0].vlans: give vlan or vlans, not both"),
        ("[[net]]\nswitch = \"lan\"\nvlans = [10, 10]", "guest.toml: net[0].vlans: VLAN 10 is listed twice"),
        ("[[net]]\ntap = \"t\"\nswitch = \"lan\"", "guest.toml: net[0].switch: give one of tap, switch or vhost_user"),
        ("[[net]]\ntap = \"t\"\nvlan = 10", "guest.toml: net[0].vlan: needs a switch"),
        ("[[net]]\nswitch = \"Lan!\"", "guest.toml: net[0].switch: 'Lan!' is not a switch name (1 to 32 characters: a-z, 0-9 and -)"),
        ("[[net]]\nswitch = \"lan\"\nrx_rate = { ops = 5 }", "guest.toml: net[0].rx_rate: a switch port takes no rate limit"),
        ("[vsock]\nsocket = \"s\"", "guest.toml: vsock.cid: is required"),
        ("[vsock]\ncid = 2\nsocket = \"s\"", "guest.toml: vsock.cid: 2 is not a guest CID (3 to 4294967294)"),
        ("[vsock]\ncid = 4294967295\nsocket = \"s\"", "guest.toml: vsock.cid: 4294967295 is not a guest CID (3 to 4294967294)"),
        ("[vsock]\ncid = 3", "guest.toml: vsock.socket: is required"),
        ("vsock = 3", "guest.toml: vsock: expected a table, found an integer"),
        ("[[region]]\nid = 1", "guest.toml: region[0].path: is required"),
        ("[[region]]\npath = \"r\"\nid = 65536", "guest.toml: region[0].id: 65536 is not a peer id (0 to 65535)"),
        ("[[region]]\npath = \"r\"\nid = -1", "guest.toml: region[0].id: -1 is not a peer id (0 to 65535)"),
        ("[[region]]\npath = \"r\"\nsize = \"1M\"", "guest.toml: region[0].size: unknown field (known here: id, path, readonly)"),
    ];
    for (text, expected) in cases {
        let text = format!("kernel = \"k\"\n{text}");
        assert_eq!(guest_err(&text), expected, "{text}");
    }
}

#[test]
fn a_switched_nic_reads_back_with_its_vlans() {
    for (text, vlans) in [
        ("[[net]]\nswitch = \"lan\"\n", VlanMembership::Access(1)),
        (
            "[[net]]\nswitch = \"lan\"\nvlan = 10\n",
            VlanMembership::Access(10),
        ),
        (
            "[[net]]\nswitch = \"lan\"\nvlans = [10, 20]\n",
            VlanMembership::Trunk(vec![10, 20]),
        ),
    ] {
        let config = parse_guest(
            &format!("kernel = \"k\"\n{text}"),
            "guest.toml",
            Path::new("/"),
        )
        .unwrap();
        let want = vmm::config::NetAttach::Switch {
            name: "lan".into(),
            vlans,
        };
        assert_eq!(config.nets[0].attach, want);
        let again = parse_guest(&to_guest_toml(&config), "again", Path::new("/")).unwrap();
        assert_eq!(again.nets[0].attach, config.nets[0].attach);
    }
}

#[test]
fn guest_names_are_checked() {
    assert!(check_guest_name("web-1").is_ok());
    assert!(check_guest_name(&"a".repeat(32)).is_ok());
    for bad in ["", "Web", "a_b", "a.b", "ü", &"a".repeat(33)] {
        assert_eq!(check_guest_name(bad), Err(NameError(bad.to_string())));
    }
}

#[test]
fn a_system_lists_guests_in_file_order_with_their_start() {
    let s = system(
        "[guests.zeta]\nkernel = \"z\"\nstart = \"held\"\n\n[guests.alpha]\nkernel = \"a\"\nmemory = \"64M\"\n",
    )
    .unwrap();
    let names: Vec<_> = s.guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha"]);
    assert_eq!(s.guests[0].start, StartPolicy::Held);
    assert_eq!(s.guests[1].start, StartPolicy::Boot);
    assert_eq!(s.guests[1].config.memory, 64 << 20);
    assert_eq!(s.guests[1].config.kernel, PathBuf::from("/srv/guests/a"));
    assert_eq!(s.guests[0].file, None);
}

/// A fresh directory for tests that need real files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_guest_by_file_resolves_paths_against_its_own_directory() {
    let dir = scratch("byfile");
    std::fs::create_dir_all(dir.join("db")).unwrap();
    std::fs::write(dir.join("db/db.toml"), "kernel = \"vmlinuz\"\ncpus = 2\n").unwrap();
    let s = parse_system(
        "[guests.db]\nfile = \"db/db.toml\"\nstart = \"held\"\n",
        "system.toml",
        &dir,
    )
    .unwrap();
    let g = &s.guests[0];
    assert_eq!(g.config.kernel, dir.join("db/vmlinuz"));
    assert_eq!(g.config.cpus, 2);
    assert_eq!(g.start, StartPolicy::Held);
    assert_eq!(g.file, Some(dir.join("db/db.toml")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_error_inside_a_referenced_guest_file_names_that_file() {
    let dir = scratch("badref");
    std::fs::write(dir.join("db.toml"), "kernel = \"k\"\nmemory = \"12X\"\n").unwrap();
    let err = parse_system("[guests.db]\nfile = \"db.toml\"\n", "system.toml", &dir)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: memory: '12X' is not a size (examples: 512M, 2G, 1048576K)",
            dir.join("db.toml").display()
        )
    );
    let err = parse_system("[guests.db]\nfile = \"nope.toml\"\n", "system.toml", &dir)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: cannot read: No such file or directory (os error 2)",
            dir.join("nope.toml").display()
        )
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn load_guest_reads_a_real_file_and_refuses_others() {
    let dir = scratch("load");
    std::fs::write(dir.join("g.toml"), "kernel = \"k\"\n").unwrap();
    assert_eq!(
        load_guest(&dir.join("g.toml")).unwrap().kernel,
        dir.join("k")
    );
    assert_eq!(
        load_guest(&dir).unwrap_err().to_string(),
        format!("{}: cannot read: not a regular file", dir.display())
    );
    std::fs::write(dir.join("bin.toml"), b"kernel = \"\xff\"").unwrap();
    assert_eq!(
        load_guest(&dir.join("bin.toml")).unwrap_err().to_string(),
        format!(
            "{}: cannot read: not UTF-8 text",
            dir.join("bin.toml").display()
        )
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn system_errors() {
    let cases = [
        ("", "system.toml: guests: is required: name at least one guest"),
        ("[guests]", "system.toml: guests: names no guest"),
        ("guests = 1", "system.toml: guests: expected a table, found an integer"),
        ("name = \"x\"\n[guests.a]\nkernel = \"k\"", "system.toml: name: unknown field (known here: guests, pools, regions, switches, vsock_allow)"),
        ("[guests.Web]\nkernel = \"k\"", "system.toml: guests.Web: 'Web' is not a guest name (1 to 32 characters: a-z, 0-9 and -)"),
        ("[guests.\"a b\"]\nkernel = \"k\"", "system.toml: guests.\"a b\": 'a b' is not a guest name (1 to 32 characters: a-z, 0-9 and -)"),
        ("[guests]\nweb = 3", "system.toml: guests.web: expected a table, found an integer"),
        ("[guests.web]\nkernel = \"k\"\nmemory = \"12X\"", "system.toml: guests.web.memory: '12X' is not a size (examples: 512M, 2G, 1048576K)"),
        ("[guests.web]\nkernel = \"k\"\nstart = \"later\"", "system.toml: guests.web.start: 'later' is not \"boot\" or \"held\""),
        ("[guests.web]\nkernel = \"k\"\nsize = 1", "system.toml: guests.web.size: unknown field (known here: affinity, cmdline, console, cpu, cpus, disk, hugepages, initramfs, kernel, memory, memory_backing, net, netns, region, rng, sched, seccomp, start, uuid, vsock)"),
        ("[guests.web]\nfile = \"w.toml\"\ncpus = 2", "system.toml: guests.web.cpus: a guest given by 'file' takes only 'start' beside it; put this in the guest file"),
        ("[guests.web]\nfile = \"\"", "system.toml: guests.web.file: is empty"),
        ("[guests.web]\nstart = \"boot\"", "system.toml: guests.web.kernel: is required"),
        ("[guests.a]\nkernel = \"k\"\n[guests.a.vsock]\ncid = 3\nsocket = \"s\"\n[guests.b]\nkernel = \"k\"\n[guests.b.vsock]\ncid = 3\nsocket = \"t\"",
         "system.toml: guests.b.vsock.cid: CID 3 is also guest 'a''s"),
        ("[guests.a]\nkernel = \"k\"\nnet = [{tap = \"fv0\"}]\n[guests.b]\nkernel = \"k\"\nnet = [{tap = \"fv1\"}, {tap = \"fv0\"}]",
         "system.toml: guests.b.net[1].tap: tap 'fv0' is also used by guest 'a'"),
        ("[switches.lan]\nmode = \"bridge\"\n[guests.a]\nkernel = \"k\"\nnet = [{switch = \"lan\", mac = \"52:54:00:00:00:01\"}]\n[guests.b]\nkernel = \"k\"\nnet = [{switch = \"lan\", mac = \"52:54:00:00:00:01\"}]",
         "system.toml: guests.b.net[0].mac: guest 'a' uses the same MAC on switch 'lan'"),
        ("[guests.a]\nkernel = \"k\"\nnet = [{switch = \"wan\"}]",
         "system.toml: guests.a.net[0].switch: no switch 'wan' is declared in [switches]"),
        ("[guests.a]\nkernel = \"k\"\ndisk = [{path = \"d.img\", readonly = true}]\n[guests.b]\nkernel = \"k\"\ndisk = [{path = \"d.img\"}]",
         "system.toml: guests.b.disk[0].path: '/srv/guests/d.img' is also a disk of guest 'a', and one of them may write it"),
        ("[guests.a]\nkernel = \"k\"\nregion = [{path = \"r\", id = 1}]\n[guests.b]\nkernel = \"k\"\nregion = [{path = \"q\", id = 1}, {path = \"r\", id = 1, readonly = true}]",
         "system.toml: guests.b.region[1].id: id 1 on region '/srv/guests/r' is also guest 'a''s; guests sharing a region need distinct ids"),
    ];
    for (text, expected) in cases {
        assert_eq!(system_err(text), expected, "{text}");
    }
}

#[test]
fn guests_share_a_region_with_distinct_ids() {
    let s = system(
        "[guests.a]\nkernel = \"k\"\nregion = [{path = \"r\"}]\n\
         [guests.b]\nkernel = \"k\"\nregion = [{path = \"r\", id = 1, readonly = true}]",
    )
    .unwrap();
    assert_eq!(s.guests[1].config.regions[0].id, 1);
}

#[test]
fn a_read_only_disk_may_be_shared() {
    let s = system(
        "[guests.a]\nkernel = \"k\"\ndisk = [{path = \"d.img\", readonly = true}]\n\
         [guests.b]\nkernel = \"k\"\ndisk = [{path = \"d.img\", readonly = true}]",
    )
    .unwrap();
    assert_eq!(s.guests.len(), 2);
}

#[test]
fn every_error_is_one_line() {
    let err = guest_err("kernel = \"a\nb\"");
    assert!(!err.contains('\n'), "{err}");
}

/// A small deterministic generator for the robustness tests.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mangled_files_give_one_line_errors_and_never_panic() {
    let alphabet = b"[]{}=\".,-_ \n\tabkz019#'\\";
    let system_text = format!("[guests.web]\n{FULL}")
        .replace("[[", "[[guests.web.")
        .replace("[vsock]", "[guests.web.vsock]")
        .replace("[cpu]", "[guests.web.cpu]");
    assert!(system(&system_text).is_ok(), "the seed itself must parse");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..4000 {
        let seed = if round % 2 == 0 {
            FULL
        } else {
            system_text.as_str()
        };
        let mut bytes = seed.as_bytes().to_vec();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % bytes.len();
            match rng.next() % 3 {
                0 => bytes[at] = alphabet[(rng.next() as usize) % alphabet.len()],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, alphabet[(rng.next() as usize) % alphabet.len()]),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let result = if round % 2 == 0 {
            guest(&text).map(drop)
        } else {
            system(&text).map(drop)
        };
        if let Err(e) = result {
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.starts_with("guest.toml: ")
                    || line.starts_with("system.toml: ")
                    || line.starts_with(BASE),
                "{line}"
            );
        }
    }
}

#[test]
fn sched_table_declares_every_policy() {
    let c = guest(
        "kernel = \"k\"\ncpus = 2\n[sched]\nweight = 400\ncap = 25\n\
         rt = [{ budget = \"2ms\", period = \"10ms\" }, \"none\"]\nlocked = true\n\
         memory_limit = \"1G\"\n[sched.partition]\nframe = \"20ms\"\nepoch = 5\n\
         windows = [{ start = \"10ms\", length = \"10ms\" }, { start = \"0ms\", length = \"5ms\" }]",
    )
    .unwrap();
    let s = &c.sched;
    assert_eq!((s.weight, s.cap, s.locked), (Some(400), Some(25), true));
    assert_eq!(s.memory_limit, Some(1 << 30));
    assert_eq!(s.vcpu_rt, vec![Some("2ms/10ms".parse().unwrap()), None]);
    let p = s.partition.as_ref().unwrap();
    assert_eq!(p.windows[0].start_ns, 0, "windows are sorted");
    assert_eq!(p.epoch_ns, Some(5));
    let rr = guest("kernel = \"k\"\n[sched]\npriority = 10\npolicy = \"rr\"").unwrap();
    assert_eq!(rr.sched.priority.unwrap().level, 10);
    for text in [
        "kernel = \"k\"\ncpus = 2\n[sched]\nweight = 400\ncap = 25\nrt = [\"1ms/4ms\", \"none\"]\nlocked = true\nmemory_limit = \"1G\"\n[sched.partition]\nframe = \"20ms\"\nwindows = [{ start = \"0ms\", length = \"5ms\" }]",
        "kernel = \"k\"\n[sched]\npriority = 10\npolicy = \"rr\"",
        "kernel = \"k\"\n[sched]\nrt = { budget = \"500us\", period = \"1s\" }",
    ] {
        assert_reads_back(text);
    }
}

#[test]
fn sched_field_errors() {
    let cases = [
        ("weight = 0", "guest.toml: sched.weight: 0 is out of range (1 to 10000)"),
        ("cap = 0", "guest.toml: sched.cap: 0 is out of range (1 to 25600)"),
        ("priority = 100", "guest.toml: sched.priority: 100 is out of range (1 to 99)"),
        ("policy = \"rr\"", "guest.toml: sched.policy: needs a priority"),
        ("policy = \"edf\"\npriority = 3", "guest.toml: sched.policy: 'edf' is not fifo or rr"),
        ("rt = { budget = \"20ms\", period = \"10ms\" }", "guest.toml: sched.rt: budget 20ms is more than its period 10ms"),
        ("rt = { budget = \"2ms\" }", "guest.toml: sched.rt: period is missing"),
        ("rt = [\"1ms/10ms\", \"1ms/10ms\"]", "guest.toml: sched.rt: 2 entries for 1 vCPU(s)"),
        ("rt = [\"fast\"]", "guest.toml: sched.rt[0]: 'fast' is not budget=DURATION,period=DURATION (or budget/period)"),
        ("rt = \"1ms/10ms\"\npriority = 5", "guest.toml: sched.rt: rt and priority cannot both be set: a vCPU thread has one scheduling class"),
        ("memory_limit = \"lots\"", "guest.toml: sched.memory_limit: 'lots' is not a size (examples: 512M, 2G)"),
        ("shares = 3", "guest.toml: sched.shares: unknown field (known here: cap, cpus, locked, memory_limit, partition, policy, pool, priority, rt, weight)"),
        ("cpus = \"x\"", "guest.toml: sched.cpus: 'x' is not a list of host CPUs like 0,2-3 (each below 1024)"),
        ("pool = \"A B\"", "guest.toml: sched.pool: 'A B' is not a pool name (1 to 32 characters: a-z, 0-9 and -)"),
        ("[sched.partition]\nframe = \"20ms\"\nwindows = [{ start = \"15ms\", length = \"10ms\" }]", "guest.toml: sched.partition.windows: window 0: ends at 25ms, past the frame's 20ms"),
        ("[sched.partition]\nframe = \"20ms\"", "guest.toml: sched.partition.windows: no windows: a partitioned guest needs at least one"),
        ("[sched.partition]\nframe = \"soon\"\nwindows = []", "guest.toml: sched.partition.frame: 'soon' is not a duration like 2ms, 500us or 1s"),
    ];
    for (text, expected) in cases {
        let text = format!("kernel = \"k\"\n[sched]\n{text}");
        assert_eq!(guest_err(&text), expected, "{text}");
    }
}

const POOLS: &str = r#"
[pools.general]
cpus = "0"
policy = "credit"

[pools.control]
cpus = "1-2"
policy = "partition"
frame = "20ms"

[guests.web]
kernel = "k"
[guests.web.sched]
pool = "general"
weight = 200

[guests.a]
kernel = "k"
[guests.a.sched]
pool = "control"
[guests.a.sched.partition]
frame = "20ms"
windows = [{ start = "0ms", length = "5ms" }]

[guests.b]
kernel = "k"
[guests.b.sched]
pool = "control"
[guests.b.sched.partition]
frame = "20ms"
windows = [{ start = "5ms", length = "15ms" }]
"#;

#[test]
fn pools_give_their_guests_cpus_and_one_epoch() {
    let s = system(POOLS).unwrap();
    assert_eq!(s.pools.len(), 2);
    assert_eq!(s.guests[0].config.sched.cpus, vec![0]);
    assert_eq!(s.guests[1].config.sched.cpus, vec![1, 2]);
    let epochs: Vec<_> = s.guests[1..]
        .iter()
        .map(|g| g.config.sched.partition.as_ref().unwrap().epoch_ns)
        .collect();
    assert_eq!(epochs, vec![Some(0), Some(0)], "one epoch for the pool");
    let written = to_system_toml(&s);
    let again = parse_system(&written, "written.toml", Path::new("/elsewhere")).unwrap();
    assert_eq!(again, s, "{written}");
    let null = system(
        "[pools.pinned]\ncpus = \"2-4\"\npolicy = \"null\"\n[guests.x]\nkernel = \"k\"\ncpus = 2\n[guests.x.sched]\npool = \"pinned\"\n[guests.y]\nkernel = \"k\"\n[guests.y.sched]\npool = \"pinned\"",
    )
    .unwrap();
    assert_eq!(null.guests[0].config.affinity, vec![vec![2], vec![3]]);
    assert_eq!(null.guests[1].config.affinity, vec![vec![4]]);
}

#[test]
fn pool_errors_name_the_field() {
    let rt_pool = "[pools.p]\ncpus = \"1\"\npolicy = \"rt\"\n";
    let cases = [
        (format!("{rt_pool}[guests.g]\nkernel = \"k\"\n[guests.g.sched]\npool = \"q\""), "system.toml: guests.g.sched.pool: no pool named 'q' in [pools]"),
        (format!("{rt_pool}[guests.g]\nkernel = \"k\"\n[guests.g.sched]\npool = \"p\""), "system.toml: guests.g.sched.pool: 'p' is an rt pool: set priority"),
        (format!("{rt_pool}[guests.g]\nkernel = \"k\"\n[guests.g.sched]\npool = \"p\"\nrt = \"1ms/10ms\""), "system.toml: guests.g.sched.rt: a deadline reservation cannot be in a pool: the kernel admits deadline threads only on all the CPUs of their root domain; use priority in an rt pool"),
        ("[pools.p]\ncpus = \"1\"\npolicy = \"credit\"\n[guests.g]\nkernel = \"k\"\n[guests.g.sched]\npool = \"p\"\npriority = 3".to_string(), "system.toml: guests.g.sched.pool: 'p' is a credit pool: rt, priority and partition are not allowed in it"),
        ("[pools.p]\ncpus = \"1\"\npolicy = \"edf\"\n[guests.g]\nkernel = \"k\"".to_string(), "system.toml: pools.p.policy: 'edf' is not credit, rt, partition or null"),
        ("[pools.p]\ncpus = \"1\"\npolicy = \"partition\"\n[guests.g]\nkernel = \"k\"".to_string(), "system.toml: pools.p.frame: is required in a partition pool"),
        ("[pools.p]\ncpus = \"1\"\npolicy = \"credit\"\n[pools.q]\ncpus = \"0-1\"\npolicy = \"credit\"\n[guests.g]\nkernel = \"k\"".to_string(), "system.toml: pools.q.cpus: shares CPUs with pool 'p'"),
        ("[pools.p]\ncpus = \"1\"\npolicy = \"null\"\n[guests.g]\nkernel = \"k\"\ncpus = 2\n[guests.g.sched]\npool = \"p\"".to_string(), "system.toml: guests.g.sched.pool: null pool 'p' has no free CPU left for each of its 2 vCPU(s)"),
        (POOLS.replace("start = \"5ms\", length = \"15ms\"", "start = \"4ms\", length = \"5ms\""), "system.toml: guests.b.sched.partition.windows: overlaps a window of guest 'a' in pool 'control'"),
        (POOLS.replace("[guests.b.sched.partition]\nframe = \"20ms\"", "[guests.b.sched.partition]\nframe = \"40ms\""), "system.toml: guests.b.sched.partition.frame: 40ms is not pool 'control''s frame 20ms"),
    ];
    for (text, expected) in cases {
        assert_eq!(system_err(&text), expected, "{text}");
    }
}

const TWO_GUESTS: &str = "[guests.a]\nkernel = \"k\"\n[guests.b]\nkernel = \"k\"\n";

#[test]
fn a_system_region_lists_its_members_in_file_order_as_peer_ids() {
    let text = format!(
        "{TWO_GUESTS}[regions.ring]\nsize = \"2M\"\nvectors = 2\nguests = {{ b = \"rw\", a = \"ro\" }}\n"
    );
    let s = system(&text).unwrap();
    assert_eq!(
        s.regions,
        vec![crate::SystemRegion {
            name: "ring".into(),
            size: 2 << 20,
            vectors: 2,
            members: vec![("b".into(), false), ("a".into(), true)],
        }]
    );
    let written = to_system_toml(&s);
    let again = parse_system(&written, "written.toml", Path::new(BASE)).unwrap();
    assert_eq!(again.regions, s.regions, "{written}");
}

#[test]
fn bad_system_regions_are_one_line_naming_the_field() {
    let cases = [
        (
            "[regions.ring]\nsize = \"3M\"\nguests = { a = \"rw\" }\n",
            "system.toml: regions.ring.size: '3M' is not a power of two from 4K to 256M",
        ),
        (
            "[regions.ring]\nsize = \"1M\"\nguests = { c = \"rw\" }\n",
            "system.toml: regions.ring.guests.c: is not a guest of this system",
        ),
        (
            "[regions.ring]\nsize = \"1M\"\nguests = { a = \"rx\" }\n",
            "system.toml: regions.ring.guests.a: is not \"rw\" or \"ro\"",
        ),
        (
            "[regions.ring]\nsize = \"1M\"\nvectors = 0\nguests = { a = \"rw\" }\n",
            "system.toml: regions.ring.vectors: 0 is not 1 to 128",
        ),
        (
            "[regions.ring]\nsize = \"1M\"\n",
            "system.toml: regions.ring.guests: is required: name the guests that map the region",
        ),
        (
            "[regions.Ring]\nsize = \"1M\"\nguests = { a = \"rw\" }\n",
            "system.toml: regions.Ring: is not a region name (1 to 32 characters: a-z, 0-9 and -)",
        ),
    ];
    for (region, message) in cases {
        let err = system(&format!("{TWO_GUESTS}{region}")).unwrap_err();
        assert_eq!(err.to_string(), message, "{region}");
    }
}

#[test]
fn inherited_descriptors_stay_as_named_and_read_back() {
    let config = guest(
        "kernel = \"fd:5\"\ninitramfs = \"fd:6\"\n[[disk]]\npath = \"fd:7\"\n[[disk]]\npath = \"fd:8x\"\n",
    )
    .expect("parses");
    assert_eq!(config.kernel, PathBuf::from("fd:5"));
    assert_eq!(config.initramfs, Some(PathBuf::from("fd:6")));
    assert_eq!(config.disks[0].path, PathBuf::from("fd:7"));
    // Not a descriptor name: an ordinary relative path.
    assert!(
        config.disks[1].path.is_absolute(),
        "{:?}",
        config.disks[1].path
    );
    let again = guest(&crate::to_guest_toml(&config)).expect("reads back");
    assert_eq!(again, config);
}

#[test]
fn system_switches_parse_and_read_back() {
    let text = format!(
        "{TWO_GUESTS}[switches.lan]\nmode = \"bridge\"\nuplink = \"fvup0\"\nuplink_vlans = [10, 20]\n\
         [switches.lab]\nmode = \"hub\"\n[switches.edge]\nmode = \"bridge\"\nuplink = \"fvup1\"\n"
    );
    let s = system(&text).unwrap();
    use crate::{SwitchMode, SystemSwitch, VlanMembership};
    assert_eq!(
        s.switches,
        vec![
            SystemSwitch {
                name: "lan".into(),
                mode: SwitchMode::Bridge,
                uplink: Some(("fvup0".into(), VlanMembership::Trunk(vec![10, 20]))),
            },
            SystemSwitch {
                name: "lab".into(),
                mode: SwitchMode::Hub,
                uplink: None,
            },
            SystemSwitch {
                name: "edge".into(),
                mode: SwitchMode::Bridge,
                uplink: Some(("fvup1".into(), VlanMembership::Access(1))),
            },
        ]
    );
    let written = to_system_toml(&s);
    let again = parse_system(&written, "written.toml", Path::new(BASE)).unwrap();
    assert_eq!(again.switches, s.switches, "{written}");
}

#[test]
fn bad_system_switches_are_one_line_naming_the_field() {
    let cases = [
        ("[switches.lan]\n", "switches.lan.mode: is required: \"hub\" or \"bridge\""),
        (
            "[switches.lan]\nmode = \"router\"\n",
            "switches.lan.mode: 'router' is not \"hub\" or \"bridge\"",
        ),
        (
            "[switches.Lan]\nmode = \"hub\"\n",
            "switches.Lan: is not a switch name (1 to 32 characters: a-z, 0-9 and -)",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink_vlan = 10\n",
            "switches.lan.uplink_vlan: needs an uplink",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink = \"a/b\"\n",
            "switches.lan.uplink: 'a/b' is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink = \"t0\"\nuplink_vlan = 4095\n",
            "switches.lan.uplink_vlan: 4095 is not a VLAN id (1 to 4094)",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink = \"t0\"\nuplink_vlan = 3\nuplink_vlans = [4]\n",
            "switches.lan.uplink_vlans: give uplink_vlan or uplink_vlans, not both",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink = \"t0\"\nuplink_vlans = [4, 4]\n",
            "switches.lan.uplink_vlans: VLAN 4 is listed twice",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nuplink = \"t0\"\nuplink_vlans = []\n",
            "switches.lan.uplink_vlans: names no VLAN",
        ),
        (
            "[switches.lan]\nmode = \"hub\"\nports = 3\n",
            "switches.lan.ports: unknown field (known here: mode, uplink, uplink_vlan, uplink_vlans)",
        ),
    ];
    for (switch, message) in cases {
        let err = system(&format!("{TWO_GUESTS}{switch}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("system.toml: {message}"),
            "{switch}"
        );
    }
}
