//! toe-driver: the host TOE driver of toemu.
//!
//! - [`conn`]: the pure per-connection receive state machine (indicatedBytes, anonymous and
//!   named buffer queues, push timer, acknowledgements).

pub mod conn;

pub use conn::{AckPolicy, ConnRx, ConnRxStats, NamedCompletion, NamedId, Note, Outputs, RxConfig};
