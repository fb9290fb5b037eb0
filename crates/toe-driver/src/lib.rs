//! toe-driver: the host TOE driver of toemu.
//!
//! - [`conn`]: the pure per-connection receive state machine (indicatedBytes, anonymous and
//!   named buffer queues, push timer, acknowledgements).
//! - [`driver`]: the driver of one host: anonymous pool, connections, bus I/O, the calls an
//!   application or experiment makes.
//! - [`stream`]: blocking handles (`std::io::Read`/`Write`, blocking named receives) that run
//!   on a virtual clock or in real time through a [`stream::Waiter`].

pub mod conn;
pub mod driver;
pub mod stream;

pub use conn::{AckPolicy, ConnRx, ConnRxStats, NamedCompletion, NamedId, Note, Outputs, RxConfig};
pub use driver::{
    AppEvent, ConnInfo, ConnState, Driver, DriverConfig, DriverError, DriverStats, Refused,
    UlpNote, MAX_HOST_ERRORS,
};
pub use stream::{SharedDriver, Stream, Waiter};
