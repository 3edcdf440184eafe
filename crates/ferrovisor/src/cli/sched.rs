//! `ferrovisor sched NAME [--weight N] [--cap PCT|none] [--rt budget=B,period=P]
//! [--priority N [--policy fifo|rr]] [--fair] [--pool P [--windows
//! START+LENGTH,...]]`: changes a running
//! guest's scheduling through `POST /guests/NAME/sched`, and shows per vCPU
//! what its policy promises and what it received.

use std::process::ExitCode;

use serde_json::{Map, Value};

use super::{print_json, CliError, Words};

/// Builds the request body from the flags; the daemon checks the values.
fn body(words: &Words) -> Result<Map<String, Value>, CliError> {
    let mut body = Map::new();
    let number = |flag: &str, text: &str| {
        text.parse::<u64>()
            .map(Value::from)
            .map_err(|_| CliError::Usage(format!("--{flag}: '{text}' is not a number")))
    };
    if let Some(w) = words.flag("weight") {
        body.insert("weight".into(), number("weight", w)?);
    }
    if let Some(c) = words.flag("cap") {
        let cap = if c == "none" {
            Value::Null
        } else {
            number("cap", c.trim_end_matches('%'))?
        };
        body.insert("cap".into(), cap);
    }
    if let Some(rt) = words.flag("rt") {
        body.insert("rt".into(), rt.into());
    }
    if let Some(p) = words.flag("priority") {
        body.insert("priority".into(), number("priority", p)?);
    }
    if let Some(p) = words.flag("policy") {
        body.insert("policy".into(), p.into());
    }
    if words.switch("fair") {
        body.insert("fair".into(), true.into());
    }
    if let Some(p) = words.flag("pool") {
        body.insert("pool".into(), p.into());
    }
    if let Some(w) = words.flag("windows") {
        body.insert("windows".into(), windows(w)?);
    }
    if body.is_empty() {
        return Err(CliError::Usage(
            "sched: give at least one of --weight, --cap, --rt, --priority, --policy, --fair, --pool"
                .into(),
        ));
    }
    Ok(body)
}

/// `--windows 0ms+5ms,10ms+5ms`: each window's start and length in the
/// pool's frame, as the API's `[{"start": "0ms", "length": "5ms"}, ...]`.
fn windows(text: &str) -> Result<Value, CliError> {
    text.split(',')
        .map(|w| match w.split_once('+') {
            Some((start, length)) if !start.is_empty() && !length.is_empty() => {
                Ok(serde_json::json!({ "start": start.trim(), "length": length.trim() }))
            }
            _ => Err(CliError::Usage(format!(
                "--windows: '{w}' is not START+LENGTH (like 0ms+5ms)"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    let valued = [
        "socket", "weight", "cap", "rt", "priority", "policy", "pool", "windows",
    ];
    let words = Words::parse(rest, &valued, &["fair", "json"])?;
    let name = words.guest_name()?;
    let body = Value::Object(body(&words)?);
    let info = words
        .client()
        .call("POST", &format!("/guests/{name}/sched"), Some(&body))?;
    if words.switch("json") {
        print_json(&info);
    } else {
        print_vcpus(&info);
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per vCPU: its policy, the share promised, the CPU time received.
pub fn print_vcpus(info: &Value) {
    let sched = &info["sched"];
    let Some(vcpus) = sched["vcpus"].as_array() else {
        return;
    };
    let uptime_ns = sched["uptime_ns"].as_u64().unwrap_or(0).max(1);
    for v in vcpus {
        let promised = v["promised_share"]
            .as_f64()
            .map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0));
        let received = v["cpu_ns"].as_u64().unwrap_or(0) as f64 * 100.0 / uptime_ns as f64;
        let misses = match v["deadline_checks"].as_u64().unwrap_or(0) {
            0 => String::new(),
            checks => format!(
                "  deadline missed {} of {checks} checks",
                v["deadline_misses"].as_u64().unwrap_or(0)
            ),
        };
        let overruns = match v["overruns"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!("  overran {n}"),
        };
        println!(
            "vcpu {:<3} {:<22} promised {:>6}  received {received:5.1}% of a CPU{misses}{overruns}",
            v["index"],
            v["kernel_policy"].as_str().unwrap_or("?"),
            promised
        );
    }
    println!(
        "deadline misses {}, overruns {}",
        sched["deadline_misses"].as_u64().unwrap_or(0),
        sched["overruns"].as_u64().unwrap_or(0)
    );
    if let Some(p) = sched.get("partition").filter(|p| p.is_object()) {
        println!(
            "partition: {} windows; start late p99 {} us; {} overruns; progress while closed {}",
            p["windows"],
            p["vcpu_start_late_p99_ns"].as_u64().unwrap_or(0) / 1000,
            p["overruns"],
            p["closed_progress"]
        );
    }
}
