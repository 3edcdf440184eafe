//! The device flags of `run` through the real binary: a mistake is one line
//! naming the flag, with status 2, before any VM is built.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn assert_flag_error(args: &[&str], expected: &str) {
    let kernel = write_temp(
        "ok.elf",
        &multiboot_kernel(0x10_0000, &[], &Asm::default().debug_exit(0).finish(), 0),
    );
    let mut all = vec!["run", "--kernel", kernel.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = ferrovisor(&all);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    assert_eq!(err.trim_end(), format!("ferrovisor: {expected}"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unknown_disk_key_is_named() {
    assert_flag_error(
        &["--disk", "path=a.img,size=3"],
        "--disk: unknown key 'size'",
    );
}

#[test]
fn bad_mac_is_named() {
    assert_flag_error(
        &["--net", "tap=fv0,mac=52:54:00"],
        "--net: '52:54:00' is not a MAC address like 52:54:00:12:34:56",
    );
}

#[test]
fn bad_console_is_named() {
    assert_flag_error(
        &["--console=hvc"],
        "--console: 'hvc' is not virtio or serial",
    );
}

#[test]
fn reserved_vsock_cid_is_named() {
    assert_flag_error(
        &["--vsock", "cid=1,socket=/tmp/v"],
        "--vsock: cid: '1' is not a guest CID (3 to 4294967294)",
    );
}

#[test]
fn a_nic_on_a_tap_and_a_switch_port_at_once_or_a_rate_on_a_port_is_refused() {
    assert_flag_error(
        &["--net", "tap=fv0,vhost-user=/run/port.sock"],
        "--net: give tap or vhost-user, not both",
    );
    assert_flag_error(
        &["--net", "vhost-user=/run/port.sock,rx_bandwidth=1M"],
        "--net: vhost-user: takes no rate limit (the switch port moves the frames)",
    );
    assert_flag_error(&["--net", "vhost-user="], "--net: 'vhost-user' is empty");
}
