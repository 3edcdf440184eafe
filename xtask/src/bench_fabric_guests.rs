//! `cargo xtask bench fabric --guests`: TCP between two guest-kit guests,
//! in one lab session, through each way of joining them.
//!
//! Each pair is a server guest running `netbench serve` and a client guest
//! running `netbench stream` (throughput for SECS seconds) and
//! `netbench rr` (request-response round trips of 64 bytes), both with
//! 1 vCPU and 256 MiB, booted side by side. The ways of joining them:
//! - **QEMU on taps and a Linux bridge**: `-M pc` with `virtio-net-pci` on
//!   a tap each, the taps enslaved to one bridge in the lab;
//! - **Ferrovisor on taps and a Linux bridge**: the same, under Ferrovisor;
//! - **Ferrovisor on its switch**: a `switch-serve` learning bridge, each
//!   guest's NIC a vhost-user-net frontend on a port of it
//!   (`bench_fabric_switch.rs`);
//! - **Ferrovisor guest-to-guest vsock** under the daemon.
//!
//! Then the shared region (`bench_fabric_region.rs`): doorbell round trips
//! and messages through a ring, between two guests of one region.
//!
//! Two nested guests at once are less stable in the lab than one
//! (docs/lab.md), so a pair that fails is tried again, up to `--tries`
//! times; every failed try is printed with its reason, and the table says
//! how many tries each column took.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench::{self, Metric};
use crate::bench_blk;
use crate::guestkit;
use crate::util::{self, Context, Result};

const MEMORY: &str = "256M";
/// The Linux bridge that joins the taps of a bridged pair.
const BRIDGE: &str = "fvbench0";
const SERVER_ADDR: &str = "10.0.91.1";
const CLIENT_ADDR: &str = "10.0.91.2";
const PORT: u16 = 5091;
/// Request-response round trips per run.
const ROUND_TRIPS: u32 = 2000;
/// The longest a pair may take, boots included.
const PAIR_LIMIT: Duration = Duration::from_secs(420);

const USAGE: &str = "usage: cargo xtask bench fabric --guests [--runs N] [--secs N] [--tries N] \
                     [--only qemu,bridge,switch,vsock,region]";

/// What `--only` may name.
const PARTS: [&str; 5] = ["qemu", "bridge", "switch", "vsock", "region"];

/// One way of joining the two guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    QemuBridge,
    FerrovisorBridge,
    /// Ferrovisor's own switch, over vhost-user-net.
    FerrovisorSwitch,
    /// Guest-to-guest vsock under the daemon (`netbench` over AF_VSOCK).
    FerrovisorVsock,
}

impl Join {
    const ALL: [Join; 4] = [
        Join::QemuBridge,
        Join::FerrovisorBridge,
        Join::FerrovisorSwitch,
        Join::FerrovisorVsock,
    ];

    /// The name `--only` takes.
    fn short(self) -> &'static str {
        match self {
            Join::QemuBridge => "qemu",
            Join::FerrovisorBridge => "bridge",
            Join::FerrovisorSwitch => "switch",
            Join::FerrovisorVsock => "vsock",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Join::QemuBridge => "qemu, taps + linux bridge",
            Join::FerrovisorBridge => "ferrovisor, taps + linux bridge",
            Join::FerrovisorSwitch => "ferrovisor, its switch (vhost-user)",
            Join::FerrovisorVsock => "ferrovisor, guest-to-guest vsock",
        }
    }
}

/// What one pair measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    stream_mbit_s: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    /// Tries this run took (1 when the first pair succeeded).
    tries: u32,
}

/// `cargo xtask bench fabric --guests ...`: parses the flags and runs the
/// measuring half in one lab session.
pub fn command(args: &[String]) -> Result<u8> {
    let (mut runs, mut secs, mut tries) = (3u32, 5u64, 3u32);
    let mut only = PARTS.join(",");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            let n = it.next().ok_or_else(|| fail!("{USAGE}"))?;
            match n.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(fail!("{name}: `{n}` is not a positive number")),
            }
        };
        match arg.as_str() {
            "--guests" => {}
            "--runs" => runs = number("--runs")? as u32,
            "--secs" => secs = number("--secs")?,
            "--tries" => tries = number("--tries")? as u32,
            "--only" => {
                only = it.next().ok_or_else(|| fail!("{USAGE}"))?.clone();
                if let Some(bad) = only.split(',').find(|p| !PARTS.contains(p)) {
                    return Err(fail!("--only: `{bad}` is not one of {}", PARTS.join(", ")));
                }
            }
            _ => return Err(fail!("{USAGE}")),
        }
    }
    bench::run_in_lab_with(
        &format!("fabric-guests {runs} {secs} {tries} {only}"),
        Duration::from_secs(60 * 60),
        |_| {},
    )
}

