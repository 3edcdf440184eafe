//! `ferrovisor switch show NAME [--json]` and `ferrovisor switch list
//! [--json]`: a switch's ports with their MAC, VLANs and counters, from
//! `GET /switches/NAME` and `GET /switches`; `ferrovisor switch delete
//! NAME` stops a switch (`DELETE /switches/NAME`).

use std::process::ExitCode;

use serde_json::Value;

use super::{print_json, CliError, Words};

/// One table row per port.
pub fn port_lines(switch: &Value) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<14} {:<17} {:<12} {:>9} {:>12} {:>9} {:>12} {:>6} {:>7} {:>7}",
        "port",
        "mac",
        "vlan",
        "rx_frames",
        "rx_bytes",
        "tx_frames",
        "tx_bytes",
        "drops",
        "spoofed",
        "learned"
    )];
    for p in switch["ports"].as_array().into_iter().flatten() {
        let vlan = match (&p["vlan"]["access"], &p["vlan"]["trunk"]) {
            (Value::Number(n), _) => format!("access {n}"),
            (_, Value::Array(ids)) => format!(
                "trunk {}",
                ids.iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ => "-".into(),
        };
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        lines.push(format!(
            "{:<14} {:<17} {:<12} {:>9} {:>12} {:>9} {:>12} {:>6} {:>7} {:>7} {:>7}",
            p["port"].as_str().unwrap_or("?"),
            p["mac"].as_str().unwrap_or("-"),
            vlan,
            n("rx_frames"),
            n("rx_bytes"),
            n("tx_frames"),
            n("tx_bytes"),
            n("drops"),
            n("spoofed"),
            n("tx_refused"),
            n("learned"),
        ));
    }
    lines
}

fn print_switch(switch: &Value) {
    println!(
        "switch {} ({})",
        switch["name"].as_str().unwrap_or("?"),
        switch["mode"].as_str().unwrap_or("?")
    );
    if let Some(e) = switch["error"].as_str() {
        println!("  {e}");
        return;
    }
    for line in port_lines(switch) {
        println!("  {line}");
    }
}

pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    let words = Words::parse(rest, &["socket"], &["json"])?;
    let client = words.client();
    let named = || -> Result<&str, CliError> {
        let [_, name] = words.positional.as_slice() else {
            return Err(CliError::Usage(
                "usage: ferrovisor switch show|delete NAME".into(),
            ));
        };
        if config::check_guest_name(name).is_err() {
            return Err(CliError::Usage(format!(
                "'{name}' is not a switch name (1 to 32 characters: a-z, 0-9 and -)"
            )));
        }
        Ok(name)
    };
    match words.positional.first().map(String::as_str) {
        Some("delete") => {
            let name = named()?;
            let reply = client.call("DELETE", &format!("/switches/{name}"), None)?;
            if words.switch("json") {
                print_json(&reply);
            } else {
                println!("switch {name}: stopped");
            }
        }
        Some("show") => {
            let name = named()?;
            let shown = client.call("GET", &format!("/switches/{name}"), None)?;
            if words.switch("json") {
                print_json(&shown);
            } else {
                print_switch(&shown);
            }
        }
        Some("list") if words.positional.len() == 1 => {
            let all = client.call("GET", "/switches", None)?;
            if words.switch("json") {
                print_json(&all);
            } else {
                for s in all["switches"].as_array().into_iter().flatten() {
                    print_switch(s);
                }
            }
        }
        _ => {
            return Err(CliError::Usage(
                "usage: ferrovisor switch show NAME | list | delete NAME".into(),
            ))
        }
    }
    Ok(ExitCode::SUCCESS)
}
