//! What the daemon does not let an API client or a local user reach: files
//! outside its image roots, symlinks (also one swapped in after create),
//! block devices, foreign taps, an image another guest writes, the API
//! socket and the guests' state; and the stale-socket rule, the per-uid
//! connection limit and the audit log. A real `ferrovisor daemon`, real
//! files and the tiny echo guest on the host's KVM.

mod common;
mod control;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use control::{echo_description, TestDaemon};
use serde_json::{json, Value};

/// The unprivileged user and group the tests act as.
const NOBODY: u32 = 65534;

/// Creates guest `name` from `config`; returns the status and the body.
fn create(d: &TestDaemon, name: &str, config: &str) -> (u16, Value) {
    d.call(
        "POST",
        "/guests",
        Some(json!({ "name": name, "config": config })),
    )
}

/// Asserts a 400 whose message names `field` and contains `why`.
fn refused(reply: (u16, Value), field: &str, why: &str) {
    let (status, body) = reply;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().expect("error");
    assert!(message.contains(&format!("{field}: ")), "{message}");
    assert!(message.contains(why), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

/// A raw image of `len` bytes in the daemon's test directory (a root).
fn image(d: &TestDaemon, name: &str, len: usize) -> PathBuf {
    let path = d.dir.join(name);
    std::fs::write(&path, vec![0u8; len]).expect("image");
    path
}

/// The echo guest with one disk.
fn with_disk(path: &Path, readonly: bool) -> String {
    format!(
        "{}[[disk]]\npath = \"{}\"\nreadonly = {readonly}\n",
        echo_description(),
        path.display()
    )
}

#[test]
fn files_outside_the_roots_symlinks_and_block_devices_are_refused_with_400() {
    let d = TestDaemon::start();
    refused(
        create(&d, "shadow", &with_disk(Path::new("/etc/shadow"), false)),
        "disk[0].path",
        "/etc/shadow: not under an image root",
    );
    let initrd = format!("{}initramfs = \"/etc/shadow\"\n", echo_description());
    refused(
        create(&d, "initrd", &initrd),
        "initramfs",
        "not under an image root",
    );
    // `..` does not lead out of a root either.
    let escape = d.dir.join("../../etc/shadow");
    refused(
        create(&d, "escape", &with_disk(&escape, true)),
        "disk[0].path",
        "not under an image root",
    );

    // A symlink inside a root, to a file inside the same root: refused.
    let target = image(&d, "real.img", 4096);
    let link = d.dir.join("link.img");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    refused(
        create(&d, "link", &with_disk(&link, false)),
        "disk[0].path",
        "a symbolic link (or a path through one); guest files must not be symlinks",
    );

    // A block device in a root that does not allow them.
    let device = d.dir.join("loop.blk");
    let c_path = std::ffi::CString::new(device.to_str().expect("utf-8")).expect("c");
    // SAFETY: mknod reads the C string, which outlives the call.
    let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 7)) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    refused(
        create(&d, "blk", &with_disk(&device, true)),
        "disk[0].path",
        "a block device, and image root",
    );
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
}

#[test]
fn a_symlink_swapped_in_after_create_is_refused_at_start() {
    let d = TestDaemon::start();
    let disk = image(&d, "swap.img", 4096);
    let (status, body) = create(&d, "swap", &with_disk(&disk, false));
    assert_eq!(status, 201, "{body}");
    // A user who can write the image's directory puts a link in its place.
    std::fs::remove_file(&disk).expect("remove");
    std::os::unix::fs::symlink("/etc/shadow", &disk).expect("symlink");
    let (status, body) = d.call("POST", "/guests/swap/start", None);
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().expect("error");
    assert_eq!(
        message,
        format!(
            "disk[0].path: {}: a symbolic link (or a path through one); guest files must not be symlinks",
            disk.display()
        )
    );
    assert_eq!(d.info("swap")["state"], "created");
}

