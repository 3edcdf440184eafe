//! Host KVM tests of `--runtime-dir`: the control socket, the console log
//! and socket, the exit record, pause and resume, Ctrl-Alt-Del, and vCPU
//! affinity, driven the way a supervisor drives them.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A directory of its own for one test.
fn scratch(name: &str) -> PathBuf {
    scratch_dir("fvrt", name)
}

/// A VMM under test; killed if the test ends early.
type Vmm = Running;

impl Vmm {
    /// Starts the busy guest and waits until its control socket is up.
    fn start(name: &str, extra: &[&str]) -> Vmm {
        let vmm = Self::start_kernel(name, &busy_guest(), extra);
        // The VMM binds control.sock a moment before console.sock.
        let ready = || {
            ["control.sock", "console.sock"]
                .iter()
                .all(|f| vmm.dir.join(f).exists())
        };
        vmm.wait_for(ready, "control.sock and console.sock");
        vmm
    }

    /// Starts `kernel` without waiting for anything.
    fn start_kernel(name: &str, kernel: &Path, extra: &[&str]) -> Vmm {
        let dir = scratch(name);
        let mut args = vec![
            "run".to_string(),
            "--kernel".into(),
            kernel.to_str().unwrap().into(),
            "--memory".into(),
            "32M".into(),
            "--runtime-dir".into(),
            dir.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Running::spawn(&args, dir)
    }

    fn wait_for(&self, what: impl FnMut() -> bool, name: &str) {
        wait_until(what, name);
    }

    /// Sends one request line, returns the reply line as JSON.
    fn request(&self, line: &str) -> Value {
        control_request(&self.dir, line)
    }

    fn log(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("console.log")).unwrap_or_default()
    }

    fn log_len(&self) -> usize {
        self.log().len()
    }

