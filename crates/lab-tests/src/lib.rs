//! Harness for the lab tier: start the Ferrovisor VMM on the guest kit, watch
//! the guest's serial console (the VMM's stdout) and collect how it ended.
//!
//! The lab sets these environment variables (see docs/lab.md):
//! `FERROVISOR_BIN`, `FERROVISOR_KERNEL` (bzImage), `FERROVISOR_VMLINUX` (PVH
//! ELF), `FERROVISOR_INITRAMFS` and `FERROVISOR_CMDLINE` (the kit's command
//! line). Every wait has a deadline after which the VMM is killed, so a hung
//! guest fails its test instead of stalling the suite.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

pub mod daemon;
pub mod net;
pub mod retry;

/// The line the guest kit's /init prints first.
pub const INIT_MARKER: &str = "ferrovisor-guest: init reached";
/// The prefix of the line the guest kit prints after a command.
pub const STATUS_PREFIX: &str = "ferrovisor-guest: exit status ";
/// The kit's command line when the lab does not say.
const FALLBACK_CMDLINE: &str = "console=ttyS0 quiet reboot=k,f panic=-1 io_delay=none";

/// Errors of the harness.
#[derive(Debug, Error)]
pub enum HarnessError {
    #[error("environment variable {0} is not set: run these tests with `cargo xtask test`")]
    MissingEnv(&'static str),
    #[error("cannot start the VMM")]
    Spawn(#[source] std::io::Error),
    #[error("cannot write to the guest console")]
    Input(#[source] std::io::Error),
    #[error("cannot wait for the VMM")]
    Wait(#[source] std::io::Error),
    #[error("timed out after {secs} s waiting for {what}; console so far:\n{console}")]
    Timeout {
        what: String,
        secs: u64,
        console: String,
    },
    #[error("the VMM's output ended before {what} ({status}); console:\n{console}\nVMM stderr:\n{stderr}")]
    Ended {
        what: String,
        status: String,
        console: String,
        stderr: String,
    },
}

/// Which image of the kit's kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelImage {
    /// The bzImage, through the Linux boot protocol.
    BzImage,
    /// The uncompressed ELF, through PVH.
    Pvh,
}

/// A virtio-blk disk (`--disk path=FILE[,readonly=on]`); the guest sees the
/// disks in order as /dev/vda, /dev/vdb, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub readonly: bool,
}

/// A virtio-net interface on a host tap (`--net tap=NAME[,mac=MAC]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    pub tap: String,
    pub mac: Option<String>,
}

/// Where the guest's console is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Console {
    /// The 8250 UART (`console=ttyS0`).
    #[default]
    Serial,
    /// A virtio console (`--console virtio`, `console=hvc0`).
    Virtio,
}

/// A virtio-vsock device (`--vsock cid=N,socket=PATH`): guest connections to
/// host port P reach the unix socket `PATH_P`; host programs connect to PATH
/// and write `CONNECT <port>\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vsock {
    pub cid: u32,
    pub socket: PathBuf,
}

/// How to start one guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub image: KernelImage,
    pub cpus: u8,
    pub memory: String,
    /// Words appended to the kit's command line.
    pub extra_cmdline: Vec<String>,
    /// A shell command for the guest's /init to run (then it powers off).
    pub run: Option<String>,
    /// Ask /init to report the command's status through the debug-exit port.
    pub debug_exit: bool,
    pub disks: Vec<Disk>,
    pub nets: Vec<Net>,
    pub console: Console,
    /// A virtio-rng device.
    pub rng: bool,
    pub vsock: Option<Vsock>,
    /// `--runtime-dir`: the VMM serves a control socket there and writes
    /// the console to `console.log` in it instead of stdout.
    pub runtime_dir: Option<PathBuf>,
    /// More `ferrovisor run` flags.
    pub extra_args: Vec<String>,
    /// Another guest's kernel, initramfs and command line in place of the
    /// kit's (a distribution's own); `extra_cmdline` is still added.
    pub kernel_override: Option<(PathBuf, PathBuf, String)>,
    /// `--uuid`: the SMBIOS system UUID.
    pub uuid: Option<String>,
    /// `--cpu-features`: CPU feature edits such as `-x2apic,-avx2`.
    pub cpu_features: Option<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            image: KernelImage::BzImage,
            cpus: 1,
            memory: "512M".to_string(),
            extra_cmdline: Vec::new(),
            run: None,
            debug_exit: false,
            disks: Vec::new(),
            nets: Vec::new(),
            console: Console::Serial,
            rng: false,
            vsock: None,
            runtime_dir: None,
            extra_args: Vec::new(),
            kernel_override: None,
            uuid: None,
            cpu_features: None,
        }
    }
}

fn env_path(name: &'static str) -> Result<PathBuf, HarnessError> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or(HarnessError::MissingEnv(name))
}

