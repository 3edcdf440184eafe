//! `cargo xtask bench fabric --switch-only`: the switch core's forwarding
//! rate on the host, with a frame generator on two ports (the `switch`
//! crate's `forward_rate` example, built in release mode). Frames per second
//! for 64 B and 1500 B frames in hub mode, bridge mode, and bridge mode
//! between an access port and a trunk (a tag added or removed per frame).
//!
//! `--guests` measures guests talking in the lab: TCP through each way of
//! joining two guests, QEMU's beside Ferrovisor's, and the shared region
//! (`bench_fabric_guests.rs`). With no flag, `cargo xtask bench fabric` runs
//! both: the switch core here, then the guests in one lab session.

use std::process::Command;

use crate::util::{self, Result};

const USAGE: &str = "usage: cargo xtask bench fabric [--switch-only [--secs N] | \
                     --guests [--runs N] [--secs N] [--tries N] [--only PARTS]]";

/// Builds and runs the forwarding-rate benchmark, niced so that it leaves
/// the machine to interactive work.
pub fn command(args: &[String]) -> Result<u8> {
    if args.iter().any(|a| a == "--guests") {
        return crate::bench_fabric_guests::command(args);
    }
    if args.is_empty() {
        let core = command(&["--switch-only".to_string()])?;
        let guests = crate::bench_fabric_guests::command(&["--guests".to_string()])?;
        return Ok(core.max(guests));
    }
    let mut switch_only = false;
    let mut secs = 2u64;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--switch-only" => switch_only = true,
            "--secs" => {
                let n = it.next().ok_or_else(|| fail!("{USAGE}"))?;
                secs = match n.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(fail!("--secs: `{n}` is not a positive number")),
                };
            }
            _ => return Err(fail!("{USAGE}")),
        }
    }
    if !switch_only {
        return Err(fail!("{USAGE}"));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new("nice")
            .args(["-n", "15", &cargo, "build", "--release", "-p", "switch"])
            .args(["--example", "forward_rate"])
            .current_dir(util::workspace_root()),
    )?;
    let bin = util::target_dir().join("release/examples/forward_rate");
    if !bin.is_file() {
        return Err(fail!("cargo built no {}", bin.display()));
    }
    util::run(
        Command::new("nice")
            .args(["-n", "15"])
            .arg(&bin)
            .arg(secs.to_string()),
    )?;
    Ok(0)
}
