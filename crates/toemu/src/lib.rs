//! toemu: wires emulated TOE hosts together (NIC + bus + driver), on one thread with a
//! virtual clock or threaded in real time, and hosts the `toemu` command line.
//!
//! - [`config`]: layered host settings (defaults, TOML file, environment, command line).
//! - [`runtime`]: [`runtime::Host`], the single-threaded virtual-clock [`runtime::Sim`] and the
//!   real-time [`runtime::Threaded`] runner.
//! - [`bare`]: the bare-smoltcp baseline on the same wire.
//! - [`demo`]: the `toemu demo` experiment (bulk transfers and request/response per policy).
//! - [`datagen`]: deterministic payload and its SHA-256.
//! - [`tap`]: the TAP backend; [`serve`]: running the example apps on a host.
//! - [`wire_opts`]: wire options (impairment, pcap capture) and how they wrap ports.

pub mod bare;
pub mod bare_tap;
pub mod bench;
pub mod config;
pub use toemu_apps::datagen;
pub mod demo;
pub mod plot;
pub mod runtime;
pub mod serve;
pub mod sweep;
pub mod tap;
pub mod trace;
pub mod wire_opts;