/// `xtask bench-in-lab fabric-guests RUNS SECS TRIES`: the measuring half.
pub fn in_lab(args: &[String]) -> Result<u8> {
    let number =
        |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (runs, secs, tries) = (number(1, 3), number(2, 5), number(3, 3) as u32);
    let only: Vec<&str> = args
        .get(4)
        .map_or(PARTS.to_vec(), |o| o.split(',').collect());
    make_bridge()?;
    let mut results: Vec<(Join, Vec<Sample>)> = Join::ALL
        .iter()
        .filter(|j| only.contains(&j.short()))
        .map(|&j| (j, Vec::new()))
        .collect();
    let mut failed = Vec::new();
    // Rounds, each running every pair once, so that a slow stretch of the
    // lab does not fall on one column.
    for run in 1..=runs {
        for (join, samples) in results.iter_mut() {
            match measure_with_tries(*join, secs, tries, &mut failed) {
                Some(sample) => {
                    println!(
                        "bench: {} run {run}: {:.1} Mbit/s, rr p50 {:.0} us, p99 {:.0} us ({} tries)",
                        join.name(),
                        sample.stream_mbit_s,
                        sample.rr_p50_us,
                        sample.rr_p99_us,
                        sample.tries
                    );
                    samples.push(sample);
                }
                None => println!("bench: {} run {run}: every try failed", join.name()),
            }
        }
    }
    let (mut regions, mut qemu_regions) = (Vec::new(), Vec::new());
    let region_runs = if only.contains(&"region") { runs } else { 0 };
    for run in 1..=region_runs {
        let pairs: [(&str, &mut Vec<_>, RegionMeasure); 2] = [
            (
                "qemu region",
                &mut qemu_regions,
                crate::bench_fabric_region::measure_qemu,
            ),
            ("region", &mut regions, crate::bench_fabric_region::measure),
        ];
        for (name, samples, measure) in pairs {
            for n in 1..=tries {
                match measure(n) {
                    Ok(sample) => {
                        println!("bench: {name} run {run}: {sample:?} ({n} tries)");
                        samples.push(sample);
                        break;
                    }
                    Err(e) => {
                        let line = format!("{name} run {run} try {n}: {e}");
                        println!("bench: FAILED {line}");
                        failed.push(line);
                    }
                }
            }
        }
    }
    print_table(&results, secs, &failed);
    if region_runs > 0 {
        crate::bench_fabric_region::print_table(&qemu_regions, &regions);
    }
    Ok(0)
}

/// One region pair's measurement, by try number.
type RegionMeasure = fn(u32) -> Result<crate::bench_fabric_region::Sample>;

/// One run of `join`, tried again when the pair fails; failures are kept.
fn measure_with_tries(
    join: Join,
    secs: u64,
    tries: u32,
    failed: &mut Vec<String>,
) -> Option<Sample> {
    for n in 1..=tries {
        match measure(join, secs) {
            Ok(mut sample) => {
                sample.tries = n;
                return Some(sample);
            }
            Err(e) => {
                let line = format!("{} try {n}: {e}", join.name());
                println!("bench: FAILED {line}");
                failed.push(line);
            }
        }
    }
    None
}

fn make_bridge() -> Result<()> {
    let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
    if !std::path::Path::new("/sys/class/net").join(BRIDGE).exists() {
        ip(&["link", "add", "name", BRIDGE, "type", "bridge"])?;
    }
    ip(&["link", "set", BRIDGE, "up"])
}

/// The guest kit's command line running `run`.
fn cmdline(run: &str) -> String {
    guestkit::cmdline_running(run)
}

