//! Tiny guests for the host KVM tests: multiboot kernels (a.out kludge)
//! assembled here, byte by byte, and run through the real `ferrovisor` binary.

#![allow(dead_code)]

mod checks;
pub mod doorbell;
#[allow(unused_imports)]
pub use checks::{Checks, PASS};

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A minimal x86 assembler: just the instructions the tiny guests use.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<(&'static str, usize)>,
}

impl Asm {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    /// mov dx, imm16 (32-bit code)
    pub fn mov_dx(&mut self, v: u16) -> &mut Self {
        self.bytes(&[0x66, 0xba]).bytes(&v.to_le_bytes())
    }
    /// mov al, imm8
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0xb0, v])
    }
    /// mov eax, imm32
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.bytes(&[0xb8]).bytes(&v.to_le_bytes())
    }
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.bytes(&[0xee])
    }
    pub fn out_dx_ax(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0xef])
    }
    pub fn out_dx_eax(&mut self) -> &mut Self {
        self.bytes(&[0xef])
    }
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.bytes(&[0xec])
    }
    /// mov dword [addr], imm32
    pub fn store32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&v.to_le_bytes())
    }
    /// Writes `text` to the serial port, one `out` per byte.
    pub fn print(&mut self, text: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in text.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// Writes `v` to the debug-exit port: the VMM exits with (v << 1) | 1.
    pub fn debug_exit(&mut self, v: u32) -> &mut Self {
        self.mov_dx(0xf4).mov_eax(v).out_dx_eax()
    }
    pub fn cli_hlt(&mut self) -> &mut Self {
        self.bytes(&[0xfa, 0xf4])
    }
    /// The common ending of a checking guest: label `done` exits with
    /// `pass`, label `bad` with `pass + 1`.
    pub fn verdict(&mut self, pass: u32) -> &mut Self {
        self.label("done")
            .debug_exit(pass)
            .label("bad")
            .debug_exit(pass + 1)
    }
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.code.len()));
        self
    }
    /// A short conditional or unconditional jump (opcode 0xeb, 0x74, 0x75...).
    pub fn jump(&mut self, opcode: u8, target: &'static str) -> &mut Self {
        self.bytes(&[opcode, 0]);
        self.fixups.push((target, self.code.len() - 1));
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        for &(name, at) in &self.fixups {
            let target = self.labels.iter().find(|l| l.0 == name).expect("label").1;
            let rel = target as isize - (at as isize + 1);
            self.code[at] = i8::try_from(rel).expect("short jump") as u8;
        }
        self.code.clone()
    }
}

pub const MB_MAGIC: u32 = 0x1bad_b002;
const MB_FLAG_ADDRESS: u32 = 1 << 16;
const MB_FLAG_MEMINFO: u32 = 1 << 1;

