//! Image roots: the only places a guest under the daemon takes its files
//! from (kernel, initramfs, disk images).
//!
//! The daemon is given roots (`--images DIR`, repeatable; `DIR,block=on`
//! lets disks in that root be block devices); with none, the one root is
//! `STATE_DIR/images`. A guest file must name a path inside a root; it is
//! opened with `openat2` relative to the root's directory descriptor, with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so no
//! `..`, symlink or `/proc` link can lead it out of the root, and a
//! symlink put in place after the guest was created is refused when it
//! starts. The daemon opens each file once per start and hands the open
//! descriptor to the VMM.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use vmm::config::NetAttach;

use thiserror::Error;
use vmm::VmConfig;

/// Errors of the daemon's `--images` and `--taps` flags.
#[derive(Debug, Error)]
pub enum ImagesError {
    #[error("--images: '{0}' is not DIR or DIR,block=on")]
    BadSpec(String),
    #[error("--images: {0} must be an absolute path")]
    Relative(String),
    #[error("--images: cannot open the image root {0}")]
    Open(String, #[source] io::Error),
    #[error("--taps: '{0}' is not a tap name or a prefix ending in '*'")]
    BadTap(String),
}

/// One `--images` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub dir: PathBuf,
    /// Disks under this root may be block devices.
    pub block: bool,
}

impl RootSpec {
    /// Parses `DIR` or `DIR,block=on|off`.
    pub fn parse(text: &str) -> Result<RootSpec, ImagesError> {
        let bad = || ImagesError::BadSpec(text.to_string());
        let (dir, block) = match text.split_once(',') {
            None => (text, false),
            Some((dir, "block=on")) => (dir, true),
            Some((dir, "block=off")) => (dir, false),
            Some(_) => return Err(bad()),
        };
        if dir.is_empty() {
            return Err(bad());
        }
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(ImagesError::Relative(dir.display().to_string()));
        }
        Ok(RootSpec { dir, block })
    }
}

/// An open image root.
#[derive(Debug)]
struct Root {
    spec: RootSpec,
    dir: OwnedFd,
}

/// What a guest file is for, which decides how it is opened and what it
/// may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Kernel or initramfs: read, a regular file.
    Boot,
    /// A disk image: read-write unless `readonly`; a regular file, or a
    /// block device where the root allows it.
    Disk { readonly: bool },
    /// A shared memory region's file: read-write unless `readonly`; a
    /// regular file.
    Region { readonly: bool },
}

/// The daemon's image roots, open.
#[derive(Debug)]
pub struct Roots {
    roots: Vec<Root>,
}

/// `openat2`'s `RESOLVE_*` flags for a guest file.
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

impl Roots {
    /// Opens every root's directory (creating none).
    pub fn open(specs: &[RootSpec]) -> Result<Roots, ImagesError> {
        let mut roots = Vec::new();
        for spec in specs {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
                .open(&spec.dir)
                .map_err(|e| ImagesError::Open(spec.dir.display().to_string(), e))?;
            roots.push(Root {
                spec: spec.clone(),
                dir: file.into(),
            });
        }
        Ok(Roots { roots })
    }

    /// The roots, as a user would list them.
    pub fn describe(&self) -> String {
        let dirs: Vec<String> = self
            .roots
            .iter()
            .map(|r| r.spec.dir.display().to_string())
            .collect();
        dirs.join(", ")
    }

