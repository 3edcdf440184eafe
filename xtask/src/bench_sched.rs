//! `cargo xtask bench sched`: what each scheduling policy promises, against
//! what tiny guests on this host receive. Figures only, no pass/fail.
//!
//! The guests are multiboot kernels of a few instructions, run by the real
//! `ferrovisor run --config FILE --runtime-dir DIR`; every figure is read
//! from the VMMs' control sockets (`info`) or their console logs:
//! - **Share**: three spinning guests with weights 1:2:4 on one host CPU;
//!   each one's share of the CPU time the three received.
//! - **Cap**: a spinning guest capped at 25% on one host CPU; its share.
//! - **Real time**: a periodic task (a job of about 1 ms of guest work each
//!   10 ms, released by its local APIC timer in TSC-deadline mode, halted
//!   in between) in a guest with `rt = 2ms/10ms`,
//!   beside a guest spinning on every host CPU, at 20%, 50% and 90% of one
//!   CPU reserved (other reserved guests spin); misses (a job done after its
//!   period) and the worst response, against the task alone.
//! - **Partitions**: a 20 ms frame with windows of 5, 5 and 10 ms owned by
//!   three guests on one host CPU; window-start lateness (the gate's release
//!   and each vCPU's return) as p50, p99, max, and overruns.
//! - **Rate limits**: `cargo xtask bench rate` (in the lab), run last.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{self, Context, Result};

/// The host CPU the one-CPU benchmarks share.
const BENCH_CPU: &str = "1";
/// How long each figure is measured.
const MEASURE: Duration = Duration::from_secs(6);
/// The real-time task's period and its target job length.
const PERIOD: Duration = Duration::from_millis(10);
const JOB: Duration = Duration::from_millis(1);

/// A multiboot (a.out kludge) image of `code`, loaded and entered at 1 MiB.
fn multiboot(code: &[u8]) -> Vec<u8> {
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = (1 << 16) | (1 << 1);
    const LOAD: u32 = 0x10_0000;
    let end = LOAD + 32 + code.len() as u32;
    let mut image = Vec::new();
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        LOAD,
        LOAD,
        end,
        end,
        LOAD + 32,
    ];
    for word in header {
        image.extend_from_slice(&word.to_le_bytes());
    }
    image.extend_from_slice(code);
    image
}

/// A guest that spins forever (`jmp $`).
fn spin_kernel() -> Vec<u8> {
    multiboot(&[0xeb, 0xfe])
}

/// Where the periodic task keeps its IDT and the IDTR image.
const IDT: u32 = 0x9_0000;
/// The interrupt vector of its local APIC timer.
const TIMER_VECTOR: u32 = 0x40;
/// Its stack top.
const STACK: u32 = 0x8ff0;

