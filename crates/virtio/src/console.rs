//! virtio-console (VirtIO 1.2, 5.3) with a single port: queue 0 (receiveq)
//! carries input to the guest, queue 1 (transmitq) carries its output.
//!
//! Output goes to any `Write` (stdout, a socket, a log file) through a
//! thread of its own: the worker hands bytes over in a buffer of at most
//! [`OUTPUT_CAPACITY`] bytes and never writes itself, so an output that
//! blocks (a terminal nobody reads) stalls the transmit queue, not the
//! worker, and a reset stays prompt. Input comes
//! through a [`ConsoleInput`] handle that any thread may clone and feed; it
//! holds up to [`INPUT_CAPACITY`] bytes until the driver posts receive
//! buffers, so typing before the guest's driver is up is not lost.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use thiserror::Error;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::queue::{Chain, QueueError, QueueHandler, QueueSet, Worker};
use crate::{
    device_type, read_config_bytes, ActivateError, ActiveQueue, Interrupt, Memory, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Input bytes held while the driver has no receive buffer.
pub const INPUT_CAPACITY: usize = 64 * 1024;
/// The receive queue's index.
const RX: u16 = 0;
/// The transmit queue's index.
const TX: u16 = 1;
/// Guest output held for the output thread; past it the transmit queue
/// waits until the output has taken the bytes.
pub const OUTPUT_CAPACITY: usize = 256 * 1024;
/// The input eventfd's backend token.
const INPUT_TOKEN: u32 = 0;
/// The output thread's "room again" eventfd's backend token.
const OUTPUT_TOKEN: u32 = 1;
/// How long dropping the console waits for the output thread to write
/// what is left (an output nobody reads would otherwise hold the drop).
const DRAIN_ON_DROP: std::time::Duration = std::time::Duration::from_secs(2);
/// The most output bytes taken from one transmit chain.
const MAX_TX_CHAIN: u32 = 1 << 20;
/// Configuration space: cols, rows, max_nr_ports, emerg_wr (all zero).
const CONFIG_LEN: usize = 12;

/// Errors from virtio-console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The input eventfd could not be created.
    #[error("cannot create the console's eventfds")]
    EventFd(#[source] std::io::Error),
    /// The output thread could not be started.
    #[error("cannot start the console's output thread")]
    Thread(#[source] std::io::Error),
}

/// Input waiting for the guest, shared by every [`ConsoleInput`] clone.
#[derive(Debug)]
struct InputQueue {
    bytes: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl InputQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A thread-safe handle that feeds the console's input (the guest's hvc0
/// reads it). Clone it for every producer.
#[derive(Debug, Clone)]
pub struct ConsoleInput {
    queue: Arc<InputQueue>,
}

impl ConsoleInput {
    /// Queues `data` for the guest and wakes the device. Returns how many
    /// bytes were taken: fewer than `data.len()` when [`INPUT_CAPACITY`]
    /// bytes are already waiting.
    pub fn push(&self, data: &[u8]) -> usize {
        let taken = {
            let mut bytes = self.queue.lock();
            let n = data.len().min(INPUT_CAPACITY - bytes.len());
            bytes.extend(&data[..n]);
            n
        };
        if taken > 0 {
            // Only fails if the counter would overflow, which means the
            // worker is already due to wake.
            let _ = self.queue.ready.write(1);
        }
        taken
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }
}

/// Guest output on its way to the output thread.
#[derive(Debug)]
struct OutputBuffer {
    state: Mutex<OutputState>,
    /// Signalled when bytes arrive or the console is dropped.
    cond: Condvar,
    /// Written by the output thread after each write: the worker waits on
    /// it while the buffer is full.
    room: EventFd,
}

#[derive(Debug, Default)]
struct OutputState {
    bytes: Vec<u8>,
    closed: bool,
    /// Set by the output thread when it has written everything and ends.
    finished: bool,
}

impl OutputBuffer {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the worker may hand over more bytes.
    fn has_room(&self) -> bool {
        self.lock().bytes.len() < OUTPUT_CAPACITY
    }

    fn push(&self, data: &[u8]) {
        self.lock().bytes.extend_from_slice(data);
        self.cond.notify_all();
    }

    /// Tells the output thread to end once everything is written, and
    /// waits for that at most `limit`.
    fn close(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut state = self.lock();
        state.closed = true;
        self.cond.notify_all();
        while !state.finished {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            state = match self.cond.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.cond.notify_all();
    }

    /// Waits for bytes; `None` once closed and empty.
    fn take(&self) -> Option<Vec<u8>> {
        let mut state = self.lock();
        while state.bytes.is_empty() && !state.closed {
            state = self.cond.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.bytes.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut state.bytes))
    }
}

/// The output thread: writes what the worker hands over until the console
/// is dropped.
fn write_output(buffer: Arc<OutputBuffer>, mut out: Box<dyn Write + Send>) {
    while let Some(bytes) = buffer.take() {
        // A failing output (a closed pipe) drops the bytes; the guest must
        // not stall on it.
        let _ = out.write_all(&bytes);
        let _ = out.flush();
        // Only fails if the counter would overflow: the worker is due anyway.
        let _ = buffer.room.write(1);
    }
    buffer.finish();
}

/// The virtio-console device.
pub struct Console {
    input: ConsoleInput,
    output: Arc<OutputBuffer>,
    worker: Option<Worker>,
    /// The output until the first activation starts its thread: no thread
    /// starts while the VMM is being built (and, when jailed, before its
    /// lock-down).
    pending_output: Option<Box<dyn Write + Send>>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reset();
        // The output thread writes what is left and ends. It is waited for
        // only a little, as the output may never take the bytes.
        if self.pending_output.is_none() {
            self.output.close(DRAIN_ON_DROP);
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("input", &self.input)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console whose guest output goes to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Result<Console, ConsoleError> {
        let ready = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
        let room = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
        let buffer = Arc::new(OutputBuffer {
            state: Mutex::new(OutputState::default()),
            cond: Condvar::new(),
            room,
        });
        Ok(Console {
            input: ConsoleInput {
                queue: Arc::new(InputQueue {
                    bytes: Mutex::new(VecDeque::new()),
                    ready,
                }),
            },
            output: buffer,
            worker: None,
            pending_output: Some(output),
        })
    }

    /// A handle that feeds the guest's input.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[0; CONFIG_LEN], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is not offered (no VIRTIO_CONSOLE_F_EMERG_WRITE).
    }

    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        crate::expect_queues(&queues, 2)?;
        self.reset();
        if let Some(output) = self.pending_output.take() {
            let thread_buffer = self.output.clone();
            let spawned = crate::thread::spawn("virtio-console-out", move || {
                write_output(thread_buffer, output)
            });
            if let Err(e) = spawned {
                return Err(ActivateError::Worker(e));
            }
        }
        let set = QueueSet::new("virtio-console", mem, interrupt, queues, features);
        let position = |index| set.queues.iter().position(|q| q.index() == index);
        let (Some(rx), Some(tx)) = (position(RX), position(TX)) else {
            return Err(ActivateError::QueueCount { want: 2, got: 1 });
        };
        let handler = ConsoleHandler {
            input: self.input.queue.clone(),
            output: self.output.clone(),
            buf: Vec::new(),
            rx,
            tx,
        };
        let input_fd = self.input.queue.ready.as_raw_fd();
        let room_fd = self.output.room.as_raw_fd();
        let worker = Worker::spawn(
            "virtio-console",
            set,
            handler,
            &[
                (input_fd, INPUT_TOKEN, EventSet::IN),
                (room_fd, OUTPUT_TOKEN, EventSet::IN),
            ],
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        // Told to stop; the transport waits for it off the bus lock.
        self.worker.take().map(Worker::stopping)
    }
}

struct ConsoleHandler {
    input: Arc<InputQueue>,
    output: Arc<OutputBuffer>,
    /// One transmit chain's bytes.
    buf: Vec<u8>,
    rx: usize,
    tx: usize,
}

impl ConsoleHandler {
    /// Moves waiting input into the driver's receive buffers.
    fn receive(&mut self, set: &mut QueueSet) {
        if set.queues[self.rx].is_broken() {
            return;
        }
        match self.fill_rx(set) {
            Ok(true) => set.notify(self.rx),
            Ok(false) => {}
            Err(e) => set.fail(self.rx, &e),
        }
    }

    /// Returns whether any buffer was used.
    fn fill_rx(&mut self, set: &mut QueueSet) -> Result<bool, QueueError> {
        let stop = set.stop_flag();
        let q = &mut set.queues[self.rx];
        let mut used = false;
        loop {
            while !self.input.lock().is_empty() {
                if stop.load(Ordering::Acquire) {
                    return Ok(used);
                }
                let Some(chain) = q.pop(&set.mem)? else {
                    break;
                };
                let n = write_input(&set.mem, &chain, &self.input)?;
                q.add_used(&set.mem, chain.head(), n)?;
                used = true;
            }
            // Ask for a kick when the driver adds buffers; if some arrived
            // meanwhile and input is waiting, go round again.
            let more = q.enable_notification(&set.mem)?;
            if !more || self.input.lock().is_empty() {
                return Ok(used);
            }
        }
    }

    /// Hands every transmit chain's bytes to the output thread, as long
    /// as its buffer has room.
    fn transmit(&mut self, set: &mut QueueSet) {
        if set.queues[self.tx].is_broken() {
            return;
        }
        let mut used = false;
        let result = self.send_chains(set, &mut used);
        if used {
            set.notify(self.tx);
        }
        if let Err(e) = result {
            set.fail(self.tx, &e);
        }
    }

    fn send_chains(&mut self, set: &mut QueueSet, used: &mut bool) -> Result<(), QueueError> {
        let stop = set.stop_flag();
        let q = &mut set.queues[self.tx];
        loop {
            q.disable_notification(&set.mem)?;
            loop {
                // A full buffer: the output thread's room eventfd brings
                // the worker back once it has written the bytes.
                if stop.load(Ordering::Acquire) || !self.output.has_room() {
                    return Ok(());
                }
                let Some(chain) = q.pop(&set.mem)? else {
                    break;
                };
                read_output(&set.mem, &chain, &mut self.buf)?;
                self.output.push(&self.buf);
                q.add_used(&set.mem, chain.head(), 0)?;
                *used = true;
            }
            if !q.enable_notification(&set.mem)? {
                return Ok(());
            }
        }
    }
}

impl QueueHandler for ConsoleHandler {
    fn queue_event(&mut self, set: &mut QueueSet, qi: usize) {
        if qi == self.rx {
            self.receive(set);
        } else if qi == self.tx {
            self.transmit(set);
        }
    }

    fn backend_event(&mut self, set: &mut QueueSet, token: u32, _events: EventSet) {
        // Clearing the counters; EAGAIN only means nothing was signalled.
        if token == INPUT_TOKEN {
            let _ = self.input.ready.read();
            self.receive(set);
        } else if token == OUTPUT_TOKEN {
            let _ = self.output.room.read();
            self.transmit(set);
        }
    }
}

/// Copies waiting input into a receive chain; returns the bytes written.
fn write_input(mem: &Memory, chain: &Chain, input: &InputQueue) -> Result<u32, QueueError> {
    let mut bytes = input.lock();
    let n = bytes.len().min(chain.writable_len() as usize);
    let data: Vec<u8> = bytes.iter().take(n).copied().collect();
    let written = chain.writer().write(mem, &data)?;
    bytes.drain(..written);
    // written <= writable_len, a u32.
    Ok(written as u32)
}

/// Reads a transmit chain's bytes (at most [`MAX_TX_CHAIN`]) into `buf`.
fn read_output(mem: &Memory, chain: &Chain, buf: &mut Vec<u8>) -> Result<(), QueueError> {
    let len = chain.readable_len().min(MAX_TX_CHAIN) as usize;
    buf.clear();
    buf.resize(len, 0);
    let mut pos = 0usize;
    for b in chain.readable() {
        if pos == len {
            break;
        }
        let n = (b.len as usize).min(len - pos);
        mem.read_slice(&mut buf[pos..pos + n], b.addr)
            .map_err(|_| QueueError::Memory)?;
        pos += n;
    }
    Ok(())
}

#[cfg(any(test, feature = "test-utils"))]
mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub use fuzz::console as fuzz_entry;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Buf, MockDriver};
    use vm_memory::GuestAddress;

    /// A `Write` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }

        /// The bytes once `len` have arrived (the output thread writes
        /// after the used entry is published), or after 10 s.
        fn wait_bytes(&self, len: usize) -> Vec<u8> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while self.bytes().len() < len && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            self.bytes()
        }
    }

    /// A `Write` that blocks until the test opens it, like a terminal
    /// nobody reads.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>, Sink);

    impl Gate {
        fn open(&self) {
            *self.0 .0.lock().unwrap() = true;
            self.0 .1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let mut open = self.0 .0.lock().unwrap();
            while !*open {
                open = self.0 .1.wait(open).unwrap();
            }
            self.1.write(data)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const F: u64 = VIRTIO_F_VERSION_1;

    fn rig() -> (MockDriver, Console, Sink) {
        let sink = Sink::default();
        let console = Console::new(Box::new(sink.clone())).unwrap();
        let drv = MockDriver::new(1 << 22, &[QUEUE_SIZE, QUEUE_SIZE]);
        (drv, console, sink)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut drv, mut con, sink) = rig();
        drv.activate(&mut con, F).unwrap();
        let a = drv.put(b"hello, ");
        let b = drv.put(b"world\n");
        drv.add_chain(1, &[Buf::readable(a, 7), Buf::readable(b, 6)]);
        drv.kick(1);
        let used = drv.wait_used(1, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 0);
        assert_eq!(sink.wait_bytes(13), b"hello, world\n");
    }

    #[test]
    fn input_reaches_the_guest_in_order_across_buffers() {
        let (mut drv, mut con, _sink) = rig();
        drv.activate(&mut con, F).unwrap();
        let a = drv.alloc(4);
        let b = drv.alloc(4);
        drv.add_chain(0, &[Buf::writable(a, 4)]);
        drv.add_chain(0, &[Buf::writable(b, 4)]);
        drv.kick(0);
        assert_eq!(con.input().push(b"abcdef"), 6);
        let used = drv.wait_used(0, 2);
        assert_eq!(used.iter().map(|u| u.len).collect::<Vec<_>>(), [4, 2]);
        assert_eq!(drv.read(a, 4), b"abcd");
        assert_eq!(drv.read(b, 2), b"ef");
        assert!(drv.interrupt().wait_count(0, 1));
    }

    #[test]
    fn input_before_the_driver_is_ready_is_kept() {
        let (mut drv, mut con, _sink) = rig();
        let input = con.input();
        assert_eq!(input.push(b"early"), 5);
        drv.activate(&mut con, F).unwrap();
        // No receive buffer yet: the bytes wait.
        assert_eq!(input.pending(), 5);
        let a = drv.alloc(16);
        drv.add_chain(0, &[Buf::writable(a, 16)]);
        drv.kick(0);
        let used = drv.wait_used(0, 1);
        assert_eq!(used[0].len, 5);
        assert_eq!(drv.read(a, 5), b"early");
        assert_eq!(input.pending(), 0);
    }

    #[test]
    fn input_is_bounded() {
        let (_drv, con, _sink) = rig();
        let input = con.input();
        let big = vec![b'x'; INPUT_CAPACITY + 100];
        assert_eq!(input.push(&big), INPUT_CAPACITY);
        assert_eq!(input.push(b"more"), 0);
        assert_eq!(input.pending(), INPUT_CAPACITY);
    }

    #[test]
    fn input_handle_works_from_other_threads() {
        let (mut drv, mut con, _sink) = rig();
        drv.activate(&mut con, F).unwrap();
        let a = drv.alloc(8);
        drv.add_chain(0, &[Buf::writable(a, 8)]);
        drv.kick(0);
        let input = con.input();
        std::thread::spawn(move || assert_eq!(input.push(b"thread"), 6))
            .join()
            .unwrap();
        assert_eq!(drv.wait_used(0, 1)[0].len, 6);
        assert_eq!(drv.read(a, 6), b"thread");
    }

    #[test]
    fn event_idx_keeps_rx_kicks_coming() {
        let (mut drv, mut con, _sink) = rig();
        drv.activate(&mut con, F | VIRTIO_RING_F_EVENT_IDX).unwrap();
        let input = con.input();
        for round in 0..3u16 {
            input.push(b"k");
            // The device asked to be kicked at the next buffer.
            let a = drv.alloc(4);
            drv.add_chain(0, &[Buf::writable(a, 4)]);
            assert!(drv.wait_avail_event(0, round));
            drv.kick(0);
            assert_eq!(drv.wait_used(0, 1).len(), 1);
            assert_eq!(drv.read(a, 1), b"k");
        }
    }

    #[test]
    fn hostile_tx_chain_needs_reset_and_reset_recovers() {
        let (mut drv, mut con, sink) = rig();
        drv.activate(&mut con, F).unwrap();
        drv.add_chain(1, &[Buf::readable(GuestAddress((1 << 22) - 4), 64)]);
        drv.kick(1);
        assert!(drv.interrupt().wait_needs_reset());
        assert!(sink.bytes().is_empty());
        // The receive queue is a different queue and keeps working.
        let a = drv.alloc(4);
        drv.add_chain(0, &[Buf::writable(a, 4)]);
        drv.kick(0);
        con.input().push(b"ok");
        assert_eq!(drv.wait_used(0, 1).len(), 1);

        con.reset();
        drv.reset_rings();
        drv.activate(&mut con, F).unwrap();
        let b = drv.put(b"back");
        drv.add_chain(1, &[Buf::readable(b, 4)]);
        drv.kick(1);
        assert_eq!(drv.wait_used(1, 1).len(), 1);
        assert_eq!(sink.wait_bytes(4), b"back");
    }

    #[test]
    fn blocked_output_stalls_the_queue_and_reset_still_returns() {
        let gate = Gate::default();
        let mut con = Console::new(Box::new(gate.clone())).unwrap();
        let mut drv = MockDriver::new(1 << 23, &[QUEUE_SIZE, QUEUE_SIZE]);
        drv.activate(&mut con, F).unwrap();
        const CHAINS: usize = 8;
        const LEN: u32 = 128 * 1024;
        for i in 0..CHAINS {
            let a = drv.put(&vec![b'a' + i as u8; LEN as usize]);
            drv.add_chain(1, &[Buf::readable(a, LEN)]);
        }
        drv.kick(1);
        // The output takes nothing: the buffer fills and the queue stalls
        // with chains left over; the worker is not stuck in a write.
        assert!(!drv.wait_used(1, 1).is_empty());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let resetter = std::thread::spawn(move || {
            con.reset();
            done_tx.send(()).unwrap();
            con
        });
        let reset = done_rx.recv_timeout(std::time::Duration::from_secs(60));
        // Let the output go either way so nothing stays blocked.
        gate.open();
        assert!(reset.is_ok(), "reset blocked behind the console output");
        let con = resetter.join().unwrap();
        let used = usize::from(drv.used_idx(1));
        assert!(used < CHAINS, "all {used} chains were taken");
        // What was taken reaches the output in order once it reads again.
        let out = gate.1.wait_bytes(used * LEN as usize);
        assert_eq!(out.len(), used * LEN as usize);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
        drop(con);
    }

    #[test]
    fn dropping_the_console_writes_what_is_left() {
        let (mut drv, mut con, sink) = rig();
        drv.activate(&mut con, F).unwrap();
        let a = drv.put(b"last words\n");
        drv.add_chain(1, &[Buf::readable(a, 11)]);
        drv.kick(1);
        assert_eq!(drv.wait_used(1, 1).len(), 1);
        drop(con);
        assert_eq!(sink.bytes(), b"last words\n");
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let sink = Sink::default();
        let mut con = Console::new(Box::new(sink)).unwrap();
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        assert!(matches!(
            drv.activate(&mut con, F),
            Err(ActivateError::QueueCount { want: 2, got: 1 })
        ));
    }
}
