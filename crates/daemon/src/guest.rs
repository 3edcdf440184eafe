//! One guest under the daemon: its directory, its persisted record, its
//! lifecycle (created, running, paused, stopped, crashed) and the watcher
//! that notices when its process ends.
//!
//! A guest's directory holds `guest.toml` (the description), `state.json`
//! (the record below), `run/` (the VMM's runtime directory: control and
//! console sockets, `console.log`, `exit.json`), and `vmm.out` / `vmm.err`
//! (the VMM process's stdout and stderr).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::description::{self, Summary};
use crate::events::{now_ms, EventBus};
use crate::images::GuestFile;
use crate::jail::{self, JailPolicy};
use crate::process::{self, Identity};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The description file inside a guest's directory.
pub const DESCRIPTION: &str = "guest.toml";
/// The record file inside a guest's directory.
pub const RECORD: &str = "state.json";
/// The VMM's runtime directory inside a guest's directory.
pub const RUNTIME: &str = "run";
/// The VMM's copy of the description, in the runtime directory: the same,
/// with each guest file named as the descriptor it inherits (`fd:N`).
pub const VMM_CONFIG: &str = "vmm.toml";
/// How often a guest process the daemon did not start is checked.
const POLL: Duration = Duration::from_millis(200);
/// How long a start waits for the new VMM's control socket.
const CONTROL_READY: Duration = Duration::from_secs(10);
/// How long a listing waits for a VMM's own facts before it shows the last
/// ones it had, marked stale.
pub const INFO_TIMEOUT: Duration = Duration::from_millis(500);

/// Errors of a guest operation; the API maps them to status codes.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("guest '{name}' is {state}; cannot {op} it")]
    Conflict {
        name: String,
        state: State,
        op: &'static str,
    },
    #[error("cannot write the guest's files")]
    Io(#[from] io::Error),
    #[error("guest process")]
    Process(#[from] process::ProcessError),
    #[error("cannot record the guest's state")]
    Json(#[from] serde_json::Error),
    #[error("guest '{name}' did not start: {reason}")]
    StartFailed { name: String, reason: String },
    /// Its policy does not fit beside the running guests'.
    #[error("guest '{name}' was not started: {reason}")]
    NotAdmitted { name: String, reason: String },
    #[error("guest '{name}' is still {state} after SIGKILL")]
    StillLive { name: String, state: State },
    /// A guest file, tap or socket the policy refuses (names the field).
    #[error("{0}")]
    Files(String),
    /// A disk image another guest holds.
    #[error("{0}")]
    InUse(String),
    #[error("cannot jail guest '{name}'")]
    Jail {
        name: String,
        #[source]
        source: jail::JailError,
    },
}

/// A close-on-exec duplicate of `file` numbered 3 or above, so that the
/// child's stdin, stdout and stderr never land on it.
fn above_stdio(file: &fs::File) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor or returns -1; no
    // memory effects.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just made and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A guest's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Described, never started.
    Created,
    Running,
    Paused,
    /// Its process ended on its own or on request, and left an exit report.
    Stopped,
    /// Its process failed (guest failure status), died of a signal the
    /// daemon did not send, or disappeared without an exit report.
    Crashed,
}

impl State {
    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Crashed => "crashed",
        }
    }

    /// Whether a process exists for the guest.
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a VMM's end says its guest ran: a power-off (status 0) or a
/// debug-exit write (odd statuses). Status 2 (a failed start, or a guest
/// that died) and deaths by signal do not.
fn guest_ran(exit: &ExitRecord) -> bool {
    matches!(exit.status, Some(status) if status == 0 || status % 2 == 1)
}

