//! `cargo xtask test`: all three test tiers, with one summary line.
//!
//! Tiers 1 and 2 (unit tests and host KVM tests) run with `cargo test
//! --workspace`. Tier 3 (lab tests) runs the `lab-tests` test binary inside
//! one lab boot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guestkit;
use crate::lab::{self, Spec};
use crate::util::{self, Context, Result};

/// Counts of passed and failed tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

/// Reads the counts from a libtest line such as
/// `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
pub fn parse_result_line(line: &str) -> Option<Tally> {
    let rest = &line[line.find("test result:")? + "test result:".len()..];
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let mut it = part.split_whitespace().rev();
            (it.next()? == word).then_some(())?;
            it.next()?.parse().ok()
        })
    };
    Some(Tally {
        passed: count("passed")?,
        failed: count("failed")?,
    })
}

/// Adds up every libtest result line in `text`.
pub fn tally_text(text: &str) -> Tally {
    let mut tally = Tally::default();
    for t in text.lines().filter_map(parse_result_line) {
        tally.add(t);
    }
    tally
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(util::workspace_root());
    cmd
}

/// Tiers 1 and 2: `cargo test --workspace`, streamed and counted.
fn host_tiers() -> Result<Tally> {
    eprintln!("xtask: tiers 1-2: cargo test --workspace");
    let mut child = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .ctx(|| "cannot run cargo test".to_string())?;
    let mut tally = Tally::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            println!("{line}");
            if let Some(t) = parse_result_line(&line) {
                tally.add(t);
            }
        }
    }
    let status = child
        .wait()
        .ctx(|| "cannot wait for cargo test".to_string())?;
    if !status.success() && tally.failed == 0 {
        eprintln!("xtask: cargo test failed ({status}) without a failing test: a build error?");
        tally.failed += 1;
    }
    Ok(tally)
}

/// Builds the lab-tests test binaries and returns (name, path) for each
/// (one per file in crates/lab-tests/tests/).
pub fn build_lab_tests() -> Result<Vec<(String, PathBuf)>> {
    let out = util::output(
        cargo()
            .args([
                "test",
                "-p",
                "lab-tests",
                "--no-run",
                "--message-format=json",
            ])
            .stdin(Stdio::null()),
    )?;
    let binaries = test_binaries(&out);
    if binaries.is_empty() {
        return Err(fail!("cargo built no lab-tests test binary"));
    }
    Ok(binaries)
}

/// Picks the test executables out of cargo's JSON messages.
fn test_binaries(json_lines: &str) -> Vec<(String, PathBuf)> {
    let field = |line: &str, key: &str| -> Option<String> {
        let key = format!("\"{key}\":\"");
        let at = line.find(&key)? + key.len();
        let end = line[at..].find('"')?;
        Some(line[at..at + end].to_string())
    };
    let mut found: Vec<(String, PathBuf)> = json_lines
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| l.contains("\"kind\":[\"test\"]"))
        .filter_map(|l| Some((field(l, "name")?, PathBuf::from(field(l, "executable")?))))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Host programs the lab tests use to check disk images.
const LAB_TOOLS: &[&str] = &["debugfs", "e2fsck"];

/// Tier 3: the lab tests, one lab boot per test binary (see
/// [`run_lab_binary`] for what a lab that hangs costs). With `qemu_stand_in`, QEMU takes the VMM's place: a
/// check of the tests and the guest kit themselves.
fn lab_tier(qemu_stand_in: bool, only: Option<&str>) -> Result<Tally> {
    let vmm = if qemu_stand_in {
        "QEMU standing in for ferrovisor"
    } else {
        "ferrovisor"
    };
    eprintln!("xtask: tier 3: lab tests (Linux guests under {vmm}, inside the lab)");
    let kit = guestkit::build()?;
    let ferrovisor = if qemu_stand_in {
        None
    } else {
        Some(lab::build_ferrovisor()?)
    };
    let mut tools = Vec::new();
    for tool in LAB_TOOLS {
        util::ensure_tool(tool, "e2fsprogs")?;
        let path = util::which(tool).ok_or_else(|| fail!("{tool} is not on PATH"))?;
        tools.push((path, format!("/lab/bin/{tool}")));
    }
    let mut tally = Tally::default();
    for (name, path) in build_lab_tests()? {
        // The control-plane, vsock-fabric and switch-fabric tests run the daemon, which
        // QEMU cannot stand in for.
        if qemu_stand_in
            && matches!(
                name.as_str(),
                "control_plane" | "vsock_fabric" | "switch_fabric"
            )
        {
            continue;
        }
        if only.is_some_and(|o| o != name) {
            continue;
        }
        eprintln!("xtask: lab tests: {name}");
        let one = run_lab_binary(
            &name,
            &path,
            &tools,
            qemu_stand_in,
            &kit,
            ferrovisor.as_deref(),
        )?;
        tally.passed += one.passed;
        tally.failed += one.failed;
    }
    Ok(tally)
}

