//! `cargo xtask bench rate`: I/O rate limits under a guest that floods them,
//! in the lab. Reports the rate the guest achieved against the limit.
//!
//! - **Disk**: a virtio-blk disk limited to 20 MiB/s and 500 operations per
//!   second. The guest's `dd` writes then reads SIZE MiB in 1 MiB requests
//!   (held by the bandwidth), then reads SECS x 500 blocks of 4 KiB (held
//!   by the operations limit), all O_DIRECT at queue depth 1, each timed
//!   in the guest from start to end (`/proc/uptime`). QEMU's block
//!   throttling with the same limits (`throttling.bps-total`,
//!   `throttling.iops-total`) is the peer; the same run without a limit
//!   shows what the lab's disk path carries, and a run limited to 50 IOPS
//!   (below what that path carries) shows the operations limit at work.
//! - **NIC**: a virtio-net interface whose transmit direction is limited to
//!   100 Mbit/s, and to 2 Mbit/s (below what the lab's nested network path
//!   carries). The guest kit's `netbench stream` sends 64 KiB chunks for
//!   SECS seconds to a receiver in the lab, on the far end of the tap (a
//!   single-threaded `nc` fed by a pipe carried under 20 Mbit/s, so it was
//!   the bottleneck, not the NIC); the lab counts the bytes the tap
//!   received (Ethernet frames, what the limiter counts) and the TCP
//!   payload between the first byte and the end of the stream. The same
//!   flood without a limit shows what the path carries unlimited.
//!
//! See docs/scheduling.md ("I/O rate limits") for the figures.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench_blk::{self, IMAGE};
use crate::guestkit;
use crate::util::{Context, Result};

const MEMORY: &str = "512M";
/// The disk's limits.
const DISK_MIB_S: f64 = 20.0;
const DISK_IOPS: f64 = 500.0;
/// A second operations limit, below what the lab's disk path carries with
/// 4 KiB requests at queue depth 1 (120-320 IOPS, with the host's load), so
/// that the limiter's accuracy shows there too.
const DISK_LOW_IOPS: f64 = 50.0;
/// The NIC's transmit limit.
const NIC_MBIT_S: f64 = 100.0;
/// A second, low limit, so that the limiter's accuracy shows where each
/// frame is far apart from the next.
const NIC_LOW_MBIT_S: f64 = 2.0;
/// The tap and its two ends.
const TAP: &str = "fvrate0";
const HOST_ADDR: &str = "10.0.78.1";
const GUEST_ADDR: &str = "10.0.78.2";
const PORT: u16 = 5078;

/// The guest kit's command line running `run`.
fn cmdline(run: &str) -> String {
    guestkit::cmdline_running(run)
}

fn ferrovisor(cmdline: &str) -> Command {
    bench_blk::ferrovisor_kit(cmdline, MEMORY)
}

/// Who serves the disk, and its operations limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskPeer {
    Limited(u64),
    Unlimited,
    Qemu(u64),
}

/// The VMM's command for `peer`.
fn disk_command(peer: DiskPeer, cmdline: &str) -> Command {
    let bytes = (DISK_MIB_S as u64) << 20;
    match peer {
        DiskPeer::Limited(_) | DiskPeer::Unlimited => {
            let mut disk = format!("path={IMAGE}");
            if let DiskPeer::Limited(iops) = peer {
                disk.push_str(&format!(",bandwidth={bytes},ops={iops}"));
            }
            let mut cmd = ferrovisor(cmdline);
            cmd.args(["--disk", &disk]);
            cmd
        }
        DiskPeer::Qemu(iops) => {
            let mut cmd = bench_blk::qemu_pc_kit(cmdline, MEMORY);
            cmd.arg("-drive")
                .arg(format!(
                    "file={IMAGE},format=raw,if=none,id=d0,cache=writeback,aio=threads,\
                     throttling.bps-total={bytes},throttling.iops-total={iops}"
                ))
                .args(["-device", "virtio-blk-pci,drive=d0"]);
            cmd
        }
    }
}

/// What the guest achieved on the disk.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DiskRun {
    write_mib_s: f64,
    read_mib_s: f64,
    iops: f64,
}

