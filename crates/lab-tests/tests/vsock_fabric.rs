//! Lab tier: guest-to-guest vsock under the daemon. `ferrovisor up` brings
//! up two guests of the kit with vsock and one `[[vsock_allow]]` rule
//! (alpha may reach beta's port 5000). Beta listens on ports 5000 and 5001;
//! alpha sends a line to 5000 and reads beta's answer, then tries 5001,
//! which the policy forbids: its connect fails, beta hears nothing, and the
//! daemon logs the refusal.

use std::path::Path;

use lab_tests::daemon::{env_path, Daemon};
use lab_tests::retry::{all_hold, retried, Try, TRIES};
use lab_tests::GuestConfig;

/// An inline guest of the system file: the kit running `run`, with vsock
/// CID `cid` on a socket in its runtime directory (the daemon's rule).
fn guest(dir: &Path, name: &str, cid: u32, run: &str) -> String {
    let config = GuestConfig {
        run: Some(run.to_string()),
        ..GuestConfig::default()
    };
    let socket = dir.join(format!("state/guests/{name}/run/v.sock"));
    format!(
        "[guests.{name}]\nkernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{}\"\ncpus = 1\n\
         memory = \"256M\"\nvsock = {{ cid = {cid}, socket = \"{}\" }}\n\n",
        env_path("FERROVISOR_KERNEL").display(),
        env_path("FERROVISOR_INITRAMFS").display(),
        config.cmdline(),
        socket.display(),
    )
}

/// One try: both guests at once (see `lab_tests::retry`).
fn attempt(n: u32) -> Result<(), Try> {
    let daemon = Daemon::start(&format!("vf{n}"), &["alpha", "beta"]);
    let beta = "vsock listen 5001 never-allowed & sleep 1; \
                vsock listen 5000 reply-from-beta; echo beta-status $?; wait";
    let alpha = "for i in $(seq 60); do \
                   vsock connect 4 5000 hello-from-alpha && break; sleep 1; \
                 done; \
                 vsock connect 4 5001 forbidden-line; echo forbidden-status $?";
    let mut system = guest(&daemon.dir, "beta", 4, beta);
    system.push_str(&guest(&daemon.dir, "alpha", 3, alpha));
    system.push_str("[[vsock_allow]]\nfrom = \"alpha\"\nto = \"beta\"\nport = 5000\n");
    let file = daemon.dir.join("system.toml");
    std::fs::write(&file, system).expect("system file");
    daemon.try_up(&file)?;
    daemon.try_wait_console("alpha", "forbidden-status")?;
    let (a, b) = (daemon.console("alpha"), daemon.console("beta"));
    let checks = [
        (
            a.contains("vsock: received reply-from-beta"),
            "alpha got beta's answer",
        ),
        (
            b.contains("vsock: received hello-from-alpha"),
            "beta got alpha's line",
        ),
        (b.contains("beta-status 0"), "beta's listener ended well"),
        (
            a.contains("forbidden-status 2"),
            "the forbidden connect failed",
        ),
        (
            a.contains("connect to cid 4 port 5001"),
            "alpha said which connect failed",
        ),
        (!b.contains("forbidden-line"), "beta heard nothing on 5001"),
        (
            daemon.log().contains(
                "vsock: guest 'alpha' to CID 4 port 5001 refused: the policy does not allow it",
            ),
            "the daemon logged the refusal",
        ),
    ];
    all_hold(&checks, || daemon.describe())
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn a_guest_reaches_another_guest_over_vsock_only_where_the_policy_allows() {
    retried("guest-to-guest vsock", TRIES, attempt).unwrap_or_else(|e| panic!("{e}"));
}
