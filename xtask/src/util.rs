//! Small helpers shared by the xtask commands: errors, running programs,
//! locating the workspace and installing missing host tools.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An xtask failure: one line for the user.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Builds an [`Error`] from a format string.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        $crate::util::Error(format!($($arg)*))
    };
}

/// Adds a description of what was being done to any displayable error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Renders a command line for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command to completion with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .ctx(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        return Err(fail!("`{}` failed ({status})", show(cmd)));
    }
    Ok(())
}

/// Runs a command and returns its standard output; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .ctx(|| format!("cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        return Err(fail!("`{}` failed ({})", show(cmd), out.status));
    }
    String::from_utf8(out.stdout).ctx(|| format!("`{}` printed non-UTF-8 output", show(cmd)))
}

/// Whether the current user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds an executable on PATH.
pub fn which(program: impl AsRef<OsStr>) -> Option<PathBuf> {
    let program = Path::new(program.as_ref());
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Makes sure `program` is installed, installing Debian package `package` with
/// apt when running as root. Otherwise fails with the command to run.
pub fn ensure_tool(program: &str, package: &str) -> Result<()> {
    if which(program).is_some() {
        return Ok(());
    }
    if !is_root() {
        return Err(fail!(
            "`{program}` is missing; install it with: sudo apt-get install -y {package}"
        ));
    }
    eprintln!("xtask: `{program}` is missing; installing Debian package {package}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        apt_update()?;
        if !install() {
            return Err(fail!("`apt-get install -y {package}` failed"));
        }
    }
    if which(program).is_none() {
        return Err(fail!(
            "installed {package} but `{program}` is still not on PATH"
        ));
    }
    Ok(())
}

/// Refreshes apt's package lists (root only).
pub fn apt_update() -> Result<()> {
    if !is_root() {
        return Err(fail!(
            "apt's package lists are empty or stale; run: sudo apt-get update"
        ));
    }
    eprintln!("xtask: running apt-get update");
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))
}

/// Creates a directory and its parents.
pub fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).ctx(|| format!("cannot create {}", path.display()))
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).ctx(|| format!("cannot read {}", path.display()))
}

/// Writes a whole file.
pub fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, data).ctx(|| format!("cannot write {}", path.display()))
}

/// Quotes a string for /bin/sh.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A stable 64-bit FNV-1a hash, used for cache keys.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn add(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate consecutive fields so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        self
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Encodes bytes as standard base64, the encoding of the guest kit's
/// `ferrovisor.run64=` word; the lab tests' harness owns it.
pub use lab_tests::base64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"echo 'a b' | wc -c"), "ZWNobyAnYSBiJyB8IHdjIC1j");
    }

    #[test]
    fn shell_quote_escapes_quotes() {
        assert_eq!(shell_quote("plain/path"), "plain/path");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn fnv_separates_fields() {
        let a = Fnv::default().add(b"ab").add(b"c").hex();
        let b = Fnv::default().add(b"a").add(b"bc").hex();
        assert_ne!(a, b);
    }
}
