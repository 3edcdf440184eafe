//! Kernel modules from an unpacked kernel package: finding them, reading the
//! dependencies recorded in each module's `.modinfo` section, ordering them
//! for `insmod`, and decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` files.
//!
//! Debian's kernel package ships no `modules.dep` (depmod runs at install
//! time), so the dependencies are read from the modules themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Context, Result};

/// The modules of one kernel, by normalized name (dashes become underscores).
#[derive(Debug)]
pub struct ModuleTree {
    modules: BTreeMap<String, PathBuf>,
}

/// A module ready to be put into an initramfs.
#[derive(Debug)]
pub struct Module {
    pub name: String,
    /// Uncompressed module image.
    pub data: Vec<u8>,
}

/// Puts `modules` under `dir` in `archive`, with a `load-order` file that
/// names them one a line, dependencies first, for the init script to insmod.
pub fn add_to_archive(archive: &mut crate::cpio::Archive, dir: &str, modules: Vec<Module>) {
    let mut order = String::new();
    for module in modules {
        order.push_str(&module.name);
        order.push('\n');
        archive.bytes(&format!("{dir}/{}.ko", module.name), 0o644, module.data);
    }
    archive.bytes(&format!("{dir}/load-order"), 0o644, order);
}

const SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Module names use `_` and `-` interchangeably.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleTree {
    /// Indexes `root/lib/modules/<version>/kernel` (also under `usr/`).
    pub fn open(root: &Path) -> Result<(Self, String)> {
        let base = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|p| root.join(p))
            .find(|p| p.is_dir())
            .ok_or_else(|| fail!("no lib/modules in {}", root.display()))?;
        let version = std::fs::read_dir(&base)
            .ctx(|| format!("cannot list {}", base.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .ok_or_else(|| fail!("{} is empty", base.display()))?;
        let mut modules = BTreeMap::new();
        walk(&base.join(&version), &mut modules)?;
        Ok((Self { modules }, version))
    }

    /// Returns `wanted` and everything they depend on, dependencies first.
    /// Names not in this kernel are skipped and reported in the second list.
    pub fn load_order(&self, wanted: &[&str]) -> Result<(Vec<Module>, Vec<String>)> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut missing = Vec::new();
        for name in wanted {
            let name = normalize(name);
            if !self.modules.contains_key(&name) {
                missing.push(name);
                continue;
            }
            self.visit(&name, &mut done, &mut BTreeSet::new(), &mut order)?;
        }
        Ok((order, missing))
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(fail!("module dependency cycle through {name}"));
        }
        let path = self
            .modules
            .get(name)
            .ok_or_else(|| fail!("module {name} is needed but not in the kernel package"))?;
        let data = decompress(path)?;
        for dep in depends(&data).ctx(|| format!("cannot read {}", path.display()))? {
            self.visit(&normalize(&dep), done, visiting, order)?;
        }
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            data,
        });
        Ok(())
    }
}

fn walk(dir: &Path, modules: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).ctx(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .ctx(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.is_dir() {
            walk(&path, modules)?;
            continue;
        }
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
        if let Some(file) = file {
            if let Some(stem) = SUFFIXES.iter().find_map(|s| file.strip_suffix(s)) {
                modules.insert(normalize(stem), path);
            }
        }
    }
    Ok(())
}

/// Reads a module file, decompressing it with the matching host tool.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => util::read(path),
        Some((program, package)) => {
            util::ensure_tool(program, package)?;
            let out = Command::new(program)
                .args(["-d", "-c"])
                .arg(path)
                .output()
                .ctx(|| format!("cannot run {program}"))?;
            if !out.status.success() {
                return Err(fail!("{program} could not decompress {}", path.display()));
            }
            Ok(out.stdout)
        }
    }
}

/// The module names listed in the `depends=` entry of `.modinfo`.
pub fn depends(module: &[u8]) -> Result<Vec<String>> {
    let info = crate::elf::section(module, ".modinfo")
        .ok_or_else(|| fail!("not an ELF64 module with a .modinfo section"))?;
    let deps = info
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(deps)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal ELF64 file with a section-name table and `.modinfo`.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        let names_off = d.len();
        d.extend_from_slice(names);
        let info_off = d.len();
        d.extend_from_slice(modinfo);
        let shoff = d.len();
        let mut header = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            d.extend_from_slice(&h);
        };
        header(0, 0, 0);
        header(1, names_off, names.len());
        header(11, info_off, modinfo.len());
        d[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        d
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let m = fake_module(b"license=GPL\0depends=virtio,virtio_ring\0name=x\0");
        assert_eq!(depends(&m).expect("parse"), vec!["virtio", "virtio_ring"]);
        let none = fake_module(b"depends=\0name=y\0");
        assert!(depends(&none).expect("parse").is_empty());
    }

    #[test]
    fn rejects_non_elf() {
        assert!(depends(b"not an elf file at all").is_err());
    }

    #[test]
    fn orders_dependencies_first() {
        let dir = std::env::temp_dir().join(format!("xtask-kmod-{}", std::process::id()));
        let kdir = dir.join("lib/modules/9.9.9/kernel");
        std::fs::create_dir_all(&kdir).expect("mkdir");
        let write = |name: &str, deps: &str| {
            let info = format!("depends={deps}\0");
            std::fs::write(kdir.join(name), fake_module(info.as_bytes())).expect("write");
        };
        write("a.ko", "b-x,c");
        write("b-x.ko", "c");
        write("c.ko", "");
        let (tree, version) = ModuleTree::open(&dir).expect("open");
        assert_eq!(version, "9.9.9");
        let (order, missing) = tree.load_order(&["a", "zzz"]).expect("order");
        let names: Vec<_> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["c", "b_x", "a"]);
        assert_eq!(missing, ["zzz"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
