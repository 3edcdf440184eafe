//! Shared regions the daemon owns: `ferrovisor up` on a system file with a
//! `[regions.NAME]` table. Each member guest's VMM inherits the region's
//! sealed memfd and the doorbell eventfds; tiny guests show the memory is
//! shared, a doorbell from one member interrupts the other, a read-only
//! member's write does not land, and a guest that is no member has no
//! ivshmem device.

mod common;
mod control;

use common::doorbell::*;
use common::*;
use control::*;
use serde_json::{json, Value};

fn write_kernel(d: &TestDaemon, name: &str, code: &[u8]) -> String {
    let path = d.dir.join(format!("{name}.elf"));
    std::fs::write(&path, multiboot_kernel(0x10_0000, &[], code, 0)).expect("write kernel");
    format!(
        "[guests.{name}]\nkernel = {:?}\nmemory = \"32M\"\n",
        path.display().to_string()
    )
}

/// Member 0 (rw): says it is ready in the region, then waits for a doorbell.
fn waiter() -> Vec<u8> {
    let mut c = Checks::new();
    msix_vector0_on(&mut c);
    c.mmio_read32(BAR0 + 8).eax_is(0).mmio_write32(READY, 1);
    let (reg, bit) = irr(VECTOR0);
    poll_until_set(&mut c, reg, bit, "got", "wait", PASS + 100);
    c.finish()
}

/// Member 1 (ro): waits for member 0, rings it, tries to write the region.
fn ringer() -> Vec<u8> {
    let mut c = Checks::new();
    poll_until_set(&mut c, READY, 1, "ready", "wait", PASS + 100);
    c.mmio_read32(BAR0 + 8)
        .eax_is(1)
        .mmio_write32(BAR0 + 12, 0)
        .mmio_write32(READY, 0xbad)
        .mmio_read32(READY)
        .eax_is(1);
    c.finish()
}

fn wait_exit(d: &TestDaemon, name: &str) -> Value {
    let info = d.wait_state(name, "stopped");
    assert_eq!(info["exit"]["status"], json!(PASSED), "{name}: {info}");
    info
}

#[test]
fn up_gives_members_a_shared_region_with_doorbells_and_others_nothing() {
    let d = TestDaemon::start();
    let outsider = Checks::new().port_read(1, 0).eax_is(u32::MAX).finish();
    let system = d.dir.join("system.toml");
    let text = format!(
        "{}{}{}\n[regions.ring]\nsize = \"1M\"\nguests = {{ waiter = \"rw\", ringer = \"ro\" }}\n",
        write_kernel(&d, "waiter", &waiter()),
        write_kernel(&d, "ringer", &ringer()),
        write_kernel(&d, "outsider", &outsider),
    );
    std::fs::write(&system, text).expect("write");
    let out = d.cli(&["up", system.to_str().expect("utf-8"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up: Value = serde_json::from_slice(&out.stdout).expect("up --json");
    assert_eq!(up["regions"][0]["name"], "ring", "{up}");
    assert_eq!(up["regions"][0]["guests"][0]["name"], "waiter", "{up}");
    wait_exit(&d, "waiter");
    wait_exit(&d, "ringer");
    wait_exit(&d, "outsider");
    // The daemon says who is on the region, with ids in file order.
    let body = json!({"size": 1 << 20, "guests": [
        {"name": "waiter", "access": "rw"}, {"name": "ringer", "access": "ro"}]});
    let region = d.expect("PUT", "/regions/ring", Some(body), 200);
    assert_eq!(
        region["guests"][1],
        json!({"name": "ringer", "id": 1, "readonly": true})
    );
}

#[test]
fn a_region_of_another_shape_a_bad_body_or_a_running_member_is_refused() {
    let d = TestDaemon::start();
    let body = json!({"size": 4096, "guests": [{"name": "a", "access": "rw"}]});
    d.expect("PUT", "/regions/one", Some(body), 201);
    let other = json!({"size": 8192, "guests": [{"name": "a", "access": "rw"}]});
    let reply = d.expect("PUT", "/regions/one", Some(other), 409);
    assert_eq!(
        reply["error"],
        "region 'one' exists with other members, size or vectors"
    );
    let bad = json!({"size": 4096, "guests": [{"name": "a", "access": "rx"}]});
    let reply = d.expect("PUT", "/regions/two", Some(bad), 400);
    assert_eq!(reply["error"], "guests[0].access: not \"rw\" or \"ro\"");
    // A running guest would not get a new region (nor share it with the
    // members that start later): refused, naming it.
    d.create_echo("early", true);
    let late = json!({"size": 4096, "guests": [{"name": "early", "access": "rw"}]});
    let reply = d.expect("PUT", "/regions/late", Some(late), 409);
    assert_eq!(
        reply["error"],
        "guest 'early' is running; it gets region 'late' only when it starts: stop it first"
    );
}
