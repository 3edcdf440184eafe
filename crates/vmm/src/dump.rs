//! What a vCPU looked like when the guest died: its registers, segments,
//! control registers, pending events and its last exits, as text.
//!
//! Every vCPU keeps a small ring of its most recent exits that reached user
//! space (a few words each, written on every exit). When an exit is fatal to
//! the guest (a triple fault, a failed entry, an emulation failure), the vCPU
//! thread reads its state from KVM and formats it with that ring; the VMM
//! prints it after its one-line reason and writes it to the runtime
//! directory, so that a rare failure leaves evidence behind.

use std::fmt::Write as _;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuExit;

/// How many recent exits each vCPU remembers.
pub const EXIT_RING_LEN: usize = 16;

/// The kind of one remembered exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExitKind {
    #[default]
    None,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Other,
}

/// One remembered exit: its kind, port or address, width and (for writes)
/// the value written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitEntry {
    pub kind: ExitKind,
    pub addr: u64,
    pub len: u8,
    pub data: u64,
    /// A short name for `Other` exits.
    pub name: &'static str,
}

fn value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl ExitEntry {
    /// Describes `exit` in a few words, without keeping any borrow of it.
    pub fn of(exit: &VcpuExit) -> ExitEntry {
        let (kind, addr, len, data, name) = match exit {
            VcpuExit::IoIn(port, d) => (ExitKind::IoIn, u64::from(*port), d.len(), 0, ""),
            VcpuExit::IoOut(port, d) => (ExitKind::IoOut, u64::from(*port), d.len(), value(d), ""),
            VcpuExit::MmioRead(a, d) => (ExitKind::MmioRead, *a, d.len(), 0, ""),
            VcpuExit::MmioWrite(a, d) => (ExitKind::MmioWrite, *a, d.len(), value(d), ""),
            VcpuExit::Shutdown => (ExitKind::Other, 0, 0, 0, "shutdown"),
            VcpuExit::Hlt => (ExitKind::Other, 0, 0, 0, "hlt"),
            VcpuExit::InternalError => (ExitKind::Other, 0, 0, 0, "internal-error"),
            VcpuExit::FailEntry(reason, _) => (ExitKind::Other, *reason, 0, 0, "fail-entry"),
            VcpuExit::SystemEvent(..) => (ExitKind::Other, 0, 0, 0, "system-event"),
            VcpuExit::Intr => (ExitKind::Other, 0, 0, 0, "intr"),
            _ => (ExitKind::Other, 0, 0, 0, "other"),
        };
        ExitEntry {
            kind,
            addr,
            len: len as u8,
            data,
            name,
        }
    }

    fn describe(&self) -> String {
        let w = usize::from(self.len) * 2;
        match self.kind {
            ExitKind::None => String::new(),
            ExitKind::IoIn => format!("in  port {:#06x} len {}", self.addr, self.len),
            ExitKind::IoOut => format!(
                "out port {:#06x} len {} value {:#0w$x}",
                self.addr,
                self.len,
                self.data,
                w = w + 2
            ),
            ExitKind::MmioRead => format!("mmio read  {:#x} len {}", self.addr, self.len),
            ExitKind::MmioWrite => format!(
                "mmio write {:#x} len {} value {:#0w$x}",
                self.addr,
                self.len,
                self.data,
                w = w + 2
            ),
            ExitKind::Other if self.addr != 0 => format!("{} {:#x}", self.name, self.addr),
            ExitKind::Other => self.name.to_string(),
        }
    }
}

/// The last [`EXIT_RING_LEN`] exits of one vCPU, and how many it has had.
#[derive(Debug, Clone, Default)]
pub struct ExitRing {
    entries: [ExitEntry; EXIT_RING_LEN],
    total: u64,
}

impl ExitRing {
    /// Remembers one exit, forgetting the oldest.
    pub fn record(&mut self, entry: ExitEntry) {
        self.entries[(self.total % EXIT_RING_LEN as u64) as usize] = entry;
        self.total += 1;
    }

