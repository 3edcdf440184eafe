//! The management subcommands: `ferrovisor daemon` and the commands that
//! talk to it over its API socket (up, create, start, pause, resume, stop,
//! kill, delete, list, info, console, top, limit, sched).
//!
//! Every command takes `--socket PATH`; listings take `--json`. An error is
//! one line on stderr and exit status 1 (2 for a usage error).

mod console;
mod limit;
mod sched;
mod switch;
mod switch_serve;
mod top;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use daemon::{Client, ClientError};
use serde_json::{json, Value};
use thiserror::Error;

/// The subcommands handled here.
const COMMANDS: &[&str] = &[
    "daemon",
    "up",
    "create",
    "start",
    "pause",
    "resume",
    "stop",
    "kill",
    "delete",
    "list",
    "info",
    "console",
    "top",
    "limit",
    "sched",
    "switch",
    "switch-serve",
];

const USAGE: &str = "\
Management commands (all take --socket PATH, default /run/ferrovisor/api.sock):
  ferrovisor daemon [--socket PATH] [--state-dir DIR]   serve the API (state: /var/lib/ferrovisor)
        [--images DIR[,block=on]]...    where guest files may be (default: STATE/images)
        [--taps NAME|PREFIX*,...]       taps guests may use (default: fv*)
        [--group NAME]                  members may use the API besides root
        [--uid-range A-B] [--no-jail]   each guest is jailed with a uid from A-B
                                        (default 100000-165535)
  ferrovisor up SYSTEM.toml             create a system's guests, start those marked to start
  ferrovisor create FILE [--name N] [--start]   create a guest from a description
  ferrovisor start|pause|resume|kill|delete NAME
  ferrovisor stop NAME [--timeout SECS] graceful power-off, then kill after SECS (default 30)
  ferrovisor list [--json]              guests and their state
  ferrovisor info NAME [--json]         one guest in detail
  ferrovisor console NAME [--log]       attach to the console (Ctrl-] detaches); --log prints the log
  ferrovisor top [--once] [--json]      live per-guest table, refreshed each second
  ferrovisor limit NAME DEVICE [--bandwidth RATE] [--burst SIZE] [--ops N] [--ops-burst N]
                   [--refill-time T] [--replace]   change a running guest's disk or NIC rate
                                        limits (DEVICE: disk0, net0, net0-rx, net0-tx; off removes)
  ferrovisor sched NAME [--weight N] [--cap PCT|none] [--rt budget=B,period=P]
                   [--priority N [--policy fifo|rr]] [--fair]
                   [--pool P [--windows START+LENGTH,...]]
                                        change a running guest's CPU policy or pool
  ferrovisor switch show NAME [--json] a switch's ports: MAC, VLANs, frames, bytes, drops
  ferrovisor switch list [--json]      every switch the daemon runs, with its ports
  ferrovisor switch delete NAME        stop a switch (its guests' ports go with it)
  ferrovisor switch-serve --name NAME --mode hub|bridge --dir DIR
                   [--uplink TAP [--uplink-vlan access=N|trunk=N,M,...]]
                                        run one switch: DIR/control.sock, a vhost-user-net
                                        socket per port (no --socket)
";

/// Errors of the management commands.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot start the daemon")]
    Serve(#[from] daemon::ServeError),
    #[error("{0}")]
    Description(String),
    #[error(transparent)]
    Switch(#[from] switchd::ServeError),
    #[error("terminal")]
    Terminal(#[source] std::io::Error),
}

/// Whether `word` names a management subcommand.
pub fn is_management(word: &str) -> bool {
    COMMANDS.contains(&word)
}

/// Flags that may be given more than once.
const REPEATABLE: &[&str] = &["images"];

/// The words of one command line after the subcommand: flags with values,
/// switches, and positional words.
#[derive(Debug, Default)]
struct Words {
    flags: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
}

impl Words {
    /// Splits `words`; `valued` lists flags that take a value.
    fn parse(words: &[String], valued: &[&str], switches: &[&str]) -> Result<Words, CliError> {
        let mut out = Words::default();
        let mut it = words.iter();
        while let Some(word) = it.next() {
            if let Some(flag) = word.strip_prefix("--") {
                let (flag, inline) = match flag.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_string())),
                    None => (flag, None),
                };
                if valued.contains(&flag) {
                    let value = match inline {
                        Some(v) => v,
                        None => it
                            .next()
                            .cloned()
                            .ok_or_else(|| CliError::Usage(format!("--{flag} needs a value")))?,
                    };
                    if out.flags.iter().any(|(f, _)| f == flag) && !REPEATABLE.contains(&flag) {
                        return Err(CliError::Usage(format!("--{flag} given twice")));
                    }
                    out.flags.push((flag.to_string(), value));
                } else if switches.contains(&flag) && inline.is_none() {
                    out.switches.push(flag.to_string());
                } else {
                    return Err(CliError::Usage(format!(
                        "unknown flag '{word}'; try 'ferrovisor --help'"
                    )));
                }
            } else {
                out.positional.push(word.clone());
            }
        }
        Ok(out)
    }

    /// Every value of a repeatable flag, in order.
    fn flag_values(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(f, _)| f == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_str())
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn client(&self) -> Client {
        Client::new(self.flag("socket").unwrap_or(daemon::DEFAULT_SOCKET))
    }

    /// The one positional word, a guest name checked before it goes into a
    /// URL.
    fn guest_name(&self) -> Result<&str, CliError> {
        let name = &self.exactly(1, "one guest name")?[0];
        check_name(name)?;
        Ok(name)
    }

    /// Exactly `n` positional words, named `what` in the error.
    fn exactly(&self, n: usize, what: &str) -> Result<&[String], CliError> {
        if self.positional.len() == n {
            Ok(&self.positional)
        } else {
            Err(CliError::Usage(format!("expected {what}")))
        }
    }
}

