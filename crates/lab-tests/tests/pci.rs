//! Lab tier, PCI: the Debian kernel finds the bus from ACPI (no `pci=`
//! option), virtio_pci binds the virtio devices, and the devices work.
//! Plain `cargo test` lists these as ignored; `cargo xtask test` runs them.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lab_tests::{tail, timeout, GuestConfig};

/// The guest console and VMM messages of one run.
struct Run {
    status: Option<i32>,
    console: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "VMM status {:?}\n--- console (tail) ---\n{}\n--- VMM stderr ---\n{}",
            self.status,
            tail(&self.console, 60),
            tail(&self.stderr, 10)
        )
    }

    /// Whether a console line contains every one of `words`.
    fn has_line(&self, words: &[&str]) -> bool {
        self.console
            .lines()
            .any(|l| words.iter().all(|w| l.contains(w)))
    }
}

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run these tests with `cargo xtask test`"))
}

fn pump(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&chunk);
        }
    });
    text
}

fn read(text: &Arc<Mutex<String>>) -> String {
    text.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Boots the kit with `run` as its command and `devices` as extra VMM
/// options. When the console shows `prompt`, `input` is sent to the VMM's
/// stdin. Kills the VMM at the lab's deadline.
fn boot(run: &str, devices: &[String], prompt: Option<(&str, &str)>) -> Run {
    boot_with(run, &[], devices, prompt)
}

/// [`boot`] with extra kernel command-line words.
fn boot_with(run: &str, cmdline: &[&str], devices: &[String], prompt: Option<(&str, &str)>) -> Run {
    let config = GuestConfig {
        run: Some(run.to_string()),
        extra_cmdline: cmdline.iter().map(|w| w.to_string()).collect(),
        ..GuestConfig::default()
    };
    let mut child: Child = Command::new(env("FERROVISOR_BIN"))
        .arg("run")
        .args(lab_tests::jail_args())
        .args(["--kernel", &env("FERROVISOR_KERNEL")])
        .args(["--initramfs", &env("FERROVISOR_INITRAMFS")])
        .args(["--cmdline", &config.cmdline()])
        .args(["--memory", &config.memory])
        .args(devices)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the VMM");
    let console = pump(child.stdout.take().expect("piped stdout"));
    let stderr = pump(child.stderr.take().expect("piped stderr"));
    let mut stdin = child.stdin.take();
    let deadline = Instant::now() + timeout();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the VMM") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Some((wanted, input)) = prompt {
            if stdin.is_some() && read(&console).contains(wanted) {
                if let Some(mut s) = stdin.take() {
                    let _ = s.write_all(input.as_bytes());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the readers drain the last output.
    std::thread::sleep(Duration::from_millis(300));
    Run {
        status,
        console: read(&console),
        stderr: read(&stderr),
    }
}

/// A fresh file of `size` zero bytes for a disk image.
fn image(name: &str, size: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pci-{}-{name}", std::process::id()));
    let file = std::fs::File::create(&path).expect("create a disk image");
    file.set_len(size).expect("size the disk image");
    path
}

const LIST_PCI: &str = "for d in /sys/bus/pci/devices/*; do \
     drv=$(readlink $d/driver); \
     echo \"pci $(basename $d) $(cat $d/vendor) $(cat $d/device) ${drv##*/}\"; done";

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn guest_enumerates_pci_from_acpi_and_virtio_pci_binds_the_rng() {
    let run = format!(
        "echo cmdline: $(cat /proc/cmdline); \
         dmesg | grep -E 'PCI: Fatal|MMCONFIG|PCI Root Bridge'; {LIST_PCI}; \
         echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
         echo hex=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')"
    );
    let r = boot(&run, &["--rng".to_string()], None);
    let d = r.describe();
    assert_eq!(r.status, Some(0), "{d}");
    let cmdline = r
        .console
        .lines()
        .find(|l| l.starts_with("cmdline:"))
        .unwrap_or_else(|| panic!("no cmdline line\n{d}"));
    assert!(!cmdline.contains("pci="), "{d}");
    assert!(!r.console.contains("PCI: Fatal"), "{d}");
    assert!(r.has_line(&["PCI Root Bridge [PCI0]"]), "{d}");
    assert!(r.has_line(&["MMCONFIG", "reserved"]), "{d}");
    assert!(r.has_line(&["pci 0000:00:00.0 0x1b36 0x0008"]), "{d}");
    assert!(
        r.has_line(&["pci 0000:00:01.0 0x1af4 0x1044 virtio-pci"]),
        "{d}"
    );
    assert!(r.has_line(&["rng=virtio_rng.0"]), "{d}");
    let hex = r
        .console
        .lines()
        .find_map(|l| l.strip_prefix("hex="))
        .unwrap_or_else(|| panic!("no hex line\n{d}"));
    assert_eq!(hex.trim().len(), 64, "32 bytes from /dev/hwrng\n{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn disks_console_and_vsock_bind_and_work() {
    let disk = image("rw.img", 8 << 20);
    let ro = image("ro.img", 2 << 20);
    let socket = std::env::temp_dir().join(format!("pci-{}-v.sock", std::process::id()));
    let devices = vec![
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--disk".to_string(),
        format!("path={},readonly=on", ro.display()),
        "--console".to_string(),
        "virtio".to_string(),
        "--vsock".to_string(),
        format!("cid=3,socket={}", socket.display()),
    ];
    let run = format!(
        "{LIST_PCI}; \
         echo vda=$(cat /sys/block/vda/size),$(cat /sys/block/vda/ro); \
         echo vdb=$(cat /sys/block/vdb/size),$(cat /sys/block/vdb/ro); \
         ls /dev/vsock; \
         echo written-to-hvc0 > /dev/hvc0; \
         exec 3</dev/hvc0; echo waiting-for-hvc-input; \
         read -t 60 line <&3; echo \"hvc-read=$line\""
    );
    let r = boot(
        &run,
        &devices,
        Some(("waiting-for-hvc-input", "typed-into-hvc0\n")),
    );
    let d = r.describe();
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&ro);
    assert_eq!(r.status, Some(0), "{d}");
    for (slot, id) in [
        ("01", "0x1042"),
        ("02", "0x1042"),
        ("03", "0x1043"),
        ("04", "0x1053"),
    ] {
        let line = format!("pci 0000:00:{slot}.0 0x1af4 {id} virtio-pci");
        assert!(r.has_line(&[&line]), "{line}\n{d}");
    }
    assert!(r.has_line(&["vda=16384,0"]), "{d}");
    assert!(r.has_line(&["vdb=4096,1"]), "read-only disk\n{d}");
    assert!(r.has_line(&["/dev/vsock"]), "{d}");
    assert!(r.has_line(&["written-to-hvc0"]), "hvc0 output\n{d}");
    assert!(r.has_line(&["hvc-read=typed-into-hvc0"]), "hvc0 input\n{d}");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn without_msi_the_devices_work_on_intx() {
    let disk = image("intx.img", 4 << 20);
    let devices = vec![
        "--rng".to_string(),
        "--disk".to_string(),
        format!("path={}", disk.display()),
    ];
    let run = "echo rng-bytes=$(dd if=/dev/hwrng bs=512 count=32 2>/dev/null | wc -c); \
         dd if=/dev/urandom of=/tmp/data bs=4k count=1024 2>/dev/null; \
         dd if=/tmp/data of=/dev/vda bs=4k 2>/dev/null; sync; \
         echo 3 > /proc/sys/vm/drop_caches; \
         cmp /tmp/data /dev/vda && echo disk-data-matches; \
         grep -E 'IO-APIC.*virtio' /proc/interrupts";
    let r = boot_with(run, &["pci=nomsi"], &devices, None);
    let d = r.describe();
    let _ = std::fs::remove_file(&disk);
    assert_eq!(r.status, Some(0), "{d}");
    assert!(r.has_line(&["rng-bytes=16384"]), "{d}");
    assert!(r.has_line(&["disk-data-matches"]), "{d}");
    // Slot 1 INTA is GSI 17, slot 2 INTA is GSI 18, as the _PRT says.
    assert!(r.has_line(&["17:", "IO-APIC", "virtio"]), "{d}");
    assert!(r.has_line(&["18:", "IO-APIC", "virtio"]), "{d}");
    assert!(!r.console.contains("PCI-MSI"), "{d}");
}
