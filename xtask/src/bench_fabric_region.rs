//! The shared-region part of `cargo xtask bench fabric --guests`: two
//! guest-kit guests under the daemon, members of one `[regions.bench]`
//! (1 MiB), side by side in the lab. The kit's `region` tool measures
//! doorbell round trips (`ping`/`pong`: each side sleeps in `poll` on its
//! UIO device until the other's doorbell arrives) and messages of 64 B and
//! 64 KiB through a ring in the region (`send`/`recv`, both sides spinning
//! while the ring is full or empty).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{self, Metric};
use crate::bench_fabric_guests::Running;
use crate::guestkit;
use crate::lab::{LAB_FERROVISOR, LAB_INITRAMFS, LAB_KERNEL};
use crate::util::{Context, Result};

const ROUND_TRIPS: u32 = 1000;
const SMALL: (u32, u32) = (20_000, 64);
const LARGE: (u32, u32) = (2_000, 65_536);
const PAIR_LIMIT: Duration = Duration::from_secs(420);
const STATUS: &str = "ferrovisor-guest: exit status ";

/// What one pair measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// None for QEMU's pairs (see [`measure_qemu`]).
    rt_p50_us: Option<f64>,
    rt_p99_us: Option<f64>,
    small_per_s: f64,
    small_mib_s: f64,
    large_per_s: f64,
    large_mib_s: f64,
}

/// What guests `a` (peer 0, answering) and `b` (peer 1, asking) run:
/// doorbell round trips when `doorbells`, then messages through the ring.
fn commands(doorbells: bool) -> (String, String) {
    let (sn, ss) = SMALL;
    let (ln, ls) = LARGE;
    let (pong, ping) = if doorbells {
        (
            format!("region pong 1 {ROUND_TRIPS} && "),
            format!("region ping 0 {ROUND_TRIPS} && "),
        )
    } else {
        (String::new(), String::new())
    };
    (
        format!("{pong}region recv {sn} {ss} && region recv {ln} {ls}"),
        format!("{ping}region send {sn} {ss} && region send {ln} {ls}"),
    )
}

fn system_file() -> String {
    let guest = |name: &str, run: &str| {
        format!(
            "[guests.{name}]\nkernel = \"{LAB_KERNEL}\"\ninitramfs = \"{LAB_INITRAMFS}\"\n\
             cmdline = \"{}\"\ncpus = 1\nmemory = \"256M\"\n\n",
            guestkit::cmdline_running(run)
        )
    };
    let (a, b) = commands(true);
    format!(
        "[regions.bench]\nsize = \"1M\"\nguests = {{ a = \"rw\", b = \"rw\" }}\n\n{}{}",
        guest("a", &a),
        guest("b", &b),
    )
}

