//! The runtime directory: how a supervisor (the daemon) drives a running
//! VMM. With `--runtime-dir DIR` the VMM
//!
//! - serves `DIR/control.sock`: one JSON request line per connection, one
//!   JSON reply line, then the connection closes (`info`, `pause`,
//!   `resume`, `shutdown`, `stop`, and `limit`, which changes a disk's or
//!   NIC's rate limits);
//! - appends the guest console to `DIR/console.log`, bounded: past
//!   [`LOG_LIMIT`] it is rewritten to keep its last [`LOG_KEEP`] bytes;
//! - sends the same output live to every client of `DIR/console.sock`, and
//!   feeds what clients send to the guest's console input (stdin is not
//!   read, stdout not written);
//! - writes `DIR/exit.json` (`{"status":N,"reason":"..."}`) atomically
//!   just before the process exits ([`write_exit_record`]);
//! - keeps its stderr, when that is a file (the daemon's `vmm.err`), bounded
//!   like the console log (`stderr_log`).
//!
//! Two threads serve it: `control` answers the control socket one
//! connection at a time, and `console` moves output from the guest to the
//! log and the clients, and input from the clients to the guest, with one
//! `poll` loop. A slow console client never stalls the guest: output for
//! it queues up to [`CLIENT_BACKLOG`] bytes, and past that the client is
//! disconnected.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::i8042::I8042;
use serde_json::{json, Map, Value};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::console::{self, InputSink};
use crate::control::Control;
use crate::exit::VmExit;
use crate::gate::GateStats;
use crate::memory::{self, Backing};
use crate::rate::{self, LimitRequest, Limits};
use crate::sched;
use crate::vcpu;

/// The control socket's name in the runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The console socket's name.
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The console log's name.
pub const CONSOLE_LOG: &str = "console.log";
/// The exit record's name.
pub const EXIT_RECORD: &str = "exit.json";
/// The daemon's vsock router: the VMM asks it for connections to other
/// guests (see virtio::vsock).
pub const VSOCK_ROUTE: &str = "vsock-route.sock";
/// The vCPU state at an exit fatal to the guest (see `dump`).
pub const VCPU_DUMP: &str = "vcpu-dump.txt";
/// The console log is rewritten once it passes this size...
pub const LOG_LIMIT: u64 = 2 << 20;
/// ...keeping this many of its last bytes.
pub const LOG_KEEP: u64 = 1 << 20;
/// Output queued for one console client before it is disconnected.
pub const CLIENT_BACKLOG: usize = 1 << 20;
/// The longest control request line.
pub const MAX_REQUEST: usize = 4096;
/// Output from the guest held for the console thread before it drops more.
const HUB_BACKLOG: usize = 4 << 20;
/// How long a control client may take to send its request or read the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the VMM waits at exit for the console to be written out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How to run a VM beyond what it is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Serve the runtime directory here instead of the terminal.
    pub runtime_dir: Option<PathBuf>,
    /// Lock the VMM down in this jail once its files are open, before the
    /// first guest instruction (see the `jail` crate).
    pub jail: Option<jail::Jail>,
}

/// Errors from setting up the runtime directory.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("--runtime-dir: {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("cannot open the console log {0}")]
    Log(PathBuf, #[source] io::Error),
    #[error("{0} is in use by another running VMM")]
    InUse(PathBuf),
    #[error("cannot remove the stale {0}")]
    Stale(PathBuf, #[source] io::Error),
    #[error("cannot create the console's wake-up eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
}

/// Whether another VMM is serving `dir` (its control socket answers).
pub fn dir_in_use(dir: &Path) -> bool {
    UnixStream::connect(dir.join(CONTROL_SOCKET)).is_ok()
}

/// Writes `DIR/exit.json` atomically: a temporary file, then a rename.
pub fn write_exit_record(dir: &Path, status: i32, reason: &str) -> io::Result<()> {
    let record = json!({ "status": status, "reason": reason }).to_string();
    let temp = dir.join(format!(".{EXIT_RECORD}.tmp"));
    let mut file = File::create(&temp)?;
    file.write_all(record.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(EXIT_RECORD))
}

/// Removes `path` if it exists.
fn remove_stale(path: &Path) -> Result<(), RuntimeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Stale(path.to_path_buf(), e)),
    }
}

