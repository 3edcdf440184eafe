//! Command-line parsing for `ferrovisor`.
//!
//! Hand-written rather than generated, so that every mistake gets exactly one
//! line naming the flag and what is wrong with it.

use std::path::PathBuf;

use thiserror::Error;
use vmm::config::{
    self, ConfigError, ConsoleMode, DiskConfig, HugePages, MemoryBacking, NetConfig, VmConfig,
    VsockConfig,
};
use vmm::cpu::{self as cpu_features, FeatureEdit, FeatureError};

pub use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEMORY};

/// Errors in the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("no command given; try 'ferrovisor run --kernel PATH' or 'ferrovisor --help'")]
    NoCommand,
    #[error("unknown command '{0}'; try 'ferrovisor --help'")]
    UnknownCommand(String),
    #[error("unknown flag '{0}'; try 'ferrovisor run --help'")]
    UnknownFlag(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} takes no value")]
    NoValue(String),
    #[error("{0} given twice")]
    Repeated(&'static str),
    #[error("--kernel or --config is required")]
    NoKernel,
    #[error("--config cannot be combined with {0}: give it in the guest file instead")]
    ConfigWithFlag(&'static str),
    #[error("--cpus: '{0}' is not a number of vCPUs from 1 to 254")]
    BadCpus(String),
    #[error("--memory: '{0}' is not a size (examples: 512M, 2G, 1048576K)")]
    BadSize(String),
    #[error("--uuid: {0}")]
    BadUuid(String),
    #[error("--affinity: {0}")]
    BadAffinity(String),
    #[error("--seccomp: {0}")]
    BadSeccomp(String),
    #[error("--cpu-features: {0}")]
    BadCpuFeatures(FeatureError),
    #[error("--region-fds: {0}")]
    BadRegionFds(vmm::region_fds::RegionFdsError),
    #[error(
        "{0}: '{1}' is not valid: use letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(&'static str, String),
    #[error("--jail-uid: '{0}' is not a uid, or UID:GID, above 0")]
    BadJailUid(String),
    #[error("--jail-cgroup: '{0}' is not \"own\" or \"caller\"")]
    BadJailCgroup(String),
    #[error("{0} needs --jail DIR")]
    NeedsJail(&'static str),
    #[error("unexpected argument '{0}'")]
    Unexpected(String),
    /// A device option string (`--disk`, `--net`, ...) is wrong; the cause
    /// says how.
    #[error("{flag}")]
    Option {
        flag: &'static str,
        #[source]
        source: ConfigError,
    },
}

/// Where the guest's description comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    /// The flags describe it.
    Flags(Box<VmConfig>),
    /// A guest file (`--config`) describes it.
    File(PathBuf),
}

/// Options of `ferrovisor run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub guest: Guest,
    /// Print a line of run statistics on stderr at exit.
    pub stats: bool,
    /// The runtime directory (control socket, console log and socket, exit
    /// record), when the VMM runs under a supervisor.
    pub runtime_dir: Option<PathBuf>,
    /// `--seccomp`: overrides the guest's own setting.
    pub seccomp: Option<vmm::SeccompMode>,
    /// `--region-fds`: shared regions as inherited descriptors, added to
    /// the guest's own.
    pub region_fds: Vec<vmm::config::RegionConfig>,
    /// Run jailed (`--jail DIR`).
    pub jail: Option<JailArgs>,
    /// The guest's name (`--name`): its jail root, cgroup and host name.
    pub name: Option<String>,
}

/// Where a jailed VMM's cgroup comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupMode {
    /// `run` creates `ferrovisor/NAME` under its own cgroup and sets its limits.
    #[default]
    Own,
    /// The caller (the daemon) placed the process in the guest's group.
    Caller,
}

/// `--jail DIR [--jail-uid UID[:GID]] [--jail-cgroup own|caller]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailArgs {
    pub dir: PathBuf,
    /// `None`: a uid from the name, in the default range.
    pub ids: Option<(u32, u32)>,
    pub cgroup: CgroupMode,
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Box<RunArgs>),
    Help,
    RunHelp,
    Version,
}

fn parse_cpus(text: &str) -> Result<u8, ArgsError> {
    match text.parse::<u8>() {
        Ok(n) if (1..=254).contains(&n) => Ok(n),
        _ => Err(ArgsError::BadCpus(text.into())),
    }
}

