//! The daemon's listener: a unix socket, one thread per connection, one
//! request per connection. Streams (events, console attach) keep their
//! connection until either side ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::access::{self, AccessError, AuditLog, UidLimits};
use crate::api::{self, Reply, Route};
use crate::daemon::Daemon;
use crate::files;
use crate::http::{self, DeadlineStream, HttpError, MAX_BODY};
use crate::images::{ImagesError, Policy, RootSpec, Roots, Taps, DEFAULT_TAPS};

/// The API socket when `--socket` is not given.
pub const DEFAULT_SOCKET: &str = "/run/ferrovisor/api.sock";
/// The state directory when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferrovisor";
/// The image root in the state directory when no `--images` is given.
pub const DEFAULT_IMAGES: &str = "images";
/// Connections served at once; more get 503.
const MAX_CONNECTIONS: usize = 256;
/// Connections served at once for one peer uid; more get 503, so one user
/// cannot take every place.
pub const MAX_CONNECTIONS_PER_UID: usize = 64;
/// How long a client may take to send its whole request (head and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listener waits after a failed accept before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The upgrade token of a console attach.
pub const CONSOLE_PROTOCOL: &str = "ferrovisor-console";

/// Errors starting the daemon.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot open the state directory {0}")]
    StateDir(String, #[source] std::io::Error),
    #[error("another daemon is already listening on {0}")]
    InUse(String),
    #[error("{0} exists and is not a socket; not removing it")]
    NotASocket(String),
    #[error("cannot listen on {0}")]
    Bind(String, #[source] std::io::Error),
    #[error("cannot find the daemon's own executable")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Images(#[from] ImagesError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

/// Where the daemon listens and keeps its guests, and what guests and
/// clients may do.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Image roots; none means `STATE_DIR/images`.
    pub images: Vec<RootSpec>,
    /// Taps guests may use (`--taps`); `None` means [`DEFAULT_TAPS`].
    pub taps: Option<Taps>,
    /// A group whose members may use the API besides root (`--group`).
    pub group: Option<String>,
    /// Start every guest jailed (`--no-jail` turns it off).
    pub jail: bool,
    /// The uids (and gids) jailed guests get, one each.
    pub uid_range: (u32, u32),
}

/// Binds `socket`, replacing a stale socket nobody listens on; a live
/// socket, or anything that is not a socket, is left alone. The socket is
/// 0660 with group `group` when one is given, else 0600.
fn bind(socket: &Path, group: Option<u32>) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = socket.display().to_string();
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ServeError::Bind(shown.clone(), e))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(ServeError::NotASocket(shown)),
        Ok(_) => {
            if UnixStream::connect(socket).is_ok() {
                return Err(ServeError::InUse(shown));
            }
            std::fs::remove_file(socket).map_err(|e| ServeError::Bind(shown.clone(), e))?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(socket).map_err(|e| ServeError::Bind(shown.clone(), e))?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(socket, None, Some(gid))
                .map_err(|e| ServeError::Bind(shown.clone(), e))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ServeError::Bind(shown, e))?;
    Ok(listener)
}

/// What every connection thread shares.
struct Shared {
    daemon: Daemon,
    audit: AuditLog,
    policy: access::Policy,
    per_uid: Arc<UidLimits>,
    active: AtomicUsize,
}

/// The daemon's guest policy from its options.
fn guest_policy(options: &Options) -> Result<Policy, ServeError> {
    let default_root;
    let specs = if options.images.is_empty() {
        let dir = options.state_dir.join(DEFAULT_IMAGES);
        files::private_dir(&dir).map_err(|e| ServeError::StateDir(dir.display().to_string(), e))?;
        default_root = [RootSpec { dir, block: false }];
        &default_root[..]
    } else {
        &options.images[..]
    };
    let taps = match &options.taps {
        Some(t) => t.clone(),
        None => Taps::parse(DEFAULT_TAPS)?,
    };
    Ok(Policy {
        roots: Roots::open(specs)?,
        taps,
    })
}

