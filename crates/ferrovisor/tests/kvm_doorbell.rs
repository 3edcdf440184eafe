//! Host KVM tests of doorbells between guests: two tiny guests, each in its
//! own `ferrovisor run` process, share a sealed memfd region given as
//! inherited descriptors (`--region-fds`, as the daemon gives them), with
//! one eventfd per (peer, vector). One rings; the other's interrupt
//! arrives straight through its irqfd, held while the vector is masked.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;

use common::doorbell::*;

const REGION_SIZE: i64 = 1 << 20;

fn memfd(size: i64) -> OwnedFd {
    // SAFETY: a fresh memfd with a NUL-terminated name; sized and sealed
    // below; nothing else owns it.
    unsafe {
        let fd = libc::memfd_create(
            c"doorbell-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, size), 0);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, seals), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: a fresh eventfd that nothing else owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        assert!(fd >= 0);
        OwnedFd::from_raw_fd(fd)
    }
}

/// Starts `ferrovisor run` on the tiny guest `code` with `--region-fds
/// spec`, the descriptors `fds` inherited.
fn spawn(name: &str, code: &[u8], spec: &str, fds: &[RawFd]) -> std::process::Child {
    let kernel = write_temp(name, &multiboot_kernel(0x10_0000, &[], code, 0));
    let fds = fds.to_vec();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    command
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .args(["--region-fds", spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only fcntl, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

fn finish(child: std::process::Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), stderr(&out))
}

/// Peer 1: programs MSI-X vector 0 (unmasked) and 1 (masked), turns the
/// local APIC on with interrupts off, says it is ready, waits for vector 0
/// to arrive, checks vector 1 did not, unmasks it and waits for it.
fn receiver() -> Vec<u8> {
    let mut c = Checks::new();
    c.port_read(1, 0x14).eax_is(MSIX_TABLE);
    msix_vector0_on(&mut c);
    c.mmio_write32(MSIX_TABLE + 16, 0xfee0_0000)
        .mmio_write32(MSIX_TABLE + 16 + 8, VECTOR1);
    c.mmio_read32(BAR0 + 8).eax_is(1).mmio_write32(READY, 1);
    let (reg0, bit0) = irr(VECTOR0);
    poll_until_set(&mut c, reg0, bit0, "got0", "wait0", PASS + 100);
    let (reg1, bit1) = irr(VECTOR1);
    // Vector 1 was rung first, but it is masked: held, not delivered.
    c.mmio_read32(reg1).eax_is(0);
    c.mmio_write32(MSIX_TABLE + 16 + 12, 0);
    poll_until_set(&mut c, reg1, bit1, "got1", "wait1", PASS + 101);
    c.finish()
}

/// Peer 0, read-only: waits for the receiver, rings its vector 1 then its
/// vector 0, and tries to write the region.
fn ringer() -> Vec<u8> {
    let mut c = Checks::new();
    poll_until_set(&mut c, READY, 1, "ready", "wait", PASS + 100);
    c.mmio_write32(BAR0 + 12, 1 << 16 | 1)
        .mmio_write32(BAR0 + 12, 1 << 16)
        // A doorbell to a peer that is not on the region reaches nobody.
        .mmio_write32(BAR0 + 12, 7 << 16)
        .mmio_write32(BAR2 + 0x20, 0xbad)
        .mmio_read32(BAR2 + 0x20)
        .eax_is(0)
        .mmio_read32(BAR0 + 8)
        .eax_is(0);
    c.finish()
}

#[test]
fn a_peers_doorbell_interrupts_the_other_guest_and_waits_out_a_mask() {
    let region = memfd(REGION_SIZE);
    let ringer_own = eventfd();
    let receiver_own = [eventfd(), eventfd()];
    let (m, r0, v0, v1) = (
        region.as_raw_fd(),
        ringer_own.as_raw_fd(),
        receiver_own[0].as_raw_fd(),
        receiver_own[1].as_raw_fd(),
    );
    let receiver = spawn(
        "receiver",
        &receiver(),
        &format!("name=ring,fd={m},id=1,readonly=off,own={v0}+{v1},peers=0:{r0}"),
        &[m, r0, v0, v1],
    );
    let ringer = spawn(
        "ringer",
        &ringer(),
        &format!("name=ring,fd={m},id=0,readonly=on,own={r0},peers=1:{v0}+{v1}"),
        &[m, r0, v0, v1],
    );
    let (ringer_status, ringer_err) = finish(ringer);
    let (receiver_status, receiver_err) = finish(receiver);
    assert_eq!(ringer_status, PASSED, "ringer: {ringer_err}");
    assert_eq!(receiver_status, PASSED, "receiver: {receiver_err}");
    // The read-only ringer's write did not land; the receiver's did.
    let mut word = [0u8; 4];
    // SAFETY: reading 4 bytes into a local buffer from an open memfd.
    let read = |offset: i64, buf: &mut [u8; 4]| unsafe {
        libc::pread(m, buf.as_mut_ptr().cast(), 4, offset)
    };
    assert_eq!(read(0x20, &mut word), 4);
    assert_eq!(u32::from_le_bytes(word), 0);
    assert_eq!(read(0x10, &mut word), 4);
    assert_eq!(u32::from_le_bytes(word), 1);
}

/// Runs a guest that must not start with `--region-fds spec`: status 2 and
/// one line on stderr besides warnings, which is returned.
fn refused(spec: &str, fds: &[RawFd]) -> String {
    let (status, err) = finish(spawn("refused", &Checks::new().finish(), spec, fds));
    assert_eq!(status, 2, "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("ferrovisor: warning:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn a_descriptor_that_is_not_a_memfd_is_one_line_and_nothing_starts() {
    let own = eventfd();
    let e = own.as_raw_fd();
    assert_eq!(
        refused(&format!("name=ring,fd={e},id=0,own={e}"), &[e]),
        format!("ferrovisor: --region-fds name=ring: region 'ring': descriptor {e} is not a memfd")
    );
}

#[test]
fn a_memfd_of_a_bad_size_is_one_line_and_nothing_starts() {
    let region = memfd(0x3000);
    let own = eventfd();
    let (m, e) = (region.as_raw_fd(), own.as_raw_fd());
    assert_eq!(
        refused(&format!("name=ring,fd={m},id=0,own={e}"), &[m, e]),
        "ferrovisor: --region-fds name=ring: region 'ring': its memfd holds 12288 bytes, not a power of two from 4 KiB to 256 MiB"
    );
}

#[test]
fn a_guest_without_the_region_has_no_ivshmem_device() {
    // Slot 1 is empty: no 1af4:1110 function anywhere on the bus.
    let code = Checks::new().port_read(1, 0).eax_is(u32::MAX).finish();
    let out = boot_tiny(&code, &[]);
    assert_eq!(out.status.code(), Some(PASSED), "{}", stderr(&out));
}
