//! Disk and NIC rate limits through the daemon on the host's KVM: set in the
//! description at create, reported by `info`, changed while the guest runs
//! through the API (`PUT`/`PATCH .../devices/DEVICE/rate`, checked against
//! openapi.json) and the `limit` CLI, bad values refused with their key and
//! the old limit kept.

mod common;
mod control;

use control::{echo_description, TestDaemon};
use serde_json::{json, Value};

/// Creates and starts the echo guest `name` with a disk limited to 20 MiB/s
/// and 500 operations per second.
fn limited_guest(d: &TestDaemon, name: &str) {
    let image = d.dir.join(format!("{name}.img"));
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("write the image");
    let config = format!(
        "{}[[disk]]\npath = \"{}\"\nrate = {{ bandwidth = \"20MiB/s\", ops = 500 }}\n",
        echo_description(),
        image.display()
    );
    let body = json!({ "name": name, "config": config, "start": true });
    d.expect("POST", "/guests", Some(body), 201);
    d.wait_console(name, "ready");
}

fn disk_limit(d: &TestDaemon, name: &str) -> Value {
    let info = d.info(name);
    let devices = info["rate_limits"].as_array().expect("rate_limits").clone();
    assert_eq!(devices.len(), 1, "{info}");
    assert_eq!(devices[0]["device"], "disk0");
    devices[0]["limit"].clone()
}

#[test]
fn a_limit_set_at_create_is_reported_and_changed_while_the_guest_runs() {
    let d = TestDaemon::start();
    limited_guest(&d, "lim");
    assert_eq!(
        disk_limit(&d, "lim"),
        json!({"bandwidth": "20MiB/s", "ops": 500})
    );
    let stored = d.info("lim")["config"].as_str().unwrap_or("").to_string();
    assert!(
        stored.contains("rate = { bandwidth = \"20MiB/s\", ops = 500 }"),
        "{stored}"
    );

    let path = "/guests/lim/devices/disk0/rate";
    let changed = d.expect("PATCH", path, Some(json!({"bandwidth": "40MiB/s"})), 200);
    assert_eq!(
        changed["limits"][0]["limit"],
        json!({"bandwidth": "40MiB/s", "ops": 500})
    );
    assert_eq!(
        disk_limit(&d, "lim"),
        json!({"bandwidth": "40MiB/s", "ops": 500})
    );

    let replaced = d.expect("PUT", path, Some(json!({"ops": 100, "ops_burst": 50})), 200);
    assert_eq!(
        replaced["limits"][0]["limit"],
        json!({"ops": 100, "ops_burst": 50})
    );
    d.expect("PATCH", path, Some(json!({"ops_burst": null})), 200);
    assert_eq!(disk_limit(&d, "lim"), json!({"ops": 100}));
    d.expect("PUT", path, Some(json!({})), 200);
    assert_eq!(disk_limit(&d, "lim"), json!({}));
}

#[test]
fn bad_limits_are_refused_with_their_key_and_change_nothing() {
    let d = TestDaemon::start();
    limited_guest(&d, "bad");
    let before = disk_limit(&d, "bad");
    let path = "/guests/bad/devices/disk0/rate";
    let cases = [
        (
            json!({"bandwidth": "fast"}),
            400,
            "rate.bandwidth: 'fast' is not a rate",
        ),
        (json!({"ops": 0}), 400, "rate.ops: must be above 0"),
        (
            json!({"ops": -5}),
            400,
            "rate.ops: -5 is not a whole number",
        ),
        (json!({"refill_time": "1h"}), 400, "rate.refill_time:"),
        (json!({"iops": 5}), 400, "rate.iops: unknown key"),
        (
            json!({"bandwidth": null, "burst": "1M"}),
            400,
            "rate.burst: needs a bandwidth",
        ),
        (json!([1]), 400, "bad request body"),
    ];
    for (body, status, message) in cases {
        let (got, reply) = d.call("PATCH", path, Some(body.clone()));
        assert_eq!(got, status, "{body}: {reply}");
        let error = reply["error"].as_str().unwrap_or("");
        assert!(
            error.starts_with(message) || error.contains(message),
            "{body}: {error}"
        );
        assert_eq!(disk_limit(&d, "bad"), before, "{body} changed the limit");
    }
    let (got, reply) = d.call(
        "PATCH",
        "/guests/bad/devices/disk7/rate",
        Some(json!({"ops": 5})),
    );
    assert_eq!(got, 404, "{reply}");
    assert!(
        reply["error"].as_str().unwrap_or("").contains("disk0"),
        "{reply}"
    );
    let (got, _) = d.call(
        "PATCH",
        "/guests/nobody/devices/disk0/rate",
        Some(json!({})),
    );
    assert_eq!(got, 404);
    let (got, _) = d.call("POST", path, Some(json!({})));
    assert_eq!(got, 405);

    d.expect("POST", "/guests/bad/kill", None, 200);
    let (got, reply) = d.call("PATCH", path, Some(json!({"ops": 5})));
    assert_eq!(got, 409, "{reply}");
}

#[test]
fn the_limit_command_changes_a_running_guest_and_info_shows_it() {
    let d = TestDaemon::start();
    limited_guest(&d, "cli");
    let out = d.cli(&[
        "limit",
        "cli",
        "disk0",
        "--bandwidth",
        "10MiB/s",
        "--ops",
        "off",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["limits"][0]["limit"], json!({"bandwidth": "10MiB/s"}));

    let out = d.cli(&["limit", "cli", "disk0", "--ops", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("ferrovisor limit: --ops: must be above 0"),
        "{err}"
    );
    let out = d.cli(&["limit", "cli", "disk0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a limit with nothing to change ran"
    );
    let out = d.cli(&["limit", "cli", "disk9", "--ops", "5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device 'disk9'"));
    assert_eq!(disk_limit(&d, "cli"), json!({"bandwidth": "10MiB/s"}));

    let out = d.cli(&["info", "cli"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("rate")).unwrap_or("");
    assert!(
        line.contains("disk0") && line.contains("bandwidth=10MiB/s"),
        "{text}"
    );
    let top = d.cli(&["top", "--once"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        text.contains("I/O RATE LIMITS") && text.contains("bandwidth=10MiB/s"),
        "{text}"
    );
}