    /// Opens the guest file `path` (the value of `field`) for `usage`.
    /// The error is one line naming the field and the path.
    pub fn open_file(&self, field: &str, path: &Path, usage: Use) -> Result<File, String> {
        let fail = |why: String| format!("{field}: {}: {why}", path.display());
        let (root, rel) = self
            .root_of(path)
            .ok_or_else(|| fail(format!("not under an image root ({})", self.describe())))?;
        let write = matches!(
            usage,
            Use::Disk { readonly: false } | Use::Region { readonly: false }
        );
        let fd = openat2(&root.dir, rel, write).map_err(|e| fail(open_error(&e)))?;
        let file = File::from(fd);
        let kind = file.metadata().map_err(|e| fail(io_text(&e)))?.file_type();
        let allowed = kind.is_file()
            || (kind.is_block_device() && matches!(usage, Use::Disk { .. }) && root.spec.block);
        if !allowed {
            return Err(fail(
                if kind.is_block_device() && matches!(usage, Use::Disk { .. }) {
                    format!(
                    "a block device, and image root {} does not allow them (--images {},block=on)",
                    root.spec.dir.display(),
                    root.spec.dir.display()
                )
                } else if kind.is_block_device() {
                    "a block device, not a regular file".to_string()
                } else {
                    "not a regular file".to_string()
                },
            ));
        }
        // Opened without blocking (a FIFO would have hung the open); the
        // VMM does ordinary blocking I/O on it.
        // SAFETY: F_SETFL on our own open descriptor; no memory effects.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
        if rc != 0 {
            return Err(fail(io_text(&io::Error::last_os_error())));
        }
        Ok(file)
    }

    /// The root `path` lies in (the deepest one), and the path inside it.
    fn root_of<'p>(&self, path: &'p Path) -> Option<(&Root, &'p Path)> {
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return None;
        }
        self.roots
            .iter()
            .filter_map(|root| {
                let rel = path.strip_prefix(&root.spec.dir).ok()?;
                (!rel.as_os_str().is_empty()).then_some((root, rel))
            })
            .max_by_key(|(root, _)| root.spec.dir.components().count())
    }
}

/// `openat2(dir, rel, O_RDONLY or O_RDWR, RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, close-on-exec and
/// non-blocking.
fn openat2(dir: &OwnedFd, rel: &Path, write: bool) -> io::Result<OwnedFd> {
    let c_rel = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = RESOLVE;
    // SAFETY: the path is a C string and `how` a valid open_how of the
    // size passed, both outliving the call; `dir` is an open descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Why `openat2` refused, in a user's words.
fn open_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => {
            "a symbolic link (or a path through one); guest files must not be symlinks".into()
        }
        Some(libc::EXDEV) => "leaves its image root".into(),
        Some(libc::ENOSYS) => "this kernel has no openat2 (Linux 5.6 or later is needed)".into(),
        _ => io_text(e),
    }
}

/// An I/O error's text without the "(os error N)" suffix.
pub fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The taps guests may use: exact names, or prefixes written `PREFIX*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taps {
    patterns: Vec<String>,
}

/// The taps allowed when `--taps` is not given: names starting with `fv`.
pub const DEFAULT_TAPS: &str = "fv*";

impl Taps {
    /// Parses `--taps NAME,PREFIX*,...`.
    pub fn parse(text: &str) -> Result<Taps, ImagesError> {
        let mut patterns = Vec::new();
        for item in text.split(',') {
            let name = item.strip_suffix('*').unwrap_or(item);
            if name.is_empty() || vmm::config::check_tap_name(name).is_err() {
                return Err(ImagesError::BadTap(item.to_string()));
            }
            patterns.push(item.to_string());
        }
        Ok(Taps { patterns })
    }

    /// Whether a guest may use tap `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }

    /// The patterns, as given.
    pub fn describe(&self) -> String {
        self.patterns.join(",")
    }
}

/// What the daemon lets a guest use on the host: files under its image
/// roots, taps it allows, a vsock socket in the guest's own runtime
/// directory.
#[derive(Debug)]
pub struct Policy {
    pub roots: Roots,
    pub taps: Taps,
}

/// A guest file opened for a start.
#[derive(Debug)]
pub struct GuestFile {
    /// The field that names it (`kernel`, `disk[0].path`...).
    pub field: String,
    pub path: PathBuf,
    pub file: File,
    /// For a disk: whether it is read-only.
    pub disk_readonly: Option<bool>,
    pub role: Role,
}

