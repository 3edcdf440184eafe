//! The fabric's switch process (`ferrovisor switch-serve`): one
//! [`switch::Switch`] behind a control socket, one vhost-user-net backend
//! socket per guest port, and optionally a host tap as an uplink port.
//!
//! Threads: the main thread accepts control connections (one thread each);
//! each port has a thread that accepts its frontend and, per connection, the
//! vhost-user request thread and one worker that switches the port's
//! transmitted frames; the uplink has a reading thread; one thread waits for
//! SIGTERM.

pub mod chain;
pub mod control;
pub mod port;
pub mod uplink;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use switch::{MacAddr, Mode, MonotonicClock, PortConfig, PortId, Switch, SwitchConfig, VlanMode};

use control::Request;
use port::{PortState, VhostPort, VhostTx};
use uplink::Uplink;

/// The uplink's port name.
pub const UPLINK_PORT: &str = "uplink";
/// The control socket's name in the switch's directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Locks `m`, ignoring poisoning: every critical section here leaves its
/// data consistent, and a worker that panicked must not stop the others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `switch-serve` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub name: String,
    pub mode: Mode,
    pub dir: PathBuf,
    /// A host tap that joins the switch as port `uplink`.
    pub uplink: Option<String>,
    /// The uplink's VLANs (access on VLAN 1 unless given).
    pub uplink_vlan: VlanMode,
}

/// Errors that stop the switch process from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("a switch already listens on {0}")]
    Running(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("uplink: {0}")]
    Tap(#[from] virtio::net::TapError),
    #[error("uplink: {0}")]
    Uplink(#[from] switch::SwitchError),
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    #[error("cannot confine the switch process: {0}")]
    Confine(#[from] jail::JailError),
}

struct Entry {
    mac: MacAddr,
    vlan: VlanMode,
    id: PortId,
    port: VhostPort,
}

/// The switch, its ports and their sockets.
pub struct Server {
    name: String,
    mode: Mode,
    dir: PathBuf,
    switch: Arc<Mutex<Switch>>,
    ports: Mutex<BTreeMap<String, Entry>>,
    uplink: Option<PortId>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Hub => "hub",
        Mode::Bridge => "bridge",
    }
}

impl Server {
    /// Answers one request line.
    pub fn handle_line(&self, line: &str) -> (Value, bool) {
        match control::parse(line) {
            Err(e) => (control::error(e), false),
            Ok(Request::AddPort { port, mac, vlan }) => (self.add_port(&port, mac, vlan), false),
            Ok(Request::RemovePort { port }) => (self.remove_port(&port), false),
            Ok(Request::Show) => (self.show(), false),
            Ok(Request::Shutdown) => (json!({ "ok": true }), true),
        }
    }

    fn add_port(&self, name: &str, mac: MacAddr, vlan: VlanMode) -> Value {
        let mut ports = lock(&self.ports);
        if let Some(e) = ports.get(name) {
            if e.mac != mac || e.vlan != vlan {
                return control::error(format!(
                    "port `{name}` exists with MAC {} and VLANs {}",
                    e.mac,
                    control::vlan_json(&e.vlan)
                ));
            }
            return json!({ "ok": true, "socket": e.port.socket });
        }
        let state = Arc::new(PortState::default());
        let config = PortConfig {
            name: name.to_string(),
            vlan: vlan.clone(),
            mac: Some(mac),
        };
        let tx = Box::new(VhostTx::new(state.clone()));
        let id = match lock(&self.switch).add_port(config, tx) {
            Ok(id) => id,
            Err(e) => return control::error(e),
        };
        let socket = self.dir.join(format!("{name}.sock"));
        match VhostPort::start(name, &socket, state, self.switch.clone(), id) {
            Ok(port) => {
                ports.insert(
                    name.to_string(),
                    Entry {
                        mac,
                        vlan,
                        id,
                        port,
                    },
                );
                json!({ "ok": true, "socket": socket })
            }
            Err(e) => {
                lock(&self.switch).remove_port(id);
                control::error(e)
            }
        }
    }

    fn remove_port(&self, name: &str) -> Value {
        let mut ports = lock(&self.ports);
        let Some(entry) = ports.remove(name) else {
            return control::error(format!("no port `{name}`"));
        };
        lock(&self.switch).remove_port(entry.id);
        entry.port.stop();
        json!({ "ok": true })
    }

    fn show(&self) -> Value {
        let ports = lock(&self.ports);
        let mut sw = lock(&self.switch);
        let mut list = Vec::new();
        let by_id: BTreeMap<PortId, &Entry> = ports.values().map(|e| (e.id, e)).collect();
        for (id, config) in sw
            .ports()
            .into_iter()
            .map(|(i, c)| (i, c.clone()))
            .collect::<Vec<_>>()
        {
            let Some(c) = sw.counters(id) else { continue };
            let (connected, bad) = match by_id.get(&id) {
                Some(e) => (e.port.state.connected(), e.port.state.bad_chains()),
                None => (self.uplink == Some(id), 0),
            };
            list.push(json!({
                "port": config.name,
                "mac": config.mac.map(|m| m.to_string()),
                "vlan": control::vlan_json(&config.vlan),
                "connected": connected,
                "rx_frames": c.rx_frames + bad,
                "rx_bytes": c.rx_bytes,
                "tx_frames": c.tx_frames,
                "tx_bytes": c.tx_bytes,
                "drops": c.rx_dropped + bad,
                "spoofed": c.rx_spoofed,
                "malformed": c.rx_malformed + bad,
                "wrong_vlan": c.rx_vlan_dropped,
                "tx_refused": c.tx_dropped,
                "learned": c.learned_macs,
            }));
        }
        json!({ "ok": true, "name": self.name, "mode": mode_name(self.mode), "ports": list })
    }

    /// Removes every socket the switch made.
    fn clean_up(&self) {
        for entry in lock(&self.ports).values() {
            let _ = std::fs::remove_file(&entry.port.socket);
        }
        let _ = std::fs::remove_file(self.dir.join(CONTROL_SOCKET));
    }

    /// Serves one control connection until it closes or asks to shut down.
    fn serve_control(&self, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let (reply, shutdown) = self.handle_line(&line);
            let written = writeln!(out, "{reply}").and_then(|()| out.flush());
            if shutdown {
                self.clean_up();
                std::process::exit(0);
            }
            if written.is_err() {
                return;
            }
        }
    }
}

