//! Harness for the control-plane tests: a real `ferrovisor daemon` in a
//! fresh state directory, API calls checked against openapi.json, and a
//! tiny guest (prints "ready", then echoes its serial input forever).

#![allow(dead_code)]

pub mod openapi;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use daemon::http;
use serde_json::{json, Value};

use crate::common::{multiboot_kernel, write_temp, Asm};

/// How long any wait in these tests may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The echo guest's kernel: prints "ready\n", then copies each byte it
/// reads from COM1 back to COM1, forever. It ignores Ctrl-Alt-Del.
pub fn echo_kernel() -> PathBuf {
    let code = Asm::default()
        .print("ready\n")
        .label("wait")
        .mov_dx(0x3fd)
        .in_al_dx()
        .bytes(&[0xa8, 0x01]) // test al, 1 (data ready)
        .jump(0x74, "wait")
        .mov_dx(0x3f8)
        .in_al_dx()
        .out_dx_al()
        .jump(0xeb, "wait")
        .finish();
    write_temp("echo.elf", &multiboot_kernel(0x10_0000, &[], &code, 0))
}

/// A guest description for the echo guest.
pub fn echo_description() -> String {
    format!(
        "kernel = \"{}\"\nmemory = \"32M\"\ncpus = 1\n",
        echo_kernel().display()
    )
}

/// A daemon under test.
pub struct TestDaemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Flags given to the daemon besides its socket and state directory.
    pub flags: Vec<String>,
    child: Option<Child>,
    /// Environment variables the daemon (and so its VMMs) gets.
    env: Vec<(String, String)>,
}

impl TestDaemon {
    /// Starts a daemon in a new, empty directory (short, for socket paths).
    pub fn start() -> TestDaemon {
        Self::start_full(&[], &[])
    }

    /// [`TestDaemon::start`], with extra environment variables.
    pub fn start_with_env(env: &[(&str, &str)]) -> TestDaemon {
        Self::start_full(&[], env)
    }

    /// [`TestDaemon::start`], with extra daemon flags.
    pub fn start_with(extra: &[&str]) -> TestDaemon {
        Self::start_full(extra, &[])
    }

    /// Starts a daemon with `extra` flags and `env`. Its image roots are
    /// the test directory and the directory of the tests' kernels.
    pub fn start_full(extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/fvd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut flags: Vec<String> = vec![
            "--images".into(),
            env!("CARGO_TARGET_TMPDIR").into(),
            "--images".into(),
            dir.display().to_string(),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = TestDaemon {
            socket: dir.join("api.sock"),
            state_dir: dir.join("state"),
            dir,
            flags,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        daemon.spawn();
        daemon
    }

    /// Starts the daemon process (again) on the same directories.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + LIMIT;
        // The socket may be a stale one from a killed daemon: wait until a
        // request is answered.
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if http::write_request(&mut s, "GET", "/guests", &[], None).is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        reply.starts_with(b"HTTP/1.1 200")
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Kills the daemon process with SIGKILL (its guests live on).
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One API call; the request and the response are checked against
    /// openapi.json. A request the document does not allow (tests send
    /// some on purpose) must be refused: 400, or 404/405 for a path or
    /// method it does not describe.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let request = openapi::check_request(method, path, body.as_ref());
        let client = daemon::Client::new(&self.socket);
        let response = client
            .raw(method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if let Err(e) = openapi::check_response(method, path, response.status, &response.body) {
            panic!("{e}\nbody: {}", String::from_utf8_lossy(&response.body));
        }
        if let Err(e) = request {
            assert!(
                matches!(response.status, 400 | 404 | 405),
                "{method} {path}: a request outside the document ({e}) got {}",
                response.status
            );
        }
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, value)
    }

    /// A call that must succeed with `status`.
    pub fn expect(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let (got, value) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path}: {value}");
        value
    }

    /// Creates the echo guest `name`.
    pub fn create_echo(&self, name: &str, start: bool) -> Value {
        let body = json!({ "name": name, "config": echo_description(), "start": start });
        self.expect("POST", "/guests", Some(body), 201)
    }

    /// The guest's info.
    pub fn info(&self, name: &str) -> Value {
        self.expect("GET", &format!("/guests/{name}"), None, 200)
    }

    /// Waits until guest `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let info = self.info(name);
            if info["state"] == state {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became {state}: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the console log of `name` contains `text`.
    pub fn wait_console(&self, name: &str, text: &str) -> String {
        let client = daemon::Client::new(&self.socket);
        let deadline = Instant::now() + LIMIT;
        loop {
            let log = client.console_log(name, None).expect("console log");
            let log = String::from_utf8_lossy(&log).into_owned();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s console never showed {text:?}: {log:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
        command
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null());
        command.output().expect("run the CLI")
    }

    /// Guest directories on disk (ignoring temporary ones).
    pub fn guest_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir.join("guests"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Sends raw bytes and returns the raw reply.
    pub fn raw_exchange(&self, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        s.write_all(bytes).expect("send");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    }
}

/// Kills every guest process recorded under `state_dir` (test cleanup).
fn kill_guests(state_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(state_dir.join("guests")) else {
        return;
    };
    for dir in dirs.flatten() {
        let Ok(text) = std::fs::read_to_string(dir.path().join("state.json")) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let (Some(pid), Some(ticks)) = (record["pid"].as_i64(), record["start_ticks"].as_u64())
        else {
            continue;
        };
        let identity = daemon::process::Identity {
            pid: pid as i32,
            start_ticks: ticks,
        };
        if daemon::process::is_alive(identity, &dir.path().join("run")) {
            daemon::process::signal(pid as i32, libc::SIGKILL);
        }
    }
}

/// Stops the switch processes of the daemon in `state_dir` (they outlive
/// the daemon by design).
fn shut_down_switches(state_dir: &Path) {
    use std::io::{Read, Write};
    for entry in std::fs::read_dir(state_dir.join("switches"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(mut c) =
            std::os::unix::net::UnixStream::connect(entry.path().join("control.sock"))
        {
            let _ = writeln!(c, "{{\"op\":\"shutdown\"}}");
            let _ = c.read_to_string(&mut String::new());
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill_daemon();
        kill_guests(&self.state_dir);
        shut_down_switches(&self.state_dir);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon log ({}):\n{}", self.dir.display(), self.log());
        }
    }
}
