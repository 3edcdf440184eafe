//! Tiny guests' pieces for shared regions with doorbells: the ivshmem
//! device's addresses when it is the only device, polling with a bound, and
//! the local APIC's interrupt request registers.

use super::{Checks, PASS};

pub const PASSED: i32 = (PASS as i32) << 1 | 1;
pub const BAR0: u32 = 0xc000_0000;
pub const MSIX_TABLE: u32 = 0xc000_1000;
pub const BAR2: u32 = 0xc010_0000;
/// Where the receiver says it is ready, in the region.
pub const READY: u32 = BAR2 + 0x10;
/// The local APIC: spurious-vector register and interrupt request registers.
pub const APIC_SVR: u32 = 0xfee0_00f0;
pub const APIC_IRR: u32 = 0xfee0_0200;
/// The interrupt vectors the receiver programs for its MSI-X vectors 0 and 1.
pub const VECTOR0: u32 = 0x41;
pub const VECTOR1: u32 = 0x62;
/// How often a guest polls before it gives up (a failing guest must end).
pub const POLLS: u32 = 5_000_000;

/// Polls the dword at `addr` until `bit` is set; gives up with `fail`.
pub fn poll_until_set(
    c: &mut Checks,
    addr: u32,
    bit: u32,
    found: &'static str,
    again: &'static str,
    fail: u32,
) {
    c.asm
        .bytes(&[0xb9])
        .bytes(&POLLS.to_le_bytes()) // mov ecx, POLLS
        .label(again)
        .bytes(&[0xa1])
        .bytes(&addr.to_le_bytes()) // mov eax, [addr]
        .bytes(&[0xa9])
        .bytes(&bit.to_le_bytes()) // test eax, bit
        .jump(0x75, found)
        .bytes(&[0x49]) // dec ecx
        .jump(0x75, again)
        .debug_exit(fail)
        .label(found);
}

/// The irr register and bit of interrupt vector `v`.
pub fn irr(v: u32) -> (u32, u32) {
    (APIC_IRR + 0x10 * (v / 32), 1 << (v % 32))
}

/// Turns the local APIC on with interrupts off (arrivals stay in the IRR),
/// points MSI-X vector 0 at interrupt `VECTOR0`, unmasked, and turns MSI-X
/// on for the device in slot 1.
pub fn msix_vector0_on(c: &mut Checks) {
    c.asm.bytes(&[0xfa]); // cli
    c.mmio_write32(APIC_SVR, 0x1ff)
        .mmio_write32(MSIX_TABLE, 0xfee0_0000)
        .mmio_write32(MSIX_TABLE + 8, VECTOR0)
        .mmio_write32(MSIX_TABLE + 12, 0);
    // The MSI-X capability at 0x40: its control word's enable bit.
    c.asm
        .mov_dx(0xcf8)
        .mov_eax(0x8000_0000 | 1 << 11 | 0x40)
        .out_dx_eax()
        .mov_dx(0xcfc)
        .mov_eax(0x8000_0000)
        .out_dx_eax();
}