/// Names `flag` in a device option error.
fn option_with<T>(result: Result<T, ConfigError>, flag: &'static str) -> Result<T, ArgsError> {
    result.map_err(|source| ArgsError::Option { flag, source })
}

/// Parses a device option string, naming `flag` in the error.
fn option<T: std::str::FromStr<Err = ConfigError>>(
    flag: &'static str,
    text: &str,
) -> Result<T, ArgsError> {
    text.parse()
        .map_err(|source| ArgsError::Option { flag, source })
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ArgsError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        None => Err(ArgsError::NoCommand),
        Some("run") => parse_run(args),
        Some("-h" | "--help" | "help") => Ok(Command::Help),
        Some("-V" | "--version" | "version") => Ok(Command::Version),
        Some(other) if other.starts_with('-') => Err(ArgsError::UnknownFlag(other.into())),
        Some(other) => Err(ArgsError::UnknownCommand(other.into())),
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, flag: &'static str) -> Result<(), ArgsError> {
    if slot.replace(value).is_some() {
        return Err(ArgsError::Repeated(flag));
    }
    Ok(())
}

/// The flags that describe the machine, which a guest file replaces.
const MACHINE_FLAGS: [&str; 17] = [
    "--kernel",
    "--initramfs",
    "--initrd",
    "--cmdline",
    "--cpus",
    "--memory",
    "--disk",
    "--net",
    "--console",
    "--rng",
    "--vsock",
    "--affinity",
    "--memory-backing",
    "--hugepages",
    "--cpu-features",
    "--uuid",
    "--netns",
];

/// The flags of `run`, as given (each one at most once unless repeatable).
#[derive(Debug, Default)]
struct RunFlags {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<u8>,
    memory: Option<u64>,
    memory_backing: Option<MemoryBacking>,
    hugepages: Option<HugePages>,
    disks: Vec<DiskConfig>,
    nets: Vec<NetConfig>,
    console: Option<ConsoleMode>,
    rng: bool,
    vsock: Option<VsockConfig>,
    uuid: Option<config::Uuid>,
    /// `--affinity LIST`: every vCPU.
    affinity_all: Option<Vec<usize>>,
    /// `--affinity VCPU=LIST`: one vCPU each.
    affinity_each: Vec<(usize, Vec<usize>)>,
    cpu_features: Option<Vec<FeatureEdit>>,
    stats: bool,
    config: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    seccomp: Option<vmm::SeccompMode>,
    region_fds: Vec<vmm::config::RegionConfig>,
    netns: Option<String>,
    jail: Option<PathBuf>,
    jail_ids: Option<(u32, u32)>,
    jail_cgroup: Option<CgroupMode>,
    name: Option<String>,
    /// The first flag seen that describes the machine (not allowed with
    /// `--config`).
    machine_flag: Option<&'static str>,
}

