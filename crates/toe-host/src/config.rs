//! Layered settings of one emulated TOE host.
//!
//! Sources, lowest to highest precedence (DESIGN.md, "Receive path"):
//!
//! 1. built-in defaults ([`Settings::default`]);
//! 2. a TOML file ([`Settings::apply_toml_file`] / [`Settings::apply_toml_str`]): keys are the
//!    field names of [`Settings`] exactly, either at the top level or in a `[host]` table
//!    (the `[host]` table is applied after the top level); unknown keys are refused;
//! 3. environment variables ([`Settings::apply_env`]): `TOEMU_INDICATE_WINDOW`, `TOEMU_POLICY`,
//!    ... (see [`Setting::env_var`]); other variables, including other `TOEMU_*` ones, are
//!    ignored;
//! 4. explicit overrides from the command line ([`Settings::apply_override`]).
//!
//! [`Settings::load`] applies all four and then [`Settings::validate`]s the result. Every
//! setting remembers which layer set it last ([`Settings::origin`]), so an error names the
//! setting, where its value came from, the value and the limit it broke, e.g.
//! `indicate_window_bytes = 0 (from TOEMU_INDICATE_WINDOW): must be between 1 and 1073741824 (1 GiB)`.
//!
//! Byte sizes are written as plain integers or with a unit suffix, see [`parse_size`]; in TOML
//! they may be integers or strings.

use std::fmt;
use std::path::{Path, PathBuf};

use toe_bus::cost::{HostCost, NicCost};
use toe_bus::time::Duration;
use toe_bus::RxPolicy;
use toe_driver::{AckPolicy, RxConfig};
use toe_nic::Congestion;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Largest indicate window W accepted by [`Settings::validate`]: 1 GiB.
pub const MAX_INDICATE_WINDOW_BYTES: u64 = GIB;
/// Smallest anonymous buffer accepted by [`Settings::validate`], in bytes.
pub const MIN_ANON_BUF_BYTES: u32 = 256;
/// Largest anonymous buffer accepted by [`Settings::validate`]: 1 MiB.
pub const MAX_ANON_BUF_BYTES: u32 = MIB as u32;
/// Largest connection limit accepted by [`Settings::validate`].
pub const MAX_CONNS: u32 = 100_000;
/// Smallest ring depth (entries per ring) accepted by [`Settings::validate`].
pub const MIN_RING_DEPTH: u32 = 16;
/// Smallest MTU accepted by [`Settings::validate`], in bytes (the IPv4 minimum datagram).
pub const MIN_MTU: u32 = 576;
/// Largest MTU accepted by [`Settings::validate`], in bytes.
pub const MAX_MTU: u32 = 65_000;
/// Largest bandwidth of the cost model, in MB/s.
pub const MAX_COST_MB_PER_S: u64 = 10_000_000;
/// Largest per-operation cost of the cost model, in nanoseconds (1 s).
pub const MAX_COST_NS: u64 = 1_000_000_000;

/// The wire rate of the cost model's default machine, in Mbit/s (25 Gbit/s Ethernet). The
/// machine: a 25 Gbit/s TOE NIC on PCIe Gen3 x8 in a server whose core copies memory at
/// 10 GB/s; its other costs are the defaults of the cost settings of [`Settings`].
pub const DEFAULT_WIRE_RATE_MBIT: u64 = 25_000;

/// Parses a byte size: a non-negative integer, optionally followed (with or without spaces)
/// by a unit.
///
/// Units are case-insensitive. Binary units: `K`, `KiB` = 1024; `M`, `MiB` = 1024²;
/// `G`, `GiB` = 1024³. Decimal units: `KB` = 1000, `MB` = 1000², `GB` = 1000³. `B` (or no
/// unit) means bytes. Fractions are not accepted. Examples: `"1500"` = 1500, `"64KiB"` =
/// 65536, `"64k"` = 65536, `"64KB"` = 64000, `"4 MiB"` = 4194304.
///
/// # Errors
/// A message naming the problem (empty, not a number, unknown unit, larger than `u64::MAX`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".to_string());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{t:?} is not a size (expected a whole number of bytes, e.g. 1500, 64KiB, 4MiB)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{digits} is too large (at most {})", u64::MAX))?;
    let multiplier = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "kb" => 1000,
        "m" | "mib" => MIB,
        "mb" => 1000 * 1000,
        "g" | "gib" => GIB,
        "gb" => 1000 * 1000 * 1000,
        _ => {
            return Err(format!(
                "unknown unit {:?} in {t:?} (expected K, KiB, KB, M, MiB, MB, G, GiB or GB)",
                unit.trim_start()
            ))
        }
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("{t:?} is too large (at most {} bytes)", u64::MAX))
}

/// One settable field of [`Settings`] (everything except the derived anonymous pool size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Setting {
    /// [`Settings::indicate_window_bytes`].
    IndicateWindowBytes,
    /// [`Settings::policy`].
    Policy,
    /// [`Settings::ack`].
    Ack,
    /// [`Settings::push_timeout_ms`].
    PushTimeoutMs,
    /// [`Settings::anon_buf_bytes`].
    AnonBufBytes,
    /// [`Settings::max_conns`].
    MaxConns,
    /// [`Settings::copy_cap_bytes`].
    CopyCapBytes,
    /// [`Settings::ring_depth`].
    RingDepth,
    /// [`Settings::mtu`].
    Mtu,
    /// [`Settings::socket_buf_bytes`].
    SocketBufBytes,
    /// [`Settings::bus_latency_us`].
    BusLatencyUs,
    /// [`Settings::dma_mb_per_s`].
    DmaMbPerS,
    /// [`Settings::host_copy_mb_per_s`].
    HostCopyMbPerS,
    /// [`Settings::host_event_ns`].
    HostEventNs,
    /// [`Settings::host_command_ns`].
    HostCommandNs,
    /// [`Settings::nic_segment_ns`].
    NicSegmentNs,
    /// [`Settings::host_crc_mb_per_s`].
    HostCrcMbPerS,
    /// [`Settings::keepalive_ms`].
    KeepaliveMs,
    /// [`Settings::idle_timeout_ms`].
    IdleTimeoutMs,
    /// [`Settings::syn_timeout_ms`].
    SynTimeoutMs,
    /// [`Settings::congestion`].
    Congestion,
}

impl Setting {
    /// Every setting, in the order of the [`Settings`] fields.
    pub const ALL: [Setting; 21] = [
        Setting::IndicateWindowBytes,
        Setting::Policy,
        Setting::Ack,
        Setting::PushTimeoutMs,
        Setting::AnonBufBytes,
        Setting::MaxConns,
        Setting::CopyCapBytes,
        Setting::RingDepth,
        Setting::Mtu,
        Setting::SocketBufBytes,
        Setting::BusLatencyUs,
        Setting::DmaMbPerS,
        Setting::HostCopyMbPerS,
        Setting::HostEventNs,
        Setting::HostCommandNs,
        Setting::NicSegmentNs,
        Setting::HostCrcMbPerS,
        Setting::KeepaliveMs,
        Setting::IdleTimeoutMs,
        Setting::SynTimeoutMs,
        Setting::Congestion,
    ];