    /// Waits for the console log to hold at least `n` bytes.
    fn wait_log(&self, n: usize) {
        self.wait_for(|| self.log_len() >= n, "console output");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end; returns its status and stdout.
    fn wait_exit(&mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                self.child
                    .stdout
                    .take()
                    .unwrap()
                    .read_to_string(&mut out)
                    .unwrap();
                return (status.code().unwrap(), out);
            }
            assert!(Instant::now() < deadline, "the VMM did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exit_record(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("exit.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn info_reports_the_vmm_and_its_vcpu_threads() {
    let vmm = Vmm::start("info", &["--cpus", "2"]);
    vmm.wait_log(1);
    let info = vmm.request("{\"op\":\"info\"}");
    assert_eq!(info["ok"], json!(true));
    assert_eq!(info["state"], json!("running"));
    assert_eq!(info["pid"], json!(vmm.pid()));
    assert_eq!(info["memory_bytes"], json!(32 << 20));
    assert!(info["exits"].as_u64().unwrap() > 0, "{info}");
    assert!(info["uptime_ms"].as_u64().is_some(), "{info}");
    let tids: Vec<u64> = info["vcpu_tids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tids.len(), 2);
    assert_ne!(tids[0], tids[1]);
    for tid in tids {
        let task = format!("/proc/{}/task/{tid}", vmm.pid());
        assert!(Path::new(&task).exists(), "{task} is not a VMM thread");
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let vmm = Vmm::start("pause", &[]);
    vmm.wait_log(3);
    assert_eq!(vmm.request("{\"op\":\"pause\"}"), json!({"ok": true}));
    assert_eq!(vmm.request("{\"op\":\"info\"}")["state"], json!("paused"));
    // Let output already on its way reach the log, then watch it stand still.
    std::thread::sleep(Duration::from_millis(500));
    let (len, exits) = (
        vmm.log_len(),
        vmm.request("{\"op\":\"info\"}")["exits"].clone(),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(vmm.log_len(), len, "the guest wrote while paused");
    assert_eq!(vmm.request("{\"op\":\"info\"}")["exits"], exits);
    assert_eq!(
        vmm.request("{\"op\":\"pause\"}"),
        json!({"ok": false, "error": "already paused"})
    );
    assert_eq!(vmm.request("{\"op\":\"resume\"}"), json!({"ok": true}));
    assert_eq!(vmm.request("{\"op\":\"info\"}")["state"], json!("running"));
    vmm.wait_log(len + 3);
    assert_eq!(
        vmm.request("{\"op\":\"resume\"}"),
        json!({"ok": false, "error": "not paused"})
    );
}

#[test]
fn a_paused_guest_is_not_taken_for_a_halted_one() {
    let mut vmm = Vmm::start("pause-long", &["--cpus", "2"]);
    vmm.wait_log(1);
    assert_eq!(vmm.request("{\"op\":\"pause\"}"), json!({"ok": true}));
    // Several liveness periods pass with every vCPU parked.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(vmm.child.try_wait().unwrap().is_none(), "the VMM gave up");
    assert_eq!(vmm.request("{\"op\":\"resume\"}"), json!({"ok": true}));
    let len = vmm.log_len();
    vmm.wait_log(len + 3);
}

#[test]
fn a_paused_guest_stops_cleanly() {
    let mut vmm = Vmm::start("pause-stop", &["--cpus", "2"]);
    vmm.wait_log(1);
    assert_eq!(vmm.request("{\"op\":\"pause\"}"), json!({"ok": true}));
    assert_eq!(vmm.request("{\"op\":\"stop\"}"), json!({"ok": true}));
    let (status, _) = vmm.wait_exit();
    assert_eq!(status, 0);
    assert_eq!(
        vmm.exit_record()["reason"],
        json!("stopped by a stop request on the control socket")
    );
}

#[test]
fn console_clients_see_output_and_send_input() {
    let vmm = Vmm::start("console", &[]);
    let connect = || {
        let s = UnixStream::connect(vmm.dir.join("console.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let (mut a, mut b) = (connect(), connect());
    let read_until = |s: &mut UnixStream, needle: &[u8]| {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !contains(&seen, needle) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "console closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    };
    read_until(&mut a, b"...");
    read_until(&mut b, b"...");
    a.write_all(b"Z").unwrap();
    read_until(&mut a, b"<Z>");
    read_until(&mut b, b"<Z>");
    assert!(contains(&vmm.log(), b"<Z>"), "the log has the echo too");
}

#[test]
fn console_input_beyond_the_uart_fifo_arrives_whole_and_in_order() {
    let vmm = Vmm::start("input-flood", &[]);
    vmm.wait_log(1);
    let mut client = UnixStream::connect(vmm.dir.join("console.sock")).unwrap();
    // More than the UART's 64-byte FIFO, in one write.
    let input: Vec<u8> = (0..150).map(|i| b'a' + (i % 26) as u8).collect();
    client.write_all(&input).unwrap();
    let expected: Vec<u8> = input.iter().flat_map(|&b| [b'<', b, b'>']).collect();
    let echoed = || -> Vec<u8> { vmm.log().into_iter().filter(|&b| b != b'.').collect() };
    vmm.wait_for(|| echoed().len() >= expected.len(), "every byte echoed");
    assert_eq!(echoed(), expected);
}

/// CPU time (user + system, in clock ticks) of the VMM thread named `name`.
fn thread_cpu_ticks(pid: u32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat; 12 and 13 here.
            return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread named {name}");
}

#[test]
fn a_console_client_that_hangs_up_leaves_the_console_idle() {
    // A guest that prints once, then halts with interrupts on: no more output.
    let code = Asm::default()
        .print("idle\n")
        .label("halt")
        .bytes(&[0xfb, 0xf4]) // sti; hlt
        .jump(0xeb, "halt")
        .finish();
    let kernel = write_temp("idle.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let vmm = Vmm::start_kernel("hangup", &kernel, &[]);
    vmm.wait_for(|| vmm.log() == b"idle\n", "the guest's line");
    let client = UnixStream::connect(vmm.dir.join("console.sock")).unwrap();
    drop(client);
    std::thread::sleep(Duration::from_millis(300));
    let before = thread_cpu_ticks(vmm.pid(), "console");
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_ticks(vmm.pid(), "console") - before;
    // A loop spinning on the hung-up socket would use the whole second
    // (100 ticks); an idle thread uses none.
    assert!(used <= 5, "the console thread used {used} ticks while idle");
}

#[test]
fn shutdown_presses_ctrl_alt_del_on_the_keyboard() {
    let vmm = Vmm::start("shutdown", &[]);
    vmm.wait_log(1);
    assert_eq!(vmm.request("{\"op\":\"shutdown\"}"), json!({"ok": true}));
    // The guest prints '.' between the bytes it reads; leave those out.
    let keys = b"k\x1dk\x38k\xe0k\x53k\xe0k\xd3k\xb8k\x9d";
    let seen = || -> Vec<u8> { vmm.log().into_iter().filter(|&b| b != b'.').collect() };
    vmm.wait_for(|| contains(&seen(), keys), "the Ctrl-Alt-Del scancodes");
}

#[test]
fn stop_ends_the_run_with_an_exit_record_and_no_stdout() {
    let mut vmm = Vmm::start("stop", &[]);
    vmm.wait_log(1);
    assert_eq!(vmm.request("{\"op\":\"stop\"}"), json!({"ok": true}));
    let (status, stdout) = vmm.wait_exit();
    assert_eq!(status, 0);
    assert_eq!(stdout, "", "the console goes to the runtime directory only");
    assert_eq!(
        vmm.exit_record(),
        json!({"status": 0, "reason": "stopped by a stop request on the control socket"})
    );
    assert!(!vmm.dir.join("control.sock").exists());
    assert!(!vmm.dir.join("console.sock").exists());
    assert!(vmm.log_len() > 0);
}

#[test]
fn the_exit_record_carries_the_guest_s_status() {
    let code = Asm::default().print("bye\n").debug_exit(0x10).finish();
    let kernel = write_temp("bye.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let mut vmm = Vmm::start_kernel("debugexit", &kernel, &[]);
    let (status, _) = vmm.wait_exit();
    assert_eq!(status, 0x21);
    assert_eq!(
        vmm.exit_record(),
        json!({"status": 0x21, "reason": "guest wrote 0x10 to the debug-exit port"})
    );
    assert_eq!(
        vmm.log(),
        b"bye\n",
        "output written before the exit is kept"
    );
}

#[test]
fn sigterm_is_recorded_as_the_reason() {
    let mut vmm = Vmm::start("sigterm", &[]);
    vmm.wait_log(1);
    assert_eq!(
        // SAFETY: signalling our own child.
        unsafe { libc::kill(vmm.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let (status, _) = vmm.wait_exit();
    assert_eq!(status, 0);
    assert_eq!(
        vmm.exit_record(),
        json!({"status": 0, "reason": "stopped by SIGTERM"})
    );
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let vmm = Vmm::start("bad", &[]);
    vmm.wait_log(1);
    for (line, error) in [
        ("hello", "bad JSON"),
        ("{\"op\":\"reboot\"}", "unknown op 'reboot'"),
        ("{\"op\":\"pause\",\"force\":true}", "unknown field 'force'"),
        ("{}", "'op' is missing"),
    ] {
        let reply = vmm.request(line);
        assert_eq!(reply["ok"], json!(false), "{line}: {reply}");
        let text = reply["error"].as_str().unwrap();
        assert!(text.starts_with(error), "{line}: {text}");
    }
    let info = vmm.request("{\"op\":\"info\"}");
    assert_eq!(info["state"], json!("running"));
    let len = vmm.log_len();
    vmm.wait_log(len + 3);
}

#[test]
fn a_request_without_newline_is_answered_at_end_of_stream() {
    let vmm = Vmm::start("eof", &[]);
    let mut s = UnixStream::connect(vmm.dir.join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"op\":\"info\"}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let value: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(value["ok"], json!(true));
}

#[test]
fn a_runtime_dir_in_use_is_refused_and_left_alone() {
    let vmm = Vmm::start("in-use", &[]);
    vmm.wait_log(1);
    let kernel = busy_guest();
    let out = ferrovisor(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--runtime-dir",
        vmm.dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err: Vec<_> = stderr(&out)
        .lines()
        .filter(|l| !l.contains("warning:"))
        .map(String::from)
        .collect();
    assert_eq!(
        err,
        [format!(
            "ferrovisor: {} is in use by another running VMM",
            vmm.dir.join("control.sock").display()
        )]
    );
    // The first VMM still answers, and the refused one wrote no record.
    assert_eq!(vmm.request("{\"op\":\"info\"}")["ok"], json!(true));
    assert!(!vmm.dir.join("exit.json").exists());
}

#[test]
fn a_bad_guest_file_still_leaves_an_exit_record() {
    let dir = scratch("bad-config");
    let file = dir.join("guest.toml");
    std::fs::write(&file, "kernel = \"k\"\ncpus = 0\n").unwrap();
    let out = ferrovisor(&[
        "run",
        "--config",
        file.to_str().unwrap(),
        "--runtime-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("exit.json")).unwrap()).unwrap();
    let reason = format!(
        "{}: cpus: 0 is not a number of vCPUs from 1 to 254",
        file.display()
    );
    assert_eq!(record, json!({"status": 2, "reason": reason}));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_runtime_dir_is_one_line() {
    let kernel = busy_guest();
    let out = ferrovisor(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--runtime-dir",
        "/nonexistent/fv",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err: Vec<_> = stderr(&out)
        .lines()
        .filter(|l| !l.contains("warning:"))
        .map(String::from)
        .collect();
    assert_eq!(
        err,
        ["ferrovisor: --runtime-dir: /nonexistent/fv is not a directory"]
    );
}

fn cpus_allowed(pid: u32, tid: u64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn affinity_pins_each_vcpu_thread() {
    let dir = scratch("affinity-cfg");
    let kernel = busy_guest();
    let file = two_vcpu_guest_file(&dir, &kernel, "[\"1\", \"0\"]");
    let rt = scratch("affinity");
    let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--config", file.to_str().unwrap(), "--runtime-dir"])
        .arg(&rt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vmm = Vmm { child, dir: rt };
    vmm.wait_for(|| vmm.dir.join("control.sock").exists(), "control.sock");
    let info = vmm.request("{\"op\":\"info\"}");
    let tids = info["vcpu_tids"].as_array().unwrap();
    assert_eq!(cpus_allowed(vmm.pid(), tids[0].as_u64().unwrap()), "1");
    assert_eq!(cpus_allowed(vmm.pid(), tids[1].as_u64().unwrap()), "0");
    // The VMM's other threads are not pinned.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(cpus_allowed(vmm.pid(), u64::from(vmm.pid())), online.trim());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_affinity_flag_pins_every_vcpu_thread() {
    let vmm = Vmm::start("affinity-flag", &["--cpus", "2", "--affinity", "1"]);
    let info = vmm.request("{\"op\":\"info\"}");
    for tid in info["vcpu_tids"].as_array().unwrap() {
        assert_eq!(cpus_allowed(vmm.pid(), tid.as_u64().unwrap()), "1");
    }
}

#[test]
fn a_host_cpu_that_does_not_exist_is_one_line_before_the_guest_starts() {
    let dir = scratch("affinity-bad");
    let code = Asm::default().print("started\n").debug_exit(0).finish();
    let kernel = write_temp("never.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let file = two_vcpu_guest_file(&dir, &kernel, "[\"0\", \"1000\"]");
    let out = ferrovisor(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "", "the guest must not start");
    let err: Vec<_> = stderr(&out)
        .lines()
        .filter(|l| !l.contains("warning:"))
        .map(String::from)
        .collect();
    let available = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(
        err,
        [format!(
            "ferrovisor: affinity: vCPU 1: host CPU 1000 is not available here (available: {})",
            available.trim()
        )]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Writes a guest file for `kernel` with 2 vCPUs and the given affinity.
fn two_vcpu_guest_file(dir: &Path, kernel: &Path, affinity: &str) -> PathBuf {
    let file = dir.join("guest.toml");
    let text = format!(
        "kernel = {:?}\nmemory = \"32M\"\ncpus = 2\naffinity = {affinity}\n",
        kernel.to_str().unwrap()
    );
    std::fs::write(&file, text).unwrap();
    file
}
