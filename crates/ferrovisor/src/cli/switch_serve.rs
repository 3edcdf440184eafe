//! `ferrovisor switch-serve --name NAME --mode hub|bridge --dir DIR
//! [--uplink TAP] [--uplink-vlan access=N | --uplink-vlan trunk=N,M,...]`:
//! runs one switch process (see the `switchd` crate).

use std::path::PathBuf;
use std::process::ExitCode;

use switch::{Mode, VlanMode};

use super::{CliError, Words};

/// Parses `access=N` or `trunk=N,M,...`.
fn uplink_vlan(text: &str) -> Result<VlanMode, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "--uplink-vlan: '{text}' is not access=N or trunk=N,M,... (VLANs 1 to 4094)"
        ))
    };
    let vlan = |n: &str| {
        n.parse::<u16>()
            .ok()
            .filter(|v| (1..=4094).contains(v))
            .ok_or_else(bad)
    };
    match text.split_once('=') {
        Some(("access", n)) => Ok(VlanMode::Access(vlan(n)?)),
        Some(("trunk", list)) => {
            let ids: Vec<u16> = list.split(',').map(vlan).collect::<Result<_, _>>()?;
            if ids.iter().enumerate().any(|(i, v)| ids[..i].contains(v)) {
                return Err(bad());
            }
            Ok(VlanMode::Trunk(ids))
        }
        _ => Err(bad()),
    }
}

/// Checks the flags into the switch's options.
fn options(rest: &[String]) -> Result<switchd::Options, CliError> {
    let words = Words::parse(rest, &["name", "mode", "dir", "uplink", "uplink-vlan"], &[])?;
    words.exactly(0, "no arguments besides switch-serve's flags")?;
    let required = |flag: &str| {
        words
            .flag(flag)
            .ok_or_else(|| CliError::Usage(format!("--{flag} is required")))
    };
    let name = required("name")?;
    if !switchd::control::valid_port_name(name) {
        return Err(CliError::Usage(format!(
            "--name: '{name}' is not 1 to 64 of A-Z a-z 0-9 _ . -"
        )));
    }
    let mode = match required("mode")? {
        "hub" => Mode::Hub,
        "bridge" => Mode::Bridge,
        other => {
            return Err(CliError::Usage(format!(
                "--mode: '{other}' is not hub or bridge"
            )))
        }
    };
    let dir = required("dir")?;
    if dir.is_empty() {
        return Err(CliError::Usage("--dir is empty".into()));
    }
    let uplink_vlan = match words.flag("uplink-vlan") {
        Some(_) if words.flag("uplink").is_none() => {
            return Err(CliError::Usage("--uplink-vlan needs --uplink".into()))
        }
        Some(v) => uplink_vlan(v)?,
        None => VlanMode::default(),
    };
    Ok(switchd::Options {
        name: name.to_string(),
        mode,
        dir: PathBuf::from(dir),
        uplink: words.flag("uplink").map(str::to_string),
        uplink_vlan,
    })
}

pub fn main(rest: &[String]) -> Result<ExitCode, CliError> {
    switchd::serve(options(rest)?)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_vlans() {
        assert_eq!(uplink_vlan("access=10").ok(), Some(VlanMode::Access(10)));
        assert_eq!(
            uplink_vlan("trunk=10,20").ok(),
            Some(VlanMode::Trunk(vec![10, 20]))
        );
        for bad in ["access=0", "trunk=10,10", "trunk=", "both=1", "access=4095"] {
            assert!(uplink_vlan(bad).is_err(), "{bad}");
        }
    }
}