/// The periodic task, a real-time guest that sleeps between jobs. It arms
/// its local APIC timer in TSC-deadline mode for the next release, halts
/// with interrupts on until then, runs a job of `work` iterations of
/// `loop`, and writes the response time (TSC ticks from the release) to
/// COM1 as a line `J` + 8 letters `a`-`p`, one per nibble, lowest first
/// (text that a dropped byte cannot turn into another number). Releases
/// are `period_ticks` apart.
fn periodic_kernel(work: u32, period_ticks: u32) -> Vec<u8> {
    const LOAD: u32 = 0x10_0000 + 32;
    let handler = LOAD + 2;
    // Jump over the timer's handler: EOI, then straight back to the check
    // after the halt with a fresh stack (PVM's emulator cannot run iret
    // here, and the gate leaves interrupts off, as the check wants).
    let mut c: Vec<u8> = vec![0xeb, 0x14];
    c.extend_from_slice(&[0xc7, 0x05, 0xb0, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]);
    c.push(0xbc); // mov esp, STACK
    c.extend_from_slice(&STACK.to_le_bytes());
    let wake_jump = c.len();
    c.extend_from_slice(&[0xe9, 0, 0, 0, 0]); // jmp wake (patched below)
    c.push(0xbc); // mov esp, STACK
    c.extend_from_slice(&STACK.to_le_bytes());
    let mov_mem = |c: &mut Vec<u8>, addr: u32, value: u32| {
        c.extend_from_slice(&[0xc7, 0x05]);
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&value.to_le_bytes());
    };
    // IDT entry TIMER_VECTOR: an interrupt gate to the handler, in CS.
    c.extend_from_slice(&[0x8c, 0xc8, 0xc1, 0xe0, 0x10, 0x0d]); // mov eax, cs; shl eax, 16; or eax, ..
    c.extend_from_slice(&(handler & 0xffff).to_le_bytes());
    c.push(0xa3); // mov [entry], eax
    c.extend_from_slice(&(IDT + TIMER_VECTOR * 8).to_le_bytes());
    mov_mem(
        &mut c,
        IDT + TIMER_VECTOR * 8 + 4,
        (handler & 0xffff_0000) | 0x8e00,
    );
    // IDTR image: limit, base; lidt.
    mov_mem(
        &mut c,
        IDT + 0x800,
        (TIMER_VECTOR * 8 + 7) | ((IDT & 0xffff) << 16),
    );
    mov_mem(&mut c, IDT + 0x804, IDT >> 16);
    c.extend_from_slice(&[0x0f, 0x01, 0x1d]);
    c.extend_from_slice(&(IDT + 0x800).to_le_bytes());
    // Local APIC on (spurious vector = the timer's), timer in TSC-deadline mode.
    mov_mem(&mut c, 0xfee0_00f0, 0x100 | TIMER_VECTOR);
    mov_mem(&mut c, 0xfee0_0320, 0x4_0000 | TIMER_VECTOR);
    let add_period = |c: &mut Vec<u8>| {
        c.extend_from_slice(&[0x81, 0xc6]); // add esi, period
        c.extend_from_slice(&period_ticks.to_le_bytes());
        c.extend_from_slice(&[0x83, 0xd7, 0x00]); // adc edi, 0
    };
    c.extend_from_slice(&[0x0f, 0x31, 0x89, 0xc6, 0x89, 0xd7]); // rdtsc; esi:edi = now
    add_period(&mut c);
    let arm = c.len();
    c.extend_from_slice(&[
        0xb9, 0xe0, 0x06, 0x00, 0x00, // mov ecx, IA32_TSC_DEADLINE
        0x89, 0xf0, 0x89, 0xfa, // mov eax, esi; mov edx, edi
        0x0f, 0x30, // wrmsr
    ]);
    let wait = c.len();
    c.extend_from_slice(&[0xfb, 0xf4, 0xfa]); // sti; hlt; cli
    let wake = c.len();
    let rel = (wake as i32) - (wake_jump as i32 + 5);
    c[wake_jump + 1..wake_jump + 5].copy_from_slice(&rel.to_le_bytes());
    c.extend_from_slice(&[0x0f, 0x31, 0x29, 0xf0, 0x19, 0xfa]); // rdtsc; sub eax, esi; sbb edx, edi
    let at = c.len();
    c.extend_from_slice(&[0x72, (wait as isize - (at as isize + 2)) as i8 as u8]); // jc wait
    c.push(0xb9); // mov ecx, work
    c.extend_from_slice(&work.to_le_bytes());
    c.extend_from_slice(&[0xe2, 0xfe]); // loop $
    c.extend_from_slice(&[
        0x0f, 0x31, // rdtsc
        0x29, 0xf0, // sub eax, esi: the response
        0x89, 0xc3, // mov ebx, eax
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'J', 0xee, // mov al, 'J'; out dx, al
    ]);
    for _ in 0..8 {
        c.extend_from_slice(&[
            0x88, 0xd8, // mov al, bl
            0x24, 0x0f, // and al, 0x0f
            0x04, b'a', // add al, 'a'
            0xee, // out dx, al
            0xc1, 0xeb, 0x04, // shr ebx, 4
        ]);
    }
    c.extend_from_slice(&[0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    add_period(&mut c);
    let at = c.len();
    c.push(0xe9); // jmp arm
    c.extend_from_slice(&((arm as i32) - (at as i32 + 5)).to_le_bytes());
    multiboot(&c)
}

/// The host's TSC frequency, measured against the monotonic clock.
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t0 = unsafe { std::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    let t1 = unsafe { std::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / start.elapsed().as_secs_f64()
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock partitions count from).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid storage for clock_gettime's result.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where a benchmark's guests run: tiny guests on this host, or guest-kit
/// guests (Debian's kernel, busybox) inside the lab.
#[derive(Debug, Clone, Copy)]
struct Ctx<'a> {
    exe: &'a Path,
    base: &'a Path,
    lab: bool,
}

/// What a guest boots.
enum Boot {
    /// A tiny multiboot kernel.
    Tiny(Vec<u8>),
    /// The guest kit running this shell command.
    Kit(String),
}

impl Ctx<'_> {
    /// A guest that keeps each of its `cpus` vCPUs busy.
    fn spinner(&self, cpus: u8) -> Boot {
        if self.lab {
            Boot::Kit(format!(
                "for i in $(seq {cpus}); do (while :; do :; done) & done; wait"
            ))
        } else {
            Boot::Tiny(spin_kernel())
        }
    }

    fn start(&self, name: &str, boot: Boot, cpus: u8, extra: &str) -> Result<Guest> {
        Guest::start(self, name, boot, cpus, extra)
    }
}

