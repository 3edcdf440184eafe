//! Guest processes seen from outside: spawning a detached VMM, telling a
//! process apart from a later one that reused its pid, CPU time, signals,
//! and the VMM's control socket (see the runtime-directory contract in
//! docs/control-plane.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

/// Errors talking to or starting a guest process.
#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("cannot start the guest process")]
    Spawn(#[source] std::io::Error),
    #[error("cannot open the guest's log file {0}")]
    Log(String, #[source] std::io::Error),
    #[error("cannot reach the guest's control socket")]
    Control(#[source] std::io::Error),
    #[error("the guest's control socket sent a bad reply")]
    BadReply,
    #[error("the guest refused: {0}")]
    Refused(String),
}

/// What identifies one process for its whole life: its pid and the time it
/// started (clock ticks after boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub pid: i32,
    pub start_ticks: u64,
}

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of `pid`, or `None` when it does not exist or is a zombie.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // fields[0] is the state (field 3); the start time is field 22.
    if fields.first().is_some_and(|s| s == "Z" || s == "X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// CPU time (user + system) used by `pid`, in milliseconds.
pub fn cpu_time_ms(pid: i32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some((utime + stime) * 1000 / hz)
}

/// Whether `identity` is still the live process whose command line names
/// `runtime_dir` (so neither a dead guest nor an unrelated process that was
/// given the same pid later).
pub fn is_alive(identity: Identity, runtime_dir: &Path) -> bool {
    if start_ticks(identity.pid) != Some(identity.start_ticks) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", identity.pid)) else {
        return false;
    };
    let want = runtime_dir.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|word| word == want)
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: kill has no memory effects; the pid is a guest process the
    // caller has just checked the identity of.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Starts `exe run --config CONFIG --runtime-dir RUNTIME` in its own session,
/// stdin from /dev/null, stdout and stderr to `out` and `err`, inside the
/// cgroups whose `cgroup.procs` files `groups` lists (joined between fork
/// and exec, so that no thread of the VMM runs outside them), with file
/// mode creation mask 077 (its files are private), with the shared regions
/// of `regions`, and inheriting their descriptors and `inherit`
/// (close-on-exec in the daemon, cleared only in the child, so no other
/// child started meanwhile gets them). With the jail's flags, `run` jails
/// itself.
pub fn spawn_vmm(
    exe: &Path,
    config: &Path,
    runtime_dir: &Path,
    (out, err): (&Path, &Path),
    (groups, jail_args): (&[std::path::PathBuf], &[std::ffi::OsString]),
    regions: &crate::region::Handoff,
    inherit: &[i32],
) -> Result<Child, ProcessError> {
    use std::os::unix::ffi::OsStrExt;
    let groups: Vec<std::ffi::CString> = groups
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let open = |p: &Path| {
        crate::files::create_private(p).map_err(|e| ProcessError::Log(p.display().to_string(), e))
    };
    let stdout = open(out)?;
    // Readable and appended to, so that the VMM can keep it bounded.
    let stderr = crate::files::create_private_log(err)
        .map_err(|e| ProcessError::Log(err.display().to_string(), e))?;
    let mut command = Command::new(exe);
    command
        .arg0("ferrovisor")
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .args(
            regions
                .options
                .iter()
                .flat_map(|o| ["--region-fds", o.as_str()]),
        )
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .args(jail_args);
    let mut inherit = inherit.to_vec();
    inherit.extend_from_slice(&regions.fds);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setsid, open/write/close (joining cgroups), umask and fcntl,
    // which are async-signal-safe; it reads `groups` and `inherit`,
    // allocated before the fork, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for procs in &groups {
                join_cgroup(procs)?;
            }
            libc::umask(0o077);
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn().map_err(ProcessError::Spawn)
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs` ("0" names the writer). Only async-signal-safe calls: it runs
/// between fork and exec.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: `procs` is a NUL-terminated path; open, write and close are
    // async-signal-safe and touch no memory of the parent.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

/// Sends one request line to the VMM's control socket and returns its reply,
/// an object with `"ok": true` (else `Refused`).
pub fn control(
    runtime_dir: &Path,
    request: &Value,
    timeout: Duration,
) -> Result<Value, ProcessError> {
    let mut stream =
        UnixStream::connect(runtime_dir.join("control.sock")).map_err(ProcessError::Control)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(ProcessError::Control)?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(ProcessError::Control)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take_line(&mut reply)
        .map_err(ProcessError::Control)?;
    let reply: Value = serde_json::from_str(reply.trim()).map_err(|_| ProcessError::BadReply)?;
    match reply.get("ok") {
        Some(Value::Bool(true)) => Ok(reply),
        Some(Value::Bool(false)) => Err(ProcessError::Refused(
            reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        )),
        _ => Err(ProcessError::BadReply),
    }
}

/// Reads one line of at most 64 KiB.
trait TakeLine {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<usize>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<usize> {
        use std::io::Read;
        self.take(64 * 1024).read_line(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_only_with_its_own_start_time() {
        let pid = std::process::id() as i32;
        let ticks = start_ticks(pid).expect("own stat");
        let me = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let first = me.split(|&b| b == 0).next().expect("argv0");
        let argv0 = Path::new(std::str::from_utf8(first).expect("utf-8"));
        assert!(is_alive(
            Identity {
                pid,
                start_ticks: ticks
            },
            argv0
        ));
        assert!(!is_alive(
            Identity {
                pid,
                start_ticks: ticks + 1
            },
            argv0
        ));
        assert!(!is_alive(
            Identity {
                pid,
                start_ticks: ticks
            },
            Path::new("/elsewhere")
        ));
    }

    #[test]
    fn cpu_time_of_own_process_is_known() {
        assert!(cpu_time_ms(std::process::id() as i32).is_some());
        assert!(cpu_time_ms(-5).is_none());
    }
}
