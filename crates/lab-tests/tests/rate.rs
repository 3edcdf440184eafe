//! Lab tier: I/O rate limits seen from a real Linux guest. A disk limited to
//! 8 MiB/s keeps the guest's `dd` within the limit; raising the limit through
//! the VMM's control socket while a second `dd` waits for tokens makes that
//! `dd` faster than the old limit allowed. Both rates are measured inside
//! the guest (`/proc/uptime`) over multi-second transfers: they bound what
//! the guest gets, not how fast our code runs.

use lab_tests::{tail, wait_in_file, Guest, GuestConfig};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// The limit the guest starts with, and the one it is raised to.
const LIMIT_MIB_S: f64 = 8.0;
const RAISED: &str = "64MiB/s";
/// MiB the first `dd` reads, and the second (long enough under the old
/// limit, 12 s, that the raise lands while it runs).
const READ_MIB: u64 = 24;
const SECOND_MIB: u64 = 96;
/// The measured rate may pass the limit by this share: the bucket starts
/// full (100 ms of the rate) and the guest's clock ticks every 10 ms.
const MARGIN: f64 = 0.10;

/// A fresh directory for the test's files.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-rate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run")).expect("create the scratch directory");
    dir
}

/// One request on the VMM's control socket; its reply as JSON.
fn control(dir: &Path, request: &str) -> Result<serde_json::Value, String> {
    let reply = lab_tests::control(dir, request)?;
    serde_json::from_str(&reply).map_err(|e| format!("reply {reply:?}: {e}"))
}

/// The rate of `mib` MiB over the guest's line `NAME START END` (uptime
/// seconds).
fn rate(console: &str, name: &str, mib: u64) -> Option<f64> {
    let line = console.lines().find_map(|l| l.trim().strip_prefix(name))?;
    let mut words = line.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(start)), Some(Ok(end))) = (words.next(), words.next()) else {
        return None;
    };
    (end > start).then(|| mib as f64 / (end - start))
}

/// The guest: a timed read under the first limit, then a marker and a
/// longer timed read, during which the host raises the limit.
fn script() -> String {
    let (n, m) = (READ_MIB, SECOND_MIB);
    format!(
        "up() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(up); dd if=/dev/vda of=/dev/null bs=1M count={n} iflag=direct 2>/dev/null; b=$(up); \
         echo \"phase1 $a $b\"; echo raise-now; \
         a=$(up); dd if=/dev/vda of=/dev/null bs=1M count={m} skip={n} iflag=direct 2>/dev/null; \
         b=$(up); echo \"phase2 $a $b\"; echo rate-done"
    )
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn a_limited_disk_holds_dd_to_its_rate_and_a_raise_at_run_time_takes_effect() {
    let dir = scratch();
    let runtime = dir.join("run");
    let data = dir.join("data.img");
    let size = (READ_MIB + SECOND_MIB) * MIB;
    std::fs::write(&data, vec![0x5a; size as usize]).expect("write the image");
    let mut guest = Guest::start(&GuestConfig {
        run: Some(script()),
        runtime_dir: Some(runtime.clone()),
        extra_args: vec![
            "--disk".into(),
            format!(
                "path={},bandwidth={}MiB/s",
                data.display(),
                LIMIT_MIB_S as u64
            ),
        ],
        ..GuestConfig::default()
    })
    .expect("start the VMM");
    let log = runtime.join("console.log");
    let fail = |guest: Guest, e: String| -> ! {
        let exit = guest.kill().expect("the VMM ends");
        panic!("{e}\n--- VMM stderr ---\n{}", tail(&exit.stderr, 10));
    };
    if let Err(e) = wait_in_file(&mut guest, &log, "raise-now") {
        fail(guest, e);
    }
    let raised = format!(r#"{{"op":"limit","device":"disk0","rate":{{"bandwidth":"{RAISED}"}}}}"#);
    let reply = match control(&runtime, &raised) {
        Ok(r) => r,
        Err(e) => fail(guest, e),
    };
    // Asked while the guest still reads (it powers off once it is done):
    // the counters hold the first phase's throttling.
    let info = control(&runtime, r#"{"op":"info"}"#).unwrap_or_default();
    let console = match wait_in_file(&mut guest, &log, "rate-done") {
        Ok(c) => c,
        Err(e) => fail(guest, e),
    };
    let exit = guest.wait_exit().expect("the VMM exits");
    let d = format!(
        "limit reply {reply}\ninfo {info}\n--- console.log (tail) ---\n{}\n--- VMM stderr ---\n{}",
        tail(&console, 30),
        tail(&exit.stderr, 10)
    );
    assert_eq!(reply["ok"], true, "{d}");
    assert_eq!(reply["limits"][0]["limit"]["bandwidth"], RAISED, "{d}");
    let first = rate(&console, "phase1", READ_MIB).unwrap_or_else(|| panic!("no phase1 line\n{d}"));
    let second =
        rate(&console, "phase2", SECOND_MIB).unwrap_or_else(|| panic!("no phase2 line\n{d}"));
    println!("rate: limited to {LIMIT_MIB_S} MiB/s: {first:.2} MiB/s; raised to {RAISED}: {second:.2} MiB/s");
    assert!(
        first <= LIMIT_MIB_S * (1.0 + MARGIN),
        "dd read {first:.2} MiB/s from a disk limited to {LIMIT_MIB_S} MiB/s\n{d}"
    );
    assert!(
        first >= LIMIT_MIB_S * 0.5,
        "dd read only {first:.2} MiB/s under a {LIMIT_MIB_S} MiB/s limit: the limiter held it back far below its rate\n{d}"
    );
    assert!(
        second > LIMIT_MIB_S * 1.5,
        "after the raise to {RAISED}, dd read {second:.2} MiB/s: no faster than the old {LIMIT_MIB_S} MiB/s\n{d}"
    );
    let disk = &info["rate_limits"][0];
    assert_eq!(disk["device"], "disk0", "{d}");
    assert!(
        disk["delayed_ops"].as_u64().unwrap_or(0) > 0,
        "no request counted as delayed\n{d}"
    );
    assert!(
        disk["throttled_ms"].as_u64().unwrap_or(0) > 0,
        "no time counted as throttled\n{d}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