    /// Exits seen so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The remembered exits, oldest first, each with its sequence number.
    pub fn recent(&self) -> Vec<(u64, ExitEntry)> {
        let first = self.total.saturating_sub(EXIT_RING_LEN as u64);
        (first..self.total)
            .map(|n| (n, self.entries[(n % EXIT_RING_LEN as u64) as usize]))
            .collect()
    }
}

/// A vCPU's state at a fatal exit; any part KVM would not give is `None`.
#[derive(Debug, Default)]
pub struct VcpuState {
    pub regs: Option<kvm_regs>,
    pub sregs: Option<kvm_sregs>,
    pub events: Option<kvm_vcpu_events>,
}

fn segment(out: &mut String, name: &str, s: &kvm_segment) {
    let _ = writeln!(
        out,
        "  {name:<4} sel={:#06x} base={:#018x} limit={:#010x} type={:#x} s={} dpl={} p={} l={} db={} g={}",
        s.selector, s.base, s.limit, s.type_, s.s, s.dpl, s.present, s.l, s.db, s.g
    );
}

fn table(out: &mut String, name: &str, t: &kvm_dtable) {
    let _ = writeln!(
        out,
        "  {name:<4} base={:#018x} limit={:#06x}",
        t.base, t.limit
    );
}

fn write_regs(out: &mut String, r: &kvm_regs) {
    let _ = writeln!(
        out,
        "  rip={:#018x} rflags={:#010x} rsp={:#018x} rbp={:#018x}",
        r.rip, r.rflags, r.rsp, r.rbp
    );
    let _ = writeln!(
        out,
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    let _ = writeln!(
        out,
        "  rsi={:#018x} rdi={:#018x} r8 ={:#018x} r9 ={:#018x}",
        r.rsi, r.rdi, r.r8, r.r9
    );
    let _ = writeln!(
        out,
        "  r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x}",
        r.r10, r.r11, r.r12, r.r13
    );
    let _ = writeln!(out, "  r14={:#018x} r15={:#018x}", r.r14, r.r15);
}

fn write_sregs(out: &mut String, s: &kvm_sregs) {
    let _ = writeln!(
        out,
        "  cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x} cr8={:#x}",
        s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
    );
    let _ = writeln!(out, "  efer={:#x} apic_base={:#x}", s.efer, s.apic_base);
    for (name, seg) in [
        ("cs", &s.cs),
        ("ds", &s.ds),
        ("es", &s.es),
        ("fs", &s.fs),
        ("gs", &s.gs),
        ("ss", &s.ss),
        ("tr", &s.tr),
        ("ldt", &s.ldt),
    ] {
        segment(out, name, seg);
    }
    table(out, "gdt", &s.gdt);
    table(out, "idt", &s.idt);
}

fn write_events(out: &mut String, e: &kvm_vcpu_events) {
    let _ = writeln!(
        out,
        "  exception: injected={} pending={} nr={} has_error_code={} error_code={:#x}",
        e.exception.injected,
        e.exception.pending,
        e.exception.nr,
        e.exception.has_error_code,
        e.exception.error_code
    );
    let _ = writeln!(
        out,
        "  interrupt: injected={} nr={} soft={} shadow={}",
        e.interrupt.injected, e.interrupt.nr, e.interrupt.soft, e.interrupt.shadow
    );
    let _ = writeln!(
        out,
        "  nmi: injected={} pending={} masked={}; smi pending={}",
        e.nmi.injected, e.nmi.pending, e.nmi.masked, e.smi.pending
    );
}

/// Whether the registers are those of a CPU just reset (the real-mode
/// reset vector). KVM on AMD SVM reinitialises a vCPU that triple-faulted
/// before it reports the shutdown, so its registers are lost there.
fn looks_reset(state: &VcpuState) -> bool {
    match (&state.regs, &state.sregs) {
        (Some(r), Some(s)) => r.rip == 0xfff0 && s.cs.base == 0xffff_0000 && s.cr0 & 1 == 0,
        _ => false,
    }
}

/// The dump of vCPU `index`, headed by `why`, as lines of text.
pub fn format(index: u8, why: &str, state: &VcpuState, ring: &ExitRing) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vCPU {index} state at the exit ({why}):");
    if looks_reset(state) {
        let _ = writeln!(
            out,
            "(these registers are a reset CPU's: KVM on AMD SVM reinitialises a vCPU that \
             triple-faulted before reporting it; the last exception and exits below remain)"
        );
    }
    let _ = writeln!(out, "registers:");
    match &state.regs {
        Some(r) => write_regs(&mut out, r),
        None => out.push_str("  (KVM did not give them)\n"),
    }
    let _ = writeln!(out, "control registers and segments:");
    match &state.sregs {
        Some(s) => write_sregs(&mut out, s),
        None => out.push_str("  (KVM did not give them)\n"),
    }
    let _ = writeln!(out, "pending events:");
    match &state.events {
        Some(e) => write_events(&mut out, e),
        None => out.push_str("  (KVM did not give them)\n"),
    }
    let _ = writeln!(
        out,
        "last exits to the VMM (of {}, oldest first):",
        ring.total()
    );
    for (n, entry) in ring.recent() {
        let _ = writeln!(out, "  #{n:<8} {}", entry.describe());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_exits_in_order() {
        let mut ring = ExitRing::default();
        for port in 0..20u16 {
            ring.record(ExitEntry::of(&VcpuExit::IoOut(port, &[port as u8])));
        }
        let recent = ring.recent();
        assert_eq!(ring.total(), 20);
        assert_eq!(recent.len(), EXIT_RING_LEN);
        assert_eq!(recent[0].0, 4);
        assert_eq!(recent[0].1.addr, 4);
        assert_eq!(recent.last().unwrap().1.addr, 19);
    }

    #[test]
    fn a_dump_names_the_registers_segments_events_and_exits() {
        let mut ring = ExitRing::default();
        ring.record(ExitEntry::of(&VcpuExit::IoOut(0x3f8, b"A")));
        ring.record(ExitEntry::of(&VcpuExit::MmioWrite(
            0xfee0_00b0,
            &[0, 0, 0, 0],
        )));
        ring.record(ExitEntry::of(&VcpuExit::Shutdown));
        let state = VcpuState {
            regs: Some(kvm_regs {
                rip: 0x1234_5678,
                ..Default::default()
            }),
            sregs: Some(kvm_sregs {
                cr2: 0xdead_b000,
                ..Default::default()
            }),
            events: None,
        };
        let text = format(0, "triple fault", &state, &ring);
        assert!(
            text.starts_with("vCPU 0 state at the exit (triple fault):\n"),
            "{text}"
        );
        assert!(text.contains("rip=0x0000000012345678"), "{text}");
        assert!(text.contains("cr2=0x00000000deadb000"), "{text}");
        assert!(text.contains("  cs   sel="), "{text}");
        assert!(text.contains("(KVM did not give them)"), "{text}");
        assert!(text.contains("out port 0x03f8 len 1 value 0x41"), "{text}");
        assert!(text.contains("mmio write 0xfee000b0 len 4"), "{text}");
        assert!(text.trim_end().ends_with("shutdown"), "{text}");
        assert!(!text.contains("reset CPU"), "{text}");
    }

    #[test]
    fn a_dump_of_a_reset_cpu_says_so() {
        let mut sregs = kvm_sregs::default();
        sregs.cs.base = 0xffff_0000;
        let state = VcpuState {
            regs: Some(kvm_regs {
                rip: 0xfff0,
                ..Default::default()
            }),
            sregs: Some(sregs),
            events: None,
        };
        let text = format(1, "triple fault", &state, &ExitRing::default());
        assert!(text.contains("reset CPU"), "{text}");
    }
}
