//! Lab tier: a shared region the daemon owns, used from inside guest-kit
//! guests with the kit's `region` tool. A system file declares
//! `[regions.shared]` with `writer` read-write and `reader` read-only, and a
//! third guest, `outsider`, that is not a member. The guests run one after
//! another (one nested guest at a time is what the lab runs reliably); the
//! region lives in the daemon between them:
//! - what `writer` writes, `reader` reads;
//! - `reader`'s own write does not land (its mapping is read-only);
//! - `outsider` has no ivshmem device at all.
//!
//! A second test runs two members at once: one waits for a doorbell in
//! Linux user space (`region wait`, INTx through `uio_pci_generic`), the
//! other rings it. Two nested guests at once are less stable in the lab,
//! so that scenario is retried when the lab fails a guest.

use std::path::Path;

use lab_tests::daemon::{env_path, Daemon};
use lab_tests::retry::{retried, Try, TRIES};
use lab_tests::{base64, GuestConfig};

const STATUS: &str = "ferrovisor-guest: exit status ";
const WRITTEN: &str = "written-by-writer";

/// An inline guest of the system file running `run` once, held until the
/// test starts it.
fn guest(name: &str, run: &str) -> String {
    format!(
        "[guests.{name}]\nkernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{} ferrovisor.run64={}\"\n\
         cpus = 1\nmemory = \"256M\"\nstart = \"held\"\n\n",
        env_path("FERROVISOR_KERNEL").display(),
        env_path("FERROVISOR_INITRAMFS").display(),
        GuestConfig::default().cmdline(),
        base64(run.as_bytes()),
    )
}

fn write_system(dir: &Path) -> std::path::PathBuf {
    let text = format!(
        "[regions.shared]\nsize = \"1M\"\nguests = {{ writer = \"rw\", reader = \"ro\" }}\n\n{}{}{}",
        guest(
            "writer",
            &format!("region info && region write 64 {WRITTEN} && region read 64 40")
        ),
        guest(
            "reader",
            "region info && region read 64 40 && region write 64 reader-was-here; region read 64 40"
        ),
        guest("outsider", "region info; echo outsider-status-$?"),
    );
    let path = dir.join("system.toml");
    std::fs::write(&path, text).expect("write the system file");
    path
}

/// Starts `name`, waits for its command to end, and returns its console.
fn run(daemon: &Daemon, name: &str) -> String {
    daemon.ok(&["start", name]);
    daemon.wait_console(name, STATUS);
    daemon.console(name)
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn a_region_written_by_one_guest_is_read_by_another_and_not_by_outsiders() {
    let daemon = Daemon::start("region", &["writer", "reader", "outsider"]);
    let system = write_system(&daemon.dir);
    daemon.ok(&["up", system.to_str().expect("utf-8")]);

    let writer = run(&daemon, "writer");
    assert!(
        writer.contains("size 1048576 peer 0"),
        "the writer sees the 1 MiB region as peer 0:\n{}",
        daemon.describe()
    );
    assert!(
        writer.contains(&format!("region: read {WRITTEN}")),
        "the writer reads back what it wrote:\n{}",
        daemon.describe()
    );

    let reader = run(&daemon, "reader");
    assert!(
        reader.contains("peer 1"),
        "the reader is peer 1:\n{}",
        daemon.describe()
    );
    let reads: Vec<&str> = reader
        .lines()
        .filter_map(|l| l.split("region: read ").nth(1))
        .collect();
    assert_eq!(
        reads,
        [WRITTEN, WRITTEN],
        "the reader sees the writer's bytes, before and after its own write, which does not \
         land:\n{}",
        daemon.describe()
    );

    let outsider = run(&daemon, "outsider");
    assert!(
        outsider.contains("no ivshmem device") && outsider.contains("outsider-status-2"),
        "a guest outside the region has no such device:\n{}",
        daemon.describe()
    );
}

/// One try of the doorbell scenario: both guests at once, the waiter
/// asleep in `region wait`, the ringer ringing it once it says it is ready.
fn doorbell_try(n: u32) -> Result<String, Try> {
    let daemon = Daemon::start(&format!("bell{n}"), &["waiter", "ringer"]);
    let waiter = "region write 0 ready && region wait 120";
    let ringer = "for i in $(seq 900); do region read 0 8 | grep -q 'read ready' && break; \
                  sleep 0.2; done; region ring 0 0";
    let text = format!(
        "[regions.bell]\nsize = \"4K\"\nguests = {{ waiter = \"rw\", ringer = \"ro\" }}\n\n{}{}",
        guest("waiter", waiter).replace("start = \"held\"\n", ""),
        guest("ringer", ringer).replace("start = \"held\"\n", ""),
    );
    let system = daemon.dir.join("system.toml");
    std::fs::write(&system, text).expect("write the system file");
    daemon.ok(&["up", system.to_str().expect("utf-8")]);
    daemon.try_wait_console("waiter", STATUS)?;
    let console = daemon.console("waiter");
    if console.contains("region: doorbell (status 1)") {
        Ok(console)
    } else {
        Err(Try::Failed(format!(
            "the waiter was not woken by the doorbell:\n{}",
            daemon.describe()
        )))
    }
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn a_doorbell_wakes_the_peer_waiting_in_linux_user_space() {
    let console = retried("doorbell between two guests", TRIES, doorbell_try)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        console.contains("region: waiting for a doorbell"),
        "{console}"
    );
}