/// How long one guest may take for anything, unless the lab says otherwise.
pub fn timeout() -> Duration {
    let secs = std::env::var("FERROVISOR_LAB_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// The flags that jail a `ferrovisor run`: every lab guest runs jailed, as
/// the daemon runs its guests.
pub fn jail_args() -> [String; 2] {
    let dir = std::env::temp_dir().join("ferrovisor-jail");
    ["--jail".to_string(), dir.display().to_string()]
}

/// The jailed VMM: the child of the process `run` started as `pid` (which
/// waits for it), once it exists; `pid` itself if it has none.
pub fn vmm_pid(pid: u32) -> u32 {
    let parent = format!("PPid:\t{pid}\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let found = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let child: u32 = e.file_name().to_string_lossy().parse().ok()?;
                let status = std::fs::read_to_string(e.path().join("status")).ok()?;
                status.contains(&parent).then_some(child)
            });
        if let Some(child) = found {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    pid
}

/// Standard base64, for the kit's `ferrovisor.run64=` word.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl GuestConfig {
    /// The full kernel command line for this guest.
    pub fn cmdline(&self) -> String {
        let mut cmdline = match &self.kernel_override {
            Some((_, _, cmdline)) => cmdline.clone(),
            None => std::env::var("FERROVISOR_CMDLINE").unwrap_or_else(|_| FALLBACK_CMDLINE.into()),
        };
        if self.console == Console::Virtio {
            cmdline = cmdline.replace("console=ttyS0", "console=hvc0");
        }
        for word in &self.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        if let Some(run) = &self.run {
            cmdline.push_str(" ferrovisor.run64=");
            cmdline.push_str(&base64(run.as_bytes()));
        }
        if self.debug_exit {
            cmdline.push_str(" ferrovisor.exit=debug");
        }
        cmdline
    }

    fn command(&self) -> Result<Command, HarnessError> {
        let (kernel, initramfs) = match (&self.kernel_override, self.image) {
            (Some((kernel, initramfs, _)), _) => (kernel.clone(), initramfs.clone()),
            (None, KernelImage::BzImage) => (
                env_path("FERROVISOR_KERNEL")?,
                env_path("FERROVISOR_INITRAMFS")?,
            ),
            (None, KernelImage::Pvh) => (
                env_path("FERROVISOR_VMLINUX")?,
                env_path("FERROVISOR_INITRAMFS")?,
            ),
        };
        let mut cmd = Command::new(env_path("FERROVISOR_BIN")?);
        cmd.arg("run")
            .args(jail_args())
            .arg("--kernel")
            .arg(kernel)
            .arg("--initramfs")
            .arg(initramfs)
            .arg("--cmdline")
            .arg(self.cmdline())
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory")
            .arg(&self.memory);
        cmd.args(self.device_args());
        Ok(cmd)
    }

    /// The VMM's device flags for this guest.
    pub fn device_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for disk in &self.disks {
            let mut value = format!("path={}", disk.path.display());
            if disk.readonly {
                value.push_str(",readonly=on");
            }
            args.extend(["--disk".to_string(), value]);
        }
        for net in &self.nets {
            let mut value = format!("tap={}", net.tap);
            if let Some(mac) = &net.mac {
                value.push_str(&format!(",mac={mac}"));
            }
            args.extend(["--net".to_string(), value]);
        }
        if self.console == Console::Virtio {
            args.extend(["--console".to_string(), "virtio".to_string()]);
        }
        if self.rng {
            args.push("--rng".to_string());
        }
        if let Some(dir) = &self.runtime_dir {
            args.extend(["--runtime-dir".to_string(), dir.display().to_string()]);
        }
        args.extend(self.extra_args.iter().cloned());
        if let Some(uuid) = &self.uuid {
            args.extend(["--uuid".to_string(), uuid.clone()]);
        }
        if let Some(features) = &self.cpu_features {
            args.extend(["--cpu-features".to_string(), features.clone()]);
        }
        if let Some(vsock) = &self.vsock {
            args.extend([
                "--vsock".to_string(),
                format!("cid={},socket={}", vsock.cid, vsock.socket.display()),
            ]);
        }
        args
    }
}

#[derive(Debug, Default)]
struct Output {
    text: String,
    closed: bool,
}

type Shared = Arc<(Mutex<Output>, Condvar)>;

/// A running guest.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Shared,
    stderr: Shared,
    started: Instant,
    deadline: Duration,
}

/// How a guest ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// The serial console, carriage returns removed.
    pub console: String,
    /// The VMM's own messages.
    pub stderr: String,
}

impl Exit {
    /// The status the guest kit's /init printed for its command, if any.
    pub fn reported_status(&self) -> Option<i32> {
        self.console.lines().find_map(|l| {
            let at = l.find(STATUS_PREFIX)?;
            l[at + STATUS_PREFIX.len()..].trim().parse().ok()
        })
    }

    /// The lines the command printed: those between the init marker and the
    /// status line, without the kit's own lines and kernel messages.
    pub fn command_output(&self) -> Vec<&str> {
        self.console
            .lines()
            .skip_while(|l| !l.contains(INIT_MARKER))
            .skip(1)
            .take_while(|l| !l.contains(STATUS_PREFIX))
            .filter(|l| !l.starts_with('[') && !l.starts_with("ferrovisor-guest:"))
            .collect()
    }
}

