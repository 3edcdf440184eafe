//! PCI for the guest: a root complex with a host bridge on bus 0, type-0
//! configuration spaces with BARs and capabilities, MSI-X, the virtio-pci
//! modern transport, and the ivshmem-compatible shared-region device.
//!
//! Nothing here talks to KVM. The VMM puts the bus devices ([`PciConfigIo`],
//! [`PciConfigMmio`], [`PciMmioWindow`]) on its buses, and gives each virtio
//! transport its interrupt plumbing ([`MsiDelivery`], an INTx eventfd) and
//! the place to register notify addresses ([`IoEvents`]).

pub mod config;
pub mod fuzz_entry;
pub mod ivshmem;
pub mod msix;
pub mod root;
pub mod virtio_pci;

pub use config::{BarKind, ConfigSpace, Ids};
pub use ivshmem::{
    Doorbells, EventFdDoorbells, IntxState, IvshmemConfig, IvshmemCounters, IvshmemDevice,
    IvshmemError, RegionMapping,
};
pub use msix::{MsiDelivery, MsiMessage, Msix};
pub use root::{
    HostBridge, PciConfigIo, PciConfigMmio, PciFunction, PciMmioWindow, PciRoot, RootError,
    SharedRoot,
};
pub use virtio_pci::{IntxResampler, IoEvents, VirtioPciDevice, VirtioPciError};
