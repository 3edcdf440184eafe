//! The uplink: a host tap as a switch port with no MAC (it forwards for
//! every station behind it). A thread reads the tap into the switch; the
//! switch writes frames for it straight to the tap, never waiting: a tap
//! whose queue is full refuses the frame, which is counted.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use switch::{Offload, PortId, PortTx, Switch, TxDropped};
use virtio::net::{NetBackend, Tap, TapError};

use crate::chain::NET_HDR_LEN;
use crate::lock;

/// The tap, shared by its reading thread and the switch.
#[derive(Debug, Clone)]
pub struct Uplink(Arc<Mutex<Tap>>);

impl Uplink {
    /// Opens tap `name`.
    pub fn open(name: &str) -> Result<Uplink, TapError> {
        Ok(Uplink(Arc::new(Mutex::new(Tap::open(name)?))))
    }

    /// Reads frames from the tap into switch port `id`, forever.
    pub fn spawn_reader(&self, switch: Arc<Mutex<Switch>>, id: PortId) -> io::Result<()> {
        let tap = self.0.clone();
        let fd = lock(&tap).raw_fd();
        std::thread::Builder::new()
            .name("uplink".into())
            .spawn(move || {
                let mut buf = vec![0u8; crate::chain::MAX_TX_LEN];
                loop {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd that lives across the call; the
                    // tap's descriptor stays open as long as this thread
                    // holds the tap.
                    let ready = unsafe { libc::poll(&mut pfd, 1, -1) };
                    if ready < 0 {
                        continue;
                    }
                    loop {
                        let n = match lock(&tap).recv(&mut buf) {
                            Ok(n) => n,
                            Err(_) => break,
                        };
                        if n > NET_HDR_LEN {
                            lock(&switch).receive(id, &buf[NET_HDR_LEN..n]);
                        }
                    }
                }
            })?;
        Ok(())
    }
}

impl PortTx for Uplink {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), TxDropped> {
        self.transmit_offloaded(&Offload::NONE, frame)
    }

    /// The host's stack completes checksums and segments what a guest
    /// left to it: the tap takes the request in its virtio_net_hdr.
    fn transmit_offloaded(&mut self, offload: &Offload, frame: &[u8]) -> Result<(), TxDropped> {
        let mut hdr = offload.0;
        hdr[10..12].fill(0);
        let parts = [IoSlice::new(&hdr), IoSlice::new(frame)];
        match lock(&self.0).send(&parts) {
            Ok(n) if n == hdr.len() + frame.len() => Ok(()),
            _ => Err(TxDropped),
        }
    }
}
