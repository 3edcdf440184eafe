//! `cargo xtask guest-kit`: the default Linux guest, built from Debian's stock
//! cloud kernel and busybox-static, cached under `target/guest-kit/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::Archive;
use crate::deb::{self, Package};
use crate::elf;
use crate::kmod::{self, ModuleTree};
use crate::util::{self, Context, Fnv, Result};

/// The guest's /init script.
const INIT: &str = include_str!("../../guest/init");
/// Source of the port-I/O helper; built with rustc for the guest.
const PORTIO_SRC: &str = "guest/tools/portio.rs";
/// Source of the freestanding /init helper (mounts, modules, power-off).
const KITSETUP_SRC: &str = "guest/tools/kitsetup.rs";
/// Guest helpers written with Rust's standard library, linked statically:
/// (source, name in the guest's /bin).
const STD_TOOLS: &[(&str, &str)] = &[
    ("guest/tools/vsock.rs", "vsock"),
    ("guest/tools/blkbench.rs", "blkbench"),
    ("guest/tools/netbench.rs", "netbench"),
    ("guest/tools/region.rs", "region"),
    ("guest/tools/periodic.rs", "periodic"),
];
/// A module the std tools include (`#[path]`), part of the kit's inputs.
const SHARED_TOOL_SRC: &str = "guest/tools/vsock_sys.rs";
/// Bump when the layout of the kit changes in a way the inputs do not show.
const KIT_FORMAT: &str = "guest-kit-2";

/// Debian packages whose files the guest needs for ext4: `mke2fs` and the
/// shared libraries it loads (libc6 brings the C library and the loader).
const E2FS_PACKAGES: &[&str] = &[
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    "libblkid1",
    "libuuid1",
    "libc6",
];

/// The metapackage whose dependency is the kernel.
pub const KERNEL_META: &str = "linux-image-cloud-amd64";

/// The guest's drivers, in the order they are wanted; dependencies are added.
const GUEST_MODULES: &[&str] = &[
    // First, so that a panic anywhere after /init starts reaches the VMM.
    "pvpanic",
    "pvpanic_mmio",
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    // The region tool's doorbell waits (INTx through UIO).
    "uio_pci_generic",
];

/// The kernel command line the kit is meant to boot with (see docs/guest-kit.md).
/// The line the kit's /init prints after a command (then its status).
pub const STATUS_LINE: &str = "ferrovisor-guest: exit status ";
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=k,f panic=-1 io_delay=none";

/// The kit's command line with `/init` running the shell text `run`.
pub fn cmdline_running(run: &str) -> String {
    format!(
        "{DEFAULT_CMDLINE} ferrovisor.run64={}",
        crate::util::base64(run.as_bytes())
    )
}

/// A built guest kit.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The kernel as shipped (bzImage).
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF kernel cut out of the bzImage (boots via PVH).
    pub vmlinux: PathBuf,
    /// The guest initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
    /// The static port-I/O helper.
    pub portio: PathBuf,
    /// The static /init helper.
    pub kitsetup: PathBuf,
    /// The statically linked guest helpers (`vsock`, `blkbench`), by guest name.
    pub tools: Vec<(String, PathBuf)>,
    /// Where the e2fsprogs packages and their libraries are unpacked.
    pub e2fs_root: PathBuf,
    /// The unpacked kernel package.
    pub kernel_root: PathBuf,
    /// The static busybox binary.
    pub busybox: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

/// Where the kit lives.
pub fn kit_dir() -> PathBuf {
    util::target_dir().join("guest-kit")
}

