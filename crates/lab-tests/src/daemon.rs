//! A control daemon in the lab, for the tests that drive guests through
//! its CLI: started in a fresh directory, with the kit's kernel and
//! initramfs directories as its image roots, and killed (with its guests)
//! when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::retry::Try;
use crate::{tail, timeout};

/// A path the lab gives in environment variable `name`.
pub fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run this test with `cargo xtask test`"))
}

/// `--images` flags for the directories of the kit's kernel and initramfs:
/// the daemon takes guest files only from its image roots.
fn image_roots() -> Vec<PathBuf> {
    let mut flags = Vec::new();
    for var in ["FERROVISOR_KERNEL", "FERROVISOR_INITRAMFS"] {
        let file = env_path(var);
        let dir = file.parent().expect("a file in a directory").to_path_buf();
        flags.push(PathBuf::from("--images"));
        flags.push(dir);
    }
    flags
}

/// A daemon in a fresh directory, killed (with `guests`) on drop.
#[derive(Debug)]
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Child,
    /// The guests shown when a step fails and killed at the end.
    guests: Vec<String>,
}

impl Daemon {
    /// Starts a daemon in `./PREFIX-PID/` and waits until it answers.
    pub fn start(prefix: &str, guests: &[&str]) -> Daemon {
        let dir = std::env::current_dir()
            .expect("cwd")
            .join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
        let child = Command::new(env_path("FERROVISOR_BIN"))
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(image_roots())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        let guests = guests.iter().map(|g| g.to_string()).collect();
        let daemon = Daemon {
            dir,
            socket,
            child,
            guests,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.cli(&["list"]).status.success() {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    /// The CLI with this daemon's socket.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env_path("FERROVISOR_BIN"));
        command.args(args).arg("--socket").arg(&self.socket);
        command
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    }

    /// The CLI's stdout; its failure fails the test.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "ferrovisor {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.describe()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn console(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.cli(&["console", name, "--log"]).stdout).into_owned()
    }

    /// Waits until `name`'s console log contains `needle`.
    pub fn wait_console(&self, name: &str, needle: &str) {
        let deadline = Instant::now() + timeout();
        while !self.console(name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{name} never printed {needle:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The daemon's own output (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The state `info --json` gives for `name` (empty if it cannot say).
    pub fn state(&self, name: &str) -> String {
        let out = self.cli(&["info", name, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Waits until `name`'s console contains `needle`, for a scenario run
    /// through [`crate::retry::retried`]: a guest of this daemon that
    /// crashed, or one that never reached `/init` by the timeout, is the
    /// lab's instability ([`Try::Unstable`]); a timeout with every guest
    /// booted is the test's own failure.
    pub fn try_wait_console(&self, name: &str, needle: &str) -> Result<(), Try> {
        let deadline = Instant::now() + timeout();
        loop {
            if self.console(name).contains(needle) {
                return Ok(());
            }
            let crashed: Vec<&String> = self
                .guests
                .iter()
                .filter(|g| self.state(g) == "crashed")
                .collect();
            if !crashed.is_empty() {
                return Err(Try::Unstable(format!("{crashed:?} crashed")));
            }
            if Instant::now() > deadline {
                let booted = self
                    .guests
                    .iter()
                    .all(|g| self.console(g).contains(crate::INIT_MARKER));
                let why = format!("{name} never printed {needle:?}\n{}", self.describe());
                return Err(if booted {
                    Try::Failed(why)
                } else {
                    Try::Unstable(why)
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `ferrovisor up FILE`; a refusal fails the try, with what it said.
    pub fn try_up(&self, file: &std::path::Path) -> Result<(), Try> {
        let up = self.cli(&["up", &file.to_string_lossy()]);
        if up.status.success() {
            return Ok(());
        }
        Err(Try::Failed(format!(
            "up: {}\n{}",
            String::from_utf8_lossy(&up.stderr),
            self.describe()
        )))
    }

    /// Everything worth seeing when a step fails.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for name in &self.guests {
            text.push_str(&format!(
                "--- {name} console (tail) ---\n{}\n--- {name} info ---\n{}\n",
                tail(&self.console(name), 30),
                String::from_utf8_lossy(&self.cli(&["info", name]).stdout)
            ));
        }
        text.push_str(&format!("--- daemon log ---\n{}", tail(&self.log(), 20)));
        text
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for name in &self.guests {
            let _ = self.cli(&["kill", name]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Switches outlive the daemon by design; the test's end is theirs.
        let switches = self.dir.join("state/switches");
        for entry in std::fs::read_dir(switches).into_iter().flatten().flatten() {
            if let Ok(mut control) =
                std::os::unix::net::UnixStream::connect(entry.path().join("control.sock"))
            {
                use std::io::Write;
                let _ = writeln!(control, "{{\"op\":\"shutdown\"}}");
                let mut reply = String::new();
                let _ = std::io::Read::read_to_string(&mut control, &mut reply);
            }
        }
    }
}
