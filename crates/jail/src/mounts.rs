//! The per-guest root: a read-only tmpfs holding the runtime directory and
//! the guest's own `/proc`, pivoted into.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{sys, JailError, Result};

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Sys {
        what: format!("use path {}", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source_c = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype_c = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if rc != 0 {
        return Err(sys(format!(
            "mount {} on {}",
            source.map_or_else(
                || fstype.unwrap_or("").to_string(),
                |s| s.display().to_string()
            ),
            target.display()
        )));
    }
    Ok(())
}

/// Gives directory `dir` and the files in it to the guest's uid and gid,
/// mode 0700: the daemon, as root, still reads and writes in it.
pub(crate) fn give_dir(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    let chown = |path: &Path| -> Result<()> {
        let c = c_path(path)?;
        // SAFETY: `c` is a NUL-terminated path; lchown never follows a link.
        if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
            return Err(sys(format!("give {} to uid {uid}", path.display())));
        }
        Ok(())
    };
    chown(dir)?;
    let c = c_path(dir)?;
    // SAFETY: `c` is a NUL-terminated path.
    if unsafe { libc::chmod(c.as_ptr(), 0o700) } != 0 {
        return Err(sys(format!("set the mode of {}", dir.display())));
    }
    let entries = std::fs::read_dir(dir).map_err(|source| JailError::Sys {
        what: format!("list {}", dir.display()),
        source,
    })?;
    for entry in entries.flatten() {
        chown(&entry.path())?;
    }
    Ok(())
}

pub(crate) fn set_hostname(name: &str) -> Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(sys("set the jail's host name"));
    }
    Ok(())
}

/// `root` joined with absolute path `path`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Creates `path` and its missing parents inside the jail's root as 0755,
/// whatever the process's file mode creation mask (a daemon runs its VMMs
/// with 077): the jailed uid must be able to walk down to its runtime
/// directory.
fn make_dirs(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // SAFETY: umask has no memory effects; the jail is set up while the
    // process has one thread, and the old mask is put back below.
    let old = unsafe { libc::umask(0o022) };
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    made.map_err(|source| JailError::Sys {
        what: format!("create {}", path.display()),
        source,
    })
}

/// Makes the current directory (the new root) the root. pivot_root stacks
/// the old root on the new one, then the old root is detached. A root that
/// is the initial ramfs cannot be pivoted away (EINVAL): then the new root
/// is moved over `/` and chrooted into, as switch_root does; the old root
/// is hidden below it, and with no capability left (CAP_SYS_CHROOT) the VMM
/// has no way back to it.
fn pivot_here(root: &Path) -> Result<()> {
    let dot = c".";
    // SAFETY: pivot_root with "." twice; both are NUL-terminated strings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } == 0 {
        // SAFETY: detaches the old root, now mounted on ".".
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(sys("detach the host's root"));
        }
        return Ok(());
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(sys(format!("pivot into {}", root.display())));
    }
    mount(
        Some(Path::new(".")),
        Path::new("/"),
        None,
        libc::MS_MOVE,
        None,
    )?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(sys(format!("enter {} as the root", root.display())));
    }
    Ok(())
}

/// Builds the root on `root` and pivots into it; the old root is detached.
pub(crate) fn enter_root(root: &Path, writable: &[PathBuf]) -> Result<()> {
    let hardening = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // The mount point on the host keeps the caller's mask (a daemon's
    // state directory stays private); what is made inside the tmpfs is 0755.
    std::fs::create_dir_all(root).map_err(|source| JailError::Sys {
        what: format!("create {}", root.display()),
        source,
    })?;
    mount(
        None,
        root,
        Some("tmpfs"),
        hardening,
        Some("size=64k,nr_inodes=256,mode=0755"),
    )?;
    for dir in writable {
        let target = inside(root, dir);
        make_dirs(&target)?;
        mount(Some(dir), &target, None, libc::MS_BIND, None)?;
        mount(
            None,
            &target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | hardening,
            None,
        )?;
    }
    let proc_dir = root.join("proc");
    make_dirs(&proc_dir)?;
    // Only the guest's PID namespace's processes, and no system files
    // (subset=pid); a kernel without subset gets the processes only.
    mount(None, &proc_dir, Some("proc"), hardening, Some("subset=pid"))
        .or_else(|_| mount(None, &proc_dir, Some("proc"), hardening, None))?;
    let root_c = c_path(root)?;
    // SAFETY: `root_c` is a NUL-terminated path.
    if unsafe { libc::chdir(root_c.as_ptr()) } != 0 {
        return Err(sys(format!("enter {}", root.display())));
    }
    pivot_here(root)?;
    let slash = c"/";
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chdir(slash.as_ptr()) } != 0 {
        return Err(sys("enter the new root"));
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hardening,
        None,
    )
}
