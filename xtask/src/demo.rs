//! `cargo xtask demo`: boot the guest kit under Ferrovisor, directly on
//! hardware virtualization or inside the lab when the host's KVM is PVM.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::distro;
use crate::guestkit::{self, Kit};
use crate::lab::{self, Spec};
use crate::util::{self, Context, Result};

/// Options of `cargo xtask demo`.
#[derive(Debug, Default)]
struct Options {
    cpus: Option<String>,
    memory: Option<String>,
    run: Option<String>,
    /// Boot the Debian image instead of the guest kit.
    distro: bool,
    /// Two guests talking over a switch.
    fabric: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| fail!("{name} needs a value"))
        };
        match arg.as_str() {
            "--cpus" => opts.cpus = Some(value("--cpus")?),
            "--memory" => opts.memory = Some(value("--memory")?),
            "--run" => opts.run = Some(value("--run")?),
            "--distro" => opts.distro = true,
            "--fabric" => opts.fabric = true,
            other => {
                return Err(fail!(
                    "unknown demo option `{other}`; usage: cargo xtask demo [--distro | --fabric] [--cpus N] [--memory SIZE] [--run 'CMD']"
                ))
            }
        }
    }
    if let Some(cpus) = &opts.cpus {
        if !cpus.parse::<u8>().is_ok_and(|n| n > 0) {
            return Err(fail!("--cpus: `{cpus}` is not a positive number"));
        }
    }
    if opts.fabric && (opts.distro || opts.run.is_some() || opts.cpus.is_some()) {
        return Err(fail!(
            "--fabric takes no other option: it runs its own two guests"
        ));
    }
    if opts.distro && opts.run.is_some() {
        return Err(fail!(
            "--run runs a command in the guest kit; the distribution boots to a login shell"
        ));
    }
    Ok(opts)
}

/// Where the guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// /dev/kvm backed by VT-x or AMD-V.
    Hardware,
    /// /dev/kvm backed by PVM: Linux guests need the lab.
    Pvm,
}

/// Decides how this host can run Linux guests.
pub fn detect_host() -> Result<Host> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Ok(Host::Pvm);
    }
    if !Path::new("/dev/kvm").exists() {
        return Err(fail!("this host has no /dev/kvm (is KVM enabled?)"));
    }
    Ok(Host::Hardware)
}

/// The shell text the demo guest runs first: what devices it sees.
const LIST_DEVICES: &str = r#"echo "demo: the guest sees these devices:"
for v in /sys/bus/virtio/devices/*; do
    [ -e "$v/driver" ] && echo "  ${v##*/}: $(basename "$(readlink "$v/driver")")"
done
for d in /sys/block/vd*; do
    [ -e "$d" ] && echo "  disk /dev/${d##*/}: $(($(cat "$d/size") / 2048)) MiB"
done
for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] || echo "  network ${n##*/}: MAC $(cat "$n/address")"
done
[ -e /dev/hwrng ] && echo "  rng /dev/hwrng: $(cat /sys/class/misc/hw_random/rng_current)"
echo "  console: $(cat /sys/class/tty/console/active)"
"#;

/// The demo's scratch disk size.
const SCRATCH_BYTES: u64 = 256 << 20;
/// The demo's tap, and the address its host end gets in the lab.
const TAP: &str = "fvdemo0";

/// The guest's command: the device list, then CMD or a shell.
fn guest_command(opts: &Options) -> String {
    match &opts.run {
        Some(run) => format!("{LIST_DEVICES}{run}"),
        None => format!("{LIST_DEVICES}exec setsid cttyhack sh"),
    }
}

fn vmm_args(opts: &Options, kernel: &str, initramfs: &str) -> Vec<String> {
    let mut cmdline = guestkit::DEFAULT_CMDLINE.to_string();
    cmdline.push_str(" ferrovisor.run64=");
    cmdline.push_str(&util::base64(guest_command(opts).as_bytes()));
    if opts.run.is_some() {
        cmdline.push_str(" ferrovisor.exit=debug");
    }
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.into(),
        "--initramfs".into(),
        initramfs.into(),
        "--cmdline".into(),
        cmdline,
    ];
    if let Some(cpus) = &opts.cpus {
        args.extend(["--cpus".into(), cpus.clone()]);
    }
    if let Some(memory) = &opts.memory {
        args.extend(["--memory".into(), memory.clone()]);
    }
    args.push("--rng".into());
    args
}

/// Whether this process may create a tap (root, and the tun device exists).
fn can_create_tap() -> std::result::Result<(), &'static str> {
    if !Path::new("/dev/net/tun").exists() {
        return Err("there is no /dev/net/tun (is the tun module loaded?)");
    }
    if !util::is_root() {
        return Err("creating a tap needs root (CAP_NET_ADMIN)");
    }
    Ok(())
}