    /// The field name: the TOML key and the override key.
    pub fn name(self) -> &'static str {
        match self {
            Setting::IndicateWindowBytes => "indicate_window_bytes",
            Setting::Policy => "policy",
            Setting::Ack => "ack",
            Setting::PushTimeoutMs => "push_timeout_ms",
            Setting::AnonBufBytes => "anon_buf_bytes",
            Setting::MaxConns => "max_conns",
            Setting::CopyCapBytes => "copy_cap_bytes",
            Setting::RingDepth => "ring_depth",
            Setting::Mtu => "mtu",
            Setting::SocketBufBytes => "socket_buf_bytes",
            Setting::BusLatencyUs => "bus_latency_us",
            Setting::DmaMbPerS => "dma_mb_per_s",
            Setting::HostCopyMbPerS => "host_copy_mb_per_s",
            Setting::HostEventNs => "host_event_ns",
            Setting::HostCommandNs => "host_command_ns",
            Setting::NicSegmentNs => "nic_segment_ns",
            Setting::HostCrcMbPerS => "host_crc_mb_per_s",
            Setting::KeepaliveMs => "keepalive_ms",
            Setting::IdleTimeoutMs => "idle_timeout_ms",
            Setting::SynTimeoutMs => "syn_timeout_ms",
            Setting::Congestion => "congestion",
        }
    }

    /// The environment variable that sets it.
    pub fn env_var(self) -> &'static str {
        match self {
            Setting::IndicateWindowBytes => "TOEMU_INDICATE_WINDOW",
            Setting::Policy => "TOEMU_POLICY",
            Setting::Ack => "TOEMU_ACK",
            Setting::PushTimeoutMs => "TOEMU_PUSH_TIMEOUT_MS",
            Setting::AnonBufBytes => "TOEMU_ANON_BUF",
            Setting::MaxConns => "TOEMU_MAX_CONNS",
            Setting::CopyCapBytes => "TOEMU_COPY_CAP",
            Setting::RingDepth => "TOEMU_RING_DEPTH",
            Setting::Mtu => "TOEMU_MTU",
            Setting::SocketBufBytes => "TOEMU_SOCKET_BUF",
            Setting::BusLatencyUs => "TOEMU_BUS_LATENCY_US",
            Setting::DmaMbPerS => "TOEMU_DMA_MB_PER_S",
            Setting::HostCopyMbPerS => "TOEMU_HOST_COPY_MB_PER_S",
            Setting::HostEventNs => "TOEMU_HOST_EVENT_NS",
            Setting::HostCommandNs => "TOEMU_HOST_COMMAND_NS",
            Setting::NicSegmentNs => "TOEMU_NIC_SEGMENT_NS",
            Setting::HostCrcMbPerS => "TOEMU_HOST_CRC_MB_PER_S",
            Setting::KeepaliveMs => "TOEMU_KEEPALIVE_MS",
            Setting::IdleTimeoutMs => "TOEMU_IDLE_TIMEOUT_MS",
            Setting::SynTimeoutMs => "TOEMU_SYN_TIMEOUT_MS",
            Setting::Congestion => "TOEMU_CONGESTION",
        }
    }

    /// The setting whose field name is `name` (exactly, as in TOML).
    pub fn from_name(name: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a setting's current value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A TOML file (its path, or the origin label given to [`Settings::apply_toml_str`]).
    File(String),
    /// An environment variable (its name).
    Env(&'static str),
    /// An explicit override ([`Settings::apply_override`]), i.e. the command line.
    CommandLine,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => f.write_str(path),
            Origin::Env(var) => f.write_str(var),
            Origin::CommandLine => f.write_str("command line"),
        }
    }
}

fn known_keys() -> String {
    Setting::ALL.map(Setting::name).join(", ")
}

/// Why settings were refused. Every variant names the setting (or key) and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be read as the setting's type (not a number, unknown name, too large
    /// for the field, wrong TOML type).
    #[error("{setting} = {value} (from {origin}): {reason}")]
    Parse {
        /// The setting's field name.
        setting: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// The value as given (strings quoted).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value was read but breaks a limit checked by [`Settings::validate`].
    #[error("{setting} = {value} (from {origin}): must be {limit}")]
    Invalid {
        /// The setting's field name.
        setting: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// The offending value.
        value: String,
        /// The limit it breaks, e.g. `between 1 and 1073741824 (1 GiB)`.
        limit: String,
    },
    /// A TOML key or override key that is not a setting.
    #[error(
        "unknown setting `{key}` (from {origin}); known settings: {}",
        known_keys()
    )]
    UnknownKey {
        /// The key as written (`host.` prefixed when inside the `[host]` table).
        key: String,
        /// Where it was found.
        origin: Origin,
    },
    /// The TOML text itself is malformed.
    #[error("{origin}: invalid TOML: {reason}")]
    Syntax {
        /// The file (or origin label).
        origin: Origin,
        /// The TOML parser's message.
        reason: String,
    },
    /// The settings file could not be read.
    #[error("cannot read settings file {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        error: std::io::Error,
    },
}

/// Provenance of each setting. Not part of [`Settings`] equality: two settings with the same
/// values are equal wherever the values came from.
#[derive(Debug, Clone)]
struct Provenance {
    origins: [Origin; Setting::ALL.len()],
    /// `ack` is `keep-open` without an explicit size, so its `min_bytes` follows W (W/4).
    ack_follows_window: bool,
}

impl PartialEq for Provenance {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Default for Provenance {
    fn default() -> Self {
        Provenance {
            origins: std::array::from_fn(|_| Origin::Default),
            ack_follows_window: true,
        }
    }
}

/// A value as written in one source, before conversion to the field's type.
#[derive(Debug, Clone, Copy)]
enum Raw<'a> {
    Text(&'a str),
    Int(i64),
    /// Any other TOML value: its type name.
    Other(&'static str, &'a toml::Value),
}

impl Raw<'_> {
    fn shown(&self) -> String {
        match self {
            Raw::Text(s) => format!("{s:?}"),
            Raw::Int(i) => i.to_string(),
            Raw::Other(_, v) => v.to_string(),
        }
    }

    fn size(&self) -> Result<u64, String> {
        match *self {
            Raw::Text(s) => parse_size(s),
            Raw::Int(i) => u64::try_from(i).map_err(|_| "must not be negative".to_string()),
            Raw::Other(ty, _) => Err(format!("expected a size (integer or string), found {ty}")),
        }
    }

    fn count(&self) -> Result<u64, String> {
        match *self {
            Raw::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| "expected a non-negative whole number".to_string()),
            Raw::Int(i) => u64::try_from(i).map_err(|_| "must not be negative".to_string()),
            Raw::Other(ty, _) => Err(format!("expected an integer, found {ty}")),
        }
    }

    /// A count, or `None` for the text `off`.
    fn count_or_off(&self) -> Result<Option<u64>, String> {
        match *self {
            Raw::Text(s) if s.trim() == "off" => Ok(None),
            Raw::Text(_) | Raw::Int(_) => self.count().map(Some).map_err(|e| format!("{e} or off")),
            Raw::Other(ty, _) => Err(format!("expected an integer or \"off\", found {ty}")),
        }
    }

    fn text(&self) -> Result<&str, String> {
        match *self {
            Raw::Text(s) => Ok(s.trim()),
            Raw::Int(_) => Err("expected a string, found integer".to_string()),
            Raw::Other(ty, _) => Err(format!("expected a string, found {ty}")),
        }
    }
}

fn narrow(v: u64) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("too large (at most {})", u32::MAX))
}

/// Parses the config form of an acknowledgement policy: `window-full`, `keep-open` (batch
/// W/4, returned as `None`) or `keep-open:SIZE` (SIZE as in [`parse_size`]).
fn parse_ack(s: &str) -> Result<Option<AckPolicy>, String> {
    match s {
        "window-full" => Ok(Some(AckPolicy::WindowFull)),
        "keep-open" => Ok(None),
        _ => match s.strip_prefix("keep-open:") {
            Some(size) => {
                let min_bytes = narrow(parse_size(size)?)?;
                Ok(Some(AckPolicy::KeepOpen { min_bytes }))
            }
            None => Err(format!(
                "unknown acknowledgement policy {s:?} (expected window-full, keep-open or keep-open:SIZE)"
            )),
        },
    }
}

/// The keep-open batch used when `ack` is plain `keep-open`: W/4 bytes, at least 1.
fn keep_open_default(window: u32) -> AckPolicy {
    AckPolicy::KeepOpen {
        min_bytes: (window / 4).max(1),
    }
}