/// How many lab boots one lab-tests binary may take.
const LAB_ATTEMPTS: u32 = 3;

/// Runs one lab-tests binary in the lab. A lab that hangs or crashes is
/// booted again and the binary resumes: the tests that already passed are
/// skipped, so that a freeze of the emulated machine costs only the test it
/// interrupted.
fn run_lab_binary(
    name: &str,
    binary: &Path,
    tools: &[(PathBuf, String)],
    qemu_stand_in: bool,
    kit: &guestkit::Kit,
    ferrovisor: Option<&Path>,
) -> Result<Tally> {
    let mut passed: Vec<String> = Vec::new();
    for attempt in 1..=LAB_ATTEMPTS {
        let mut spec = lab_spec(name, binary.to_path_buf(), &passed, qemu_stand_in);
        spec.files.extend(tools.iter().cloned());
        // The distribution's tests boot the Debian image (built once, cached).
        if name == "distro" {
            crate::distro::build()?.add_to(&mut spec);
        }
        match lab::run_once(&spec, kit, ferrovisor)? {
            Ok(outcome) => {
                let mut tally = binary_tally(name, outcome.status, &outcome.console);
                if tally.failed > 0 && attempt < LAB_ATTEMPTS && lab_stalled(&outcome.console) {
                    passed.extend(passed_tests(&outcome.console));
                    passed.sort();
                    passed.dedup();
                    eprintln!(
                        "\nxtask: LAB FAILURE: tests failed while a kernel in the lab reported \
                         a soft lockup (the emulated machine stalled under a nested guest). \
                         Booting it again (attempt {} of {LAB_ATTEMPTS}), skipping the {} tests \
                         that passed.",
                        attempt + 1,
                        passed.len()
                    );
                    continue;
                }
                tally.passed += passed.len() as u64;
                return Ok(tally);
            }
            Err(failure) => {
                passed.extend(passed_tests(&failure.console));
                passed.sort();
                passed.dedup();
                eprintln!(
                    "\nxtask: LAB FAILURE: {}. {}",
                    failure.why,
                    if attempt < LAB_ATTEMPTS {
                        format!(
                            "Booting it again (attempt {} of {LAB_ATTEMPTS}), skipping the {} \
                             tests that passed.",
                            attempt + 1,
                            passed.len()
                        )
                    } else {
                        "Giving up on these tests.".to_string()
                    }
                );
            }
        }
    }
    Ok(Tally {
        passed: passed.len() as u64,
        failed: 1,
    })
}

/// Whether a kernel in the lab (the lab's own, or a guest's shown in a
/// failure) reported a soft lockup: a CPU that ran for tens of seconds
/// without scheduling. Here that is the emulated SVM stalling, which a
/// fresh lab boot clears.
fn lab_stalled(console: &str) -> bool {
    console.contains("watchdog: BUG: soft lockup")
}

/// The names of the tests a libtest console shows as passed.
fn passed_tests(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("test ")?.strip_suffix(" ... ok"))
        .map(str::to_string)
        .collect()
}

/// The lab session that runs one lab-tests binary, one guest at a time (two
/// nested guests side by side make the lab's emulated SVM fail now and then;
/// docs/lab.md, "One guest at a time"), skipping the tests in `skip`.
fn lab_spec(name: &str, binary: PathBuf, skip: &[String], qemu_stand_in: bool) -> Spec {
    let at = format!("/lab/bin/lab-tests-{name}");
    let mut command = format!("{at} --ignored --test-threads=1");
    if !skip.is_empty() {
        command.push_str(" --exact");
        for test in skip {
            command.push_str(&format!(" --skip {test}"));
        }
    }
    let mut spec = Spec::new(Some(command));
    spec.files.push((binary, at));
    spec.interactive = false;
    if qemu_stand_in {
        let shim = util::workspace_root().join("lab/qemu-stand-in");
        spec.files
            .push((shim, "/lab/bin/qemu-stand-in".to_string()));
        spec.env
            .push(("FERROVISOR_BIN".into(), "/lab/bin/qemu-stand-in".into()));
        spec.with_qemu = true;
    }
    spec.deadline = Duration::from_secs(15 * 60);
    if let Ok(secs) = std::env::var("FERROVISOR_LAB_TIMEOUT_SECS") {
        spec.env.push(("FERROVISOR_LAB_TIMEOUT_SECS".into(), secs));
    }
    spec
}