/// How a guest process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The process's exit status, when it exited rather than died.
    pub status: Option<i32>,
    pub reason: String,
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    pub pid: Option<i32>,
    /// The process's start time in clock ticks after boot (identity).
    pub start_ticks: Option<u64>,
    /// When the current or last run started, ms since the epoch.
    pub started_ms: Option<u64>,
    pub exit: Option<ExitRecord>,
    /// Runs so far; a watcher only reports on its own run.
    pub runs: u64,
    pub created_ms: u64,
    /// The uid and gid the guest's VMM runs as when jailed, from the
    /// daemon's range; kept for the guest's whole life.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The end of one run, as its watcher saw it.
#[derive(Debug, Default)]
struct RunEnd {
    end: Mutex<Option<(ExitRecord, State)>>,
    ended: Condvar,
}

impl RunEnd {
    fn set(&self, value: (ExitRecord, State)) {
        *self.end.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
        self.ended.notify_all();
    }

    /// Waits up to `timeout` for the run to end.
    fn wait(&self, timeout: Duration) -> Option<(ExitRecord, State)> {
        let deadline = Instant::now() + timeout;
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(value) = end.as_ref() {
                return Some(value.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            end = self
                .ended
                .wait_timeout(end, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The mutable part of a guest, held only briefly.
#[derive(Debug)]
pub struct GuestData {
    pub record: Record,
    pub deleted: bool,
    run_end: Option<Arc<RunEnd>>,
    /// The daemon asked the process to die: its end is a stop, not a crash.
    killing: bool,
}

/// One guest. `op` serializes lifecycle operations on it; `data` is the
/// state, locked only for short reads and updates.
#[derive(Debug)]
pub struct Guest {
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    pub summary: Summary,
    op: Mutex<()>,
    data: Mutex<GuestData>,
    /// The VMM's last answer to `info` (run number, reply), shown marked
    /// stale when the VMM does not answer in time.
    last_vmm_info: Mutex<Option<(u64, Value)>>,
    /// The jail its VMM runs in; `None`: unconfined (`--no-jail`).
    jail: Option<Arc<JailPolicy>>,
}

/// Locks a mutex, recovering from a panicked holder.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes `value` as JSON to `path` atomically and durably (0600 temp
/// file, fsync, rename, fsync of the directory).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), GuestError> {
    crate::files::write_durable(path, &serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

/// Reads the VMM's exit report, if it wrote one.
fn read_exit_report(runtime: &Path) -> Option<ExitRecord> {
    let text = fs::read_to_string(runtime.join("exit.json")).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    Some(ExitRecord {
        status: value.get("status")?.as_i64().map(|s| s as i32),
        reason: value.get("reason")?.as_str()?.to_string(),
    })
}

/// The VMM's status for a failed guest (triple fault, panic, KVM error).
const STATUS_GUEST_FAILED: i32 = 2;
/// The VMM's status after seccomp blocked a system call. The VMM ends at
/// once, without an exit report, after one line on its stderr.
const STATUS_SECCOMP: i32 = 148;
/// How that line starts.
const SECCOMP_LINE: &str = "ferrovisor: seccomp blocked syscall ";
/// How much of the end of `vmm.err` is searched for that line.
const ERR_TAIL: u64 = 64 << 10;

/// The exit report of a VMM that seccomp ended (status [`STATUS_SECCOMP`]):
/// the blocked-call line from the end of its stderr, `err`, is the reason.
fn seccomp_report(err: &Path, code: Option<i32>) -> Option<ExitRecord> {
    use std::io::{Read, Seek, SeekFrom};
    if code != Some(STATUS_SECCOMP) {
        return None;
    }
    let mut tail = String::new();
    if let Ok(mut file) = fs::File::open(err) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(ERR_TAIL)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        tail = String::from_utf8_lossy(&bytes).into_owned();
    }
    let reason = tail
        .lines()
        .rev()
        .find(|l| l.starts_with(SECCOMP_LINE))
        .map_or_else(
            || "seccomp blocked a system call".to_string(),
            |l| l["ferrovisor: ".len()..].to_string(),
        );
    Some(ExitRecord {
        status: code,
        reason,
    })
}

/// Classifies the end of a run from the exit report (if any) and what the
/// daemon knows: `signal` when it reaped the process itself, `killing` when
/// it asked for the end.
fn classify(
    report: Option<ExitRecord>,
    signal: Option<i32>,
    code: Option<i32>,
    killing: bool,
) -> (ExitRecord, State) {
    if let Some(report) = report {
        let failed = matches!(report.status, Some(STATUS_GUEST_FAILED | STATUS_SECCOMP));
        let state = if failed && !killing {
            State::Crashed
        } else {
            State::Stopped
        };
        return (report, state);
    }
    let state = if killing {
        State::Stopped
    } else {
        State::Crashed
    };
    let reason = match (signal, code) {
        (Some(n), _) if killing => format!("killed by signal {n} on request"),
        (Some(n), _) => format!("killed by signal {n}"),
        (None, Some(c)) => {
            format!("the guest process exited with status {c} without an exit report")
        }
        (None, None) if killing => "killed on request".to_string(),
        (None, None) => "the guest process disappeared".to_string(),
    };
    (
        ExitRecord {
            status: code,
            reason,
        },
        state,
    )
}

impl Guest {
    /// A guest read back from its directory.
    pub fn load(name: &str, dir: PathBuf) -> Result<Guest, String> {
        let description = fs::read_to_string(dir.join(DESCRIPTION))
            .map_err(|e| format!("cannot read {DESCRIPTION}: {e}"))?;
        let (summary, _) = description::check(&description).map_err(|e| e.0)?;
        let text = fs::read_to_string(dir.join(RECORD))
            .map_err(|e| format!("cannot read {RECORD}: {e}"))?;
        let record: Record =
            serde_json::from_str(&text).map_err(|e| format!("bad {RECORD}: {e}"))?;
        Ok(Guest::new(name, dir, description, summary, record))
    }

    /// A guest with the given parts.
    pub fn new(
        name: &str,
        dir: PathBuf,
        description: String,
        summary: Summary,
        record: Record,
    ) -> Guest {
        Guest {
            name: name.to_string(),
            dir,
            description,
            summary,
            op: Mutex::new(()),
            data: Mutex::new(GuestData {
                record,
                deleted: false,
                run_end: None,
                killing: false,
            }),
            last_vmm_info: Mutex::new(None),
            jail: None,
        }
    }

    /// The guest, its VMM run in `jail`.
    pub fn with_jail(mut self, jail: Option<Arc<JailPolicy>>) -> Guest {
        self.jail = jail;
        self
    }

    /// Gives the guest its uid for good.
    pub fn set_uid(&self, uid: u32) -> Result<(), GuestError> {
        let mut data = lock(&self.data);
        data.record.uid = Some(uid);
        self.save(&data)
    }

    /// The jail's cgroup and flags for the next run, if the guest is jailed.
    fn placement(&self) -> Result<Option<jail::Placement>, GuestError> {
        let Some(policy) = &self.jail else {
            return Ok(None);
        };
        let fail = |source| GuestError::Jail {
            name: self.name.clone(),
            source,
        };
        let config =
            description::parse(&self.description).map_err(|e| GuestError::StartFailed {
                name: self.name.clone(),
                reason: e.0,
            })?;
        let uid = lock(&self.data).record.uid;
        policy
            .prepare(&self.name, &config, uid)
            .map(Some)
            .map_err(fail)
    }

    /// Removes the guest's cgroup after its VMM has ended.
    fn release(&self) {
        if let Some(policy) = &self.jail {
            policy.release(&self.name);
        }
    }

    /// The VMM's runtime directory.
    pub fn runtime(&self) -> PathBuf {
        self.dir.join(RUNTIME)
    }

    /// A copy of the record.
    pub fn record(&self) -> Record {
        lock(&self.data).record.clone()
    }

    /// Takes the guest's operation lock.
    pub fn begin(&self) -> MutexGuard<'_, ()> {
        lock(&self.op)
    }

    fn save(&self, data: &GuestData) -> Result<(), GuestError> {
        if data.deleted {
            return Ok(());
        }
        write_json(&self.dir.join(RECORD), &data.record)
    }

    fn conflict(&self, state: State, op: &'static str) -> GuestError {
        GuestError::Conflict {
            name: self.name.clone(),
            state,
            op,
        }
    }

    /// Records the end of run `run`, once; later reports are ignored.
    fn finish(&self, run: u64, end: (ExitRecord, State), events: &EventBus) {
        let mut data = lock(&self.data);
        if data.deleted || data.record.runs != run || !data.record.state.is_live() {
            return;
        }
        let (exit, state) = end;
        data.record.state = state;
        data.record.pid = None;
        data.record.start_ticks = None;
        data.record.exit = Some(exit.clone());
        data.killing = false;
        // A failure to save is not fatal: the state is right in memory and
        // the next save writes it.
        let _ = self.save(&data);
        drop(data);
        let event = if state == State::Crashed {
            "crashed"
        } else {
            "stopped"
        };
        events.emit(&self.name, event, state.as_str(), Some(exit.reason));
    }

    /// An error unless the guest may start now.
    pub fn check_startable(&self) -> Result<(), GuestError> {
        let state = lock(&self.data).record.state;
        if state.is_live() {
            return Err(self.conflict(state, "start"));
        }
        Ok(())
    }

    /// Starts the guest's VMM process (`exe`) on `config`, whose files are
    /// `files`, open: the VMM inherits them and its copy of the
    /// description (`run/vmm.toml`) names them `fd:N`, so it opens nothing
    /// by path. A thread reaps the process, then runs `after` (which
    /// removes the guest's switch ports); so does a start that fails.
    pub fn start(
        self: &Arc<Self>,
        exe: &Path,
        events: &Arc<EventBus>,
        config: config::VmConfig,
        files: Vec<GuestFile>,
        after: Box<dyn FnOnce() + Send>,
    ) -> Result<(), GuestError> {
        let mut after = Some(after);
        let result = self.start_process(exe, events, config, files, &mut after);
        if let Some(after) = after {
            after();
        }
        result
    }

    fn start_process(
        self: &Arc<Self>,
        exe: &Path,
        events: &Arc<EventBus>,
        config: config::VmConfig,
        files: Vec<GuestFile>,
        after: &mut Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), GuestError> {
        self.check_startable()?;
        let runtime = self.runtime();
        crate::files::private_dir(&runtime)?;
        for stale in ["control.sock", "console.sock", "exit.json", "exit.json.tmp"] {
            let _ = fs::remove_file(runtime.join(stale));
        }
        let mut vmm_config = config;
        let mut inherited = Vec::with_capacity(files.len());
        for f in &files {
            let fd = above_stdio(&f.file)?;
            f.rename_in(&mut vmm_config, fd.as_raw_fd());
            inherited.push(fd);
        }
        let vmm_toml = runtime.join(VMM_CONFIG);
        crate::files::write_durable(&vmm_toml, config::to_guest_toml(&vmm_config).as_bytes())?;
        let fds: Vec<i32> = inherited.iter().map(AsRawFd::as_raw_fd).collect();
        let mut groups =
            crate::sched::prepare(&self.name, &self.description).map_err(|reason| {
                GuestError::NotAdmitted {
                    name: self.name.clone(),
                    reason,
                }
            })?;
        let placement = self.placement()?;
        let mut jail_args = Vec::new();
        if let Some(placement) = placement {
            for procs in placement.procs {
                if !groups.contains(&procs) {
                    groups.push(procs);
                }
            }
            jail_args = placement.args;
        }
        if let Some(vsock) = &vmm_config.vsock {
            crate::vsock_route::start(&self.name, &runtime, vsock.cid, &vsock.socket)?;
        }
        let spawned = process::spawn_vmm(
            exe,
            &vmm_toml,
            &runtime,
            (&self.dir.join("vmm.out"), &self.dir.join("vmm.err")),
            (&groups, &jail_args),
            &crate::region::handoff(&self.name),
            &fds,
        );
        let mut child = spawned.inspect_err(|_| {
            crate::vsock_route::stop(&self.name);
            self.release();
            crate::sched::release(&self.name, &self.dir);
        })?;
        // The VMM has its own copies (and the disks' locks with them).
        drop(inherited);
        drop(files);
        let pid = child.id() as i32;
        let run_end = Arc::new(RunEnd::default());
        let run = {
            let mut data = lock(&self.data);
            data.record.runs += 1;
            data.record.state = State::Running;
            data.record.pid = Some(pid);
            data.record.start_ticks = process::start_ticks(pid);
            data.record.started_ms = Some(now_ms());
            data.record.exit = None;
            data.killing = false;
            data.run_end = Some(run_end.clone());
            self.save(&data)?;
            data.record.runs
        };
        events.emit(&self.name, "started", "running", None);
        let guest = self.clone();
        let events = events.clone();
        let after = after.take();
        std::thread::spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().ok();
            crate::vsock_route::stop(&guest.name);
            if let Some(after) = after {
                after();
            }
            // Before the end is known, so that no new run's group is removed.
            guest.release();
            let killing = lock(&guest.data).killing;
            let report = read_exit_report(&guest.runtime()).or_else(|| {
                seccomp_report(&guest.dir.join("vmm.err"), status.and_then(|s| s.code()))
            });
            let end = classify(
                report,
                status.and_then(|s| s.signal()),
                status.and_then(|s| s.code()),
                killing,
            );
            crate::sched::release(&guest.name, &guest.dir);
            run_end.set(end.clone());
            guest.finish(run, end, &events);
        });
        self.wait_control()
    }

    /// Waits until a just-started VMM answers on its control socket, so
    /// that the next operation finds it ready. A VMM that ends first did not
    /// start: the error carries its exit reason (the guest is then stopped
    /// or crashed, as recorded).
    fn wait_control(&self) -> Result<(), GuestError> {
        let deadline = Instant::now() + CONTROL_READY;
        let socket = self.runtime().join("control.sock");
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            let Some(run_end) = self.run_end() else {
                return Ok(());
            };
            if let Some((exit, _)) = run_end.wait(Duration::ZERO) {
                // Let the watcher record the end before answering.
                self.wait_end(Duration::from_secs(5));
                if guest_ran(&exit) {
                    // The guest ran and ended (it powered off or wrote the
                    // debug-exit port) before the socket was seen: it started.
                    return Ok(());
                }
                return Err(GuestError::StartFailed {
                    name: self.name.clone(),
                    reason: exit.reason,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Takes over a guest whose process outlived an earlier daemon: if the
    /// process is still the one recorded, watch it; else record its end.
    pub fn adopt(self: &Arc<Self>, events: &Arc<EventBus>, after: Box<dyn FnOnce() + Send>) {
        let (record, run) = {
            let data = lock(&self.data);
            (data.record.clone(), data.record.runs)
        };
        if !record.state.is_live() {
            return;
        }
        let identity = match (record.pid, record.start_ticks) {
            (Some(pid), Some(start_ticks)) => Some(Identity { pid, start_ticks }),
            _ => None,
        };
        let runtime = self.runtime();
        let alive = identity.filter(|&id| process::is_alive(id, &runtime));
        let Some(identity) = alive else {
            after();
            self.release();
            let end = classify(read_exit_report(&runtime), None, None, false);
            self.finish(run, end, events);
            return;
        };
        // The process may have been paused or resumed behind our back.
        if let Ok(info) = process::control(&runtime, &json!({"op": "info"}), Duration::from_secs(2))
        {
            let state = match info.get("state").and_then(Value::as_str) {
                Some("paused") => State::Paused,
                _ => State::Running,
            };
            let mut data = lock(&self.data);
            data.record.state = state;
            let _ = self.save(&data);
        }
        crate::sched::readopt(&self.name, &self.description, &self.dir, &runtime);
        let run_end = Arc::new(RunEnd::default());
        lock(&self.data).run_end = Some(run_end.clone());
        let state = lock(&self.data).record.state;
        events.emit(&self.name, "adopted", state.as_str(), None);
        let guest = self.clone();
        let events = events.clone();
        std::thread::spawn(move || {
            while process::is_alive(identity, &runtime) {
                std::thread::sleep(POLL);
            }
            after();
            guest.release();
            let killing = lock(&guest.data).killing;
            let end = classify(read_exit_report(&runtime), None, None, killing);
            crate::sched::release(&guest.name, &guest.dir);
            run_end.set(end.clone());
            guest.finish(run, end, &events);
        });
    }

    /// The live process, checked against pid reuse.
    fn live_identity(&self) -> Option<Identity> {
        let data = lock(&self.data);
        let id = Identity {
            pid: data.record.pid?,
            start_ticks: data.record.start_ticks?,
        };
        drop(data);
        process::is_alive(id, &self.runtime()).then_some(id)
    }

    /// Pauses (`pause == true`) or resumes a guest.
    pub fn set_paused(&self, pause: bool, events: &EventBus) -> Result<(), GuestError> {
        let state = lock(&self.data).record.state;
        let (from, op, to, event) = if pause {
            (State::Running, "pause", State::Paused, "paused")
        } else {
            (State::Paused, "resume", State::Running, "resumed")
        };
        if state != from {
            return Err(self.conflict(state, op));
        }
        process::control(
            &self.runtime(),
            &json!({ "op": op }),
            Duration::from_secs(5),
        )?;
        let mut data = lock(&self.data);
        if data.record.state == from {
            data.record.state = to;
            self.save(&data)?;
            drop(data);
            events.emit(&self.name, event, to.as_str(), None);
        }
        Ok(())
    }

    fn run_end(&self) -> Option<Arc<RunEnd>> {
        lock(&self.data).run_end.clone()
    }

    /// Kills the process with SIGKILL and waits for its end to be recorded.
    pub fn kill(&self) -> Result<(), GuestError> {
        let state = lock(&self.data).record.state;
        if !state.is_live() {
            return Err(self.conflict(state, "kill"));
        }
        lock(&self.data).killing = true;
        if let Some(id) = self.live_identity() {
            process::signal(id.pid, libc::SIGKILL);
        }
        self.wait_end(Duration::from_secs(10));
        self.check_ended()
    }

    /// After a SIGKILL: an error if the guest is still recorded live.
    fn check_ended(&self) -> Result<(), GuestError> {
        let state = lock(&self.data).record.state;
        if state.is_live() {
            return Err(GuestError::StillLive {
                name: self.name.clone(),
                state,
            });
        }
        Ok(())
    }

    /// Waits until the run's end is recorded (or `timeout`); true if it was.
    fn wait_end(&self, timeout: Duration) -> bool {
        let Some(run_end) = self.run_end() else {
            return true;
        };
        if run_end.wait(timeout).is_none() {
            return false;
        }
        // The watcher records the end right after announcing it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&self.data).record.state.is_live() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops the guest: Ctrl-Alt-Del through the VMM (resuming a paused
    /// guest first), up to `timeout` for it to power off, then a clean VMM
    /// stop (as SIGTERM), then SIGKILL. Returns how it ended.
    pub fn stop(&self, timeout: Duration, events: &EventBus) -> Result<&'static str, GuestError> {
        let state = lock(&self.data).record.state;
        if !state.is_live() {
            return Err(self.conflict(state, "stop"));
        }
        let runtime = self.runtime();
        let short = Duration::from_secs(5);
        if state == State::Paused && self.set_paused(false, events).is_err() {
            // A VMM that cannot resume cannot shut its guest down either.
        }
        let asked = process::control(&runtime, &json!({"op": "shutdown"}), short).is_ok();
        if asked && self.wait_end(timeout) {
            return Ok("shutdown");
        }
        lock(&self.data).killing = true;
        if process::control(&runtime, &json!({"op": "stop"}), short).is_err() {
            if let Some(id) = self.live_identity() {
                process::signal(id.pid, libc::SIGTERM);
            }
        }
        if self.wait_end(short) {
            return Ok("stop");
        }
        if let Some(id) = self.live_identity() {
            process::signal(id.pid, libc::SIGKILL);
        }
        self.wait_end(short);
        self.check_ended()?;
        Ok("kill")
    }

    /// Whether the guest was deleted (a lifecycle operation that waited for
    /// its lock must then do nothing).
    pub fn is_deleted(&self) -> bool {
        lock(&self.data).deleted
    }

    /// Marks the guest deleted if it is not live; the caller removes the
    /// directory.
    pub fn mark_deleted(&self) -> Result<(), GuestError> {
        let mut data = lock(&self.data);
        if data.record.state.is_live() {
            return Err(self.conflict(data.record.state, "delete"));
        }
        data.deleted = true;
        Ok(())
    }

    /// What the VMM of run `run` reports about itself, asked with a short
    /// timeout; when it does not answer, the last answer of this run, and
    /// `true` (stale).
    fn vmm_facts(&self, run: u64) -> (Option<Value>, bool) {
        let ask = json!({"op": "info"});
        match process::control(&self.runtime(), &ask, INFO_TIMEOUT) {
            Ok(reply) => {
                *lock(&self.last_vmm_info) = Some((run, reply.clone()));
                (Some(reply), false)
            }
            Err(_) => {
                let cached = lock(&self.last_vmm_info).clone();
                (cached.filter(|(r, _)| *r == run).map(|(_, v)| v), true)
            }
        }
    }

    /// For a jailed VMM, the host's view: its own pid (not the waiting
    /// parent's), host thread ids for the vCPUs it numbers in its PID
    /// namespace, and the CPU time of its cgroup.
    fn jailed_facts(&self, started: i32, info: &mut Value) {
        let Some(policy) = &self.jail else {
            return;
        };
        let Some(vmm) = policy.vmm_pid(&self.name, started) else {
            return;
        };
        info["pid"] = json!(vmm);
        info["cpu_time_ms"] = json!(policy.cpu_time_ms(&self.name));
        let inner: Option<Vec<i64>> = info["vcpu_tids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect());
        if let Some(host) = inner.and_then(|t| jail::host_tids(vmm, &t)) {
            info["vcpu_tids"] = json!(host);
        }
    }

    /// Seconds-level facts for listings: the record plus, for a live guest,
    /// what its VMM reports (vCPU thread ids, exits, uptime) and CPU time.
    pub fn info(&self, detailed: bool) -> Value {
        let record = self.record();
        let mut info = json!({
            "name": self.name,
            "state": record.state.as_str(),
            "vcpus": self.summary.cpus,
            "memory_bytes": self.summary.memory_bytes,
            "pid": record.pid,
            "exit": record.exit,
            "cpu_time_ms": null,
            "exits": null,
            "uptime_ms": null,
            "vcpu_tids": null,
            "memory": null,
            "rate_limits": null,
            "sched": null,
            "stale": false,
        });
        if record.state.is_live() {
            if let Some(id) = self.live_identity() {
                info["cpu_time_ms"] = json!(process::cpu_time_ms(id.pid));
                let (facts, stale) = self.vmm_facts(record.runs);
                if let Some(reply) = facts {
                    let keys = [
                        "exits",
                        "uptime_ms",
                        "vcpu_tids",
                        "memory",
                        "rate_limits",
                        "sched",
                    ];
                    for key in keys {
                        info[key] = reply.get(key).cloned().unwrap_or(Value::Null);
                    }
                }
                info["stale"] = json!(stale);
                self.jailed_facts(id.pid, &mut info);
            }
        }
        if detailed {
            info["config"] = json!(self.description);
            info["created_ms"] = json!(record.created_ms);
            info["started_ms"] = json!(record.started_ms);
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_report_means_stopped_unless_the_guest_failed() {
        let report = |status| ExitRecord {
            status: Some(status),
            reason: "the guest powered off".into(),
        };
        assert_eq!(
            classify(Some(report(0)), None, Some(0), false).1,
            State::Stopped
        );
        assert_eq!(
            classify(Some(report(2)), None, Some(2), false).1,
            State::Crashed
        );
        assert_eq!(
            classify(Some(report(2)), None, Some(2), true).1,
            State::Stopped
        );
    }

    #[test]
    fn a_vmm_that_seccomp_ended_crashed_with_the_blocked_call_as_reason() {
        let err = std::env::temp_dir().join(format!("fv-seccomp-{}.err", std::process::id()));
        fs::write(
            &err,
            "ferrovisor: warning: PVM\n\
             ferrovisor: seccomp blocked syscall ptrace (101) in a vcpu thread\n",
        )
        .unwrap();
        assert_eq!(seccomp_report(&err, Some(0)), None, "only status 148");
        let report = seccomp_report(&err, Some(STATUS_SECCOMP));
        let (exit, state) = classify(report, None, Some(STATUS_SECCOMP), false);
        assert_eq!(state, State::Crashed);
        assert_eq!(
            exit.reason,
            "seccomp blocked syscall ptrace (101) in a vcpu thread"
        );
        fs::write(&err, "").unwrap();
        let report = seccomp_report(&err, Some(STATUS_SECCOMP)).unwrap();
        assert_eq!(report.reason, "seccomp blocked a system call");
        let _ = fs::remove_file(&err);
    }

    #[test]
    fn a_process_without_report_crashed_and_says_how() {
        let (exit, state) = classify(None, Some(9), None, false);
        assert_eq!(state, State::Crashed);
        assert_eq!(exit.reason, "killed by signal 9");
        let (exit, state) = classify(None, None, None, false);
        assert_eq!(state, State::Crashed);
        assert_eq!(exit.reason, "the guest process disappeared");
        let (exit, state) = classify(None, Some(9), None, true);
        assert_eq!(state, State::Stopped);
        assert_eq!(exit.reason, "killed by signal 9 on request");
        let (exit, state) = classify(None, None, None, true);
        assert_eq!(state, State::Stopped);
        assert_eq!(exit.reason, "killed on request");
    }

    #[test]
    fn a_kill_that_leaves_the_guest_live_says_so() {
        // Recorded running, but with no process the daemon can signal or
        // see end: the kill cannot change the state and must not say 200.
        let record = Record {
            state: State::Running,
            pid: None,
            start_ticks: None,
            started_ms: None,
            exit: None,
            runs: 1,
            created_ms: 0,
            uid: None,
        };
        let summary = Summary {
            cpus: 1,
            memory_bytes: 1 << 20,
        };
        let guest = Guest::new(
            "stuck",
            PathBuf::from("/nonexistent/stuck"),
            String::new(),
            summary,
            record,
        );
        let e = guest.kill().expect_err("still live");
        assert_eq!(
            e.to_string(),
            "guest 'stuck' is still running after SIGKILL"
        );
    }

    #[test]
    fn record_round_trips_through_json() {
        let record = Record {
            state: State::Paused,
            pid: Some(7),
            start_ticks: Some(99),
            started_ms: Some(1),
            exit: None,
            runs: 3,
            created_ms: 0,
            uid: Some(100_003),
        };
        let text = serde_json::to_string(&record).expect("serializes");
        assert!(text.contains("\"paused\""));
        // A record written before uids existed still reads.
        let old = text.replace(",\"uid\":100003", "");
        assert!(!old.contains("uid"), "{old}");
        let read: Record = serde_json::from_str(&old).expect("parses");
        assert_eq!(read.uid, None);
        assert_eq!(
            serde_json::from_str::<Record>(&text).expect("parses"),
            record
        );
    }
}
