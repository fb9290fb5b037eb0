//! toe-nic: the simulated TCP offload engine NIC of toemu.
//!
//! - [`offload`]: the pure per-connection TOE module (indicate window, named buffers, PSH).
//! - [`nic`]: the NIC shell: smoltcp interface and sockets, DMA into host memory, bus I/O.
//! - [`phy`]: frame ports (the in-memory [`phy::wire`]), and the receive tap that validates
//!   frames and records PSH boundaries, ISNs and advertised windows per flow.
//! - [`impair`]: phy middleware that impairs a port (delay, rate limit with a bounded queue,
//!   loss, reordering, duplication, corruption), seeded and reproducible.
//! - [`pcap`]: phy middleware that records a port's frames in a libpcap file.
//! - [`ulp`]: the upper-layer engine slot of an offload context (the interface protocol
//!   crates implement, and the pure per-connection state the NIC keeps for it).

pub mod impair;
pub mod nic;
pub mod offload;
pub mod pcap;
pub mod phy;
mod shape;
mod sockets;
pub mod ulp;

pub use impair::{ImpairConfig, ImpairError, ImpairMonitor, ImpairStats, Impaired};
pub use nic::{Congestion, Nic, NicConfig, NicStats};
pub use offload::{OffloadCtx, OffloadStats, Plan};
pub use pcap::{Pcap, PcapWriter, SharedPcap};
pub use phy::{
    switch, wire, Frame, Ingress, NicDevice, Phy, PhyStats, SwitchControl, SwitchPort, WirePort,
};
pub use ulp::{TagMemory, UlpConn, UlpEngine, UlpFactory, UlpStats};
