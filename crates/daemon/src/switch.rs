//! The daemon's switches (`[switches.NAME]` in a system file, defined
//! through `PUT /switches/NAME`). Each is a `ferrovisor switch-serve`
//! process in its own session, with its sockets in
//! `STATE_DIR/switches/NAME`; it outlives the daemon, as guests do, and a
//! daemon takes over each one that still answers there (with the
//! definition kept beside it), at start and on `PUT`, instead of starting
//! another.
//!
//! A guest whose `[[net]]` names a switch gets a port when it starts: the
//! daemon asks the switch for port `GUEST-N` with the NIC's MAC and VLANs,
//! connects to the port's vhost-user socket and hands the connected socket
//! to the VMM, which never sees the switch's directory. The port goes when
//! the guest's VMM ends.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;
use vmm::config::{NetAttach, VlanMembership, VmConfig};

/// How long a switch has to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new switch process has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the daemon's switches.
#[derive(Debug, Error)]
pub enum SwitchError {
    /// The body is not a switch (the message names the field).
    #[error("{0}")]
    Body(String),
    #[error(
        "no switch '{0}': define it first (PUT /switches/{0}, or [switches] in a system file)"
    )]
    Unknown(String),
    #[error("switch '{0}' exists with another mode or uplink")]
    Conflict(String),
    #[error("uplink: '{0}' is not a tap this daemon may attach to switches (allowed: {1})")]
    TapNotAllowed(String, String),
    #[error("cannot start switch '{0}': {1}")]
    Start(String, String),
    #[error("switch '{0}' does not answer: {1}")]
    Control(String, std::io::Error),
    #[error("switch '{0}' refused: {1}")]
    Refused(String, String),
}

impl SwitchError {
    fn status(&self) -> u16 {
        match self {
            SwitchError::Body(_) | SwitchError::TapNotAllowed(..) => 400,
            SwitchError::Unknown(_) => 404,
            SwitchError::Conflict(_) => 409,
            _ => 500,
        }
    }
}

/// What `PUT /switches/NAME` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchSpec {
    /// `hub` or `bridge`.
    pub mode: String,
    /// A host tap that joins as port `uplink`, with its VLANs.
    pub uplink: Option<(String, VlanMembership)>,
}

static SWITCHES: Mutex<BTreeMap<String, SwitchSpec>> = Mutex::new(BTreeMap::new());

fn switches() -> MutexGuard<'static, BTreeMap<String, SwitchSpec>> {
    SWITCHES.lock().unwrap_or_else(PoisonError::into_inner)
}

fn vlan_json(v: &VlanMembership) -> Value {
    match v {
        VlanMembership::Access(id) => json!({ "access": id }),
        VlanMembership::Trunk(ids) => json!({ "trunk": ids }),
    }
}

fn vlan_id(v: &Value) -> Option<u16> {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| (1..=4094).contains(n))
}

/// Reads a `PUT /switches/NAME` body: `{"mode": "bridge", "uplink": "tap0",
/// "uplink_vlan": 10}` or `"uplink_vlans": [10, 20]`.
pub fn parse_spec(body: &Value) -> Result<SwitchSpec, SwitchError> {
    let bad = |field: &str, what: &str| SwitchError::Body(format!("{field}: {what}"));
    let mode = match body["mode"].as_str() {
        Some(m @ ("hub" | "bridge")) => m.to_string(),
        _ => return Err(bad("mode", "is required: \"hub\" or \"bridge\"")),
    };
    let uplink = match &body["uplink"] {
        Value::Null => None,
        Value::String(tap) if vmm::config::check_tap_name(tap).is_ok() => {
            let vlans = match (&body["uplink_vlan"], &body["uplink_vlans"]) {
                (Value::Null, Value::Null) => VlanMembership::Access(1),
                (v, Value::Null) => VlanMembership::Access(
                    vlan_id(v).ok_or_else(|| bad("uplink_vlan", "not a VLAN id (1 to 4094)"))?,
                ),
                (Value::Null, Value::Array(list)) if !list.is_empty() => VlanMembership::Trunk(
                    list.iter()
                        .map(vlan_id)
                        .collect::<Option<Vec<u16>>>()
                        .ok_or_else(|| bad("uplink_vlans", "not a list of VLAN ids"))?,
                ),
                _ => {
                    return Err(bad(
                        "uplink_vlans",
                        "give uplink_vlan or a non-empty uplink_vlans",
                    ))
                }
            };
            Some((tap.clone(), vlans))
        }
        _ => return Err(bad("uplink", "not an interface name")),
    };
    Ok(SwitchSpec { mode, uplink })
}

