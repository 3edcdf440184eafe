//! The switch column of `cargo xtask bench fabric --guests`: a
//! `ferrovisor switch-serve` learning bridge with one port per guest, each
//! guest's NIC a vhost-user-net frontend on its port (`--net
//! vhost-user=SOCKET`), so frames go from one guest's memory to the other's
//! inside the switch process, with no tap on the way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::LAB_FERROVISOR;
use crate::util::{Context, Result};

/// Where the bench's switch keeps its sockets.
const DIR: &str = "/tmp/fvbench-switch";

/// A running switch process; shut down on drop.
pub struct Switch {
    child: Child,
    dir: PathBuf,
}

impl Switch {
    /// Starts a learning bridge and waits until it answers.
    pub fn start() -> Result<Switch> {
        let dir = PathBuf::from(DIR);
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(LAB_FERROVISOR)
            .args([
                "switch-serve",
                "--name",
                "bench",
                "--mode",
                "bridge",
                "--dir",
                DIR,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .ctx(|| "cannot start the switch".to_string())?;
        let switch = Switch { child, dir };
        let start = Instant::now();
        while switch.request(r#"{"op":"show"}"#).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(fail!("the switch did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(switch)
    }

    /// One control request and its reply line.
    pub fn request(&self, line: &str) -> Result<String> {
        let path = self.dir.join("control.sock");
        let mut stream =
            UnixStream::connect(&path).ctx(|| format!("cannot reach {}", path.display()))?;
        writeln!(stream, "{line}").ctx(|| "cannot send to the switch".to_string())?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .ctx(|| "no reply from the switch".to_string())?;
        if reply.contains("\"ok\":true") {
            Ok(reply)
        } else {
            Err(fail!("the switch refused {line}: {reply}"))
        }
    }

    /// Adds port `name` for `mac` and returns its socket.
    pub fn add_port(&self, name: &str, mac: &str) -> Result<PathBuf> {
        self.request(&format!(
            r#"{{"op":"add_port","port":"{name}","mac":"{mac}"}}"#
        ))?;
        Ok(self.dir.join(format!("{name}.sock")))
    }

    /// The `--net` option of a VMM on port `socket` with `mac`.
    pub fn net_option(socket: &Path, mac: &str) -> String {
        format!("vhost-user={},mac={mac}", socket.display())
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.request(r#"{"op":"shutdown"}"#);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