/// Runs the daemon until it is killed.
pub fn serve(options: &Options) -> Result<(), ServeError> {
    // Everything the daemon and its VMMs create is private to root.
    // SAFETY: umask has no memory effects.
    unsafe { libc::umask(0o077) };
    // /proc/self/exe stays valid even if the binary is replaced on disk.
    let exe = PathBuf::from("/proc/self/exe");
    std::fs::metadata(&exe).map_err(ServeError::Exe)?;
    let mut options = options.clone();
    let shown = options.state_dir.display().to_string();
    options.state_dir = std::path::absolute(&options.state_dir)
        .map_err(|e| ServeError::StateDir(shown.clone(), e))?;
    let group = options.group.as_deref().map(access::group_id).transpose()?;
    files::private_dir(&options.state_dir).map_err(|e| ServeError::StateDir(shown.clone(), e))?;
    let guests = guest_policy(&options)?;
    let roots = guests.roots.describe();
    // Before any guest is placed: the daemon's own cgroups are the base.
    let jail = options
        .jail
        .then(|| crate::jail::JailPolicy::new(&options.state_dir, options.uid_range))
        .transpose()?;
    let daemon = Daemon::open_with(&options.state_dir, exe, guests, jail)
        .map_err(|e| ServeError::StateDir(shown, e))?;
    for (name, why) in &daemon.broken {
        eprintln!("ferrovisor daemon: skipping guest '{name}': {why}");
    }
    let audit = AuditLog::open(&options.state_dir)?;
    let listener = bind(&options.socket, group)?;
    eprintln!(
        "ferrovisor daemon: listening on {} with {} guest(s) from {}; image roots: {roots}",
        options.socket.display(),
        daemon.all().len(),
        options.state_dir.display()
    );
    // SAFETY: geteuid has no memory effects.
    let own_uid = unsafe { libc::geteuid() };
    let shared = Arc::new(Shared {
        daemon,
        audit,
        policy: access::Policy { own_uid, group },
        per_uid: UidLimits::new(MAX_CONNECTIONS_PER_UID),
        active: AtomicUsize::new(0),
    });
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => admit(&shared, stream),
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: retrying at once
                // would spin; wait for connections to finish.
                if !matches!(e.kind(), std::io::ErrorKind::Interrupted) {
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }
    Ok(())
}

/// Checks a new connection's peer and places, then serves it on a thread
/// of its own. A refused peer gets one 403 line, a peer over a limit 503.
fn admit(shared: &Arc<Shared>, mut stream: UnixStream) {
    // A refusal is a few bytes; a peer that does not read is not waited for.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let Ok(peer) = access::peer(&stream) else {
        return;
    };
    if !shared.policy.allows(&peer) {
        shared.audit.record(&peer, None, None, 403);
        let reply = Reply::error(403, format!("uid {} may not use this API", peer.uid));
        return send(&mut stream, &reply);
    }
    if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        return send(&mut stream, &Reply::error(503, "too many connections"));
    }
    let Some(slot) = shared.per_uid.take(peer.uid) else {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        let reply = Reply::error(503, format!("too many connections from uid {}", peer.uid));
        return send(&mut stream, &reply);
    };
    let _ = stream.set_write_timeout(None);
    let shared = shared.clone();
    std::thread::spawn(move || {
        let request = serve_connection(&shared.daemon, stream);
        if let Some((method, path, status)) = request {
            if access::is_mutating(&method) {
                shared
                    .audit
                    .record(&peer, Some(&method), Some(&path), status);
            }
        }
        drop(slot);
        shared.active.fetch_sub(1, Ordering::SeqCst);
    });
}

fn send(stream: &mut UnixStream, reply: &Reply) {
    let body = reply.body.to_string();
    let _ = http::write_response(stream, reply.status, "application/json", body.as_bytes());
}

/// Serves one connection: one request, one response or stream. Returns
/// the request's method and path and the status answered, once a request
/// was read.
pub fn serve_connection(daemon: &Daemon, mut stream: UnixStream) -> Option<(String, String, u16)> {
    let read_half = stream.try_clone().ok()?;
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    let mut reader = BufReader::new(DeadlineStream::new(read_half, deadline));
    let mut continue_half = stream.try_clone().ok()?;
    let mut on_continue = || continue_half.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    let request = match http::read_request_with(&mut reader, MAX_BODY, &mut on_continue) {
        Ok(r) => r,
        Err(HttpError::Closed) | Err(HttpError::Io(_)) => return None,
        Err(e @ HttpError::BodyTooLarge(_)) => {
            send(&mut stream, &Reply::error(413, e.to_string()));
            return None;
        }
        Err(e) => {
            let reply = Reply::error(400, format!("malformed request: {e}"));
            send(&mut stream, &reply);
            return None;
        }
    };
    let status = match api::route(daemon, &request) {
        Route::Reply(reply) => {
            send(&mut stream, &reply);
            reply.status
        }
        Route::Events => {
            stream_events(daemon, stream);
            200
        }
        Route::ConsoleLog(name, tail) => {
            console_log(daemon, &name, tail, &mut stream);
            200
        }
        Route::ConsoleAttach(name) => {
            let upgrade = request.header("upgrade").unwrap_or("");
            if !upgrade.eq_ignore_ascii_case(CONSOLE_PROTOCOL) {
                let reply = Reply::error(
                    400,
                    format!("console attach needs 'Connection: Upgrade' and 'Upgrade: {CONSOLE_PROTOCOL}'"),
                );
                send(&mut stream, &reply);
                400
            } else {
                console_attach(daemon, &name, reader, stream);
                101
            }
        }
    };
    Some((request.method, request.path, status))
}