/// Builds the guest kit, or returns the cached one when its inputs are unchanged.
pub fn build() -> Result<Kit> {
    let dir = kit_dir();
    util::mkdir(&dir)?;
    util::ensure_tool("dpkg-deb", "dpkg")?;
    util::ensure_tool("lz4", "lz4")?;
    let kernel = deb::resolve_dependency(KERNEL_META, "linux-image-", "-cloud-amd64")?;
    let busybox = deb::resolve("busybox-static")?;
    let e2fs = E2FS_PACKAGES
        .iter()
        .map(|name| deb::resolve(name))
        .collect::<Result<Vec<_>>>()?;
    let portio_src = util::workspace_root().join(PORTIO_SRC);
    let kitsetup_src = util::workspace_root().join(KITSETUP_SRC);
    let mut key = Fnv::default();
    key.add(KIT_FORMAT.as_bytes())
        .add(kernel.file_name().as_bytes())
        .add(busybox.file_name().as_bytes())
        .add(INIT.as_bytes())
        .add(&util::read(&portio_src)?)
        .add(&util::read(&kitsetup_src)?)
        .add(GUEST_MODULES.join(",").as_bytes());
    for package in &e2fs {
        key.add(package.file_name().as_bytes());
    }
    key.add(&util::read(&util::workspace_root().join(SHARED_TOOL_SRC))?);
    for (source, name) in STD_TOOLS {
        key.add(name.as_bytes())
            .add(&util::read(&util::workspace_root().join(source))?);
    }
    let key = key.hex();
    let kit = Kit {
        vmlinuz: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        portio: dir.join("portio"),
        kitsetup: dir.join("kitsetup"),
        tools: STD_TOOLS
            .iter()
            .map(|(_, name)| (name.to_string(), dir.join("tools").join(name)))
            .collect(),
        e2fs_root: dir.join("e2fs"),
        kernel_root: dir.join("kernel"),
        busybox: dir.join("busybox/bin/busybox"),
        release: kernel.name.trim_start_matches("linux-image-").to_string(),
    };
    let stamp = dir.join("stamp");
    let outputs = [
        &kit.vmlinuz,
        &kit.vmlinux,
        &kit.initramfs,
        &kit.portio,
        &kit.kitsetup,
        &kit.busybox,
    ];
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key)
        && outputs.iter().all(|p| p.is_file())
        && kit.tools.iter().all(|(_, p)| p.is_file());
    if fresh {
        return Ok(kit);
    }
    let _ = std::fs::remove_file(&stamp);
    eprintln!(
        "xtask: building the guest kit ({} {})",
        kernel.name, kernel.version
    );
    fetch(&kernel, &busybox, &e2fs, &kit)?;
    build_portio(&portio_src, &kit.portio)?;
    build_portio(&kitsetup_src, &kit.kitsetup)?;
    util::mkdir(&dir.join("tools"))?;
    for ((source, _), (_, out)) in STD_TOOLS.iter().zip(&kit.tools) {
        build_std_tool(&util::workspace_root().join(source), out)?;
    }
    copy(&kernel_image(&kit)?, &kit.vmlinuz)?;
    cut_vmlinux(&kit.vmlinuz, &kit.vmlinux)?;
    guest_initramfs(&kit)?;
    util::write(&stamp, format!("{key}\n"))?;
    Ok(kit)
}

fn fetch(kernel: &Package, busybox: &Package, e2fs: &[Package], kit: &Kit) -> Result<()> {
    let debs = kit_dir().join("debs");
    let kernel_deb = kernel.download(&debs)?;
    let busybox_deb = busybox.download(&debs)?;
    deb::extract(&kernel_deb, &kit.kernel_root)?;
    deb::extract(&busybox_deb, &kit_dir().join("busybox"))?;
    let mut keep = vec![kernel_deb, busybox_deb];
    // The e2fsprogs set is unpacked into one tree, one package after another.
    if kit.e2fs_root.exists() {
        std::fs::remove_dir_all(&kit.e2fs_root)
            .ctx(|| format!("cannot remove {}", kit.e2fs_root.display()))?;
    }
    for package in e2fs {
        let file = package.download(&debs)?;
        deb::extract_into(&file, &kit.e2fs_root)?;
        keep.push(file);
    }
    // Old package versions are not needed again.
    for entry in std::fs::read_dir(&debs).ctx(|| format!("cannot list {}", debs.display()))? {
        let path = entry
            .ctx(|| format!("cannot list {}", debs.display()))?
            .path();
        if !keep.contains(&path) {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .ctx(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// The bzImage inside the unpacked kernel package.
fn kernel_image(kit: &Kit) -> Result<PathBuf> {
    let boot = kit.kernel_root.join("boot");
    let image = boot.join(format!("vmlinuz-{}", kit.release));
    if image.is_file() {
        return Ok(image);
    }
    Err(fail!("the kernel package has no {}", image.display()))
}

/// Compiles a freestanding helper (no libc: `portio`, `kitsetup`) into a
/// static binary.
fn build_portio(source: &Path, out: &Path) -> Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-type",
        "bin",
        "-C",
        "panic=abort",
    ])
    .args(["-C", "opt-level=s", "-C", "relocation-model=static"])
    .args(["-C", "target-feature=+crt-static", "-C", "strip=symbols"])
    .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
    .args([
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ])
    .arg("-o")
    .arg(out)
    .arg(source);
    util::run(&mut cmd)
}

/// Compiles a guest helper that uses Rust's standard library into a static
/// binary (the C library linked in), so that it needs nothing in the guest.
fn build_std_tool(source: &Path, out: &Path) -> Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2021", "--crate-type", "bin"])
        .args(["-C", "opt-level=2", "-C", "panic=abort"])
        .args(["-C", "target-feature=+crt-static", "-C", "strip=symbols"])
        .arg("-o")
        .arg(out)
        .arg(source);
    util::run(&mut cmd)
}

