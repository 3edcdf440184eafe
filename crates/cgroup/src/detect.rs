//! Where each controller lives on this host: read from `/proc/self/mountinfo`,
//! `/proc/self/cgroup` and the unified hierarchy's `cgroup.controllers`.
//!
//! A controller is used on cgroup v2 when the unified hierarchy offers it,
//! else on its v1 mount; a controller that is neither is absent. Hosts mix
//! the two: these machines mount v1 `cpu`, `cpuset`, `memory` and `pids`
//! beside a unified tree that offers only `hugetlb`.

use std::path::{Path, PathBuf};

use crate::{Controller, Version};

/// One controller's home: its version and the directory of the calling
/// process's own cgroup in that hierarchy (the parent of every guest group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub controller: Controller,
    pub version: Version,
    pub base: PathBuf,
}

#[derive(Debug)]
struct Mount {
    point: PathBuf,
    root: String,
    v2: bool,
    /// v1 only: the controllers bound to this mount (`cpu`, `cpuacct`, ...).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let tail: Vec<&str> = right.split_whitespace().collect();
        if fields.len() < 5 || tail.len() < 3 {
            continue;
        }
        let v2 = match tail[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            tail[2].split(',').map(str::to_string).collect()
        };
        mounts.push(Mount {
            point: PathBuf::from(unescape(fields[4])),
            root: unescape(fields[3]),
            v2,
            controllers,
        });
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(value) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/self/cgroup`: `hierarchy-id:controllers:path`, id 0 for v2.
fn own_path(proc_cgroup: &str, v2: bool, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let names = parts.next()?;
        let path = parts.next()?;
        let matches = if v2 {
            id == "0" && names.is_empty()
        } else {
            names.split(',').any(|name| name == controller)
        };
        matches.then(|| path.to_string())
    })
}

/// The directory in `mount` of the cgroup at `path` (as `/proc/self/cgroup`
/// names it), allowing for a mount of a subtree (its mountinfo root).
fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let relative = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    mount.point.join(relative.trim_start_matches('/'))
}

/// Places every controller the host offers. `v2_controllers` reads a unified
/// cgroup directory's `cgroup.controllers` (a parameter so that tests need no
/// host).
pub(crate) fn places(
    mountinfo: &str,
    proc_cgroup: &str,
    v2_controllers: &dyn Fn(&Path) -> Option<String>,
) -> Vec<Place> {
    let mounts = parse_mountinfo(mountinfo);
    let unified = mounts.iter().find(|mount| mount.v2).and_then(|mount| {
        let base = dir_of(mount, &own_path(proc_cgroup, true, "")?);
        let offered = v2_controllers(&base)?;
        Some((base, offered))
    });
    let mut out = Vec::new();
    for controller in Controller::ALL {
        if let (Some((base, offered)), Some(name)) = (&unified, controller.v2_name()) {
            if offered.split_whitespace().any(|c| c == name) {
                out.push(Place {
                    controller,
                    version: Version::V2,
                    base: base.clone(),
                });
                continue;
            }
        }
        let name = controller.v1_name();
        let v1 = mounts
            .iter()
            .find(|mount| !mount.v2 && mount.controllers.iter().any(|c| c == name));
        if let Some(mount) = v1 {
            if let Some(path) = own_path(proc_cgroup, false, name) {
                out.push(Place {
                    controller,
                    version: Version::V1,
                    base: dir_of(mount, &path),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
8:pids:/
4:memory:/jobs/42
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn hybrid_host_uses_v1_for_controllers_the_unified_tree_lacks() {
        let places = places(HYBRID_MOUNTS, HYBRID_CGROUP, &|_| {
            Some("hugetlb".to_string())
        });
        let memory = places
            .iter()
            .find(|p| p.controller == Controller::Memory)
            .expect("memory placed");
        assert_eq!(memory.version, Version::V1);
        assert_eq!(memory.base, PathBuf::from("/sys/fs/cgroup/memory/jobs/42"));
        assert_eq!(places.len(), Controller::ALL.len());
        assert!(places.iter().all(|p| p.version == Version::V1));
    }

    #[test]
    fn pure_v2_host_places_every_offered_controller_in_one_directory() {
        let mounts = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let places = places(mounts, "0::/system.slice/x.service\n", &|dir| {
            assert_eq!(dir, Path::new("/sys/fs/cgroup/system.slice/x.service"));
            Some("cpuset cpu io memory pids".to_string())
        });
        let controllers: Vec<_> = places.iter().map(|p| p.controller).collect();
        assert_eq!(
            controllers,
            vec![
                Controller::Cpu,
                Controller::Cpuset,
                Controller::Memory,
                Controller::Pids
            ]
        );
        assert!(places.iter().all(|p| p.version == Version::V2));
    }

    #[test]
    fn a_mount_of_a_subtree_is_resolved_against_its_root() {
        let mounts = "30 23 0:26 /ns /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let places = places(mounts, "0::/ns/guest\n", &|_| Some("memory".into()));
        assert_eq!(places[0].base, PathBuf::from("/sys/fs/cgroup/guest"));
    }

    #[test]
    fn a_host_without_cgroups_has_no_places() {
        assert!(places("", "", &|_| None).is_empty());
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