/// `spec` as a `PUT /switches/NAME` body, which [`parse_spec`] reads back.
pub fn spec_body(spec: &SwitchSpec) -> Value {
    let mut body = json!({ "mode": spec.mode });
    if let Some((tap, vlans)) = &spec.uplink {
        body["uplink"] = json!(tap);
        match vlans {
            VlanMembership::Access(id) => body["uplink_vlan"] = json!(id),
            VlanMembership::Trunk(ids) => body["uplink_vlans"] = json!(ids),
        }
    }
    body
}

/// The file in a switch's directory that keeps its definition, for a
/// restarted daemon.
const SPEC_FILE: &str = "switch.json";

/// At daemon start: takes over every switch whose process still answers
/// in its directory under `dir`, with the definition kept beside it.
pub fn readopt_all(dir: &Path) {
    let mut all = switches();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let spec = std::fs::read(entry.path().join(SPEC_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|v| parse_spec(&v).ok());
        let answers = request(&name, &entry.path(), &json!({"op": "show"})).is_ok();
        if let (Some(spec), true) = (spec, answers) {
            all.insert(name, spec);
        }
    }
}

/// Sends one request line to the switch in `dir` and returns its reply
/// when it says `"ok": true`.
fn request(name: &str, dir: &Path, line: &Value) -> Result<Value, SwitchError> {
    let io = |e| SwitchError::Control(name.to_string(), e);
    let mut stream = UnixStream::connect(dir.join("control.sock")).map_err(io)?;
    stream
        .set_read_timeout(Some(CONTROL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CONTROL_TIMEOUT)))
        .map_err(io)?;
    writeln!(stream, "{line}").map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    let reply: Value = serde_json::from_str(&reply)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if reply["ok"] == json!(true) {
        Ok(reply)
    } else {
        let why = reply["error"].as_str().unwrap_or("no reason given");
        Err(SwitchError::Refused(name.to_string(), why.to_string()))
    }
}

