//! Lab tier: the VirtIO devices (block, net, vsock, rng, console) and power
//! control, seen from a real Linux guest and checked from the host side: the
//! disk images, the tap and the vsock unix sockets are real files and devices
//! in the lab.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lab_tests::net::{configure_interface, wait_for_interface};
use lab_tests::{
    control, run_guest, tail, timeout, wait_in_file, Console, Disk, Exit, Guest, GuestConfig, Net,
    Vsock,
};

const MIB: usize = 1 << 20;

fn describe(exit: &Exit) -> String {
    format!(
        "VMM {}\n--- console (tail) ---\n{}\n--- VMM stderr ---\n{}",
        exit.status,
        tail(&exit.console, 40),
        tail(&exit.stderr, 10)
    )
}

fn boot(config: &GuestConfig) -> Exit {
    match run_guest(config) {
        Ok(exit) => exit,
        Err(e) => panic!("guest with flags {:?}: {e}", config.device_args()),
    }
}

fn running(run: &str) -> GuestConfig {
    GuestConfig {
        run: Some(run.to_string()),
        ..GuestConfig::default()
    }
}

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// `text` repeated to exactly `len` bytes.
fn pattern(text: &str, len: usize) -> Vec<u8> {
    text.bytes().cycle().take(len).collect()
}

/// Writes an image of `size` bytes: `fill` repeated, or sparse zeros.
fn image(path: &Path, size: usize, fill: Option<&str>) {
    match fill {
        Some(text) => std::fs::write(path, pattern(text, size)).expect("write the image"),
        None => {
            let file = std::fs::File::create(path).expect("create the image");
            file.set_len(size as u64).expect("size the image");
        }
    }
}

