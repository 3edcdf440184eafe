//! How device threads start. By default each is a plain named thread; the
//! VMM may install a spawner instead (once per process), so that device
//! threads start where and how it wants, e.g. under their own seccomp
//! filter.

use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// Starts a thread named by the first argument running the second.
pub type Spawner =
    dyn Fn(&'static str, Box<dyn FnOnce() + Send>) -> io::Result<JoinHandle<()>> + Send + Sync;

static SPAWNER: OnceLock<Box<Spawner>> = OnceLock::new();

/// Makes `spawner` start every later device thread. Returns false (and
/// changes nothing) when one is already installed.
pub fn set_spawner(spawner: Box<Spawner>) -> bool {
    SPAWNER.set(spawner).is_ok()
}

/// Starts a device thread named `name` running `f`.
pub fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    match SPAWNER.get() {
        Some(spawner) => spawner(name, Box::new(f)),
        None => std::thread::Builder::new().name(name.to_string()).spawn(f),
    }
}
