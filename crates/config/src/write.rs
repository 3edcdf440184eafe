//! Writes a [`VmConfig`] back as guest-file TOML, and a [`System`] back as
//! a system file, so that a description can be stored and read again with
//! [`crate::parse_guest`] or [`crate::parse_system`] to the same value
//! (guests given by file come back inline).

use std::fmt::Write as _;
use std::path::Path;

use toml::Value;
use vmm::config::{format_cpu_list, VmConfig};
use vmm::rate::RateSpec;

use crate::guest::AFFINITY_ANY;
use crate::switches::VlanMembership;
use crate::system::System;

/// A TOML string literal, escaped as TOML requires.
fn quoted(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// A path as a TOML string. Paths come from UTF-8 flags and files; any
/// other byte would be replaced.
fn path(p: &Path) -> String {
    quoted(&p.to_string_lossy())
}

/// A size with the largest binary suffix that keeps it exact.
fn size(bytes: u64) -> String {
    for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return quoted(&format!("{}{suffix}", bytes >> shift));
        }
    }
    bytes.to_string()
}

fn affinity(config: &VmConfig) -> Option<String> {
    let lists = &config.affinity;
    let first = lists.first()?;
    let uniform = lists.len() == usize::from(config.cpus)
        && !first.is_empty()
        && lists.iter().all(|l| l == first);
    if uniform {
        return Some(quoted(&format_cpu_list(first)));
    }
    let entries: Vec<String> = lists
        .iter()
        .map(|l| {
            if l.is_empty() {
                quoted(AFFINITY_ANY)
            } else {
                quoted(&format_cpu_list(l))
            }
        })
        .collect();
    Some(format!("[{}]", entries.join(", ")))
}

/// The guest file that describes `config`. Every key is written, defaults
/// included, so the text stands on its own.
pub fn to_guest_toml(config: &VmConfig) -> String {
    let mut out = String::new();
    write_guest(&mut out, config, "");
    out
}

/// A system file with every guest inline, in order, with its `start`, and
/// its pools.
pub fn to_system_toml(system: &System) -> String {
    let mut out = String::new();
    for pool in &system.pools {
        let _ = writeln!(out, "[pools.{}]", pool.name);
        let _ = writeln!(out, "cpus = {}", quoted(&format_cpu_list(&pool.cpus)));
        let _ = writeln!(out, "policy = {}", quoted(pool.policy.name()));
        if let Some(frame) = pool.frame_ns {
            let _ = writeln!(
                out,
                "frame = {}",
                quoted(&vmm::sched::format_duration(frame))
            );
        }
        out.push('\n');
    }
    for (i, guest) in system.guests.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let prefix = format!("guests.{}.", guest.name);
        let _ = writeln!(out, "[guests.{}]", guest.name);
        let _ = writeln!(out, "start = {}", quoted(guest.start.as_str()));
        write_guest(&mut out, &guest.config, &prefix);
    }
    for region in &system.regions {
        let members: Vec<String> = region
            .members
            .iter()
            .map(|(g, ro)| format!("{g} = {}", quoted(if *ro { "ro" } else { "rw" })))
            .collect();
        let _ = writeln!(out, "\n[regions.{}]", region.name);
        let _ = writeln!(out, "size = {}", quoted(&format!("{}K", region.size >> 10)));
        let _ = writeln!(out, "vectors = {}", region.vectors);
        let _ = writeln!(out, "guests = {{ {} }}", members.join(", "));
    }
    for rule in &system.vsock_allow {
        let _ = writeln!(out, "\n[[vsock_allow]]");
        let _ = writeln!(out, "from = {}", quoted(&rule.from));
        let _ = writeln!(out, "to = {}", quoted(&rule.to));
        let _ = writeln!(out, "port = {}", rule.port);
    }
    for switch in &system.switches {
        let _ = writeln!(out, "\n[switches.{}]", switch.name);
        let _ = writeln!(out, "mode = {}", quoted(switch.mode.as_str()));
        if let Some((tap, vlans)) = &switch.uplink {
            let _ = writeln!(out, "uplink = {}", quoted(tap));
            match vlans {
                VlanMembership::Access(id) => {
                    let _ = writeln!(out, "uplink_vlan = {id}");
                }
                VlanMembership::Trunk(ids) => {
                    let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
                    let _ = writeln!(out, "uplink_vlans = [{}]", ids.join(", "));
                }
            }
        }
    }
    out
}