/// Listens on `path`, replacing a socket left behind by a VMM that is gone
/// but never one that still answers.
fn listen(path: &Path) -> Result<UnixListener, RuntimeError> {
    if UnixStream::connect(path).is_ok() {
        return Err(RuntimeError::InUse(path.to_path_buf()));
    }
    remove_stale(path)?;
    UnixListener::bind(path).map_err(|e| RuntimeError::Listen(path.to_path_buf(), e))
}

// ---------------------------------------------------------------------------
// The console log.

/// `console.log`: appended to, and cut back to its tail when too long.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
    keep: u64,
}

impl ConsoleLog {
    /// Opens (or creates) the log at `path` for appending, with the
    /// contract's limits.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limits(path, LOG_LIMIT, LOG_KEEP)
    }

    /// Opens the log with other limits (for tests): past `limit` bytes it
    /// is rewritten to its last `keep` bytes.
    pub fn with_limits(path: &Path, limit: u64, keep: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let size = file.metadata()?.len();
        let mut log = Self {
            path: path.to_path_buf(),
            file,
            size,
            limit,
            keep,
        };
        if log.size > log.limit {
            log.rotate()?;
        }
        Ok(log)
    }

    /// Appends guest output.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        if self.size > self.limit && self.rotate().is_err() {
            // Someone removed or cut the log under us: start a fresh one
            // rather than fail on every write from now on.
            self.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?;
            self.size = 0;
        }
        Ok(())
    }

    /// Rewrites the log to its last `keep` bytes: a new file renamed over
    /// the old one, so a reader never sees a half-written log.
    fn rotate(&mut self) -> io::Result<()> {
        let mut tail = Vec::with_capacity(self.keep as usize);
        let mut reader = File::open(&self.path)?;
        reader.seek(SeekFrom::End(-(self.keep.min(self.size) as i64)))?;
        reader.take(self.keep).read_to_end(&mut tail)?;
        let temp = self.path.with_extension("log.tmp");
        OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?
            .write_all(&tail)?;
        std::fs::rename(&temp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.size = tail.len() as u64;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The console hub: output from vCPU threads to the console thread.

#[derive(Debug, Default)]
struct HubState {
    pending: Vec<u8>,
    closing: bool,
    done: bool,
}

/// Guest output on its way to the console thread.
#[derive(Debug)]
struct Hub {
    state: Mutex<HubState>,
    done_changed: Condvar,
    wake: EventFd,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues guest output (from a vCPU thread) and wakes the console thread.
    fn publish(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let room = HUB_BACKLOG.saturating_sub(state.pending.len());
        state
            .pending
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        drop(state);
        // A failed wake-up only delays the output to the next one.
        let _ = self.wake.write(1);
    }
}

/// One client of the console socket.
#[derive(Debug)]
struct Client {
    stream: UnixStream,
    backlog: Vec<u8>,
    /// False once the client closed its sending side.
    reading: bool,
    /// The client closed the connection (or it failed).
    hung_up: bool,
}

impl Client {
    /// Writes what it can of the backlog; false when the client is gone.
    fn flush(&mut self) -> bool {
        while !self.backlog.is_empty() {
            match self.stream.write(&self.backlog) {
                Ok(0) => return false,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// The console thread's state.
struct ConsoleServer {
    hub: Arc<Hub>,
    listener: UnixListener,
    log: ConsoleLog,
    clients: Vec<Client>,
    input: InputSink,
    /// Client input the guest has not taken yet.
    pending_input: Vec<u8>,
    /// When stderr (`vmm.err`) was last checked against its bound.
    stderr_checked: Instant,
}

/// How often the console thread bounds the VMM's stderr.
const STDERR_CHECK: Duration = Duration::from_secs(1);

impl ConsoleServer {
    /// Serves until the VMM finishes, then marks the hub done.
    fn run(mut self) {
        loop {
            self.wait();
            let (output, closing) = {
                let mut state = self.hub.lock();
                (std::mem::take(&mut state.pending), state.closing)
            };
            let _ = self.hub.wake.read();
            self.send_output(&output);
            if closing {
                break;
            }
            self.read_input();
            // A client that hung up is dropped once its last input is read;
            // left in the poll set it would wake the loop for ever.
            self.clients.retain(|c| !c.hung_up);
            self.accept();
            self.feed_input();
            if self.stderr_checked.elapsed() >= STDERR_CHECK {
                self.stderr_checked = Instant::now();
                // Best effort, as the console log: a failure leaves it long.
                let _ = crate::stderr_log::bound(
                    libc::STDERR_FILENO,
                    crate::stderr_log::LIMIT,
                    crate::stderr_log::KEEP,
                );
            }
        }
        let mut state = self.hub.lock();
        state.done = true;
        self.hub.done_changed.notify_all();
    }

    /// Waits until there is output, a new client, input, a client hanging
    /// up, or room for pending input.
    fn wait(&mut self) {
        let mut fds = vec![
            libc::pollfd {
                fd: self.hub.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for client in &self.clients {
            let mut events = 0;
            if client.reading && self.pending_input.is_empty() {
                events |= libc::POLLIN;
            }
            if !client.backlog.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: client.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // Input the guest's FIFO could not take yet is offered again soon;
        // else wake now and then to bound stderr.
        let timeout = if self.pending_input.is_empty() {
            STDERR_CHECK.as_millis() as i32
        } else {
            5
        };
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready <= 0 {
            return;
        }
        for (client, fd) in self.clients.iter_mut().zip(&fds[2..]) {
            if fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                client.hung_up = true;
            }
        }
    }

    fn send_output(&mut self, output: &[u8]) {
        if !output.is_empty() {
            // The log is best effort: a full disk must not stop the guest.
            let _ = self.log.append(output);
            for client in &mut self.clients {
                client.backlog.extend_from_slice(output);
            }
        }
        self.clients
            .retain_mut(|c| c.flush() && c.backlog.len() <= CLIENT_BACKLOG);
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.clients.push(Client {
                            stream,
                            backlog: Vec::new(),
                            reading: true,
                            hung_up: false,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn read_input(&mut self) {
        if !self.pending_input.is_empty() {
            return;
        }
        let mut buf = [0u8; 4096];
        for client in self.clients.iter_mut().filter(|c| c.reading) {
            match client.stream.read(&mut buf) {
                Ok(0) => client.reading = false,
                Ok(n) => self.pending_input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => client.reading = false,
            }
        }
    }

    fn feed_input(&mut self) {
        while !self.pending_input.is_empty() {
            let taken = (self.input)(&self.pending_input);
            if taken == 0 {
                return;
            }
            self.pending_input
                .drain(..taken.min(self.pending_input.len()));
        }
    }
}

// ---------------------------------------------------------------------------
// The control socket.

/// A control request.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Info,
    Pause,
    Resume,
    Shutdown,
    Stop,
    /// Change a disk's or NIC's rate limits (see `rate`).
    Limit(LimitRequest),
    /// A new thread policy for every vCPU (see `sched::change`).
    Sched(Map<String, Value>),
}

/// Parses one request line: a JSON object with an `op` and nothing else.
pub fn parse_request(line: &str) -> Result<Op, String> {
    let value: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("bad JSON: {}", e.to_string().replace('\n', " ")))?;
    let Value::Object(map) = value else {
        return Err("a request is a JSON object like {\"op\":\"info\"}".into());
    };
    if map.get("op").and_then(Value::as_str) == Some("limit") {
        return rate::parse_limit_request(&map).map(Op::Limit);
    }
    if map.get("op").and_then(Value::as_str) == Some("sched") {
        let mut fields = map;
        fields.remove("op");
        return Ok(Op::Sched(fields));
    }
    if let Some(key) = map.keys().find(|k| *k != "op") {
        return Err(format!("unknown field '{key}'"));
    }
    match map.get("op") {
        None => Err("'op' is missing".into()),
        Some(Value::String(op)) => match op.as_str() {
            "info" => Ok(Op::Info),
            "pause" => Ok(Op::Pause),
            "resume" => Ok(Op::Resume),
            "shutdown" => Ok(Op::Shutdown),
            "stop" => Ok(Op::Stop),
            other => Err(format!(
                "unknown op '{other}' (known: info, pause, resume, shutdown, stop, limit, sched)"
            )),
        },
        Some(_) => Err("'op' must be a string".into()),
    }
}

/// What the control socket can ask of a VM.
pub trait VmControl {
    /// The `info` fields beside `ok`.
    fn info(&self) -> Map<String, Value>;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Injects Ctrl-Alt-Del.
    fn shutdown(&self) -> Result<(), String>;
    fn stop(&self);
    /// Changes a device's rate limits; returns the new limits.
    fn limit(&self, _request: &LimitRequest) -> Result<Value, String> {
        Err("this VM has no rate limits".into())
    }
    /// Changes the vCPU threads' policy; a refused change leaves the old one.
    fn sched(&self, _change: &Map<String, Value>) -> Result<(), String> {
        Err("scheduling changes are not supported here".into())
    }
}

fn reply(result: Result<(), String>) -> Value {
    match result {
        Ok(()) => json!({ "ok": true }),
        Err(error) => json!({ "ok": false, "error": error }),
    }
}

/// Answers one request line. `stop` is acted on by the caller after the
/// reply is sent; the second value says whether to.
pub fn answer(line: &str, vm: &dyn VmControl) -> (Value, bool) {
    match parse_request(line) {
        Err(error) => (json!({ "ok": false, "error": error }), false),
        Ok(Op::Info) => {
            let mut map = Map::new();
            map.insert("ok".into(), Value::Bool(true));
            map.extend(vm.info());
            (Value::Object(map), false)
        }
        Ok(Op::Pause) => (reply(vm.pause()), false),
        Ok(Op::Resume) => (reply(vm.resume()), false),
        Ok(Op::Shutdown) => (reply(vm.shutdown()), false),
        Ok(Op::Stop) => (json!({ "ok": true }), true),
        Ok(Op::Limit(request)) => match vm.limit(&request) {
            Ok(limits) => (json!({ "ok": true, "limits": limits }), false),
            Err(error) => (json!({ "ok": false, "error": error }), false),
        },
        Ok(Op::Sched(change)) => (reply(vm.sched(&change)), false),
    }
}

/// Reads one request line: up to a newline, the end of the stream, or
/// [`MAX_REQUEST`] bytes.
fn read_request(stream: &mut UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read the request: {e}")),
        };
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    String::from_utf8(line).map_err(|_| "the request is not UTF-8".into())
}

fn serve_control(listener: Arc<UnixListener>, vm: LiveVm) {
    // Wait (briefly) until every vCPU thread has reported its id, so that
    // `info` never shows a vCPU without one.
    let deadline = Instant::now() + Duration::from_secs(2);
    while vm.control.vcpu_tids().contains(&0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    for stream in listener.as_ref().incoming() {
        let Ok(mut stream) = stream else {
            if vm.control.is_stopping() {
                return;
            }
            continue;
        };
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let (value, stop) = match read_request(&mut stream) {
            Ok(line) => answer(&line, &vm),
            Err(error) => (json!({ "ok": false, "error": error }), false),
        };
        let _ = stream.write_all(format!("{value}\n").as_bytes());
        drop(stream);
        if stop {
            vm.stop();
        }
    }
}

/// The running VM as the control socket sees it.
struct LiveVm {
    control: Arc<Control>,
    keyboard: Arc<Mutex<I8042>>,
    memory_bytes: u64,
    memory_backing: Backing,
    memory_ranges: Vec<(usize, usize)>,
    limits: Limits,
    gate: Option<Arc<GateStats>>,
}

impl VmControl for LiveVm {
    fn info(&self) -> Map<String, Value> {
        let state = if self.control.is_paused() {
            "paused"
        } else {
            "running"
        };
        let mut map = Map::new();
        map.insert("state".into(), state.into());
        map.insert("pid".into(), std::process::id().into());
        map.insert("vcpu_tids".into(), self.control.vcpu_tids().into());
        map.insert("memory_bytes".into(), self.memory_bytes.into());
        let usage = memory::huge_usage(&self.memory_ranges);
        let mut mem = Map::new();
        mem.insert("backing".into(), self.memory_backing.name().into());
        mem.insert("resident_bytes".into(), (usage.resident_kib << 10).into());
        mem.insert("huge_bytes".into(), (usage.huge_kib << 10).into());
        map.insert("memory".into(), mem.into());
        let uptime = self.control.start().elapsed().as_millis() as u64;
        map.insert("uptime_ms".into(), uptime.into());
        map.insert("exits".into(), self.control.exits.total().into());
        map.insert("rate_limits".into(), self.limits.report());
        map.insert(
            "sched".into(),
            sched::info(&self.control, self.gate.as_deref()).into(),
        );
        map
    }

    fn sched(&self, change: &Map<String, Value>) -> Result<(), String> {
        sched::change(&self.control, change)
    }

    fn limit(&self, request: &LimitRequest) -> Result<Value, String> {
        self.limits
            .apply(&request.device, &request.rate, request.replace)
            .map_err(|e| e.to_string())
    }

    fn pause(&self) -> Result<(), String> {
        self.control.request_pause().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            // A kick that lands just before a vCPU enters KVM_RUN is lost,
            // so kick again until every vCPU is parked.
            for tid in self.control.vcpu_tids() {
                vcpu::kick_tid(tid);
            }
            if self.control.wait_parked(Duration::from_millis(10)) {
                return Ok(());
            }
            if self.control.is_stopping() {
                return Err("the VM is stopping".into());
            }
            if Instant::now() > deadline {
                let _ = self.control.resume();
                return Err("the vCPUs did not stop in time; the guest keeps running".into());
            }
        }
    }

    fn resume(&self) -> Result<(), String> {
        self.control.resume().map_err(|e| e.to_string())
    }

    fn shutdown(&self) -> Result<(), String> {
        if self.control.is_stopping() {
            return Err("the VM is stopping".into());
        }
        let mut keyboard = self.keyboard.lock().unwrap_or_else(|p| p.into_inner());
        if keyboard.inject_ctrl_alt_del() {
            Ok(())
        } else {
            Err("the guest is not reading its keyboard; Ctrl-Alt-Del not sent".into())
        }
    }

    fn stop(&self) {
        self.control.request_exit(VmExit::Stopped(
            "a stop request on the control socket".into(),
        ));
    }
}

// ---------------------------------------------------------------------------
// The runtime directory as a whole.

/// What the runtime needs of the VM once it is built.
pub struct VmParts {
    pub control: Arc<Control>,
    /// The keyboard controller, for Ctrl-Alt-Del.
    pub keyboard: Arc<Mutex<I8042>>,
    /// Where console input goes.
    pub input: InputSink,
    pub memory_bytes: u64,
    /// Guest RAM's backing and its host-virtual ranges, for `info`.
    pub memory_backing: Backing,
    pub memory_ranges: Vec<(usize, usize)>,
    /// The disks' and NICs' rate limiters, for `info` and `limit`.
    pub limits: Limits,
    /// The time-partition gate's figures, when the guest has windows.
    pub gate: Option<Arc<GateStats>>,
}

impl std::fmt::Debug for VmParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmParts")
            .field("memory_bytes", &self.memory_bytes)
            .finish_non_exhaustive()
    }
}

/// A runtime directory being served.
#[derive(Debug)]
pub struct Runtime {
    dir: PathBuf,
    hub: Arc<Hub>,
    control: Option<UnixListener>,
    console: Option<(UnixListener, ConsoleLog)>,
    /// The control listener, shared with its thread: held here so that
    /// its descriptor stays open (and ours) until the end, when shutting
    /// it down wakes the thread's accept.
    serving_control: Option<Arc<UnixListener>>,
}

impl Runtime {
    /// Takes over `dir`: removes a stale exit record and sockets, listens
    /// on both sockets, opens the console log, and redirects the guest
    /// console from stdout to the log and the console clients.
    pub fn open(dir: &Path) -> Result<Self, RuntimeError> {
        if !dir.is_dir() {
            return Err(RuntimeError::NotADirectory(dir.to_path_buf()));
        }
        let control = listen(&dir.join(CONTROL_SOCKET))?;
        remove_stale(&dir.join(EXIT_RECORD))?;
        let console = listen(&dir.join(CONSOLE_SOCKET))?;
        console
            .set_nonblocking(true)
            .map_err(|e| RuntimeError::Listen(dir.join(CONSOLE_SOCKET), e))?;
        let log_path = dir.join(CONSOLE_LOG);
        let log = ConsoleLog::open(&log_path).map_err(|e| RuntimeError::Log(log_path, e))?;
        let hub = Arc::new(Hub {
            state: Mutex::new(HubState::default()),
            done_changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(RuntimeError::EventFd)?,
        });
        let sink = hub.clone();
        console::redirect_output(Arc::new(move |bytes: &[u8]| sink.publish(bytes)));
        Ok(Self {
            dir: dir.to_path_buf(),
            hub,
            control: Some(control),
            console: Some((console, log)),
            serving_control: None,
        })
    }

    /// Starts serving both sockets. Call it with the stop signals already
    /// blocked, so that the threads inherit the mask.
    pub fn start(&mut self, vm: VmParts) -> Result<(), RuntimeError> {
        if let Some((listener, log)) = self.console.take() {
            let server = ConsoleServer {
                hub: self.hub.clone(),
                listener,
                log,
                clients: Vec::new(),
                input: vm.input,
                pending_input: Vec::new(),
                stderr_checked: Instant::now(),
            };
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Console);
                    server.run()
                })
                .map_err(|e| RuntimeError::Thread("console", e))?;
        }
        if let Some(listener) = self.control.take() {
            let listener = Arc::new(listener);
            self.serving_control = Some(listener.clone());
            let live = LiveVm {
                control: vm.control,
                keyboard: vm.keyboard,
                memory_bytes: vm.memory_bytes,
                memory_backing: vm.memory_backing,
                memory_ranges: vm.memory_ranges,
                limits: vm.limits,
                gate: vm.gate,
            };
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Control);
                    serve_control(listener, live)
                })
                .map_err(|e| RuntimeError::Thread("control", e))?;
        }
        Ok(())
    }

    /// Writes the dump of a vCPU that died to [`VCPU_DUMP`].
    pub fn write_dump(&self, text: &str) -> io::Result<PathBuf> {
        let path = self.dir.join(VCPU_DUMP);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// At the end of the run: writes out the console output still queued,
    /// stops serving, and (on drop) removes the sockets. The exit record
    /// comes later, from whoever decides the exit status.
    pub fn finish(self) {
        if let Some(listener) = &self.serving_control {
            // SAFETY: the listener is open for as long as `listener` lives
            // (the Arc keeps it), so the descriptor is ours; shutting it
            // down only makes the control thread's blocked accept() return.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let mut state = self.hub.lock();
        state.closing = true;
        let _ = self.hub.wake.write(1);
        let started = self.serving_control.is_some();
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        while started && !state.done && Instant::now() < deadline {
            state = self
                .hub
                .done_changed
                .wait_timeout(state, Duration::from_millis(50))
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Runtime {
    /// Stops redirecting the console and removes the sockets, however the
    /// run ended.
    fn drop(&mut self) {
        console::clear_redirect();
        let _ = std::fs::remove_file(self.dir.join(CONTROL_SOCKET));
        let _ = std::fs::remove_file(self.dir.join(CONSOLE_SOCKET));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fv-runtime-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn requests_parse_to_ops() {
        assert_eq!(parse_request("{\"op\":\"info\"}"), Ok(Op::Info));
        assert_eq!(parse_request(" {\"op\": \"stop\"} \r"), Ok(Op::Stop));
        assert_eq!(parse_request("{\"op\":\"pause\"}"), Ok(Op::Pause));
        let limit = r#"{"op":"limit","device":"net0","rate":{"bandwidth":"1MiB/s"}}"#;
        let Ok(Op::Limit(request)) = parse_request(limit) else {
            panic!("a limit request did not parse");
        };
        assert_eq!(request.device, "net0");
        assert_eq!(request.rate, json!({"bandwidth": "1MiB/s"}));
    }

    #[test]
    fn a_limit_request_reaches_the_devices_and_a_bad_one_changes_nothing() {
        let mut builder = crate::rate::LimitsBuilder::default();
        builder.add("disk0".into(), Default::default()).unwrap();
        let limits = builder.build();
        let vm = FakeVm {
            limits: limits.clone(),
            ..FakeVm::default()
        };
        let (reply, stop) = answer(r#"{"op":"limit","device":"disk0","rate":{"ops":500}}"#, &vm);
        assert!(!stop);
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["limits"][0]["limit"], json!({"ops": 500}));
        let (reply, _) = answer(
            r#"{"op":"limit","device":"disk0","rate":{"ops":"lots"}}"#,
            &vm,
        );
        assert_eq!(reply["ok"], false);
        assert!(reply["error"].as_str().unwrap().starts_with("rate.ops: "));
        assert_eq!(limits.report()[0]["limit"], json!({"ops": 500}));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let cases = [
            ("", "bad JSON"),
            ("{\"op\":", "bad JSON"),
            ("[\"info\"]", "a request is a JSON object"),
            ("{}", "'op' is missing"),
            ("{\"op\":1}", "'op' must be a string"),
            ("{\"op\":\"reboot\"}", "unknown op 'reboot'"),
            ("{\"op\":\"info\",\"x\":1}", "unknown field 'x'"),
        ];
        for (line, reason) in cases {
            let err = parse_request(line).unwrap_err();
            assert!(err.starts_with(reason), "{line}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn mangled_requests_are_refused_on_one_line() {
        let seed = b"{\"op\":\"pause\"}";
        let alphabet = b"{}[]\":,op \\u0aZ\n";
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        for _ in 0..5000 {
            let mut bytes = seed.to_vec();
            for _ in 0..1 + next() % 3 {
                let at = next() % bytes.len();
                bytes[at] = alphabet[next() % alphabet.len()];
            }
            let line = String::from_utf8_lossy(&bytes);
            if let Err(e) = parse_request(&line) {
                assert!(!e.contains('\n'), "{line}: {e}");
            }
        }
    }

    /// A VM that records what it was asked.
    #[derive(Default)]
    struct FakeVm {
        paused: Cell<bool>,
        shutdowns: Cell<u32>,
        stopped: Cell<bool>,
        limits: crate::rate::Limits,
    }

    impl VmControl for FakeVm {
        fn info(&self) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert(
                "state".into(),
                if self.paused.get() {
                    "paused"
                } else {
                    "running"
                }
                .into(),
            );
            m
        }
        fn pause(&self) -> Result<(), String> {
            if self.paused.replace(true) {
                return Err("already paused".into());
            }
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            if !self.paused.replace(false) {
                return Err("not paused".into());
            }
            Ok(())
        }
        fn shutdown(&self) -> Result<(), String> {
            self.shutdowns.set(self.shutdowns.get() + 1);
            Ok(())
        }
        fn stop(&self) {
            self.stopped.set(true);
        }
        fn limit(&self, request: &LimitRequest) -> Result<Value, String> {
            self.limits
                .apply(&request.device, &request.rate, request.replace)
                .map_err(|e| e.to_string())
        }
    }

    #[test]
    fn answers_follow_the_contract() {
        let vm = FakeVm::default();
        assert_eq!(
            answer("{\"op\":\"info\"}", &vm),
            (json!({"ok": true, "state": "running"}), false)
        );
        assert_eq!(answer("{\"op\":\"pause\"}", &vm).0, json!({"ok": true}));
        assert_eq!(
            answer("{\"op\":\"pause\"}", &vm).0,
            json!({"ok": false, "error": "already paused"})
        );
        assert_eq!(answer("{\"op\":\"resume\"}", &vm).0, json!({"ok": true}));
        assert_eq!(
            answer("{\"op\":\"resume\"}", &vm).0,
            json!({"ok": false, "error": "not paused"})
        );
        assert_eq!(answer("{\"op\":\"shutdown\"}", &vm).0, json!({"ok": true}));
        assert_eq!(vm.shutdowns.get(), 1);
        let (value, stop) = answer("{\"op\":\"stop\"}", &vm);
        assert_eq!((value, stop), (json!({"ok": true}), true));
        assert!(!vm.stopped.get(), "stop waits until the reply is sent");
    }

    #[test]
    fn a_bad_request_changes_nothing() {
        let vm = FakeVm::default();
        let (value, stop) = answer("{\"op\":\"pause\",\"now\":true}", &vm);
        assert_eq!(value["ok"], json!(false));
        assert!(!stop && !vm.paused.get() && vm.shutdowns.get() == 0);
    }

    #[test]
    fn exit_record_is_written_whole() {
        let dir = scratch("exit");
        write_exit_record(&dir, 2, "vCPU 0 triple-faulted \"badly\"").unwrap();
        let text = std::fs::read_to_string(dir.join(EXIT_RECORD)).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"status": 2, "reason": "vCPU 0 triple-faulted \"badly\""})
        );
        assert!(!dir.join(".exit.json.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_console_log_removed_under_the_vmm_is_started_again() {
        let dir = scratch("log-removed");
        let path = dir.join(CONSOLE_LOG);
        let mut log = ConsoleLog::with_limits(&path, 16, 8).unwrap();
        log.append(b"0123456789").unwrap();
        std::fs::remove_file(&path).unwrap();
        log.append(b"abcdefghij").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        log.append(b"xyz").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"xyz");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn console_log_keeps_its_tail_past_the_limit() {
        let dir = scratch("log");
        let path = dir.join(CONSOLE_LOG);
        std::fs::write(&path, b"old-").unwrap();
        let mut log = ConsoleLog::with_limits(&path, 16, 8).unwrap();
        log.append(b"0123456789").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old-0123456789", "appends");
        log.append(b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"56789abc", "cut to 8");
        log.append(b"defghijklm").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"fghijklm");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
