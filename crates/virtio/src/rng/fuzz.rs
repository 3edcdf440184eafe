//! The `rng` fuzz target's entry: virtio-rng's queue handler served from a
//! driver played from fuzz bytes.

use devices::fuzz_entry::Input;

use super::{Rng, RngHandler, MAX_FILL, QUEUE_SIZE};
use crate::fuzzing::driver::{self, Target};
use crate::queue::{QueueHandler, QueueSet};
use crate::VirtioDevice;

impl Target for RngHandler {
    fn kick(&mut self, set: &mut QueueSet, qi: usize) {
        self.queue_event(set, qi);
    }

    fn host(&mut self, _set: &mut QueueSet, _input: &mut Input) {}
}

/// Serves requests for random bytes; see the driver's input format in
/// `fuzzing::driver::run`. A small queue makes ring wrap-around and a full
/// ring reachable.
pub fn rng(data: &[u8]) {
    let offered = Rng::new().device_features();
    let mut handler = RngHandler {
        buf: vec![0; MAX_FILL],
    };
    driver::run(data, &[QUEUE_SIZE.min(16)], offered, &mut handler);
}
