//! What a VM is built from: the machine, its devices and its vCPU placement.
//!
//! The same types come from the command line (`ferrovisor run` flags) and
//! from guest description files, so both paths share the parsers for the
//! `key=value,...` device options here.

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::rate::{RateError, RateSpec, RateValue, RATE_KEYS};
pub use arch::smbios::{Uuid, UuidError};

/// Errors in a device option string such as `path=disk.img,readonly=on`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    #[error("'{0}' given twice")]
    Repeated(String),
    #[error("'{0}' is required")]
    Missing(&'static str),
    #[error("{key}: '{value}' is not on or off")]
    NotBool { key: String, value: String },
    #[error("'{0}' is not a MAC address like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("'{0}' is a multicast MAC address; a NIC needs a unicast one")]
    MulticastMac(String),
    #[error("cid: '{0}' is not a guest CID (3 to 4294967294)")]
    BadCid(String),
    #[error("'{0}' is not virtio or serial")]
    BadConsole(String),
    #[error("tap: '{0}' is not an interface name (1 to 15 characters, no '/' or spaces)")]
    BadTapName(String),
    #[error("'{0}' is empty")]
    Empty(&'static str),
    #[error("'{0}' is not a list of host CPUs like 0,2-3 (each below {MAX_HOST_CPUS})")]
    BadCpuList(String),
    #[error("'{0}' is not auto, anonymous or memfd")]
    BadMemoryBacking(String),
    #[error("'{0}' is not a huge page size (2M or 1G)")]
    BadHugePages(String),
    #[error("{0}")]
    Rate(#[from] RateError),
    #[error("{0}")]
    Conflict(&'static str),
}

/// The kernel command line when none is given: serial console, and a
/// reboot through the keyboard controller after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest memory when none is given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// vCPUs when none are given.
pub const DEFAULT_CPUS: u8 = 1;

/// Host CPU numbers must be below this (the kernel's `cpu_set_t` size).
pub const MAX_HOST_CPUS: usize = 1024;

/// A virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// Its I/O limit (none when empty).
    pub rate: RateSpec,
}

/// The VLANs a switch port carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMembership {
    /// Untagged frames on one VLAN.
    Access(u16),
    /// 802.1Q-tagged frames on each of these VLANs.
    Trunk(Vec<u16>),
}

/// What a virtio-net interface is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAttach {
    /// A host tap interface (opened, or created if missing).
    Tap(String),
    /// A port on one of the daemon's switches, with its VLANs. Only the
    /// daemon can attach it: it becomes [`NetAttach::VhostUser`] when the
    /// daemon starts the guest.
    Switch { name: String, vlans: VlanMembership },
    /// A vhost-user-net backend: a socket path, or `fd:N` for a connected
    /// socket the VMM inherits.
    VhostUser(PathBuf),
}

/// A virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub attach: NetAttach,
    /// The guest's MAC address; `None` picks a locally administered one.
    pub mac: Option<[u8; 6]>,
    /// Limits on frames the guest receives and sends (none when empty).
    pub rx_rate: RateSpec,
    pub tx_rate: RateSpec,
}

/// A virtio-vsock device in the hybrid model: guest connections to host port
/// P become connections to the unix socket `{socket}_{P}`; host programs
/// connect to `socket` and write `CONNECT <port>\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
    /// The router's socket (the daemon's, in the runtime directory): with
    /// it the guest may connect to other guests' CIDs, as the router allows.
    /// Never read from a guest file.
    pub route: Option<PathBuf>,
}

/// Where the guest's console (`console=`) is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsoleMode {
    /// The 8250 UART at 0x3f8 carries stdin/stdout (ttyS0).
    #[default]
    Serial,
    /// A virtio-console device carries stdin/stdout (hvc0); the UART's
    /// output still goes to stdout so that early boot messages are seen.
    Virtio,
}

/// What backs guest RAM, as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBacking {
    /// Anonymous private memory unless something needs to share guest RAM,
    /// then a memfd.
    #[default]
    Auto,
    /// Anonymous private memory: transparent huge pages under the host's
    /// default settings; nothing else can map it.
    Anonymous,
    /// A memfd: shareable with other processes and writable to snapshots.
    Memfd,
}

impl MemoryBacking {
    /// The name used in flags and guest files.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBacking::Auto => "auto",
            MemoryBacking::Anonymous => "anonymous",
            MemoryBacking::Memfd => "memfd",
        }
    }
}