fn server_command() -> String {
    format!("ip link set eth0 up && ip addr add {SERVER_ADDR}/24 dev eth0 && netbench serve {PORT}")
}

fn client_command(secs: u64) -> String {
    format!(
        "ip link set eth0 up && ip addr add {CLIENT_ADDR}/24 dev eth0 && \
         netbench stream {SERVER_ADDR} {PORT} {secs} && \
         netbench rr {SERVER_ADDR} {PORT} {ROUND_TRIPS} 64"
    )
}

/// The command that boots guest `index` (0 server, 1 client) of `join`;
/// a switched guest gets a port on `switch`.
fn vmm_command(
    join: Join,
    index: u8,
    cmdline: &str,
    switch: Option<&crate::bench_fabric_switch::Switch>,
) -> Result<Command> {
    let tap = tap_name(index);
    let mac = format!("52:54:00:00:91:{:02x}", index + 1);
    if let (Join::FerrovisorSwitch, Some(switch)) = (join, switch) {
        let socket = switch.add_port(&format!("guest{index}"), &mac)?;
        let mut cmd = bench_blk::ferrovisor_kit(cmdline, MEMORY);
        let net = crate::bench_fabric_switch::Switch::net_option(&socket, &mac);
        cmd.args(["--net", &net]);
        return Ok(cmd);
    }
    Ok(match join {
        Join::FerrovisorBridge | Join::FerrovisorVsock | Join::FerrovisorSwitch => {
            let mut cmd = bench_blk::ferrovisor_kit(cmdline, MEMORY);
            cmd.args(["--net", &format!("tap={tap},mac={mac}")]);
            cmd
        }
        Join::QemuBridge => {
            let mut cmd = bench_blk::qemu_pc_kit(cmdline, MEMORY);
            cmd.arg("-netdev")
                .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0,mac={mac},romfile="));
            cmd
        }
    })
}

fn tap_name(index: u8) -> String {
    format!("fvbench{}", index + 1)
}

/// A running VMM whose console is collected as it comes; killed on drop.
pub(crate) struct Running {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Running {
    pub(crate) fn start(name: &str, mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| format!("cannot start {name}"))?;
        let console = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                    console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&text);
                }
            });
        }
        Ok(Running { child, console })
    }

    pub(crate) fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The exit status once the VMM has ended.
    pub(crate) fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts a guest's tap on the bridge once its VMM has made it.
