//! toemu-lab: the experiments and baselines of toemu, above the host library and the example
//! apps.
//!
//! - [`demo`]: the `toemu demo` experiment (bulk transfers and request/response per policy).
//! - [`mod@bench`]: `toemu bench` (every mode against bare smoltcp and kernel loopback TCP).
//! - [`sweep`] and [`plot`]: metrics against W, SVG charts, the P/I timeline.
//! - [`bare`], [`bare_tap`]: the bare-smoltcp baselines (in-memory wire, TAP).
//! - [`iscsi`]: the iSCSI target on std TCP (the shell around `toe-iscsi`).
//! - [`kernel`]: the kernel-TCP loopback baselines (one stream, request/response, scale).
//! - [`msg`], [`msg_toe`]: the message transport's shells (std TCP; the emulated TOE).
//! - [`serve`]: running the example apps on an emulated host (TAP in real time, or two hosts
//!   on the virtual clock).
//! - [`stats`]: latency percentiles, computed in one place for every figure.
//! - [`datagen`]: deterministic payload and its digests (the example apps' generator).

pub mod bare;
pub mod bare_tap;
pub mod bench;
pub mod bulk_bench;
pub mod cluster;
pub mod cluster_bench;
pub mod demo;
pub mod iscsi;
pub mod iscsi_host;
pub mod iscsi_perf;
pub mod kernel;
pub mod msg;
pub mod msg_toe;
pub mod plot;
pub mod report;
pub mod serve;
pub mod stats;
pub mod sweep;
pub mod wan;
pub use toemu_apps::datagen;
