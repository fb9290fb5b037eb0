//! toemu's message-based bulk transport (seeds 002 and 003), pure layers: the frame wire
//! format ([`frame`]), the session machine ([`session`]) the pipe that multiplexes
//! sessions over many connections ([`pipe`]) and pacing from a delivery-rate estimate
//! ([`pace`]), the DSCP marks of service-level objectives ([`slo`]) and the bulk-transfer planner of primed connections, reserves and sub-transfers ([`bulk`]). TLS, the shells on the emulated TOE and std
//! TCP, and bulk transfer build on these.
//!
//! Nothing here owns a socket, a thread or a clock: bytes and frames go in and out through
//! calls, and time (µs of the caller's clock, virtual or real) is an argument.

pub mod bulk;
pub mod frame;
pub mod pace;
pub mod pipe;
pub mod session;
pub mod slo;
pub mod tls;

pub use bulk::{BulkConfig, BulkStats, Planner, Role};
pub use frame::{decode, Frame, FrameError, RefuseReason, Window};
pub use pace::{DeliveryRate, Pacer, Pacing, PacingConfig, Phase};
pub use pipe::{hello, parse_hello, ConnId, Pipe, PipeConfig, PipeEvent, HELLO_LEN};
pub use session::{Config, Event, MsgId, SendError, Session, SessionError, State};
pub use slo::{Slo, UnknownSlo};
pub use tls::{Identity, TestCa, Tls, TlsError};
