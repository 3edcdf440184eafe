//! Lab tier: the control daemon runs two Debian guests of the guest kit side
//! by side. `ferrovisor up` brings up a system of two (1 vCPU, 256M each),
//! both reach /init, `list` shows them running, `console` talks to one,
//! and `stop` powers both off through Ctrl-Alt-Del.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lab_tests::daemon::{env_path, Daemon};
use lab_tests::{GuestConfig, INIT_MARKER};

/// A guest file for the kit's kernel: no command, so /init starts a shell
/// on the console.
fn write_guest_file(dir: &Path) {
    let text = format!(
        "kernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{}\"\ncpus = 1\nmemory = \"256M\"\n",
        env_path("FERROVISOR_KERNEL").display(),
        env_path("FERROVISOR_INITRAMFS").display(),
        GuestConfig::default().cmdline(),
    );
    std::fs::write(dir.join("guest.toml"), text).expect("write guest file");
    std::fs::write(
        dir.join("system.toml"),
        "[guests.alpha]\nfile = \"guest.toml\"\n\n[guests.beta]\nfile = \"guest.toml\"\n",
    )
    .expect("write system file");
}

/// Types a line into `name`'s console through `ferrovisor console`, waits
/// for its answer in the log, and detaches with Ctrl-].
fn talk(daemon: &Daemon, name: &str) {
    let mut console = daemon
        .command(&["console", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferrovisor console");
    let mut keys = console.stdin.take().expect("stdin");
    keys.write_all(b"echo console-says-$((6*7))\n")
        .expect("type");
    daemon.wait_console(name, "console-says-42");
    keys.write_all(&[0x1d]).expect("Ctrl-]");
    let deadline = Instant::now() + Duration::from_secs(30);
    while console.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "Ctrl-] did not detach");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = console.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("console-says-42"),
        "the attached console did not show the guest's answer"
    );
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn up_runs_two_debian_guests_that_stop_cleanly() {
    let daemon = Daemon::start("cp", &["alpha", "beta"]);
    write_guest_file(&daemon.dir);
    let system = daemon.dir.join("system.toml");
    daemon.ok(&["up", system.to_str().expect("utf-8")]);

    daemon.wait_console("alpha", INIT_MARKER);
    daemon.wait_console("beta", INIT_MARKER);
    let list = daemon.ok(&["list", "--json"]);
    assert_eq!(
        list.matches("\"state\": \"running\"").count(),
        2,
        "{list}\n{}",
        daemon.describe()
    );

    // Both run jailed, the daemon's default: a uid of their own, no
    // capabilities, no new privileges.
    let mut uids = Vec::new();
    for name in ["alpha", "beta"] {
        let info = daemon.ok(&["info", name, "--json"]);
        let pid: u32 = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"pid\": "))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no pid in {info}"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let uid = field("Uid:");
        assert!(!uid.starts_with('0'), "{name} runs as {uid}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{name}");
        assert_eq!(field("NoNewPrivs:"), "1", "{name}");
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "each guest has a uid of its own");

    // The shell is up once the kit says so; then talk to it.
    daemon.wait_console("alpha", "starting a shell");
    talk(&daemon, "alpha");
    assert!(daemon
        .ok(&["info", "alpha", "--json"])
        .contains("\"state\": \"running\""));

    for name in ["alpha", "beta"] {
        let stopped = daemon.ok(&["stop", name, "--timeout", "120", "--json"]);
        assert!(
            stopped.contains("\"stopped_by\": \"shutdown\""),
            "{name} did not power off on Ctrl-Alt-Del: {stopped}\n{}",
            daemon.describe()
        );
        // The kit's init powers off on Ctrl-Alt-Del (a reboot would also end
        // the VMM with 0, so the reason is checked too).
        assert!(stopped.contains("\"state\": \"stopped\""), "{stopped}");
        assert!(stopped.contains("\"status\": 0"), "{stopped}");
        assert!(stopped.contains("guest powered off"), "{stopped}");
    }
    let list = daemon.ok(&["list", "--json"]);
    assert_eq!(list.matches("\"state\": \"stopped\"").count(), 2, "{list}");
}
