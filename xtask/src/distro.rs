//! `cargo xtask guest-kit --distro`: a real distribution for guests, as a
//! user would boot it: Debian bookworm (minbase, systemd, udev and the cloud
//! kernel with its own initramfs-tools initrd) on a raw ext4 image, root on
//! virtio-blk, with autologin on the serial console.
//!
//! Built with debootstrap from Debian's packages and cached under
//! `target/guest-kit/distro/`, rebuilt only when this recipe changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guestkit;
use crate::util::{self, Context, Fnv, Result};

/// Bump when the recipe changes in a way the text below does not show.
const DISTRO_FORMAT: &str = "distro-1";
const SUITE: &str = "bookworm";
/// Where the debs come from: the mirror apt on this host uses.
const MIRROR: &str = "http://deb.debian.org/debian";
/// Packages beside minbase.
const PACKAGES: &str = "systemd-sysv,udev,linux-image-cloud-amd64";
/// The command line the image boots with (see docs/guest-kit.md).
pub const DISTRO_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw quiet panic=-1 reboot=k,f";
/// The console line the image prints once systemd has finished starting
/// (see [`READY_SCRIPT`]).
pub const READY_LINE: &str = "ferrovisor-distro: system";
/// A kernel command line word that makes the image power off once ready.
pub const POWEROFF_WORD: &str = "ferrovisor.poweroff";

/// Waits for systemd to finish starting, then reports the state, the
/// uptime and the failed units on the console; powers off if asked to.
/// It runs as a `simple` service, so the boot does not wait for it.
const READY_SCRIPT: &str = "#!/bin/sh
state=$(systemctl is-system-running --wait)
read -r up _ </proc/uptime
failed=$(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\\n' ' ')
echo \"ferrovisor-distro: system $state after $up s; failed units: [${failed% }]\" >/dev/console
case \" $(cat /proc/cmdline) \" in
*\" ferrovisor.poweroff \"*) systemctl poweroff ;;
esac
";

const READY_UNIT: &str = "[Unit]
Description=Report on the console that startup has finished
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/ferrovisor-ready

[Install]
WantedBy=multi-user.target
";

const AUTOLOGIN: &str = "[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
";

const FSTAB: &str = "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n";
const HOSTNAME: &str = "ferrovisor-guest\n";
const HOSTS: &str = "127.0.0.1 localhost\n127.0.1.1 ferrovisor-guest\n";

/// The built image and the kernel and initrd taken out of it.
#[derive(Debug, Clone)]
pub struct Distro {
    pub image: PathBuf,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// Where the image and its kernel and initrd are inside the lab.
pub const LAB_IMAGE: &str = "/lab/distro/root.img";
pub const LAB_KERNEL: &str = "/lab/distro/vmlinuz";
pub const LAB_INITRD: &str = "/lab/distro/initrd.img";

impl Distro {
    /// Ships the image, kernel and initrd into a lab session, and tells its
    /// programs where they are (`FERROVISOR_DISTRO_*`).
    pub fn add_to(&self, spec: &mut crate::lab::Spec) {
        for (host, lab) in [
            (&self.image, LAB_IMAGE),
            (&self.vmlinuz, LAB_KERNEL),
            (&self.initrd, LAB_INITRD),
        ] {
            spec.data.push((host.clone(), lab.to_string()));
        }
        for (key, value) in [
            ("FERROVISOR_DISTRO_IMAGE", LAB_IMAGE),
            ("FERROVISOR_DISTRO_KERNEL", LAB_KERNEL),
            ("FERROVISOR_DISTRO_INITRD", LAB_INITRD),
            ("FERROVISOR_DISTRO_CMDLINE", DISTRO_CMDLINE),
        ] {
            spec.env.push((key.to_string(), value.to_string()));
        }
    }
}

fn distro_dir() -> PathBuf {
    guestkit::kit_dir().join("distro")
}

/// Builds the image, or returns the cached one when the recipe is unchanged.
pub fn build() -> Result<Distro> {
    let dir = distro_dir();
    util::mkdir(&dir)?;
    let distro = Distro {
        image: dir.join("root.img"),
        vmlinuz: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let mut key = Fnv::default();
    for part in [
        DISTRO_FORMAT,
        SUITE,
        PACKAGES,
        READY_SCRIPT,
        READY_UNIT,
        AUTOLOGIN,
        FSTAB,
        HOSTNAME,
    ] {
        key.add(part.as_bytes());
    }
    let key = key.hex();
    let stamp = dir.join("stamp");
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key)
        && [&distro.image, &distro.vmlinuz, &distro.initrd]
            .iter()
            .all(|p| p.is_file());
    if fresh {
        return Ok(distro);
    }
    let _ = std::fs::remove_file(&stamp);
    if !util::is_root() {
        return Err(fail!(
            "building the distribution image needs root (debootstrap)"
        ));
    }
    util::ensure_tool("debootstrap", "debootstrap")?;
    util::ensure_tool("mkfs.ext4", "e2fsprogs")?;
    eprintln!("xtask: building the distribution image (Debian {SUITE}, debootstrap from {MIRROR})");
    let root = dir.join("root");
    remove_tree(&root)?;
    util::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}")])
            .arg(SUITE)
            .arg(&root)
            .arg(MIRROR),
    )?;
    configure(&root)?;
    take_boot_files(&root, &distro)?;
    trim(&root)?;
    make_image(&root, &distro.image)?;
    remove_tree(&root)?;
    util::write(&stamp, &key)?;
    Ok(distro)
}

