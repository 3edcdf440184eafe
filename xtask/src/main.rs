//! Developer commands for Ferrovisor: `cargo xtask <command>`.

#[macro_use]
mod util;
mod bench;
mod bench_blk;
mod cpio;
mod deb;
mod demo;
mod elf;
mod guestkit;
mod kmod;
mod lab;
mod testcmd;
mod watchdog;

use std::process::ExitCode;

use util::Result;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  guest-kit                 build the default Linux guest (kernel, vmlinux, initramfs)
  lab [OPTS] [-- CMD...]    boot the lab (emulated AMD SVM machine with KVM) and run
                            CMD there (words joined, run by /bin/sh); no CMD: a shell
      --qemu                also ship qemu-system-x86_64 into the lab
      --add HOST[:LABPATH]  ship a host file (default /lab/bin/NAME)
  test [--host-only|--lab-only] [--stand-in qemu]
                            run all test tiers: cargo test --workspace, then the
                            lab tests in one lab boot; ends with `N passed, M failed`;
                            --stand-in qemu: QEMU plays the VMM (checks the tests)
  demo [--cpus N] [--memory SIZE] [--run 'CMD']
                            boot the guest kit under ferrovisor (inside the lab when
                            the host's KVM is PVM); --run: run CMD, exit with its status
  bench boot [--runs N] [--q35]
                            boot-time, VM-exit and memory comparison with QEMU (in the lab)
  bench blk [--runs N] [--size MIB] [--secs N]
                            virtio-blk MiB/s and IOPS in the guest, against QEMU (in the lab)
  help                      show this text";

/// What a command asks the process to exit with.
type Status = u8;

fn dispatch(args: &[String]) -> Result<Status> {
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => {
            println!("{USAGE}");
            return Ok(0);
        }
    };
    match command {
        "guest-kit" => {
            no_args(command, rest)?;
            guestkit::command()?;
            Ok(0)
        }
        "lab" => lab::command(rest),
        "test" => testcmd::command(rest),
        "demo" => demo::command(rest),
        "bench" => bench::command(rest),
        "bench-in-lab" => bench::in_lab(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(fail!("unknown command `{other}`; see `cargo xtask help`")),
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<()> {
    match rest.first() {
        Some(arg) => Err(fail!("`{command}` takes no argument `{arg}`")),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}
