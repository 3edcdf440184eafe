//! The device launcher: the one filtered thread allowed to start threads.
//!
//! The guest activates a virtio device from a vCPU thread, and the device
//! then starts its worker. A thread started by a vCPU thread would inherit
//! the vCPU filter, which would then have to allow everything a worker
//! does. Instead, every device thread is started here, from a thread whose
//! filter is the workers' list plus thread creation; each new thread then
//! installs the worker filter as its first act. The asking thread waits for
//! the handle, as it waited for the thread before.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::{enter, ThreadKind};

/// A thread to start, and where its handle goes.
type Job = (
    &'static str,
    Box<dyn FnOnce() + Send>,
    mpsc::SyncSender<io::Result<JoinHandle<()>>>,
);

/// Starts the launcher and makes it the spawner of every device thread.
/// Its threads, like the vCPUs', never take the stop signals.
pub fn start() -> io::Result<()> {
    let (jobs, queue) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("device-launcher".into())
        .spawn(move || {
            crate::vm::block_stop_signals();
            enter(ThreadKind::Launcher);
            for (name, f, reply) in queue {
                let spawned = std::thread::Builder::new()
                    .name(name.to_string())
                    .spawn(move || {
                        enter(ThreadKind::Worker);
                        f();
                    });
                let _ = reply.send(spawned);
            }
        })?;
    let jobs: Mutex<Sender<Job>> = Mutex::new(jobs);
    virtio::thread::set_spawner(Box::new(move |name, f| {
        let gone = || io::Error::other("the device launcher thread has ended");
        let (reply, handle) = mpsc::sync_channel(1);
        jobs.lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((name, f, reply))
            .map_err(|_| gone())?;
        handle.recv().map_err(|_| gone())?
    }));
    Ok(())
}