fn remove_tree(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).ctx(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

fn put(root: &Path, path: &str, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let target = root.join(path.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        util::mkdir(parent)?;
    }
    util::write(&target, text)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("cannot set the mode of {}", target.display()))
}

/// The files that make the image boot as a guest: fstab, host name,
/// autologin on the serial console, an empty root password and the
/// readiness report.
fn configure(root: &Path) -> Result<()> {
    put(root, "/etc/fstab", FSTAB, 0o644)?;
    put(root, "/etc/hostname", HOSTNAME, 0o644)?;
    put(root, "/etc/hosts", HOSTS, 0o644)?;
    put(
        root,
        "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        AUTOLOGIN,
        0o644,
    )?;
    put(
        root,
        "/usr/local/sbin/ferrovisor-ready",
        READY_SCRIPT,
        0o755,
    )?;
    put(
        root,
        "/etc/systemd/system/ferrovisor-ready.service",
        READY_UNIT,
        0o644,
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    util::mkdir(&wants)?;
    let link = wants.join("ferrovisor-ready.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/ferrovisor-ready.service", &link)
        .ctx(|| format!("cannot link {}", link.display()))?;
    let shadow = root.join("etc/shadow");
    let text = String::from_utf8_lossy(&util::read(&shadow)?).into_owned();
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("root:") {
            Some(rest) => format!("root::{}\n", rest.split_once(':').map_or("", |r| r.1)),
            None => format!("{l}\n"),
        })
        .collect();
    put(root, "/etc/shadow", &text, 0o640)
}

/// Copies the kernel and the initramfs-tools initrd out of `/boot`.
fn take_boot_files(root: &Path, distro: &Distro) -> Result<()> {
    let boot = root.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        std::fs::read_dir(&boot)
            .ctx(|| format!("cannot list {}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .ok_or_else(|| fail!("the image has no /boot/{prefix}*"))
    };
    for (prefix, out) in [
        ("vmlinuz-", &distro.vmlinuz),
        ("initrd.img-", &distro.initrd),
    ] {
        let from = find(prefix)?;
        std::fs::copy(&from, out).ctx(|| format!("cannot copy {}", from.display()))?;
    }
    Ok(())
}

/// Drops what a booted guest does not need, so the image ships quickly
/// into the lab: downloaded packages, package lists, documentation,
/// translations and `/boot` (the kernel and initrd are given to the VMM).
fn trim(root: &Path) -> Result<()> {
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "boot",
    ] {
        let path = root.join(dir);
        remove_tree(&path)?;
        util::mkdir(&path)?;
    }
    Ok(())
}

/// The size in KiB of what lies under `root`.
fn used_kib(root: &Path) -> Result<u64> {
    let out = util::output(Command::new("du").args(["-sk"]).arg(root))?;
    out.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail!("cannot read the size of {}", root.display()))
}

/// An ext4 image holding `root`, with room to spare for logs and the
/// journal, sparse on the host.
fn make_image(root: &Path, image: &Path) -> Result<()> {
    let size_mib = used_kib(root)? * 13 / 10 / 1024 + 96;
    let _ = std::fs::remove_file(image);
    util::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(root)
            .arg(image)
            .arg(format!("{size_mib}M")),
    )
}
