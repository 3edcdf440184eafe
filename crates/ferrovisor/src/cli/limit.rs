//! `ferrovisor limit NAME DEVICE ...`: changes a running guest's disk or
//! NIC rate limits, and the lines that show limits and throttling in
//! `info` and `top`.

use std::process::ExitCode;

use serde_json::{json, Map, Value};

use super::{human_size, print_json, CliError, Words};

/// The flags of `limit` and the rate keys they set.
const FLAGS: [(&str, &str); 5] = [
    ("bandwidth", "bandwidth"),
    ("burst", "burst"),
    ("ops", "ops"),
    ("ops-burst", "ops_burst"),
    ("refill-time", "refill_time"),
];

/// The rate object the flags ask for: `off` removes a key, digits are a
/// number, anything else is text. Each value is checked here, so a bad one
/// is a usage error naming its flag.
fn rate_body(words: &Words, device: &str) -> Result<Value, CliError> {
    let mut rate = Map::new();
    for (flag, key) in FLAGS {
        let Some(text) = words.flag(flag) else {
            continue;
        };
        let value = match text {
            "off" => Value::Null,
            t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => match t.parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(t),
            },
            t => json!(t),
        };
        rate.insert(key.to_string(), value);
    }
    let request = json!({ "op": "limit", "device": device, "rate": rate });
    if let Value::Object(fields) = &request {
        config::rate::parse_limit_request(fields).map_err(|e| {
            let flagged = FLAGS.iter().find_map(|(flag, key)| {
                e.strip_prefix(&format!("rate.{key}: "))
                    .map(|rest| format!("--{flag}: {rest}"))
            });
            CliError::Usage(flagged.unwrap_or(e))
        })?;
    }
    Ok(Value::Object(rate))
}

/// Runs `ferrovisor limit`.
pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    let mut valued = vec!["socket"];
    valued.extend(FLAGS.iter().map(|(f, _)| *f));
    let words = Words::parse(rest, &valued, &["replace", "json"])?;
    let [name, device] =
        words.exactly(2, "a guest name and a device (disk0, net0, net0-rx, ...)")?
    else {
        return Err(CliError::Usage("expected a guest name and a device".into()));
    };
    super::check_name(name)?;
    let rate = rate_body(&words, device)?;
    let replace = words.switch("replace");
    if rate.as_object().is_some_and(Map::is_empty) && !replace {
        return Err(CliError::Usage(
            "nothing to change: give --bandwidth, --burst, --ops, --ops-burst, --refill-time or --replace".into(),
        ));
    }
    let method = if replace { "PUT" } else { "PATCH" };
    let reply = words.client().call(
        method,
        &format!("/guests/{name}/devices/{device}/rate"),
        Some(&rate),
    )?;
    if words.switch("json") {
        print_json(&reply);
    } else {
        for line in device_lines(&reply["limits"]) {
            println!("{name}: {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A limit in one line: `bandwidth=20MiB/s ops=500`, or `unlimited`.
fn limit_text(limit: &Value) -> String {
    let parts: Vec<String> = limit
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| match v.as_str() {
            Some(s) => format!("{k}={s}"),
            None => format!("{k}={v}"),
        })
        .collect();
    if parts.is_empty() {
        "unlimited".into()
    } else {
        parts.join(" ")
    }
}

/// One line per device: its limit and how much it held requests back.
pub fn device_lines(devices: &Value) -> Vec<String> {
    devices
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let ms = d["throttled_ms"].as_u64().unwrap_or(0);
            format!(
                "{:<8} {:<36} throttled {}.{:03}s, {} delayed ({}){}",
                d["device"].as_str().unwrap_or("?"),
                limit_text(&d["limit"]),
                ms / 1000,
                ms % 1000,
                d["delayed_ops"].as_u64().unwrap_or(0),
                human_bytes(d["delayed_bytes"].as_u64().unwrap_or(0)),
                if d["waiting"] == true {
                    ", waiting"
                } else {
                    ""
                },
            )
        })
        .collect()
}

fn human_bytes(n: u64) -> String {
    if n < 1 << 20 {
        format!("{}K", n >> 10)
    } else {
        human_size(n)
    }
}

/// The `top` lines under the table: each live guest's limited devices.
pub fn top_lines(guests: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for g in guests {
        let limited: Vec<Value> = g["rate_limits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["limit"].as_object().is_some_and(|m| !m.is_empty()) || d["delayed_ops"] != 0
            })
            .cloned()
            .collect();
        let name = g["name"].as_str().unwrap_or("?");
        for line in device_lines(&Value::Array(limited)) {
            out.push(format!("{name:<20} {line}"));
        }
    }
    out
}