/// A multiboot kernel loaded at `load`: `prefix` bytes first (code that must
/// sit at the load address), then the 32-byte multiboot header, then `code`,
/// which is the entry point. The image is padded with `bss` zero bytes of
/// .bss described in the header.
pub fn multiboot_kernel(load: u32, prefix: &[u8], code: &[u8], bss: u32) -> Vec<u8> {
    let mut image = prefix.to_vec();
    while !image.len().is_multiple_of(4) {
        image.push(0x90);
    }
    let header_off = image.len() as u32;
    let flags = MB_FLAG_ADDRESS | MB_FLAG_MEMINFO;
    let entry = load + header_off + 32;
    let end = load + header_off + 32 + code.len() as u32;
    let fields = [
        MB_MAGIC,
        flags,
        0u32.wrapping_sub(MB_MAGIC.wrapping_add(flags)),
        load + header_off,
        load,
        end,
        end + bss,
        entry,
    ];
    for f in fields {
        image.extend_from_slice(&f.to_le_bytes());
    }
    image.extend_from_slice(code);
    image
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh file under the target directory holding `bytes`.
pub fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = dir.join(format!("{}-{}-{name}", std::process::id(), n));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// Runs `ferrovisor` with `args`, no stdin, and a time limit so that a hung
/// guest fails the test rather than the suite.
pub fn ferrovisor(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrovisor");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "ferrovisor {args:?} did not finish in 60 s\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Boots a tiny multiboot guest whose code is `code`, loaded at 1 MiB.
pub fn boot_tiny(code: &[u8], extra: &[&str]) -> Output {
    let kernel = write_temp("tiny.elf", &multiboot_kernel(0x10_0000, &[], code, 0));
    let kernel = kernel.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["run", "--kernel", &kernel, "--memory", "32M"];
    args.extend_from_slice(extra);
    ferrovisor(&args)
}

/// Sends one request line to the control socket in runtime directory
/// `dir`; checks that the reply is one line and returns it as JSON.
pub fn control_request(dir: &std::path::Path, line: &str) -> serde_json::Value {
    let reply = try_control_request(dir, line).expect("control socket request");
    assert!(reply.ends_with('\n'), "one reply line: {reply:?}");
    assert_eq!(reply.matches('\n').count(), 1, "one reply line: {reply:?}");
    serde_json::from_str(&reply).expect("reply is JSON")
}

/// One request line on the control socket in `dir`, and the reply line
/// as text; an error when the VMM does not (yet) answer.
pub fn try_control_request(dir: &std::path::Path, line: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("control.sock"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the kernel says of a thread (`sched_getattr`): policy, priority,
/// runtime and period in nanoseconds.
pub fn kernel_policy(tid: i32) -> (u32, u32, u64, u64) {
    let mut attr = [0u64; 6];
    // SAFETY: `attr` is 48 writable bytes, the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, attr.as_mut_ptr(), 48u32, 0u32) };
    assert_eq!(rc, 0, "sched_getattr({tid})");
    let policy = (attr[0] >> 32) as u32;
    let priority = (attr[2] >> 32) as u32;
    (policy, priority, attr[3], attr[5])
}

pub const SCHED_OTHER: u32 = 0;
pub const SCHED_RR: u32 = 2;
pub const SCHED_DEADLINE: u32 = 6;
/// A fresh directory `/tmp/TAG-PID-NAME` for one test: near the root, since
/// unix socket paths are short.
pub fn scratch_dir(tag: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// Waits up to 30 s for `what`; fails the test naming `name` otherwise.
pub fn wait_until(mut what: impl FnMut() -> bool, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !what() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {name}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A guest that never stops on its own. Each round it prints '.', echoes a
/// byte from the serial port as `<X>`, reports a byte from the keyboard as
/// `kX`, then spins a while.
pub fn busy_guest() -> PathBuf {
    let code = Asm::default()
        .label("top")
        .print(".")
        // Serial input: LSR bit 0.
        .mov_dx(0x3fd)
        .in_al_dx()
        .bytes(&[0xa8, 0x01]) // test al, 1
        .jump(0x74, "keyboard")
        .mov_dx(0x3f8)
        .in_al_dx()
        .bytes(&[0x88, 0xc3]) // mov bl, al
        .mov_al(b'<')
        .out_dx_al()
        .bytes(&[0x88, 0xd8]) // mov al, bl
        .out_dx_al()
        .mov_al(b'>')
        .out_dx_al()
        // Keyboard: i8042 status bit 0.
        .label("keyboard")
        .mov_dx(0x64)
        .in_al_dx()
        .bytes(&[0xa8, 0x01])
        .jump(0x74, "delay")
        .mov_dx(0x60)
        .in_al_dx()
        .bytes(&[0x88, 0xc3])
        .mov_dx(0x3f8)
        .mov_al(b'k')
        .out_dx_al()
        .bytes(&[0x88, 0xd8])
        .out_dx_al()
        .label("delay")
        .bytes(&[0xb9, 0xd0, 0x07, 0x00, 0x00]) // mov ecx, 2000
        .label("spin")
        .jump(0xe2, "spin") // loop spin
        .jump(0xeb, "top")
        .finish();
    write_temp("busy.elf", &multiboot_kernel(0x10_0000, &[], &code, 0))
}

/// A `ferrovisor` process under test with its scratch directory: killed,
/// and the directory removed, when dropped, so that a test that ends early
/// leaves nothing behind.
pub struct Running {
    pub child: Child,
    pub dir: PathBuf,
}

impl Running {
    /// Starts `ferrovisor ARGS` with stdin from /dev/null and stdout and
    /// stderr piped.
    pub fn spawn(args: &[String], dir: PathBuf) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferrovisor");
        Running { child, dir }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
