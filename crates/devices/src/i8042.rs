//! A minimal i8042 keyboard controller with a keyboard and no mouse port.
//!
//! It lives at ports 0x60 (data) and 0x64 (status on read, command on write).
//! Offsets are relative to 0x60: insert it on the bus at 0x60 with length 5;
//! the three ports in between read as unassigned (all ones).
//!
//! What matters for a guest is that Linux's i8042 probe never waits on a
//! timeout. The driver polls the status register (up to 10,000 times, 50 µs
//! apart) for every response it expects, and each poll is a port exit, so a
//! controller that stays silent costs more than a second under emulation
//! (a model whose status always reads 0, such as vm-superio's, makes the very
//! first "read CTR" time out). So this model answers every command at once:
//!
//! - Controller commands that return a byte (read CTR, self-test, interface
//!   tests, read output port) put it in the output buffer immediately.
//! - There is no AUX (mouse) port. Linux detects that from two answers and
//!   skips all mouse probing: the AUX loopback (0xD3) comes back without the
//!   AUX flag in the status register, and the AUX interface test (0xA9)
//!   reports the clock line stuck. Without these the driver would wait 250 ms
//!   for an IRQ 12 that never comes, then probe a mouse with more timeouts.
//! - The keyboard acknowledges every command at once and identifies itself
//!   as an MF2 keyboard, raising IRQ 1 for each byte it sends, so `atkbd`
//!   finishes its probe in a handful of exits instead of timing out.
//!
//! Ctrl-Alt-Del: [`I8042::inject_ctrl_alt_del`] makes the keyboard send
//! the key presses and releases, one IRQ 1 per byte as for any key, in the
//! scancode set the guest reads (set 1 through the controller's
//! translation, which Linux keeps on; set 2 without it). Linux turns the
//! combination into SIGINT for init, which is how a supervisor asks a guest
//! to shut down.
//!
//! Reset: command 0xFE (pulse the reset line), or any 0xF0-0xFF pulse whose
//! bit 0 is clear, or clearing bit 0 of the output port with 0xD1, returns
//! [`VmAction::Reset`].

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{fill_byte_register, BusDevice, VmAction};

const DATA_OFFSET: u64 = 0;
/// How many bytes the keyboard holds for the guest before it drops more.
const KEYBOARD_BUFFER: usize = 16;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_NOT_INHIBITED: u8 = 0x10;

// Controller configuration byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// What firmware leaves behind: keyboard interrupt on, POST passed,
/// scancode translation on, AUX port disabled.
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_TRANSLATE | CTR_AUX_DISABLE;

// Controller commands.
const CMD_READ_RAM: u8 = 0x20; // 0x20..=0x3f
const CMD_WRITE_RAM: u8 = 0x60; // 0x60..=0x7f
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_BASE: u8 = 0xf0; // 0xf0..=0xff, low nibble clear bits pulse

// Controller answers.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
const AUX_CLOCK_STUCK_HIGH: u8 = 0x02;

// Output port bits: bit 0 is the CPU reset line (active low), bit 1 gates A20.
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
const OUTPUT_PORT_INITIAL: u8 = 0x03;

// Keyboard commands and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ID: u8 = 0xab;
const KBD_ID_MF2: u8 = 0x83;
/// The MF2 id byte as it reads through the controller's scancode translation.
const KBD_ID_MF2_TRANSLATED: u8 = 0x41;
const KBD_DEFAULT_SCANCODE_SET: u8 = 0x02;

/// Ctrl, Alt and Delete pressed, then released, in scancode set 1 (what
/// the guest reads with translation on).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same keys in scancode set 2 (translation off).
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// An answer to a controller command: read by polling, no interrupt.
    Controller,
    /// Sent by the keyboard: announced with IRQ 1 when enabled.
    Keyboard,
}

/// A controller command that takes its parameter through the data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingWrite {
    Ram(usize),
    OutputPort,
    KeyboardBuffer,
    AuxLoop,
    Aux,
}

/// An i8042 controller with a PS/2 keyboard attached.
#[derive(Debug)]
pub struct I8042 {
    /// The controller's internal RAM; byte 0 is the configuration byte (CTR).
    ram: [u8; 32],
    output_port: u8,
    last_write_was_command: bool,
    pending_write: Option<PendingWrite>,
    /// A keyboard command waiting for its parameter byte.
    kbd_pending: Option<u8>,
    output: VecDeque<(u8, Source)>,
    /// What the data port reads once the output buffer is empty.
    last_output: u8,
    kbd_irq: EventFd,
}

