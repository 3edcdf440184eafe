//! Lab tier: guests on one of the daemon's switches. `ferrovisor up` brings
//! up a learning bridge and three guests of the kit, each with a NIC on
//! it: alpha and beta on VLAN 10, gamma on VLAN 20. Beta pings alpha and
//! carries TCP to it (netbench); gamma, on the other VLAN, pings alpha and
//! gets no answer. The switch has a host tap as its uplink, an access port
//! on VLAN 10: beta pings the lab's end of it too. The switch's counters
//! show what passed (the guests stay up meanwhile: a port goes with its
//! guest), and `info` shows each guest's port.

use std::path::Path;

use lab_tests::daemon::{env_path, Daemon};
use lab_tests::retry::{all_hold, retried, Try, TRIES};
use lab_tests::GuestConfig;
use serde_json::Value;

/// An inline guest of the system file: the kit running `run`, with one NIC
/// on switch `lan` in `vlan`, at the fixed `mac`.
fn guest(name: &str, vlan: u16, mac: &str, run: &str) -> String {
    let config = GuestConfig {
        run: Some(run.to_string()),
        ..GuestConfig::default()
    };
    format!(
        "[guests.{name}]\nkernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{}\"\ncpus = 1\n\
         memory = \"256M\"\n\n[[guests.{name}.net]]\nswitch = \"lan\"\nvlan = {vlan}\nmac = \"{mac}\"\n\n",
        env_path("FERROVISOR_KERNEL").display(),
        env_path("FERROVISOR_INITRAMFS").display(),
        config.cmdline(),
    )
}

fn addr(ip: &str) -> String {
    format!("ip link set eth0 up && ip addr add {ip}/24 dev eth0")
}

const ALPHA_MAC: &str = "52:54:00:0a:00:01";
/// The switch's uplink: a host tap, and the address its lab end gets.
const UPLINK: &str = "fvup0";
const UPLINK_ADDR: &str = "10.9.0.254";

/// Gives the uplink tap, once the switch has made it, its lab-side address.
fn address_uplink() -> Result<(), Try> {
    let path = Path::new("/sys/class/net").join(UPLINK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !path.exists() {
        if std::time::Instant::now() > deadline {
            return Err(Try::Failed(format!(
                "the switch never made its uplink {UPLINK}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for args in [
        &["addr", "add", &format!("{UPLINK_ADDR}/24"), "dev", UPLINK][..],
        &["link", "set", UPLINK, "up"],
    ] {
        let out = std::process::Command::new("ip").args(args).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            return Err(Try::Failed(format!("ip {args:?}: {out:?}")));
        }
    }
    Ok(())
}

fn system(dir: &Path) -> std::path::PathBuf {
    let alpha = format!("{} && netbench serve 7000", addr("10.9.0.1"));
    // Pings first, until alpha answers (it may boot later), then TCP.
    let beta = format!(
        "{} && for i in $(seq 60); do ping -c 1 -W 1 10.9.0.1 >/dev/null && break; sleep 1; done; \
         ping -c 3 -W 2 10.9.0.1; echo beta-ping $?; \
         netbench stream 10.9.0.1 7000 2; echo beta-tcp $?; \
         for i in $(seq 30); do ping -c 1 -W 1 {UPLINK_ADDR} >/dev/null && break; sleep 1; done; \
         ping -c 3 -W 2 {UPLINK_ADDR}; echo beta-uplink $?; sleep 600",
        addr("10.9.0.2")
    );
    // Long enough for alpha to be up whatever the order of boots.
    let gamma = format!(
        "{} && sleep 20; ping -c 3 -W 2 10.9.0.1; echo gamma-ping $?; sleep 600",
        addr("10.9.0.3")
    );
    let mut text =
        format!("[switches.lan]\nmode = \"bridge\"\nuplink = \"{UPLINK}\"\nuplink_vlan = 10\n\n");
    text.push_str(&guest("alpha", 10, ALPHA_MAC, &alpha));
    text.push_str(&guest("beta", 10, "52:54:00:0a:00:02", &beta));
    text.push_str(&guest("gamma", 20, "52:54:00:14:00:03", &gamma));
    let file = dir.join("system.toml");
    std::fs::write(&file, text).expect("system file");
    file
}

fn port<'a>(shown: &'a Value, name: &str) -> &'a Value {
    shown["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["port"] == name))
        .unwrap_or(&Value::Null)
}

/// One try: three guests at once (see `lab_tests::retry`).
fn attempt(n: u32) -> Result<(), Try> {
    let daemon = Daemon::start(&format!("sw{n}"), &["alpha", "beta", "gamma"]);
    let file = system(&daemon.dir);
    daemon.try_up(&file)?;
    address_uplink()?;
    daemon.try_wait_console("beta", "beta-uplink")?;
    daemon.try_wait_console("gamma", "gamma-ping")?;
    let shown: Value = serde_json::from_str(&daemon.ok(&["switch", "show", "lan", "--json"]))
        .map_err(|e| Try::Failed(format!("switch show: {e}")))?;
    let table = daemon.ok(&["switch", "show", "lan"]);
    let info = daemon.ok(&["info", "beta"]);
    let (b, g) = (daemon.console("beta"), daemon.console("gamma"));
    let frames = |p: &str, k: &str| port(&shown, p)[k].as_u64().unwrap_or(0);
    let checks = [
        (
            b.contains("beta-ping 0"),
            "beta's pings to alpha were answered",
        ),
        (
            b.contains("netbench: stream") && b.contains("beta-tcp 0"),
            "beta carried TCP to alpha",
        ),
        (
            g.contains("gamma-ping 1"),
            "gamma, on VLAN 20, got no answer",
        ),
        (
            frames("beta-0", "rx_frames") > 1000
                && frames("alpha-0", "tx_frames") > 1000
                && frames("alpha-0", "rx_frames") > 0,
            "the switch counted the stream from beta's port to alpha's",
        ),
        (
            frames("alpha-0", "learned") >= 1,
            "the bridge learned alpha's MAC",
        ),
        (
            frames("gamma-0", "rx_frames") > 0,
            "gamma's frames reached the switch",
        ),
        (
            port(&shown, "alpha-0")["mac"] == ALPHA_MAC,
            "alpha's port has its MAC",
        ),
        (table.contains("beta-0"), "switch show prints the ports"),
        (
            info.contains("switch") && info.contains("lan"),
            "info shows beta's port",
        ),
    ];
    all_hold(&checks, || {
        format!("--- switch ---\n{table}\n{}", daemon.describe())
    })
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guests_on_one_vlan_of_a_switch_talk_and_another_vlan_cannot_reach_them() {
    retried("switch fabric", TRIES, attempt).unwrap_or_else(|e| panic!("{e}"));
}
