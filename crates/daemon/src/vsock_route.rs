//! The vsock router: guests connect to each other's CIDs as the policy
//! allows (`PUT /vsock-policy`, the system file's `[[vsock_allow]]`).
//!
//! For each running guest with vsock, the daemon listens on the unix socket
//! `vsock-route.sock` in the guest's runtime directory, before its VMM
//! starts. The VMM's device sends `CONNECT <cid> <port>\n` there when its
//! guest connects to another guest's CID. Which guest asks is known from
//! the socket it asked on, never from what the VMM says. When the policy
//! allows (source, target, port), the router connects to the target's
//! vsock socket the host-program way (`CONNECT <port>\n`, `OK <n>\n`) and
//! passes that stream to the source VMM with `OK\n`, so the two VMMs then
//! talk directly and no data passes through the daemon. Otherwise it logs
//! the refusal and closes the request: the source guest's connect fails.
//! Everything not allowed is refused.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long a VMM may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the target guest may take to accept (its device gives up
/// sooner, after 2 s).
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest request or answer line.
const MAX_LINE: usize = 40;
/// Requests of one guest served at once (each holds a daemon thread for
/// a few seconds at most); more are closed at once, so a VMM that floods
/// its router cannot pile up the daemon's threads.
pub const MAX_PENDING: usize = 16;

/// Why a connection was refused (logged, one line).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("a bad request line")]
    BadRequest,
    #[error("no running guest has CID {0}")]
    NoGuest(u32),
    #[error("the policy does not allow it")]
    NotAllowed,
    #[error("guest '{0}' does not accept on that port")]
    PeerRefused(String),
}

/// One `[[vsock_allow]]` rule: `from` may connect to port `port` of `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub from: String,
    pub to: String,
    pub port: u32,
}

/// A running guest the router knows: its CID and vsock socket.
struct Member {
    cid: u32,
    socket: PathBuf,
    listener: Arc<UnixListener>,
}

static POLICY: Mutex<Vec<Allow>> = Mutex::new(Vec::new());
static MEMBERS: Mutex<BTreeMap<String, Member>> = Mutex::new(BTreeMap::new());

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a `PUT /vsock-policy` body: `{"allow": [{"from": "a", "to": "b",
/// "port": 5000}, ...]}`; the message names the bad field.
pub fn parse_policy(body: &Value) -> Result<Vec<Allow>, String> {
    let list = body["allow"]
        .as_array()
        .ok_or_else(|| "allow: not a list of rules".to_string())?;
    let mut rules = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let name = |key: &str| {
            let n = r[key].as_str().unwrap_or_default();
            match crate::description::check_name(n) {
                Ok(()) => Ok(n.to_string()),
                Err(_) => Err(format!("allow[{i}].{key}: not a guest name")),
            }
        };
        let (from, to) = (name("from")?, name("to")?);
        if from == to {
            return Err(format!("allow[{i}].to: the same guest as 'from'"));
        }
        let port = r["port"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| (1..u32::MAX).contains(p))
            .ok_or_else(|| format!("allow[{i}].port: not a port from 1 to 4294967294"))?;
        rules.push(Allow { from, to, port });
    }
    Ok(rules)
}

/// `PUT /vsock-policy`: replaces the policy.
pub fn put(body: &[u8]) -> crate::api::Reply {
    use crate::api::Reply;
    let rules = serde_json::from_slice::<Value>(body)
        .map_err(|e| format!("bad request body: {e}"))
        .and_then(|v| parse_policy(&v));
    match rules {
        Ok(rules) => {
            let n = rules.len();
            *lock(&POLICY) = rules;
            Reply {
                status: 200,
                body: serde_json::json!({ "rules": n }),
            }
        }
        Err(e) => Reply::error(400, e),
    }
}

fn allowed(from: &str, to: &str, port: u32) -> bool {
    lock(&POLICY)
        .iter()
        .any(|a| a.from == from && a.to == to && a.port == port)
}

