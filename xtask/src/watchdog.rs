//! Supervising a long-running emulator: stream its console, and kill it when it
//! stops making progress (no output and no CPU time used) or runs too long.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{self, Context, Result};

/// How a supervised process is watched.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Kill after this long without output and without CPU progress.
    pub stall: Option<Duration>,
    /// Kill after this long in any case.
    pub deadline: Option<Duration>,
    /// Pass stdin through and forward output unfiltered.
    pub interactive: bool,
    /// Hold console output back until this text appears (firmware noise).
    pub hold_until: Option<&'static str>,
    /// A file the machine appends to every few seconds while its kernel
    /// schedules processes. Once it has grown, it must keep growing: silence
    /// for `stall` means a wedged machine even if QEMU still burns CPU.
    pub heartbeat: Option<std::path::PathBuf>,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It exited on its own, with a code or through a signal.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The watchdog killed it: no output and no CPU progress, or its
    /// heartbeat stopped.
    Stalled(Duration),
    /// The watchdog killed it: the deadline passed.
    TimedOut(Duration),
}

/// What a supervised run produced.
#[derive(Debug)]
pub struct Report {
    pub ending: Ending,
    /// Standard output, with carriage returns removed.
    pub stdout: String,
    pub stderr: String,
    /// Whether the held-back part of the output was ever released.
    pub released: bool,
}

/// Below this much CPU time per sampling window the process counts as idle.
const MIN_PROGRESS: Duration = Duration::from_millis(200);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Removes carriage returns and terminal escape sequences from a byte stream.
#[derive(Debug, Default)]
pub struct Filter {
    state: FilterState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FilterState {
    #[default]
    Text,
    Escape,
    Csi,
}

impl Filter {
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            self.state = match (self.state, b) {
                (FilterState::Text, 0x1b) => FilterState::Escape,
                (FilterState::Text, b'\r') => FilterState::Text,
                (FilterState::Text, _) => {
                    out.push(b);
                    FilterState::Text
                }
                (FilterState::Escape, b'[') => FilterState::Csi,
                (FilterState::Escape, _) => FilterState::Text,
                (FilterState::Csi, 0x40..=0x7e) => FilterState::Text,
                (FilterState::Csi, _) => FilterState::Csi,
            };
        }
        out
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

struct StreamOut {
    captured: Vec<u8>,
    released: bool,
}

/// Copies the child's stdout to ours, capturing it and noting activity.
fn pump_stdout(
    mut from: impl Read + Send + 'static,
    watch: &Watch,
    start: Instant,
    (last_active, stuck_secs): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> JoinHandle<StreamOut> {
    let interactive = watch.interactive;
    let hold_until = watch.hold_until;
    std::thread::spawn(move || {
        let mut filter = Filter::default();
        let mut capture_filter = Filter::default();
        let mut captured = Vec::new();
        let mut released = hold_until.is_none();
        let mut buf = [0u8; 8192];
        let mut out = std::io::stdout();
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            last_active.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            let new_text = capture_filter.feed(&buf[..n]);
            if let Some(secs) = soft_lockup_secs(&String::from_utf8_lossy(&new_text)) {
                stuck_secs.fetch_max(secs, Ordering::Relaxed);
            }
            captured.extend(new_text);
            let shown = if interactive {
                buf[..n].to_vec()
            } else {
                filter.feed(&buf[..n])
            };
            if released {
                let _ = out.write_all(&shown);
            } else if let Some(marker) = hold_until {
                // Release from the start of the line holding the marker.
                let text = String::from_utf8_lossy(&captured);
                if let Some(at) = text.find(marker) {
                    released = true;
                    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let _ = out.write_all(&text.as_bytes()[line_start..]);
                }
            }
            let _ = out.flush();
        }
        StreamOut { captured, released }
    })
}

/// The longest "soft lockup - CPU#N stuck for Ss!" the lab's kernel reports
/// in `text`: one of its CPUs has not scheduled for that long, wedged under
/// a nested guest, while the other CPU keeps the console and heartbeat
/// going.
fn soft_lockup_secs(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.contains("soft lockup"))
        .filter_map(|l| {
            let rest = &l[l.find("stuck for ")? + "stuck for ".len()..];
            rest[..rest.find('s')?].parse().ok()
        })
        .max()
}

/// QEMU's warnings that carry no news (TCG lacks some features of the model).
const QUIET_STDERR: &[&str] = &["TCG doesn't support requested feature"];

/// Copies the child's stderr to ours line by line, capturing it.
fn pump_stderr(
    from: impl Read + Send + 'static,
    start: Instant,
    last_active: Arc<AtomicU64>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut captured = Vec::new();
        let mut reader = std::io::BufReader::new(from);
        let mut line = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            last_active.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            let text = String::from_utf8_lossy(&line);
            if !QUIET_STDERR.iter().any(|q| text.contains(q)) {
                let _ = std::io::stderr().write_all(&line);
            }
            captured.append(&mut line);
        }
        captured
    })
}