/// Offsets in the x86 boot protocol's setup header.
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

/// Locates the compressed kernel inside a bzImage: (start, length).
pub fn payload_range(image: &[u8]) -> std::result::Result<(usize, usize), String> {
    if image.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS setup header)".into());
    }
    let version = image
        .get(PROTOCOL_VERSION..PROTOCOL_VERSION + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    if version < 0x208 {
        return Err(format!("boot protocol {version:#x} has no payload fields"));
    }
    let sects = match image[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(image, PAYLOAD_OFFSET).ok_or("truncated setup header")? as usize;
    let length = u32_at(image, PAYLOAD_LENGTH).ok_or("truncated setup header")? as usize;
    let start = (sects + 1) * 512 + offset;
    if start
        .checked_add(length)
        .is_none_or(|end| end > image.len())
    {
        return Err("payload lies outside the file".into());
    }
    Ok((start, length))
}

/// Cuts the LZ4 payload out of a bzImage and decompresses it with `lz4`.
fn cut_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let image = util::read(bzimage)?;
    let (start, length) = payload_range(&image).map_err(|e| fail!("{}: {e}", bzimage.display()))?;
    let payload = &image[start..start + length];
    if payload.get(..4) != Some(&LZ4_LEGACY_MAGIC) {
        return Err(fail!(
            "{}: the payload is not LZ4-compressed (starts {:02x?})",
            bzimage.display(),
            payload.get(..4).unwrap_or_default()
        ));
    }
    // The build appends the uncompressed size (4 bytes) after the LZ4 stream.
    let (stream, size) = payload.split_at(length - 4);
    let size = u32_at(size, 0).unwrap_or(0) as usize;
    let lz4_in = kit_dir().join("payload.lz4");
    util::write(&lz4_in, stream)?;
    let result = Command::new("lz4")
        .args(["-d", "-c", "-q"])
        .arg(&lz4_in)
        .stderr(Stdio::inherit())
        .output()
        .ctx(|| "cannot run lz4".to_string())?;
    let _ = std::fs::remove_file(&lz4_in);
    if !result.status.success() || result.stdout.len() != size {
        return Err(fail!(
            "lz4 could not decompress the kernel payload ({} bytes out, {size} expected)",
            result.stdout.len()
        ));
    }
    if result.stdout.get(..4) != Some(b"\x7fELF") {
        return Err(fail!("the decompressed kernel payload is not an ELF file"));
    }
    util::write(out, &result.stdout)
}

/// Adds busybox, its applet links and the basic directories and device nodes.
pub fn add_busybox(archive: &mut Archive, busybox: &Path) -> Result<()> {
    archive.host_file("/bin/busybox", 0o755, busybox);
    let list = util::output(Command::new(busybox).arg("--list"))?;
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            archive.symlink(&format!("/bin/{applet}"), "busybox");
        }
    }
    archive.symlink("/sbin", "bin");
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/root", "/etc", "/run"] {
        archive.dir(dir);
    }
    archive.char_dev("/dev/console", 0o600, 5, 1);
    archive.char_dev("/dev/null", 0o666, 1, 3);
    archive.char_dev("/dev/ttyS0", 0o600, 4, 64);
    Ok(())
}

