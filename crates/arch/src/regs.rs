//! Boot CPU state: the GDT, identity page tables, segment, control and general
//! registers for each entry mode, the FPU, the boot MSRs and the local APIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

/// Errors from setting up boot state in guest memory.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot CPU tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with identity paging (the Linux 64-bit boot protocol).
    /// `rsi` holds the zero page.
    Long { zero_page: u64 },
    /// 32-bit protected mode, paging off (PVH). `ebx` holds the start info.
    Pvh { start_info: u64 },
    /// 32-bit protected mode, paging off (multiboot). `eax` holds the magic,
    /// `ebx` the info structure.
    Multiboot { magic: u32, info: u32 },
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors, as the Linux boot protocol names them (`__BOOT_CS`, `__BOOT_DS`).
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// Builds a GDT descriptor from its flags (the high nibble of byte 6 and
/// byte 5, as 0xF0FF), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the form KVM takes.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for an entry mode: null, null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Long { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh { .. } | EntryMode::Multiboot { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the GDT, an empty IDT and (for long mode) identity page tables that
/// map the first 4 GiB with 2 MiB pages.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, mode: EntryMode) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Write)?;
    if let EntryMode::Long { .. } = mode {
        const PRESENT_RW: u64 = 0x3;
        const PAGE_SIZE_2M: u64 = 0x80;
        mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))
            .map_err(RegsError::Write)?;
        let mut pdpt = [0u64; 512];
        let mut pd = vec![0u64; 4 * 512];
        for (gib, slot) in pdpt.iter_mut().take(4).enumerate() {
            *slot = (PDE_START + 0x1000 * gib as u64) | PRESENT_RW;
        }
        for (i, slot) in pd.iter_mut().enumerate() {
            *slot = ((i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        }
        let pdpt_bytes: Vec<u8> = pdpt.iter().flat_map(|e| e.to_le_bytes()).collect();
        let pd_bytes: Vec<u8> = pd.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&pdpt_bytes, GuestAddress(PDPTE_START))
            .map_err(RegsError::Write)?;
        mem.write_slice(&pd_bytes, GuestAddress(PDE_START))
            .map_err(RegsError::Write)?;
    }
    Ok(())
}

/// Shapes the special registers for the entry mode, starting from the vCPU's own.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = boot_gdt(mode);
    let code = segment_from_gdt(gdt[2], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], DATA_SELECTOR);
    let tss = segment_from_gdt(gdt[4], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if let EntryMode::Long { .. } = mode {
        sregs.cr3 = PML4_START;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    sregs
}

/// The general registers for the entry mode and entry point.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Long { zero_page } => regs.rsi = zero_page,
        EntryMode::Pvh { start_info } => regs.rbx = start_info,
        EntryMode::Multiboot { magic, info } => {
            regs.rax = u64::from(magic);
            regs.rbx = u64::from(info);
        }
    }
    regs
}

/// The FPU state at reset, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    // MTRRs enabled, default memory type write-back.
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 0x6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a local APIC state, so that the
/// legacy PIC's interrupts reach the boot CPU before the guest sets up its
/// IOAPIC (virtual wire mode).
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let set = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (b, r) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
            *b = *r as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
            *r = b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, DELIVERY_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, DELIVERY_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(EntryMode::Long { zero_page: 0 });
        let code = segment_from_gdt(gdt[2], CODE_SELECTOR);
        assert_eq!(
            (code.base, code.limit, code.l, code.db, code.g),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        assert_eq!((code.type_, code.present, code.s), (0xb, 1, 1));
        let data = segment_from_gdt(gdt[3], DATA_SELECTOR);
        assert_eq!((data.limit, data.db, data.type_), (0xffff_ffff, 1, 0x3));
        let code32 = segment_from_gdt(boot_gdt(EntryMode::Pvh { start_info: 0 })[2], 0x10);
        assert_eq!((code32.l, code32.db), (0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Long { zero_page: 0x7000 });
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.selector, CODE_SELECTOR);
        assert_eq!(sregs.ss.selector, DATA_SELECTOR);
    }

    #[test]
    fn protected_mode_sregs_leave_paging_off() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Pvh { start_info: 0x6000 });
        assert_eq!(sregs.cr0 & (CR0_PG | CR0_PE), CR0_PE);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn entry_registers_carry_boot_pointers() {
        assert_eq!(
            boot_regs(EntryMode::Long { zero_page: 0x7000 }, 0x100200).rsi,
            0x7000
        );
        assert_eq!(
            boot_regs(EntryMode::Pvh { start_info: 0x6000 }, 0x1000000).rbx,
            0x6000
        );
        let mb = boot_regs(
            EntryMode::Multiboot {
                magic: 0x2bad_b002,
                info: 0x30000,
            },
            0x100000,
        );
        assert_eq!((mb.rax, mb.rbx, mb.rip), (0x2bad_b002, 0x30000, 0x100000));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Long { zero_page: 0 }).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PDE_START + 0x3000);
        // The last 2 MiB page maps 4 GiB - 2 MiB.
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 2047)).unwrap();
        assert_eq!(last & !0xfff, (4 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lint(&mut lapic);
        assert_eq!((lapic.regs[0x351] as u8) & 0x7, 0x7);
        assert_eq!((lapic.regs[0x361] as u8) & 0x7, 0x4);
    }
}
