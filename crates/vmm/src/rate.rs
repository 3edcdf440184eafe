//! I/O rate limits as users write them, and the limits of a running VM.
//!
//! A [`RateSpec`] is what a `[[disk]]` `rate`, a `[[net]]` `rx_rate` or
//! `tx_rate`, a `--disk`/`--net` option or a control request says:
//!
//! | key | meaning |
//! |---|---|
//! | `bandwidth` | bytes per second: `"20MiB/s"`, `"100Mbit/s"`, `"512K"`, or a number |
//! | `burst` | a one-time allowance of bytes above the bandwidth (`"64MiB"`) |
//! | `ops` | requests (or frames) per second |
//! | `ops_burst` | a one-time allowance of requests above `ops` |
//! | `refill_time` | how long a bucket takes to fill from empty (`"100ms"`, default): it holds that much of its rate |
//!
//! Every key is optional; an empty spec is no limit. The same parser serves
//! files, flags and the control socket, so a value means the same
//! everywhere, and each error names its key.
//!
//! [`Limits`] holds the limiter of every disk and NIC direction of a running
//! VM by name (`disk0`, `net0-rx`, `net0-tx`; `net0` is both directions),
//! for the control socket's `limit` and `info`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;
use virtio::rate_limiter::{BucketConfig, DeviceLimiter, LimiterConfig, RateLimiterError};

/// The keys of a rate spec.
pub const RATE_KEYS: [&str; 5] = ["bandwidth", "burst", "ops", "ops_burst", "refill_time"];
/// The refill time when none is given.
pub const DEFAULT_REFILL: Duration = Duration::from_millis(100);
/// The shortest and longest refill times accepted.
pub const MIN_REFILL: Duration = Duration::from_millis(1);
pub const MAX_REFILL: Duration = Duration::from_secs(10);

/// A bad value for one key of a rate spec.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{key}: {problem}")]
pub struct RateError {
    pub key: String,
    pub problem: String,
}

