//! `ferrovisor top`: a live per-guest table in the manner of xentop: state,
//! vCPUs, CPU % (of one host CPU), the CPU its policy promises its vCPUs
//! against what they received, deadline misses, deadline and window
//! overruns, memory and exits per second, from two listings one second apart. `--once` prints one table and exits; `--json`
//! prints the rows as JSON (with `--once`, one document; else one per line).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use daemon::Client;
use serde_json::{json, Value};

use super::{human_size, CliError, Words};

/// One guest's counters at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu_ms: Option<u64>,
    exits: Option<u64>,
    /// CPU time of all its vCPU threads, in microseconds.
    vcpu_us: Option<u64>,
    at: Instant,
}

/// What a guest's vCPUs are promised together, in per cent of one CPU.
fn promised_percent(g: &Value) -> Value {
    let vcpus = g["sched"]["vcpus"].as_array();
    let shares: Option<Vec<f64>> = vcpus.map(|v| {
        v.iter()
            .filter_map(|c| c["promised_share"].as_f64())
            .collect()
    });
    match shares {
        Some(s) if !s.is_empty() => json!((s.iter().sum::<f64>() * 1000.0).round() / 10.0),
        _ => Value::Null,
    }
}

fn sample(client: &Client) -> Result<(Vec<Value>, BTreeMap<String, Sample>), CliError> {
    let listing = client.call("GET", "/guests", None)?;
    let at = Instant::now();
    let guests = listing["guests"].as_array().cloned().unwrap_or_default();
    let samples = guests
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or("").to_string(),
                Sample {
                    cpu_ms: g["cpu_time_ms"].as_u64(),
                    exits: g["exits"].as_u64(),
                    vcpu_us: g["sched"]["vcpus"]
                        .as_array()
                        .map(|v| v.iter().filter_map(|c| c["cpu_ns"].as_u64()).sum::<u64>() / 1000),
                    at,
                },
            )
        })
        .collect();
    Ok((guests, samples))
}

/// The table rows from the latest listing and the one before.
fn rows(
    guests: &[Value],
    now: &BTreeMap<String, Sample>,
    before: &BTreeMap<String, Sample>,
) -> Vec<Value> {
    guests
        .iter()
        .map(|g| {
            let name = g["name"].as_str().unwrap_or("");
            let rate = |pick: fn(&Sample) -> Option<u64>, scale: f64| -> Value {
                let (Some(a), Some(b)) = (before.get(name), now.get(name)) else {
                    return Value::Null;
                };
                let (Some(x), Some(y)) = (pick(a), pick(b)) else {
                    return Value::Null;
                };
                let secs = b.at.duration_since(a.at).as_secs_f64();
                if secs <= 0.0 || y < x {
                    return Value::Null;
                }
                json!(((y - x) as f64 * scale / secs * 10.0).round() / 10.0)
            };
            json!({
                "name": name,
                "state": g["state"],
                "vcpus": g["vcpus"],
                "memory_bytes": g["memory_bytes"],
                "cpu_percent": rate(|s| s.cpu_ms, 0.1),
                "promised_percent": promised_percent(g),
                "vcpu_percent": rate(|s| s.vcpu_us, 0.0001),
                "overruns": g["sched"]["overruns"],
                "deadline_misses": g["sched"]["deadline_misses"],
                "window_overruns": g["sched"]["partition"]["overruns"],
                "exits_per_sec": rate(|s| s.exits, 1.0),
                "rate_limits": g["rate_limits"],
            })
        })
        .collect()
}

fn print_table(rows: &[Value]) {
    println!(
        "{:<20} {:<8} {:>5} {:>7} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10}",
        "NAME",
        "STATE",
        "VCPUS",
        "CPU(%)",
        "PROMISED",
        "VCPU(%)",
        "MISSED",
        "OVERRUN",
        "WIN-OVR",
        "MEMORY",
        "EXITS/S"
    );
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let count = |v: &Value| v.as_u64().map_or("-".to_string(), |x| x.to_string());
    for r in rows {
        println!(
            "{:<20} {:<8} {:>5} {:>7} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10}",
            r["name"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["vcpus"].as_u64().unwrap_or(0),
            num(&r["cpu_percent"]),
            num(&r["promised_percent"]),
            num(&r["vcpu_percent"]),
            count(&r["deadline_misses"]),
            count(&r["overruns"]),
            count(&r["window_overruns"]),
            human_size(r["memory_bytes"].as_u64().unwrap_or(0)),
            num(&r["exits_per_sec"]),
        );
    }
    let limits = super::limit::top_lines(rows);
    if !limits.is_empty() {
        println!("\nI/O RATE LIMITS");
        for line in limits {
            println!("{line}");
        }
    }
}

/// Runs `ferrovisor top`.
pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket"], &["once", "json"])?;
    words.exactly(0, "no arguments")?;
    let client = words.client();
    let json_out = words.switch("json");
    let (_, mut before) = sample(&client)?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (guests, now) = sample(&client)?;
        let rows = rows(&guests, &now, &before);
        if words.switch("once") {
            if json_out {
                super::print_json(&json!({ "guests": rows }));
            } else {
                print_table(&rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
        if json_out {
            println!("{}", json!({ "guests": rows }));
        } else {
            // Clear the screen and home the cursor, as top does.
            print!("\x1b[2J\x1b[H");
            print_table(&rows);
        }
        before = now;
    }
}
