//! The guest's physical address map and legacy port map.
//!
//! Every crate that places something in guest memory or on the port bus takes
//! its address from here, so that the e820 map, the ACPI tables and the device
//! buses agree.

// ---- Guest physical memory, low 1 MiB ----

/// The boot GDT (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT for the boot CPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapped page tables for 64-bit boot: PML4, PDPT, then 4 PDs.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line we accept, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// The multiboot information area (info structure, memory map, module list, strings).
pub const MULTIBOOT_INFO_START: u64 = 0x30000;
pub const MULTIBOOT_INFO_SIZE: u64 = 0x10000;
/// The initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of usable conventional memory: the EBDA and the legacy hole start here.
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS area, reserved in the e820 map: ACPI tables, then SMBIOS.
pub const BIOS_AREA_START: u64 = 0xe0000;
pub const BIOS_AREA_SIZE: u64 = 0x20000;
/// The ACPI tables live in the BIOS area, where a scan for the RSDP finds them.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x10000;
/// The SMBIOS entry points and structures, in the 0xF0000-0xFFFFF range a
/// guest without EFI scans for them.
pub const SMBIOS_START: u64 = 0xf0000;
pub const SMBIOS_SIZE: u64 = 0x10000;
// The ACPI and SMBIOS areas do not overlap, and both lie in the BIOS area.
const _: () = assert!(ACPI_START >= BIOS_AREA_START && ACPI_START + ACPI_SIZE <= SMBIOS_START);
const _: () = assert!(SMBIOS_START + SMBIOS_SIZE <= BIOS_AREA_START + BIOS_AREA_SIZE);
/// Where high memory starts.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

// ---- Guest physical memory, the 32-bit hole ----

/// Start of the hole below 4 GiB for MMIO: RAM above this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// PCI: the 32-bit window BARs are assigned from (512 MiB at the start of
/// the hole). Described in the host bridge's `_CRS`.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI: ECAM configuration space for bus 0 only (32 devices, 8 functions,
/// 4 KiB each), listed in the MCFG and reserved in the e820 map.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The IOAPIC's registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// The KVM TSS, three pages that KVM needs on Intel hosts.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page (Intel), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

// ---- Ports ----

/// The first 8250 UART (COM1).
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard controller, data and command ports.
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// The i8042 claims 0x60-0x64; the ports between read as unassigned.
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's interrupt.
pub const I8042_KBD_IRQ: u32 = 1;
/// The CMOS RTC index and data ports.
pub const RTC_PORT: u64 = 0x70;
pub const RTC_PORT_LEN: u64 = 2;
pub const RTC_IRQ: u32 = 8;
/// The POST-code port: the guest kit's init writes boot markers here.
pub const BOOT_MARKER_PORT: u64 = 0x80;
/// The exit device, compatible with QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_PORT_LEN: u64 = 4;
/// The ACPI PM block: PM1a event (4 bytes), PM1a control (2 bytes), reset (1 byte).
pub const ACPI_PM_PORT: u64 = 0x600;
pub const ACPI_PM_PORT_LEN: u64 = 8;
pub const ACPI_PM1A_EVT_OFFSET: u64 = 0;
pub const ACPI_PM1A_EVT_LEN: u8 = 4;
pub const ACPI_PM1A_CNT_OFFSET: u64 = 4;
pub const ACPI_PM1A_CNT_LEN: u8 = 2;
pub const ACPI_RESET_OFFSET: u64 = 6;
/// The value the guest writes to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The ACPI PM timer: a 32-bit counter at 3.579545 MHz, right after the PM
/// block (where QEMU's PIIX4 puts it, relative to its PM base).
pub const ACPI_PM_TMR_PORT: u64 = 0x608;
pub const ACPI_PM_TMR_LEN: u8 = 4;
/// The sleep type for S5 (soft off) in the DSDT's `_S5_` package.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// The SCI interrupt.
pub const ACPI_SCI_IRQ: u32 = 9;
/// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC-0xCFF.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_PORT_LEN: u64 = 8;
/// PCI INTx: pin `p` (0 = INTA) of slot `s` raises GSI
/// `PCI_INTX_GSI_BASE + (s + p) % PCI_INTX_GSIS` (IOAPIC pins 16-19), as the
/// host bridge's `_PRT` says.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSIS: u32 = 4;
/// The IOAPIC has 24 pins, GSIs 0-23.
pub const IOAPIC_PINS: u32 = 24;

/// The GSI that INTx pin `pin` (0 = INTA) of PCI slot `slot` raises.
pub const fn pci_intx_gsi(slot: u32, pin: u32) -> u32 {
    PCI_INTX_GSI_BASE + (slot + pin) % PCI_INTX_GSIS
}

/// The pvpanic port (QEMU's default), described to the guest in the DSDT.
pub const PVPANIC_PORT: u64 = 0x505;
