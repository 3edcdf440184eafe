//! KVM's tracepoints in the lab, read back when a boot fails
//! (`cargo xtask bench boot --distro --trace`).
//!
//! The lab kernel's `kvm:` events (entries, exits, injections, emulated
//! instructions, MMIO and port accesses, page faults) go to its ftrace ring
//! buffer while a guest boots. When the boot fails, the buffer is read and
//! each vCPU thread's events are printed: those before the guest's panic or
//! stall report when that vCPU wrote one to the serial port (the report's
//! own port writes would fill the window otherwise), its last ones when not.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;

/// The lab mounts debugfs, and tracefs with it.
const TRACING: &str = "/sys/kernel/debug/tracing";
/// Per CPU; the lab has two and RAM to spare.
const BUFFER_KB: &str = "24576";
/// Events shown per vCPU.
const WINDOW: usize = 400;
/// The events recorded.
const EVENTS: [&str; 16] = [
    "kvm_entry",
    "kvm_exit",
    "kvm_inj_virq",
    "kvm_inj_exception",
    "kvm_pio",
    "kvm_mmio",
    "kvm_page_fault",
    "kvm_msr",
    "kvm_cr",
    "kvm_emulate_insn",
    "kvm_apic_accept_irq",
    "kvm_eoi",
    "kvm_apic_ipi",
    "kvm_msi_set_irq",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
];
/// What the guest's kernel prints first when it dies or stalls.
const REPORTS: [&str; 5] = [
    "PANIC: double fault",
    "general protection fault",
    "BUG: ",
    "Oops",
    "rcu: INFO:",
];
/// A serial console write in a `kvm_pio` event.
const CONSOLE_WRITE: &str = "pio_write at 0x3f8 size 1 count 1 val 0x";

fn write(file: &str, value: &str) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(format!("{TRACING}/{file}"))?
        .write_all(value.as_bytes())
}

/// Recording of KVM's events, started for one boot.
pub struct Recorder;

impl Recorder {
    /// Empties the buffer and starts recording; `Err` says why it cannot.
    pub fn start() -> Result<Recorder, String> {
        let fail = |what: &str, e: std::io::Error| format!("kvm trace: cannot {what}: {e}");
        write("tracing_on", "0").map_err(|e| fail("stop tracing", e))?;
        write("buffer_size_kb", BUFFER_KB).map_err(|e| fail("size the buffer", e))?;
        write("trace", "").map_err(|e| fail("empty the buffer", e))?;
        let events: String = EVENTS.iter().map(|e| format!("kvm:{e}\n")).collect();
        write("set_event", &events).map_err(|e| fail("choose the events", e))?;
        write("tracing_on", "1").map_err(|e| fail("start tracing", e))?;
        Ok(Recorder)
    }