impl FromStr for MemoryBacking {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "auto" => Ok(MemoryBacking::Auto),
            "anonymous" | "anon" => Ok(MemoryBacking::Anonymous),
            "memfd" => Ok(MemoryBacking::Memfd),
            _ => Err(ConfigError::BadMemoryBacking(text.to_string())),
        }
    }
}

/// A hugetlb page size for guest RAM (`hugepages = "2M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    Size2M,
    Size1G,
}

impl HugePages {
    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePages::Size2M => 2 << 20,
            HugePages::Size1G => 1 << 30,
        }
    }

    /// The name used in flags and guest files.
    pub fn name(self) -> &'static str {
        match self {
            HugePages::Size2M => "2M",
            HugePages::Size1G => "1G",
        }
    }
}

impl FromStr for HugePages {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "2M" | "2m" | "2MiB" => Ok(HugePages::Size2M),
            "1G" | "1g" | "1GiB" => Ok(HugePages::Size1G),
            _ => Err(ConfigError::BadHugePages(text.to_string())),
        }
    }
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// What backs guest RAM.
    pub memory_backing: MemoryBacking,
    /// Guest RAM on hugetlb pages of this size (a hugetlb memfd).
    pub hugepages: Option<HugePages>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub console: ConsoleMode,
    pub rng: bool,
    pub vsock: Option<VsockConfig>,
    /// Host CPUs each vCPU may run on, by vCPU index. Empty: no pinning.
    /// A vCPU with no entry (index past the end) is not pinned either.
    pub affinity: Vec<Vec<usize>>,
    /// Changes to the guest's CPU features, applied in order to the set the
    /// host's KVM supports (`-x2apic`, `+rdtscp`).
    pub cpu_features: Vec<arch::cpu_features::FeatureEdit>,
    /// The system UUID the guest sees in SMBIOS (`product_uuid`); `None`
    /// makes a random one at each run.
    pub uuid: Option<Uuid>,
    /// Seccomp filters on the VMM's threads (`on`, `log` or `off`).
    pub seccomp: crate::seccomp::SeccompMode,
    /// Shared memory regions, each an ivshmem-compatible PCI device.
    pub regions: Vec<RegionConfig>,
    /// CPU policy, time partitions and memory isolation (`[sched]`).
    pub sched: crate::sched::SchedConfig,
    /// The network namespace (`/run/netns/NAME`) the VMM joins before it
    /// opens its taps.
    pub netns: Option<String>,
}

/// A shared memory region the guest sees as an ivshmem-compatible device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// The file that holds the region (for example under `/dev/shm`), which
    /// every guest sharing it names; its size is the region's.
    pub path: PathBuf,
    /// This guest's peer id on the region (the device's IVPosition).
    pub id: u16,
    /// The guest may only read the region.
    pub readonly: bool,
    /// The region as descriptors the VMM inherited (a region the daemon
    /// owns), instead of `path`.
    pub fds: Option<crate::region_fds::RegionFds>,
}

impl VmConfig {
    /// The VirtIO devices the guest has: each gets a worker thread.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.console == ConsoleMode::Virtio)
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
    }
}

/// Splits `a=1,b=2` into pairs, refusing repeats and keys outside `known`.
fn pairs<'a>(text: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue(item.to_string()))?;
        if !known.contains(&key) {
            return Err(ConfigError::UnknownKey(key.to_string()));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::Repeated(key.to_string()));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn find<'a>(pairs: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Parses a size such as `512M`, `2G`, `64m`, `1048576K` or a plain byte
/// count (suffixes are binary: K is 1024). `None` when it is not one.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 10),
        'm' | 'M' => (&text[..text.len() - 1], 20),
        'g' | 'G' => (&text[..text.len() - 1], 30),
        't' | 'T' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

/// Parses a host CPU list in the kernel's `cpulist` format (`0`, `1-3`,
/// `0,2-3`) into sorted, distinct CPU numbers.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::BadCpuList(text.to_string());
    let number = |s: &str| -> Result<usize, ConfigError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match s.parse::<usize>() {
            Ok(n) if n < MAX_HOST_CPUS => Ok(n),
            _ => Err(bad()),
        }
    };
    let mut cpus = Vec::new();
    for item in text.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(item)?, number(item)?),
        };
        if first > last {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats CPU numbers back into the `cpulist` format (`0,2-3`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Parses `on`/`off` (also `true`/`false`, `yes`/`no`).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::NotBool {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::MulticastMac(text.to_string()));
    }
    Ok(mac)
}

