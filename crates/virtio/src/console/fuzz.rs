//! The `console` fuzz target's entry: virtio-console's queue handler served
//! from a driver played from fuzz bytes, with host input typed and guest
//! output drained by the input too.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use devices::fuzz_entry::Input;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ConsoleHandler, InputQueue, OutputBuffer, OutputState, INPUT_CAPACITY, INPUT_TOKEN,
    OUTPUT_TOKEN, RX, TX,
};
use crate::fuzzing::driver::{self, Target};
use crate::queue::{QueueHandler, QueueSet};
use crate::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

impl Target for ConsoleHandler {
    fn kick(&mut self, set: &mut QueueSet, qi: usize) {
        self.queue_event(set, qi);
    }

    /// Bit 0-1 of the next byte: the host types up to 255 bytes (0), the
    /// output thread writes what the guest sent (1), or the input (2) or
    /// room (3) eventfd fires.
    fn host(&mut self, set: &mut QueueSet, input: &mut Input) {
        let op = input.u8();
        match op & 3 {
            0 => {
                let len = usize::from(input.u8());
                let typed = input.bytes(len);
                let mut queue = self.input.lock();
                let room = INPUT_CAPACITY.saturating_sub(queue.len());
                queue.extend(typed.iter().take(room));
            }
            1 => {
                // What the output thread does: take the bytes, write them
                // out, and say there is room again.
                drop(std::mem::take(&mut self.output.lock().bytes));
                let _ = self.output.room.write(1);
            }
            2 => self.backend_event(set, INPUT_TOKEN, vmm_sys_util::epoll::EventSet::IN),
            _ => self.backend_event(set, OUTPUT_TOKEN, vmm_sys_util::epoll::EventSet::IN),
        }
    }
}

/// Serves the console's receive and transmit queues; see the driver's
/// input format in `fuzzing::driver::run`.
pub fn console(data: &[u8]) {
    let (Ok(ready), Ok(room)) = (
        EventFd::new(libc::EFD_NONBLOCK),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return;
    };
    let mut handler = ConsoleHandler {
        input: Arc::new(InputQueue {
            bytes: Mutex::new(VecDeque::new()),
            ready,
        }),
        output: Arc::new(OutputBuffer {
            state: Mutex::new(OutputState::default()),
            cond: Condvar::new(),
            room,
        }),
        buf: Vec::new(),
        rx: usize::from(RX),
        tx: usize::from(TX),
    };
    let offered = VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
    driver::run(data, &[16, 16], offered, &mut handler);
}