fn guest_initramfs(kit: &Kit) -> Result<()> {
    let mut archive = Archive::new();
    add_busybox(&mut archive, &kit.busybox)?;
    archive.host_file("/bin/portio", 0o755, &kit.portio);
    archive.host_file("/bin/kitsetup", 0o755, &kit.kitsetup);
    for (name, path) in &kit.tools {
        archive.host_file(&format!("/bin/{name}"), 0o755, path);
    }
    elf::add_mke2fs(&mut archive, &kit.e2fs_root)?;
    archive.bytes("/init", 0o755, INIT);
    let (tree, _) = ModuleTree::open(&kit.kernel_root)?;
    let (modules, missing) = tree.load_order(GUEST_MODULES)?;
    if !missing.is_empty() {
        eprintln!(
            "xtask: note: this kernel has no module {}; skipped",
            missing.join(", ")
        );
    }
    kmod::add_to_archive(&mut archive, "/lib/modules", modules);
    archive.write_to(&kit.initramfs)
}

/// `cargo xtask guest-kit`.
pub fn command() -> Result<()> {
    let kit = build()?;
    println!("guest kit ({}):", kit.release);
    println!("  bzImage    {}", kit.vmlinuz.display());
    println!(
        "  vmlinux    {}   (PVH ELF, cut from the bzImage)",
        kit.vmlinux.display()
    );
    println!("  initramfs  {}", kit.initramfs.display());
    println!("  cmdline    {DEFAULT_CMDLINE}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sects: u8, version: u16, offset: u32, length: u32, size: usize) -> Vec<u8> {
        let mut image = vec![0u8; size];
        image[SETUP_SECTS] = sects;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&version.to_le_bytes());
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&offset.to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
        image
    }

    #[test]
    fn payload_follows_setup_sectors() {
        let image = header(3, 0x20f, 0x10, 100, 4096);
        assert_eq!(payload_range(&image), Ok((4 * 512 + 0x10, 100)));
        // Zero setup sectors means four.
        let image = header(0, 0x20f, 0, 8, 4096);
        assert_eq!(payload_range(&image), Ok((5 * 512, 8)));
    }

    #[test]
    fn payload_errors_are_reported() {
        assert!(payload_range(&[0u8; 1024]).is_err());
        assert!(payload_range(&header(3, 0x206, 0, 8, 4096)).is_err());
        assert!(payload_range(&header(3, 0x20f, 0, 8000, 4096)).is_err());
    }

    #[test]
    fn init_script_knows_its_command_line_words() {
        for word in ["ferrovisor.run64=", "ferrovisor.run=", "ferrovisor.exit="] {
            assert!(INIT.contains(word), "{word}");
        }
        assert!(INIT.contains("portio outb 0x80"));
    }

    #[test]
    fn init_traps_sigint_while_the_command_runs() {
        assert!(INIT.contains("trap stop INT"));
        // Without this the kernel reboots on Ctrl-Alt-Del instead.
        assert!(INIT.contains("echo 0 >/proc/sys/kernel/ctrl-alt-del"));
        // The command runs in the background (so the trap can run) with its
        // signals restored.
        assert!(INIT.contains(r#"kitsetup run /bin/sh -c "$run" </dev/console &"#));
        assert!(INIT.contains("wait $!"));
    }

    /// Builds one of the static helpers into a scratch directory.
    fn build_tool(name: &str) -> PathBuf {
        let dir = util::target_dir().join(format!("tool-test-{name}-{}", std::process::id()));
        util::mkdir(&dir).expect("mkdir");
        let out = dir.join(name);
        let source = util::workspace_root().join(format!("guest/tools/{name}.rs"));
        build_std_tool(&source, &out).expect("build the helper");
        out
    }

    #[test]
    fn blkbench_measures_and_checks_a_file() {
        let tool = build_tool("blkbench");
        let image = tool.with_file_name("image");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(4 << 20))
            .expect("image");
        let out = Command::new(&tool)
            .arg(&image)
            .args(["4", "1"])
            .output()
            .expect("run blkbench");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for name in ["seq_write", "seq_read", "rand_read"] {
            assert!(text.contains(&format!("blkbench: {name} ")), "{text}");
        }
        // The pattern it wrote is on the file.
        assert!(std::fs::read(&image).expect("read").iter().any(|&b| b != 0));
        let bad = Command::new(&tool).arg("x").output().expect("run");
        assert_eq!(bad.status.code(), Some(1));
        let _ = std::fs::remove_dir_all(tool.parent().expect("dir"));
    }

    #[test]
    fn vsock_helper_rejects_bad_arguments() {
        let tool = build_tool("vsock");
        for args in [&["connect", "2"][..], &["listen", "x", "hi"], &["send"]] {
            let out = Command::new(&tool).args(args).output().expect("run");
            assert_eq!(out.status.code(), Some(1), "{args:?}");
        }
        let _ = std::fs::remove_dir_all(tool.parent().expect("dir"));
    }

    #[test]
    fn periodic_task_reports_its_jobs_and_refuses_bad_arguments() {
        let tool = build_tool("periodic");
        let out = Command::new(&tool)
            .args(["10", "100", "1"])
            .output()
            .expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("periodic: 100 jobs, "), "{text}");
        assert!(text.contains(" missed, response p50 "), "{text}");
        for args in [&["10", "100"][..], &["0", "100", "1"], &["x", "1", "1"]] {
            let out = Command::new(&tool).args(args).output().expect("run");
            assert_eq!(out.status.code(), Some(1), "{args:?}");
        }
        let _ = std::fs::remove_dir_all(tool.parent().expect("dir"));
    }

    #[test]
    fn region_tool_reads_writes_rings_and_streams_over_files() {
        let tool = build_tool("region");
        let dev = tool.with_file_name("dev");
        util::mkdir(&dev).expect("mkdir");
        let sized = |name: &str, len: u64| {
            std::fs::File::create(dev.join(name))
                .and_then(|f| f.set_len(len))
                .expect("file");
        };
        sized("resource2", 1 << 20);
        sized("resource0", 4096);
        // The resource table: BAR 0 (256 B), BAR 1 unassigned, BAR 2 (1 MiB).
        let table = "0x1000 0x10ff 0x40200\n0x0 0x0 0x0\n0x100000 0x1fffff 0x14220c\n";
        std::fs::write(dev.join("resource"), table).expect("resource");
        let region = |args: &[&str]| {
            let mut c = Command::new(&tool);
            c.env("REGION_DEVICE", &dev).args(args);
            c
        };
        let stdout = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
        let write = region(&["write", "600000", "shared"])
            .output()
            .expect("write");
        assert!(write.status.success(), "{write:?}");
        let read = region(&["read", "600000", "16"]).output().expect("read");
        assert_eq!(stdout(&read), "region: read shared\n");
        // The Doorbell register (0xc) gets peer 3 in bits 16-31, vector 2.
        assert!(region(&["ring", "3", "2"])
            .status()
            .expect("ring")
            .success());
        let registers = std::fs::read(dev.join("resource0")).expect("registers");
        assert_eq!(&registers[12..16], &0x0003_0002u32.to_le_bytes());
        // 64 messages of 40 KiB through the ring, from another process:
        // more than the ring holds, so it wraps and the sides wait.
        let sender = region(&["send", "64", "40960"]).spawn().expect("send");
        let recv = region(&["recv", "64", "40960"]).output().expect("recv");
        assert!(recv.status.success(), "{recv:?}");
        assert!(
            stdout(&recv).starts_with("region: received 64 messages of 40960 B in "),
            "{}",
            stdout(&recv)
        );
        assert!(sender.wait_with_output().expect("wait").status.success());
        // Bad arguments are status 1, a missing device 2, one line each.
        let bad = region(&["read", "x", "1"]).output().expect("run");
        assert_eq!(bad.status.code(), Some(1));
        let missing = Command::new(&tool)
            .env("REGION_DEVICE", dev.join("none"))
            .arg("info")
            .output()
            .expect("run");
        assert_eq!(missing.status.code(), Some(2));
        assert_eq!(String::from_utf8_lossy(&missing.stderr).lines().count(), 1);
        let _ = std::fs::remove_dir_all(tool.parent().expect("dir"));
    }
}