/// Checks a tap interface name as the kernel would (IFNAMSIZ is 16).
pub fn check_tap_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && !name.contains(['/', ' ', ':', '\t', '\n'])
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadTapName(name.to_string()))
    }
}

/// Parses a guest CID: 0-2 are reserved (hypervisor, local, host) and
/// u32::MAX is "any".
pub fn parse_cid(text: &str) -> Result<u32, ConfigError> {
    match text.parse::<u32>() {
        Ok(cid) if (3..u32::MAX).contains(&cid) => Ok(cid),
        _ => Err(ConfigError::BadCid(text.to_string())),
    }
}

/// The rate keys of a NIC option, by direction.
const RX_RATE_KEYS: [&str; 5] = [
    "rx_bandwidth",
    "rx_burst",
    "rx_ops",
    "rx_ops_burst",
    "rx_refill_time",
];
const TX_RATE_KEYS: [&str; 5] = [
    "tx_bandwidth",
    "tx_burst",
    "tx_ops",
    "tx_ops_burst",
    "tx_refill_time",
];

/// The rate spec of the option keys that start with `prefix`; errors name
/// the key as written.
fn flag_rate(pairs: &[(&str, &str)], prefix: &str) -> Result<RateSpec, ConfigError> {
    let named = |e: RateError| RateError {
        key: format!("{prefix}{}", e.key),
        problem: e.problem,
    };
    let mut spec = RateSpec::default();
    for (key, value) in pairs {
        let Some(key) = key.strip_prefix(prefix).filter(|k| RATE_KEYS.contains(k)) else {
            continue;
        };
        let value = match value.parse::<u64>() {
            Ok(n) => RateValue::Number(n),
            Err(_) => RateValue::Text(value),
        };
        spec.set(key, value).map_err(named)?;
    }
    spec.check().map_err(named)?;
    Ok(spec)
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `path=FILE[,readonly=on][,bandwidth=20MiB/s,ops=500,burst=..]`
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let mut known = vec!["path", "readonly"];
        known.extend(RATE_KEYS);
        let pairs = pairs(text, &known)?;
        let path = find(&pairs, "path").ok_or(ConfigError::Missing("path"))?;
        if path.is_empty() {
            return Err(ConfigError::Empty("path"));
        }
        let readonly = match find(&pairs, "readonly") {
            Some(v) => parse_bool("readonly", v)?,
            None => false,
        };
        Ok(DiskConfig {
            path: PathBuf::from(path),
            readonly,
            rate: flag_rate(&pairs, "")?,
        })
    }
}

impl VmConfig {
    /// Whether guest RAM must be a memfd another process can map: a NIC's
    /// queues are served by a vhost-user backend.
    pub fn needs_shared_ram(&self) -> bool {
        self.nets
            .iter()
            .any(|n| matches!(n.attach, NetAttach::VhostUser(_)))
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// `tap=NAME[,mac=MAC][,rx_bandwidth=..,tx_ops=..]` or
    /// `vhost-user=PATH[,mac=MAC]`
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let mut known = vec!["tap", "vhost-user", "mac"];
        known.extend(RX_RATE_KEYS);
        known.extend(TX_RATE_KEYS);
        let pairs = pairs(text, &known)?;
        let mac = find(&pairs, "mac").map(parse_mac).transpose()?;
        let attach = match (find(&pairs, "tap"), find(&pairs, "vhost-user")) {
            (Some(tap), None) => {
                check_tap_name(tap)?;
                NetAttach::Tap(tap.to_string())
            }
            (None, Some("")) => return Err(ConfigError::Empty("vhost-user")),
            (None, Some(path)) => {
                if pairs
                    .iter()
                    .any(|(k, _)| k.ends_with("_bandwidth") || k.ends_with("_ops"))
                {
                    return Err(ConfigError::Conflict(
                        "vhost-user: takes no rate limit (the switch port moves the frames)",
                    ));
                }
                NetAttach::VhostUser(PathBuf::from(path))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict("give tap or vhost-user, not both"))
            }
            (None, None) => return Err(ConfigError::Missing("tap")),
        };
        Ok(NetConfig {
            attach,
            mac,
            rx_rate: flag_rate(&pairs, "rx_")?,
            tx_rate: flag_rate(&pairs, "tx_")?,
        })
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    /// `cid=N,socket=PATH`
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let pairs = pairs(text, &["cid", "socket"])?;
        let cid = parse_cid(find(&pairs, "cid").ok_or(ConfigError::Missing("cid"))?)?;
        let socket = find(&pairs, "socket").ok_or(ConfigError::Missing("socket"))?;
        if socket.is_empty() {
            return Err(ConfigError::Empty("socket"));
        }
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(socket),
            route: None,
        })
    }
}

