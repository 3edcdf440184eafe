//! `periodic`: a periodic real-time-style task inside a Linux guest, for
//! `cargo xtask bench sched --lab`.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary.
//!
//! Usage: `periodic PERIOD_MS WORK_US SECS`. A job is released every
//! PERIOD_MS milliseconds for SECS seconds; each does a fixed amount of
//! work that takes about WORK_US microseconds when nothing else runs
//! (calibrated at start). A job's response is the time from its release to
//! its end; a job whose response is longer than the period missed its
//! deadline. It prints one line:
//! `periodic: JOBS jobs, MISSED missed, response p50 P50 us, p99 P99 us, worst WORST us`.
//!
//! Exit status: 0 when it ran, 1 on bad arguments.

use std::time::{Duration, Instant};

/// Spins for `n` rounds of a loop the compiler cannot remove.
fn work(n: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..n {
        x = std::hint::black_box(x.rotate_left(5) ^ i);
    }
    x
}

/// The rounds of [`work`] that take `target` alone: the fastest of a few
/// timed tries of a fixed size, scaled.
fn calibrate(target: Duration) -> u64 {
    const PROBE: u64 = 200_000;
    let mut best = Duration::MAX;
    for _ in 0..20 {
        let start = Instant::now();
        work(PROBE);
        best = best.min(start.elapsed());
    }
    let per_round = best.as_secs_f64() / PROBE as f64;
    (target.as_secs_f64() / per_round).max(1.0) as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [period_ms, work_us, secs] = args[..] else {
        eprintln!("usage: periodic PERIOD_MS WORK_US SECS");
        std::process::exit(1);
    };
    if period_ms == 0 || secs == 0 {
        eprintln!("periodic: PERIOD_MS and SECS must be above 0");
        std::process::exit(1);
    }
    let period = Duration::from_millis(period_ms);
    let rounds = calibrate(Duration::from_micros(work_us));
    let start = Instant::now() + period;
    let jobs = secs * 1000 / period_ms;
    let mut responses = Vec::with_capacity(jobs as usize);
    for k in 0..jobs {
        let release = start + period * k as u32;
        let now = Instant::now();
        if release > now {
            std::thread::sleep(release - now);
        }
        work(rounds);
        responses.push(release.elapsed().as_micros() as u64);
    }
    let missed = responses
        .iter()
        .filter(|&&r| r > period.as_micros() as u64)
        .count();
    responses.sort_unstable();
    println!(
        "periodic: {} jobs, {missed} missed, response p50 {} us, p99 {} us, worst {} us",
        responses.len(),
        percentile(&responses, 0.5),
        percentile(&responses, 0.99),
        responses.last().copied().unwrap_or(0)
    );
}