/// Whether the peer has closed its end (a read would return 0 now).
fn peer_closed(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`, which outlives the
    // call; MSG_PEEK leaves the data in place and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn stream_events(daemon: &Daemon, mut stream: UnixStream) {
    let events = daemon.events.subscribe();
    // A client that stops reading is dropped rather than waited for.
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    if http::write_chunked_head(&mut stream, "application/x-ndjson").is_err() {
        return;
    }
    loop {
        match events.recv_timeout(Duration::from_secs(1)) {
            Ok(event) => {
                let mut line = serde_json::to_string(&event).unwrap_or_default();
                line.push('\n');
                if http::write_chunk(&mut stream, line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer_closed(&stream) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = http::write_last_chunk(&mut stream);
                return;
            }
        }
    }
}

fn console_log(daemon: &Daemon, name: &str, tail: Option<u64>, stream: &mut UnixStream) {
    let Ok(guest) = daemon.get(name) else {
        return send(
            stream,
            &Reply::error(404, format!("no guest named '{name}'")),
        );
    };
    let path = guest.runtime().join("console.log");
    let mut bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return send(
                stream,
                &Reply::error(500, format!("cannot read the console log: {e}")),
            );
        }
    };
    if let Some(tail) = tail {
        let keep = usize::try_from(tail).unwrap_or(usize::MAX).min(bytes.len());
        bytes.drain(..bytes.len() - keep);
    }
    let _ = http::write_response(stream, 200, "text/plain; charset=utf-8", &bytes);
}

fn console_attach(
    daemon: &Daemon,
    name: &str,
    mut reader: BufReader<DeadlineStream>,
    mut stream: UnixStream,
) {
    let Ok(guest) = daemon.get(name) else {
        return send(
            &mut stream,
            &Reply::error(404, format!("no guest named '{name}'")),
        );
    };
    let state = guest.record().state;
    if !state.is_live() {
        let reply = Reply::error(
            409,
            format!("guest '{name}' is {state}; cannot attach to its console"),
        );
        return send(&mut stream, &reply);
    }
    let console = match UnixStream::connect(guest.runtime().join("console.sock")) {
        Ok(c) => c,
        Err(e) => {
            let reply = Reply::error(409, format!("guest '{name}' has no console socket: {e}"));
            return send(&mut stream, &reply);
        }
    };
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {CONSOLE_PROTOCOL}\r\nConnection: Upgrade\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    if reader.get_mut().clear_deadline().is_err() {
        return;
    }
    bridge(&mut reader, stream, console);
}

/// Copies bytes both ways until either side closes.
fn bridge(client_in: &mut BufReader<DeadlineStream>, client_out: UnixStream, console: UnixStream) {
    let Ok(mut console_in) = console.try_clone() else {
        return;
    };
    let mut console_out = console;
    // Bytes the client sent right after its request head.
    let early = client_in.buffer().to_vec();
    client_in.consume(early.len());
    if console_out.write_all(&early).is_err() {
        return;
    }
    let Ok(mut client_raw) = client_in.get_ref().get_ref().try_clone() else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_raw, &mut console_out);
        let _ = console_out.shutdown(std::net::Shutdown::Both);
    });
    let mut client_out_w = client_out;
    let mut buf = [0u8; 4096];
    loop {
        match console_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if client_out_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = client_out_w.shutdown(std::net::Shutdown::Both);
    let _ = console_in.shutdown(std::net::Shutdown::Both);
    let _ = upstream.join();
}