/// Checks a guest name as the daemon will (a usage error otherwise).
fn check_name(name: &str) -> Result<(), CliError> {
    config::check_guest_name(name).map_err(|e| CliError::Usage(e.to_string()))
}

/// Prints `value` as pretty JSON.
fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Runs management command `words[0]` with the rest of `words`.
pub fn main(words: &[String]) -> ExitCode {
    let Some((command, rest)) = words.split_first() else {
        return ExitCode::from(2);
    };
    match run(command, rest) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrovisor {command}: {}", one_line(&e));
            match e {
                CliError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

fn one_line(err: &dyn std::error::Error) -> String {
    daemon::description::one_line(err)
}

fn run(command: &str, rest: &[String]) -> Result<ExitCode, CliError> {
    if rest.iter().any(|w| w == "--help" || w == "-h") {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    match command {
        "daemon" => serve(rest),
        "up" => up(rest),
        "create" => create(rest),
        "start" | "pause" | "resume" | "kill" | "delete" | "stop" => action(command, rest),
        "list" => list(rest),
        "info" => info(rest),
        "console" => console::main(rest),
        "top" => top::main(rest),
        "limit" => limit::main(rest),
        "sched" => sched::main(rest),
        "switch" => switch::main(rest),
        "switch-serve" => switch_serve::main(rest),
        _ => Err(CliError::Usage(format!("unknown command '{command}'"))),
    }
}

fn serve(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(
        rest,
        &[
            "socket",
            "state-dir",
            "images",
            "taps",
            "group",
            "uid-range",
        ],
        &["no-jail"],
    )?;
    words.exactly(0, "no arguments besides the daemon's flags")?;
    let usage = |e: daemon::images::ImagesError| CliError::Usage(e.to_string());
    let images = words
        .flag_values("images")
        .into_iter()
        .map(daemon::images::RootSpec::parse)
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    let taps = words
        .flag("taps")
        .map(daemon::images::Taps::parse)
        .transpose()
        .map_err(usage)?;
    let uid_range = match words.flag("uid-range") {
        None => jail::DEFAULT_UID_RANGE,
        Some(text) => jail::parse_uid_range(text).ok_or_else(|| {
            CliError::Usage(format!(
                "--uid-range: '{text}' is not a range FIRST-LAST of uids above 0"
            ))
        })?,
    };
    let options = daemon::Options {
        socket: PathBuf::from(words.flag("socket").unwrap_or(daemon::DEFAULT_SOCKET)),
        state_dir: PathBuf::from(words.flag("state-dir").unwrap_or(daemon::DEFAULT_STATE_DIR)),
        images,
        taps,
        group: words.flag("group").map(str::to_string),
        jail: !words.switch("no-jail"),
        uid_range,
    };
    daemon::serve(&options)?;
    Ok(ExitCode::SUCCESS)
}

/// A guest's name from its file name: `web.toml` → `web`.
fn name_from_file(path: &Path) -> Result<String, CliError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or_else(|| CliError::Usage(format!("cannot name a guest after {}", path.display())))
}

fn create(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket", "name"], &["json", "start"])?;
    let file = PathBuf::from(&words.exactly(1, "one description file")?[0]);
    let name = match words.flag("name") {
        Some(n) => n.to_string(),
        None => name_from_file(&file)?,
    };
    check_name(&name)?;
    // Read here, so that relative paths are taken from the file's directory.
    let guest = config::load_guest(&file).map_err(|e| CliError::Description(e.to_string()))?;
    let text = config::to_guest_toml(&guest);
    let body = json!({ "name": name, "config": text, "start": words.switch("start") });
    let info = words.client().call("POST", "/guests", Some(&body))?;
    if words.switch("json") {
        print_json(&info);
    } else {
        println!("{name}: {}", info["state"].as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}

fn action(command: &str, rest: &[String]) -> Result<ExitCode, CliError> {
    let valued: &[&str] = if command == "stop" {
        &["socket", "timeout"]
    } else {
        &["socket"]
    };
    let words = Words::parse(rest, valued, &["json"])?;
    let name = words.guest_name()?;
    let timeout = match words.flag("timeout") {
        None => None,
        Some(t) => Some(t.parse::<u64>().map_err(|_| {
            CliError::Usage(format!("--timeout: '{t}' is not a number of seconds"))
        })?),
    };
    let client = words.client();
    let result = if command == "delete" {
        client.call("DELETE", &format!("/guests/{name}"), None)?
    } else {
        let target = match timeout {
            Some(t) => format!("/guests/{name}/{command}?timeout={t}"),
            None => format!("/guests/{name}/{command}"),
        };
        client.call("POST", &target, None)?
    };
    if words.switch("json") {
        print_json(&result);
    } else {
        let mut line = format!("{name}: {}", result["state"].as_str().unwrap_or("?"));
        if let Some(reason) = result["exit"]["reason"].as_str() {
            line.push_str(&format!(" ({reason})"));
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A size in bytes shown as M or G.
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// Milliseconds shown as h:mm:ss.
fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn list(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket"], &["json"])?;
    words.exactly(0, "no arguments")?;
    let listing = words.client().call("GET", "/guests", None)?;
    if words.switch("json") {
        print_json(&listing);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<8} {:>5} {:>7} {:>8} {:>9}",
        "NAME", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME"
    );
    let mut stale = false;
    for g in listing["guests"].as_array().into_iter().flatten() {
        let mut state = g["state"].as_str().unwrap_or("?").to_string();
        if g["stale"] == true {
            state.push('*');
            stale = true;
        }
        println!(
            "{:<20} {:<8} {:>5} {:>7} {:>8} {:>9}",
            g["name"].as_str().unwrap_or("?"),
            state,
            g["vcpus"].as_u64().unwrap_or(0),
            human_size(g["memory_bytes"].as_u64().unwrap_or(0)),
            g["pid"].as_i64().map_or("-".to_string(), |p| p.to_string()),
            g["uptime_ms"]
                .as_u64()
                .map_or("-".to_string(), human_duration),
        );
    }
    if stale {
        println!("* its VMM did not answer in time: last known figures");
    }
    Ok(ExitCode::SUCCESS)
}

fn info(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket"], &["json"])?;
    let name = words.guest_name()?;
    let info = words
        .client()
        .call("GET", &format!("/guests/{name}"), None)?;
    if words.switch("json") {
        print_json(&info);
        return Ok(ExitCode::SUCCESS);
    }
    let show = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for key in [
        "name",
        "state",
        "vcpus",
        "memory_bytes",
        "pid",
        "vcpu_tids",
        "uptime_ms",
        "cpu_time_ms",
        "exits",
        "stale",
    ] {
        println!("{key:<13} {}", show(&info[key]));
    }
    if let Some(backing) = info["memory"]["backing"].as_str() {
        println!("{:<13} {}", "ram", memory_line(backing, &info["memory"]));
    }
    if let Some(reason) = info["exit"]["reason"].as_str() {
        println!("{:<13} {reason}", "exit");
    }
    for line in limit::device_lines(&info["rate_limits"]) {
        println!("{:<13} {line}", "rate");
    }
    for port in info["switch_ports"].as_array().into_iter().flatten() {
        let lines = switch::port_lines(&serde_json::json!({ "ports": [port] }));
        println!(
            "{:<13} {}: {}",
            "switch",
            port["switch"].as_str().unwrap_or("?"),
            lines.get(1).map(|l| l.trim_end()).unwrap_or("")
        );
    }
    sched::print_vcpus(&info);
    println!("config:\n{}", info["config"].as_str().unwrap_or(""));
    Ok(ExitCode::SUCCESS)
}

/// Guest RAM in one line: `anonymous, 212M resident, 96% on huge pages`.
fn memory_line(backing: &str, memory: &Value) -> String {
    let resident = memory["resident_bytes"].as_u64().unwrap_or(0);
    let huge = memory["huge_bytes"].as_u64().unwrap_or(0);
    let share = (huge * 100).checked_div(resident).unwrap_or(0);
    format!(
        "{backing}, {} resident, {share}% on huge pages",
        human_size(resident)
    )
}

/// Brings up one guest of a system: created if it does not exist yet (an
/// existing guest keeps its description), started if it boots with the
/// system and is not running.
fn up_one(
    client: &Client,
    name: &str,
    config: &config::VmConfig,
    boot: bool,
) -> Result<Value, CliError> {
    let path = format!("/guests/{name}");
    match client.call("GET", &path, None) {
        Ok(info) => {
            let state = info["state"].as_str().unwrap_or("");
            if boot && matches!(state, "created" | "stopped" | "crashed") {
                return Ok(client.call("POST", &format!("{path}/start"), None)?);
            }
            Ok(info)
        }
        Err(ClientError::Api { status: 404, .. }) => {
            let body = json!({
                "name": name,
                "config": config::to_guest_toml(config),
                "start": boot,
            });
            Ok(client.call("POST", "/guests", Some(&body))?)
        }
        Err(e) => Err(e.into()),
    }
}

fn up(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket"], &["json"])?;
    let file = PathBuf::from(&words.exactly(1, "one system file")?[0]);
    let system = config::load_system(&file).map_err(|e| CliError::Description(e.to_string()))?;
    let client = words.client();
    // Pools, so that a running guest can later move into one.
    for pool in &system.pools {
        let mut body = json!({
            "cpus": vmm::config::format_cpu_list(&pool.cpus),
            "policy": pool.policy.name(),
        });
        if let Some(frame) = pool.frame_ns {
            body["frame"] = vmm::sched::format_duration(frame).into();
        }
        client.call("PUT", &format!("/pools/{}", pool.name), Some(&body))?;
    }
    // Switches first: a guest on one gets its port when it starts.
    for switch in &system.switches {
        let body = daemon::switch::spec_body(&daemon::switch::SwitchSpec {
            mode: switch.mode.as_str().to_string(),
            uplink: switch.uplink.clone(),
        });
        client.call("PUT", &format!("/switches/{}", switch.name), Some(&body))?;
        if !words.switch("json") {
            println!("switch {}: {}", switch.name, switch.mode.as_str());
        }
    }
    // Regions first: a member guest that starts inherits them.
    let mut regions = Vec::new();
    for region in &system.regions {
        let members: Vec<Value> = region
            .members
            .iter()
            .map(|(g, ro)| json!({"name": g, "access": if *ro { "ro" } else { "rw" }}))
            .collect();
        let body = json!({"size": region.size, "vectors": region.vectors, "guests": members});
        let reply = client.call("PUT", &format!("/regions/{}", region.name), Some(&body))?;
        if !words.switch("json") {
            println!("region {}: {} bytes", region.name, region.size);
        }
        regions.push(reply);
    }
    // The vsock policy before any guest starts: it replaces the daemon's.
    let rules: Vec<Value> = system
        .vsock_allow
        .iter()
        .map(|r| json!({"from": r.from, "to": r.to, "port": r.port}))
        .collect();
    client.call("PUT", "/vsock-policy", Some(&json!({ "allow": rules })))?;
    let mut results = Vec::new();
    for guest in &system.guests {
        let boot = guest.start == config::StartPolicy::Boot;
        let info = up_one(&client, &guest.name, &guest.config, boot)?;
        if !words.switch("json") {
            println!("{}: {}", guest.name, info["state"].as_str().unwrap_or("?"));
        }
        results.push(info);
    }
    if words.switch("json") {
        print_json(&json!({ "guests": results, "regions": regions }));
    }
    Ok(ExitCode::SUCCESS)
}