/// Which of a guest's files one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Kernel,
    Initramfs,
    Disk(usize),
    Region(usize),
    /// NIC `index`'s switch port (a connected socket) and its MAC.
    SwitchPort(usize, [u8; 6]),
}

impl GuestFile {
    /// A switch port opened for a start, as a file the VMM inherits.
    pub fn switch_port(port: crate::switch::OpenPort) -> GuestFile {
        GuestFile {
            field: format!("net[{}].switch", port.index),
            path: PathBuf::from(format!("switch port of net[{}]", port.index)),
            file: File::from(std::os::fd::OwnedFd::from(port.stream)),
            disk_readonly: None,
            role: Role::SwitchPort(port.index, port.mac),
        }
    }

    /// Names this file `fd:N` in `config` (the VMM's copy of it).
    pub fn rename_in(&self, config: &mut VmConfig, fd: i32) {
        let name = PathBuf::from(format!("{}{fd}", vmm::guest_file::FD_PREFIX));
        match self.role {
            Role::Kernel => config.kernel = name,
            Role::Initramfs => config.initramfs = Some(name),
            Role::Disk(i) => {
                if let Some(disk) = config.disks.get_mut(i) {
                    disk.path = name;
                }
            }
            Role::Region(i) => {
                if let Some(region) = config.regions.get_mut(i) {
                    region.path = name;
                }
            }
            Role::SwitchPort(i, mac) => {
                if let Some(net) = config.nets.get_mut(i) {
                    net.attach = vmm::config::NetAttach::VhostUser(name);
                    net.mac = Some(mac);
                }
            }
        }
    }
}

impl Policy {
    /// Opens every file `config` names, each beneath its image root.
    pub fn open_files(&self, config: &VmConfig) -> Result<Vec<GuestFile>, String> {
        let mut wanted = vec![(
            "kernel".to_string(),
            config.kernel.clone(),
            None,
            Role::Kernel,
        )];
        if let Some(initramfs) = &config.initramfs {
            wanted.push((
                "initramfs".to_string(),
                initramfs.clone(),
                None,
                Role::Initramfs,
            ));
        }
        for (i, disk) in config.disks.iter().enumerate() {
            wanted.push((
                format!("disk[{i}].path"),
                disk.path.clone(),
                Some(disk.readonly),
                Role::Disk(i),
            ));
        }
        for (i, region) in config.regions.iter().enumerate() {
            wanted.push((
                format!("region[{i}].path"),
                region.path.clone(),
                None,
                Role::Region(i),
            ));
        }
        wanted
            .into_iter()
            .map(|(field, path, disk_readonly, role)| {
                let usage = match (role, disk_readonly) {
                    (Role::Region(i), _) => Use::Region {
                        readonly: config.regions[i].readonly,
                    },
                    (_, Some(readonly)) => Use::Disk { readonly },
                    (_, None) => Use::Boot,
                };
                let file = self.roots.open_file(&field, &path, usage)?;
                Ok(GuestFile {
                    field,
                    path,
                    file,
                    disk_readonly,
                    role,
                })
            })
            .collect()
    }