/// The kit's marker that its /init runs.
const KIT_INIT: &str = "ferrovisor-guest: init reached";

/// One guest VMM under the benchmark; stopped when dropped.
struct Guest {
    name: String,
    child: Child,
    dir: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.request(r#"{"op":"stop"}"#);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Writes `NAME.toml` (what it boots, `cpus`, then `extra`) in the
    /// context's directory, and starts it; returns once its vCPU threads
    /// are up (and a kit guest's /init runs).
    fn start(ctx: &Ctx<'_>, name: &str, boot: Boot, cpus: u8, extra: &str) -> Result<Guest> {
        let exe = ctx.exe;
        let dir = ctx.base.join(name);
        util::mkdir(&dir)?;
        let file = dir.join(format!("{name}.toml"));
        let head = match &boot {
            Boot::Tiny(kernel) => {
                util::write(&dir.join("kernel.bin"), kernel)?;
                "kernel = \"kernel.bin\"\nmemory = \"32M\"\n".to_string()
            }
            Boot::Kit(run) => format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{}\"\nmemory = \"192M\"\n",
                crate::lab::LAB_KERNEL,
                crate::lab::LAB_INITRAMFS,
                crate::guestkit::cmdline_running(run)
            ),
        };
        let text = format!("{head}cpus = {cpus}\n{extra}\n");
        util::write(&file, text)?;
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&file)
            .arg("--runtime-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vmm.err"))
                    .ctx(|| format!("cannot create {}", dir.join("vmm.err").display()))?,
            ))
            .spawn()
            .ctx(|| format!("cannot start {}", exe.display()))?;
        let guest = Guest {
            name: name.to_string(),
            child,
            dir,
        };
        guest.wait_started(cpus)?;
        if matches!(boot, Boot::Kit(_)) {
            guest.wait_console(KIT_INIT, Duration::from_secs(120))?;
        }
        Ok(guest)
    }

    /// The guest's console so far.
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// Waits until the console shows a whole line with `needle`; returns
    /// the line.
    fn wait_console(&self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let console = self.console();
            if let Some(at) = console.find(needle) {
                if let Some(end) = console[at..].find('\n') {
                    let start = console[..at].rfind('\n').map_or(0, |n| n + 1);
                    return Ok(console[start..at + end].trim_end().to_string());
                }
            }
            if Instant::now() > deadline {
                return Err(fail!(
                    "guest {} never printed {needle:?} in {} s",
                    self.name,
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_started(&self, cpus: u8) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(info) = self.request(r#"{"op":"info"}"#) {
                let tids = info["vcpu_tids"].as_array().map_or(0, |t| {
                    t.iter().filter(|v| v.as_u64().unwrap_or(0) > 0).count()
                });
                if tids == usize::from(cpus) {
                    return Ok(());
                }
            }
            let err = std::fs::read_to_string(self.dir.join("vmm.err")).unwrap_or_default();
            if err.lines().any(|l| !l.contains("warning")) {
                return Err(fail!("guest {} did not start: {}", self.name, err.trim()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(fail!("guest {} did not start in 30 s", self.name))
    }

    fn request(&self, line: &str) -> Result<Value> {
        let mut s = UnixStream::connect(self.dir.join("control.sock"))
            .ctx(|| format!("{}: control socket", self.name))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        s.write_all(format!("{line}\n").as_bytes())
            .ctx(|| format!("{}: control socket", self.name))?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .ctx(|| format!("{}: control socket", self.name))?;
        serde_json::from_str(&reply).ctx(|| format!("{}: bad reply {reply:?}", self.name))
    }

    fn sched(&self) -> Result<Value> {
        Ok(self.request(r#"{"op":"info"}"#)?["sched"].clone())
    }

    /// CPU time all its vCPU threads received so far, in nanoseconds.
    fn cpu_ns(&self) -> Result<u64> {
        let sched = self.sched()?;
        Ok(sched["vcpus"]
            .as_array()
            .map_or(0, |v| v.iter().filter_map(|c| c["cpu_ns"].as_u64()).sum()))
    }

    /// The periodic task's response times so far, in TSC ticks.
    fn responses(&self) -> Vec<u32> {
        let log = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        parse_responses(&log)
    }
}

/// The periodic task's lines (`J` + 8 nibble letters); any other line is skipped.
fn parse_responses(log: &[u8]) -> Vec<u32> {
    log.split(|&b| b == b'\n')
        .filter_map(|line| {
            let digits = line.strip_prefix(b"J")?;
            if digits.len() != 8 || !digits.iter().all(|d| (b'a'..=b'p').contains(d)) {
                return None;
            }
            Some(
                digits
                    .iter()
                    .rev()
                    .fold(0u32, |v, &d| (v << 4) | u32::from(d - b'a')),
            )
        })
        .collect()
}

/// CPU time each guest receives over [`MEASURE`].
fn cpu_over_measure(guests: &[&Guest]) -> Result<(Vec<u64>, Duration)> {
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<u64> = guests.iter().map(|g| g.cpu_ns()).collect::<Result<_>>()?;
    let start = Instant::now();
    std::thread::sleep(MEASURE);
    let after: Vec<u64> = guests.iter().map(|g| g.cpu_ns()).collect::<Result<_>>()?;
    let wall = start.elapsed();
    Ok((
        after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        wall,
    ))
}

fn share(ctx: &Ctx<'_>) -> Result<()> {
    let weights = [100u32, 200, 400];
    let mut guests = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        let extra = format!("affinity = \"{BENCH_CPU}\"\n[sched]\nweight = {w}");
        guests.push(ctx.start(&format!("share-{i}"), ctx.spinner(1), 1, &extra)?);
    }
    let refs: Vec<&Guest> = guests.iter().collect();
    let (cpu, _) = cpu_over_measure(&refs)?;
    let total: u64 = cpu.iter().sum();
    let declared_total: u32 = weights.iter().sum();
    println!(
        "Share (weights 1:2:4 on host CPU {BENCH_CPU}, {} s):",
        MEASURE.as_secs()
    );
    let mut worst: f64 = 0.0;
    for (i, w) in weights.iter().enumerate() {
        let got = 100.0 * cpu[i] as f64 / total.max(1) as f64;
        let want = 100.0 * f64::from(*w) / f64::from(declared_total);
        worst = worst.max((got - want).abs());
        println!(
            "  weight {w:>4}: {got:5.1}% of the three guests' CPU time (declared {want:4.1}%)"
        );
    }
    println!("  worst error: {worst:.1} points (goal: within 2)");
    Ok(())
}

fn cap(ctx: &Ctx<'_>) -> Result<()> {
    let extra = format!("affinity = \"{BENCH_CPU}\"\n[sched]\ncap = 25");
    let guest = ctx.start("cap", ctx.spinner(1), 1, &extra)?;
    let (cpu, wall) = cpu_over_measure(&[&guest])?;
    let got = 100.0 * cpu[0] as f64 / wall.as_nanos() as f64;
    println!(
        "Cap (25% of host CPU {BENCH_CPU}, {} s):",
        MEASURE.as_secs()
    );
    println!(
        "  received {got:.1}% of one CPU; error {:.1} points (goal: within 2)",
        (got - 25.0).abs()
    );
    Ok(())
}

/// Response times (ms) of the periodic task in `guest` over [`MEASURE`],
/// and the share of one CPU its vCPU received meanwhile.
fn task_responses(guest: &Guest, hz: f64) -> Result<(Vec<f64>, f64)> {
    std::thread::sleep(Duration::from_secs(1));
    let skip = guest.responses().len();
    let (cpu, wall) = (guest.cpu_ns()?, Instant::now());
    std::thread::sleep(MEASURE);
    let share = (guest.cpu_ns()? - cpu) as f64 / wall.elapsed().as_nanos() as f64;
    let responses = guest.responses()[skip..]
        .iter()
        .map(|&t| f64::from(t) * 1000.0 / hz)
        .collect();
    Ok((responses, share))
}

fn describe_responses(label: &str, (responses, share): (Vec<f64>, f64)) {
    let misses = responses
        .iter()
        .filter(|&&r| r > PERIOD.as_secs_f64() * 1000.0)
        .count();
    let mut sorted = responses.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let worst = sorted.last().copied().unwrap_or(0.0);
    let lateness = worst - PERIOD.as_secs_f64() * 1000.0;
    println!(
        "  {label:<30} {:>4} jobs, {misses:>3} missed; response p50 {median:5.2} ms, worst {worst:6.2} ms (lateness {lateness:+.2} ms); vCPU got {:.1}% of a CPU",
        responses.len(),
        share * 100.0
    );
}

/// The reservations the real-time task runs beside: (label, the fillers'
/// reservations), at 20%, 50% and 90% of one CPU reserved in all.
const RT_LEVELS: [(&str, &[&str]); 3] = [
    ("20% reserved, beside the hog", &[]),
    ("50% reserved, beside the hog", &["3ms/10ms"]),
    ("90% reserved, beside the hog", &["7ms/10ms"]),
];

/// The task's own reservation.
const RT_RESERVED: &str = "[sched]\nrt = \"2ms/10ms\"";

fn real_time(ctx: &Ctx<'_>) -> Result<()> {
    if ctx.lab {
        return real_time_lab(ctx);
    }
    let hz = tsc_hz();
    let period_ticks = (hz * PERIOD.as_secs_f64()) as u32;
    // Calibrate the job: `work` iterations for about JOB of guest time alone.
    let probe_work = 2_000;
    let probe = ctx.start(
        "rt-probe",
        Boot::Tiny(periodic_kernel(probe_work, period_ticks)),
        1,
        "",
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let mut alone: Vec<u32> = probe.responses();
    drop(probe);
    alone.sort_unstable();
    // The 10th percentile: on a busy host most of the probe's (fair-class)
    // jobs are stretched by other work, which would shrink the job.
    let quick = *alone
        .get(alone.len() / 10)
        .ok_or_else(|| fail!("the periodic task reported no job"))?;
    let per_iter = f64::from(quick) / f64::from(probe_work);
    let work = ((hz * JOB.as_secs_f64()) / per_iter).max(1.0) as u32;
    let kernel = periodic_kernel(work, period_ticks);
    println!(
        "Real time (a job of ~{} ms every {} ms; rt = 2ms/10ms; TSC {:.0} MHz; host kernel: {}):",
        JOB.as_millis(),
        PERIOD.as_millis(),
        hz / 1e6,
        host_preemption()
    );
    let task = ctx.start("rt-alone", Boot::Tiny(kernel.clone()), 1, "")?;
    describe_responses("alone, fair class", task_responses(&task, hz)?);
    drop(task);
    let reserved = RT_RESERVED;
    let task = ctx.start("rt-alone-reserved", Boot::Tiny(kernel.clone()), 1, reserved)?;
    describe_responses("alone, 20% reserved", task_responses(&task, hz)?);
    drop(task);
    let hog = ctx.start("rt-hog", ctx.spinner(2), 2, "")?;
    for (level, (label, fillers)) in RT_LEVELS.into_iter().enumerate() {
        let _others = fillers_for(ctx, level, fillers)?;
        let task = ctx.start(
            &format!("rt-task-{level}"),
            Boot::Tiny(kernel.clone()),
            1,
            reserved,
        )?;
        describe_responses(label, task_responses(&task, hz)?);
        let overruns = task.sched()?["overruns"].as_u64().unwrap_or(0);
        println!("  {:<30} {overruns} budget overruns counted", "");
    }
    drop(hog);
    Ok(())
}

/// What bounds a deadline thread's lateness in the host kernel: its
/// preemption model (with `PREEMPT_NONE` a thread woken for its period
/// waits until the running task reaches a preemption point, which kernel
/// work such as writeback can put milliseconds away) and whether interrupt
/// time is charged to the thread it interrupts (without
/// `IRQ_TIME_ACCOUNTING` it is, and eats into the budget).
fn host_preemption() -> String {
    let Ok(out) = Command::new("zcat").arg("/proc/config.gz").output() else {
        return "configuration unknown".into();
    };
    let config = String::from_utf8_lossy(&out.stdout);
    let set = |k: &str| config.lines().any(|l| l == format!("CONFIG_{k}=y"));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let model = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("preempt="))
        .map(str::to_string)
        .or_else(|| {
            ["PREEMPT_RT", "PREEMPT", "PREEMPT_VOLUNTARY", "PREEMPT_NONE"]
                .into_iter()
                .find(|k| set(k))
                .map(|k| k.trim_start_matches("PREEMPT_").to_lowercase())
        });
    let Some(model) = model else {
        return "configuration unknown".into();
    };
    let model = if model == "preempt" {
        "full".into()
    } else {
        model
    };
    let irq = if set("IRQ_TIME_ACCOUNTING") {
        "interrupt time accounted apart"
    } else {
        "interrupt time charged to the running thread"
    };
    format!("preemption {model}, {irq}")
}

/// Spinning guests holding the reservations `fillers`, for level `level`.
fn fillers_for(ctx: &Ctx<'_>, level: usize, fillers: &[&str]) -> Result<Vec<Guest>> {
    let mut others = Vec::new();
    for (i, rt) in fillers.iter().enumerate() {
        let extra = format!("[sched]\nrt = \"{rt}\"");
        others.push(ctx.start(&format!("rt-fill-{level}-{i}"), ctx.spinner(1), 1, &extra)?);
    }
    Ok(others)
}

/// The job of the Linux guest's periodic task: smaller than the tiny
/// guest's, because the guest kernel's own work around each job (its timer,
/// the wake-up, their exits, all emulated in the lab) is charged to the
/// same 2 ms budget.
const LAB_JOB: Duration = Duration::from_micros(300);

/// The real-time figure with the kit's `periodic` task in a Linux guest:
/// a job of about 0.3 ms every 10 ms for [`MEASURE`], its response times
/// as the task itself measures them (from its release on the guest's
/// clock).
fn real_time_lab(ctx: &Ctx<'_>) -> Result<()> {
    let secs = MEASURE.as_secs();
    let run = format!(
        "sleep 2; periodic {} {} {secs}; sleep 600",
        PERIOD.as_millis(),
        LAB_JOB.as_micros()
    );
    println!(
        "Real time (the kit's periodic task in a Linux guest: a job of ~{} us every {} ms for {secs} s; rt = 2ms/10ms):",
        LAB_JOB.as_micros(),
        PERIOD.as_millis()
    );
    let task_line = |name: &str, label: &str, extra: &str| -> Result<()> {
        let task = ctx.start(name, Boot::Kit(run.clone()), 1, extra)?;
        let before = task.cpu_ns()?;
        let start = Instant::now();
        let line = task.wait_console("periodic: ", MEASURE + Duration::from_secs(60))?;
        let share =
            task.cpu_ns()?.saturating_sub(before) as f64 / start.elapsed().as_nanos() as f64;
        let overruns = task.sched()?["overruns"].as_u64().unwrap_or(0);
        println!(
            "  {label:<30} {}; vCPU got {:.1}% of a CPU; {overruns} budget overruns",
            line.trim_start_matches("periodic: ").trim(),
            share * 100.0
        );
        Ok(())
    };
    task_line("rt-alone", "alone, fair class", "")?;
    task_line("rt-alone-reserved", "alone, 20% reserved", RT_RESERVED)?;
    let hog = ctx.start("rt-hog", ctx.spinner(2), 2, "")?;
    for (level, (label, fillers)) in RT_LEVELS.into_iter().enumerate() {
        let others = fillers_for(ctx, level, fillers)?;
        task_line(&format!("rt-task-{level}"), label, RT_RESERVED)?;
        drop(others);
    }
    drop(hog);
    Ok(())
}

fn partitions(ctx: &Ctx<'_>) -> Result<()> {
    // The frame starts one second from now, on every guest's clock alike.
    let epoch = monotonic_ns() + 1_000_000_000;
    // Each guest's vCPU holds a deadline reservation 1 ms longer than its
    // window, so that it runs at once when its window opens and is never
    // throttled before the gate closes the window.
    let owners = [
        ("A", "0ms", "5ms", "6ms"),
        ("B", "5ms", "5ms", "6ms"),
        ("C", "10ms", "10ms", "11ms"),
    ];
    let mut guests = Vec::new();
    for (name, start, length, budget) in owners {
        let extra = format!(
            "[sched]\nrt = \"{budget}/20ms\"\n[sched.partition]\nframe = \"20ms\"\nepoch = {epoch}\nwindows = [{{ start = \"{start}\", length = \"{length}\" }}]"
        );
        guests.push(ctx.start(&format!("part-{name}"), ctx.spinner(1), 1, &extra)?);
    }
    std::thread::sleep(Duration::from_secs(1) + MEASURE);
    println!(
        "Partitions (20 ms frame, windows 5/5/10 ms on host CPU {BENCH_CPU}, {} s):",
        MEASURE.as_secs() + 1
    );
    println!("  guest  windows  gate start p50/p99/max (us)  vCPU start p50/p99/max (us)  end p50/p99 (us)  overruns  progress while closed");
    for ((name, ..), guest) in owners.iter().zip(&guests) {
        let p = guest.sched()?["partition"].clone();
        let us = |k: &str| p[k].as_u64().unwrap_or(0) as f64 / 1000.0;
        println!(
            "  {name:<6} {:>7}  {:>8.0} /{:>6.0} /{:>6.0}        {:>8.0} /{:>6.0} /{:>6.0}     {:>6.0} /{:>6.0}  {:>9}  {}",
            p["windows"],
            us("start_late_p50_ns"),
            us("start_late_p99_ns"),
            us("start_late_max_ns"),
            us("vcpu_start_late_p50_ns"),
            us("vcpu_start_late_p99_ns"),
            us("vcpu_start_late_max_ns"),
            us("end_late_p50_ns"),
            us("end_late_p99_ns"),
            p["overruns"],
            p["closed_progress"],
        );
    }
    println!("  goal: window-start p99 under 100 us; an overrun is a window end the vCPUs outlive by more than 100 us");
    Ok(())
}

/// The I/O rate-limit figure: `cargo xtask bench rate` (a disk at 20 MiB/s
/// and 500 IOPS, a NIC at 100 Mbit/s, under a guest flooding them), which
/// runs in the lab.
fn rate_limits(ctx: &Ctx<'_>) -> Result<()> {
    if ctx.lab {
        // `bench rate` is a lab benchmark of its own, with Linux guests.
        println!(
            "Rate limits: run by `cargo xtask bench sched` (or `bench rate`), in the lab already"
        );
        return Ok(());
    }
    println!("Rate limits (cargo xtask bench rate, in the lab):");
    crate::bench_rate::command(&[]).map(drop)
}

/// The benchmarks, by the name that selects one.
type Bench = fn(&Ctx<'_>) -> Result<()>;
const BENCHES: [(&str, Bench); 5] = [
    ("share", share),
    ("cap", cap),
    ("rt", real_time),
    ("partitions", partitions),
    ("rate", rate_limits),
];

/// Runs every benchmark (or those named) and prints its figures; with
/// `--lab`, once more inside the lab with guest-kit guests.
pub fn command(args: &[String]) -> Result<u8> {
    let lab = args.iter().any(|a| a == "--lab");
    let args: Vec<String> = args.iter().filter(|a| *a != "--lab").cloned().collect();
    let names: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
    if let Some(bad) = args.iter().find(|a| !names.contains(&a.as_str())) {
        return Err(fail!(
            "bench sched: unknown benchmark `{bad}` (known: {}; --lab for Linux guests in the lab)",
            names.join(", ")
        ));
    }
    if lab {
        return crate::bench::run_in_lab_with(
            &format!("sched-lab {}", args.join(" ")),
            Duration::from_secs(60 * 60),
            |_| {},
        );
    }
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "ferrovisor"])
            .current_dir(util::workspace_root()),
    )?;
    let exe = util::target_dir().join("debug/ferrovisor");
    run_all(&exe, false, &args)
}

/// `xtask bench-in-lab sched-lab [NAMES]`: the benchmarks with guest-kit
/// guests, inside the lab.
pub fn in_lab(args: &[String]) -> Result<u8> {
    run_all(Path::new(crate::lab::LAB_FERROVISOR), true, &args[1..])
}

fn run_all(exe: &Path, lab: bool, args: &[String]) -> Result<u8> {
    let base = PathBuf::from(format!("/tmp/fv-bench-sched-{}", std::process::id()));
    util::mkdir(&base)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let guests = if lab {
        "guest-kit guests (Debian's kernel) in the lab"
    } else {
        "tiny guests on this host"
    };
    println!(
        "bench sched: {guests} (load average {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let ctx = Ctx {
        exe,
        base: &base,
        lab,
    };
    let mut result = Ok(());
    for (name, bench) in BENCHES {
        if result.is_ok() && (args.is_empty() || args.iter().any(|a| a == name)) {
            result = bench(&ctx);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    result.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_lines_decode_nibble_letters_and_skip_noise() {
        // 0x12345678: nibbles 8,7,6,5,4,3,2,1 lowest first.
        let log = b"noise\nJihgfedcb\nJzz\nJaaaaaaaa\nJihg";
        assert_eq!(parse_responses(log), vec![0x1234_5678, 0]);
    }
}