impl RunFlags {
    /// Takes one flag and its value (`value` is called only by flags that
    /// have one). Returns `Ok(false)` for `--help`.
    fn take(
        &mut self,
        flag: &str,
        mut value: impl FnMut(&'static str) -> Result<String, ArgsError>,
    ) -> Result<bool, ArgsError> {
        if let Some(name) = MACHINE_FLAGS.iter().find(|f| **f == flag) {
            self.machine_flag.get_or_insert(name);
        }
        match flag {
            "--kernel" => set_once(
                &mut self.kernel,
                PathBuf::from(value("--kernel")?),
                "--kernel",
            )?,
            "--initramfs" | "--initrd" => set_once(
                &mut self.initramfs,
                PathBuf::from(value("--initramfs")?),
                "--initramfs",
            )?,
            "--cmdline" => set_once(&mut self.cmdline, value("--cmdline")?, "--cmdline")?,
            "--cpus" => set_once(&mut self.cpus, parse_cpus(&value("--cpus")?)?, "--cpus")?,
            "--memory" => {
                let text = value("--memory")?;
                let size = config::parse_size(&text).ok_or(ArgsError::BadSize(text))?;
                set_once(&mut self.memory, size, "--memory")?
            }
            "--memory-backing" => set_once(
                &mut self.memory_backing,
                option("--memory-backing", &value("--memory-backing")?)?,
                "--memory-backing",
            )?,
            "--hugepages" => set_once(
                &mut self.hugepages,
                option("--hugepages", &value("--hugepages")?)?,
                "--hugepages",
            )?,
            "--disk" => self.disks.push(option("--disk", &value("--disk")?)?),
            "--net" => self.nets.push(option("--net", &value("--net")?)?),
            "--console" => set_once(
                &mut self.console,
                option("--console", &value("--console")?)?,
                "--console",
            )?,
            "--rng" => self.rng = true,
            "--vsock" => set_once(
                &mut self.vsock,
                option("--vsock", &value("--vsock")?)?,
                "--vsock",
            )?,
            "--affinity" => self.affinity(&value("--affinity")?)?,
            "--cpu-features" => set_once(
                &mut self.cpu_features,
                cpu_features::parse_list(&value("--cpu-features")?)
                    .map_err(ArgsError::BadCpuFeatures)?,
                "--cpu-features",
            )?,
            "--uuid" => {
                let uuid = value("--uuid")?
                    .parse()
                    .map_err(|e: config::UuidError| ArgsError::BadUuid(e.to_string()))?;
                set_once(&mut self.uuid, uuid, "--uuid")?
            }
            "--stats" => self.stats = true,
            "--config" => set_once(
                &mut self.config,
                PathBuf::from(value("--config")?),
                "--config",
            )?,
            "--runtime-dir" => set_once(
                &mut self.runtime_dir,
                PathBuf::from(value("--runtime-dir")?),
                "--runtime-dir",
            )?,
            "--seccomp" => set_once(
                &mut self.seccomp,
                value("--seccomp")?.parse().map_err(ArgsError::BadSeccomp)?,
                "--seccomp",
            )?,
            "--region-fds" => {
                let text = value("--region-fds")?;
                let (id, readonly, fds) =
                    vmm::region_fds::parse(&text).map_err(ArgsError::BadRegionFds)?;
                self.region_fds.push(vmm::config::RegionConfig {
                    path: PathBuf::from(format!("region '{}'", fds.name)),
                    id,
                    readonly,
                    fds: Some(fds),
                });
            }
            "--netns" => set_once(
                &mut self.netns,
                name("--netns", value("--netns")?)?,
                "--netns",
            )?,
            "--name" => set_once(&mut self.name, name("--name", value("--name")?)?, "--name")?,
            "--jail" => set_once(&mut self.jail, PathBuf::from(value("--jail")?), "--jail")?,
            "--jail-uid" => set_once(
                &mut self.jail_ids,
                jail_ids(&value("--jail-uid")?)?,
                "--jail-uid",
            )?,
            "--jail-cgroup" => {
                let mode = match value("--jail-cgroup")?.as_str() {
                    "own" => CgroupMode::Own,
                    "caller" => CgroupMode::Caller,
                    other => return Err(ArgsError::BadJailCgroup(other.into())),
                };
                set_once(&mut self.jail_cgroup, mode, "--jail-cgroup")?
            }
            "-h" | "--help" => return Ok(false),
            f => return Err(ArgsError::UnknownFlag(f.into())),
        }
        Ok(true)
    }

    /// `--affinity LIST` or `--affinity VCPU=LIST`.
    fn affinity(&mut self, text: &str) -> Result<(), ArgsError> {
        let list = |t: &str| option_with(config::parse_cpu_list(t), "--affinity");
        match text.split_once('=') {
            None => set_once(&mut self.affinity_all, list(text)?, "--affinity"),
            Some((vcpu, cpus)) => {
                let index: usize = vcpu.parse().map_err(|_| {
                    ArgsError::BadAffinity(format!("'{vcpu}' is not a vCPU number"))
                })?;
                if self.affinity_each.iter().any(|(i, _)| *i == index) {
                    return Err(ArgsError::BadAffinity(format!("vCPU {index} given twice")));
                }
                self.affinity_each.push((index, list(cpus)?));
                Ok(())
            }
        }
    }

    /// The per-vCPU affinity for `cpus` vCPUs.
    fn affinity_for(&self, cpus: u8) -> Result<Vec<Vec<usize>>, ArgsError> {
        if let Some(all) = &self.affinity_all {
            if !self.affinity_each.is_empty() {
                return Err(ArgsError::BadAffinity(
                    "give one list for every vCPU, or VCPU=LIST for each, not both".into(),
                ));
            }
            return Ok(vec![all.clone(); usize::from(cpus)]);
        }
        let mut lists = Vec::new();
        for (index, cpus_allowed) in &self.affinity_each {
            if *index >= usize::from(cpus) {
                return Err(ArgsError::BadAffinity(format!(
                    "vCPU {index} does not exist (the guest has {cpus})"
                )));
            }
            if lists.len() <= *index {
                lists.resize(index + 1, Vec::new());
            }
            lists[*index] = cpus_allowed.clone();
        }
        Ok(lists)
    }

    /// The jail flags, which make sense only together with `--jail`.
    fn jail_args(&self) -> Result<Option<JailArgs>, ArgsError> {
        let Some(dir) = self.jail.clone() else {
            if self.jail_ids.is_some() {
                return Err(ArgsError::NeedsJail("--jail-uid"));
            }
            if self.jail_cgroup.is_some() {
                return Err(ArgsError::NeedsJail("--jail-cgroup"));
            }
            return Ok(None);
        };
        Ok(Some(JailArgs {
            dir,
            ids: self.jail_ids,
            cgroup: self.jail_cgroup.unwrap_or_default(),
        }))
    }

    fn into_run_args(self) -> Result<RunArgs, ArgsError> {
        let jail = self.jail_args()?;
        if let Some(file) = self.config {
            if let Some(flag) = self.machine_flag {
                return Err(ArgsError::ConfigWithFlag(flag));
            }
            return Ok(RunArgs {
                guest: Guest::File(file),
                stats: self.stats,
                runtime_dir: self.runtime_dir,
                seccomp: self.seccomp,
                region_fds: self.region_fds,
                jail,
                name: self.name,
            });
        }
        let cpus = self.cpus.unwrap_or(config::DEFAULT_CPUS);
        let affinity = self.affinity_for(cpus)?;
        let vm = VmConfig {
            kernel: self.kernel.ok_or(ArgsError::NoKernel)?,
            initramfs: self.initramfs,
            cmdline: self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            cpus,
            memory: self.memory.unwrap_or(DEFAULT_MEMORY),
            memory_backing: self.memory_backing.unwrap_or_default(),
            hugepages: self.hugepages,
            disks: self.disks,
            nets: self.nets,
            console: self.console.unwrap_or_default(),
            rng: self.rng,
            vsock: self.vsock,
            affinity,
            cpu_features: self.cpu_features.unwrap_or_default(),
            uuid: self.uuid,
            seccomp: self.seccomp.unwrap_or_default(),
            regions: Vec::new(),
            sched: Default::default(),
            netns: self.netns,
        };
        Ok(RunArgs {
            guest: Guest::Flags(Box::new(vm)),
            stats: self.stats,
            runtime_dir: self.runtime_dir,
            seccomp: self.seccomp,
            region_fds: self.region_fds,
            jail,
            name: self.name,
        })
    }
}

/// A name used as a path component (`--name`, `--netns`).
fn name(flag: &'static str, text: String) -> Result<String, ArgsError> {
    if jail::valid_name(&text) {
        Ok(text)
    } else {
        Err(ArgsError::BadName(flag, text))
    }
}

/// `UID` or `UID:GID`, neither 0.
fn jail_ids(text: &str) -> Result<(u32, u32), ArgsError> {
    let bad = || ArgsError::BadJailUid(text.to_string());
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, g),
        None => (text, text),
    };
    let uid: u32 = uid.parse().map_err(|_| bad())?;
    let gid: u32 = gid.parse().map_err(|_| bad())?;
    if uid == 0 || gid == 0 || uid == u32::MAX || gid == u32::MAX {
        return Err(bad());
    }
    Ok((uid, gid))
}