/// Counts one binary's results; a failing status with no failed test, or no
/// test at all, counts as a failure.
fn binary_tally(name: &str, status: i32, console: &str) -> Tally {
    let mut tally = tally_text(console);
    if status != 0 && tally.failed == 0 {
        eprintln!("xtask: lab tests {name} exited with status {status} without a failing test");
        tally.failed += 1;
    }
    if tally.passed + tally.failed == 0 {
        eprintln!("xtask: lab tests {name} ran no test");
        tally.failed += 1;
    }
    tally
}

/// `cargo xtask test`.
pub fn command(args: &[String]) -> Result<u8> {
    let mut host = true;
    let mut in_lab = true;
    let mut stand_in = false;
    let mut only: Option<String> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--host-only" => in_lab = false,
            "--lab-only" => host = false,
            "--stand-in" => match args.next().map(String::as_str) {
                Some("qemu") => stand_in = true,
                _ => return Err(fail!("--stand-in: only `qemu` is known")),
            },
            "--only" => match args.next() {
                Some(name) => only = Some(name.clone()),
                None => return Err(fail!("--only needs a lab-tests binary name, e.g. distro")),
            },
            other => return Err(fail!("unknown test option `{other}`")),
        }
    }
    let start = Instant::now();
    let mut total = Tally::default();
    if host {
        total.add(host_tiers()?);
    }
    if in_lab {
        match lab_tier(stand_in, only.as_deref()) {
            Ok(t) => total.add(t),
            Err(e) => {
                eprintln!("xtask: error: lab tier: {e}");
                total.failed += 1;
            }
        }
    }
    eprintln!("xtask: all tiers took {} s", start.elapsed().as_secs());
    println!("{} passed, {} failed", total.passed, total.failed);
    Ok(if total.failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_soft_lockup_marks_a_failed_run_as_a_stalled_lab() {
        let stalled = "test a ... ok\n[   40.98] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [vcpu:149]\ntest b ... FAILED\n";
        assert!(lab_stalled(stalled));
        assert_eq!(passed_tests(stalled), vec!["a".to_string()]);
        assert!(!lab_stalled("test b ... FAILED\nassertion failed\n"));
    }

    #[test]
    fn a_resumed_lab_binary_skips_exactly_the_tests_that_passed() {
        let console = "running 3 tests\ntest a_disk ... ok\ntest b_net ... FAILED\n\
                       test c_rng ... ok\ntest d_vsock ... \n";
        let passed = passed_tests(console);
        assert_eq!(passed, ["a_disk", "c_rng"]);
        let spec = lab_spec("devices", PathBuf::from("/x"), &passed, false);
        assert_eq!(
            spec.command.as_deref(),
            Some(
                "/lab/bin/lab-tests-devices --ignored --test-threads=1 --exact \
                 --skip a_disk --skip c_rng"
            )
        );
        let fresh = lab_spec("devices", PathBuf::from("/x"), &[], false);
        assert_eq!(
            fresh.command.as_deref(),
            Some("/lab/bin/lab-tests-devices --ignored --test-threads=1")
        );
    }

    #[test]
    fn parses_libtest_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(
            parse_result_line(ok),
            Some(Tally {
                passed: 12,
                failed: 0
            })
        );
        let bad = "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(
            parse_result_line(bad),
            Some(Tally {
                passed: 1,
                failed: 2
            })
        );
        assert_eq!(parse_result_line("test foo ... ok"), None);
    }

    #[test]
    fn finds_every_test_binary() {
        let json = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"lab_tests"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"lab"},"executable":"/t/lab-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"devices"},"executable":"/t/devices-2"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        let found = test_binaries(json);
        assert_eq!(
            found,
            vec![
                ("devices".to_string(), PathBuf::from("/t/devices-2")),
                ("lab".to_string(), PathBuf::from("/t/lab-1")),
            ]
        );
    }

    #[test]
    fn tallies_several_binaries() {
        let text = "running 2 tests\ntest result: ok. 2 passed; 0 failed; 0 ignored\n\
                    [  3.1] noise\ntest result: FAILED. 4 passed; 1 failed; 0 ignored\n";
        assert_eq!(
            tally_text(text),
            Tally {
                passed: 6,
                failed: 1
            }
        );
    }
}