/// The guest's timed `dd` runs: `ratebench NAME START END` lines.
fn disk_script(size_mib: u64, blocks: u64) -> String {
    format!(
        "up() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(up); dd if=/dev/zero of=/dev/vda bs=1M count={size_mib} oflag=direct 2>/dev/null; \
         b=$(up); echo \"ratebench write $a $b\"; \
         a=$(up); dd if=/dev/vda of=/dev/null bs=1M count={size_mib} iflag=direct 2>/dev/null; \
         b=$(up); echo \"ratebench read $a $b\"; \
         a=$(up); dd if=/dev/vda of=/dev/null bs=4k count={blocks} iflag=direct 2>/dev/null; \
         b=$(up); echo \"ratebench ops $a $b\""
    )
}

/// The seconds the guest's line `ratebench NAME START END` spans.
fn span(console: &str, name: &str) -> Option<f64> {
    let prefix = format!("ratebench {name} ");
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))?;
    let mut words = line.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(start)), Some(Ok(end))) = (words.next(), words.next()) else {
        return None;
    };
    (end > start).then_some(end - start)
}

fn parse_disk(console: &str, size_mib: u64, blocks: u64) -> Option<DiskRun> {
    Some(DiskRun {
        write_mib_s: size_mib as f64 / span(console, "write")?,
        read_mib_s: size_mib as f64 / span(console, "read")?,
        iops: blocks as f64 / span(console, "ops")?,
    })
}

/// One disk run under `peer`.
fn disk_run(peer: DiskPeer, size_mib: u64, blocks: u64) -> Result<DiskRun> {
    let name = match peer {
        DiskPeer::Limited(n) => format!("ferrovisor, {n} IOPS"),
        DiskPeer::Unlimited => "ferrovisor, no limit".to_string(),
        DiskPeer::Qemu(n) => format!("qemu-pc, {n} IOPS"),
    };
    let command = disk_command(peer, &cmdline(&disk_script(size_mib, blocks)));
    let (console, stderr, status) = bench_blk::run_to_end(&name, command)?;
    for line in console.lines().filter(|l| l.contains("ratebench ")) {
        println!("bench: {name}: {}", line.trim_end_matches('\r'));
    }
    parse_disk(&console, size_mib, blocks).ok_or_else(|| {
        fail!(
            "{name} ({status}) printed no dd timings; stderr: {}",
            stderr.lines().last().unwrap_or("")
        )
    })
}

/// What one NIC flood delivered.
#[derive(Debug, Clone, Copy)]
struct Flood {
    /// Ethernet frames the tap received, Mbit/s.
    frames_mbit_s: f64,
    /// TCP payload, Mbit/s.
    payload_mbit_s: f64,
}

