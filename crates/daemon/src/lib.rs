//! The Ferrovisor control daemon: it runs each guest in its own VMM process
//! (`ferrovisor run --config ... --runtime-dir ...`), supervises and records
//! those processes under a state directory, re-adopts them after a restart,
//! and serves the HTTP/JSON management API on a unix socket.
//!
//! - [`http`]: the minimal HTTP/1.1 codec;
//! - [`server`]: the listener and the streamed routes (events, console);
//! - [`api`]: routing and the mapping of errors to status codes;
//! - [`daemon`]: the registry of guests and the state directory;
//! - [`guest`]: one guest's lifecycle and its process watcher;
//! - [`process`]: process identity, spawning, the VMM's control socket;
//! - [`region`]: shared regions the daemon owns, handed to member VMMs as descriptors;
//! - [`switch`]: the switch processes the daemon runs, and guests' ports on them;
//! - [`vsock_route`]: guest-to-guest vsock connections, as the policy allows;
//! - [`events`]: the lifecycle event bus;
//! - [`client`]: the API client used by the CLI;
//! - [`description`]: checking guest descriptions;
//! - [`limits`]: changing a running guest's disk and NIC rate limits;
//! - [`pools`]: CPU pools the daemon knows, for moving a running guest into one;
//! - [`sched`]: guest cgroups, real-time admission, policy changes;
//! - [`files`]: private (0700/0600), durable state files;
//! - [`images`]: image roots, taps and sockets a guest may use;
//! - [`access`]: API peer checks, per-uid connection limits, the audit log.
//! - [`jail`]: the jail every guest's VMM runs in: uids, cgroups, flags.

pub mod access;
pub mod api;
pub mod client;
pub mod daemon;
pub mod description;
pub mod events;
pub mod files;
pub mod fuzz_entry;
pub mod guest;
pub mod http;
pub mod images;
pub mod jail;
pub mod limits;
pub mod pools;
pub mod process;
pub mod region;
pub mod sched;
pub mod server;
pub mod switch;
pub mod vsock_route;

pub use client::{Client, ClientError};
pub use server::{serve, Options, ServeError, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
