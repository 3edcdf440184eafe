//! Device models: legacy PC devices on an address bus.
//!
//! Every model here is plain state behind the [`bus::BusDevice`] trait, tested
//! through its register interface with no KVM.

pub mod bus;
pub use bus::{Bus, BusDevice, BusError, SharedDevice, VmAction};
