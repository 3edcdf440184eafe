//! Just enough ELF64 reading for the kits: a section's bytes by name, and the
//! shared libraries and loader a dynamically linked program needs, so that it
//! can be shipped with them into an initramfs.

use std::path::{Path, PathBuf};

use crate::cpio::Archive;
use crate::util::Result;

fn le_u16(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        d.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn le_u32(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        d.get(at..at + 4)?.try_into().ok()?,
    )))
}

fn le_u64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// Finds the contents of the ELF64 (little-endian) section called `wanted`.
pub fn section<'a>(d: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if d.get(..4)? != b"\x7fELF" || *d.get(4)? != 2 || *d.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(le_u64(d, 0x28)?).ok()?;
    let shentsize = usize::try_from(le_u16(d, 0x3a)?).ok()?;
    let shnum = usize::try_from(le_u16(d, 0x3c)?).ok()?;
    let shstrndx = usize::try_from(le_u16(d, 0x3e)?).ok()?;
    let section = |i: usize| -> Option<(u64, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = le_u32(d, h)?;
        let off = usize::try_from(le_u64(d, h + 0x18)?).ok()?;
        let size = usize::try_from(le_u64(d, h + 0x20)?).ok()?;
        Some((name, d.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_off, body) = section(i)?;
        let name = names.get(usize::try_from(name_off).ok()?..)?;
        let end = name.iter().position(|&b| b == 0)?;
        (&name[..end] == wanted.as_bytes()).then_some(body)
    })
}

fn c_string(table: &[u8], at: usize) -> Option<String> {
    let rest = table.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The `DT_NEEDED` names of a dynamically linked ELF file (empty if static).
pub fn needed(d: &[u8]) -> Vec<String> {
    const DT_NEEDED: u64 = 1;
    let (Some(dynamic), Some(strings)) = (section(d, ".dynamic"), section(d, ".dynstr")) else {
        return Vec::new();
    };
    dynamic
        .chunks_exact(16)
        .filter(|e| le_u64(e, 0) == Some(DT_NEEDED))
        .filter_map(|e| c_string(strings, usize::try_from(le_u64(e, 8)?).ok()?))
        .collect()
}

/// The program interpreter (dynamic loader) path, if any.
pub fn interpreter(d: &[u8]) -> Option<String> {
    c_string(section(d, ".interp")?, 0)
}

/// Follows symbolic links inside an unpacked tree: absolute targets are
/// taken relative to `root`, not to the host's `/`.
fn resolve_in(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..16 {
        let Ok(target) = std::fs::read_link(&path) else {
            return Ok(path);
        };
        path = if let Ok(rest) = target.strip_prefix("/") {
            root.join(rest)
        } else {
            path.parent().unwrap_or(root).join(target)
        };
    }
    Err(fail!("too many symbolic links at {}", path.display()))
}

/// Where libraries live in a Debian tree, in search order.
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];

/// Adds `program` (a file inside `root`) at `at` in the archive, with every
/// library it needs (transitively) and its loader, all taken from `root`.
/// Libraries go to `/lib/x86_64-linux-gnu/`, the loader to its own path.
pub fn add_with_libraries(
    archive: &mut Archive,
    root: &Path,
    program: &Path,
    at: &str,
) -> Result<()> {
    let program = resolve_in(root, program)?;
    let data = crate::util::read(&program)?;
    archive.host_file(at, 0o755, &program);
    if let Some(loader) = interpreter(&data) {
        let host = resolve_in(root, &root.join(loader.trim_start_matches('/')))?;
        if !host.is_file() {
            return Err(fail!("{} has no loader {loader}", root.display()));
        }
        archive.host_file(&loader, 0o755, &host);
    }
    let mut todo = needed(&data);
    let mut done: Vec<String> = Vec::new();
    while let Some(name) = todo.pop() {
        if done.contains(&name) {
            continue;
        }
        let host = LIBRARY_DIRS
            .iter()
            .map(|dir| root.join(dir).join(&name))
            .find(|p| p.exists())
            .ok_or_else(|| {
                fail!(
                    "{} needs {name}, which is not under {}",
                    program.display(),
                    root.display()
                )
            })?;
        let host = resolve_in(root, &host)?;
        todo.extend(needed(&crate::util::read(&host)?));
        archive.host_file(&format!("/lib/x86_64-linux-gnu/{name}"), 0o755, &host);
        done.push(name);
    }
    Ok(())
}

/// Adds e2fsprogs' `mke2fs` (as `/usr/sbin/mke2fs` and `mkfs.ext4`) with its
/// libraries and configuration from the unpacked packages under `root`.
pub fn add_mke2fs(archive: &mut Archive, root: &Path) -> Result<()> {
    let mke2fs = ["sbin/mke2fs", "usr/sbin/mke2fs"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.exists())
        .ok_or_else(|| fail!("the e2fsprogs package has no mke2fs"))?;
    add_with_libraries(archive, root, &mke2fs, "/usr/sbin/mke2fs")?;
    archive.symlink("/usr/sbin/mkfs.ext4", "mke2fs");
    // mke2fs looks at the mount table before it formats a device.
    archive.symlink("/etc/mtab", "/proc/mounts");
    let conf = root.join("etc/mke2fs.conf");
    if conf.is_file() {
        archive.host_file("/etc/mke2fs.conf", 0o644, &conf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_needed_libraries_of_a_real_program() {
        // The test binary itself is dynamically linked against the C library.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let libs = needed(&me);
        assert!(libs.iter().any(|l| l.starts_with("libc.so")), "{libs:?}");
        assert!(interpreter(&me).is_some_and(|i| i.contains("ld-linux")));
    }

    #[test]
    fn non_elf_has_no_libraries() {
        assert!(needed(b"#!/bin/sh\necho hi\n").is_empty());
        assert_eq!(interpreter(b"nope"), None);
    }

    #[test]
    fn absolute_links_stay_inside_the_tree() {
        let root = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        std::fs::create_dir_all(root.join("lib/x")).expect("mkdir");
        std::fs::write(root.join("lib/x/real"), b"data").expect("write");
        std::os::unix::fs::symlink("/lib/x/real", root.join("abs")).expect("link");
        std::os::unix::fs::symlink("real", root.join("lib/x/rel")).expect("link");
        assert_eq!(
            resolve_in(&root, &root.join("abs")).expect("abs"),
            root.join("lib/x/real")
        );
        assert_eq!(
            resolve_in(&root, &root.join("lib/x/rel")).expect("rel"),
            root.join("lib/x/real")
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