fn parse_run<I: Iterator<Item = String>>(mut args: I) -> Result<Command, ArgsError> {
    let mut flags = RunFlags::default();
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') {
            return Err(ArgsError::Unexpected(arg));
        }
        // Accept both "--flag value" and "--flag=value".
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let used = std::cell::Cell::new(false);
        let value = |name: &'static str| {
            used.set(true);
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(ArgsError::MissingValue(name))
        };
        if !flags.take(&flag, value)? {
            return Ok(Command::RunHelp);
        }
        if inline.is_some() && !used.get() {
            return Err(ArgsError::NoValue(flag));
        }
    }
    Ok(Command::Run(Box::new(flags.into_run_args()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, ArgsError> {
        parse(line.split_whitespace().map(String::from))
    }

    fn run_args(line: &str) -> RunArgs {
        match parse_str(line).unwrap() {
            Command::Run(r) => *r,
            other => panic!("expected run, got {other:?}"),
        }
    }

    /// The flags' VM and the run options.
    struct Run {
        vm: VmConfig,
        stats: bool,
    }

    fn run(line: &str) -> Run {
        let r = run_args(line);
        match r.guest {
            Guest::Flags(vm) => Run {
                vm: *vm,
                stats: r.stats,
            },
            Guest::File(f) => panic!("expected flags, got file {f:?}"),
        }
    }

    /// The error as the binary prints it: the message and its causes.
    fn message(line: &str) -> String {
        let err = parse_str(line).unwrap_err();
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    }

    #[test]
    fn run_takes_every_flag() {
        let r = run("run --kernel k --initramfs i --cmdline x=1 --cpus 2 --memory 1G --stats");
        assert_eq!(r.vm.kernel, PathBuf::from("k"));
        assert_eq!(r.vm.initramfs, Some(PathBuf::from("i")));
        assert_eq!(r.vm.cmdline, "x=1");
        assert_eq!((r.vm.cpus, r.vm.memory, r.stats), (2, 1 << 30, true));
    }

    #[test]
    fn defaults_apply() {
        let r = run("run --kernel=vmlinuz");
        assert_eq!((r.vm.cpus, r.vm.memory), (1, DEFAULT_MEMORY));
        assert_eq!(r.vm.cmdline, DEFAULT_CMDLINE);
        assert_eq!(r.vm.initramfs, None);
        assert_eq!(r.vm.console, ConsoleMode::Serial);
        assert!(r.vm.disks.is_empty() && r.vm.nets.is_empty());
        assert!(!r.vm.rng && r.vm.vsock.is_none());
        assert_eq!(r.vm.uuid, None);
    }

    #[test]
    fn uuid_flag_sets_the_system_uuid() {
        let r = run("run --kernel k --uuid 6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b");
        assert_eq!(
            r.vm.uuid.map(|u| u.to_string()).as_deref(),
            Some("6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b")
        );
        assert_eq!(
            message("run --kernel k --uuid nope"),
            "--uuid: 'nope' is not a UUID (example: 123e4567-e89b-42d3-a456-426614174000)"
        );
        assert_eq!(
            message("run --config g.toml --uuid 6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b"),
            "--config cannot be combined with --uuid: give it in the guest file instead"
        );
    }

    #[test]
    fn device_flags_fill_the_vm_config() {
        let r = run(
            "run --kernel k --disk path=a.img --disk path=b.img,readonly=on \
             --net tap=fv0 --net tap=fv1,mac=52:54:00:00:00:02 --console virtio --rng \
             --vsock cid=3,socket=/run/v.sock",
        );
        assert_eq!(
            r.vm.disks,
            vec![
                DiskConfig {
                    path: "a.img".into(),
                    readonly: false,
                    rate: Default::default(),
                },
                DiskConfig {
                    path: "b.img".into(),
                    readonly: true,
                    rate: Default::default(),
                }
            ]
        );
        assert_eq!(r.vm.nets.len(), 2);
        assert_eq!(
            r.vm.nets[0].attach,
            vmm::config::NetAttach::Tap("fv0".into())
        );
        assert_eq!(r.vm.nets[1].mac, Some([0x52, 0x54, 0, 0, 0, 2]));
        assert_eq!(r.vm.console, ConsoleMode::Virtio);
        assert!(r.vm.rng);
        assert_eq!(
            r.vm.vsock,
            Some(VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into(),
                route: None,
            })
        );
    }

    #[test]
    fn device_flag_errors_name_the_flag() {
        assert_eq!(
            message("run --kernel k --disk path=a,size=3"),
            "--disk: unknown key 'size'"
        );
        assert_eq!(
            message("run --kernel k --disk readonly=on"),
            "--disk: 'path' is required"
        );
        assert_eq!(
            message("run --kernel k --disk path=a,readonly=maybe"),
            "--disk: readonly: 'maybe' is not on or off"
        );
        assert_eq!(
            message("run --kernel k --net tap=fv0,mac=01:00:00:00:00:01"),
            "--net: '01:00:00:00:00:01' is a multicast MAC address; a NIC needs a unicast one"
        );
        assert_eq!(
            message("run --kernel k --console hvc"),
            "--console: 'hvc' is not virtio or serial"
        );
        assert_eq!(
            message("run --kernel k --vsock cid=2,socket=/v"),
            "--vsock: cid: '2' is not a guest CID (3 to 4294967294)"
        );
        assert_eq!(
            message("run --kernel k --vsock cid=3 --vsock cid=4"),
            "--vsock: 'socket' is required"
        );
        assert_eq!(
            message("run --kernel k --console serial --console virtio"),
            "--console given twice"
        );
        assert_eq!(message("run --kernel k --disk"), "--disk needs a value");
        assert_eq!(message("run --kernel k --rng=on"), "--rng takes no value");
    }

    #[test]
    fn affinity_for_every_vcpu_or_each() {
        assert_eq!(
            run("run --kernel k --cpus 2 --affinity 0-1").vm.affinity,
            vec![vec![0, 1], vec![0, 1]]
        );
        assert_eq!(
            run("run --kernel k --cpus 3 --affinity 1=3 --affinity 0=2,4")
                .vm
                .affinity,
            vec![vec![2, 4], vec![3]]
        );
        assert!(run("run --kernel k").vm.affinity.is_empty());
    }

    #[test]
    fn affinity_errors_name_the_flag() {
        assert_eq!(
            message("run --kernel k --affinity 0-"),
            "--affinity: '0-' is not a list of host CPUs like 0,2-3 (each below 1024)"
        );
        assert_eq!(
            message("run --kernel k --affinity x=1"),
            "--affinity: 'x' is not a vCPU number"
        );
        assert_eq!(
            message("run --kernel k --affinity 0=1 --affinity 0=2"),
            "--affinity: vCPU 0 given twice"
        );
        assert_eq!(
            message("run --kernel k --cpus 2 --affinity 2=1"),
            "--affinity: vCPU 2 does not exist (the guest has 2)"
        );
        assert_eq!(
            message("run --kernel k --affinity 1 --affinity 0=1"),
            "--affinity: give one list for every vCPU, or VCPU=LIST for each, not both"
        );
        assert_eq!(
            message("run --kernel k --affinity 1 --affinity 2"),
            "--affinity given twice"
        );
    }

    #[test]
    fn cpu_features_are_kept_in_order() {
        let r = run("run --kernel k --cpu-features -x2apic,+rdtscp,-tsc_deadline_timer");
        let edits: Vec<String> = r.vm.cpu_features.iter().map(ToString::to_string).collect();
        assert_eq!(edits, ["-x2apic", "+rdtscp", "-tsc_deadline_timer"]);
        assert!(run("run --kernel k").vm.cpu_features.is_empty());
    }

    #[test]
    fn cpu_feature_errors_name_the_flag_and_the_feature() {
        assert_eq!(
            message("run --kernel k --cpu-features -x2apic,+warp"),
            "--cpu-features: 'warp' is not a CPU feature this VMM knows (names as in /proc/cpuinfo flags)"
        );
        assert_eq!(
            message("run --kernel k --cpu-features x2apic"),
            "--cpu-features: 'x2apic' needs + (add) or - (remove) in front of the feature name"
        );
        assert_eq!(
            message("run --kernel k --cpu-features -x2apic --cpu-features -rdtscp"),
            "--cpu-features given twice"
        );
        assert_eq!(
            message("run --config g.toml --cpu-features -x2apic"),
            "--config cannot be combined with --cpu-features: give it in the guest file instead"
        );
    }

    #[test]
    fn config_file_with_run_options() {
        let r = run_args("run --config g.toml --runtime-dir /run/fv/web --stats");
        assert_eq!(r.guest, Guest::File("g.toml".into()));
        assert_eq!(r.runtime_dir, Some("/run/fv/web".into()));
        assert!(r.stats);
        let r = run_args("run --kernel k --runtime-dir=/run/x");
        assert_eq!(r.runtime_dir, Some("/run/x".into()));
    }

    #[test]
    fn config_file_excludes_machine_flags() {
        assert_eq!(
            message("run --config g.toml --cpus 2"),
            "--config cannot be combined with --cpus: give it in the guest file instead"
        );
        assert_eq!(
            message("run --rng --config g.toml"),
            "--config cannot be combined with --rng: give it in the guest file instead"
        );
        assert_eq!(
            message("run --config a.toml --config b.toml"),
            "--config given twice"
        );
        assert_eq!(message("run --stats"), "--kernel or --config is required");
    }

    #[test]
    fn cmdline_with_spaces_survives_as_one_argument() {
        let args = ["run", "--kernel", "k", "--cmdline", "console=ttyS0 quiet"];
        let Command::Run(r) = parse(args.map(String::from)).unwrap() else {
            panic!()
        };
        let Guest::Flags(vm) = r.guest else { panic!() };
        assert_eq!(vm.cmdline, "console=ttyS0 quiet");
    }

    #[test]
    fn bad_input_is_refused_with_its_name() {
        assert_eq!(
            parse_str("run --kernel k --cpus 0"),
            Err(ArgsError::BadCpus("0".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --cpus 300"),
            Err(ArgsError::BadCpus("300".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --memory 12X"),
            Err(ArgsError::BadSize("12X".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --bogus"),
            Err(ArgsError::UnknownFlag("--bogus".into()))
        );
        assert_eq!(parse_str("run --cpus 1"), Err(ArgsError::NoKernel));
        assert_eq!(
            parse_str("run --kernel"),
            Err(ArgsError::MissingValue("--kernel"))
        );
        assert_eq!(
            parse_str("run --kernel a --kernel b"),
            Err(ArgsError::Repeated("--kernel"))
        );
        assert_eq!(
            parse_str("fly"),
            Err(ArgsError::UnknownCommand("fly".into()))
        );
        assert_eq!(parse_str(""), Err(ArgsError::NoCommand));
        assert_eq!(
            parse_str("run --kernel k extra"),
            Err(ArgsError::Unexpected("extra".into()))
        );
    }

    #[test]
    fn every_error_is_one_line() {
        let errors = [
            ArgsError::NoCommand,
            ArgsError::BadSize("x".into()),
            ArgsError::UnknownFlag("--x".into()),
            ArgsError::NoKernel,
        ];
        for e in errors {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn seccomp_is_on_unless_a_flag_says_otherwise() {
        assert_eq!(run("run --kernel k").vm.seccomp, vmm::SeccompMode::On);
        assert_eq!(
            run("run --kernel k --seccomp log").vm.seccomp,
            vmm::SeccompMode::Log
        );
        assert_eq!(
            run("run --kernel k --seccomp=off").vm.seccomp,
            vmm::SeccompMode::Off
        );
        // With a guest file the flag overrides the file's setting.
        let r = run_args("run --config g.toml --seccomp off");
        assert_eq!(r.seccomp, Some(vmm::SeccompMode::Off));
        assert_eq!(
            message("run --kernel k --seccomp maybe"),
            "--seccomp: 'maybe' is not on, log or off"
        );
        assert_eq!(
            message("run --kernel k --seccomp on --seccomp off"),
            "--seccomp given twice"
        );
    }

    #[test]
    fn jail_flags_parse_and_need_jail() {
        let r = run_args("run --config g.toml --jail /j --jail-uid 100001:100002 --jail-cgroup caller --name web");
        assert_eq!(
            r.jail,
            Some(JailArgs {
                dir: "/j".into(),
                ids: Some((100_001, 100_002)),
                cgroup: CgroupMode::Caller
            })
        );
        assert_eq!(r.name.as_deref(), Some("web"));
        let r = run_args("run --kernel k --jail /j --netns guests");
        assert_eq!(
            r.jail.map(|j| (j.ids, j.cgroup)),
            Some((None, CgroupMode::Own))
        );
        match r.guest {
            Guest::Flags(vm) => assert_eq!(vm.netns.as_deref(), Some("guests")),
            Guest::File(_) => panic!("flags expected"),
        }
        assert_eq!(
            message("run --kernel k --jail-uid 5"),
            "--jail-uid needs --jail DIR"
        );
        assert_eq!(
            message("run --kernel k --jail /j --jail-uid 0"),
            "--jail-uid: '0' is not a uid, or UID:GID, above 0"
        );
        assert_eq!(
            message("run --kernel k --jail /j --jail-cgroup mine"),
            "--jail-cgroup: 'mine' is not \"own\" or \"caller\""
        );
        assert!(message("run --kernel k --netns ../x").starts_with("--netns: '../x' is not valid"));
        assert_eq!(
            message("run --config g.toml --netns x"),
            "--config cannot be combined with --netns: give it in the guest file instead"
        );
    }
}
