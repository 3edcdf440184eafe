//! Switch forwarding rate on the host: a frame generator on two ports sends
//! frames through one `Switch`, each port to the other, for a fixed time,
//! and the rate is printed in frames per second for each mode and frame
//! size. Each port's transmit side copies the frame into a buffer once, as
//! delivery into a guest's receive buffer would.
//!
//! Each case runs [`RUNS`] times; the median and the best run are printed.
//! On a shared machine the best run is the closest to the switch's own
//! cost, and the spread shows how much the other load took.
//!
//! Run by `cargo xtask bench fabric --switch-only`; arguments: `[SECS]`
//! (per case, all runs together; default 2).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use switch::{
    Mode, MonotonicClock, PortConfig, PortTx, Switch, SwitchConfig, TxDropped, Verdict, VlanMode,
};

/// Delivers each frame by copying it into a buffer, as a receive queue would.
struct Sink {
    buffer: Vec<u8>,
}

impl PortTx for Sink {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), TxDropped> {
        self.buffer[..frame.len()].copy_from_slice(frame);
        std::hint::black_box(&self.buffer);
        Ok(())
    }
}

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
/// Frames sent between two looks at the clock.
const BATCH: u64 = 4096;
/// Runs per case.
const RUNS: u32 = 5;

/// One measured configuration.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    mode: Mode,
    /// Port B is a trunk carrying VLAN 10 (A is access on VLAN 10): every
    /// frame gets a tag added or removed on the way.
    trunk: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "hub",
        mode: Mode::Hub,
        trunk: false,
    },
    Case {
        name: "bridge",
        mode: Mode::Bridge,
        trunk: false,
    },
    Case {
        name: "bridge, access<->trunk",
        mode: Mode::Bridge,
        trunk: true,
    },
];

fn frame(dst: [u8; 6], src: [u8; 6], len: usize, vlan: Option<u16>) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vlan) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vlan.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(len, 0x5a);
    f
}

/// Frames per second through `case` with frames of `len` bytes (as sent by
/// port A), measured over `secs`.
fn measure(case: Case, len: usize, secs: Duration) -> Result<f64, String> {
    let mut switch = Switch::new(
        SwitchConfig::new(case.mode),
        Box::new(MonotonicClock::new()),
    );
    let port = |name: &str, vlan, mac| PortConfig {
        name: name.into(),
        vlan,
        mac: Some(switch::MacAddr(mac)),
    };
    let sink = || {
        Box::new(Sink {
            buffer: vec![0; 2048],
        })
    };
    let b_vlan = if case.trunk {
        VlanMode::Trunk(vec![10])
    } else {
        VlanMode::Access(10)
    };
    let a = switch
        .add_port(port("a", VlanMode::Access(10), MAC_A), sink())
        .map_err(|e| e.to_string())?;
    let b = switch
        .add_port(port("b", b_vlan, MAC_B), sink())
        .map_err(|e| e.to_string())?;
    let ab = frame(MAC_B, MAC_A, len, None);
    let ba = frame(MAC_A, MAC_B, len, case.trunk.then_some(10));
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < secs {
        for _ in 0..BATCH / 2 {
            let one = switch.receive(a, std::hint::black_box(&ab));
            let two = switch.receive(b, std::hint::black_box(&ba));
            if one != Verdict::Forwarded(1) || two != Verdict::Forwarded(1) {
                return Err(format!(
                    "{}: a frame was not forwarded: {one:?} {two:?}",
                    case.name
                ));
            }
        }
        sent += BATCH;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let delivered: u64 = [a, b]
        .iter()
        .filter_map(|&p| switch.counters(p))
        .map(|c| c.tx_frames)
        .sum();
    if delivered != sent {
        return Err(format!(
            "{}: sent {sent} frames, delivered {delivered}",
            case.name
        ));
    }
    Ok(sent as f64 / elapsed)
}

fn main() -> ExitCode {
    let secs = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 2,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("forward_rate: the argument is seconds per case, a positive number");
            return ExitCode::from(2);
        }
    };
    println!(
        "switch forwarding rate: 2 ports, each sending to the other, one thread, \
         {RUNS} runs in {secs} s per case"
    );
    println!(
        "{:<24}{:>8}{:>18}{:>16}{:>12}{:>12}",
        "mode", "frame", "median frames/s", "best frames/s", "ns/frame", "Gbit/s"
    );
    let per_run = Duration::from_secs(secs) / RUNS;
    for case in CASES {
        for len in [64, 1500] {
            let mut rates = Vec::new();
            for _ in 0..RUNS {
                match measure(case, len, per_run) {
                    Ok(rate) => rates.push(rate),
                    Err(e) => {
                        eprintln!("forward_rate: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            rates.sort_by(f64::total_cmp);
            let (median, best) = (rates[rates.len() / 2], rates[rates.len() - 1]);
            println!(
                "{:<24}{:>8}{:>18.0}{:>16.0}{:>12.1}{:>12.2}",
                case.name,
                format!("{len} B"),
                median,
                best,
                1e9 / best,
                best * len as f64 * 8.0 / 1e9
            );
        }
    }
    println!("ns/frame and Gbit/s are those of the best run");
    ExitCode::SUCCESS
}
