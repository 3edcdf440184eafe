//! The QEMU that emulates the lab's machine: Debian's bookworm-backports
//! build (QEMU 10), unpacked under `target/lab-qemu/` and never installed.
//!
//! Bookworm's own QEMU 7.2 emulates SVM with faults that kill nested guests
//! now and then: KVM's traces show its emulated CPU walking page tables the
//! guest never had (docs/lab.md, "What the fault is, traced"). The backports
//! build runs the same boots without them. It is fetched with apt's own
//! tools through a private source list, lists and cache, so the host's apt
//! configuration and its installed QEMU (which the lab still ships inside
//! itself, as the benchmarks' peer) stay as they are.
//!
//! `FERROVISOR_LAB_QEMU=system` runs the lab on the host's QEMU instead, to
//! compare; so does a machine that cannot fetch the backports build, after
//! one line saying why.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::util::{self, Context, Result};

/// Where the packages come from.
const SOURCE: &str = "deb http://deb.debian.org/debian bookworm-backports main\n";
const SUITE: &str = "bookworm-backports";
/// The binary, the data its machine loads (option ROMs, SeaBIOS) and its
/// modules.
const PACKAGES: [&str; 4] = [
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];

/// A QEMU unpacked in a directory of its own.
#[derive(Debug, Clone)]
pub struct LabQemu {
    binary: PathBuf,
    root: PathBuf,
    /// `QEMU emulator version ...`, for the lab's first line.
    pub version: String,
}

impl LabQemu {
    /// A command running this QEMU with its own data and modules.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        for data in ["usr/share/qemu", "usr/share/seabios"] {
            cmd.arg("-L").arg(self.root.join(data));
        }
        cmd.env(
            "QEMU_MODULE_DIR",
            self.root.join("usr/lib/x86_64-linux-gnu/qemu"),
        );
        cmd
    }
}

/// The lab's QEMU, fetched on first use; `None` means the host's.
pub fn get() -> Option<&'static LabQemu> {
    static QEMU: OnceLock<Option<LabQemu>> = OnceLock::new();
    QEMU.get_or_init(|| {
        match std::env::var("FERROVISOR_LAB_QEMU").as_deref() {
            Ok("system") => {
                eprintln!("xtask: the lab runs on the host's QEMU (FERROVISOR_LAB_QEMU=system)");
                return None;
            }
            Ok(other) => eprintln!(
                "xtask: FERROVISOR_LAB_QEMU={other} is not known (only `system` is); \
                 the lab runs on {SUITE}'s QEMU"
            ),
            Err(_) => {}
        }
        match provision(&util::target_dir().join("lab-qemu")) {
            Ok(qemu) => {
                eprintln!("xtask: the lab runs on {} ({SUITE})", qemu.version);
                Some(qemu)
            }
            Err(e) => {
                eprintln!(
                    "xtask: cannot fetch QEMU from {SUITE} ({e}); the lab runs on the host's \
                     QEMU, whose emulated SVM fails nested guests now and then (docs/lab.md)"
                );
                None
            }
        }
    })
    .as_ref()
}

/// `binary --version`'s first line, if it runs.
fn version_of(qemu: &LabQemu) -> Option<String> {
    let out = qemu
        .command()
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status
        .success()
        .then(|| text.lines().next().unwrap_or("").trim().to_string())
}

fn unpacked(root: &Path) -> LabQemu {
    LabQemu {
        binary: root.join("usr/bin/qemu-system-x86_64"),
        root: root.to_path_buf(),
        version: String::new(),
    }
}

/// The QEMU under `dir`, fetched and unpacked there unless it is already.
fn provision(dir: &Path) -> Result<LabQemu> {
    let root = dir.join("root");
    let mut qemu = unpacked(&root);
    if let Some(version) = version_of(&qemu) {
        qemu.version = version;
        return Ok(qemu);
    }
    if !util::is_root() {
        return Err(fail!("fetching it needs root"));
    }
    eprintln!("xtask: fetching the lab's QEMU from Debian {SUITE}");
    let debs = dir.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    util::mkdir(&debs)?;
    util::mkdir(&dir.join("lists/partial"))?;
    util::mkdir(&dir.join("cache/archives/partial"))?;
    util::write(&dir.join("sources.list"), SOURCE)?;
    util::run(&mut apt(dir, "update"))?;
    let mut download = apt(dir, "download");
    download.current_dir(&debs);
    for package in PACKAGES {
        download.arg(format!("{package}/{SUITE}"));
    }
    util::run(&mut download)?;
    // Unpack beside the final tree, then move it in place, so that a lab
    // started meanwhile never sees half a QEMU.
    let fresh = dir.join(format!("root.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    for entry in std::fs::read_dir(&debs).ctx(|| format!("cannot list {}", debs.display()))? {
        let deb = entry
            .ctx(|| format!("cannot list {}", debs.display()))?
            .path();
        crate::deb::extract_into(&deb, &fresh)?;
    }
    let _ = std::fs::remove_dir_all(&root);
    if std::fs::rename(&fresh, &root).is_err() {
        // Another lab finished first: its tree is the same.
        let _ = std::fs::remove_dir_all(&fresh);
    }
    qemu.version = version_of(&qemu).ok_or_else(|| fail!("the unpacked QEMU does not run"))?;
    Ok(qemu)
}

/// `apt-get VERB` with `dir`'s source list, lists and cache, not the host's.
fn apt(dir: &Path, verb: &str) -> Command {
    let mut cmd = Command::new("apt-get");
    let option = |key: &str, value: &Path| format!("{key}={}", value.display());
    cmd.args(["-q", "-o", "APT::Sandbox::User=root"])
        .args([
            "-o",
            &option("Dir::Etc::SourceList", &dir.join("sources.list")),
        ])
        .args(["-o", "Dir::Etc::SourceParts=-"])
        .args(["-o", &option("Dir::State::Lists", &dir.join("lists"))])
        .args(["-o", &option("Dir::Cache", &dir.join("cache"))])
        .arg(verb)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_uses_the_unpacked_data_and_modules() {
        let qemu = unpacked(Path::new("/t/lab-qemu/root"));
        let cmd = qemu.command();
        assert_eq!(
            cmd.get_program(),
            "/t/lab-qemu/root/usr/bin/qemu-system-x86_64"
        );
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-L",
                "/t/lab-qemu/root/usr/share/qemu",
                "-L",
                "/t/lab-qemu/root/usr/share/seabios"
            ]
        );
        let modules = cmd
            .get_envs()
            .find(|(k, _)| *k == "QEMU_MODULE_DIR")
            .and_then(|(_, v)| v);
        assert_eq!(
            modules.map(|v| v.to_string_lossy().into_owned()).as_deref(),
            Some("/t/lab-qemu/root/usr/lib/x86_64-linux-gnu/qemu")
        );
    }

    #[test]
    fn apt_reads_only_the_private_source_list() {
        let cmd = apt(Path::new("/t/q"), "update");
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "Dir::Etc::SourceList=/t/q/sources.list",
            "Dir::Etc::SourceParts=-",
            "Dir::State::Lists=/t/q/lists",
            "Dir::Cache=/t/q/cache",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
        }
        assert_eq!(args.last().map(String::as_str), Some("update"));
    }
}