/// The tap's received-bytes counter.
fn tap_rx_bytes() -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{TAP}/statistics/rx_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Gives the host end of the tap its address once the VMM has created it.
fn configure_tap() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tap_rx_bytes().is_none() {
        if Instant::now() > deadline {
            return Err(fail!("the VMM did not create the tap {TAP}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for args in [
        vec!["addr", "add", &format!("{HOST_ADDR}/24"), "dev", TAP],
        vec!["link", "set", TAP, "up"],
    ] {
        let status = Command::new("ip")
            .args(&args)
            .status()
            .ctx(|| "cannot run ip".to_string())?;
        if !status.success() {
            return Err(fail!("ip {} failed: {status}", args.join(" ")));
        }
    }
    Ok(())
}

/// Accepts the guest's stream and reads it to its end.
fn receive(listener: &TcpListener) -> Result<Flood> {
    // The guest connects within its boot and a minute of pings; a guest
    // that cannot must not hold the lab until its deadline.
    listener
        .set_nonblocking(true)
        .ctx(|| "listener".to_string())?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(fail!("the guest never connected: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(60))))
        .ctx(|| "stream".to_string())?;
    // netbench's stream: "S", then chunks (a 32-bit length, then the
    // data) until a zero length, answered with the byte count.
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode).ctx(|| "read".to_string())?;
    if mode != *b"S" {
        return Err(fail!("the guest did not start a stream"));
    }
    // The clock starts at the first byte, so the guest's boot and the
    // connection are not counted.
    let (start, rx_start) = (Instant::now(), tap_rx_bytes().unwrap_or(0));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).ctx(|| "read".to_string())?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            break;
        }
        let chunk = buf
            .get_mut(..len)
            .ok_or_else(|| fail!("the guest sent a chunk of {len} bytes"))?;
        stream.read_exact(chunk).ctx(|| "read".to_string())?;
        total += len as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let frames = tap_rx_bytes().unwrap_or(0).saturating_sub(rx_start);
    stream
        .write_all(&total.to_le_bytes())
        .ctx(|| "reply".to_string())?;
    Ok(Flood {
        frames_mbit_s: frames as f64 * 8.0 / secs / 1e6,
        payload_mbit_s: total as f64 * 8.0 / secs / 1e6,
    })
}

/// One flood of `secs` seconds from the guest, with a transmit limit of
/// `limit` Mbit/s or none.
fn nic_run(limit: Option<f64>, secs: u64) -> Result<Flood> {
    let listener =
        TcpListener::bind(("0.0.0.0", PORT)).ctx(|| format!("cannot listen on {PORT}"))?;
    let run = format!(
        "ip link set eth0 up && ip addr add {GUEST_ADDR}/24 dev eth0 && \
         for i in $(seq 1 60); do ping -c 1 -W 1 {HOST_ADDR} >/dev/null 2>&1 && break; done; \
         netbench stream {HOST_ADDR} {PORT} {secs} && echo flood-done"
    );
    let mut net = format!("tap={TAP}");
    if let Some(mbit) = limit {
        net.push_str(&format!(",tx_bandwidth={}Mbit/s", mbit as u64));
    }
    let mut command = ferrovisor(&cmdline(&run));
    command.args(["--net", &net]);
    let vmm = std::thread::spawn(move || bench_blk::run_to_end("ferrovisor", command));
    configure_tap()?;
    let flood = receive(&listener);
    let ended = vmm.join().map_err(|_| fail!("the VMM's thread panicked"))?;
    let (console, _, status) = ended?;
    if !console.contains("flood-done") {
        return Err(fail!("the guest's flood did not finish ({status})"));
    }
    flood
}

/// `achieved` and how far it is from `limit`, as table cells.
fn cells(achieved: Option<f64>, limit: f64) -> (String, String) {
    match achieved {
        Some(v) => (
            format!("{v:.1}"),
            format!("{:+.1}%", (v - limit) / limit * 100.0),
        ),
        None => ("-".into(), "-".into()),
    }
}

/// One table row: the limit, Ferrovisor and QEMU against it, and the
/// figure without a limit.
fn row(label: &str, limit: f64, ours: Option<f64>, qemu: Option<f64>, open: Option<f64>) {
    let (a, ae) = cells(ours, limit);
    let (b, be) = cells(qemu, limit);
    let c = open.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!("{label:<36} {limit:>7.1} {a:>10} {ae:>7} {b:>10} {be:>7} {c:>10}");
}

/// Reads one figure from a run.
type Figure<S> = fn(&S) -> f64;

/// The disk's rows: label, limit, and the figure from one run.
const DISK_ROWS: [(&str, f64, Figure<DiskRun>); 3] = [
    ("disk write, 1 MiB requests, MiB/s", DISK_MIB_S, |s| {
        s.write_mib_s
    }),
    ("disk read, 1 MiB requests, MiB/s", DISK_MIB_S, |s| {
        s.read_mib_s
    }),
    ("disk read, 4 KiB requests, IOPS", DISK_IOPS, |s| s.iops),
];

/// The NIC's rows, against [`NIC_MBIT_S`].
const NIC_ROWS: [(&str, Figure<Flood>); 2] = [
    ("NIC transmit, frames, Mbit/s", |f| f.frames_mbit_s),
    ("NIC transmit, TCP payload, Mbit/s", |f| f.payload_mbit_s),
];

/// Prints `what failed` for a run that did not give figures.
fn keep<T>(what: &str, run: Result<T>) -> Option<T> {
    run.map_err(|e| println!("bench: {what} failed: {e}")).ok()
}

/// `xtask bench-in-lab rate SIZE_MIB SECS NET_MIB`: the measuring half.
pub fn in_lab(args: &[String]) -> Result<u8> {
    let number = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let (size_mib, secs, net_secs) = (number(1, 128), number(2, 10), number(3, 5));
    let blocks = secs * DISK_IOPS as u64;
    bench_blk::make_image(size_mib)?;
    let run = |peer, size, blocks| keep(&format!("{peer:?}"), disk_run(peer, size, blocks));
    let open_disk = run(DiskPeer::Unlimited, size_mib, blocks);
    let ours = run(DiskPeer::Limited(DISK_IOPS as u64), size_mib, blocks);
    let qemu = run(DiskPeer::Qemu(DISK_IOPS as u64), size_mib, blocks);
    // Only the 4 KiB reads count here: a short sequential part.
    let low_blocks = secs * DISK_LOW_IOPS as u64;
    let low_ops = run(DiskPeer::Limited(DISK_LOW_IOPS as u64), 8, low_blocks);
    let limited = keep("limited flood", nic_run(Some(NIC_MBIT_S), net_secs));
    let low = keep("low-limit flood", nic_run(Some(NIC_LOW_MBIT_S), net_secs));
    let open = keep("unlimited flood", nic_run(None, net_secs));
    println!();
    println!(
        "rate-limit benchmark: guest kit, 1 vCPU, {MEMORY}, in the lab (nested KVM on emulated \
         AMD SVM); disk: dd of {size_mib} MiB in 1 MiB requests and {blocks} reads of 4 KiB, \
         O_DIRECT, queue depth 1, timed in the guest; NIC: {net_secs} s of TCP from the guest \
         (netbench stream) through a tap, counted in the lab"
    );
    println!(
        "{:<36} {:>7} {:>10} {:>7} {:>10} {:>7} {:>10}",
        "metric", "limit", "ferrovisor", "error", "qemu-pc", "error", "no limit"
    );
    for (label, limit, get) in DISK_ROWS {
        let cell = |r: &Option<DiskRun>| r.as_ref().map(get);
        row(label, limit, cell(&ours), cell(&qemu), cell(&open_disk));
    }
    let iops = |r: &Option<DiskRun>| r.as_ref().map(|r| r.iops);
    row(
        DISK_ROWS[2].0,
        DISK_LOW_IOPS,
        iops(&low_ops),
        None,
        iops(&open_disk),
    );
    for (limit, flood) in [(NIC_MBIT_S, &limited), (NIC_LOW_MBIT_S, &low)] {
        for (label, get) in NIC_ROWS {
            let (a, b) = (flood.as_ref().map(get), open.as_ref().map(get));
            row(label, limit, a, None, b);
        }
    }
    println!("error = (achieved - limit) / limit; goal: within 5%. qemu-pc: QEMU's block");
    println!("throttling with the same limits (QEMU has no NIC rate limit). no limit: the same");
    println!("run under ferrovisor without a limit, what the lab's path carries. The limiter");
    println!("counts a disk request's data and a frame without its virtio-net header.");
    let complete = ours.is_some() && limited.is_some();
    Ok(if complete { 0 } else { 1 })
}

/// Runs the rate benchmark in the lab and prints its table:
/// `cargo xtask bench rate [--size MIB] [--secs N] [--net SECS]`.
pub fn command(args: &[String]) -> Result<u8> {
    let usage = "usage: cargo xtask bench rate [--size MIB] [--secs N] [--net SECS]";
    let (mut size, mut secs, mut net) = (128u64, 10u64, 5u64);
    bench_blk::positive_options(
        args,
        &mut [
            ("--size", &mut size),
            ("--secs", &mut secs),
            ("--net", &mut net),
        ],
        usage,
    )?;
    bench_blk::check_image_size(size)?;
    crate::bench::run_in_lab(
        &format!("rate {size} {secs} {net}"),
        Duration::from_secs(25 * 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_timings_become_rates() {
        let console = "noise\r\nratebench write 10.00 16.40\r\nratebench read 16.50 22.90\n\
                       ratebench ops 23.00 33.00\nferrovisor-guest: exit status 0";
        let run = parse_disk(console, 128, 5000).expect("three timings");
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(run.write_mib_s, 20.0), "{run:?}");
        assert!(near(run.read_mib_s, 20.0), "{run:?}");
        assert!(near(run.iops, 500.0), "{run:?}");
        assert_eq!(parse_disk("ratebench write 1 2", 128, 5000), None);
        assert_eq!(span("ratebench ops 5.0 4.0", "ops"), None);
    }

    #[test]
    fn the_error_is_signed_against_the_limit() {
        assert_eq!(cells(Some(21.0), 20.0), ("21.0".into(), "+5.0%".into()));
        assert_eq!(cells(Some(19.0), 20.0), ("19.0".into(), "-5.0%".into()));
        assert_eq!(cells(None, 20.0), ("-".into(), "-".into()));
    }

    #[test]
    fn the_limits_reach_both_vmms() {
        let ours = format!("{:?}", disk_command(DiskPeer::Limited(500), "c"));
        assert!(ours.contains("bandwidth=20971520,ops=500"), "{ours}");
        let open = format!("{:?}", disk_command(DiskPeer::Unlimited, "c"));
        assert!(!open.contains("bandwidth"), "{open}");
        let qemu = format!("{:?}", disk_command(DiskPeer::Qemu(500), "c"));
        assert!(
            qemu.contains("throttling.bps-total=20971520,throttling.iops-total=500"),
            "{qemu}"
        );
    }
}
