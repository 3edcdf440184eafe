//! `cargo xtask demo`: boot the guest kit under Ferrovisor, directly on
//! hardware virtualization or inside the lab when the host's KVM is PVM.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::guestkit::{self, Kit};
use crate::lab::{self, Spec};
use crate::util::{self, Context, Result};

/// Options of `cargo xtask demo`.
#[derive(Debug, Default)]
struct Options {
    cpus: Option<String>,
    memory: Option<String>,
    run: Option<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| fail!("{name} needs a value"))
        };
        match arg.as_str() {
            "--cpus" => opts.cpus = Some(value("--cpus")?),
            "--memory" => opts.memory = Some(value("--memory")?),
            "--run" => opts.run = Some(value("--run")?),
            other => {
                return Err(fail!(
                    "unknown demo option `{other}`; usage: cargo xtask demo [--cpus N] [--memory SIZE] [--run 'CMD']"
                ))
            }
        }
    }
    if let Some(cpus) = &opts.cpus {
        if !cpus.parse::<u8>().is_ok_and(|n| n > 0) {
            return Err(fail!("--cpus: `{cpus}` is not a positive number"));
        }
    }
    Ok(opts)
}

/// Where the guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// /dev/kvm backed by VT-x or AMD-V.
    Hardware,
    /// /dev/kvm backed by PVM: Linux guests need the lab.
    Pvm,
}

/// Decides how this host can run Linux guests.
pub fn detect_host() -> Result<Host> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Ok(Host::Pvm);
    }
    if !Path::new("/dev/kvm").exists() {
        return Err(fail!("this host has no /dev/kvm (is KVM enabled?)"));
    }
    Ok(Host::Hardware)
}

fn vmm_args(opts: &Options, kernel: &str, initramfs: &str) -> Vec<String> {
    let mut cmdline = guestkit::DEFAULT_CMDLINE.to_string();
    if let Some(run) = &opts.run {
        cmdline.push_str(" ferrovisor.run64=");
        cmdline.push_str(&util::base64(run.as_bytes()));
        cmdline.push_str(" ferrovisor.exit=debug");
    }
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.into(),
        "--initramfs".into(),
        initramfs.into(),
        "--cmdline".into(),
        cmdline,
    ];
    if let Some(cpus) = &opts.cpus {
        args.extend(["--cpus".into(), cpus.clone()]);
    }
    if let Some(memory) = &opts.memory {
        args.extend(["--memory".into(), memory.clone()]);
    }
    args
}

/// Turns the VMM's exit status and console into the guest command's status.
fn command_status(vmm_status: i32, console: &str) -> u8 {
    const PREFIX: &str = "ferrovisor-guest: exit status ";
    let reported = console.lines().rev().find_map(|l| {
        let at = l.find(PREFIX)?;
        l[at + PREFIX.len()..].trim().parse::<u8>().ok()
    });
    match (vmm_status, reported) {
        // The debug-exit port carried the status: the VMM exits (N << 1) | 1.
        (s, _) if s & 1 == 1 => ((s >> 1) & 0xff) as u8,
        (0, Some(n)) => n,
        (0, None) => {
            eprintln!("demo: the guest powered off without reporting a status");
            0
        }
        (s, _) => {
            eprintln!("demo: ferrovisor failed (exit status {s})");
            u8::try_from(s.clamp(1, 255)).unwrap_or(1)
        }
    }
}

fn run_direct(opts: &Options, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    let args = vmm_args(
        opts,
        &kit.vmlinuz.to_string_lossy(),
        &kit.initramfs.to_string_lossy(),
    );
    let mut cmd = Command::new(ferrovisor);
    cmd.args(&args);
    if opts.run.is_none() {
        let status = cmd.status().ctx(|| "cannot start ferrovisor".to_string())?;
        return Ok(u8::try_from(status.code().unwrap_or(1).clamp(0, 255)).unwrap_or(1));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .ctx(|| "cannot start ferrovisor".to_string())?;
    let mut console = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout();
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let _ = writeln!(out, "{}", line.trim_end_matches('\r'));
            console.push_str(&line);
            console.push('\n');
        }
    }
    let status = child
        .wait()
        .ctx(|| "cannot wait for ferrovisor".to_string())?;
    Ok(command_status(status.code().unwrap_or(1), &console))
}

fn run_in_lab(opts: &Options, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    let args = vmm_args(opts, "$FERROVISOR_KERNEL", "$FERROVISOR_INITRAMFS");
    let mut line = "\"$FERROVISOR_BIN\"".to_string();
    for arg in &args {
        line.push(' ');
        if arg.starts_with('$') {
            line.push_str(&format!("\"{arg}\""));
        } else {
            line.push_str(&util::shell_quote(arg));
        }
    }
    let interactive = opts.run.is_none();
    let command = if interactive {
        // The lab console passes keystrokes through untouched to the guest.
        format!("stty raw -echo\n{line}\nstatus=$?\nstty sane\nexit $status")
    } else {
        line
    };
    let mut spec = Spec::new(Some(command));
    spec.interactive = interactive;
    spec.deadline = std::time::Duration::from_secs(10 * 60);
    let outcome = lab::run(&spec, kit, Some(ferrovisor))?;
    if interactive {
        return Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1));
    }
    Ok(command_status(outcome.status, &outcome.console))
}

/// `cargo xtask demo [--cpus N] [--memory SIZE] [--run 'CMD']`.
pub fn command(args: &[String]) -> Result<u8> {
    let opts = parse(args)?;
    let host = detect_host()?;
    let ferrovisor = lab::build_ferrovisor()?;
    let kit = guestkit::build()?;
    match host {
        Host::Hardware => {
            eprintln!("demo: host KVM uses hardware virtualization: booting the guest directly");
            run_direct(&opts, &kit, &ferrovisor)
        }
        Host::Pvm => {
            eprintln!(
                "demo: host KVM is PVM (kvm_pvm), which cannot run a stock Linux kernel: \
                 booting the guest under ferrovisor inside the lab"
            );
            if opts.run.is_none() {
                eprintln!("demo: the guest's shell follows; `exit` powers it off (Ctrl-A x kills the lab)");
            }
            run_in_lab(&opts, &kit, &ferrovisor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_debug_exit_or_console() {
        assert_eq!(command_status((3 << 1) | 1, ""), 3);
        assert_eq!(command_status(0, "x\nferrovisor-guest: exit status 5\n"), 5);
        assert_eq!(command_status(0, "no status"), 0);
        assert_eq!(command_status(2, "ferrovisor-guest: exit status 0"), 2);
    }

    #[test]
    fn options_are_checked() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&["--cpus", "0"])).is_err());
        assert!(parse(&args(&["--cpus"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        let o = parse(&args(&["--cpus", "2", "--run", "echo hi"])).expect("valid");
        assert_eq!(o.cpus.as_deref(), Some("2"));
        assert_eq!(o.run.as_deref(), Some("echo hi"));
    }
}