impl ConsoleMode {
    /// The name used in flags and files: `serial` or `virtio`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleMode::Serial => "serial",
            ConsoleMode::Virtio => "virtio",
        }
    }
}

impl FromStr for ConsoleMode {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "serial" => Ok(ConsoleMode::Serial),
            "virtio" => Ok(ConsoleMode::Virtio),
            _ => Err(ConfigError::BadConsole(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.readonly);
        let d: DiskConfig = "path=a.img".parse().unwrap();
        assert!(!d.readonly);
        assert_eq!(
            "readonly=on".parse::<DiskConfig>(),
            Err(ConfigError::Missing("path"))
        );
        assert_eq!(
            "path=a,size=3".parse::<DiskConfig>(),
            Err(ConfigError::UnknownKey("size".into()))
        );
        assert_eq!(
            "path=a,path=b".parse::<DiskConfig>(),
            Err(ConfigError::Repeated("path".into()))
        );
        assert!(matches!(
            "path=a,readonly=maybe".parse::<DiskConfig>(),
            Err(ConfigError::NotBool { .. })
        ));
        assert_eq!(
            "a.img".parse::<DiskConfig>(),
            Err(ConfigError::NotKeyValue("a.img".into()))
        );
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=fv0,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(n.attach, NetAttach::Tap("fv0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert!("tap=fv0,mac=01:00:00:00:00:01"
            .parse::<NetConfig>()
            .is_err());
        assert!("tap=fv0,mac=52:54:00:ab:cd".parse::<NetConfig>().is_err());
        assert!("tap=fv0,mac=52:54:00:ab:cd:ef:00"
            .parse::<NetConfig>()
            .is_err());
        assert!("tap=a/b".parse::<NetConfig>().is_err());
        assert!("tap=sixteen-chars-xx".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:ab:cd:ef".parse::<NetConfig>().is_err());
    }

    #[test]
    fn rate_options_on_disks_and_nics() {
        let d: DiskConfig = "path=a.img,bandwidth=20MiB/s,ops=500,burst=64M"
            .parse()
            .unwrap();
        assert_eq!(d.rate.bandwidth, Some(20 << 20));
        assert_eq!(d.rate.ops, Some(500));
        assert_eq!(d.rate.burst, Some(64 << 20));
        let n: NetConfig = "tap=fv0,rx_bandwidth=100Mbit/s,tx_ops=1000"
            .parse()
            .unwrap();
        assert_eq!(n.rx_rate.bandwidth, Some(12_500_000));
        assert_eq!(n.rx_rate.ops, None);
        assert_eq!(n.tx_rate.ops, Some(1000));
        let err = "tap=fv0,tx_bandwidth=fast"
            .parse::<NetConfig>()
            .unwrap_err();
        assert!(err.to_string().starts_with("tx_bandwidth: 'fast'"), "{err}");
        let err = "path=a,ops_burst=5".parse::<DiskConfig>().unwrap_err();
        assert_eq!(err.to_string(), "ops_burst: needs ops");
        assert_eq!(
            "tap=fv0,bandwidth=1M".parse::<NetConfig>(),
            Err(ConfigError::UnknownKey("bandwidth".into()))
        );
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size(" 1G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("3,0-1,1"), Ok(vec![0, 1, 3]));
        assert_eq!(format_cpu_list(&[3, 0, 1, 2, 5]), "0-3,5");
        assert_eq!(format_cpu_list(&[7]), "7");
        for bad in [
            "",
            "a",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            "1024",
            "0-99999999999999999999",
        ] {
            assert_eq!(
                parse_cpu_list(bad),
                Err(ConfigError::BadCpuList(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn vsock_and_console_options() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert!("cid=2,socket=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("cid=x,socket=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert_eq!("virtio".parse::<ConsoleMode>(), Ok(ConsoleMode::Virtio));
        assert!("hvc".parse::<ConsoleMode>().is_err());
    }
}