/// The settings of one emulated TOE host. Build with [`Settings::load`] (or
/// [`Settings::default`] plus the `apply_*` methods, then [`Settings::validate`]).
///
/// Fields may be assigned directly (in tests, say); such assignments keep the recorded
/// [`Origin`] of the field, and a plain `keep-open` `ack` only follows W when W is set through
/// an `apply_*` method. Equality compares values only, not their origins.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Indicate window W, in bytes, per connection: the most received data the NIC indicates
    /// into anonymous buffers before waiting for an acknowledgement. Default 256 KiB; valid
    /// range 1 ..= min(1 GiB, [`Settings::anon_pool_bytes`]).
    pub indicate_window_bytes: u32,
    /// Receive policy of offloaded connections. Default `indicate-window`.
    pub policy: RxPolicy,
    /// When the driver acknowledges indicated data. Config forms: `window-full`, `keep-open`
    /// (batch of W/4 bytes, following W) or `keep-open:SIZE`. Default `keep-open` (W/4 =
    /// 64 KiB). A keep-open batch must be within 1 ..= W bytes.
    pub ack: AckPolicy,
    /// Push timer period, in milliseconds (>= 1). Default 500.
    pub push_timeout_ms: u64,
    /// Size of one anonymous receive buffer, in bytes (256 ..= 1 MiB). Default 16 KiB.
    pub anon_buf_bytes: u32,
    /// Most offloaded connections the host holds at once (1 ..= 100 000). Default 64.
    pub max_conns: u32,
    /// `unbounded-copy` only: cap of the driver's own socket buffer per connection, in bytes
    /// (>= 1). Default 64 MiB.
    pub copy_cap_bytes: u64,
    /// Entries in each of the command and event rings (>= 16). Default 1024.
    pub ring_depth: u32,
    /// Link MTU, in bytes (576 ..= 65 000). Default 9000.
    pub mtu: u32,
    /// Send and receive buffer of the NIC's TCP sockets, in bytes each (>= 2 × mtu).
    /// Default 512 KiB.
    pub socket_buf_bytes: u32,
    /// Cost model of the emulated PCI bus: every command and event takes this long to cross,
    /// in microseconds (0 ..= 1 000 000). Default 1 (PCIe Gen3: about 1 µs one way for a
    /// posted write plus the doorbell). On the virtual clock it shows up in latencies measured
    /// in virtual time, not in wall time.
    pub bus_latency_us: u64,
    /// Cost model: DMA bandwidth between NIC and host memory, in MB/s (10^6 bytes per
    /// second; 0 = free, at most 10 000 000). Default 7 000 (PCIe Gen3 x8: 7.88 GB/s raw,
    /// less TLP headers). Received payload written and sent payload read share it.
    pub dma_mb_per_s: u64,
    /// Cost model: host memory copy bandwidth of one core, in MB/s (0 = free, at most
    /// 10 000 000). Default 10 000. Charged for every copy the driver makes and every copy
    /// between host memory and application memory through the driver.
    pub host_copy_mb_per_s: u64,
    /// Cost model: host CPU time to handle one bus event (interrupt share, completion), in
    /// nanoseconds (at most 1 000 000 000). Default 250.
    pub host_event_ns: u64,
    /// Cost model: host CPU time to issue one bus command (descriptor, doorbell share), in
    /// nanoseconds (at most 1 000 000 000). Default 250.
    pub host_command_ns: u64,
    /// Cost model: NIC processing time per frame received or sent, in nanoseconds (at most
    /// 1 000 000 000). Default 100 (a 25 Gbit/s NIC must handle a 1500-byte frame in 480 ns).
    pub nic_segment_ns: u64,
    /// Cost model: CRC32C bandwidth of host software (iSCSI digests the host computes), in
    /// MB/s (0 = free, at most 10 000 000). Default 8 000 (SSE4.2 `crc32` on one core).
    pub host_crc_mb_per_s: u64,
    /// Keep-alive interval of open connections, in milliseconds (>= 1), or `None` (config
    /// form `off`): an idle connection probes its peer this often. Default 60 000.
    pub keepalive_ms: Option<u64>,
    /// Dead-peer timeout, in milliseconds (>= 1), or `None` (`off`): an open connection whose
    /// peer sends nothing for this long while an answer is due (unacknowledged data or a
    /// keep-alive probe) is reset and its buffers return to the pools. With keep-alive on, a
    /// vanished peer is detected within `keepalive_ms + idle_timeout_ms`. Default 180 000.
    pub idle_timeout_ms: Option<u64>,
    /// Handshake timeout, in milliseconds (>= 1), or `None` (`off`): a half-open connection
    /// (SYN-RECEIVED, e.g. from a spoofed SYN) or an active open without answer is abandoned
    /// after this long. Default 30 000: with smoltcp's doubling handshake RTO (1 s, 2 s, 4 s,
    /// 8 s) that leaves room for four retransmissions of a SYN or SYN-ACK, so a lossy wire
    /// does not end handshakes that Linux would complete (its SYN-ACK is retried five times).
    /// The long wait costs no memory under a SYN flood: half-open sockets are recycled when
    /// the backlog is full.
    pub syn_timeout_ms: Option<u64>,
    /// The congestion control of the emulated hosts' TCP senders: `none`, `reno` or
    /// `cubic`. Default `none`: the emulator's wires are lossless and unshared unless an
    /// impairment says otherwise, where a controller only slows the sender down (and every
    /// figure measured so far was measured without one); over lossy or rate-limited wires
    /// (WANs, a shared bottleneck) `cubic` is the one to use, as Linux does.
    pub congestion: Congestion,
    provenance: Provenance,
}

impl Default for Settings {
    /// The built-in defaults (all origins [`Origin::Default`]).
    fn default() -> Self {
        let indicate_window_bytes = 256 * KIB as u32;
        Settings {
            indicate_window_bytes,
            policy: RxPolicy::IndicateWindow,
            ack: keep_open_default(indicate_window_bytes),
            push_timeout_ms: 500,
            anon_buf_bytes: 16 * KIB as u32,
            max_conns: 64,
            copy_cap_bytes: 64 * MIB,
            ring_depth: 1024,
            mtu: 9000,
            socket_buf_bytes: 512 * KIB as u32,
            bus_latency_us: 1,
            dma_mb_per_s: 7_000,
            host_copy_mb_per_s: 10_000,
            host_event_ns: 250,
            host_command_ns: 250,
            nic_segment_ns: 100,
            host_crc_mb_per_s: 8_000,
            keepalive_ms: Some(60_000),
            idle_timeout_ms: Some(180_000),
            syn_timeout_ms: Some(30_000),
            congestion: Congestion::None,
            provenance: Provenance::default(),
        }
    }
}