/// Runs `cmd` under the watchdog and reports how it ended.
pub fn supervise(mut cmd: Command, watch: &Watch) -> Result<Report> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if watch.interactive {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .ctx(|| format!("cannot start `{}`", util::show(&cmd)))?;
    let last_active = Arc::new(AtomicU64::new(0));
    let stuck_secs = Arc::new(AtomicU64::new(0));
    let stdout = child.stdout.take().ok_or_else(|| fail!("no stdout pipe"))?;
    let stderr = child.stderr.take().ok_or_else(|| fail!("no stderr pipe"))?;
    let out_thread = pump_stdout(
        stdout,
        watch,
        start,
        (last_active.clone(), stuck_secs.clone()),
    );
    let err_thread = pump_stderr(stderr, start, last_active.clone());
    let ending = watch_child(&mut child, watch, start, (&last_active, &stuck_secs))?;
    let out = out_thread
        .join()
        .map_err(|_| fail!("console reader thread failed"))?;
    let err = err_thread.join().unwrap_or_default();
    Ok(Report {
        ending,
        stdout: String::from_utf8_lossy(&out.captured).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        released: out.released,
    })
}

fn watch_child(
    child: &mut Child,
    watch: &Watch,
    start: Instant,
    (last_active, stuck_secs): (&AtomicU64, &AtomicU64),
) -> Result<Ending> {
    use std::os::unix::process::ExitStatusExt;
    let hz = clock_ticks_per_second();
    let min_ticks = (MIN_PROGRESS.as_millis() as u64 * hz).div_ceil(1000);
    let mut sample_at = start;
    let mut sample_ticks = 0;
    let mut beats = 0;
    let mut last_beat: Option<Instant> = None;
    loop {
        if let Some(status) = child
            .try_wait()
            .ctx(|| "cannot wait for QEMU".to_string())?
        {
            return Ok(Ending::Exited {
                code: status.code(),
                signal: status.signal(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        if now.duration_since(sample_at) >= SAMPLE_EVERY {
            let ticks = cpu_ticks(child.id()).unwrap_or(sample_ticks);
            if ticks.saturating_sub(sample_ticks) >= min_ticks {
                last_active.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            sample_ticks = ticks;
            sample_at = now;
        }
        if let Some(file) = &watch.heartbeat {
            let len = std::fs::metadata(file).map_or(0, |m| m.len());
            if len > beats {
                beats = len;
                last_beat = Some(now);
            }
        }
        let silent = last_beat.map(|t| now.duration_since(t));
        let elapsed = start.elapsed();
        let idle =
            elapsed.saturating_sub(Duration::from_millis(last_active.load(Ordering::Relaxed)));
        let stuck = Duration::from_secs(stuck_secs.load(Ordering::Relaxed));
        let ending = match (watch.stall, watch.deadline) {
            (Some(stall), _) if idle >= stall => Some(Ending::Stalled(idle)),
            (Some(stall), _) if stuck >= stall => Some(Ending::Stalled(stuck)),
            (Some(stall), _) if silent.is_some_and(|s| s >= stall) => {
                Some(Ending::Stalled(silent.unwrap_or_default()))
            }
            (_, Some(deadline)) if elapsed >= deadline => Some(Ending::TimedOut(elapsed)),
            _ => None,
        };
        if let Some(ending) = ending {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(ending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_lockup_report_gives_how_long_a_cpu_was_stuck() {
        let text = "[   68.98] watchdog: BUG: soft lockup - CPU#1 stuck for 52s! [vcpu:149]\n\
                    [   96.98] watchdog: BUG: soft lockup - CPU#1 stuck for 78s! [vcpu:149]\n";
        assert_eq!(soft_lockup_secs(text), Some(78));
        assert_eq!(soft_lockup_secs("test a ... ok\n"), None);
    }

    #[test]
    fn filter_strips_escapes_and_carriage_returns() {
        let mut f = Filter::default();
        let out = f.feed(b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\nok\r\n");
        assert_eq!(out, b"SeaBIOS\nok\n");
    }

    #[test]
    fn filter_keeps_state_across_chunks() {
        let mut f = Filter::default();
        let mut out = f.feed(b"a\x1b[");
        out.extend(f.feed(b"12;3Hb"));
        assert_eq!(out, b"ab");
    }

    #[test]
    fn stalled_process_is_killed() {
        let watch = Watch {
            stall: Some(Duration::from_secs(1)),
            deadline: Some(Duration::from_secs(60)),
            interactive: false,
            hold_until: None,
            heartbeat: None,
        };
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let report = supervise(cmd, &watch).expect("supervise");
        assert!(
            matches!(report.ending, Ending::Stalled(_)),
            "{:?}",
            report.ending
        );
    }

    #[test]
    fn busy_process_whose_heartbeat_stops_is_killed() {
        let beat = std::env::temp_dir().join(format!("xtask-beat-{}", std::process::id()));
        let _ = std::fs::remove_file(&beat);
        let watch = Watch {
            stall: Some(Duration::from_secs(1)),
            deadline: Some(Duration::from_secs(60)),
            interactive: false,
            hold_until: None,
            heartbeat: Some(beat.clone()),
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo . > {}; while :; do :; done", beat.display()));
        let report = supervise(cmd, &watch).expect("supervise");
        let _ = std::fs::remove_file(&beat);
        assert!(
            matches!(report.ending, Ending::Stalled(_)),
            "{:?}",
            report.ending
        );
    }

    #[test]
    fn output_is_captured_and_exit_reported() {
        let watch = Watch {
            stall: None,
            deadline: Some(Duration::from_secs(60)),
            interactive: false,
            hold_until: Some("START"),
            heartbeat: None,
        };
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo noise; echo x START y; echo after; exit 3"]);
        let report = supervise(cmd, &watch).expect("supervise");
        assert_eq!(
            report.ending,
            Ending::Exited {
                code: Some(3),
                signal: None
            }
        );
        assert!(report.released);
        assert_eq!(report.stdout, "noise\nx START y\nafter\n");
    }
}