#[test]
fn a_tap_the_daemon_does_not_allow_is_refused_with_400() {
    let d = TestDaemon::start_with(&["--taps", "fvt*,guestnet0"]);
    for tap in ["eth0", "lo", "fv0"] {
        let config = format!("{}[[net]]\ntap = \"{tap}\"\n", echo_description());
        refused(
            create(&d, "net", &config),
            "net[0].tap",
            &format!(
                "'{tap}' is not a tap this daemon may attach guests to (allowed: fvt*,guestnet0)"
            ),
        );
    }
    let outside = format!(
        "{}[vsock]\ncid = 3\nsocket = \"/tmp/escape.sock\"\n",
        echo_description()
    );
    refused(
        create(&d, "vs", &outside),
        "vsock.socket",
        "must be a file in the guest's runtime directory",
    );
    let runtime = d.state_dir.join("guests/vs/run/v.sock");
    let inside = format!(
        "{}[vsock]\ncid = 3\nsocket = \"{}\"\n",
        echo_description(),
        runtime.display()
    );
    let (status, body) = create(&d, "vs", &inside);
    assert_eq!(status, 201, "{body}");
}

#[test]
fn a_second_read_write_user_of_one_image_is_refused_at_start_naming_both() {
    let d = TestDaemon::start();
    let disk = image(&d, "shared.img", 1 << 20);
    for name in ["first", "second", "reader"] {
        let (status, body) = create(&d, name, &with_disk(&disk, name == "reader"));
        assert_eq!(status, 201, "{body}");
    }
    d.expect("POST", "/guests/first/start", None, 200);
    d.wait_console("first", "ready");
    for (name, how) in [("second", "read-write"), ("reader", "read-only")] {
        let (status, body) = d.call("POST", &format!("/guests/{name}/start"), None);
        assert_eq!(status, 409, "{body}");
        assert_eq!(
            body["error"],
            format!(
                "disk[0].path: {}: guest '{name}' cannot use it {how}: guest 'first' holds it",
                disk.display()
            )
        );
        assert_eq!(d.info(name)["state"], "created");
    }
    // `ferrovisor run` takes the same lock, and says the image is in use.
    let out = common::ferrovisor(&[
        "run",
        "--kernel",
        control::echo_kernel().to_str().expect("utf-8"),
        "--memory",
        "32M",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in use by another guest (it holds a write lock on it)"),
        "{err}"
    );
    // Once the writer ends, the image is free.
    d.expect("POST", "/guests/first/kill", None, 200);
    d.expect("POST", "/guests/second/start", None, 200);
}

/// A copy of the binary the unprivileged user can run: the build tree may
/// sit in a directory only root can enter.
fn binary_for_nobody() -> &'static std::path::Path {
    static COPY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::path::PathBuf::from(format!("/tmp/fv-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("directory for the copy");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let copy = dir.join("ferrovisor");
        std::fs::copy(env!("CARGO_BIN_EXE_ferrovisor"), &copy).expect("copy the binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        copy
    })
}

/// Runs the CLI as the unprivileged user.
fn cli_as_nobody(d: &TestDaemon, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let out = Command::new(binary_for_nobody())
            .args(args)
            .arg("--socket")
            .arg(&d.socket)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .output();
        match out {
            // A process another test forked while the copy was being
            // written holds the file open for writing until it execs;
            // the kernel refuses to run the copy meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            out => return out.expect("run the CLI as nobody"),
        }
    }
}

