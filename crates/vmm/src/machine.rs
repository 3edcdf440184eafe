//! The PC around the vCPUs: ACPI and SMBIOS tables, boot tables, the legacy devices
//! on the port bus (serial, i8042, RTC, debug exit, ACPI PM, PM timer, boot marker,
//! pvpanic), and the buses that also carry the PCI bus.

use std::sync::{Arc, Mutex};

use arch::layout;
use arch::regs::EntryMode;
use arch::smbios::Uuid;
use devices::{Bus, BusError, SharedDevice};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::console::InputSink;
use crate::pci::{PciDevices, PciError};

/// Errors from building the machine around the vCPUs.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The ACPI tables could not be written.
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] arch::acpi::AcpiError),
    /// The SMBIOS tables could not be written.
    #[error("cannot write the SMBIOS tables")]
    Smbios(#[source] arch::smbios::SmbiosError),
    /// No UUID was given and none could be made.
    #[error(transparent)]
    Uuid(#[from] arch::smbios::UuidError),
    /// The boot GDT or page tables could not be written.
    #[error(transparent)]
    BootTables(#[from] arch::regs::RegsError),
    /// An interrupt eventfd could not be made or registered.
    #[error("cannot wire interrupt {irq}")]
    Irq {
        irq: u32,
        #[source]
        source: std::io::Error,
    },
    /// Two devices claim the same ports.
    #[error("cannot place a device on the port bus")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// The port bus and the MMIO bus with every device in place: the legacy
/// devices, PCI configuration ports, ECAM and the PCI BAR window.
pub fn buses(legacy: &LegacyDevices, pci: &PciDevices) -> Result<(Bus, Bus), MachineError> {
    let mut io_bus = legacy.io_bus()?;
    pci.attach_io(&mut io_bus)?;
    let mut mmio_bus = Bus::new();
    pci.attach_mmio(&mut mmio_bus)?;
    Ok((io_bus, mmio_bus))
}

/// Writes the ACPI tables and returns the RSDP's address.
pub fn write_acpi_tables<M: GuestMemory>(mem: &M, cpus: u8) -> Result<u64, MachineError> {
    arch::acpi::create_acpi_tables(mem, cpus)
        .map(|addr| addr.0)
        .map_err(MachineError::Acpi)
}

/// Writes the SMBIOS tables for the guest with `uuid`, or a random one when
/// none is given, and returns the UUID used.
pub fn write_smbios_tables<M: GuestMemory>(
    mem: &M,
    uuid: Option<Uuid>,
) -> Result<Uuid, MachineError> {
    let uuid = match uuid {
        Some(uuid) => uuid,
        None => Uuid::random()?,
    };
    arch::smbios::create_smbios_tables(mem, &arch::smbios::SmbiosInfo { uuid })
        .map_err(MachineError::Smbios)?;
    Ok(uuid)
}

/// Writes the boot GDT, IDT and page tables for the entry mode.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, mode: EntryMode) -> Result<(), MachineError> {
    Ok(arch::regs::write_boot_tables(mem, mode)?)
}

/// The legacy PC devices of one VM.
pub struct LegacyDevices {
    serial: Arc<Mutex<devices::serial::Serial>>,
    i8042: Arc<Mutex<devices::i8042::I8042>>,
    rtc: SharedDevice,
    debug_exit: SharedDevice,
    acpi_pm: SharedDevice,
    pm_timer: SharedDevice,
    boot_marker: SharedDevice,
    pvpanic: SharedDevice,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices").finish_non_exhaustive()
    }
}

fn irq_eventfd(vm: &VmFd, irq: u32) -> Result<EventFd, MachineError> {
    let irq_err = |source| MachineError::Irq { irq, source };
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(irq_err)?;
    vm.register_irqfd(&fd, irq)
        .map_err(|e| irq_err(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(fd)
}

impl LegacyDevices {
    /// Creates the devices. The serial console writes to the console output
    /// (stdout, or the runtime directory) and raises IRQ 4 through an irqfd.
    pub fn create(vm: &VmFd) -> Result<Self, MachineError> {
        let serial_irq = irq_eventfd(vm, layout::SERIAL_IRQ)?;
        let keyboard_irq = irq_eventfd(vm, layout::I8042_KBD_IRQ)?;
        let serial = devices::serial::Serial::new(serial_irq, crate::console::output());
        Ok(Self {
            serial: Arc::new(Mutex::new(serial)),
            i8042: Arc::new(Mutex::new(devices::i8042::I8042::new(keyboard_irq))),
            rtc: Arc::new(Mutex::new(devices::rtc::Rtc::new())),
            debug_exit: Arc::new(Mutex::new(devices::debug_exit::DebugExit::new())),
            acpi_pm: Arc::new(Mutex::new(devices::AcpiPm::new(devices::AcpiPmConfig {
                s5_sleep_type: layout::ACPI_S5_SLP_TYP,
                reset_value: layout::ACPI_RESET_VALUE,
            }))),
            pm_timer: Arc::new(Mutex::new(devices::PmTimer::new())),
            boot_marker: Arc::new(Mutex::new(devices::boot_marker::BootMarker::new())),
            pvpanic: Arc::new(Mutex::new(devices::pvpanic::PvPanic::new())),
        })
    }

    /// The port bus with every device in place.
    pub fn io_bus(&self) -> Result<Bus, MachineError> {
        let mut bus = Bus::new();
        bus.insert(
            layout::SERIAL_PORT,
            layout::SERIAL_PORT_LEN,
            self.serial.clone(),
        )?;
        bus.insert(
            layout::I8042_DATA_PORT,
            layout::I8042_PORT_LEN,
            self.i8042.clone(),
        )?;
        bus.insert(layout::RTC_PORT, layout::RTC_PORT_LEN, self.rtc.clone())?;
        bus.insert(
            layout::DEBUG_EXIT_PORT,
            layout::DEBUG_EXIT_PORT_LEN,
            self.debug_exit.clone(),
        )?;
        bus.insert(
            layout::ACPI_PM_PORT,
            layout::ACPI_PM_PORT_LEN,
            self.acpi_pm.clone(),
        )?;
        bus.insert(
            layout::ACPI_PM_TMR_PORT,
            u64::from(layout::ACPI_PM_TMR_LEN),
            self.pm_timer.clone(),
        )?;
        bus.insert(layout::BOOT_MARKER_PORT, 1, self.boot_marker.clone())?;
        bus.insert(layout::PVPANIC_PORT, 1, self.pvpanic.clone())?;
        Ok(bus)
    }

    /// The keyboard controller, for injecting Ctrl-Alt-Del.
    pub fn keyboard(&self) -> Arc<Mutex<devices::i8042::I8042>> {
        self.i8042.clone()
    }

    /// Where console input goes: the serial port's receive FIFO.
    pub fn console_input(&self) -> InputSink {
        let serial = self.serial.clone();
        Box::new(move |bytes| {
            let mut serial = serial.lock().unwrap_or_else(|p| p.into_inner());
            serial.enqueue_raw_bytes(bytes).unwrap_or(0)
        })
    }
}