/// The same pair under QEMU `-M pc`: `ivshmem-doorbell` on a 1 MiB region
/// that this benchmark's ivshmem server holds; messages through the ring
/// only. QEMU's ivshmem-doorbell raises a doorbell only through MSI-X,
/// which the guests' tool, in user space through `uio_pci_generic`, cannot
/// take (Ferrovisor's device raises INTx while MSI-X is off, as QEMU's
/// older `ivshmem` did), so QEMU has no doorbell figure.
pub fn measure_qemu(try_number: u32) -> Result<Sample> {
    let path = format!("/tmp/bench-ivshmem-{try_number}.sock");
    let server = crate::ivshmem_server::IvshmemServer::start(Path::new(&path), 1 << 20, 1)?;
    let qemu = |run: &str| {
        let mut cmd = crate::bench_blk::qemu_pc_kit(&guestkit::cmdline_running(run), "256M");
        cmd.args(["-chardev", &format!("socket,path={path},id=ivs")])
            .args(["-device", "ivshmem-doorbell,chardev=ivs,vectors=1"]);
        cmd
    };
    let (a_run, b_run) = commands(false);
    let mut a = Running::start("guest a", qemu(&a_run))?;
    // Peer ids follow the order of connection: a is 0.
    let start = Instant::now();
    while server.peers() < 1 {
        if start.elapsed() > Duration::from_secs(30) || a.ended().is_some() {
            return Err(fail!(
                "QEMU's guest a never reached the ivshmem server: {}",
                tail(&a.console())
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut b = Running::start("guest b", qemu(&b_run))?;
    loop {
        let (ca, cb) = (a.console(), b.console());
        if ca.contains(STATUS) && cb.contains(STATUS) {
            let text = format!("{ca}\n{cb}");
            return parse(&text)
                .ok_or_else(|| fail!("no figures; a ends: {}; b ends: {}", tail(&ca), tail(&cb)));
        }
        let early = (a.ended().is_some() && !ca.contains(STATUS))
            || (b.ended().is_some() && !cb.contains(STATUS));
        if early || start.elapsed() > PAIR_LIMIT {
            return Err(fail!(
                "QEMU's pair ended early or took over {} s; a ends: {}; b ends: {}",
                PAIR_LIMIT.as_secs(),
                tail(&ca),
                tail(&cb)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CLI against the bench's daemon.
fn cli(dir: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(LAB_FERROVISOR)
        .args(args)
        .args(["--socket", &format!("{dir}/api.sock")])
        .stdin(Stdio::null())
        .output()
        .ctx(|| "run the CLI".to_string())?;
    if !out.status.success() {
        return Err(fail!(
            "ferrovisor {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A daemon for one try, killed (with its guests) on drop.
struct Daemon {
    dir: String,
    child: std::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for name in ["a", "b"] {
            let _ = cli(&self.dir, &["kill", name]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a fresh daemon in `dir`, brings `system` up and waits until
/// guest `a` has ended its command, and `b` too if `wait_b`; returns their
/// consoles.
fn run_pair(dir: &str, system: &str, wait_b: bool) -> Result<(String, String)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).ctx(|| dir.to_string())?;
    let child = Command::new(LAB_FERROVISOR)
        .args(["daemon", "--socket", &format!("{dir}/api.sock")])
        .args([
            "--state-dir",
            &format!("{dir}/state"),
            "--images",
            "/lab/guest",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ctx(|| "start the daemon".to_string())?;
    let daemon = Daemon {
        dir: dir.to_string(),
        child,
    };
    let start = Instant::now();
    while cli(&daemon.dir, &["list"]).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(fail!("the daemon did not come up"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = format!("{}/system.toml", daemon.dir);
    std::fs::write(&file, system).ctx(|| file.clone())?;
    cli(&daemon.dir, &["up", &file])?;
    let start = Instant::now();
    loop {
        let a = cli(&daemon.dir, &["console", "a", "--log"]).unwrap_or_default();
        let b = cli(&daemon.dir, &["console", "b", "--log"]).unwrap_or_default();
        if a.contains(STATUS) && (b.contains(STATUS) || !wait_b) {
            return Ok((a, b));
        }
        if start.elapsed() > PAIR_LIMIT {
            return Err(fail!(
                "no end within {} s; a ends: {}; b ends: {}",
                PAIR_LIMIT.as_secs(),
                tail(&a),
                tail(&b)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One pair sharing the region, in a fresh daemon.
pub fn measure(try_number: u32) -> Result<Sample> {
    let (a, b) = run_pair(
        &format!("/tmp/bench-region-{try_number}"),
        &system_file(),
        true,
    )?;
    let text = format!("{a}\n{b}");
    parse(&text).ok_or_else(|| fail!("no figures; a ends: {}; b ends: {}", tail(&a), tail(&b)))
}

/// Guest-to-guest vsock: `b` serves `netbench` on vsock port 5092, `a`
/// (allowed by the policy) streams for `secs` and makes 2,000 round trips
/// of 64 B; returns `a`'s console.
pub fn vsock_pair(secs: u64) -> Result<String> {
    let dir = "/tmp/bench-vsock";
    let guest = |name: &str, cid: u32, run: &str| {
        format!(
            "[guests.{name}]\nkernel = \"{LAB_KERNEL}\"\ninitramfs = \"{LAB_INITRAMFS}\"\n\
             cmdline = \"{}\"\ncpus = 1\nmemory = \"256M\"\n\
             vsock = {{ cid = {cid}, socket = \"{dir}/state/guests/{name}/run/v.sock\" }}\n\n",
            guestkit::cmdline_running(run)
        )
    };
    let system = format!(
        "{}{}[[vsock_allow]]\nfrom = \"a\"\nto = \"b\"\nport = 5092\n",
        guest(
            "a",
            3,
            &format!("netbench stream vsock:4 5092 {secs} && netbench rr vsock:4 5092 2000 64")
        ),
        // The server serves until the daemon stops it.
        guest("b", 4, "netbench serve-vsock 5092"),
    );
    let (a, _) = run_pair(dir, &system, false)?;
    Ok(a)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Reads the `region:` figure lines of both consoles.
fn parse(text: &str) -> Option<Sample> {
    let number_after = |line: &str, key: &str| -> Option<f64> {
        let at = line.find(key)? + key.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let ping = text.lines().find(|l| l.contains("doorbell round trips"));
    let received = |size: u32| {
        let key = format!("messages of {size} B in");
        let line = text.lines().find(|l| l.contains(&key))?;
        let per_s = number_after(line, "s: ")?;
        let mib = number_after(line, "messages/s, ")?;
        Some((per_s, mib))
    };
    let (small_per_s, small_mib_s) = received(SMALL.1)?;
    let (large_per_s, large_mib_s) = received(LARGE.1)?;
    Some(Sample {
        rt_p50_us: ping.and_then(|l| number_after(l, "p50 ")),
        rt_p99_us: ping.and_then(|l| number_after(l, "p99 ")),
        small_per_s,
        small_mib_s,
        large_per_s,
        large_mib_s,
    })
}

const METRICS: [Metric<Sample>; 6] = [
    ("doorbell round trip, p50, us", |s| s.rt_p50_us),
    ("doorbell round trip, p99, us", |s| s.rt_p99_us),
    ("64 B messages through the ring, per s", |s| {
        Some(s.small_per_s)
    }),
    ("64 B messages, MiB/s", |s| Some(s.small_mib_s)),
    ("64 KiB messages through the ring, per s", |s| {
        Some(s.large_per_s)
    }),
    ("64 KiB messages, MiB/s", |s| Some(s.large_mib_s)),
];

/// Prints the region table: QEMU's pairs, then Ferrovisor's.
pub fn print_table(qemu: &[Sample], ferrovisor: &[Sample]) {
    println!();
    println!(
        "fabric benchmark, shared region: two guest-kit guests, one 1 MiB region (Ferrovisor's \
         under the daemon; QEMU's ivshmem-doorbell on an ivshmem server); {ROUND_TRIPS} doorbell \
         round trips (INTx through uio_pci_generic; QEMU's device raises doorbells only through \
         MSI-X, which the guests' tool cannot take, so it has none), then {} x {} B and {} x {} B \
         through a ring in the region; medians",
        SMALL.0, SMALL.1, LARGE.0, LARGE.1
    );
    bench::print_medians(
        40,
        &[
            ("qemu ivshmem-doorbell", qemu),
            ("ferrovisor region", ferrovisor),
        ],
        &METRICS,
    );
    println!("(xN) = that column's figure divided by QEMU's.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_are_read_from_both_consoles() {
        let text = "region: ping 1000 doorbell round trips: p50 812 us, p99 2040 us\n\
            region: received 20000 messages of 64 B in 0.210 s: 95238 messages/s, 5.8 MiB/s\n\
            region: received 2000 messages of 65536 B in 1.000 s: 2000 messages/s, 125.0 MiB/s\n";
        let s = parse(text).expect("figures");
        assert_eq!((s.rt_p50_us, s.rt_p99_us), (Some(812.0), Some(2040.0)));
        assert_eq!((s.small_per_s, s.small_mib_s), (95238.0, 5.8));
        assert_eq!((s.large_per_s, s.large_mib_s), (2000.0, 125.0));
        assert!(parse("region: ping 1 doorbell round trips: p50 1 us, p99 1 us\n").is_none());
        let rings_only = text.lines().skip(1).collect::<Vec<_>>().join("\n");
        let q = parse(&rings_only).expect("ring figures without a doorbell line");
        assert_eq!((q.rt_p50_us, q.small_per_s), (None, 95238.0));
        let system = system_file();
        assert!(system
            .starts_with("[regions.bench]\nsize = \"1M\"\nguests = { a = \"rw\", b = \"rw\" }"));
        assert_eq!(system.matches("[guests.").count(), 2);
    }
}