/// The lines of the daemon's audit log.
fn audit(d: &TestDaemon) -> Vec<Value> {
    std::fs::read_to_string(d.state_dir.join("audit.log"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn an_unprivileged_user_cannot_use_the_api_nor_read_guest_state() {
    let d = TestDaemon::start();
    d.create_echo("private", true);
    d.wait_console("private", "ready");
    // The directory holding the socket is open to all, as /run is.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // The socket's mode keeps others out.
    let out = cli_as_nobody(&d, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");

    // And if the socket were opened to all, the peer check still refuses.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = cli_as_nobody(&d, &["kill", "private"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 65534 may not use this API"), "{err}");
    assert_eq!(d.info("private")["state"], "running");
    let refusals: Vec<Value> = audit(&d)
        .into_iter()
        .filter(|l| l["uid"] == NOBODY)
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["status"], 403);
    // On the wire: one status line and a JSON error, before any request.
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
                  d=b''\nwhile True:\n c=s.recv(4096)\n if not c: break\n d+=c\nsys.stdout.buffer.write(d)";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&d.socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("python3 as nobody");
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(reply.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    control::openapi::check_response("GET", "/guests", 403, body.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));

    // The state cannot be read: not the description, not the console.
    for file in [
        "guests/private/guest.toml",
        "guests/private/run/console.log",
    ] {
        let path = d.state_dir.join(file);
        assert!(path.exists(), "{}", path.display());
        let out = Command::new("cat")
            .arg(&path)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("cat");
        assert!(!out.status.success(), "nobody read {}", path.display());
    }
}

/// Asserts every directory under `dir` is 0700 and nothing under it is
/// open to group or others.
fn assert_private(dir: &Path) {
    let meta = std::fs::symlink_metadata(dir).expect("meta");
    assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let meta = entry.metadata().expect("meta");
        if meta.is_dir() {
            assert_private(&entry.path());
        } else {
            assert_eq!(meta.mode() & 0o077, 0, "{}", entry.path().display());
            if meta.is_file() {
                assert_eq!(meta.mode() & 0o777, 0o600, "{}", entry.path().display());
            }
        }
    }
}

#[test]
fn the_state_directory_is_0700_its_files_0600_and_calls_are_audited() {
    let d = TestDaemon::start();
    d.create_echo("audited", true);
    d.wait_console("audited", "ready");
    d.expect("POST", "/guests/audited/pause", None, 200);
    d.expect("POST", "/guests/audited/pause", None, 409);
    d.expect("GET", "/guests", None, 200);
    assert_private(&d.state_dir);
    let socket_mode = std::fs::metadata(&d.socket).expect("socket").mode();
    assert_eq!(socket_mode & 0o777, 0o600);

    let lines = audit(&d);
    let calls: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or("").to_string(),
                l["path"].as_str().unwrap_or("").to_string(),
                l["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want = [
        ("POST", "/guests", 201),
        ("POST", "/guests/audited/pause", 200),
        ("POST", "/guests/audited/pause", 409),
    ];
    let want: Vec<(String, String, u64)> = want
        .iter()
        .map(|(m, p, s)| (m.to_string(), p.to_string(), *s))
        .collect();
    assert_eq!(calls, want, "GETs are not audited, every mutating call is");
    assert!(lines.iter().all(|l| l["uid"] == 0), "{lines:?}");
}

#[test]
fn the_socket_path_is_replaced_only_when_it_is_a_stale_socket() {
    let dir = PathBuf::from(format!("/tmp/fvs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let daemon = |socket: &Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon");
        // A refusing daemon exits at once; a serving one is killed.
        let deadline = std::time::Instant::now() + control::LIMIT;
        while child.try_wait().expect("wait").is_none() {
            if UnixStreamProbe::answers(socket) || std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    };
    // A regular file is never removed.
    let file = dir.join("precious");
    std::fs::write(&file, b"keep me").expect("file");
    let out = daemon(&file);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "ferrovisor daemon: cannot start the daemon: {} exists and is not a socket; not removing it",
            file.display()
        )
    );
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
    // A stale socket (its listener gone) is replaced: the daemon serves.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = daemon(&stale);
    assert!(out.status.code().is_none(), "killed while serving: {out:?}");
    // A live socket is left to its owner.
    let live = dir.join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
    let out = daemon(&live);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another daemon is already listening"), "{err}");
    drop(listener);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether a daemon answers a request on `socket` within a second (the
/// test's own listener never does).
struct UnixStreamProbe;

impl UnixStreamProbe {
    fn answers(socket: &Path) -> bool {
        use std::io::Read;
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        if daemon::http::write_request(&mut s, "GET", "/guests", &[], None).is_err() {
            return false;
        }
        let mut reply = [0u8; 12];
        s.read_exact(&mut reply).is_ok() && reply.starts_with(b"HTTP/1.1 200")
    }
}

#[test]
fn one_user_holding_connections_does_not_starve_another() {
    let d = TestDaemon::start_with(&["--group", "nogroup"]);
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let per_uid = daemon::server::MAX_CONNECTIONS_PER_UID;
    // Root holds every place it has, with requests not yet sent.
    let held: Vec<_> = (0..per_uid)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    let (status, body) = {
        let client = daemon::Client::new(&d.socket);
        let r = client.raw("GET", "/guests", None).expect("answered");
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections from uid 0"), "{body}");
    // A member of the API's group is still served.
    let out = cli_as_nobody(&d, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
}
