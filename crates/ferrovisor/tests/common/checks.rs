//! Guests made of checks: each check compares EAX with a value and, on a
//! mismatch, exits with its own code, so a failing test names the check.

use super::Asm;

/// The value a check exits with when it passes all checks.
pub const PASS: u32 = 0x10;

/// Checks within a tiny guest; the nth failing check exits with `PASS + 1 + n`.
pub struct Checks {
    pub asm: Asm,
    n: u32,
}

const LABELS: [&str; 16] = [
    "c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9", "c10", "c11", "c12", "c13", "c14",
    "c15",
];

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    pub fn new() -> Self {
        Self {
            asm: Asm::default(),
            n: 0,
        }
    }

    /// cmp eax, `want`; on mismatch exit with this check's code.
    pub fn eax_is(&mut self, want: u32) -> &mut Self {
        let label = LABELS[self.n as usize];
        self.n += 1;
        self.asm
            .bytes(&[0x3d])
            .bytes(&want.to_le_bytes())
            .jump(0x74, label)
            .debug_exit(PASS + self.n)
            .label(label);
        self
    }

    /// eax = config dword `reg` of 00:`slot`.0 through 0xCF8/0xCFC.
    pub fn port_read(&mut self, slot: u32, reg: u32) -> &mut Self {
        self.asm
            .mov_dx(0xcf8)
            .mov_eax(0x8000_0000 | slot << 11 | reg)
            .out_dx_eax()
            .mov_dx(0xcfc)
            .bytes(&[0xed]); // in eax, dx
        self
    }

    /// eax = dword at physical `addr` (paging is off).
    pub fn mmio_read32(&mut self, addr: u32) -> &mut Self {
        self.asm.bytes(&[0xa1]).bytes(&addr.to_le_bytes());
        self
    }

    /// eax = zero-extended word at physical `addr`.
    pub fn mmio_read16(&mut self, addr: u32) -> &mut Self {
        self.asm
            .bytes(&[0x0f, 0xb7, 0x05])
            .bytes(&addr.to_le_bytes());
        self
    }

    pub fn mmio_write32(&mut self, addr: u32, value: u32) -> &mut Self {
        self.asm.store32(addr, value);
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        self.asm.debug_exit(PASS).finish()
    }
}
