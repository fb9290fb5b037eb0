//! toe-nic: the simulated TCP offload engine NIC of toemu.
//!
//! - [`offload`]: the pure per-connection TOE module (indicate window, named buffers, PSH).
//! - [`nic`]: the NIC shell: smoltcp interface and sockets, DMA into host memory, bus I/O.
//! - [`phy`]: frame ports (the in-memory [`phy::wire`]), and the receive tap that validates
//!   frames and records PSH boundaries, ISNs and advertised windows per flow.

pub mod nic;
pub mod offload;
pub mod phy;

pub use nic::{Nic, NicConfig, NicStats};
pub use offload::{OffloadCtx, OffloadStats, Plan};
pub use phy::{wire, Frame, NicDevice, Phy, PhyStats, WirePort};