/// Turns the VMM's exit status and console into the guest command's status.
fn command_status(vmm_status: i32, console: &str) -> u8 {
    const PREFIX: &str = "ferrovisor-guest: exit status ";
    let reported = console.lines().rev().find_map(|l| {
        let at = l.find(PREFIX)?;
        l[at + PREFIX.len()..].trim().parse::<u8>().ok()
    });
    match (vmm_status, reported) {
        // The debug-exit port carried the status: the VMM exits (N << 1) | 1.
        (s, _) if s & 1 == 1 => ((s >> 1) & 0xff) as u8,
        (0, Some(n)) => n,
        (0, None) => {
            eprintln!("demo: the guest powered off without reporting a status");
            0
        }
        (s, _) => {
            eprintln!("demo: ferrovisor failed (exit status {s})");
            u8::try_from(s.clamp(1, 255)).unwrap_or(1)
        }
    }
}

fn run_direct(opts: &Options, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    let mut args = vmm_args(
        opts,
        &kit.vmlinuz.to_string_lossy(),
        &kit.initramfs.to_string_lossy(),
    );
    let dir = util::target_dir().join("demo");
    util::mkdir(&dir)?;
    let scratch = dir.join("scratch.img");
    let file =
        std::fs::File::create(&scratch).ctx(|| format!("cannot create {}", scratch.display()))?;
    file.set_len(SCRATCH_BYTES)
        .ctx(|| format!("cannot size {}", scratch.display()))?;
    eprintln!(
        "demo: scratch disk {} ({} MiB, sparse) is the guest's /dev/vda",
        scratch.display(),
        SCRATCH_BYTES >> 20
    );
    args.extend(["--disk".into(), format!("path={}", scratch.display())]);
    match can_create_tap() {
        Ok(()) => {
            eprintln!("demo: network: the VMM creates tap {TAP} (the guest's eth0)");
            args.extend(["--net".into(), format!("tap={TAP}")]);
        }
        Err(why) => eprintln!("demo: no network interface: {why}"),
    }
    let mut cmd = Command::new(ferrovisor);
    cmd.args(&args);
    if opts.run.is_none() {
        let status = cmd.status().ctx(|| "cannot start ferrovisor".to_string())?;
        return Ok(u8::try_from(status.code().unwrap_or(1).clamp(0, 255)).unwrap_or(1));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .ctx(|| "cannot start ferrovisor".to_string())?;
    let mut console = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout();
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let _ = writeln!(out, "{}", line.trim_end_matches('\r'));
            console.push_str(&line);
            console.push('\n');
        }
    }
    let status = child
        .wait()
        .ctx(|| "cannot wait for ferrovisor".to_string())?;
    Ok(command_status(status.code().unwrap_or(1), &console))
}

/// The lab's shell script for the demo: the scratch disk, the tap when the
/// lab has /dev/net/tun, then the VMM.
fn lab_script(opts: &Options) -> String {
    let args = vmm_args(opts, "$FERROVISOR_KERNEL", "$FERROVISOR_INITRAMFS");
    let mut line = "\"$FERROVISOR_BIN\"".to_string();
    for arg in &args {
        line.push(' ');
        if arg.starts_with('$') {
            line.push_str(&format!("\"{arg}\""));
        } else {
            line.push_str(&util::shell_quote(arg));
        }
    }
    // The scratch disk lives in the lab's tmpfs: a host file cannot reach it.
    let setup = format!(
        "truncate -s {SCRATCH_BYTES} /tmp/scratch.img\n\
         echo 'demo: scratch disk /tmp/scratch.img in the lab ({} MiB, sparse) is /dev/vda'\n\
         devices='--disk path=/tmp/scratch.img'\n\
         if [ -c /dev/net/tun ]; then\n\
         devices=\"$devices --net tap={TAP}\"\n\
         echo 'demo: network: tap {TAP} (guest eth0); its lab end gets 10.0.88.1/24 \
         (in the guest: ip link set eth0 up; ip addr add 10.0.88.2/24 dev eth0; ping 10.0.88.1)'\n\
         (for i in $(seq 300); do [ -e /sys/class/net/{TAP} ] && break; sleep 0.2; done; \
         ip addr add 10.0.88.1/24 dev {TAP}; ip link set {TAP} up) 2>/dev/null &\n\
         else echo 'demo: no network interface: the lab has no /dev/net/tun'; fi\n",
        SCRATCH_BYTES >> 20
    );
    let line = format!("{line} $devices");
    if opts.run.is_none() {
        // The lab console passes keystrokes through untouched to the guest.
        format!("{setup}stty raw -echo\n{line}\nstatus=$?\nstty sane\nexit $status")
    } else {
        format!("{setup}{line}")
    }
}

fn run_in_lab(opts: &Options, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    let interactive = opts.run.is_none();
    let mut spec = Spec::new(Some(lab_script(opts)));
    spec.interactive = interactive;
    spec.deadline = std::time::Duration::from_secs(10 * 60);
    let outcome = lab::run(&spec, kit, Some(ferrovisor))?;
    if interactive {
        return Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1));
    }
    Ok(command_status(outcome.status, &outcome.console))
}