impl Settings {
    /// Defaults, then the TOML file `file` (if any), then the `TOEMU_*` variables among `env`
    /// (pass `std::env::vars()`), then the command-line `overrides` (`(field name, value)`, in
    /// order, the last one winning); then [`Settings::validate`].
    ///
    /// # Errors
    /// The first unreadable file, malformed value, unknown key or broken limit.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Settings, ConfigError> {
        let mut settings = Settings::default();
        if let Some(path) = file {
            settings.apply_toml_file(path)?;
        }
        settings.apply_env(env)?;
        for (key, value) in overrides {
            settings.apply_override(key, value)?;
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Where `setting`'s current value came from.
    pub fn origin(&self, setting: Setting) -> &Origin {
        &self.provenance.origins[setting.index()]
    }

    /// Size of the anonymous buffer pool, in bytes (derived, not settable): every connection
    /// can have a full window W indicated, each window rounded up to whole anonymous buffers,
    /// i.e. `max_conns × ceil(W / anon_buf_bytes) × anon_buf_bytes`. Saturates at `u64::MAX`;
    /// with `anon_buf_bytes == 0` (invalid) no rounding is done.
    pub fn anon_pool_bytes(&self) -> u64 {
        let window = u64::from(self.indicate_window_bytes);
        let buf = u64::from(self.anon_buf_bytes);
        let per_conn = if buf == 0 {
            window
        } else {
            window.div_ceil(buf) * buf
        };
        u64::from(self.max_conns).saturating_mul(per_conn)
    }

    /// Number of anonymous buffers in the pool: [`Settings::anon_pool_bytes`] /
    /// `anon_buf_bytes` (0 if `anon_buf_bytes` is 0).
    pub fn anon_pool_buffers(&self) -> u64 {
        self.anon_pool_bytes()
            .checked_div(u64::from(self.anon_buf_bytes))
            .unwrap_or(0)
    }

    /// The connection timers of the NIC (keep-alive, dead-peer and handshake timeouts).
    pub fn timers(&self) -> (Option<Duration>, Option<Duration>, Option<Duration>) {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        (
            ms(self.keepalive_ms),
            ms(self.idle_timeout_ms),
            ms(self.syn_timeout_ms),
        )
    }

    /// The NIC's part of the cost model (DMA bandwidth, per-frame processing).
    pub fn nic_cost(&self) -> NicCost {
        NicCost {
            dma_bytes_per_s: self.dma_mb_per_s.saturating_mul(1_000_000),
            segment_ns: self.nic_segment_ns,
        }
    }

    /// The host CPU's part of the cost model (copies, events, commands).
    pub fn host_cost(&self) -> HostCost {
        HostCost {
            copy_bytes_per_s: self.host_copy_mb_per_s.saturating_mul(1_000_000),
            event_ns: self.host_event_ns,
            command_ns: self.host_command_ns,
            crc_bytes_per_s: self.host_crc_mb_per_s.saturating_mul(1_000_000),
        }
    }

    /// Every setting as `(name, value as text, origin)`, in table order (for reports).
    pub fn table(&self) -> Vec<(&'static str, String, String)> {
        let off = |v: Option<u64>| v.map_or("off".to_string(), |v| v.to_string());
        Setting::ALL
            .into_iter()
            .map(|s| {
                let v = match s {
                    Setting::IndicateWindowBytes => self.indicate_window_bytes.to_string(),
                    Setting::Policy => self.policy.name().to_string(),
                    Setting::Ack => match self.ack {
                        AckPolicy::WindowFull => "window-full".to_string(),
                        AckPolicy::KeepOpen { min_bytes } => format!("keep-open:{min_bytes}"),
                    },
                    Setting::PushTimeoutMs => self.push_timeout_ms.to_string(),
                    Setting::AnonBufBytes => self.anon_buf_bytes.to_string(),
                    Setting::MaxConns => self.max_conns.to_string(),
                    Setting::CopyCapBytes => self.copy_cap_bytes.to_string(),
                    Setting::RingDepth => self.ring_depth.to_string(),
                    Setting::Mtu => self.mtu.to_string(),
                    Setting::SocketBufBytes => self.socket_buf_bytes.to_string(),
                    Setting::BusLatencyUs => self.bus_latency_us.to_string(),
                    Setting::DmaMbPerS => self.dma_mb_per_s.to_string(),
                    Setting::HostCopyMbPerS => self.host_copy_mb_per_s.to_string(),
                    Setting::HostEventNs => self.host_event_ns.to_string(),
                    Setting::HostCommandNs => self.host_command_ns.to_string(),
                    Setting::NicSegmentNs => self.nic_segment_ns.to_string(),
                    Setting::HostCrcMbPerS => self.host_crc_mb_per_s.to_string(),
                    Setting::KeepaliveMs => off(self.keepalive_ms),
                    Setting::IdleTimeoutMs => off(self.idle_timeout_ms),
                    Setting::SynTimeoutMs => off(self.syn_timeout_ms),
                    Setting::Congestion => self.congestion.name().to_string(),
                };
                (s.name(), v, self.origin(s).to_string())
            })
            .collect()
    }

    /// The cost model's settings as `(name, value)` pairs, in table order (for reports).
    pub fn cost_model(&self) -> [(&'static str, u64); 7] {
        [
            (Setting::BusLatencyUs.name(), self.bus_latency_us),
            (Setting::DmaMbPerS.name(), self.dma_mb_per_s),
            (Setting::HostCopyMbPerS.name(), self.host_copy_mb_per_s),
            (Setting::HostEventNs.name(), self.host_event_ns),
            (Setting::HostCommandNs.name(), self.host_command_ns),
            (Setting::NicSegmentNs.name(), self.nic_segment_ns),
            (Setting::HostCrcMbPerS.name(), self.host_crc_mb_per_s),
        ]
    }

    /// The cost model as a JSON object (setting name to value), for reports.
    pub fn cost_model_json(&self) -> serde_json::Value {
        self.cost_model()
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The same settings with every cost of the model zero (bus latency included): work takes
    /// no virtual time, as in an ideal machine. For tests of logic that must not depend on
    /// the cost model, and for the real-time runtimes.
    pub fn without_costs(mut self) -> Settings {
        self.bus_latency_us = 0;
        self.dma_mb_per_s = 0;
        self.host_copy_mb_per_s = 0;
        self.host_event_ns = 0;
        self.host_command_ns = 0;
        self.nic_segment_ns = 0;
        self.host_crc_mb_per_s = 0;
        self
    }

    /// The push timer period as a [`Duration`].
    pub fn push_timeout(&self) -> Duration {
        Duration::from_millis(self.push_timeout_ms)
    }

    /// The driver's per-connection receive configuration: policy, W, acknowledgement policy,
    /// push timer period and the copy cap (saturated to `usize`).
    pub fn rx_config(&self) -> RxConfig {
        RxConfig {
            policy: self.policy,
            window: self.indicate_window_bytes,
            ack: self.ack,
            push_timeout: self.push_timeout(),
            copy_cap_bytes: usize::try_from(self.copy_cap_bytes).unwrap_or(usize::MAX),
        }
    }

    /// Applies the TOML document `text`; `origin` labels it in errors and in
    /// [`Settings::origin`] (normally the file's path). Keys are field names, at the top level
    /// or in a `[host]` table (applied after the top level). Sizes may be integers or strings
    /// such as `"256KiB"`. Keys not present keep their values. A `[cluster]` table (the
    /// layout `toemu iscsi cluster` reads from the same file) is not a setting and is
    /// skipped.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for malformed TOML, [`ConfigError::UnknownKey`] for any key
    /// (or table) that is not a setting, [`ConfigError::Parse`] for a malformed value. Values
    /// applied before the error stay applied.
    pub fn apply_toml_str(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let origin = Origin::File(origin.to_string());
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.clone(),
                    reason: e.message().to_string(),
                })?;
        let mut host = None;
        for (key, value) in &table {
            if key == "host" {
                match value {
                    toml::Value::Table(t) => host = Some(t),
                    other => {
                        return Err(ConfigError::Parse {
                            setting: "host",
                            origin,
                            value: other.to_string(),
                            reason: format!("expected a table, found {}", other.type_str()),
                        })
                    }
                }
                continue;
            }
            if key == "cluster" && value.is_table() {
                continue;
            }
            self.apply_toml_value(key, key, value, &origin)?;
        }
        if let Some(host) = host {
            for (key, value) in host {
                self.apply_toml_value(key, &format!("host.{key}"), value, &origin)?;
            }
        }
        Ok(())
    }

    fn apply_toml_value(
        &mut self,
        key: &str,
        shown_key: &str,
        value: &toml::Value,
        origin: &Origin,
    ) -> Result<(), ConfigError> {
        let setting = Setting::from_name(key).ok_or_else(|| ConfigError::UnknownKey {
            key: shown_key.to_string(),
            origin: origin.clone(),
        })?;
        let raw = match value {
            toml::Value::String(s) => Raw::Text(s),
            toml::Value::Integer(i) => Raw::Int(*i),
            other => Raw::Other(other.type_str(), other),
        };
        self.set(setting, raw, origin.clone())
    }

    /// Reads the file at `path` and applies it as [`Settings::apply_toml_str`] does, with the
    /// path as origin.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if the file cannot be read, else as [`Settings::apply_toml_str`].
    pub fn apply_toml_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        self.apply_toml_str(&text, &path.display().to_string())
    }

