//! The ACPI fixed-hardware PM block: PM1a event and control registers and
//! the reset register, as the FADT describes them.
//!
//! Layout, relative to the block's base port (0x600 on our machine):
//!
//! | offset | size | register |
//! |--------|------|----------|
//! | 0      | 2    | PM1a status (write 1 to clear) |
//! | 2      | 2    | PM1a enable |
//! | 4      | 2    | PM1a control |
//! | 6      | 1    | reset register |
//!
//! The platform has no legacy (non-ACPI) mode, so SCI_EN always reads set,
//! and the FADT's SMI command port is 0, telling the OS ACPI is always on.
//! Writing SLP_EN with the S5 sleep type powers the VM off; writing the reset
//! value to the reset register resets it. No event ever sets a status bit
//! yet (there is no power button, and the PM timer in `pm_timer`, at the
//! next port, raises no overflow event), so the SCI is never raised.
//! Every register accepts byte, word and dword accesses.

use crate::bus::{BusDevice, VmAction};

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const RESET: u64 = 6;
/// Bytes the block decodes.
pub const ACPI_PM_BLOCK_LEN: u64 = 8;

const CNT_SCI_EN: u16 = 1 << 0;
const CNT_GBL_RLS: u16 = 1 << 2;
const CNT_SLP_TYP_SHIFT: u16 = 10;
const CNT_SLP_TYP_MASK: u16 = 0x7 << CNT_SLP_TYP_SHIFT;
const CNT_SLP_EN: u16 = 1 << 13;

/// The platform constants the PM block shares with the ACPI tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPmConfig {
    /// The SLP_TYP value of the DSDT's `\_S5_` package.
    pub s5_sleep_type: u8,
    /// The FADT's RESET_VALUE.
    pub reset_value: u8,
}

impl Default for AcpiPmConfig {
    fn default() -> Self {
        Self {
            s5_sleep_type: 5,
            reset_value: 1,
        }
    }
}

/// The PM1a event/control block and reset register.
#[derive(Debug, Clone)]
pub struct AcpiPm {
    config: AcpiPmConfig,
    pm1_sts: u16,
    pm1_en: u16,
    /// The writable bits of PM1 control (SLP_TYP, BM_RLD).
    pm1_cnt: u16,
}

impl AcpiPm {
    /// A PM block that powers off on `config.s5_sleep_type` and resets on
    /// `config.reset_value`.
    pub fn new(config: AcpiPmConfig) -> Self {
        Self {
            config,
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
        }
    }

    fn read_byte(&self, offset: u64) -> u8 {
        let (reg, shift) = match offset {
            0 | 1 => (self.pm1_sts, (offset - PM1_STS) * 8),
            2 | 3 => (self.pm1_en, (offset - PM1_EN) * 8),
            4 | 5 => (self.pm1_cnt | CNT_SCI_EN, (offset - PM1_CNT) * 8),
            // The reset register is write-only.
            _ => return 0,
        };
        (reg >> shift) as u8
    }

    fn write_byte(&mut self, offset: u64, value: u8) -> Option<VmAction> {
        let set_byte =
            |reg: u16, shift: u64| (reg & !(0xff << shift)) | (u16::from(value) << shift);
        match offset {
            0 | 1 => self.pm1_sts &= !(u16::from(value) << ((offset - PM1_STS) * 8)),
            2 | 3 => self.pm1_en = set_byte(self.pm1_en, (offset - PM1_EN) * 8),
            4 | 5 => self.pm1_cnt = set_byte(self.pm1_cnt, (offset - PM1_CNT) * 8),
            RESET if value == self.config.reset_value => return Some(VmAction::Reset),
            _ => {}
        }
        None
    }

    /// Acts on SLP_EN once a write to PM1 control is complete.
    fn check_sleep(&mut self) -> Option<VmAction> {
        // SCI_EN is fixed, GBL_RLS and SLP_EN are write-only: none is kept.
        let cnt = self.pm1_cnt;
        self.pm1_cnt &= !(CNT_SCI_EN | CNT_GBL_RLS | CNT_SLP_EN);
        if cnt & CNT_SLP_EN == 0 {
            return None;
        }
        let sleep_type = (cnt & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT;
        // Sleep states other than S5 are not offered in the DSDT; a guest
        // that asks for one anyway keeps running.
        (sleep_type == u16::from(self.config.s5_sleep_type)).then_some(VmAction::PowerOff)
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(offset + i as u64);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        let mut action = None;
        for (i, &byte) in data.iter().enumerate() {
            action = action.or(self.write_byte(offset + i as u64, byte));
        }
        let end = offset + data.len() as u64;
        if offset < PM1_CNT + 2 && end > PM1_CNT {
            action = action.or(self.check_sleep());
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLP_TYP_S5: u16 = 5 << CNT_SLP_TYP_SHIFT;

    fn pm() -> AcpiPm {
        AcpiPm::new(AcpiPmConfig::default())
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn status_bits_clear_when_written_with_one() {
        let mut pm = pm();
        pm.pm1_sts = 0x8101; // WAK_STS, PWRBTN_STS, TMR_STS
        pm.write(PM1_STS, &0x0100u16.to_le_bytes());
        assert_eq!(read16(&mut pm, PM1_STS), 0x8001);
    }

    #[test]
    fn enable_register_keeps_what_is_written() {
        let mut pm = pm();
        // GBL_EN must stick, or Linux reports the global lock missing.
        pm.write(PM1_EN, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut pm, PM1_EN), 0x0120);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let mut pm = pm();
        pm.write(PM1_CNT, &0u16.to_le_bytes());
        assert_eq!(read16(&mut pm, PM1_CNT) & CNT_SCI_EN, CNT_SCI_EN);
    }

    #[test]
    fn slp_en_with_s5_type_powers_off() {
        let mut pm = pm();
        let value = SLP_TYP_S5 | CNT_SLP_EN | CNT_SCI_EN;
        assert_eq!(
            pm.write(PM1_CNT, &value.to_le_bytes()),
            Some(VmAction::PowerOff)
        );
    }

    #[test]
    fn sleep_type_alone_does_nothing_until_slp_en() {
        // ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN.
        let mut pm = pm();
        assert_eq!(pm.write(PM1_CNT, &SLP_TYP_S5.to_le_bytes()), None);
        assert_eq!(read16(&mut pm, PM1_CNT) & CNT_SLP_TYP_MASK, SLP_TYP_S5);
        // A byte write of the high half carrying SLP_EN completes the request.
        let high = ((SLP_TYP_S5 | CNT_SLP_EN) >> 8) as u8;
        assert_eq!(pm.write(PM1_CNT + 1, &[high]), Some(VmAction::PowerOff));
    }

    #[test]
    fn other_sleep_types_keep_running() {
        let mut pm = pm();
        let value = (1 << CNT_SLP_TYP_SHIFT) | CNT_SLP_EN;
        assert_eq!(pm.write(PM1_CNT, &value.to_le_bytes()), None);
        assert_eq!(read16(&mut pm, PM1_CNT) & CNT_SLP_EN, 0);
    }

    #[test]
    fn reset_value_resets() {
        let mut pm = pm();
        assert_eq!(pm.write(RESET, &[1]), Some(VmAction::Reset));
        assert_eq!(pm.write(RESET, &[2]), None);
    }

    #[test]
    fn dword_read_of_event_block_returns_status_and_enable() {
        let mut pm = pm();
        pm.write(PM1_EN, &0x0020u16.to_le_bytes());
        let mut data = [0u8; 4];
        pm.read(PM1_STS, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0020_0000);
    }
}