/// Creates `dir` (0700) and listens on its control socket, refusing if a
/// switch already answers there.
fn listen(dir: &Path) -> Result<UnixListener, ServeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServeError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    let path = dir.join(CONTROL_SOCKET);
    if UnixStream::connect(&path).is_ok() {
        return Err(ServeError::Running(path));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

/// Blocks SIGTERM in every thread and has one thread wait for it, remove
/// the sockets and exit 0.
fn handle_sigterm(server: Arc<Server>) -> Result<(), ServeError> {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initialises it; the calls only read and write that local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a live
            // local that sigwait writes.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            server.clean_up();
            std::process::exit(0);
        })
        .map_err(ServeError::Thread)?;
    Ok(())
}

/// Runs the switch process until `shutdown` or SIGTERM.
pub fn serve(opts: Options) -> Result<(), ServeError> {
    // SAFETY: umask only sets the process's file creation mask. Sockets and
    // the directory are then the owner's alone.
    unsafe { libc::umask(0o077) };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers; nothing this process
    // runs may gain privileges through exec.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    let listener = listen(&opts.dir)?;
    let mut sw = Switch::new(
        SwitchConfig::new(opts.mode),
        Box::new(MonotonicClock::new()),
    );
    let mut uplink_id = None;
    let mut tap = None;
    if let Some(name) = &opts.uplink {
        let up = Uplink::open(name)?;
        let config = PortConfig {
            name: UPLINK_PORT.into(),
            vlan: opts.uplink_vlan.clone(),
            mac: None,
        };
        uplink_id = Some(sw.add_port(config, Box::new(up.clone()))?);
        tap = Some(up);
    }
    // Everything privileged is open (the uplink tap, the control socket):
    // from here on the process keeps no capability and, with Landlock,
    // touches no file outside its directory.
    jail::confine_in_place(std::slice::from_ref(&opts.dir))?;
    let server = Arc::new(Server {
        name: opts.name,
        mode: opts.mode,
        dir: opts.dir,
        switch: Arc::new(Mutex::new(sw)),
        ports: Mutex::new(BTreeMap::new()),
        uplink: uplink_id,
    });
    handle_sigterm(server.clone())?;
    if let (Some(up), Some(id)) = (tap, uplink_id) {
        up.spawn_reader(server.switch.clone(), id)
            .map_err(ServeError::Thread)?;
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = server.clone();
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server.serve_control(stream));
        if let Err(e) = spawned {
            eprintln!("switch: cannot serve a control connection: {e}");
        }
    }
    Ok(())
}