    /// Stops recording and returns each vCPU's last events, as text.
    pub fn report(self) -> String {
        let _ = write("tracing_on", "0");
        match fs::read_to_string(format!("{TRACING}/trace")) {
            Ok(text) => describe(&text),
            Err(e) => format!("kvm trace: cannot read the buffer: {e}"),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = write("tracing_on", "0");
    }
}

/// The task column of an event line (`vcpu-350`).
fn task(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

/// Each vCPU's events, by vCPU number: a thread is a vCPU's when it has
/// entered the guest as that vCPU (`kvm_entry: vcpu N, ...`).
fn by_vcpu(lines: &[&str]) -> BTreeMap<u32, Vec<usize>> {
    let mut vcpu_of: BTreeMap<&str, u32> = BTreeMap::new();
    for line in lines {
        if let Some(at) = line.find("kvm_entry: vcpu ") {
            let rest = &line[at + "kvm_entry: vcpu ".len()..];
            if let Ok(n) = rest.split(',').next().unwrap_or("").parse() {
                vcpu_of.insert(task(line), n);
            }
        }
    }
    let mut events: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(&n) = vcpu_of.get(task(line)) {
            events.entry(n).or_default().push(i);
        }
    }
    events
}

/// Where, among `events` (indexes into `lines`), the line holding the
/// guest's last panic or stall report begins, from what the vCPU wrote to
/// the serial port: the last, since a guest that stalled before it died
/// reports more than once, and its death is what the trace is for.
fn report_start(lines: &[&str], events: &[usize]) -> Option<usize> {
    let mut text = String::new();
    let mut at = Vec::new();
    for (k, &i) in events.iter().enumerate() {
        let Some(p) = lines[i].find(CONSOLE_WRITE) else {
            continue;
        };
        let hex = lines[i][p + CONSOLE_WRITE.len()..]
            .split_whitespace()
            .next()
            .unwrap_or("");
        if let Ok(byte) = u8::from_str_radix(hex, 16) {
            text.push(char::from(byte));
            at.push(k);
        }
    }
    let found = REPORTS.iter().filter_map(|r| text.rfind(r)).max()?;
    let line_start = text[..found].rfind('\n').map_or(0, |n| n + 1);
    // `text` holds one char per event, all ASCII or Latin-1 single chars:
    // its char index is the event's.
    let k = text[..line_start].chars().count();
    at.get(k).copied()
}

/// Each vCPU's window of events, as text.
fn describe(trace: &str) -> String {
    let lines: Vec<&str> = trace.lines().filter(|l| !l.starts_with('#')).collect();
    let mut out = format!("kvm trace: {} events kept\n", lines.len());
    for (vcpu, events) in by_vcpu(&lines) {
        let (end, why) = match report_start(&lines, &events) {
            Some(k) => (k, "before the guest's report"),
            None => (events.len(), "last"),
        };
        let from = end.saturating_sub(WINDOW);
        out.push_str(&format!(
            "kvm trace: vCPU {vcpu}: events {from}..{end} of {} ({why})\n",
            events.len()
        ));
        for &i in &events[from..end] {
            out.push_str(lines[i].trim());
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pio(task: &str, byte: u8) -> String {
        format!("{task} [000] ..... 1.0: kvm_pio: {CONSOLE_WRITE}{byte:x} ")
    }

    #[test]
    fn each_vcpu_shows_its_events_before_its_panic_report() {
        let mut trace = vec![
            "# tracer: nop".to_string(),
            "vcpu-10 [000] d..1. 1.0: kvm_entry: vcpu 0, rip 0x1".to_string(),
            "vcpu-11 [001] d..1. 1.0: kvm_entry: vcpu 1, rip 0x2".to_string(),
            "vcpu-11 [001] ..... 1.1: kvm_exit: vcpu 1 reason npf rip 0x2".to_string(),
            "vcpu-11 [001] ..... 1.1: kvm_inj_exception: #PF (0x10)".to_string(),
        ];
        for b in b"ok\n[ 1.2] traps: PANIC: double fault" {
            trace.push(pio("vcpu-11", *b));
        }
        trace.push("vcpu-10 [000] ..... 1.3: kvm_exit: vcpu 0 reason hlt".to_string());
        let text = describe(&trace.join("\n"));
        assert!(text.starts_with("kvm trace: 41 events kept\n"), "{text}");
        // vCPU 1: its entry, exit, injection and the "ok\n" writes, not the
        // report's own line.
        let one = &text[text.find("vCPU 1:").unwrap()..];
        assert!(one.starts_with("vCPU 1: events 0..6 of 39 (before the guest's report)"));
        assert!(one.contains("kvm_inj_exception: #PF (0x10)"));
        assert!(!one.contains(&format!("{CONSOLE_WRITE}5b")), "{one}");
        // vCPU 0 wrote no report: its last events.
        let zero = &text[text.find("vCPU 0:").unwrap()..text.find("vCPU 1:").unwrap()];
        assert!(
            zero.starts_with("vCPU 0: events 0..2 of 2 (last)"),
            "{zero}"
        );
        assert!(zero.contains("reason hlt"));
    }

    #[test]
    fn the_window_ends_at_the_last_report() {
        let mut trace = vec!["vcpu-11 [001] d..1. 1.0: kvm_entry: vcpu 1, rip 0x2".to_string()];
        for b in b"rcu: INFO: stall\nmore\nBUG: unable to handle page fault" {
            trace.push(pio("vcpu-11", *b));
        }
        let text = describe(&trace.join("\n"));
        // The entry, then "rcu: INFO: stall\nmore\n": 1 + 22 events.
        assert!(text.contains("vCPU 1: events 0..23 of "), "{text}");
    }

    #[test]
    fn an_empty_trace_has_no_vcpus() {
        assert_eq!(describe("# tracer: nop\n"), "kvm trace: 0 events kept\n");
    }
}