    /// Checks the host resources other than files: every tap is one the
    /// daemon allows, and the vsock socket is in `runtime`.
    pub fn check_host(&self, config: &VmConfig, runtime: &Path) -> Result<(), String> {
        for (i, net) in config.nets.iter().enumerate() {
            match &net.attach {
                NetAttach::Tap(tap) if !self.taps.allows(tap) => {
                    return Err(format!(
                        "net[{i}].tap: '{tap}' is not a tap this daemon may attach guests to (allowed: {})",
                        self.taps.describe()
                    ));
                }
                NetAttach::VhostUser(_) => {
                    return Err(format!(
                        "net[{i}].vhost_user: the daemon attaches guests to its own switches: name one with switch"
                    ));
                }
                _ => {}
            }
        }
        if let Some(vsock) = &config.vsock {
            if vsock.socket.parent() != Some(runtime) || vsock.socket.file_name().is_none() {
                return Err(format!(
                    "vsock.socket: {}: must be a file in the guest's runtime directory {}",
                    vsock.socket.display(),
                    runtime.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fv-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).expect("dirs");
        std::fs::write(dir.join("root/sub/disk.img"), b"disk").expect("image");
        std::fs::write(dir.join("outside.img"), b"outside").expect("image");
        dir
    }

    fn roots(dir: &Path, block: bool) -> Roots {
        Roots::open(&[RootSpec {
            dir: dir.join("root"),
            block,
        }])
        .expect("roots")
    }

    #[test]
    fn root_specs_parse_or_say_why() {
        assert_eq!(
            RootSpec::parse("/srv/img,block=on").expect("spec"),
            RootSpec {
                dir: "/srv/img".into(),
                block: true
            }
        );
        assert!(!RootSpec::parse("/srv/img").expect("spec").block);
        for bad in ["", "/x,block=maybe", "/x,ro", ",block=on"] {
            assert!(RootSpec::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            RootSpec::parse("img").expect_err("relative").to_string(),
            "--images: img must be an absolute path"
        );
    }

    #[test]
    fn a_file_in_a_root_opens_others_are_refused_naming_the_field() {
        let dir = scratch("open");
        let roots = roots(&dir, false);
        let inside = dir.join("root/sub/disk.img");
        roots
            .open_file("disk[0].path", &inside, Use::Disk { readonly: false })
            .expect("inside");
        let outside = dir.join("outside.img");
        let e = roots
            .open_file("disk[0].path", &outside, Use::Disk { readonly: true })
            .expect_err("outside");
        assert!(e.starts_with("disk[0].path: "), "{e}");
        assert!(e.contains("not under an image root"), "{e}");
        let dotdot = dir.join("root/sub/../../outside.img");
        let e = roots
            .open_file("kernel", &dotdot, Use::Boot)
            .expect_err("..");
        assert!(e.contains("not under an image root"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn symlinks_are_refused_even_inside_the_root() {
        let dir = scratch("link");
        let roots = roots(&dir, false);
        let link = dir.join("root/link.img");
        std::os::unix::fs::symlink("sub/disk.img", &link).expect("symlink");
        let e = roots
            .open_file("kernel", &link, Use::Boot)
            .expect_err("link");
        assert!(
            e.ends_with(
                "a symbolic link (or a path through one); guest files must not be symlinks"
            ),
            "{e}"
        );
        let through = dir.join("root/dirlink");
        std::os::unix::fs::symlink("sub", &through).expect("symlink");
        let e = roots
            .open_file("initramfs", &through.join("disk.img"), Use::Boot)
            .expect_err("through");
        assert!(e.contains("symbolic link"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn directories_and_fifos_are_not_guest_files() {
        let dir = scratch("kinds");
        let roots = roots(&dir, true);
        let e = roots
            .open_file("kernel", &dir.join("root/sub"), Use::Boot)
            .expect_err("dir");
        assert!(e.ends_with("not a regular file"), "{e}");
        let fifo = dir.join("root/fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("c");
        // SAFETY: mkfifo reads the C string, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = roots
            .open_file("kernel", &fifo, Use::Boot)
            .expect_err("fifo");
        assert!(e.ends_with("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn taps_are_names_or_prefixes() {
        let taps = Taps::parse("fv*,br-guest0").expect("taps");
        assert!(taps.allows("fv0") && taps.allows("fv-web-1") && taps.allows("br-guest0"));
        assert!(!taps.allows("eth0") && !taps.allows("br-guest1"));
        assert!(Taps::parse("*").is_err());
        assert!(Taps::parse("a/b").is_err());
        assert!(Taps::parse("").is_err());
    }
}
