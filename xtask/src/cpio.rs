//! A writer for "newc" cpio archives, the format Linux unpacks as an initramfs.
//!
//! Entries are collected first and written in one go, so that parent
//! directories can be created implicitly and every path appears once.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::util::{Context, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

#[derive(Debug, Clone)]
enum Body {
    Dir,
    Bytes(Vec<u8>),
    HostFile(PathBuf),
    Symlink(String),
    CharDev(u32, u32),
}

#[derive(Debug, Clone)]
struct Entry {
    mode: u32,
    body: Body,
}

/// An initramfs under construction. Paths are absolute archive paths ("/bin/sh").
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn add_parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry {
                mode: S_IFDIR | 0o755,
                body: Body::Dir,
            });
        }
    }

    fn insert(&mut self, path: &str, mode: u32, body: Body) {
        let path = normalize(path);
        self.add_parents(&path);
        self.entries.insert(path, Entry { mode, body });
    }

    /// Adds an empty directory.
    pub fn dir(&mut self, path: &str) {
        self.insert(path, S_IFDIR | 0o755, Body::Dir);
    }

    /// Adds a file with the given contents and permission bits.
    pub fn bytes(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) {
        self.insert(path, S_IFREG | perm, Body::Bytes(data.into()));
    }

    /// Adds a file copied from the host when the archive is written.
    pub fn host_file(&mut self, path: &str, perm: u32, source: &Path) {
        self.insert(path, S_IFREG | perm, Body::HostFile(source.to_path_buf()));
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, S_IFLNK | 0o777, Body::Symlink(target.to_string()));
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.insert(path, S_IFCHR | perm, Body::CharDev(major, minor));
    }

    /// Writes the archive to `out`.
    pub fn write_to(&self, out: &Path) -> Result<()> {
        let file = File::create(out).ctx(|| format!("cannot create {}", out.display()))?;
        let mut w = BufWriter::new(file);
        self.write_stream(&mut w)
            .ctx(|| format!("cannot write {}", out.display()))?;
        w.flush().ctx(|| format!("cannot write {}", out.display()))
    }

    fn write_stream(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut ino = 1;
        for (path, entry) in &self.entries {
            ino += 1;
            let (data, rdev) = match &entry.body {
                Body::Dir => (Vec::new(), (0, 0)),
                Body::Bytes(b) => (b.clone(), (0, 0)),
                Body::HostFile(p) => (
                    std::fs::read(p).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
                    })?,
                    (0, 0),
                ),
                Body::Symlink(t) => (t.as_bytes().to_vec(), (0, 0)),
                Body::CharDev(ma, mi) => (Vec::new(), (*ma, *mi)),
            };
            let nlink = if entry.mode & S_IFDIR == S_IFDIR {
                2
            } else {
                1
            };
            write_entry(w, path, ino, entry.mode, nlink, &data, rdev)?;
        }
        write_entry(w, "TRAILER!!!", 0, 0, 1, &[], (0, 0))
    }
}

fn pad4(w: &mut impl Write, len: usize) -> std::io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn write_entry(
    w: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> std::io::Result<()> {
    let size = u32::try_from(data.len())
        .map_err(|_| std::io::Error::other(format!("{name} is too large for cpio")))?;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad4(w, data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_bytes(a: &Archive) -> Vec<u8> {
        let mut out = Vec::new();
        a.write_stream(&mut out).expect("write to a Vec");
        out
    }

    #[test]
    fn entries_are_aligned_and_parents_created() {
        let mut a = Archive::new();
        a.bytes("/bin/x", 0o755, b"hello".to_vec());
        let out = archive_bytes(&a);
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // "bin" is created before "bin/x", and the archive ends with the trailer.
        let bin = text.find("bin\0").expect("parent dir");
        let file = text.find("bin/x\0").expect("file");
        assert!(bin < file);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("hello"));
        // Mode of the file in the second header.
        let second = &text[text.find("070701").expect("h") + 1..];
        let h = &second[second.find("070701").expect("h2")..];
        assert_eq!(&h[14..22], "000081ed");
    }

    #[test]
    fn char_devices_carry_rdev() {
        let mut a = Archive::new();
        a.char_dev("/dev/console", 0o600, 5, 1);
        let out = archive_bytes(&a);
        let text = String::from_utf8_lossy(&out);
        let h = &text[text.rfind("070701").expect("trailer")..];
        assert!(h.starts_with("070701"));
        let dev = &text[text.find("dev/console").expect("name") - 110..];
        assert_eq!(&dev[78..86], "00000005");
        assert_eq!(&dev[86..94], "00000001");
    }
}
