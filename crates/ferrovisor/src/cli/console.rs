//! `ferrovisor console NAME`: the guest's console on this terminal, raw,
//! until Ctrl-] detaches (the guest keeps running). `--log` prints the
//! console log instead.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use super::{CliError, Words};

/// The byte that detaches: Ctrl-].
const DETACH: u8 = 0x1d;

/// The terminal's settings before raw mode, restored on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode if it is a terminal.
    fn enter(fd: i32) -> Result<Option<RawMode>, CliError> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; all-zero is a valid value to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `saved`, which lives across the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(CliError::Terminal(std::io::Error::last_os_error()));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads `raw`, which lives across the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(CliError::Terminal(std::io::Error::last_os_error()));
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Runs `ferrovisor console`.
pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket", "tail"], &["log"])?;
    let name = words.guest_name()?;
    let client = words.client();
    if words.switch("log") {
        let tail = match words.flag("tail") {
            Some(t) => Some(
                t.parse()
                    .map_err(|_| CliError::Usage(format!("--tail: '{t}' is not a byte count")))?,
            ),
            None => None,
        };
        let log = client.console_log(name, tail)?;
        let mut out = std::io::stdout();
        let _ = out.write_all(&log).and_then(|()| out.flush());
        return Ok(ExitCode::SUCCESS);
    }
    let (mut from_guest, mut to_guest) = client.attach(name)?;
    let stdin = std::io::stdin();
    let raw = RawMode::enter(stdin.as_raw_fd())?;
    if raw.is_some() {
        eprint!("[attached to {name}; Ctrl-] detaches]\r\n");
    }
    let closer = to_guest.try_clone().map_err(CliError::Terminal)?;
    // Keyboard to guest, until Ctrl-] or end of input.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (chunk, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
                Some(at) => (&buf[..at], true),
                None => (&buf[..n], false),
            };
            if to_guest.write_all(chunk).is_err() || detach {
                break;
            }
        }
        let _ = closer.shutdown(std::net::Shutdown::Both);
    });
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    drop(raw);
    eprintln!("\n[detached from {name}]");
    Ok(ExitCode::SUCCESS)
}
