//! Developer commands for Ferrovisor: `cargo xtask <command>`.

#[macro_use]
mod util;
mod bench;
mod bench_blk;
mod bench_distro;
mod bench_fabric;
mod bench_fabric_guests;
mod bench_fabric_region;
mod bench_fabric_switch;
mod bench_rate;
mod bench_sched;
mod cpio;
mod deb;
mod demo;
mod demo_fabric;
mod distro;
mod elf;
mod fuzz;
mod guestkit;
mod ivshmem_server;
mod kmod;
mod kvm_trace;
mod lab;
mod lab_qemu;
mod testcmd;
mod watchdog;

use std::process::ExitCode;

use util::Result;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  guest-kit [--distro]      build the default Linux guest (kernel, vmlinux, initramfs);
                            --distro: a Debian bookworm image with systemd (debootstrap)
  lab [OPTS] [-- CMD...]    boot the lab (emulated AMD SVM machine with KVM) and run
                            CMD there (words joined, run by /bin/sh); no CMD: a shell
      --qemu                also ship qemu-system-x86_64 into the lab
      --add HOST[:LABPATH]  ship a host file (default /lab/bin/NAME)
  test [--host-only|--lab-only] [--only BINARY] [--stand-in qemu]
                            run all test tiers: cargo test --workspace, then the
                            lab tests in one lab boot; ends with `N passed, M failed`;
                            --only: one lab-tests binary (e.g. distro);
                            --stand-in qemu: QEMU plays the VMM (checks the tests)
  demo [--distro] [--cpus N] [--memory SIZE] [--run 'CMD']
                            boot the guest kit under ferrovisor (inside the lab when
                            the host's KVM is PVM); --run: run CMD, exit with its status
  bench boot [--runs N] [--q35]
                            boot-time, VM-exit and memory comparison with QEMU (in the lab)
  bench boot --distro [--runs N] [--qemu-runs N]
                            boot the Debian image N times (default 20) under
                            ferrovisor, then under QEMU (default 3): time to
                            multi-user and every failed boot (in the lab)
  bench blk [--runs N] [--size MIB] [--secs N]
                            virtio-blk MiB/s and IOPS in the guest, against QEMU (in the lab)
  bench rate [--size MIB] [--secs N] [--net MIB]
                            a disk limited to 20 MiB/s and 500 IOPS and a NIC limited to
                            100 Mbit/s under a flooding guest: achieved against the limit
  bench fabric --switch-only [--secs N]
                            the switch core's forwarding rate (frames/s, 64 B and
                            1500 B, hub and bridge) with a host-side frame generator
  bench sched [share|cap|rt|partitions|rate]
                            CPU policies on tiny guests on this host: shares by
                            weight, a cap, real-time misses, partition jitter;
                            then bench rate (in the lab)
  fuzz [--seconds N | --runs N] [TARGET...]
                            run the cargo-fuzz targets in fuzz/ one after the other
                            (default: all, 60 s each; needs nightly, installs
                            cargo-fuzz); prints executions, exec/s, corpus, crashes
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
        "guest-kit" => match rest.first().map(String::as_str) {
            Some("--distro") if rest.len() == 1 => {
                let built = distro::build()?;
                println!("distribution image: {}", built.image.display());
                println!("  kernel     {}", built.vmlinuz.display());
                println!("  initrd     {}", built.initrd.display());
                println!("  cmdline    {}", distro::DISTRO_CMDLINE);
                Ok(0)
            }
            _ => {
                no_args(command, rest)?;
                guestkit::command()?;
                Ok(0)
            }
        },
        "lab" => lab::command(rest),
        "test" => testcmd::command(rest),
        "demo" => demo::command(rest),
        "bench" => bench::command(rest),
        "bench-in-lab" => bench::in_lab(rest),
        "fuzz" => fuzz::command(rest),
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
