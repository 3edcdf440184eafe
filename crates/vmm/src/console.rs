//! The host side of the console: where guest output goes, stdin in raw
//! mode, and the thread that feeds it to the guest.
//!
//! Guest console devices (the UART, virtio-console) write through
//! [`output`]. That is stdout, unless a supervisor's runtime directory
//! redirected it ([`redirect_output`]), in which case stdout is not written.
//!
//! When stdin is a terminal, it is put in raw mode so that every key reaches
//! the guest, and restored on every way out: normal return, error, signal, and
//! panic (see [`restore_terminal`]). Ctrl-A then x stops the VMM, as in QEMU;
//! Ctrl-A Ctrl-A sends one Ctrl-A.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use crate::control::Control;
use crate::exit::VmExit;

const CTRL_A: u8 = 0x01;

static SAVED_TERMIOS: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();

/// Where console output goes instead of stdout.
pub type OutputSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

static REDIRECT: RwLock<Option<OutputSink>> = RwLock::new(None);

/// Sends all guest console output to `sink` instead of stdout from now on.
pub fn redirect_output(sink: OutputSink) {
    *REDIRECT.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
}

/// Ends a redirection: console output goes to stdout again.
pub fn clear_redirect() {
    *REDIRECT.write().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The writer a guest console device writes to: stdout, or the redirect.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsoleOutput;

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let sink = REDIRECT.read().unwrap_or_else(|p| p.into_inner()).clone();
        match sink {
            Some(sink) => {
                sink(buf);
                Ok(buf.len())
            }
            None => std::io::stdout().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let redirected = REDIRECT.read().unwrap_or_else(|p| p.into_inner()).is_some();
        if redirected {
            Ok(())
        } else {
            std::io::stdout().flush()
        }
    }
}

/// A writer for a guest console device's output.
pub fn output() -> Box<dyn Write + Send> {
    Box::new(ConsoleOutput)
}

fn saved() -> &'static Mutex<Option<libc::termios>> {
    SAVED_TERMIOS.get_or_init(|| Mutex::new(None))
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts the terminal on stdin into raw mode, remembering how it was.
pub fn enter_raw_mode() -> std::io::Result<()> {
    // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is a valid, writable termios.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut termios) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    *saved().lock().unwrap_or_else(|p| p.into_inner()) = Some(termios);
    let _ = FIRST_TERMIOS.set(termios);
    let mut raw = termios;
    // SAFETY: `raw` is a valid termios.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: `raw` is a valid termios derived from the current one.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Restores the terminal to how [`enter_raw_mode`] found it. Safe to call
/// more than once, and from a panic hook.
pub fn restore_terminal() {
    let termios = saved().lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(termios) = termios {
        // SAFETY: `termios` was read from this terminal by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios) };
    }
}

/// The terminal's mode before the first [`enter_raw_mode`], readable
/// without a lock.
static FIRST_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Restores the terminal from a signal handler: no lock, no allocation;
/// tcsetattr is async-signal-safe.
pub fn restore_terminal_from_signal_handler() {
    if let Some(termios) = FIRST_TERMIOS.get() {
        // SAFETY: `termios` was read from this terminal by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, termios) };
    }
}

/// Restores the terminal when dropped.
#[derive(Debug)]
pub struct RawModeGuard;

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Splits console input into bytes for the guest and an escape request.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_ctrl_a: bool,
}

impl EscapeFilter {
    /// Filters `input`; returns the bytes for the guest, and whether the user
    /// asked to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending_ctrl_a {
                self.pending_ctrl_a = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    CTRL_A => out.push(CTRL_A),
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.pending_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Where console input goes: returns how many bytes it took (0 when full).
pub type InputSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// Spawns the thread that reads stdin and feeds the guest. It ends at EOF.
pub fn spawn_stdin_reader(mut sink: InputSink, control: Arc<Control>, escapes: bool) {
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Console);
            let mut stdin = std::io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let (bytes, quit) = if escapes {
                    filter.filter(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                let mut rest = &bytes[..];
                while !rest.is_empty() && !control.is_stopping() {
                    let taken = sink(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                if quit {
                    control.request_exit(VmExit::Stopped("the console escape Ctrl-A x".into()));
                    return;
                }
            }
        });
    // Without a reader thread the guest simply gets no input; that is no
    // reason to stop the VM.
    drop(spawned);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_input_passes_through() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls -l\r"), (b"ls -l\r".to_vec(), false));
    }

    #[test]
    fn ctrl_a_x_quits_even_across_reads() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ab\x01"), (b"ab".to_vec(), false));
        assert_eq!(f.filter(b"x"), (vec![], true));
    }

    #[test]
    fn double_ctrl_a_sends_one() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"\x01\x01c\x01d"), (b"\x01c\x01d".to_vec(), false));
    }
}
