//! Device models: legacy PC devices on an address bus.
//!
//! Every model here is plain state behind the [`bus::BusDevice`] trait, tested
//! through its register interface with no KVM.

pub mod acpi_pm;
pub mod boot_marker;
pub mod bus;
pub mod debug_exit;
pub mod fuzz_entry;
pub mod i8042;
pub mod pm_timer;
pub mod pvpanic;
pub mod rtc;
pub mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmConfig};
pub use boot_marker::BootMarker;
pub use bus::{Bus, BusDevice, BusError, SharedDevice, VmAction};
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use pm_timer::{HostMonotonic, MonotonicClock, PmTimer};
pub use pvpanic::PvPanic;
pub use rtc::{Clock, Rtc, SystemClock};
pub use serial::{Serial, SerialError};