/// The VMM's flags for the distribution: its kernel, initrd and command
/// line, the image as the root disk, 2 vCPUs and 1 GiB unless asked.
fn distro_args(opts: &Options, kernel: &str, initrd: &str, image: &str) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--kernel", kernel, "--initramfs", initrd]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--cmdline".into(), distro::DISTRO_CMDLINE.into()]);
    args.extend(["--cpus".into(), opts.cpus.clone().unwrap_or("2".into())]);
    args.extend([
        "--memory".into(),
        opts.memory.clone().unwrap_or("1G".into()),
    ]);
    args.extend(["--disk".into(), format!("path={image}")]);
    args
}

/// `cargo xtask demo --distro`: the Debian image to its autologin shell.
fn run_distro(opts: &Options, host: Host, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    let built = distro::build()?;
    eprintln!(
        "demo: Debian bookworm with systemd; it logs in as root on the console; `poweroff` ends it"
    );
    if host == Host::Hardware {
        let args = distro_args(
            opts,
            &built.vmlinuz.to_string_lossy(),
            &built.initrd.to_string_lossy(),
            &built.image.to_string_lossy(),
        );
        let status = Command::new(ferrovisor)
            .args(&args)
            .status()
            .ctx(|| "cannot start ferrovisor".to_string())?;
        return Ok(u8::try_from(status.code().unwrap_or(1).clamp(0, 255)).unwrap_or(1));
    }
    let args = distro_args(
        opts,
        distro::LAB_KERNEL,
        distro::LAB_INITRD,
        distro::LAB_IMAGE,
    );
    let line: Vec<String> = args.iter().map(|a| util::shell_quote(a)).collect();
    let script = format!(
        "stty raw -echo\n\"$FERROVISOR_BIN\" {}\nstatus=$?\nstty sane\nexit $status",
        line.join(" ")
    );
    let mut spec = Spec::new(Some(script));
    spec.interactive = true;
    spec.deadline = std::time::Duration::from_secs(30 * 60);
    built.add_to(&mut spec);
    let outcome = lab::run(&spec, kit, Some(ferrovisor))?;
    Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1))
}

/// `cargo xtask demo [--distro] [--cpus N] [--memory SIZE] [--run 'CMD']`.
pub fn command(args: &[String]) -> Result<u8> {
    let opts = parse(args)?;
    let host = detect_host()?;
    let ferrovisor = lab::build_ferrovisor()?;
    let kit = guestkit::build()?;
    if opts.distro {
        return run_distro(&opts, host, &kit, &ferrovisor);
    }
    if opts.fabric {
        return crate::demo_fabric::run(host, &kit, &ferrovisor);
    }
    match host {
        Host::Hardware => {
            eprintln!("demo: host KVM uses hardware virtualization: booting the guest directly");
            run_direct(&opts, &kit, &ferrovisor)
        }
        Host::Pvm => {
            eprintln!(
                "demo: host KVM is PVM (kvm_pvm), which cannot run a stock Linux kernel: \
                 booting the guest under ferrovisor inside the lab"
            );
            if opts.run.is_none() {
                eprintln!("demo: the guest's shell follows; `exit` powers it off (Ctrl-A x kills the lab)");
            }
            run_in_lab(&opts, &kit, &ferrovisor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_debug_exit_or_console() {
        assert_eq!(command_status((3 << 1) | 1, ""), 3);
        assert_eq!(command_status(0, "x\nferrovisor-guest: exit status 5\n"), 5);
        assert_eq!(command_status(0, "no status"), 0);
        assert_eq!(command_status(2, "ferrovisor-guest: exit status 0"), 2);
    }

    #[test]
    fn guest_lists_its_devices_before_the_command() {
        let opts = Options {
            run: Some("echo hi".into()),
            ..Options::default()
        };
        let command = guest_command(&opts);
        assert!(command.starts_with(LIST_DEVICES));
        assert!(command.ends_with("echo hi"));
        let args = vmm_args(&opts, "k", "i");
        assert!(args.contains(&"--rng".to_string()));
        let cmdline = &args[args.iter().position(|a| a == "--cmdline").expect("cmdline") + 1];
        assert!(cmdline.contains(&util::base64(command.as_bytes())));
        assert!(cmdline.ends_with("ferrovisor.exit=debug"));
        let shell = guest_command(&Options::default());
        assert!(shell.ends_with("exec setsid cttyhack sh"));
    }

    #[test]
    fn lab_script_is_valid_shell_with_disk_and_tap() {
        for run in [None, Some("echo 'quoted' \"and\" $HOME".to_string())] {
            let opts = Options {
                run,
                ..Options::default()
            };
            let script = lab_script(&opts);
            assert!(script.contains("devices='--disk path=/tmp/scratch.img'"));
            assert!(script.contains("--net tap=fvdemo0"));
            assert!(script.contains("--rng"));
            let check = Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .expect("run sh -n");
            assert!(
                check.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }

    #[test]
    fn options_are_checked() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&["--cpus", "0"])).is_err());
        assert!(parse(&args(&["--cpus"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        let o = parse(&args(&["--cpus", "2", "--run", "echo hi"])).expect("valid");
        assert_eq!(o.cpus.as_deref(), Some("2"));
        assert_eq!(o.run.as_deref(), Some("echo hi"));
    }
}
