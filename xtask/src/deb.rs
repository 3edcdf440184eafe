//! Fetching Debian packages with apt's ordinary tools and unpacking them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{self, Context, Result};

/// A concrete Debian package at the version apt would install.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
}

fn apt_cache(args: &[&str]) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then_some(text)
}

/// Runs an apt-cache query, refreshing apt's lists once if it finds nothing.
fn apt_cache_or_update(args: &[&str]) -> Result<String> {
    if let Some(text) = apt_cache(args) {
        return Ok(text);
    }
    util::apt_update()?;
    apt_cache(args).ok_or_else(|| fail!("`apt-cache {}` found nothing", args.join(" ")))
}

/// The candidate version of `name`.
fn candidate_version(name: &str) -> Result<String> {
    let policy = apt_cache_or_update(&["policy", name])?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .ok_or_else(|| fail!("apt has no installable version of {name}"))
}

/// Resolves a package by name to the version apt would pick.
pub fn resolve(name: &str) -> Result<Package> {
    Ok(Package {
        name: name.to_string(),
        version: candidate_version(name)?,
    })
}

/// Resolves a metapackage to the concrete package it depends on whose name
/// matches `prefix*suffix` (e.g. `linux-image-*-cloud-amd64`).
pub fn resolve_dependency(meta: &str, prefix: &str, suffix: &str) -> Result<Package> {
    let deps = apt_cache_or_update(&["depends", meta])?;
    let name = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with(prefix) && d.ends_with(suffix) && d.len() > prefix.len())
        .ok_or_else(|| fail!("{meta} depends on no {prefix}*{suffix} package"))?;
    resolve(name)
}

impl Package {
    /// The .deb file name this package is cached under.
    pub fn file_name(&self) -> String {
        // Epochs ("1:") are not part of Debian file names.
        let version = self.version.split_once(':').map_or(&*self.version, |v| v.1);
        format!("{}_{}_amd64.deb", self.name, version)
    }

    /// Downloads the package into `dir` unless it is there already.
    pub fn download(&self, dir: &Path) -> Result<PathBuf> {
        util::mkdir(dir)?;
        let path = dir.join(self.file_name());
        if path.is_file() {
            return Ok(path);
        }
        eprintln!("xtask: downloading {} {}", self.name, self.version);
        let tmp = dir.join("download.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        util::mkdir(&tmp)?;
        let mut cmd = Command::new("apt-get");
        if util::is_root() {
            // Root's files are not readable by apt's sandbox user; skip the warning.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.arg("download")
            .arg(format!("{}={}", self.name, self.version))
            .current_dir(&tmp)
            .stdin(Stdio::null());
        util::run(&mut cmd)?;
        let fetched = std::fs::read_dir(&tmp)
            .ctx(|| format!("cannot list {}", tmp.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| fail!("apt-get download produced no .deb for {}", self.name))?;
        std::fs::rename(&fetched, &path).ctx(|| format!("cannot move {}", fetched.display()))?;
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(path)
    }
}

/// Unpacks a .deb's files into `dir` (replacing what was there).
pub fn extract(deb: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).ctx(|| format!("cannot remove {}", dir.display()))?;
    }
    util::mkdir(dir)?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
}

/// Unpacks a .deb's files into `dir`, keeping what is there (for unpacking
/// several packages into one tree).
pub fn extract_into(deb: &Path, dir: &Path) -> Result<()> {
    util::mkdir(dir)?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
}
