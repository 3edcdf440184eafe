//! The AF_VSOCK declarations the guest tools share (`vsock`, `netbench`):
//! the address structure and the socket calls, declared here because the
//! tools are built with `rustc` alone, without the libc crate.

pub const AF_VSOCK: i32 = 40;
pub const SOCK_STREAM: i32 = 1;
pub const VMADDR_CID_ANY: u32 = u32::MAX;

/// `struct sockaddr_vm` from `<linux/vm_sockets.h>`.
#[repr(C)]
pub struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    pub cid: u32,
    flags: u8,
    zero: [u8; 3],
}

pub const ADDR_LEN: u32 = std::mem::size_of::<SockaddrVm>() as u32;

extern "C" {
    pub fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    pub fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    pub fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    pub fn listen(fd: i32, backlog: i32) -> i32;
    pub fn accept(fd: i32, addr: *mut SockaddrVm, len: *mut u32) -> i32;
}

/// The address of `port` on `cid`.
pub fn address(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    }
}