impl I8042 {
    /// A controller that raises `kbd_irq` (the VMM's irqfd for IRQ 1)
    /// whenever the keyboard has a byte for the guest.
    pub fn new(kbd_irq: EventFd) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_INITIAL;
        Self {
            ram,
            output_port: OUTPUT_PORT_INITIAL,
            last_write_was_command: false,
            pending_write: None,
            kbd_pending: None,
            output: VecDeque::new(),
            last_output: 0,
            kbd_irq,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn set_ctr_bits(&mut self, set: u8, clear: u8) {
        self.ram[0] = (self.ram[0] | set) & !clear;
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_NOT_INHIBITED;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr() & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_write_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    /// Raises IRQ 1 if the byte the guest will read next is the keyboard's.
    fn signal_keyboard_byte(&self) {
        let kbd_next = matches!(self.output.front(), Some((_, Source::Keyboard)));
        if kbd_next && self.ctr() & CTR_KBD_INT != 0 {
            // The eventfd counter cannot overflow from one byte per access,
            // and a failed signal leaves the byte pollable in the buffer.
            let _ = self.kbd_irq.write(1);
        }
    }

    /// Answers a controller command. The answer replaces any earlier
    /// controller answer the guest did not read, like the single output
    /// register of the real chip, but keeps keyboard bytes queued behind it.
    fn controller_answer(&mut self, value: u8) {
        self.output.retain(|&(_, src)| src != Source::Controller);
        self.output.push_front((value, Source::Controller));
    }

    fn keyboard_send(&mut self, bytes: &[u8]) {
        let was_empty = self.output.is_empty();
        // A guest that sends commands and never reads the answers must not
        // grow the queue without bound: like a real keyboard's small buffer,
        // bytes beyond it are dropped.
        let room = KEYBOARD_BUFFER.saturating_sub(self.output.len());
        self.output
            .extend(bytes.iter().take(room).map(|&b| (b, Source::Keyboard)));
        if was_empty {
            self.signal_keyboard_byte();
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((value, _)) = self.output.pop_front() {
            self.last_output = value;
            self.signal_keyboard_byte();
        }
        self.last_output
    }

    fn write_command(&mut self, cmd: u8) -> Option<VmAction> {
        self.pending_write = None;
        match cmd {
            CMD_READ_RAM..=0x3f => self.controller_answer(self.ram[usize::from(cmd & 0x1f)]),
            CMD_WRITE_RAM..=0x7f => {
                self.pending_write = Some(PendingWrite::Ram(usize::from(cmd & 0x1f)))
            }
            CMD_AUX_DISABLE => self.set_ctr_bits(CTR_AUX_DISABLE, 0),
            CMD_AUX_ENABLE => self.set_ctr_bits(0, CTR_AUX_DISABLE),
            CMD_AUX_TEST => self.controller_answer(AUX_CLOCK_STUCK_HIGH),
            CMD_SELF_TEST => {
                self.set_ctr_bits(CTR_SYSTEM_FLAG, 0);
                self.controller_answer(SELF_TEST_PASSED);
            }
            CMD_KBD_TEST => self.controller_answer(INTERFACE_TEST_PASSED),
            CMD_KBD_DISABLE => self.set_ctr_bits(CTR_KBD_DISABLE, 0),
            CMD_KBD_ENABLE => self.set_ctr_bits(0, CTR_KBD_DISABLE),
            CMD_READ_OUTPUT_PORT => self.controller_answer(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending_write = Some(PendingWrite::OutputPort),
            CMD_WRITE_KBD_BUFFER => self.pending_write = Some(PendingWrite::KeyboardBuffer),
            CMD_AUX_LOOP => self.pending_write = Some(PendingWrite::AuxLoop),
            CMD_WRITE_AUX => self.pending_write = Some(PendingWrite::Aux),
            CMD_PULSE_BASE..=0xff if cmd & OUTPUT_PORT_RESET_LINE == 0 => {
                return Some(VmAction::Reset)
            }
            _ => {}
        }
        None
    }

    fn write_data(&mut self, value: u8) -> Option<VmAction> {
        let Some(pending) = self.pending_write.take() else {
            self.keyboard_command(value);
            return None;
        };
        match pending {
            PendingWrite::Ram(0) => {
                self.ram[0] = value;
                // Enabling the keyboard interrupt announces a waiting byte.
                self.signal_keyboard_byte();
            }
            PendingWrite::Ram(index) => self.ram[index] = value,
            PendingWrite::OutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_LINE == 0 {
                    return Some(VmAction::Reset);
                }
            }
            PendingWrite::KeyboardBuffer => self.keyboard_send(&[value]),
            // No AUX port: the loopback byte comes back as ordinary data
            // (without the AUX status flag), which Linux reads as "no AUX".
            PendingWrite::AuxLoop => self.controller_answer(value),
            // Nothing is attached to the AUX port; the byte goes nowhere.
            PendingWrite::Aux => {}
        }
        None
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard. Returns false,
    /// sending nothing, when the keyboard's buffer has no room for the whole
    /// sequence (the guest is not reading it).
    pub fn inject_ctrl_alt_del(&mut self) -> bool {
        let keys: &[u8] = if self.ctr() & CTR_TRANSLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.output.len() + keys.len() > KEYBOARD_BUFFER {
            return false;
        }
        self.keyboard_send(keys);
        true
    }

    /// The keyboard's side: every command is acknowledged at once.
    fn keyboard_command(&mut self, value: u8) {
        if let Some(cmd) = self.kbd_pending.take() {
            if cmd == KBD_SCANCODE_SET && value == 0 {
                self.keyboard_send(&[KBD_ACK, KBD_DEFAULT_SCANCODE_SET]);
            } else {
                self.keyboard_send(&[KBD_ACK]);
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SET_TYPEMATIC | KBD_SCANCODE_SET => {
                self.kbd_pending = Some(value);
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_GET_ID => {
                let id = if self.ctr() & CTR_TRANSLATE != 0 {
                    KBD_ID_MF2_TRANSLATED
                } else {
                    KBD_ID_MF2
                };
                self.keyboard_send(&[KBD_ACK, KBD_ID, id]);
            }
            KBD_ECHO => self.keyboard_send(&[KBD_ECHO]),
            KBD_RESET => self.keyboard_send(&[KBD_ACK, KBD_SELF_TEST_PASSED]),
            // 0xf4..=0xfe: enable, disable, defaults, typematic modes, resend.
            0xf4..=0xfe => self.keyboard_send(&[KBD_ACK]),
            _ => self.keyboard_send(&[KBD_RESEND]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        fill_byte_register(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        let &value = data.first()?;
        match offset {
            DATA_OFFSET => {
                self.last_write_was_command = false;
                self.write_data(value)
            }
            COMMAND_OFFSET => {
                self.last_write_was_command = true;
                self.write_command(value)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(irq.try_clone().unwrap()), irq)
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut data = [0u8];
        dev.read(COMMAND_OFFSET, &mut data);
        data[0]
    }

    fn read_data(dev: &mut I8042) -> u8 {
        let mut data = [0u8];
        dev.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn command(dev: &mut I8042, cmd: u8) -> Option<VmAction> {
        dev.write(COMMAND_OFFSET, &[cmd])
    }

    /// Issues a controller command the way Linux does and returns its answer.
    fn command_answer(dev: &mut I8042, cmd: u8) -> u8 {
        command(dev, cmd);
        assert_ne!(status(dev) & STATUS_OUTPUT_FULL, 0, "no answer to {cmd:#x}");
        read_data(dev)
    }

    #[test]
    fn idle_status_has_no_data_and_accepts_input() {
        let (mut dev, _irq) = i8042();
        let st = status(&mut dev);
        assert_eq!(st & STATUS_OUTPUT_FULL, 0);
        assert_eq!(st & 0x02, 0, "input buffer must read empty");
        assert_ne!(st & STATUS_NOT_INHIBITED, 0, "keylock must read unlocked");
        assert_ne!(st & STATUS_SYSTEM_FLAG, 0);
    }

    #[test]
    fn reset_command_resets_the_vm() {
        let (mut dev, _irq) = i8042();
        assert_eq!(command(&mut dev, 0xfe), Some(VmAction::Reset));
        assert_eq!(command(&mut dev, 0xff), None);
    }

    #[test]
    fn clearing_output_port_reset_line_resets_the_vm() {
        let (mut dev, _irq) = i8042();
        command(&mut dev, CMD_WRITE_OUTPUT_PORT);
        assert_eq!(dev.write(DATA_OFFSET, &[0x02]), Some(VmAction::Reset));
    }

    #[test]
    fn self_test_passes() {
        let (mut dev, _irq) = i8042();
        assert_eq!(command_answer(&mut dev, CMD_SELF_TEST), SELF_TEST_PASSED);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn ctr_reads_back_what_was_written() {
        let (mut dev, _irq) = i8042();
        assert_eq!(command_answer(&mut dev, CMD_READ_RAM), CTR_INITIAL);
        command(&mut dev, CMD_WRITE_RAM);
        dev.write(DATA_OFFSET, &[0x56]);
        assert_eq!(command_answer(&mut dev, CMD_READ_RAM), 0x56);
    }

    #[test]
    fn aux_disable_and_enable_toggle_ctr_bit() {
        let (mut dev, _irq) = i8042();
        command(&mut dev, CMD_AUX_ENABLE);
        assert_eq!(command_answer(&mut dev, CMD_READ_RAM) & CTR_AUX_DISABLE, 0);
        command(&mut dev, CMD_AUX_DISABLE);
        assert_ne!(command_answer(&mut dev, CMD_READ_RAM) & CTR_AUX_DISABLE, 0);
    }

    #[test]
    fn kbd_interface_test_passes() {
        let (mut dev, _irq) = i8042();
        assert_eq!(
            command_answer(&mut dev, CMD_KBD_TEST),
            INTERFACE_TEST_PASSED
        );
    }

    #[test]
    fn aux_probe_reports_no_aux_port_without_waiting() {
        let (mut dev, _irq) = i8042();
        // Loopback: answered at once, but not flagged as AUX data.
        command(&mut dev, CMD_AUX_LOOP);
        dev.write(DATA_OFFSET, &[0x5a]);
        let st = status(&mut dev);
        assert_ne!(st & STATUS_OUTPUT_FULL, 0);
        assert_eq!(st & 0x20, 0, "AUX data flag must stay clear");
        // Interface test: a line-stuck code, which Linux takes as "no AUX".
        let answer = command_answer(&mut dev, CMD_AUX_TEST);
        assert!(answer != 0 && answer != 0xfa && answer != 0xff);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0, "stale byte left");
    }

    #[test]
    fn keyboard_get_id_is_acked_with_irq_per_byte() {
        let (mut dev, irq) = i8042();
        dev.write(DATA_OFFSET, &[KBD_GET_ID]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_data(&mut dev), KBD_ID);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_data(&mut dev), KBD_ID_MF2_TRANSLATED);
        assert!(irq.read().is_err(), "no interrupt once drained");
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_command_with_parameter_acks_both_bytes() {
        let (mut dev, _irq) = i8042();
        dev.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        dev.write(DATA_OFFSET, &[0x00]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_bytes_wait_silently_while_interrupt_disabled() {
        let (mut dev, irq) = i8042();
        command(&mut dev, CMD_WRITE_RAM);
        dev.write(DATA_OFFSET, &[CTR_INITIAL & !CTR_KBD_INT]);
        dev.write(DATA_OFFSET, &[KBD_ECHO]);
        assert!(irq.read().is_err());
        // Turning the interrupt on announces the waiting byte.
        command(&mut dev, CMD_WRITE_RAM);
        dev.write(DATA_OFFSET, &[CTR_INITIAL]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_data(&mut dev), KBD_ECHO);
    }

    #[test]
    fn controller_answers_do_not_raise_irq() {
        let (mut dev, irq) = i8042();
        command(&mut dev, CMD_READ_RAM);
        assert!(irq.read().is_err());
    }

    #[test]
    fn unassigned_offsets_read_all_ones() {
        let (mut dev, _irq) = i8042();
        let mut data = [0u8];
        dev.read(1, &mut data);
        assert_eq!(data, [0xff]);
    }

    /// Reads every byte the keyboard sends, one IRQ 1 each, as Linux's
    /// interrupt handler does.
    fn drain_keyboard(dev: &mut I8042, irq: &EventFd) -> Vec<u8> {
        let mut bytes = Vec::new();
        while irq.read().is_ok() {
            assert_ne!(status(dev) & STATUS_OUTPUT_FULL, 0);
            bytes.push(read_data(dev));
        }
        assert_eq!(
            status(dev) & STATUS_OUTPUT_FULL,
            0,
            "bytes left unannounced"
        );
        bytes
    }

    #[test]
    fn ctrl_alt_del_is_pressed_and_released_with_an_irq_per_byte() {
        let (mut dev, irq) = i8042();
        assert!(dev.inject_ctrl_alt_del());
        assert_eq!(
            drain_keyboard(&mut dev, &irq),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
    }

    #[test]
    fn ctrl_alt_del_uses_set_2_without_translation() {
        let (mut dev, irq) = i8042();
        command(&mut dev, CMD_WRITE_RAM);
        dev.write(DATA_OFFSET, &[CTR_INITIAL & !CTR_TRANSLATE]);
        assert!(dev.inject_ctrl_alt_del());
        assert_eq!(
            drain_keyboard(&mut dev, &irq),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn ctrl_alt_del_is_all_or_nothing_when_the_guest_does_not_read() {
        let (mut dev, _irq) = i8042();
        assert!(dev.inject_ctrl_alt_del());
        assert!(dev.inject_ctrl_alt_del(), "16 bytes fit twice 8");
        assert!(!dev.inject_ctrl_alt_del());
        assert_eq!(dev.output.len(), KEYBOARD_BUFFER);
    }

    #[test]
    fn unread_keyboard_answers_do_not_grow_without_bound() {
        let mut dev = I8042::new(EventFd::new(0).unwrap());
        for _ in 0..10_000 {
            // "Identify keyboard": an ACK and two ID bytes each time.
            dev.write(DATA_OFFSET, &[0xf2]);
        }
        assert!(dev.output.len() <= KEYBOARD_BUFFER);
    }
}