    /// Applies the `TOEMU_*` variables among `vars` (see [`Setting::env_var`]); pass
    /// `std::env::vars()`. Other variables are ignored. An empty value is an error, not
    /// "unset".
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the variable for a malformed value.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            if let Some(setting) = Setting::ALL.into_iter().find(|s| s.env_var() == name) {
                self.set(setting, Raw::Text(&value), Origin::Env(setting.env_var()))?;
            }
        }
        Ok(())
    }

    /// Applies one explicit override (a command-line flag): `key` is the field name
    /// (dashes are accepted for underscores, e.g. `indicate-window-bytes`), `value` its text
    /// form as in the environment.
    ///
    /// # Errors
    /// [`ConfigError::UnknownKey`] for an unknown key, [`ConfigError::Parse`] for a malformed
    /// value.
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let setting =
            Setting::from_name(&key.replace('-', "_")).ok_or_else(|| ConfigError::UnknownKey {
                key: key.to_string(),
                origin: Origin::CommandLine,
            })?;
        self.set(setting, Raw::Text(value), Origin::CommandLine)
    }

    /// Converts `raw` and stores it in `setting`, recording `origin`.
    fn set(&mut self, setting: Setting, raw: Raw<'_>, origin: Origin) -> Result<(), ConfigError> {
        let fail = |reason: String| ConfigError::Parse {
            setting: setting.name(),
            origin: origin.clone(),
            value: raw.shown(),
            reason,
        };
        match setting {
            Setting::IndicateWindowBytes => {
                let w = raw.size().and_then(narrow).map_err(fail)?;
                self.indicate_window_bytes = w;
                if self.provenance.ack_follows_window {
                    self.ack = keep_open_default(w);
                }
            }
            Setting::Policy => {
                self.policy = raw.text().and_then(str::parse).map_err(fail)?;
            }
            Setting::Ack => match raw.text().and_then(parse_ack).map_err(fail)? {
                Some(ack) => {
                    self.ack = ack;
                    self.provenance.ack_follows_window = false;
                }
                None => {
                    self.ack = keep_open_default(self.indicate_window_bytes);
                    self.provenance.ack_follows_window = true;
                }
            },
            Setting::PushTimeoutMs => self.push_timeout_ms = raw.count().map_err(fail)?,
            Setting::AnonBufBytes => {
                self.anon_buf_bytes = raw.size().and_then(narrow).map_err(fail)?;
            }
            Setting::MaxConns => self.max_conns = raw.count().and_then(narrow).map_err(fail)?,
            Setting::CopyCapBytes => self.copy_cap_bytes = raw.size().map_err(fail)?,
            Setting::RingDepth => self.ring_depth = raw.count().and_then(narrow).map_err(fail)?,
            Setting::Mtu => self.mtu = raw.count().and_then(narrow).map_err(fail)?,
            Setting::SocketBufBytes => {
                self.socket_buf_bytes = raw.size().and_then(narrow).map_err(fail)?;
            }
            Setting::BusLatencyUs => self.bus_latency_us = raw.count().map_err(fail)?,
            Setting::DmaMbPerS => self.dma_mb_per_s = raw.count().map_err(fail)?,
            Setting::HostCopyMbPerS => self.host_copy_mb_per_s = raw.count().map_err(fail)?,
            Setting::HostEventNs => self.host_event_ns = raw.count().map_err(fail)?,
            Setting::HostCommandNs => self.host_command_ns = raw.count().map_err(fail)?,
            Setting::NicSegmentNs => self.nic_segment_ns = raw.count().map_err(fail)?,
            Setting::HostCrcMbPerS => self.host_crc_mb_per_s = raw.count().map_err(fail)?,
            Setting::KeepaliveMs => self.keepalive_ms = raw.count_or_off().map_err(fail)?,
            Setting::IdleTimeoutMs => self.idle_timeout_ms = raw.count_or_off().map_err(fail)?,
            Setting::SynTimeoutMs => self.syn_timeout_ms = raw.count_or_off().map_err(fail)?,
            Setting::Congestion => {
                self.congestion = raw.text().and_then(str::parse).map_err(fail)?;
            }
        }
        self.provenance.origins[setting.index()] = origin;
        Ok(())
    }

    fn invalid(&self, setting: Setting, value: impl fmt::Display, limit: String) -> ConfigError {
        ConfigError::Invalid {
            setting: setting.name(),
            origin: self.origin(setting).clone(),
            value: value.to_string(),
            limit,
        }
    }

    /// Checks every limit: `anon_buf_bytes` in 256 ..= 1 MiB; `max_conns` in 1 ..= 100 000;
    /// W in 1 ..= 1 GiB and at most [`Settings::anon_pool_bytes`]; a keep-open batch in
    /// 1 ..= W; `push_timeout_ms` >= 1; `copy_cap_bytes` >= 1; `ring_depth` >= 16; `mtu` in
    /// 576 ..= 65 000; `socket_buf_bytes` >= 2 × `mtu`; the connection timers >= 1 or off.
    ///
    /// # Errors
    /// The first broken limit, as [`ConfigError::Invalid`] naming the setting, its origin, the
    /// value and the limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use Setting as S;
        let buf = self.anon_buf_bytes;
        if !(MIN_ANON_BUF_BYTES..=MAX_ANON_BUF_BYTES).contains(&buf) {
            return Err(self.invalid(
                S::AnonBufBytes,
                buf,
                format!("between {MIN_ANON_BUF_BYTES} and {MAX_ANON_BUF_BYTES} (1 MiB)"),
            ));
        }
        if !(1..=MAX_CONNS).contains(&self.max_conns) {
            return Err(self.invalid(
                S::MaxConns,
                self.max_conns,
                format!("between 1 and {MAX_CONNS}"),
            ));
        }
        let w = u64::from(self.indicate_window_bytes);
        if w == 0 || w > MAX_INDICATE_WINDOW_BYTES {
            return Err(self.invalid(
                S::IndicateWindowBytes,
                w,
                format!("between 1 and {MAX_INDICATE_WINDOW_BYTES} (1 GiB)"),
            ));
        }
        let pool = self.anon_pool_bytes();
        if w > pool {
            return Err(self.invalid(
                S::IndicateWindowBytes,
                w,
                format!("between 1 and {pool} (the anonymous pool)"),
            ));
        }
        if let AckPolicy::KeepOpen { min_bytes } = self.ack {
            if !(1..=w).contains(&u64::from(min_bytes)) {
                return Err(self.invalid(
                    S::Ack,
                    format!("keep-open:{min_bytes}"),
                    format!("a keep-open batch between 1 and {w} (indicate_window_bytes)"),
                ));
            }
        }
        if self.push_timeout_ms < 1 {
            return Err(self.invalid(S::PushTimeoutMs, self.push_timeout_ms, "at least 1".into()));
        }
        if self.copy_cap_bytes < 1 {
            return Err(self.invalid(S::CopyCapBytes, self.copy_cap_bytes, "at least 1".into()));
        }
        if self.ring_depth < MIN_RING_DEPTH {
            return Err(self.invalid(
                S::RingDepth,
                self.ring_depth,
                format!("at least {MIN_RING_DEPTH}"),
            ));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(self.invalid(S::Mtu, self.mtu, format!("between {MIN_MTU} and {MAX_MTU}")));
        }
        let min_sock = 2 * u64::from(self.mtu);
        if u64::from(self.socket_buf_bytes) < min_sock {
            return Err(self.invalid(
                S::SocketBufBytes,
                self.socket_buf_bytes,
                format!("at least {min_sock} (2 × mtu)"),
            ));
        }
        if self.bus_latency_us > 1_000_000 {
            return Err(self.invalid(
                S::BusLatencyUs,
                self.bus_latency_us,
                "at most 1000000 (1 s)".into(),
            ));
        }
        for (setting, value, max) in [
            (S::DmaMbPerS, self.dma_mb_per_s, MAX_COST_MB_PER_S),
            (
                S::HostCopyMbPerS,
                self.host_copy_mb_per_s,
                MAX_COST_MB_PER_S,
            ),
            (S::HostEventNs, self.host_event_ns, MAX_COST_NS),
            (S::HostCommandNs, self.host_command_ns, MAX_COST_NS),
            (S::NicSegmentNs, self.nic_segment_ns, MAX_COST_NS),
            (S::HostCrcMbPerS, self.host_crc_mb_per_s, MAX_COST_MB_PER_S),
        ] {
            if value > max {
                return Err(self.invalid(setting, value, format!("at most {max}")));
            }
        }
        for (setting, value) in [
            (S::KeepaliveMs, self.keepalive_ms),
            (S::IdleTimeoutMs, self.idle_timeout_ms),
            (S::SynTimeoutMs, self.syn_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(self.invalid(setting, 0, "at least 1, or off".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err_text(r: Result<(), ConfigError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.indicate_window_bytes, 256 * 1024);
        assert_eq!(s.policy, RxPolicy::IndicateWindow);
        assert_eq!(
            s.ack,
            AckPolicy::KeepOpen {
                min_bytes: 64 * 1024
            }
        );
        assert_eq!(s.push_timeout_ms, 500);
        assert_eq!(s.anon_buf_bytes, 16 * 1024);
        assert_eq!(s.max_conns, 64);
        assert_eq!(s.copy_cap_bytes, 64 * 1024 * 1024);
        assert_eq!(s.ring_depth, 1024);
        assert_eq!(s.mtu, 9000);
        assert_eq!(s.socket_buf_bytes, 512 * 1024);
        for setting in Setting::ALL {
            assert_eq!(s.origin(setting), &Origin::Default);
        }
        s.validate().unwrap();
    }

    #[test]
    fn parse_size_units() {
        assert_eq!(parse_size("1500"), Ok(1500));
        assert_eq!(parse_size(" 0 "), Ok(0));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64kib"), Ok(65536));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert_eq!(parse_size("64kb"), Ok(64_000));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert_eq!(parse_size("4MB"), Ok(4_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn parse_size_errors() {
        assert!(parse_size("").unwrap_err().contains("empty"));
        assert!(parse_size("   ").unwrap_err().contains("empty"));
        assert!(parse_size("abc").unwrap_err().contains("not a size"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("1.5MiB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("4TiB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("4 MiBs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("17179869184GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn precedence_default_file_env_override() {
        let dir = std::env::temp_dir().join(format!("toemu-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.toml");
        std::fs::write(
            &path,
            "mtu = 1500\nring_depth = 64\n[host]\nmax_conns = 8\npolicy = \"mss-holdoff\"\n",
        )
        .unwrap();
        let vars = env(&[
            ("TOEMU_RING_DEPTH", "128"),
            ("TOEMU_MAX_CONNS", "16"),
            ("PATH", "/bin"),
            ("TOEMU_PROPTEST_CASES", "5"),
        ]);
        let overrides = vec![("max_conns".to_string(), "32".to_string())];
        let s = Settings::load(Some(&path), vars, &overrides).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        let file = Origin::File(path.display().to_string());
        // default only
        assert_eq!(s.push_timeout_ms, 500);
        assert_eq!(s.origin(Setting::PushTimeoutMs), &Origin::Default);
        // file beats default
        assert_eq!(s.mtu, 1500);
        assert_eq!(s.origin(Setting::Mtu), &file);
        assert_eq!(s.policy, RxPolicy::MssHoldoff);
        assert_eq!(s.origin(Setting::Policy), &file);
        // env beats file
        assert_eq!(s.ring_depth, 128);
        assert_eq!(
            s.origin(Setting::RingDepth),
            &Origin::Env("TOEMU_RING_DEPTH")
        );
        // override beats env and file
        assert_eq!(s.max_conns, 32);
        assert_eq!(s.origin(Setting::MaxConns), &Origin::CommandLine);
    }

    #[test]
    fn load_without_file_and_missing_file() {
        let s = Settings::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(s, Settings::default());
        let missing = Path::new("/nonexistent/toemu/host.toml");
        let e = Settings::load(Some(missing), Vec::new(), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
        assert!(
            e.to_string().contains("/nonexistent/toemu/host.toml"),
            "{e}"
        );
    }

    #[test]
    fn load_validates() {
        let e = Settings::load(None, env(&[("TOEMU_INDICATE_WINDOW", "0")]), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "indicate_window_bytes = 0 (from TOEMU_INDICATE_WINDOW): must be between 1 and 1073741824 (1 GiB)"
        );
    }

    #[test]
    fn all_env_vars_and_sizes() {
        let mut s = Settings::default();
        s.apply_env(env(&[
            ("TOEMU_INDICATE_WINDOW", "1MiB"),
            ("TOEMU_POLICY", "unbounded-copy"),
            ("TOEMU_ACK", "keep-open:8KiB"),
            ("TOEMU_PUSH_TIMEOUT_MS", "20"),
            ("TOEMU_ANON_BUF", "4k"),
            ("TOEMU_MAX_CONNS", "3"),
            ("TOEMU_COPY_CAP", "1GB"),
            ("TOEMU_RING_DEPTH", "32"),
            ("TOEMU_MTU", "1500"),
            ("TOEMU_SOCKET_BUF", "64KiB"),
            ("TOEMU_BUS_LATENCY_US", "3"),
            ("TOEMU_DMA_MB_PER_S", "3000"),
            ("TOEMU_HOST_COPY_MB_PER_S", "0"),
            ("TOEMU_HOST_EVENT_NS", "1000"),
            ("TOEMU_HOST_COMMAND_NS", "2000"),
            ("TOEMU_NIC_SEGMENT_NS", "50"),
            ("TOEMU_HOST_CRC_MB_PER_S", "1"),
            ("TOEMU_KEEPALIVE_MS", "off"),
            ("TOEMU_IDLE_TIMEOUT_MS", "9000"),
            ("TOEMU_SYN_TIMEOUT_MS", "250"),
            ("TOEMU_CONGESTION", "cubic"),
        ]))
        .unwrap();
        assert_eq!(s.keepalive_ms, None);
        assert_eq!(s.idle_timeout_ms, Some(9000));
        assert_eq!(s.syn_timeout_ms, Some(250));
        assert_eq!(s.congestion, Congestion::Cubic);
        assert_eq!(s.indicate_window_bytes, 1 << 20);
        assert_eq!(s.policy, RxPolicy::UnboundedCopy);
        assert_eq!(s.ack, AckPolicy::KeepOpen { min_bytes: 8192 });
        assert_eq!(s.push_timeout_ms, 20);
        assert_eq!(s.anon_buf_bytes, 4096);
        assert_eq!(s.max_conns, 3);
        assert_eq!(s.copy_cap_bytes, 1_000_000_000);
        assert_eq!(s.ring_depth, 32);
        assert_eq!(s.mtu, 1500);
        assert_eq!(s.socket_buf_bytes, 65536);
        assert_eq!(s.bus_latency_us, 3);
        assert_eq!(
            (s.nic_cost(), s.host_cost()),
            (
                NicCost {
                    dma_bytes_per_s: 3_000_000_000,
                    segment_ns: 50
                },
                HostCost {
                    copy_bytes_per_s: 0,
                    event_ns: 1000,
                    command_ns: 2000,
                    crc_bytes_per_s: 1_000_000
                }
            )
        );
        for setting in Setting::ALL {
            assert_eq!(s.origin(setting), &Origin::Env(setting.env_var()));
        }
        s.validate().unwrap();
    }

    #[test]
    fn toml_sizes_as_integers_or_strings() {
        let mut s = Settings::default();
        s.apply_toml_str(
            "indicate_window_bytes = \"128KiB\"\nanon_buf_bytes = 8192\ncopy_cap_bytes = \"2GiB\"\n\
             ack = \"window-full\"\npush_timeout_ms = 7\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.indicate_window_bytes, 128 * 1024);
        assert_eq!(s.anon_buf_bytes, 8192);
        assert_eq!(s.copy_cap_bytes, 2 << 30);
        assert_eq!(s.ack, AckPolicy::WindowFull);
        assert_eq!(s.push_timeout_ms, 7);
        assert_eq!(s.origin(Setting::Ack), &Origin::File("t.toml".into()));
    }

    #[test]
    fn toml_host_table_applied_after_top_level() {
        let mut s = Settings::default();
        s.apply_toml_str("[host]\nmtu = 4000\n", "a.toml").unwrap();
        assert_eq!(s.mtu, 4000);
        s.apply_toml_str("mtu = 1500\n[host]\nmtu = 2000\n", "b.toml")
            .unwrap();
        assert_eq!(s.mtu, 2000);
    }

    #[test]
    fn unknown_keys_refused() {
        let mut s = Settings::default();
        let e = err_text(s.apply_toml_str("mtu = 1500\nwindow = 5\n", "x.toml"));
        assert!(e.contains("`window`") && e.contains("x.toml"), "{e}");
        let e = err_text(s.apply_toml_str("[host]\nanon_pool_bytes = 5\n", "y.toml"));
        assert!(
            e.contains("`host.anon_pool_bytes`") && e.contains("y.toml"),
            "{e}"
        );
        let e = err_text(s.apply_toml_str("[nic]\nmtu = 1500\n", "z.toml"));
        assert!(e.contains("`nic`") && e.contains("z.toml"), "{e}");
        let e = err_text(s.apply_override("bogus", "1"));
        assert!(e.contains("`bogus`") && e.contains("command line"), "{e}");
        let e = err_text(s.apply_toml_str("host = 3\n", "h.toml"));
        assert!(
            e.contains("host") && e.contains("h.toml") && e.contains("table"),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_and_type_errors() {
        let mut s = Settings::default();
        let e = s.apply_toml_str("mtu = = 3", "bad.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert!(e.to_string().contains("bad.toml"), "{e}");
        let e = err_text(s.apply_toml_str("mtu = true", "t.toml"));
        assert!(
            e.contains("mtu = true (from t.toml)") && e.contains("boolean"),
            "{e}"
        );
        let e = err_text(s.apply_toml_str("indicate_window_bytes = -5", "t.toml"));
        assert!(
            e.contains("indicate_window_bytes = -5 (from t.toml)"),
            "{e}"
        );
        assert!(e.contains("negative"), "{e}");
        let e = err_text(s.apply_toml_str("policy = 3", "t.toml"));
        assert!(
            e.contains("policy = 3 (from t.toml)") && e.contains("string"),
            "{e}"
        );
        let e = err_text(s.apply_toml_str("anon_buf_bytes = 1.5", "t.toml"));
        assert!(e.contains("anon_buf_bytes = 1.5 (from t.toml)"), "{e}");
    }

    #[test]
    fn unparsable_values_name_setting_and_origin() {
        let mut s = Settings::default();
        let e = err_text(s.apply_env(env(&[("TOEMU_MTU", "jumbo")])));
        assert!(e.starts_with("mtu = \"jumbo\" (from TOEMU_MTU):"), "{e}");
        let e = err_text(s.apply_env(env(&[("TOEMU_POLICY", "fast")])));
        assert!(
            e.starts_with("policy = \"fast\" (from TOEMU_POLICY):"),
            "{e}"
        );
        let e = err_text(s.apply_env(env(&[("TOEMU_ACK", "sometimes")])));
        assert!(
            e.starts_with("ack = \"sometimes\" (from TOEMU_ACK):"),
            "{e}"
        );
        let e = err_text(s.apply_env(env(&[("TOEMU_ACK", "keep-open:lots")])));
        assert!(
            e.starts_with("ack = \"keep-open:lots\" (from TOEMU_ACK):"),
            "{e}"
        );
        let e = err_text(s.apply_env(env(&[("TOEMU_ANON_BUF", "")])));
        assert!(e.contains("anon_buf_bytes") && e.contains("empty"), "{e}");
        let e = err_text(s.apply_override("indicate_window_bytes", "8GiB"));
        assert!(
            e.starts_with("indicate_window_bytes = \"8GiB\" (from command line):")
                && e.contains("too large"),
            "{e}"
        );
        let e = err_text(s.apply_override("max_conns", "-1"));
        assert!(
            e.starts_with("max_conns = \"-1\" (from command line):"),
            "{e}"
        );
        // Failed applies leave values and origins untouched.
        assert_eq!(s, Settings::default());
        assert_eq!(s.origin(Setting::Mtu), &Origin::Default);
    }

    #[test]
    fn override_accepts_dashes() {
        let mut s = Settings::default();
        s.apply_override("push-timeout-ms", "42").unwrap();
        assert_eq!(s.push_timeout_ms, 42);
        assert_eq!(s.origin(Setting::PushTimeoutMs), &Origin::CommandLine);
    }

    #[test]
    fn keep_open_follows_window_unless_explicit() {
        let mut s = Settings::default();
        s.apply_override("indicate_window_bytes", "1MiB").unwrap();
        assert_eq!(
            s.ack,
            AckPolicy::KeepOpen {
                min_bytes: 256 * 1024
            }
        );
        s.apply_override("ack", "keep-open:1000").unwrap();
        s.apply_override("indicate_window_bytes", "2MiB").unwrap();
        assert_eq!(s.ack, AckPolicy::KeepOpen { min_bytes: 1000 });
        s.apply_override("ack", "keep-open").unwrap();
        assert_eq!(
            s.ack,
            AckPolicy::KeepOpen {
                min_bytes: 512 * 1024
            }
        );
        s.apply_override("indicate_window_bytes", "2").unwrap();
        assert_eq!(s.ack, AckPolicy::KeepOpen { min_bytes: 1 });
        s.apply_override("ack", "window-full").unwrap();
        s.apply_override("indicate_window_bytes", "64KiB").unwrap();
        assert_eq!(s.ack, AckPolicy::WindowFull);
        s.validate().unwrap();
    }

    #[test]
    fn pool_derivation() {
        let mut s = Settings::default();
        assert_eq!(s.anon_pool_bytes(), 64 * 256 * 1024);
        assert_eq!(s.anon_pool_bytes(), 16_777_216);
        assert_eq!(s.anon_pool_buffers(), 64 * 16);
        // W not a multiple of the buffer size: rounded up per connection.
        s.indicate_window_bytes = 20_000;
        s.anon_buf_bytes = 16_384;
        s.max_conns = 3;
        assert_eq!(s.anon_pool_bytes(), 3 * 2 * 16_384);
        assert_eq!(s.anon_pool_buffers(), 6);
        s.indicate_window_bytes = 1;
        assert_eq!(s.anon_pool_bytes(), 3 * 16_384);
        // Saturates instead of overflowing, and does not divide by zero.
        s.indicate_window_bytes = u32::MAX;
        s.max_conns = u32::MAX;
        s.anon_buf_bytes = 1 << 20;
        assert_eq!(s.anon_pool_bytes(), u64::from(u32::MAX) << 32);
        s.indicate_window_bytes = (1 << 31) + 2;
        s.anon_buf_bytes = (1 << 31) + 1;
        assert_eq!(s.anon_pool_bytes(), u64::MAX);
        s.indicate_window_bytes = u32::MAX;
        s.anon_buf_bytes = 0;
        assert_eq!(
            s.anon_pool_bytes(),
            u64::from(u32::MAX) * u64::from(u32::MAX)
        );
        assert_eq!(s.anon_pool_buffers(), 0);
    }

    #[test]
    fn rx_config_mapping() {
        let mut s = Settings::default();
        s.apply_override("policy", "mss-holdoff").unwrap();
        s.apply_override("indicate_window_bytes", "96KiB").unwrap();
        s.apply_override("ack", "keep-open:4KiB").unwrap();
        s.apply_override("push_timeout_ms", "250").unwrap();
        s.apply_override("copy_cap_bytes", "3MiB").unwrap();
        let rx = s.rx_config();
        assert_eq!(
            rx,
            RxConfig {
                policy: RxPolicy::MssHoldoff,
                window: 96 * 1024,
                ack: AckPolicy::KeepOpen { min_bytes: 4096 },
                push_timeout: Duration::from_millis(250),
                copy_cap_bytes: 3 << 20,
            }
        );
        assert_eq!(rx.push_timeout.total_micros(), 250_000);
        let d = Settings::default().rx_config();
        assert_eq!(d.policy, RxPolicy::IndicateWindow);
        assert_eq!(d.window, 256 * 1024);
        assert_eq!(
            d.ack,
            AckPolicy::KeepOpen {
                min_bytes: 64 * 1024
            }
        );
        assert_eq!(d.push_timeout, Duration::from_millis(500));
        assert_eq!(d.copy_cap_bytes, 64 << 20);
    }

    /// Applies `value` to `key` from `from`, then expects validate() to refuse naming
    /// `key`, the origin label and `limit_part`.
    fn refused(from: &str, key: &str, value: &str, expect: &str) {
        let mut s = Settings::default();
        let origin_label = match from {
            "env" => {
                let setting = Setting::from_name(key).unwrap();
                s.apply_env(env(&[(setting.env_var(), value)])).unwrap();
                setting.env_var().to_string()
            }
            "file" => {
                s.apply_toml_str(&format!("[host]\n{key} = \"{value}\"\n"), "/etc/toemu.toml")
                    .unwrap();
                "/etc/toemu.toml".to_string()
            }
            _ => {
                s.apply_override(key, value).unwrap();
                "command line".to_string()
            }
        };
        let e = s.validate().unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
        let text = e.to_string();
        let prefix = format!("{key} = ");
        assert!(text.starts_with(&prefix), "{text}");
        assert!(text.contains(&format!("(from {origin_label})")), "{text}");
        assert!(text.contains(expect), "{text} lacks {expect}");
    }

    #[test]
    fn validation_window() {
        refused(
            "env",
            "indicate_window_bytes",
            "0",
            "= 0 (from TOEMU_INDICATE_WINDOW): must be between 1 and 1073741824",
        );
        refused(
            "file",
            "indicate_window_bytes",
            "2GiB",
            "= 2147483648 (from /etc/toemu.toml): must be between 1 and 1073741824",
        );
    }

    #[test]
    fn validation_window_at_limit_is_accepted() {
        let mut s = Settings::default();
        s.apply_override("indicate_window_bytes", "1GiB").unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn validation_anon_buf() {
        refused(
            "env",
            "anon_buf_bytes",
            "255",
            "= 255 (from TOEMU_ANON_BUF): must be between 256 and 1048576",
        );
        refused("cli", "anon_buf_bytes", "0", "between 256 and 1048576");
        refused(
            "file",
            "anon_buf_bytes",
            "2MiB",
            "= 2097152 (from /etc/toemu.toml)",
        );
        let mut s = Settings::default();
        s.apply_override("anon_buf_bytes", "256").unwrap();
        s.validate().unwrap();
        s.apply_override("anon_buf_bytes", "1MiB").unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn validation_max_conns() {
        refused(
            "env",
            "max_conns",
            "0",
            "= 0 (from TOEMU_MAX_CONNS): must be between 1 and 100000",
        );
        refused("cli", "max_conns", "100001", "between 1 and 100000");
        let mut s = Settings::default();
        s.apply_override("max_conns", "100000").unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn validation_bus_latency() {
        let mut s = Settings::default();
        s.apply_override("bus_latency_us", "1000001").unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("bus_latency_us") && e.contains("at most 1000000"),
            "{e}"
        );
    }

    #[test]
    fn validation_ring_depth() {
        refused(
            "env",
            "ring_depth",
            "15",
            "= 15 (from TOEMU_RING_DEPTH): must be at least 16",
        );
        refused("file", "ring_depth", "0", "at least 16");
    }

    #[test]
    fn validation_mtu() {
        refused(
            "env",
            "mtu",
            "575",
            "= 575 (from TOEMU_MTU): must be between 576 and 65000",
        );
        refused("cli", "mtu", "65001", "between 576 and 65000");
        let mut s = Settings::default();
        s.apply_override("mtu", "576").unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn validation_socket_buf() {
        refused(
            "env",
            "socket_buf_bytes",
            "17999",
            "= 17999 (from TOEMU_SOCKET_BUF): must be at least 18000 (2 × mtu)",
        );
        let mut s = Settings::default();
        s.apply_override("socket_buf_bytes", "18000").unwrap();
        s.validate().unwrap();
        // Lowering the MTU makes a small socket buffer acceptable.
        s.apply_override("mtu", "1500").unwrap();
        s.apply_override("socket_buf_bytes", "3000").unwrap();
        s.validate().unwrap();
    }

    #[test]
    fn validation_push_timeout() {
        refused(
            "env",
            "push_timeout_ms",
            "0",
            "= 0 (from TOEMU_PUSH_TIMEOUT_MS): must be at least 1",
        );
    }

    #[test]
    fn connection_timers_take_off_or_milliseconds() {
        let mut s = Settings::default();
        assert_eq!(
            s.timers(),
            (
                Some(Duration::from_secs(60)),
                Some(Duration::from_secs(180)),
                Some(Duration::from_secs(30))
            )
        );
        s.apply_override("keepalive_ms", "off").unwrap();
        s.apply_override("idle-timeout-ms", "2500").unwrap();
        s.apply_toml_str("syn_timeout_ms = 700\n", "t.toml")
            .unwrap();
        s.validate().unwrap();
        assert_eq!(
            s.timers(),
            (
                None,
                Some(Duration::from_millis(2500)),
                Some(Duration::from_millis(700))
            )
        );
        let e = err_text(s.apply_override("keepalive_ms", "soon"));
        assert!(e.contains("or off"), "{e}");
        refused(
            "env",
            "syn_timeout_ms",
            "0",
            "= 0 (from TOEMU_SYN_TIMEOUT_MS): must be at least 1, or off",
        );
    }

    #[test]
    fn congestion_control_is_a_setting() {
        let mut s = Settings::default();
        assert_eq!(s.congestion, Congestion::None);
        s.apply_toml_str("congestion = \"cubic\"\n", "t.toml")
            .unwrap();
        assert_eq!(s.congestion, Congestion::Cubic);
        s.apply_override("congestion", "reno").unwrap();
        assert_eq!(s.congestion, Congestion::Reno);
        assert!(s
            .table()
            .iter()
            .any(|(k, v, _)| *k == "congestion" && v == "reno"));
        let e = err_text(s.apply_override("congestion", "bbr"));
        assert!(e.contains("expected none, reno or cubic"), "{e}");
    }

    #[test]
    fn validation_copy_cap() {
        refused(
            "cli",
            "copy_cap_bytes",
            "0",
            "= 0 (from command line): must be at least 1",
        );
    }

    #[test]
    fn validation_keep_open_batch() {
        refused(
            "env",
            "ack",
            "keep-open:0",
            "= keep-open:0 (from TOEMU_ACK): must be a keep-open batch between 1 and 262144",
        );
        refused(
            "file",
            "ack",
            "keep-open:257KiB",
            "= keep-open:263168 (from /etc/toemu.toml)",
        );
        let mut s = Settings::default();
        s.apply_override("ack", "keep-open:256KiB").unwrap();
        s.validate().unwrap();
        // An explicit batch that fits W becomes invalid when W shrinks below it.
        s.apply_env(env(&[("TOEMU_INDICATE_WINDOW", "128KiB")]))
            .unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("ack = keep-open:262144 (from command line)"),
            "{e}"
        );
    }

    #[test]
    fn equality_ignores_origin() {
        let mut s = Settings::default();
        s.apply_override("mtu", "9000").unwrap();
        assert_eq!(s, Settings::default());
        s.apply_override("mtu", "1500").unwrap();
        assert_ne!(s, Settings::default());
    }

    #[test]
    fn setting_names_round_trip() {
        for setting in Setting::ALL {
            assert_eq!(Setting::from_name(setting.name()), Some(setting));
            assert!(setting.env_var().starts_with("TOEMU_"));
        }
        assert_eq!(Setting::from_name("anon_pool_bytes"), None);
    }
}
