//! Socket apps on an emulated TOE host, written against the driver's public API
//! ([`toe_driver::Driver`]): `echo`, `http`, `sink` servers and `send`, `get` clients.
//!
//! Every app is a poll-style state machine ([`App`]): the runtime polls the driver, then calls
//! [`App::poll`] with the driver locked and the current time; the app accepts connections,
//! moves data and answers, never blocking. So the same app runs on the virtual clock (tests) and
//! in real time on a TAP device (`toemu serve`).
//!
//! Receive side: each app takes a [`RxMode`]: accept indicated data in place, or keep named
//! buffers posted (optionally in push mode). The receive policy and W come from the driver's
//! configuration (`toemu --indicate-window ... --set policy=...`).

pub mod datagen;
pub mod echo;
pub mod http;
pub mod io;
pub mod sink;

use toe_bus::time::Instant;
use toe_driver::Driver;

pub use io::{ConnIo, RxMode};

/// A poll-style application.
pub trait App: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Accept connections and move data. Called with the driver just polled. Returns true if
    /// the app did anything (so the runtime polls again before sleeping).
    fn poll(&mut self, d: &mut Driver, now: Instant) -> std::io::Result<bool>;
    /// Lines to report since the last call (per-connection results, errors).
    fn take_log(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// A client app that finished its job (a server, once it has wound down after
    /// [`App::stop`]).
    fn done(&self) -> bool {
        false
    }
    /// Asked to stop (SIGINT, SIGTERM): true if the app winds down first (tells its peers
    /// to leave and waits for them, up to the runtime's grace period) and reports
    /// [`App::done`] when it has; false (the default) to be stopped at once.
    fn stop(&mut self) -> bool {
        false
    }
    /// The latest time the app must be polled again even if nothing arrives (a timer of
    /// its own), on the host's clock; `None` (the default) if only input makes work. A
    /// virtual-clock runtime does not jump past it.
    fn poll_at(&self) -> Option<Instant> {
        None
    }
}