fn disk(path: &Path) -> Disk {
    Disk {
        path: path.to_path_buf(),
        readonly: false,
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs an e2fsprogs tool the lab carries (xtask ships it to /lab/bin).
fn e2fs_tool(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} in the lab ({e}); xtask ships the host's e2fsprogs")
    })
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn ext4_written_in_the_guest_is_on_the_host_image() {
    let dir = scratch("ext4");
    let img = dir.join("disk.img");
    image(&img, 64 * MIB, None);
    let exit = boot(&GuestConfig {
        disks: vec![disk(&img)],
        ..running(
            "mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && \
             for i in $(seq 1 3000); do echo \"ferrovisor-ext4-line-$i\"; done > /mnt/f && \
             sync && umount /mnt && echo ext4-done",
        )
    });
    let d = describe(&exit);
    assert!(exit.command_output().contains(&"ext4-done"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    let img_arg = img.to_string_lossy();
    let check = e2fs_tool("e2fsck", &["-f", "-n", &img_arg]);
    assert!(
        check.status.success(),
        "e2fsck finds the guest's filesystem damaged:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let cat = e2fs_tool("debugfs", &["-R", "cat /f", &img_arg]);
    let expected: String = (1..=3000)
        .map(|i| format!("ferrovisor-ext4-line-{i}\n"))
        .collect();
    assert!(
        cat.stdout == expected.as_bytes(),
        "debugfs reads {} bytes of /f, {} expected; stderr: {}",
        cat.stdout.len(),
        expected.len(),
        String::from_utf8_lossy(&cat.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn direct_write_survives_a_killed_vmm() {
    let dir = scratch("durable");
    let img = dir.join("disk.img");
    image(&img, 16 * MIB, None);
    let mut guest = Guest::start(&GuestConfig {
        disks: vec![disk(&img)],
        ..running(
            "yes ferrovisor-durable | head -c 1048576 > /tmp/p && \
             dd if=/tmp/p of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null && \
             sync && echo durable-written; sleep 600",
        )
    })
    .expect("start the VMM");
    let waited = guest.wait_for("durable-written");
    let console = guest.console();
    waited.unwrap_or_else(|e| panic!("{e}"));
    let exit = guest.kill().expect("kill the VMM");
    assert_eq!(exit.status.code(), None, "the VMM was killed: {console}");
    let data = read(&img);
    let want = pattern("ferrovisor-durable\n", MIB);
    assert!(
        data[..MIB] == want[..],
        "the image does not hold the pattern the guest wrote; console:\n{}",
        tail(&console, 20)
    );
    assert!(data[MIB..].iter().all(|&b| b == 0), "beyond the write");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    let dir = scratch("readonly");
    let img = dir.join("disk.img");
    image(&img, 8 * MIB, Some("ferrovisor-readonly\n"));
    let before = read(&img);
    let exit = boot(&GuestConfig {
        disks: vec![Disk {
            path: img.clone(),
            readonly: true,
        }],
        ..running(
            "echo ro=$(cat /sys/block/vda/ro); echo head=$(head -c 19 /dev/vda); \
             if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; \
             then echo write-accepted; else echo write-refused; fi; sync",
        )
    });
    let d = describe(&exit);
    let out = exit.command_output();
    assert!(out.contains(&"ro=1"), "the guest sees a writable disk\n{d}");
    assert!(out.contains(&"head=ferrovisor-readonly"), "{d}");
    assert!(out.contains(&"write-refused"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    assert!(read(&img) == before, "the read-only image changed\n{d}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn two_disks_are_two_devices_in_order() {
    let dir = scratch("twodisks");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    image(&a, 8 * MIB, Some("ferrovisor-disk-a"));
    image(&b, 16 * MIB, Some("ferrovisor-disk-b"));
    let a_before = read(&a);
    let exit = boot(&GuestConfig {
        disks: vec![disk(&a), disk(&b)],
        ..running(
            "echo vda=$(head -c 17 /dev/vda) $(cat /sys/block/vda/size); \
             echo vdb=$(head -c 17 /dev/vdb) $(cat /sys/block/vdb/size); \
             printf written-to-vdb | dd of=/dev/vdb bs=1M seek=1 conv=fsync 2>/dev/null && \
             echo vdb-written",
        )
    });
    let d = describe(&exit);
    let out = exit.command_output();
    assert!(out.contains(&"vda=ferrovisor-disk-a 16384"), "{d}");
    assert!(out.contains(&"vdb=ferrovisor-disk-b 32768"), "{d}");
    assert!(out.contains(&"vdb-written"), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    let b_after = read(&b);
    assert_eq!(&b_after[MIB..MIB + 14], b"written-to-vdb", "{d}");
    assert!(read(&a) == a_before, "the write to vdb reached vda's image");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tap the network test uses, and the addresses on its two ends.
const TAP: &str = "fvlab0";
const HOST_ADDR: [u8; 4] = [10, 0, 77, 1];
const GUEST_MAC: &str = "52:54:00:12:34:56";

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guest_pings_the_host_end_of_its_tap() {
    let mut guest = Guest::start(&GuestConfig {
        nets: vec![Net {
            tap: TAP.to_string(),
            mac: Some(GUEST_MAC.to_string()),
        }],
        ..running(
            "echo mac=$(cat /sys/class/net/eth0/address); \
             ip link set eth0 up && ip addr add 10.0.77.2/24 dev eth0 || exit 3; \
             for i in $(seq 1 90); do ping -c 1 -W 1 10.0.77.1 >/dev/null 2>&1 && break; done; \
             ping -c 3 -W 2 10.0.77.1",
        )
    })
    .expect("start the VMM");
    // The VMM creates the tap; its host end gets an address once it exists.
    // Polled in short steps, so that a VMM that has already exited ends
    // the wait (a silent lab looks hung to its watchdog).
    let start = std::time::Instant::now();
    let host_end = loop {
        match wait_for_interface(TAP, Duration::from_secs(1)) {
            Ok(()) => break configure_interface(TAP, HOST_ADDR, 24).map_err(|e| e.to_string()),
            Err(e) if !guest.is_running() || start.elapsed() > timeout() => {
                break Err(e.to_string())
            }
            Err(_) => {}
        }
    };
    if let Err(e) = host_end {
        let exit = guest.wait_exit().expect("the VMM exits");
        panic!("host end of the tap: {e}\n{}", describe(&exit));
    }
    let exit = guest.wait_exit().expect("the VMM exits");
    let d = describe(&exit);
    let out = exit.command_output();
    assert!(out.contains(&format!("mac={GUEST_MAC}").as_str()), "{d}");
    assert!(
        out.iter()
            .any(|l| l.contains("3 packets transmitted, 3 packets received")),
        "{d}"
    );
    assert_eq!(exit.reported_status(), Some(0), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

/// Serves one guest-initiated connection on `path`: reads a line, answers.
fn serve_one(listener: UnixListener, answer: &'static str) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return String::from("<accept failed>");
        };
        let _ = stream.set_read_timeout(Some(timeout()));
        let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = writeln!(&stream, "{answer}");
        line.trim_end().to_string()
    })
}

/// Connects to the guest's port through the VMM's vsock socket and
/// exchanges one line: returns the guest's answer.
fn call_guest(socket: &Path, port: u32, line: &str) -> Result<String, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    writeln!(stream, "CONNECT {port}").map_err(|e| format!("write CONNECT: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut ok = String::new();
    reader
        .read_line(&mut ok)
        .map_err(|e| format!("read OK: {e}"))?;
    if !ok.starts_with("OK ") {
        return Err(format!("the VMM answered {ok:?} to CONNECT {port}"));
    }
    writeln!(stream, "{line}").map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(|e| format!("read the reply: {e}"))?;
    Ok(reply.trim_end().to_string())
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn vsock_carries_lines_both_ways() {
    let dir = scratch("vsock");
    let socket = dir.join("v.sock");
    // Guest connections to host port 5000 arrive on "<socket>_5000".
    let host_port = dir.join("v.sock_5000");
    let listener = UnixListener::bind(&host_port).expect("bind the host port");
    // The jailed VMM connects as the guest's uid.
    std::fs::set_permissions(&host_port, std::fs::Permissions::from_mode(0o777))
        .expect("let the guest's uid connect");
    let served = serve_one(listener, "pong-from-host");
    let mut guest = Guest::start(&GuestConfig {
        vsock: Some(Vsock {
            cid: 3,
            socket: socket.clone(),
        }),
        ..running(
            "vsock listen 5001 pong-from-guest & l=$!; \
             vsock connect 2 5000 ping-from-guest; c=$?; wait $l; \
             echo vsock-statuses $c $?",
        )
    })
    .expect("start the VMM");
    guest
        .wait_for("vsock: listening on 5001")
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = call_guest(&socket, 5001, "ping-from-host");
    let exit = guest.wait_exit().expect("the VMM exits");
    if !served.is_finished() {
        // The guest never connected: unblock the listener's accept.
        let _ = UnixStream::connect(&host_port);
    }
    let d = describe(&exit);
    assert_eq!(answer, Ok("pong-from-guest".to_string()), "{d}");
    let out = exit.command_output();
    assert!(
        out.contains(&"vsock: received ping-from-host (from cid 2)"),
        "{d}"
    );
    assert!(out.contains(&"vsock: received pong-from-host"), "{d}");
    assert!(out.contains(&"vsock-statuses 0 0"), "{d}");
    assert_eq!(
        served.join().ok().as_deref(),
        Some("ping-from-guest"),
        "{d}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn hwrng_is_virtio_and_gives_bytes() {
    let exit = boot(&GuestConfig {
        rng: true,
        ..running(
            "echo current=$(cat /sys/class/misc/hw_random/rng_current); \
             head -c 128 /dev/hwrng | od -An -tx1 -v",
        )
    });
    let d = describe(&exit);
    let out = exit.command_output();
    assert!(
        out.iter().any(|l| l.starts_with("current=virtio_rng")),
        "{d}"
    );
    let bytes: Vec<&str> = out
        .iter()
        .filter(|l| l.starts_with(' '))
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert_eq!(bytes.len(), 128, "{d}");
    let first = bytes[0];
    assert!(bytes.iter().any(|b| *b != first), "128 equal bytes\n{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn virtio_console_carries_the_command_output() {
    let exit = boot(&GuestConfig {
        console: Console::Virtio,
        ..running("echo console-active=$(cat /sys/class/tty/console/active)")
    });
    let d = describe(&exit);
    assert!(
        exit.command_output().contains(&"console-active=hvc0"),
        "{d}"
    );
    assert_eq!(exit.reported_status(), Some(0), "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn acpi_poweroff_with_devices_ends_the_vmm_with_status_zero() {
    let dir = scratch("power");
    let img = dir.join("disk.img");
    image(&img, 8 * MIB, None);
    let exit = boot(&GuestConfig {
        disks: vec![disk(&img)],
        rng: true,
        ..running(
            "test -e /sys/firmware/acpi/tables/FACP && echo acpi-present; \
             echo powering-off; poweroff -f; sleep 600",
        )
    });
    let d = describe(&exit);
    let out = exit.command_output();
    assert!(out.contains(&"acpi-present"), "{d}");
    assert!(out.contains(&"powering-off"), "{d}");
    // The guest went down before /init could report the command's end.
    assert_eq!(exit.reported_status(), None, "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn sigint_to_init_syncs_and_powers_off() {
    // What the VMM's graceful stop does (Ctrl-Alt-Del makes the kernel send
    // init SIGINT), triggered from inside. The write is buffered: only the
    // trap's sync puts it on the disk before the power goes.
    let dir = scratch("sigint");
    let img = dir.join("disk.img");
    image(&img, 8 * MIB, None);
    let exit = boot(&GuestConfig {
        disks: vec![disk(&img)],
        ..running(
            "yes ferrovisor-sigint | head -c 1048576 > /dev/vda && echo buffered; \
             kill -INT 1; sleep 600",
        )
    });
    let d = describe(&exit);
    assert!(exit.command_output().contains(&"buffered"), "{d}");
    assert!(
        exit.console
            .contains("ferrovisor-guest: SIGINT: syncing and powering off"),
        "{d}"
    );
    assert_eq!(exit.reported_status(), None, "{d}");
    assert_eq!(exit.status.code(), Some(0), "{d}");
    let data = read(&img);
    assert!(
        data[..MIB] == pattern("ferrovisor-sigint\n", MIB)[..],
        "the buffered write did not reach the image\n{d}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn control_socket_shutdown_reaches_init_as_ctrl_alt_del() {
    // The whole graceful stop: the control socket's "shutdown" puts
    // Ctrl-Alt-Del into the keyboard controller, the kernel turns it into
    // SIGINT for init, whose trap syncs a buffered write and powers off.
    let dir = scratch("shutdown");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).expect("create the runtime directory");
    let img = dir.join("disk.img");
    image(&img, 8 * MIB, None);
    let mut guest = Guest::start(&GuestConfig {
        disks: vec![disk(&img)],
        runtime_dir: Some(runtime.clone()),
        ..running(
            "yes ferrovisor-shutdown | head -c 1048576 > /dev/vda && echo shutdown-ready; \
             sleep 600",
        )
    })
    .expect("start the VMM");
    let log = runtime.join("console.log");
    if let Err(e) = wait_in_file(&mut guest, &log, "shutdown-ready") {
        let exit = guest.wait_exit().expect("the VMM exits");
        panic!("{e}\n{}", describe(&exit));
    }
    let reply = control(&runtime, r#"{"op":"shutdown"}"#);
    let exit = guest.wait_exit().expect("the VMM exits");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let d = format!(
        "VMM {}\n--- console.log (tail) ---\n{}\n--- VMM stderr ---\n{}",
        exit.status,
        tail(&console, 30),
        tail(&exit.stderr, 10)
    );
    assert!(
        reply.as_ref().is_ok_and(|r| r.contains(r#""ok":true"#)),
        "control reply {reply:?}\n{d}"
    );
    assert!(
        console.contains("ferrovisor-guest: SIGINT: syncing and powering off"),
        "{d}"
    );
    assert_eq!(exit.status.code(), Some(0), "{d}");
    assert!(
        read(&img)[..MIB] == pattern("ferrovisor-shutdown\n", MIB)[..],
        "the buffered write did not reach the image\n{d}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