fn pump(mut from: impl Read + Send + 'static) -> Shared {
    let shared: Shared = Arc::new((Mutex::new(Output::default()), Condvar::new()));
    let writer = shared.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let (lock, cond) = &*writer;
            let mut console = lock.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                console.closed = true;
                cond.notify_all();
                return;
            }
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            console.text.push_str(&text);
            cond.notify_all();
        }
    });
    shared
}

fn snapshot(shared: &Shared) -> String {
    let console = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    console.text.clone()
}

impl Guest {
    /// The VMM's process id.
    /// The VMM process (jailed: the child of the process started).
    pub fn pid(&self) -> u32 {
        vmm_pid(self.child.id())
    }

    /// Starts the VMM with `config`.
    pub fn start(config: &GuestConfig) -> Result<Guest, HarnessError> {
        let mut child = config
            .command()?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(HarnessError::Spawn)?;
        let stdout = pump(child.stdout.take().ok_or_else(no_pipe)?);
        let stderr = pump(child.stderr.take().ok_or_else(no_pipe)?);
        Ok(Guest {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            started: Instant::now(),
            deadline: timeout(),
        })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_sub(self.started.elapsed())
    }

    fn timeout_error(&mut self, what: &str) -> HarnessError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        HarnessError::Timeout {
            what: what.to_string(),
            secs: self.deadline.as_secs(),
            console: tail(&snapshot(&self.stdout), 40),
        }
    }

    /// Waits until the console shows `needle` (or the VMM's output ends).
    pub fn wait_for(&mut self, needle: &str) -> Result<(), HarnessError> {
        let found = {
            let (lock, cond) = &*self.stdout;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (guard, _) = cond
                .wait_timeout_while(guard, self.remaining(), |c| {
                    !c.text.contains(needle) && !c.closed
                })
                .unwrap_or_else(|e| e.into_inner());
            guard.text.contains(needle)
        };
        let what = format!("{needle:?} on the console");
        if found {
            Ok(())
        } else if self.remaining().is_zero() {
            Err(self.timeout_error(&what))
        } else {
            // The output closed: the VMM has ended or is ending.
            let status = match self.child.wait() {
                Ok(status) => status.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            Err(HarnessError::Ended {
                what,
                status,
                console: tail(&snapshot(&self.stdout), 40),
                stderr: tail(&snapshot(&self.stderr), 10),
            })
        }
    }

    /// Types `text` on the guest's serial console.
    pub fn send(&mut self, text: &str) -> Result<(), HarnessError> {
        let stdin = self.stdin.as_mut().ok_or_else(no_pipe)?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(HarnessError::Input)
    }

    /// The console so far.
    pub fn console(&self) -> String {
        snapshot(&self.stdout)
    }

    /// Whether the VMM is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the VMM at once (SIGKILL) and returns how it ended.
    pub fn kill(mut self) -> Result<Exit, HarnessError> {
        self.child.kill().map_err(HarnessError::Wait)?;
        self.wait_exit()
    }

    /// Waits for the VMM to exit; kills it at the deadline.
    pub fn wait_exit(mut self) -> Result<Exit, HarnessError> {
        loop {
            if let Some(status) = self.child.try_wait().map_err(HarnessError::Wait)? {
                // Let the readers drain what the VMM wrote before exiting.
                for shared in [&self.stdout, &self.stderr] {
                    let (lock, cond) = &**shared;
                    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = cond.wait_timeout_while(guard, Duration::from_secs(5), |c| !c.closed);
                }
                return Ok(Exit {
                    status,
                    console: snapshot(&self.stdout),
                    stderr: snapshot(&self.stderr),
                });
            }
            if self.remaining().is_zero() {
                return Err(self.timeout_error("the VMM to exit"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn no_pipe() -> HarnessError {
    HarnessError::Spawn(std::io::Error::other(
        "the VMM's standard streams are not piped",
    ))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots a guest that runs `config.run` and returns how it ended.
pub fn run_guest(config: &GuestConfig) -> Result<Exit, HarnessError> {
    Guest::start(config)?.wait_exit()
}

/// Polls `path` until it contains `needle`, while `guest` runs; returns
/// its text.
pub fn wait_in_file(guest: &mut Guest, path: &Path, needle: &str) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if !guest.is_running() || start.elapsed() > timeout() {
            return Err(format!(
                "no {needle:?} in {} (VMM running: {}, waited {} s); it holds:\n{}",
                path.display(),
                guest.is_running(),
                start.elapsed().as_secs(),
                tail(&text, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one request line on the control socket of the VMM serving the
/// runtime directory `dir`; returns the reply line.
pub fn control(dir: &Path, request: &str) -> Result<String, String> {
    let path = dir.join("control.sock");
    let mut stream =
        UnixStream::connect(&path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    writeln!(stream, "{request}").map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("read the reply: {e}"))?;
    Ok(reply.trim_end().to_string())
}