/// Writes `key = { ... }` for a rate spec that sets anything.
fn write_rate(out: &mut String, key: &str, spec: &RateSpec) {
    let entries = spec.entries();
    if entries.is_empty() {
        return;
    }
    let items: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => format!("{k} = {}", quoted(s)),
            None => format!("{k} = {v}"),
        })
        .collect();
    let _ = writeln!(out, "{key} = {{ {} }}", items.join(", "));
}

/// Writes the guest's keys; its sub-tables are named with `prefix`.
fn write_guest(out: &mut String, config: &VmConfig, prefix: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "kernel = {}", path(&config.kernel));
    if let Some(initramfs) = &config.initramfs {
        let _ = writeln!(out, "initramfs = {}", path(initramfs));
    }
    let _ = writeln!(out, "cmdline = {}", quoted(&config.cmdline));
    let _ = writeln!(out, "cpus = {}", config.cpus);
    let _ = writeln!(out, "memory = {}", size(config.memory));
    let _ = writeln!(
        out,
        "memory_backing = {}",
        quoted(config.memory_backing.name())
    );
    if let Some(pages) = config.hugepages {
        let _ = writeln!(out, "hugepages = {}", quoted(pages.name()));
    }
    let _ = writeln!(out, "console = {}", quoted(config.console.as_str()));
    let _ = writeln!(out, "rng = {}", config.rng);
    if let Some(list) = affinity(config) {
        let _ = writeln!(out, "affinity = {list}");
    }
    if let Some(uuid) = config.uuid {
        let _ = writeln!(out, "uuid = {}", quoted(&uuid.to_string()));
    }
    if config.seccomp != vmm::SeccompMode::default() {
        let _ = writeln!(out, "seccomp = {}", quoted(config.seccomp.name()));
    }
    if let Some(netns) = &config.netns {
        let _ = writeln!(out, "netns = {}", quoted(netns));
    }
    for disk in &config.disks {
        let _ = writeln!(out, "\n[[{prefix}disk]]\npath = {}", path(&disk.path));
        let _ = writeln!(out, "readonly = {}", disk.readonly);
        write_rate(out, "rate", &disk.rate);
    }
    for net in &config.nets {
        let _ = writeln!(out, "\n[[{prefix}net]]");
        match &net.attach {
            vmm::config::NetAttach::Tap(tap) => {
                let _ = writeln!(out, "tap = {}", quoted(tap));
            }
            vmm::config::NetAttach::Switch { name, vlans } => {
                let _ = writeln!(out, "switch = {}", quoted(name));
                let _ = match vlans {
                    vmm::config::VlanMembership::Access(id) => writeln!(out, "vlan = {id}"),
                    vmm::config::VlanMembership::Trunk(ids) => writeln!(out, "vlans = {ids:?}"),
                };
            }
            vmm::config::NetAttach::VhostUser(path) => {
                let _ = writeln!(out, "vhost_user = {}", self::path(path));
            }
        }
        if let Some(m) = net.mac {
            let mac = format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            );
            let _ = writeln!(out, "mac = {}", quoted(&mac));
        }
        write_rate(out, "rx_rate", &net.rx_rate);
        write_rate(out, "tx_rate", &net.tx_rate);
    }
    if let Some(vsock) = &config.vsock {
        let _ = writeln!(out, "\n[{prefix}vsock]\ncid = {}", vsock.cid);
        let _ = writeln!(out, "socket = {}", path(&vsock.socket));
    }
    // A region given as inherited descriptors lives only as long as its run.
    for region in config.regions.iter().filter(|r| r.fds.is_none()) {
        let _ = writeln!(out, "\n[[{prefix}region]]\npath = {}", path(&region.path));
        let _ = writeln!(out, "id = {}", region.id);
        let _ = writeln!(out, "readonly = {}", region.readonly);
    }
    if !config.cpu_features.is_empty() {
        let edits: Vec<String> = config
            .cpu_features
            .iter()
            .map(|e| quoted(&e.to_string()))
            .collect();
        let _ = writeln!(out, "\n[{prefix}cpu]\nfeatures = [{}]", edits.join(", "));
    }
    crate::sched::write_sched(out, &config.sched, prefix);
}
