//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/`, one after
//! the other, each for a time or a number of executions, and prints what
//! each did: executions, executions per second, corpus size and crashes.
//!
//! Fuzzing needs the nightly toolchain and cargo-fuzz (installed with
//! `cargo install cargo-fuzz` when missing). The fuzzers run one job each
//! at low CPU priority. The seeds in `fuzz/corpus/<target>/` and the fixed
//! crashes in `fuzz/regressions/<target>/` start each run; what the fuzzer
//! adds goes to a working corpus under the target directory, and crashing
//! inputs to `target/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{self, Context, Result};

/// What one target's run did.
#[derive(Debug, Default)]
struct Outcome {
    target: String,
    executions: u64,
    per_second: u64,
    corpus: usize,
    crash: Option<PathBuf>,
}

/// How long each target runs.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Seconds(u64),
    Runs(u64),
}

const USAGE: &str =
    "usage: cargo xtask fuzz [--seconds N | --runs N] [--sanitizer address|none] [TARGET...]";

/// What to run.
#[derive(Debug)]
struct Plan {
    budget: Budget,
    /// cargo-fuzz's sanitizer: `address` (the default) or `none`.
    sanitizer: String,
    targets: Vec<String>,
}

fn parse(args: &[String]) -> Result<Plan> {
    let mut budget = Budget::Seconds(60);
    let mut sanitizer = "address".to_string();
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |flag: &str| -> Result<u64> {
            let value = it
                .next()
                .ok_or_else(|| fail!("{flag} needs a number; {USAGE}"))?;
            match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(fail!("{flag}: '{value}' is not a positive number")),
            }
        };
        match arg.as_str() {
            "--seconds" => budget = Budget::Seconds(number("--seconds")?),
            "--runs" => budget = Budget::Runs(number("--runs")?),
            "--sanitizer" => match it.next().map(String::as_str) {
                Some(s @ ("address" | "none")) => sanitizer = s.to_string(),
                Some(other) => return Err(fail!("--sanitizer: '{other}' is not address or none")),
                None => return Err(fail!("--sanitizer needs address or none; {USAGE}")),
            },
            flag if flag.starts_with('-') => {
                return Err(fail!("unknown option `{flag}`; {USAGE}"));
            }
            target => targets.push(target.to_string()),
        }
    }
    Ok(Plan {
        budget,
        sanitizer,
        targets,
    })
}

/// The fuzz crate's directory.
fn fuzz_dir() -> PathBuf {
    util::workspace_root().join("fuzz")
}

/// The targets the fuzz crate declares (its `[[bin]]` names).
fn all_targets() -> Result<Vec<String>> {
    let manifest = fuzz_dir().join("Cargo.toml");
    let text = String::from_utf8(util::read(&manifest)?)
        .ctx(|| format!("{} is not UTF-8", manifest.display()))?;
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bin) {
            targets.push(name.trim_matches('"').to_string());
        }
    }
    Ok(targets)
}

/// Checks for the nightly toolchain and cargo-fuzz, installing cargo-fuzz
/// when it is missing.
fn ensure_tools() -> Result<()> {
    let toolchains = util::output(Command::new("rustup").args(["toolchain", "list"]))
        .map_err(|_| fail!("fuzzing needs rustup and the nightly toolchain; rustup is missing"))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        return Err(fail!(
            "fuzzing needs the nightly toolchain; install it with: rustup toolchain install nightly"
        ));
    }
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("xtask: cargo-fuzz is missing; installing it with `cargo install cargo-fuzz`");
        util::run(Command::new("cargo").args(["install", "cargo-fuzz"]))
            .map_err(|e| fail!("cannot install cargo-fuzz ({e}); run: cargo install cargo-fuzz"))?;
    }
    Ok(())
}

