//! toe-bus: the emulated PCI bus between a toemu host driver and its simulated NIC.
//!
//! - [`cost`]: the cost model of the emulated machine in virtual time (NIC and host CPU
//!   timelines).
//! - [`mem`]: host memory (one memmap2 region), buffer tokens ([`HostBuf`]) and the counted
//!   DMA engine ([`Dma`]).
//! - [`ring`]: the command (host -> NIC) and event (NIC -> host) rings and their messages.
//! - [`trace`]: describing bus traffic to a trace sink.
//! - [`time`]: the time types every toemu state machine takes as an argument. They are
//!   smoltcp's, so the NIC's stack, the offload contexts and the driver share one clock.
//!
//! This is the only crate of toemu with `unsafe` code: the two slice accessors of
//! [`HostMemory`], each with its SAFETY argument.

pub mod cost;
pub mod mem;
pub mod ring;
pub mod trace;

/// Time as every toemu state machine sees it: microsecond `Instant`s from an arbitrary origin
/// (virtual or real), supplied by the caller.
pub mod time {
    pub use smoltcp::time::{Duration, Instant};
}

pub use mem::{CopySnapshot, CopyStats, Dma, HostBuf, HostMemory, MemError};
pub use ring::{
    buffer_share, bus, bus_with_latency, AckHold, Command, ConnId, Event, HostEnd, NicEnd,
    OffloadParams, ReturnReason, RxPolicy,
};