/// Starts the switch process for `name` in `dir`, in its own session, and
/// waits until it answers.
fn spawn(exe: &Path, name: &str, dir: &Path, spec: &SwitchSpec) -> Result<(), SwitchError> {
    let fail = |why: String| SwitchError::Start(name.to_string(), why);
    crate::files::private_dir(dir).map_err(|e| fail(e.to_string()))?;
    let log = crate::files::create_private_log(&dir.join("switch.log"))
        .map_err(|e| fail(format!("its log: {e}")))?;
    let err = log.try_clone().map_err(|e| fail(e.to_string()))?;
    let mut command = Command::new(exe);
    command
        .arg("switch-serve")
        .args(["--name", name, "--mode", &spec.mode])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    if let Some((tap, vlans)) = &spec.uplink {
        let vlan = match vlans {
            VlanMembership::Access(id) => format!("access={id}"),
            VlanMembership::Trunk(ids) => format!(
                "trunk={}",
                ids.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
            ),
        };
        command.args(["--uplink", tap, "--uplink-vlan", &vlan]);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory; the switch
    // gets its own session so that it outlives the daemon, as guests do.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| fail(e.to_string()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if request(name, dir, &json!({"op": "show"})).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("switch.log")).unwrap_or_default();
            let last = log.lines().last().unwrap_or("").to_string();
            return Err(fail(format!("it exited ({status}): {last}")));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail("it did not listen in time".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reaped when it ends, so that it never lingers as a zombie.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// Defines switch `name`: starts its process, or takes over the one that
/// answers in its directory (after a daemon restart). Returns whether the
/// daemon started a new process.
pub fn define(
    daemon: &crate::daemon::Daemon,
    name: &str,
    spec: SwitchSpec,
) -> Result<bool, SwitchError> {
    crate::daemon::check_name(name).map_err(|e| SwitchError::Body(format!("name: {e}")))?;
    if let Some((tap, _)) = &spec.uplink {
        if !daemon.policy().taps.allows(tap) {
            let allowed = daemon.policy().taps.describe();
            return Err(SwitchError::TapNotAllowed(tap.clone(), allowed));
        }
    }
    let mut all = switches();
    if let Some(known) = all.get(name) {
        return if *known == spec {
            Ok(false)
        } else {
            Err(SwitchError::Conflict(name.to_string()))
        };
    }
    let dir = daemon.switch_dir(name);
    let started = match request(name, &dir, &json!({"op": "show"})) {
        Ok(shown) if shown["mode"].as_str() == Some(spec.mode.as_str()) => false,
        Ok(_) => return Err(SwitchError::Conflict(name.to_string())),
        Err(_) => {
            spawn(daemon.exe(), name, &dir, &spec)?;
            true
        }
    };
    let kept = dir.join(SPEC_FILE);
    crate::files::write_durable(&kept, spec_body(&spec).to_string().as_bytes())
        .map_err(|e| SwitchError::Start(name.to_string(), format!("{}: {e}", kept.display())))?;
    all.insert(name.to_string(), spec);
    Ok(started)
}

/// `PUT /switches/NAME`.
pub fn put(daemon: &crate::daemon::Daemon, name: &str, body: &[u8]) -> crate::api::Reply {
    use crate::api::Reply;
    let spec = match serde_json::from_slice::<Value>(body) {
        Ok(v) => parse_spec(&v),
        Err(e) => Err(SwitchError::Body(format!("bad request body: {e}"))),
    };
    match spec.and_then(|s| define(daemon, name, s.clone()).map(|new| (new, s))) {
        Ok((new, spec)) => Reply {
            status: if new { 201 } else { 200 },
            body: json!({
                "name": name,
                "mode": spec.mode,
                "uplink": spec.uplink.as_ref().map(|(tap, _)| tap),
                "uplink_vlans": spec.uplink.as_ref().map(|(_, v)| vlan_json(v)),
            }),
        },
        Err(e) => Reply::error(e.status(), e.to_string()),
    }
}

/// What switch `name` shows of itself: its mode and its ports with their
/// counters.
fn shown(daemon: &crate::daemon::Daemon, name: &str) -> Result<Value, SwitchError> {
    let mut shown = request(name, &daemon.switch_dir(name), &json!({"op": "show"}))?;
    if let Some(o) = shown.as_object_mut() {
        o.remove("ok");
    }
    Ok(shown)
}

/// `GET /switches/NAME`: the switch's ports and their counters.
pub fn show(daemon: &crate::daemon::Daemon, name: &str) -> crate::api::Reply {
    use crate::api::Reply;
    if !switches().contains_key(name) {
        return Reply::error(404, SwitchError::Unknown(name.to_string()).to_string());
    }
    match shown(daemon, name) {
        Ok(shown) => Reply::ok(shown),
        Err(e) => Reply::error(e.status(), e.to_string()),
    }
}

/// `DELETE /switches/NAME`: stops the switch process (its ports and their
/// guests' links go with it) and forgets the switch.
pub fn delete(daemon: &crate::daemon::Daemon, name: &str) -> crate::api::Reply {
    use crate::api::Reply;
    if switches().remove(name).is_none() {
        return Reply::error(404, SwitchError::Unknown(name.to_string()).to_string());
    }
    // The switch exits as it answers; an error here means it is gone.
    let _ = request(name, &daemon.switch_dir(name), &json!({"op": "shutdown"}));
    Reply::ok(json!({ "name": name, "deleted": true }))
}

/// `GET /switches`: every switch the daemon runs, with its ports.
pub fn list(daemon: &crate::daemon::Daemon) -> crate::api::Reply {
    let names: Vec<String> = switches().keys().cloned().collect();
    let all: Vec<Value> = names
        .iter()
        .map(|n| shown(daemon, n).unwrap_or_else(|e| json!({ "name": n, "error": e.to_string() })))
        .collect();
    crate::api::Reply::ok(json!({ "switches": all }))
}

/// The port name of a guest's NIC `index`.
pub fn port_name(guest: &str, index: usize) -> String {
    format!("{guest}-{index}")
}

/// The MAC of a switched NIC given none: stable for the guest and NIC, so
/// that the port's (anti-spoofing) MAC is the same on every start.
pub fn default_mac(guest: &str, index: usize) -> [u8; 6] {
    let seed = guest
        .bytes()
        .fold(index as u64, |h, b| h.rotate_left(8) ^ u64::from(b));
    virtio::net::local_mac(seed)
}

fn mac_text(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A switch port opened for a start: NIC `index`, its MAC, and the
/// socket connected to the port.
#[derive(Debug)]
pub struct OpenPort {
    pub index: usize,
    pub mac: [u8; 6],
    pub stream: UnixStream,
}

/// Adds a port for each NIC of `config` that names a switch and connects
/// to it. On an error, the ports added so far are removed.
pub fn open_ports(
    daemon: &crate::daemon::Daemon,
    guest: &str,
    config: &VmConfig,
) -> Result<Vec<OpenPort>, SwitchError> {
    let mut opened = Vec::new();
    for (index, net) in config.nets.iter().enumerate() {
        let NetAttach::Switch { name, vlans } = &net.attach else {
            continue;
        };
        let result = open_port(daemon, guest, index, net.mac, name, vlans);
        match result {
            Ok(port) => opened.push(port),
            Err(e) => {
                closer(daemon, guest, config)();
                return Err(e);
            }
        }
    }
    Ok(opened)
}

fn open_port(
    daemon: &crate::daemon::Daemon,
    guest: &str,
    index: usize,
    mac: Option<[u8; 6]>,
    switch: &str,
    vlans: &VlanMembership,
) -> Result<OpenPort, SwitchError> {
    if !switches().contains_key(switch) {
        return Err(SwitchError::Unknown(switch.to_string()));
    }
    let mac = mac.unwrap_or_else(|| default_mac(guest, index));
    let dir = daemon.switch_dir(switch);
    let port = port_name(guest, index);
    let add =
        json!({"op": "add_port", "port": port, "mac": mac_text(mac), "vlan": vlan_json(vlans)});
    let reply = match request(switch, &dir, &add) {
        Ok(reply) => reply,
        // A port left with other settings by an earlier run of the guest.
        Err(SwitchError::Refused(..)) => {
            request(switch, &dir, &json!({"op": "remove_port", "port": port}))?;
            request(switch, &dir, &add)?
        }
        Err(e) => return Err(e),
    };
    let socket = reply["socket"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join(format!("{port}.sock")));
    let stream =
        UnixStream::connect(&socket).map_err(|e| SwitchError::Control(switch.to_string(), e))?;
    Ok(OpenPort { index, mac, stream })
}

/// The NICs of `config` on a switch: their index and the switch's name.
fn switched_nics(config: &VmConfig) -> impl Iterator<Item = (usize, &str)> {
    config
        .nets
        .iter()
        .enumerate()
        .filter_map(|(index, net)| match &net.attach {
            NetAttach::Switch { name, .. } => Some((index, name.as_str())),
            _ => None,
        })
}

/// What removes `guest`'s ports once its VMM has ended (or did not
/// start): the switches' directories and port names, taken now.
pub fn closer(
    daemon: &crate::daemon::Daemon,
    guest: &str,
    config: &VmConfig,
) -> Box<dyn FnOnce() + Send> {
    let ports: Vec<(String, PathBuf, String)> = switched_nics(config)
        .map(|(index, name)| {
            let port = port_name(guest, index);
            (name.to_string(), daemon.switch_dir(name), port)
        })
        .collect();
    Box::new(move || {
        for (name, dir, port) in ports {
            let _ = request(&name, &dir, &json!({"op": "remove_port", "port": port}));
        }
    })
}

/// The counters of `guest`'s switch ports, for `info`: one entry per
/// switched NIC, with the switch's name.
pub fn guest_ports(daemon: &crate::daemon::Daemon, guest: &str, config: &VmConfig) -> Vec<Value> {
    let mut out = Vec::new();
    for (index, name) in switched_nics(config) {
        let port = port_name(guest, index);
        let entry = shown(daemon, name).ok().and_then(|s| {
            s["ports"]
                .as_array()?
                .iter()
                .find(|p| p["port"].as_str() == Some(port.as_str()))
                .cloned()
        });
        let mut entry = entry.unwrap_or_else(|| json!({ "port": port }));
        entry["switch"] = json!(name);
        out.push(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_body_is_read_and_bad_ones_are_refused_with_the_field() {
        let spec =
            parse_spec(&json!({"mode": "bridge", "uplink": "fv-up", "uplink_vlans": [10, 20]}))
                .unwrap();
        assert_eq!(spec.mode, "bridge");
        assert_eq!(
            spec.uplink,
            Some(("fv-up".into(), VlanMembership::Trunk(vec![10, 20])))
        );
        let hub = parse_spec(&json!({"mode": "hub"})).unwrap();
        assert_eq!(hub.uplink, None);
        for (body, field) in [
            (json!({}), "mode"),
            (json!({"mode": "router"}), "mode"),
            (json!({"mode": "hub", "uplink": "a/b"}), "uplink"),
            (
                json!({"mode": "hub", "uplink": "t", "uplink_vlan": 5000}),
                "uplink_vlan",
            ),
            (
                json!({"mode": "hub", "uplink": "t", "uplink_vlans": []}),
                "uplink_vlans",
            ),
        ] {
            let e = parse_spec(&body).unwrap_err().to_string();
            assert!(e.starts_with(field), "{body}: {e}");
        }
    }

    #[test]
    fn a_definition_kept_on_disk_reads_back_the_same() {
        for body in [
            json!({"mode": "hub"}),
            json!({"mode": "bridge", "uplink": "fv-up", "uplink_vlan": 10}),
            json!({"mode": "bridge", "uplink": "fv-up", "uplink_vlans": [10, 20]}),
        ] {
            let spec = parse_spec(&body).unwrap();
            assert_eq!(parse_spec(&spec_body(&spec)).unwrap(), spec);
        }
    }

    #[test]
    fn a_default_port_mac_is_stable_unicast_and_differs_per_nic_and_guest() {
        let a0 = default_mac("a", 0);
        assert_eq!(a0, default_mac("a", 0));
        assert_ne!(a0, default_mac("a", 1));
        assert_ne!(a0, default_mac("b", 0));
        assert_eq!(a0[0] & 1, 0, "unicast");
    }
}