/// `cargo +nightly fuzz <sub> ...` with the shared options: optimised,
/// debug assertions (so arithmetic overflow is caught), the sanitizer, the
/// fuzz build's own target directory. AddressSanitizer runs without its
/// slowest checks (fake stacks for use after return, allocation stacks)
/// unless `ASAN_OPTIONS` says otherwise.
fn cargo_fuzz(sub: &str, sanitizer: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", sub, "-O", "--debug-assertions"])
        .args(["--sanitizer", sanitizer])
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(util::target_dir().join("fuzz"))
        .current_dir(util::workspace_root());
    if std::env::var_os("ASAN_OPTIONS").is_none() {
        cmd.env(
            "ASAN_OPTIONS",
            "detect_stack_use_after_return=0:malloc_context_size=0",
        );
    }
    cmd
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

/// The number after `key` in libFuzzer's final statistics.
fn stat(log: &str, key: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix(key))
        .filter_map(|rest| rest.trim_start_matches(':').trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Runs one target and reads what it did from libFuzzer's statistics.
fn run_target(target: &str, plan: &Plan) -> Result<Outcome> {
    let work = util::target_dir().join("fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    util::mkdir(&corpus)?;
    util::mkdir(&artifacts)?;
    let mut cmd = cargo_fuzz("run", &plan.sanitizer);
    cmd.arg(target).arg(&corpus);
    for seeds in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(seeds).join(target);
        if dir.is_dir() {
            cmd.arg(dir);
        }
    }
    let limit = match plan.budget {
        Budget::Seconds(n) => format!("-max_total_time={n}"),
        Budget::Runs(n) => format!("-runs={n}"),
    };
    cmd.arg("--")
        .arg(limit)
        .args(["-timeout=10", "-max_len=8192", "-print_final_stats=1"])
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .ctx(|| format!("cannot start `{}`", util::show(&cmd)))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let crash = log
        .lines()
        .filter_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| PathBuf::from(p.trim()))
        .next();
    if !out.status.success() && crash.is_none() {
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        return Err(fail!("fuzz target {target} failed ({})", out.status));
    }
    Ok(Outcome {
        target: target.to_string(),
        executions: stat(&log, "stat::number_of_executed_units"),
        per_second: stat(&log, "stat::average_exec_per_sec"),
        corpus: count_files(&corpus),
        crash,
    })
}

fn print_outcome(o: &Outcome) {
    let crashes = match &o.crash {
        Some(path) => format!("1 crash: {}", path.display()),
        None => "0 crashes".to_string(),
    };
    println!(
        "{:<12} {:>12} executions {:>8} exec/s  corpus {:>5}  {crashes}",
        o.target, o.executions, o.per_second, o.corpus
    );
}

/// `cargo xtask fuzz [--seconds N | --runs N] [TARGET...]`.
pub fn command(args: &[String]) -> Result<u8> {
    let mut plan = parse(args)?;
    let known = all_targets()?;
    if let Some(bad) = plan.targets.iter().find(|t| !known.contains(t)) {
        return Err(fail!(
            "no fuzz target `{bad}`; targets: {}",
            known.join(", ")
        ));
    }
    if plan.targets.is_empty() {
        plan.targets = known;
    }
    ensure_tools()?;
    // A long CPU-bound job on a shared machine: yield to everything else.
    // SAFETY: nice() only changes this process's priority, which the
    // fuzzers inherit; a failure leaves the priority as it was.
    unsafe { libc::nice(15) };
    eprintln!(
        "xtask: building the fuzz targets (nightly, sanitizer {})",
        plan.sanitizer
    );
    util::run(&mut cargo_fuzz("build", &plan.sanitizer))?;
    let mut outcomes = Vec::new();
    for target in &plan.targets {
        let outcome = run_target(target, &plan)?;
        print_outcome(&outcome);
        outcomes.push(outcome);
    }
    let crashed = outcomes.iter().filter(|o| o.crash.is_some()).count();
    let executions: u64 = outcomes.iter().map(|o| o.executions).sum();
    println!(
        "{} targets, {executions} executions, {crashed} with a crash",
        outcomes.len()
    );
    if crashed > 0 {
        println!(
            "a crash is fixed by making the code return an error; then copy its input to \
             fuzz/regressions/<target>/ so the unit tests replay it"
        );
    }
    Ok(u8::from(crashed > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_and_targets_are_parsed() {
        let plan = parse(&strings(&[
            "--runs",
            "1000",
            "rtc",
            "--sanitizer",
            "none",
            "http",
        ]))
        .unwrap();
        assert!(matches!(plan.budget, Budget::Runs(1000)));
        assert_eq!(plan.sanitizer, "none");
        assert_eq!(plan.targets, ["rtc", "http"]);
        let plan = parse(&[]).unwrap();
        assert!(matches!(plan.budget, Budget::Seconds(60)));
        assert_eq!(plan.sanitizer, "address");
        assert!(plan.targets.is_empty());
    }

    #[test]
    fn bad_options_are_one_line_errors() {
        for args in [
            &["--seconds"][..],
            &["--seconds", "0"],
            &["--runs", "x"],
            &["-j"],
        ] {
            let e = parse(&strings(args)).unwrap_err();
            assert!(!e.0.contains('\n'), "{e}");
        }
    }

    #[test]
    fn every_target_of_the_fuzz_crate_is_listed() {
        let targets = all_targets().unwrap();
        for t in [
            "vsock",
            "virtio_pci",
            "pci_config",
            "bzimage",
            "http",
            "system_toml",
        ] {
            assert!(
                targets.iter().any(|x| x == t),
                "{t} missing from {targets:?}"
            );
        }
    }

    #[test]
    fn libfuzzer_statistics_are_read() {
        let log = "#2\tINITED\nstat::number_of_executed_units: 1234567\n\
                   stat::average_exec_per_sec:     4321\n";
        assert_eq!(stat(log, "stat::number_of_executed_units"), 1_234_567);
        assert_eq!(stat(log, "stat::average_exec_per_sec"), 4321);
        assert_eq!(stat(log, "stat::peak_rss_mb"), 0);
    }
}