impl RateError {
    fn new(key: &str, problem: impl Into<String>) -> RateError {
        RateError {
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// The same error with its key inside `outer` (`rate.bandwidth`).
    pub fn within(self, outer: &str) -> RateError {
        RateError {
            key: format!("{outer}.{}", self.key),
            problem: self.problem,
        }
    }
}

/// A value as the front ends hand it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateValue<'a> {
    Text(&'a str),
    Number(u64),
    /// Removes the key (JSON `null`, or `off` in a flag).
    Clear,
}

/// One I/O limit: bandwidth and operations, each with a one-time burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateSpec {
    /// Bytes per second.
    pub bandwidth: Option<u64>,
    /// One-time burst of bytes.
    pub burst: Option<u64>,
    /// Operations per second.
    pub ops: Option<u64>,
    /// One-time burst of operations.
    pub ops_burst: Option<u64>,
    /// Time for a bucket to fill from empty.
    pub refill_time: Option<Duration>,
}

impl RateSpec {
    /// Whether the spec limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Sets `key` from `value`; [`RateValue::Clear`] removes it.
    pub fn set(&mut self, key: &str, value: RateValue<'_>) -> Result<(), RateError> {
        let err = |p: String| RateError::new(key, p);
        let positive = |what: &str| -> Result<Option<u64>, RateError> {
            match value {
                RateValue::Clear => Ok(None),
                RateValue::Number(0) => Err(err(format!(
                    "must be above 0 {what}; leave it out for no limit"
                ))),
                RateValue::Number(n) => Ok(Some(n)),
                RateValue::Text(t) => Err(err(format!("'{t}' is not a whole number {what}"))),
            }
        };
        match key {
            "bandwidth" => {
                self.bandwidth = sized(
                    value,
                    parse_rate,
                    "a rate such as \"20MiB/s\" or \"100Mbit/s\"",
                )
                .map_err(err)?
            }
            "burst" => {
                self.burst = sized(value, parse_bytes, "a size such as \"64MiB\"").map_err(err)?
            }
            "ops" => self.ops = positive("(operations per second)")?,
            "ops_burst" => self.ops_burst = positive("(operations)")?,
            "refill_time" => {
                self.refill_time = match value {
                    RateValue::Clear => None,
                    RateValue::Number(ms) => {
                        Some(check_refill(Duration::from_millis(ms)).map_err(err)?)
                    }
                    RateValue::Text(t) => {
                        let d = parse_duration(t).ok_or_else(|| {
                            err(format!(
                                "'{t}' is not a duration such as \"100ms\" or \"1s\""
                            ))
                        })?;
                        Some(check_refill(d).map_err(err)?)
                    }
                }
            }
            _ => {
                return Err(err(format!(
                    "unknown key (known: {})",
                    RATE_KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Checks the keys against each other: a burst needs its rate.
    pub fn check(&self) -> Result<(), RateError> {
        if self.burst.is_some() && self.bandwidth.is_none() {
            return Err(RateError::new("burst", "needs a bandwidth"));
        }
        if self.ops_burst.is_some() && self.ops.is_none() {
            return Err(RateError::new("ops_burst", "needs ops"));
        }
        Ok(())
    }

    /// The limiter's buckets: each holds `refill_time` of its rate.
    pub fn limiter_config(&self) -> LimiterConfig {
        let refill = self.refill_time.unwrap_or(DEFAULT_REFILL);
        LimiterConfig {
            bandwidth: self
                .bandwidth
                .map(|r| BucketConfig::from_rate(r, refill, self.burst.unwrap_or(0))),
            ops: self
                .ops
                .map(|r| BucketConfig::from_rate(r, refill, self.ops_burst.unwrap_or(0))),
        }
    }

    /// The keys that are set, with their values written as a user would
    /// write them (`"20MiB/s"`), in [`RATE_KEYS`] order. Numbers stay
    /// numbers.
    pub fn entries(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(b) = self.bandwidth {
            out.push(("bandwidth", Value::String(format_rate(b))));
        }
        if let Some(b) = self.burst {
            out.push(("burst", Value::String(format_bytes(b))));
        }
        if let Some(n) = self.ops {
            out.push(("ops", n.into()));
        }
        if let Some(n) = self.ops_burst {
            out.push(("ops_burst", n.into()));
        }
        if let Some(d) = self.refill_time {
            out.push(("refill_time", Value::String(format_duration(d))));
        }
        out
    }

    /// The spec as a JSON object of its set keys.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.entries()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    /// Applies a JSON object of keys to `self` (`null` removes a key) and
    /// checks the result. Errors name the key.
    pub fn merge_json(&self, object: &Value) -> Result<RateSpec, RateError> {
        let spec = self.merge_json_unchecked(object)?;
        spec.check()?;
        Ok(spec)
    }

    /// [`RateSpec::merge_json`] without checking keys against each other.
    fn merge_json_unchecked(&self, object: &Value) -> Result<RateSpec, RateError> {
        let Value::Object(map) = object else {
            return Err(RateError::new(
                "rate",
                "expected an object such as {\"bandwidth\": \"20MiB/s\"}",
            ));
        };
        let mut spec = *self;
        for (key, value) in map {
            let value = match value {
                Value::Null => RateValue::Clear,
                Value::String(s) => RateValue::Text(s),
                Value::Number(n) => match n.as_u64() {
                    Some(n) => RateValue::Number(n),
                    None => return Err(RateError::new(key, format!("{n} is not a whole number"))),
                },
                _ => return Err(RateError::new(key, "expected a string, a number or null")),
            };
            spec.set(key, value)?;
        }
        Ok(spec)
    }
}

fn check_refill(d: Duration) -> Result<Duration, String> {
    if (MIN_REFILL..=MAX_REFILL).contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "{} is outside {} to {}",
            format_duration(d),
            format_duration(MIN_REFILL),
            format_duration(MAX_REFILL)
        ))
    }
}

/// A positive byte quantity from text (through `parse`) or a number.
fn sized(
    value: RateValue<'_>,
    parse: fn(&str) -> Option<u64>,
    example: &str,
) -> Result<Option<u64>, String> {
    match value {
        RateValue::Clear => Ok(None),
        RateValue::Number(0) => Err("must be above 0; leave it out for no limit".into()),
        RateValue::Number(n) => Ok(Some(n)),
        RateValue::Text(t) => match parse(t) {
            Some(0) => Err(format!("'{t}' is 0; leave it out for no limit")),
            Some(n) => Ok(Some(n)),
            None => Err(format!("'{t}' is not {example}")),
        },
    }
}

/// Splits `text` into its leading digits and the rest.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if end == 0 {
        return None;
    }
    Some((text[..end].parse().ok()?, &text[end..]))
}

/// A byte count with an optional binary suffix: `64M`, `64MiB`, `512K`,
/// `1G`, `4096`, `4096B`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let (n, unit) = split_number(text)?;
    let shift = match unit {
        "" | "B" => 0,
        "K" | "k" | "KiB" | "KB" => 10,
        "M" | "m" | "MiB" | "MB" => 20,
        "G" | "g" | "GiB" | "GB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// A rate in bytes per second: a byte count (binary suffixes) or a bit
/// rate (decimal: `kbit`, `Mbit`, `Gbit`), with an optional `/s`.
pub fn parse_rate(text: &str) -> Option<u64> {
    let text = text.strip_suffix("/s").unwrap_or(text);
    let (n, unit) = split_number(text)?;
    let bits = match unit {
        "bit" => 1,
        "kbit" | "Kbit" => 1_000,
        "Mbit" => 1_000_000,
        "Gbit" => 1_000_000_000,
        _ => return parse_bytes(text),
    };
    Some(n.checked_mul(bits)? / 8)
}

/// A duration: `100ms`, `1s`, `500us`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (n, unit) = split_number(text)?;
    match unit {
        "us" => Some(Duration::from_micros(n)),
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

/// A byte count with the largest binary suffix that keeps it exact.
pub fn format_bytes(n: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// A rate as [`parse_rate`] reads it back: binary bytes when exact, else a
/// decimal bit rate when exact, else bytes.
pub fn format_rate(bytes_per_s: u64) -> String {
    let bytes = format_bytes(bytes_per_s);
    if bytes.ends_with("iB") {
        return format!("{bytes}/s");
    }
    let bits = u128::from(bytes_per_s) * 8;
    for (div, unit) in [
        (1_000_000_000, "Gbit"),
        (1_000_000, "Mbit"),
        (1_000, "kbit"),
    ] {
        if bits.is_multiple_of(div) {
            return format!("{}{unit}/s", bits / div);
        }
    }
    format!("{bytes}/s")
}

/// A duration in the largest whole unit.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1_000) {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}

/// Errors from a `limit` request on a running VM.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LimitError {
    #[error("device: no device '{0}' (this VM has: {1})")]
    UnknownDevice(String, String),
    #[error("{0}")]
    Bad(RateError),
}

/// One limited queue direction of a running VM.
#[derive(Debug)]
struct Entry {
    name: String,
    limiter: Arc<DeviceLimiter>,
    spec: Mutex<RateSpec>,
}

/// The rate limiters of a running VM's disks and NICs, by device name.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    entries: Arc<Vec<Entry>>,
}

/// Builds [`Limits`] while devices are created.
#[derive(Debug, Default)]
pub struct LimitsBuilder {
    entries: Vec<Entry>,
}

impl LimitsBuilder {
    /// A limiter for device `name` under `spec`, kept for run-time changes.
    pub fn add(
        &mut self,
        name: String,
        spec: RateSpec,
    ) -> Result<Arc<DeviceLimiter>, RateLimiterError> {
        let limiter = DeviceLimiter::new(spec.limiter_config())?;
        self.entries.push(Entry {
            name,
            limiter: limiter.clone(),
            spec: Mutex::new(spec),
        });
        Ok(limiter)
    }

    pub fn build(self) -> Limits {
        Limits {
            entries: Arc::new(self.entries),
        }
    }
}

impl Limits {
    fn names(&self) -> String {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        if names.is_empty() {
            "no disks or NICs".into()
        } else {
            names.join(", ")
        }
    }

    /// The entries `device` names: itself, or both directions of a NIC.
    fn select(&self, device: &str) -> Result<Vec<&Entry>, LimitError> {
        let picked: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| {
                e.name == device
                    || e.name
                        .strip_prefix(device)
                        .is_some_and(|rest| rest == "-rx" || rest == "-tx")
            })
            .collect();
        if picked.is_empty() {
            return Err(LimitError::UnknownDevice(device.to_string(), self.names()));
        }
        Ok(picked)
    }

    /// Changes the limits of `device`: `rate` (a JSON object of keys) is
    /// merged into each selected direction's spec, or replaces it when
    /// `replace`. Every direction is checked before any changes, so a bad
    /// value leaves the old limits in force. Returns the new state.
    pub fn apply(&self, device: &str, rate: &Value, replace: bool) -> Result<Value, LimitError> {
        let picked = self.select(device)?;
        let mut new = Vec::with_capacity(picked.len());
        for entry in &picked {
            let base = if replace {
                RateSpec::default()
            } else {
                *lock(&entry.spec)
            };
            let spec = base
                .merge_json(rate)
                .map_err(|e| LimitError::Bad(e.within("rate")))?;
            new.push(spec);
        }
        for (entry, spec) in picked.iter().zip(new) {
            let mut current = lock(&entry.spec);
            entry.limiter.set_config(spec.limiter_config());
            *current = spec;
        }
        Ok(self.report_of(&picked))
    }

    /// Every device's limit and throttling counters, for `info`.
    pub fn report(&self) -> Value {
        let all: Vec<&Entry> = self.entries.iter().collect();
        self.report_of(&all)
    }

    fn report_of(&self, entries: &[&Entry]) -> Value {
        let list: Vec<Value> = entries
            .iter()
            .map(|e| {
                let stats = e.limiter.stats();
                let mut m = Map::new();
                m.insert("device".into(), e.name.clone().into());
                m.insert("limit".into(), lock(&e.spec).to_json());
                m.insert(
                    "throttled_ms".into(),
                    (stats.throttled.as_millis() as u64).into(),
                );
                m.insert("delayed_ops".into(), stats.delayed_ops.into());
                m.insert("delayed_bytes".into(), stats.delayed_bytes.into());
                m.insert("waiting".into(), stats.waiting.into());
                Value::Object(m)
            })
            .collect();
        json!(list)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses the fields of a control request `{"op":"limit","device":D,
/// "rate":{...},"replace":B}` (the caller has matched `op`).
pub fn parse_limit_request(map: &Map<String, Value>) -> Result<LimitRequest, String> {
    if let Some(key) = map
        .keys()
        .find(|k| !["op", "device", "rate", "replace"].contains(&k.as_str()))
    {
        return Err(format!("unknown field '{key}'"));
    }
    let device = match map.get("device") {
        Some(Value::String(d)) if !d.is_empty() => d.clone(),
        Some(_) => return Err("device: expected a device name such as \"disk0\"".into()),
        None => return Err("device: missing".into()),
    };
    let rate = match map.get("rate") {
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err("rate: expected an object such as {\"bandwidth\": \"20MiB/s\"}".into())
        }
        None => return Err("rate: missing".into()),
    };
    // Each value is checked now, whatever the device; how they combine
    // with the limits in force is checked when they are applied.
    RateSpec::default()
        .merge_json_unchecked(&rate)
        .map_err(|e| e.within("rate").to_string())?;
    let replace = match map.get("replace") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("replace: not true or false".into()),
    };
    Ok(LimitRequest {
        device,
        rate,
        replace,
    })
}

/// A request to change a device's limits while the VM runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRequest {
    pub device: String,
    pub rate: Value,
    pub replace: bool,
}

#[cfg(test)]
#[path = "rate_tests.rs"]
mod tests;
