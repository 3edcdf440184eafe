//! The COM1 8250/16550A UART, built on `vm_superio::Serial`.
//!
//! Guest output goes to any writer (the VMM passes stdout) and is flushed
//! byte by byte, so an interactive console sees every character at once.
//! Host input is pushed in with [`Serial::enqueue_raw_bytes`]. The interrupt
//! line is an `EventFd` that the VMM registers as an irqfd on IRQ 4.

use std::io::{self, Write};

use thiserror::Error;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, VmAction};

/// Errors from feeding host input to the UART.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The receive FIFO is full; the guest has not read what it was given.
    #[error("serial receive FIFO is full")]
    FifoFull,
    /// Raising the interrupt failed.
    #[error("failed to raise the serial interrupt")]
    Interrupt(#[source] io::Error),
    /// Writing guest output failed.
    #[error("failed to write serial output")]
    Output(#[source] io::Error),
}

impl From<UartError<io::Error>> for SerialError {
    fn from(err: UartError<io::Error>) -> Self {
        match err {
            UartError::FullFifo => SerialError::FifoFull,
            UartError::Trigger(e) => SerialError::Interrupt(e),
            UartError::IOError(e) => SerialError::Output(e),
        }
    }
}

/// Raises an interrupt by writing to an eventfd (an irqfd in the VMM).
#[derive(Debug)]
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// An 8250 UART on the port bus.
pub struct Serial {
    uart: Uart,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.uart.state())
            .finish()
    }
}

impl Serial {
    /// A UART that raises `irq` for its interrupts and writes guest output to `out`.
    ///
    /// Keep a clone of `irq` (`EventFd::try_clone`) to register it with KVM.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest to read from the receive buffer, and
    /// raises the receive interrupt if the guest enabled it. Returns how many
    /// bytes fit; the rest should be offered again once the guest has read.
    pub fn enqueue_raw_bytes(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        Ok(self.uart.enqueue_raw_bytes(bytes)?)
    }

    /// How many more input bytes the receive FIFO can take now.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match u8::try_from(offset + i as u64) {
                Ok(reg) => self.uart.read(reg),
                Err(_) => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        for (i, &byte) in data.iter().enumerate() {
            if let Ok(reg) = u8::try_from(offset + i as u64) {
                // A lost output byte or a failed interrupt cannot be reported
                // back to the guest; the UART model has already updated its
                // registers, so the guest carries on as hardware would.
                let _ = self.uart.write(reg, byte);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RX_AVAILABLE: u8 = 0x01;

    /// A writer the test can inspect after the UART took ownership of it.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, EventFd, SharedBuf) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn byte_written_to_thr_reaches_output() {
        let (mut serial, _irq, out) = serial();
        assert_eq!(serial.write(RBR_THR, b"x"), None);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"x");
    }

    #[test]
    fn enqueued_input_is_readable_from_rbr() {
        let (mut serial, _irq, _out) = serial();
        assert_eq!(serial.enqueue_raw_bytes(b"ab").unwrap(), 2);
        assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut serial, RBR_THR), b'a');
        assert_eq!(read_reg(&mut serial, RBR_THR), b'b');
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn enqueued_input_raises_interrupt_when_enabled() {
        let (mut serial, irq, _out) = serial();
        serial.write(IER, &[IER_RX_AVAILABLE]);
        // Enabling interrupts may itself signal (THR empty); start from zero.
        let _ = irq.read();
        serial.enqueue_raw_bytes(b"z").unwrap();
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn input_without_interrupt_enabled_does_not_signal() {
        let (mut serial, irq, _out) = serial();
        serial.enqueue_raw_bytes(b"z").unwrap();
        assert!(irq.read().is_err(), "no interrupt expected");
    }

    #[test]
    fn full_fifo_is_reported() {
        let (mut serial, _irq, _out) = serial();
        let cap = serial.fifo_capacity();
        assert_eq!(serial.enqueue_raw_bytes(&vec![0u8; cap + 5]).unwrap(), cap);
        assert!(matches!(
            serial.enqueue_raw_bytes(b"x"),
            Err(SerialError::FifoFull)
        ));
    }
}
