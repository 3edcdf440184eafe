//! `sigreset`: run a program with SIGINT and SIGQUIT at their default action.
//!
//! A shell without job control (the guest's /init) starts background jobs
//! with SIGINT and SIGQUIT ignored, and a shell cannot undo that. /init runs
//! the guest's command and its interactive shell in the background, so that
//! its own SIGINT trap stays live; this helper gives them back ordinary
//! signals (so Ctrl-C works in the shell). Built with `rustc` alone into a
//! static binary.
//!
//! Usage: `sigreset PROGRAM [ARGS...]`. Exit status 127 if PROGRAM cannot run.

use std::os::unix::process::CommandExt;
use std::process::Command;

const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIG_DFL: usize = 0;

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: sigreset PROGRAM [ARGS...]");
        std::process::exit(127);
    };
    for signum in [SIGINT, SIGQUIT] {
        // SAFETY: installing the default action has no preconditions.
        unsafe { signal(signum, SIG_DFL) };
    }
    let error = Command::new(&program).args(args).exec();
    eprintln!("sigreset: cannot run {}: {error}", program.to_string_lossy());
    std::process::exit(127);
}