/// Starts routing for guest `name`, whose vsock device has CID `cid` and
/// socket `socket`: listens on `vsock-route.sock` in `runtime`.
pub fn start(name: &str, runtime: &Path, cid: u32, socket: &Path) -> io::Result<()> {
    stop(name);
    let path = runtime.join(vmm::runtime::VSOCK_ROUTE);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // The directory is the guest's alone; its VMM may run as another user.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let listener = Arc::new(listener);
    let member = Member {
        cid,
        socket: socket.to_path_buf(),
        listener: listener.clone(),
    };
    lock(&MEMBERS).insert(name.to_string(), member);
    let name = name.to_string();
    std::thread::Builder::new()
        .name("vsock-route".into())
        .spawn(move || accept_loop(&name, &listener))?;
    Ok(())
}

/// Stops routing for guest `name` (its VMM ended): it is no target any
/// more, and its router socket closes.
pub fn stop(name: &str) {
    if let Some(m) = lock(&MEMBERS).remove(name) {
        // SAFETY: shutdown on a socket we own wakes the accepting thread;
        // no memory is involved.
        unsafe {
            libc::shutdown(m.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

fn accept_loop(name: &str, listener: &UnixListener) {
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
                    pending.fetch_sub(1, Ordering::AcqRel);
                    eprintln!("ferrovisor daemon: vsock: guest '{name}' has too many route requests at once; one refused");
                    continue;
                }
                let name = name.to_string();
                let slot = pending.clone();
                let spawned = std::thread::Builder::new()
                    .name("vsock-route".into())
                    .spawn(move || {
                        serve(&name, stream);
                        slot.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Serves one request from guest `from`'s VMM.
fn serve(from: &str, mut stream: UnixStream) {
    let answer = stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .ok()
        .and_then(|()| read_line(&mut stream))
        .and_then(|l| parse_request(&l))
        .ok_or(RouteError::BadRequest);
    let peer = answer.and_then(|(cid, port)| {
        connect(from, cid, port).inspect_err(|e| {
            eprintln!(
                "ferrovisor daemon: vsock: guest '{from}' to CID {cid} port {port} refused: {e}"
            )
        })
    });
    match peer {
        Ok(peer) => {
            let _ = stream.send_with_fd(&b"OK\n"[..], peer.as_raw_fd());
        }
        Err(RouteError::BadRequest) => {
            eprintln!("ferrovisor daemon: vsock: guest '{from}' sent a bad route request");
        }
        // Logged above; closing the request refuses it.
        Err(_) => {}
    }
}

/// Checks the policy and connects to port `port` of the guest with CID
/// `cid` through its vsock socket.
fn connect(from: &str, cid: u32, port: u32) -> Result<UnixStream, RouteError> {
    let (to, socket) = lock(&MEMBERS)
        .iter()
        .find(|(_, m)| m.cid == cid)
        .map(|(n, m)| (n.clone(), m.socket.clone()))
        .ok_or(RouteError::NoGuest(cid))?;
    if !allowed(from, &to, port) {
        return Err(RouteError::NotAllowed);
    }
    let refused = || RouteError::PeerRefused(to.clone());
    let mut peer = UnixStream::connect(&socket).map_err(|_| refused())?;
    peer.set_read_timeout(Some(PEER_TIMEOUT))
        .and_then(|()| peer.write_all(format!("CONNECT {port}\n").as_bytes()))
        .map_err(|_| refused())?;
    let line = read_line(&mut peer).ok_or_else(refused)?;
    if !line.starts_with("OK ") {
        return Err(refused());
    }
    peer.set_read_timeout(None).map_err(|_| refused())?;
    Ok(peer)
}

/// Reads one line byte by byte (nothing after it is taken), without the
/// newline; `None` on end of file, error, timeout or an overlong line.
fn read_line(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) if line.len() < MAX_LINE => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
}

/// Parses `CONNECT <cid> <port>`.
fn parse_request(line: &str) -> Option<(u32, u32)> {
    let mut words = line.strip_prefix("CONNECT ")?.split(' ');
    let number = |w: Option<&str>| {
        w.filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))?
            .parse()
            .ok()
    };
    let (cid, port) = (number(words.next())?, number(words.next())?);
    words.next().is_none().then_some((cid, port))
}

#[cfg(test)]
mod tests;