fn enslave(tap: &str) -> Result<()> {
    let path = std::path::Path::new("/sys/class/net").join(tap);
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(fail!("tap {tap} did not appear within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    util::run(Command::new("ip").args(["link", "set", tap, "master", BRIDGE]))?;
    util::run(Command::new("ip").args(["link", "set", tap, "up"]))
}

/// One pair: boots the server and the client, waits for the client's
/// figures, and stops both.
fn measure(join: Join, secs: u64) -> Result<Sample> {
    if join == Join::FerrovisorVsock {
        let console = crate::bench_fabric_region::vsock_pair(secs)?;
        return parse(&console).ok_or_else(|| {
            fail!(
                "the client printed no figures; its console ends: {}",
                tail(&console)
            )
        });
    }
    let server_line = cmdline(&server_command());
    let client_line = cmdline(&client_command(secs));
    let switch = match join {
        Join::FerrovisorSwitch => Some(crate::bench_fabric_switch::Switch::start()?),
        _ => None,
    };
    let command = |index, line: &str| vmm_command(join, index, line, switch.as_ref());
    let mut server = Running::start("the server guest", command(0, &server_line)?)?;
    let mut client = Running::start("the client guest", command(1, &client_line)?)?;
    if switch.is_none() {
        for index in 0..2 {
            enslave(&tap_name(index))?;
        }
    }
    let start = Instant::now();
    loop {
        let console = client.console();
        if let Some(sample) = parse(&console) {
            return Ok(sample);
        }
        let stopped = |r: &mut Running, who: &str| {
            r.ended().map(|status| {
                let console = r.console();
                fail!(
                    "the {who} guest's VMM ended ({status}) before the figures{}; its console ends: {}",
                    why_ended(join, status, &console),
                    tail(&console)
                )
            })
        };
        if console.contains(guestkit::STATUS_LINE) {
            return Err(fail!(
                "the client printed no figures; its console ends: {}",
                tail(&console)
            ));
        }
        if let Some(e) = stopped(&mut server, "server").or_else(|| stopped(&mut client, "client")) {
            return Err(e);
        }
        if start.elapsed() > PAIR_LIMIT {
            return Err(fail!(
                "no figures within {} s; client console ends: {}; server console ends: {}",
                PAIR_LIMIT.as_secs(),
                tail(&console),
                tail(&server.console())
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a guest's early end looks like, when it says something: a guest
/// that powered off prints the kit's status line; QEMU (`-no-reboot`)
/// exits 0 on a guest reset or triple fault, with nothing on the console;
/// Ferrovisor exits 2 and names the triple fault.
fn why_ended(join: Join, status: std::process::ExitStatus, console: &str) -> &'static str {
    let silent = !console.contains(guestkit::STATUS_LINE) && !console.contains("Kernel panic");
    match join {
        Join::QemuBridge if status.success() && silent => {
            " (a silent guest reset: QEMU's -no-reboot exits 0 on a reset or triple fault)"
        }
        Join::FerrovisorBridge | Join::FerrovisorSwitch
            if console.contains("triple fault") || console.contains("shutdown") =>
        {
            " (a triple fault)"
        }
        _ => "",
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Reads the client's `netbench:` lines, once both are there.
fn parse(console: &str) -> Option<Sample> {
    let stream = console.lines().find_map(|l| {
        let rest = &l[l.find("netbench: stream ")?..];
        let mbit = rest.split(": ").nth(2)?.split_whitespace().next()?;
        mbit.parse::<f64>().ok()
    })?;
    let (p50, p99) = console.lines().find_map(|l| {
        let rest = &l[l.find("netbench: rr ")?..];
        let field = |name: &str| -> Option<f64> {
            let at = rest.find(name)? + name.len();
            rest[at..].split_whitespace().next()?.parse().ok()
        };
        Some((field("p50 ")?, field("p99 ")?))
    })?;
    Some(Sample {
        stream_mbit_s: stream,
        rr_p50_us: p50,
        rr_p99_us: p99,
        tries: 0,
    })
}

const METRICS: [Metric<Sample>; 4] = [
    ("TCP stream, guest to guest, Mbit/s", |s| {
        Some(s.stream_mbit_s)
    }),
    ("TCP round trip, 64 B, p50, us", |s| Some(s.rr_p50_us)),
    ("TCP round trip, 64 B, p99, us", |s| Some(s.rr_p99_us)),
    ("tries the run took", |s| Some(f64::from(s.tries))),
];

fn print_table(results: &[(Join, Vec<Sample>)], secs: u64, failed: &[String]) {
    println!();
    println!(
        "fabric benchmark, guests: two guest-kit guests (1 vCPU, {MEMORY} each) side by side in \
         the lab; netbench stream for {secs} s, then {ROUND_TRIPS} round trips of 64 B; medians"
    );
    let runs: Vec<(&str, &[Sample])> = results
        .iter()
        .map(|(join, samples)| (join.name(), samples.as_slice()))
        .collect();
    bench::print_medians(40, &runs, &METRICS);
    match results.first() {
        Some((Join::QemuBridge, _)) => println!("(xN) = that column's figure divided by QEMU's."),
        _ => println!(
            "(xN) = that column's figure divided by the first column's (no QEMU column: --only)."
        ),
    }
    if failed.is_empty() {
        println!("no pair failed");
    } else {
        println!("{} tries failed:", failed.len());
        for line in failed {
            println!("  {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_figures_are_read_from_its_console() {
        let console = "[  1.0] virtio_net\n\
            netbench: stream 52428800 bytes in 5.01 s: 83.7 Mbit/s\n\
            netbench: rr 2000 x 64 B: p50 410 us, p99 1290 us, mean 480 us\n\
            ferrovisor-guest: exit status 0\n";
        let s = parse(console).expect("figures");
        assert_eq!(s.stream_mbit_s, 83.7);
        assert_eq!((s.rr_p50_us, s.rr_p99_us), (410.0, 1290.0));
        assert!(parse("netbench: stream 1 bytes in 1.00 s: 1.0 Mbit/s\n").is_none());
    }
}
