//! toe-host: emulated TOE hosts and the ways to run them. What a protocol crate or an
//! experiment links: no command line, plotting or device code.
//!
//! - [`runtime`]: [`runtime::Host`] (NIC + bus + driver), the single-threaded virtual-clock
//!   [`runtime::Sim`] and the real-time [`runtime::Threaded`] runner.
//! - [`config`]: layered host settings (defaults, TOML file, environment, command line).
//! - [`pair`]: two hosts on an in-memory wire with one connection between them.
//! - [`wire_opts`]: wire options (impairment, pcap capture) and how they wrap ports.
//! - [`trace`]: JSON-lines sinks for the drivers' bus traces.

pub mod config;
pub mod pair;
pub mod runtime;
pub mod trace;
pub mod wire_opts;
