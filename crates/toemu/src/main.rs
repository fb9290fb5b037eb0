//! The `toemu` command line: parses, builds hosts (toe-host), calls the lab (toemu-lab).

mod wire_args;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use toe_host::config::{parse_size, Settings};
use toemu_lab::demo::{run_demo, table, DemoOptions, DemoReport, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "toemu",
    version,
    about = "TCP offload engine emulator with a host driver model"
)]
struct Cli {
    /// Host settings file (TOML); environment variables TOEMU_* and --set override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Override a host setting: KEY=VALUE (e.g. indicate_window_bytes=64KiB). Repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// indicateWindowSize W for every connection (shorthand for --set indicate_window_bytes=).
    #[arg(long, global = true, value_name = "SIZE")]
    indicate_window: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `toemu iscsi target`, `iscsi perf`, `msg serve` and `msg send` on an emulated TOE host
/// on a TAP device instead of std TCP: `--tap NAME --ip ADDR/PREFIX`, with the TAP port's
/// impairment options.
#[derive(clap::Args, Debug)]
struct IscsiTap {
    /// On an emulated TOE host on this TAP device instead of std TCP (with --ip).
    #[arg(long, requires = "ip")]
    tap: Option<String>,
    /// The emulated host's address and prefix, e.g. 10.99.0.2/24 (with --tap).
    #[arg(long, requires = "tap")]
    ip: Option<String>,
    /// Default gateway of the emulated host (with --tap).
    #[arg(long, requires = "tap")]
    gateway: Option<std::net::Ipv4Addr>,
    /// Impairment of both directions of the TAP port, and capture (with --tap).
    #[command(flatten)]
    wire: wire_args::WireArgs,
}

impl IscsiTap {
    /// The TAP host, if `--tap` was given.
    fn tap_args(self) -> Option<TapArgs> {
        let IscsiTap {
            tap,
            ip,
            gateway,
            wire,
        } = self;
        tap.zip(ip).map(|(tap, ip)| TapArgs {
            tap,
            ip,
            gateway,
            stack_seed: 1,
            max_seconds: None,
            wire,
        })
    }
}

/// Where an emulated host lives on a TAP device.
#[derive(clap::Args, Debug)]
struct TapArgs {
    /// TAP device to open or create (in the current network namespace).
    #[arg(long)]
    tap: String,
    /// The emulated host's address and prefix, e.g. 10.99.0.2/24.
    #[arg(long)]
    ip: String,
    /// Default gateway of the emulated host.
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Seed of the emulated stack (ISNs, ephemeral ports).
    #[arg(long, default_value_t = 1)]
    stack_seed: u64,
    /// Stop after this many seconds (default: run until killed, or until a client is done).
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Impairment of both directions of the TAP port, and capture.
    #[command(flatten)]
    wire: wire_args::WireArgs,
}

impl TapArgs {
    /// Open the TAP device, wrapped in the requested impairment and capture.
    fn open(
        &self,
    ) -> Result<(toe_host::runtime::BoxPhy, toe_host::wire_opts::WireOptions), String> {
        let wire = wire_args::wire_options(&self.wire)?;
        let phy = toe_tap::TapPhy::open(&self.tap, 8192).map_err(|e| e.to_string())?;
        let (phy, _monitors) = wire.wrap_single(phy);
        Ok((phy, wire))
    }
}

/// How the app receives.
#[derive(clap::Args, Debug)]
struct RxArgs {
    /// Keep named buffers of this size posted (larger than W for direct placement); without
    /// it the app accepts indicated data in place.
    #[arg(long, value_name = "SIZE")]
    named_buf: Option<String>,
    /// Named buffers kept posted per connection.
    #[arg(long, default_value_t = 2)]
    named_bufs: usize,
    /// Push mode for named buffers (returned early on TCP PSH or by the push timer).
    #[arg(long)]
    push: bool,
}

impl RxArgs {
    fn mode(&self) -> Result<toemu_apps::RxMode, String> {
        Ok(match &self.named_buf {
            None => toemu_apps::RxMode::InPlace,
            Some(s) => toemu_apps::RxMode::Named {
                buf_bytes: parse_size(s).map_err(|e| format!("--named-buf: {e}"))? as usize,
                bufs: self.named_bufs.max(1),
                push: self.push,
            },
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AppKind {
    Echo,
    Http,
    Sink,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a socket app (echo, http, sink) on an emulated TOE host bound to a TAP device.
    Serve {
        #[command(flatten)]
        tap: TapArgs,
        /// The app.
        #[arg(long, value_enum)]
        app: AppKind,
        /// Listening port (default: echo 7, http 80, sink 9).
        #[arg(long)]
        port: Option<u16>,
        /// http: serve files from this directory (besides /bytes/N).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// sink: consume at most this many bytes per second (a slow application).
        #[arg(long, value_name = "SIZE")]
        rate: Option<String>,
        #[command(flatten)]
        rx: RxArgs,
    },
    /// Send N bytes of the seeded stream from an emulated host on a TAP device to ADDR:PORT.
    Send {
        #[command(flatten)]
        tap: TapArgs,
        /// Destination.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        /// Bytes to send.
        #[arg(long)]
        bytes: String,
        /// Seed of the stream.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// HTTP GET of `http://IPv4[:port]/path` from an emulated host on a TAP device.
    Get {
        #[command(flatten)]
        tap: TapArgs,
        /// The URL.
        url: String,
    },
    /// Every scenario side by side with its baselines (bare smoltcp, kernel loopback TCP),
    /// alternating runs, medians with min/max; a table, and JSON with --json.
    Bench {
        /// The short run (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Skip the scale scenario.
        #[arg(long)]
        no_scale: bool,
        /// Run only these sections (comma separated: bulk, rr, scale); default: all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Points of the scale scenario (comma separated), instead of the defaults
        /// (1,100,1000,10000,10000/100; --quick: 1,100,1000): `N` is N connections all
        /// active, `N/A` N open with A of them active.
        #[arg(long, value_delimiter = ',')]
        scale: Vec<toemu_lab::bench::ScalePoint>,
        /// Measure every scale point alone: no 1-connection point before it, no kernel
        /// baseline (for profiling one point; see TOEMU_PERF_CTL in the README).
        #[arg(long)]
        no_scale_baselines: bool,
        /// Integrity check of the bulk runs: crc32c (default) or sha256.
        #[arg(long, default_value = "crc32c")]
        check: String,
        /// Write every figure and the machine description as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Latency, throughput and memory against W for each receive mode: a table, sweep.json
    /// and SVG charts in --out.
    Sweep {
        /// W values: a power-of-two range `1KiB..4MiB` or a list `4KiB,64KiB`.
        #[arg(long, default_value = "1KiB..4MiB")]
        w: String,
        /// Bytes of the bulk transfer at each point.
        #[arg(long, default_value = "64MiB")]
        bytes: String,
        /// Request/response exchanges at each point.
        #[arg(long, default_value_t = 2000)]
        rr_iters: usize,
        /// Modes (comma separated; default: the four TOE modes).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Output directory.
        #[arg(long, default_value = "sweep-out")]
        out: PathBuf,
        /// Rate of the modeled wire, each direction, in Mbit/s (default: the default
        /// machine's 25 Gbit/s).
        #[arg(long = "rate-mbit", default_value_t = toe_host::config::DEFAULT_WIRE_RATE_MBIT)]
        rate_mbit: u64,
        /// A second configuration measured at every point and overlaid (dashed) on the
        /// charts: settings overrides on top of the base ones, `KEY=VALUE[,KEY=VALUE...]`,
        /// e.g. `bus_latency_us=8`.
        #[arg(long, value_name = "SETTINGS")]
        compare: Option<String>,
        /// Also write report.html into --out: one self-contained page with the charts, the
        /// table, the knees, the settings and the machine.
        #[arg(long)]
        report: bool,
    },
    /// An SVG timeline of P (NIC) and I (driver) for one indicate-window connection with a
    /// slow receiver.
    Timeline {
        /// Bytes to transfer.
        #[arg(long, default_value = "4MiB")]
        bytes: String,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output SVG.
        #[arg(long, default_value = "timeline.svg")]
        out: PathBuf,
    },
    /// The benchmark baseline: a bare-smoltcp sink (no offload layers) on a TAP device.
    BareSink {
        #[command(flatten)]
        tap: TapArgs,
        /// Listening port.
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// Write N bytes of the seeded stream to stdout (what `/bytes/N` serves with seed 0, and
    /// what `send` sends).
    Gen {
        /// Bytes.
        #[arg(long)]
        bytes: String,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// iSCSI: the target, discovery, a load generator and a benchmark.
    Iscsi {
        #[command(subcommand)]
        cmd: IscsiCmd,
    },
    /// The message transport (seeds 002, 003) on std TCP: a storage server, a sender, and
    /// certificates for trying it.
    Msg {
        #[command(subcommand)]
        cmd: MsgCmd,
    },
    /// The message transport's bulk transfer over an emulated WAN on the virtual clock
    /// (1 Gbit/s, 50 ms RTT, 0.01% loss, CUBIC): one stream, paced and unpaced bulk over
    /// many connections, pipes of 10 and 1,000 connections; a table, JSON and an SVG of
    /// goodput over time.
    BulkBench {
        /// Write the figures as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the chart of goodput over time (SVG) to this path.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Bytes per run (K, KiB, M, MiB, G, GiB).
        #[arg(long, default_value = "1GiB")]
        bytes: String,
        /// Active connections of the bulk modes.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Primed reserve connections of the bulk modes, brought in for stragglers.
        #[arg(long, default_value_t = 8)]
        reserves: usize,
        /// Priming bytes per connection of the bulk modes (default: half its share of
        /// the bandwidth-delay product, reserves counted).
        #[arg(long)]
        prime_bytes: Option<String>,
        /// Modes to run, comma-separated (default: all): one-stream, bulk,
        /// bulk-unpaced, pipe-10, pipe-1000.
        #[arg(long, value_delimiter = ',')]
        modes: Vec<toemu_lab::bulk_bench::BulkMode>,
        /// Frame loss probability of each direction (default 0.0001).
        #[arg(long, value_parser = toe_host::wire_opts::parse_probability)]
        loss: Option<f64>,
        /// The bottleneck queue, in bandwidth-delay products (default 0.5).
        #[arg(long)]
        queue_bdp: Option<f64>,
    },
    /// Two emulated hosts on the in-memory wire: bulk transfer with a SHA-256 check and
    /// 64-byte request/response per receive mode, plus the bare-smoltcp baseline; figures in
    /// modeled time (the cost model; the wire at 25 Gbit/s unless --rate-mbit) first, the
    /// emulator's wall-clock speed second.
    Demo {
        /// Bytes per bulk transfer (suffixes K, KiB, M, MiB, G, GiB).
        #[arg(long, default_value = "1GiB")]
        bytes: String,
        /// Request/response exchanges per mode.
        #[arg(long, default_value_t = 10_000)]
        rr_iters: usize,
        /// Modes to run (comma separated): named-buffer, indicate-window, mss-holdoff,
        /// unbounded-copy, smoltcp-bare.
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Seed of payload and stacks.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the results as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Size of each named buffer the named-buffer receiver keeps posted (must exceed W
        /// for direct placement).
        #[arg(long, default_value = "512KiB")]
        named_buf: String,
        /// Named buffers kept posted.
        #[arg(long, default_value_t = 4)]
        named_bufs: usize,
        /// Bulk runs per mode; modes alternate run by run and the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Record both drivers' bus commands and events as JSON lines (virtual timestamps).
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        wire: wire_args::WireArgs,
    },
}

/// TLS files of `toemu msg`.
#[derive(clap::Args, Debug)]
struct MsgTls {
    /// TLS 1.3 with mutual certificates (--cert, --key, --ca); without it the connections
    /// are plaintext, and the output says so.
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    tls: bool,
    /// This side's certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The CA whose certificates the peer must present (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The name this side's certificate carries (default: the certificate file's stem).
    #[arg(long)]
    name: Option<String>,
}

impl MsgTls {
    fn security(&self) -> Result<toemu_lab::msg::Security, String> {
        if !self.tls {
            return Ok(toemu_lab::msg::Security::Plain);
        }
        let read = |p: &Option<PathBuf>| {
            let p = p.as_ref().expect("clap requires it");
            std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let cert = self.cert.as_ref().expect("clap requires it");
        let name = match &self.name {
            Some(n) => n.clone(),
            None => cert
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let id = toe_msg::Identity::from_pem(
            &name,
            &read(&self.cert)?,
            &read(&self.key)?,
            &read(&self.ca)?,
        )
        .map_err(|e| e.to_string())?;
        Ok(toemu_lab::msg::Security::Tls(id))
    }
}

#[derive(Subcommand, Debug)]
enum MsgCmd {
    /// The storage server: accepts pipes on --listen (std TCP) or on an emulated TOE host
    /// on a TAP device (--tap NAME --ip ADDR/PREFIX, port from --port), writes each
    /// session's messages to --dir (or only hashes them) and prints per session its
    /// messages, bytes and SHA-256; runs until SIGINT or SIGTERM.
    Serve {
        /// ADDR:PORT to listen on (std TCP).
        #[arg(long, conflicts_with = "tap", required_unless_present = "tap")]
        listen: Option<std::net::SocketAddr>,
        /// The port to listen on with --tap.
        #[arg(long, default_value_t = 7000, requires = "tap")]
        port: u16,
        #[command(flatten)]
        on: IscsiTap,
        /// Write received messages under this directory (DIR/PIPE-SESSION/NNNNNN).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        tls: MsgTls,
    },
    /// Send a file or N bytes over one pipe of --connections connections, cut into
    /// messages dealt to --sessions sessions; prints the goodput and each session's
    /// SHA-256 (the server prints the same). From std TCP, or from an emulated TOE host
    /// on a TAP device (--tap NAME --ip ADDR/PREFIX).
    Send {
        /// The server, ADDR:PORT.
        #[arg(long)]
        to: std::net::SocketAddr,
        #[command(flatten)]
        on: IscsiTap,
        /// With --tap: the path's bandwidth the transfer plans for, Mbit/s (with
        /// --path-rtt-ms). The transfer is then the bulk transfer of `toemu bulk-bench`:
        /// primed (--reserves of the connections in reserve, default none), in
        /// sub-transfers of four bandwidth-delay products, paced from its delivery-rate
        /// estimate (starting at a tenth of this) and spaced per packet in the NIC, each
        /// connection's socket buffers its share of twice the bandwidth-delay product.
        #[arg(long, requires_all = ["tap", "path_rtt_ms"])]
        path_mbit: Option<f64>,
        /// The path's round-trip time the transfer plans for, ms (with --path-mbit).
        #[arg(long, requires = "path_mbit")]
        path_rtt_ms: Option<f64>,
        /// The file to send ...
        #[arg(long, conflicts_with = "bytes")]
        file: Option<PathBuf>,
        /// ... or this many bytes of a pattern, made as it is sent (message m holds
        /// toemu's generator seeded 1 + m; K, KiB, M, MiB, G, GiB).
        #[arg(long)]
        bytes: Option<String>,
        /// TCP connections in the pipe.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Sessions.
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Bytes per message.
        #[arg(long, default_value = "1MiB")]
        message: String,
        /// The principal sessions ask for (with --tls, the server certificate's name).
        #[arg(long, default_value = "store")]
        principal: String,
        /// The transfer's service-level objective, carried as the DSCP of every packet of
        /// its connections: bulk (AF11, 10), interactive (AF21, 18), critical (EF, 46).
        /// Without it packets go unmarked.
        #[arg(long)]
        slo: Option<toe_msg::Slo>,
        /// Run the transfer as primed sub-transfers (seed 003 #1): this many of the
        /// connections are primed reserves, brought in for stragglers. On std TCP the
        /// kernel does not say what it has acknowledged, so rates are what each socket
        /// took.
        #[arg(long)]
        reserves: Option<usize>,
        /// Priming bytes per connection, with --reserves (default 256KiB; with
        /// --path-mbit, half each connection's share of the bandwidth-delay product,
        /// 64 KiB to 4 MiB).
        #[arg(long)]
        prime: Option<String>,
        /// Write one JSON line per message (its timestamps on both clocks, µs) to FILE.
        #[arg(long)]
        latency_log: Option<PathBuf>,
        #[command(flatten)]
        tls: MsgTls,
    },
    /// Make a CA and certificates for trying --tls: DIR/ca.pem and, per name,
    /// DIR/NAME.pem and DIR/NAME.key.
    Certs {
        /// Where to write them.
        #[arg(long)]
        dir: PathBuf,
        /// Names to issue certificates for (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "store,backup")]
        names: Vec<String>,
    },
}

fn msg(cmd: MsgCmd, settings: &Settings) -> Result<(), String> {
    use std::io::Write as _;
    match cmd {
        MsgCmd::Serve {
            listen,
            port,
            on,
            dir,
            tls,
        } => {
            let security = tls.security()?;
            let Some(listen) = listen else {
                let tap = on
                    .tap_args()
                    .ok_or("--listen ADDR:PORT or --tap NAME --ip A/P")?;
                let mut app = toemu_lab::msg_toe::MsgServerApp::new(
                    port,
                    security,
                    dir,
                    toe_msg::PipeConfig::default(),
                );
                return run_on_tap(settings, &tap, &mut app);
            };
            let mut out = std::io::stdout();
            toemu_lab::msg::serve(listen, dir, security, stop_flag(), |line| {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            })
            .map_err(|e| e.to_string())
        }
        MsgCmd::Send {
            to,
            on,
            path_mbit,
            path_rtt_ms,
            file,
            bytes,
            connections,
            sessions,
            message,
            principal,
            slo,
            reserves,
            prime,
            latency_log,
            tls,
        } => {
            let security = tls.security()?;
            let data = match (file, bytes) {
                (Some(f), _) => toemu_lab::msg::Payload::Bytes(
                    std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?,
                ),
                (None, Some(b)) => toemu_lab::msg::Payload::Pattern {
                    len: parse_size(&b).map_err(|e| format!("--bytes: {e}"))?,
                    seed: 1,
                },
                (None, None) => return Err("--file F or --bytes N".into()),
            };
            let mut o = toemu_lab::msg::SendOptions::new(to, data);
            o.principal = principal;
            o.connections = connections;
            o.sessions = sessions;
            o.message_bytes = parse_size(&message).map_err(|e| format!("--message: {e}"))? as usize;
            o.slo = slo;
            if reserves.is_some_and(|r| r >= connections) {
                return Err(format!(
                    "--reserves {}: leaves no active connection of {connections}",
                    reserves.unwrap_or(0)
                ));
            }
            let prime = prime
                .map(|p| parse_size(&p).map(|v| v as usize))
                .transpose()
                .map_err(|e| format!("--prime: {e}"))?;
            let tap = on.tap_args();
            let mut settings = settings.clone();
            if let (Some(mbit), Some(rtt_ms)) = (path_mbit, path_rtt_ms) {
                if !(mbit > 0.0 && mbit.is_finite() && rtt_ms > 0.0 && rtt_ms.is_finite()) {
                    return Err(format!(
                        "--path-mbit {mbit} --path-rtt-ms {rtt_ms}: not a path"
                    ));
                }
                use toemu_lab::bulk_bench as bb;
                let link = bb::BulkLink {
                    bytes_per_s: mbit * 1e6 / 8.0,
                    rtt_ms,
                    loss: 0.0,
                    mtu: settings.mtu,
                    queue_bytes: 0,
                };
                let r = reserves.unwrap_or(0);
                bb::plan_bulk(&mut o, &link, connections - r, r, prime, true);
                bb::size_queues(&mut o, &link);
                bb::size_host(&mut settings, &o, &link);
            } else if let Some(r) = reserves {
                o.bulk = Some(toe_msg::BulkConfig {
                    active: connections - r,
                    prime_bytes: prime.unwrap_or(256 << 10),
                    ..toe_msg::BulkConfig::default()
                });
            }
            println!(
                "toemu msg send: {} bytes to {to} over {} connections, {} sessions, {}-byte messages, {}, {}",
                o.data.len(),
                o.connections,
                o.sessions,
                o.message_bytes,
                security.describe(),
                slo.map_or("unmarked".to_string(), |s| format!("objective {s}"))
            );
            let r = match &tap {
                Some(tap) => {
                    let socket_buf = settings.socket_buf_bytes as usize;
                    let mut app = toemu_lab::msg_toe::MsgSendApp::new(o, security, tap.stack_seed)
                        .with_conn_send_bytes(socket_buf);
                    run_on_tap(&settings, tap, &mut app)?;
                    app.report()?
                }
                None => {
                    let pb = indicatif::ProgressBar::new(o.data.len());
                    let r = toemu_lab::msg::send(
                        &o,
                        &security,
                        |n| pb.set_position(n),
                        |l| pb.println(l),
                    )
                    .map_err(|e| e.to_string())?;
                    pb.finish_and_clear();
                    r
                }
            };
            println!(
                "toemu msg send: {} bytes in {} messages acknowledged in {:.3} s ({:.1} MB/s), {} failed",
                r.bytes,
                r.messages,
                r.seconds,
                r.bytes as f64 / r.seconds.max(1e-9) / 1e6,
                r.failed
            );
            println!("toemu msg send: {}", r.latency.describe());
            if let Some(b) = r.bulk {
                println!(
                    "toemu msg send: {} connections primed ({} bytes), {} sub-transfers, {} stragglers dropped, {} reserves brought in, {} bytes resent",
                    b.primed, b.prime_bytes, b.subtransfers, b.stragglers_dropped, b.reserves_promoted, r.resent_bytes
                );
            }
            if let Some(path) = &latency_log {
                toemu_lab::msg::write_latency_log(path, &r.times)
                    .map_err(|e| format!("--latency-log {}: {e}", path.display()))?;
                println!(
                    "toemu msg send: latency log of {} messages in {}",
                    r.times.len(),
                    path.display()
                );
            }
            for (i, (n, sha)) in r.sessions.iter().enumerate() {
                println!(
                    "toemu msg send: session {}: {n} messages, sha256 {sha}",
                    i + 1
                );
            }
            if r.failed > 0 {
                return Err(format!("{} messages failed", r.failed));
            }
            Ok(())
        }
        MsgCmd::Certs { dir, names } => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let ca = toe_msg::TestCa::new("toemu msg CA").map_err(|e| e.to_string())?;
            let write = |name: &str, text: &str| {
                let p = dir.join(name);
                std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
            };
            write("ca.pem", &ca.pem())?;
            for n in &names {
                let (cert, key) = ca.issue_pem(n).map_err(|e| e.to_string())?;
                write(&format!("{n}.pem"), &cert)?;
                write(&format!("{n}.key"), &key)?;
            }
            println!(
                "toemu msg certs: {}/ca.pem and a certificate and key for {}",
                dir.display(),
                names.join(", ")
            );
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
// Parsed once per run: the size of the target's variant (its wire options) does not matter.
#[allow(clippy::large_enum_variant)]
enum IscsiCmd {
    /// Discovery with toemu's initiator: the targets a portal offers, and with -s their
    /// LUNs (type and size).
    Ls {
        /// `iscsi://[user%secret@]host[:port]/` (`?header_digest=crc32c` for digests).
        url: String,
        /// Log in to each target and list its LUNs.
        #[arg(short = 's', long)]
        show_luns: bool,
    },
    /// toemu's initiator as a load generator: READ(16) or WRITE(16) at a queue depth;
    /// prints IOPS, MB/s and latency p50/p99. Exits non-zero on any command error and, with
    /// --verify, on any block read back different from what was written.
    Perf {
        /// `iscsi://[user%secret@]host[:port]/IQN/LUN[?header_digest=crc32c&data_digest=crc32c]`.
        url: String,
        /// Bytes per I/O (K, KiB, ...): a multiple of the LUN's block size.
        #[arg(long, default_value = "4KiB")]
        block: String,
        /// Commands kept in flight.
        #[arg(long, default_value_t = 32)]
        depth: usize,
        /// Duration of the timed phase, seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Stop after this many bytes (K, KiB, M, MiB, G, GiB) instead of after --seconds.
        #[arg(long)]
        bytes: Option<String>,
        /// Write instead of read.
        #[arg(long)]
        write: bool,
        /// Write a pattern seeded by (seed, LBA), then read back every block written and
        /// compare.
        #[arg(long)]
        verify: bool,
        /// Random I/O slots instead of sequential ones.
        #[arg(long)]
        random: bool,
        /// Seed of the pattern and the random slots.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Writes with FUA (forced unit access).
        #[arg(long)]
        fua: bool,
        /// SYNCHRONIZE CACHE after the writes.
        #[arg(long)]
        sync: bool,
        /// No writes: read back and compare what `--write` with the same --bytes, --block,
        /// --random and --seed wrote (for example after the target restarted).
        #[arg(long, requires = "bytes", conflicts_with_all = ["write", "verify"])]
        check: bool,
        /// Write the figures as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        on: IscsiTap,
        /// Where the data path runs: `engine` (the NIC's iSCSI engine; the default with
        /// --tap) or `software` (the only one on std TCP).
        #[arg(long)]
        offload: Option<String>,
    },
    /// toemu's initiator against toemu's target on two emulated TOE hosts on the in-memory
    /// wire, on the virtual clock: 4 KiB and 128 KiB QD32 reads and writes, without and with
    /// digests; modeled IOPS, MB/s and latency, and host copies and digest bytes per data
    /// byte.
    Bench {
        /// Write the figures as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Backup-style 256 KiB writes from toemu's initiator to toemu's target over an
    /// emulated asymmetric WAN (1 Gbit/s forward, 10 Mbit/s reverse, 50 ms RTT, 0.01% loss,
    /// MTU 1500), on the virtual clock, at queue depth 1, 8 and 32, in three modes:
    /// `classic` (RFC defaults), `unsolicited` (data with the command) and `accelerated`
    /// (seed 000's write acceleration). Prints a table; writes JSON and an SVG chart.
    WanBench {
        /// Write the figures as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the chart of throughput against depth (SVG) to this path.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Fewer writes per run (a quick look; the figures are noisier).
        #[arg(long)]
        quick: bool,
        /// Turn parts of the target's write acceleration off, comma-separated:
        /// combined-ack, dynamic-r2t, batching, backoff.
        #[arg(long, value_delimiter = ',')]
        without: Vec<String>,
        /// Turn on parts that are off by default, comma-separated: batching.
        #[arg(long, value_delimiter = ',')]
        with: Vec<String>,
        /// Frame loss probability of each direction (default 0.0001).
        #[arg(long, value_parser = toe_host::wire_opts::parse_probability)]
        loss: Option<f64>,
        /// Queue depths to run, comma-separated (default 1,8,32).
        #[arg(long, value_delimiter = ',')]
        depth: Vec<usize>,
        /// A write-back target whose store takes this many MB/s (10^6 bytes), so that its
        /// write buffer fills (default: the store keeps up).
        #[arg(long)]
        destage_mb_per_s: Option<u64>,
        /// The target's write buffer that dynamic R2T and back-off watch, MiB (default 32).
        #[arg(long)]
        buffer_mib: Option<u64>,
    },
    /// A target cluster with proxy I/O (seed 001) laid out by a TOML file: every member an
    /// emulated TOE host with a front and a back NIC, the volume served by the primary on
    /// port 3261 (each member's own LUN on 3260). With --tap the primary's front NIC is on
    /// that TAP device for real initiators and the cluster runs in real time until SIGINT
    /// or SIGTERM; without it, on the virtual clock, toemu's initiator writes --bytes of
    /// seeded data through the primary and reads them back (exit non-zero on a mismatch).
    /// The layout is the `[cluster]` table of the global `--config FILE` (whose other keys
    /// are the hosts' settings): `members`, `member_blocks`, optional `block_bytes`,
    /// `stripe_blocks`, `extents` ([{lba, blocks, member, member_lba}]) and
    /// `member_timeout_ms`.
    Cluster {
        /// Header and data digests (CRC32C) on the primary's back sessions (and, without
        /// --tap, on the initiator's session).
        #[arg(long)]
        digests: bool,
        /// Without --tap: bytes to write and read back (K, KiB, M, MiB, ...).
        #[arg(long, default_value = "64MiB")]
        bytes: String,
        /// With --tap: stop after this many seconds.
        #[arg(long)]
        max_seconds: Option<f64>,
        #[command(flatten)]
        on: IscsiTap,
    },
    /// 128 KiB QD32 writes and reads through the primary of a three-member cluster
    /// against the same load sent directly to one member, on the virtual clock, same run,
    /// alternating: throughput, latency, host copies per byte on the serving machine and
    /// an integrity check. Exits non-zero if any data came back wrong.
    ClusterBench {
        /// Write the figures as JSON to this path.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Bytes per run (K, KiB, M, MiB, ...; a multiple of 128 KiB).
        #[arg(long, default_value = "64MiB")]
        bytes: String,
        /// Rounds of (direct, proxy), the order alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Header and data digests (CRC32C) on every connection.
        #[arg(long)]
        digests: bool,
    },
    /// An iSCSI target whose LUN 0 is a disk in a file, on std TCP or on an emulated TOE
    /// host on a TAP device; runs until SIGINT or
    /// SIGTERM, then flushes the disk and prints its counters.
    Target {
        /// The disk: a file (created if missing).
        #[arg(long)]
        lun: PathBuf,
        /// Its size (K, KiB, M, MiB, G, GiB); the file grows to it. Default: the file's size.
        #[arg(long)]
        size: Option<String>,
        /// The target's name.
        #[arg(long, default_value = "iqn.2026-12.org.toemu:disk")]
        iqn: String,
        /// Where to listen on std TCP, ADDR:PORT (default 127.0.0.1:3260, unless --tap).
        #[arg(long, conflicts_with = "tap")]
        listen: Option<String>,
        /// On an emulated TOE host on a TAP device instead: its port.
        #[arg(long, default_value_t = 3260)]
        port: u16,
        #[command(flatten)]
        on: IscsiTap,
        /// Logical block size, bytes (512 or 4096).
        #[arg(long, default_value_t = 512)]
        block: u32,
        /// Require CHAP: this initiator user name ...
        #[arg(long, requires = "chap_secret")]
        chap_user: Option<String>,
        /// ... with this secret.
        #[arg(long, requires = "chap_user")]
        chap_secret: Option<String>,
        /// Mutual CHAP: the name the target answers with ...
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        /// ... and its secret.
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
        /// NOP-In keep-alive: ping an initiator idle this many seconds (0: never) ...
        #[arg(long, default_value_t = 30.0)]
        nop_interval: f64,
        /// ... and drop it if it does not answer within this many seconds.
        #[arg(long, default_value_t = 30.0)]
        nop_timeout: f64,
        /// Where the data path runs: `engine` (the NIC's iSCSI engine: digests, placement
        /// by task tag, large PDU send; the default with --tap) or `software` (the only
        /// one on std TCP).
        #[arg(long)]
        offload: Option<String>,
    },
}

/// The data path of `--offload`: the NIC's engine by default on an emulated TOE host
/// (`tap`), and software, the only one there is, on std TCP.
fn data_path(offload: Option<&str>, tap: bool) -> Result<toemu_lab::iscsi_host::Offload, String> {
    use toemu_lab::iscsi_host::Offload;
    match (offload.map(str::parse::<Offload>).transpose()?, tap) {
        (Some(Offload::Engine), false) => Err(
            "--offload engine: the NIC's iSCSI engine needs an emulated TOE host (--tap); std TCP has only `software`".into(),
        ),
        (Some(o), _) => Ok(o),
        (None, true) => Ok(Offload::Engine),
        (None, false) => Ok(Offload::Software),
    }
}

/// `toemu iscsi ...`; `settings` configure the emulated host of `--tap`.
fn iscsi(
    cmd: IscsiCmd,
    settings: &Settings,
    config_file: Option<&std::path::Path>,
) -> Result<(), String> {
    match cmd {
        IscsiCmd::Ls { url, show_luns } => {
            let u: toemu_lab::iscsi::IscsiUrl = url.parse()?;
            let out = toemu_lab::iscsi::ls(&u, show_luns).map_err(|e| format!("{url}: {e}"))?;
            print!("{out}");
            Ok(())
        }
        IscsiCmd::Bench { json } => {
            let opts = toemu_lab::iscsi_host::BenchOptions::default();
            let (model, rows) = toemu_lab::iscsi_host::bench(settings, opts, |r| {
                eprintln!(
                    "  {} {} B QD{} digests {} {}: {:.0} IOPS modeled ({:.2} s wall)",
                    r.op,
                    r.io_bytes,
                    r.depth,
                    r.digests,
                    r.offload.name(),
                    r.modeled_iops,
                    r.wall_seconds
                )
            })
            .map_err(|e| e.to_string())?;
            print!("{}", toemu_lab::iscsi_host::bench_table(&model, &rows));
            if let Some(path) = json {
                write_json(&path, &serde_json::json!({ "model": model, "rows": rows }))?;
            }
            Ok(())
        }
        IscsiCmd::WanBench {
            json,
            svg,
            quick,
            without,
            with,
            loss,
            depth,
            destage_mb_per_s,
            buffer_mib,
        } => {
            let mut o = toemu_lab::wan::WanOptions {
                destage_bytes_per_s: destage_mb_per_s.map(|m| m * 1_000_000),
                ..toemu_lab::wan::WanOptions::default()
            };
            if let Some(b) = buffer_mib {
                o.accel.buffer_bytes = b << 20;
            }
            if let Some(l) = loss {
                o.link.loss = l;
            }
            if !depth.is_empty() {
                o.depths = depth;
            }
            if quick {
                o.writes_per_depth = 4;
                o.min_writes = 16;
            }
            for part in &with {
                match part.as_str() {
                    "batching" => o.accel.batch_responses = true,
                    other => return Err(format!("--with {other}: expected batching")),
                }
            }
            for part in &without {
                match part.as_str() {
                    "combined-ack" => o.accel.combined_ack = false,
                    "dynamic-r2t" => o.accel.dynamic_r2t = false,
                    "batching" => o.accel.batch_responses = false,
                    "backoff" => o.accel.backoff = false,
                    other => {
                        return Err(format!(
                            "--without {other}: expected combined-ack, dynamic-r2t, batching \
                             or backoff"
                        ))
                    }
                }
            }
            let report = toemu_lab::wan::wan_bench(&o, |r| {
                eprintln!(
                    "  {} QD{}: {:.1} MB/s modeled, {:.1} reverse packets/MiB ({:.2} s wall)",
                    r.mode.name(),
                    r.depth,
                    r.throughput_bytes_per_s / 1e6,
                    r.reverse_packets_per_mib,
                    r.wall_seconds
                )
            })
            .map_err(|e| e.to_string())?;
            print!("{}", toemu_lab::wan::wan_table(&report));
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
            if let Some(path) = svg {
                toemu_lab::wan::wan_chart(&report, &path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let bad = report.runs.iter().filter(|r| !r.integrity_ok).count();
            if bad > 0 {
                return Err(format!("{bad} run(s) failed their integrity check"));
            }
            Ok(())
        }
        IscsiCmd::Cluster {
            digests,
            bytes,
            max_seconds,
            on,
        } => {
            let config = config_file
                .ok_or("toemu iscsi cluster needs --config FILE with a [cluster] table")?;
            cluster(settings, config, digests, &bytes, max_seconds, on)
        }
        IscsiCmd::ClusterBench {
            json,
            bytes,
            rounds,
            digests,
        } => {
            let o = toemu_lab::cluster_bench::BenchOptions {
                bytes: parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?,
                rounds,
                digests,
                ..toemu_lab::cluster_bench::BenchOptions::default()
            };
            let r = toemu_lab::cluster_bench::run(settings, &o).map_err(|e| e.to_string())?;
            print!("{}", r.table());
            if let Some(path) = json {
                write_json(&path, &r)?;
            }
            if r.integrity_ok() {
                Ok(())
            } else {
                Err("data came back different from what was written".into())
            }
        }
        IscsiCmd::Perf {
            url,
            block,
            depth,
            seconds,
            bytes,
            write,
            verify,
            random,
            seed,
            fua,
            sync,
            check,
            json,
            on,
            offload,
        } => {
            let u: toemu_lab::iscsi::IscsiUrl = url.parse()?;
            let io_bytes = parse_size(&block).map_err(|e| format!("--block: {e}"))?;
            let o = toemu_lab::iscsi_perf::PerfOptions {
                io_bytes: u32::try_from(io_bytes)
                    .map_err(|_| format!("--block {block}: at most 4 GiB"))?,
                depth,
                seconds,
                bytes: bytes
                    .map(|b| parse_size(&b).map_err(|e| format!("--bytes: {e}")))
                    .transpose()?,
                write,
                verify,
                random,
                seed,
                fua,
                sync,
                check_only: check,
            };
            let on = on.tap_args();
            let offload = data_path(offload.as_deref(), on.is_some())?;
            let r = match on {
                Some(tap) => {
                    let random = toemu_lab::iscsi::random_bytes()
                        .map_err(|e| format!("/dev/urandom: {e}"))?;
                    let mut app =
                        toemu_lab::iscsi_host::PerfApp::new(&u, o, random)?.with_offload(offload);
                    run_on_tap(settings, &tap, &mut app)?;
                    app.report().map_err(|e| format!("{}: {e}", u.portal))?
                }
                None => {
                    toemu_lab::iscsi_perf::perf(&u, &o).map_err(|e| format!("{}: {e}", u.portal))?
                }
            };
            println!(
                "toemu iscsi perf: {} LUN {} ({} bytes, {}-byte blocks), {} B I/O, depth {}, {}, header digest {}, data digest {}",
                r.target,
                r.lun,
                r.capacity_bytes,
                r.block_bytes,
                r.io_bytes,
                r.depth,
                if r.random { "random" } else { "sequential" },
                if r.header_digest { "CRC32C" } else { "none" },
                if r.data_digest { "CRC32C" } else { "none" },
            );
            println!("  data path {}", offload.name());
            for p in &r.phases {
                println!(
                    "  {:5} {:>9} I/Os {:>12} bytes in {:.2} s: {:.0} IOPS, {:.1} MB/s, latency p50 {:.0} us p99 {:.0} us, errors {}",
                    p.op, p.ios, p.bytes, p.seconds, p.iops, p.mb_per_s, p.latency_us.p50, p.latency_us.p99, p.errors
                );
            }
            if let Some(m) = r.mismatches {
                println!("  verify: {m} I/Os read back differ from what was written");
            }
            if let Some(json) = &json {
                write_json(json, &r)?;
            }
            match (r.ok(), &r.first_problem) {
                (true, _) => Ok(()),
                (false, Some(p)) => Err(format!("perf failed: {p}")),
                (false, None) => Err("perf failed".into()),
            }
        }
        IscsiCmd::Target {
            lun,
            size,
            iqn,
            listen,
            port,
            on,
            block,
            chap_user,
            chap_secret,
            mutual_user,
            mutual_secret,
            nop_interval,
            nop_timeout,
            offload,
        } => {
            use toe_iscsi::login::{Credentials, TargetConfig};
            let on = on.tap_args();
            let offload = data_path(offload.as_deref(), on.is_some())?;
            if block != 512 && block != 4096 {
                return Err(format!("--block {block}: 512 or 4096"));
            }
            let size = size
                .map(|s| parse_size(&s).map_err(|e| format!("--size: {e}")))
                .transpose()?;
            let store = toemu_lab::iscsi::FileStore::open(&lun, size)
                .map_err(|e| format!("--lun {}: {e}", lun.display()))?;
            let bytes = toe_iscsi::scsi::BlockStore::len(&store);
            let disk = std::sync::Arc::new(std::sync::Mutex::new(toe_iscsi::scsi::Disk::new(
                Box::new(store),
                block,
                "TOEMU0001",
            )));
            let cred = |u: Option<String>, s: Option<String>| {
                u.zip(s).map(|(user, secret)| Credentials {
                    user,
                    secret: secret.into_bytes(),
                })
            };
            let cfg = TargetConfig {
                chap: cred(chap_user, chap_secret),
                mutual: cred(mutual_user, mutual_secret),
                ..TargetConfig::offering_digests(&iqn)
            };
            let auth = if cfg.chap.is_some() { "CHAP" } else { "none" };
            let us = |s: f64| (s.max(0.0) * 1e6) as u64;
            let keepalive = (nop_interval > 0.0).then(|| toe_iscsi::target::KeepAlive {
                interval_us: us(nop_interval),
                timeout_us: us(nop_timeout).max(1),
            });
            let announce = |portal: &dyn std::fmt::Display, on: &str| {
                println!(
                    "toemu iscsi target: portal {portal}{on}, {iqn}, LUN 0 = {} ({bytes} bytes, {block}-byte blocks), authentication {auth}, offload {}",
                    lun.display(),
                    offload.name(),
                );
            };
            let totals = if let Some(tap) = on {
                let (ip, _) = toemu_lab::serve::parse_cidr(&tap.ip)?;
                let portal = format!("{ip}:{port}");
                let seed = u64::from_le_bytes(
                    toemu_lab::iscsi::random_bytes().map_err(|e| format!("/dev/urandom: {e}"))?,
                );
                let mut app =
                    toemu_lab::iscsi_host::TargetApp::new(port, cfg, &portal, disk.clone(), seed)
                        .with_offload(offload);
                if let Some(k) = keepalive {
                    app = app.with_keepalive(k);
                }
                announce(&portal, &format!(" (emulated TOE host on {})", tap.tap));
                let mut l = Listening {
                    port,
                    inner: &mut app,
                    listening: false,
                };
                // On SIGTERM, sessions are asked to log out and given 5 s to.
                run_on_tap(settings, &tap, &mut l)?;
                if app.open_connections() > 0 {
                    eprintln!(
                        "toemu iscsi target: {} connections did not log out in 5 s",
                        app.open_connections()
                    );
                }
                app.totals
            } else {
                let listen = listen.unwrap_or_else(|| "127.0.0.1:3260".into());
                let listener = std::net::TcpListener::bind(&listen)
                    .map_err(|e| format!("--listen {listen}: {e}"))?;
                let stop = stop_flag();
                let t = toemu_lab::iscsi::TcpTarget::start_with(
                    listener,
                    cfg,
                    Some(disk.clone()),
                    keepalive,
                )
                .map_err(|e| e.to_string())?;
                announce(&t.addr(), "");
                let mut t = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                // Sessions are asked to log out (Async Message) and given 5 s to.
                let left = t.stop_gracefully(std::time::Duration::from_secs(5));
                if left > 0 {
                    eprintln!("toemu iscsi target: {left} connections did not log out in 5 s");
                }
                let totals = t.totals();
                drop(t);
                totals
            };
            let flushed = disk
                .lock()
                .map_err(|_| "disk lock poisoned".to_string())?
                .execute(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
            let s = totals.stats;
            println!(
                "toemu iscsi target: stopped; flushed {}; connections {} pdus_in {} pdus_out {} rejects {} data_digest_errors {} data_sequence_errors {}",
                if flushed.status == 0 { "ok" } else { "FAILED" },
                totals.connections,
                s.pdus_in,
                s.pdus_out,
                s.rejects,
                s.data_digest_errors,
                s.data_sequence_errors
            );
            Ok(())
        }
    }
}

/// `toemu iscsi cluster`.
fn cluster(
    settings: &Settings,
    config: &std::path::Path,
    digests: bool,
    bytes: &str,
    max_seconds: Option<f64>,
    on: IscsiTap,
) -> Result<(), String> {
    use toemu_lab::cluster::{self, ClusterConfig, VOLUME_IQN, VOLUME_PORT};
    let cfg = ClusterConfig::from_file(config)?;
    let map = cfg.map()?;
    let layout = |portal: &dyn std::fmt::Display| {
        println!(
            "toemu iscsi cluster: {} members, volume {VOLUME_IQN} at {portal} ({} blocks of {} bytes) in {} extents; member m's own LUN {}<m> on port 3260",
            cfg.members,
            map.blocks(),
            cfg.block_bytes,
            map.extents().len(),
            cluster::member_iqn(0).trim_end_matches('0'),
        );
    };
    let Some(mut tap) = on.tap_args() else {
        // On the virtual clock: toemu's initiator writes through the primary and reads back.
        let bytes = parse_size(bytes).map_err(|e| format!("--bytes: {e}"))?;
        let mut c = cluster::Cluster::new(settings, &cfg, digests, 1).map_err(|e| e.to_string())?;
        layout(&format!("{}:{VOLUME_PORT}", cluster::front_addr(0)));
        if !c.wait_ready(10_000_000).map_err(|e| e.to_string())? {
            return Err("the primary's back sessions did not come up".into());
        }
        let q = if digests {
            "?header_digest=crc32c&data_digest=crc32c"
        } else {
            ""
        };
        let url: toemu_lab::iscsi::IscsiUrl = format!(
            "iscsi://{}:{VOLUME_PORT}/{VOLUME_IQN}/0{q}",
            cluster::front_addr(0)
        )
        .parse()?;
        let o = toemu_lab::iscsi_perf::PerfOptions {
            io_bytes: 128 << 10,
            depth: 32,
            bytes: Some(bytes),
            write: true,
            verify: true,
            ..toemu_lab::iscsi_perf::PerfOptions::default()
        };
        let mut perf = toemu_lab::iscsi_host::PerfApp::new(&url, o, [1; 23])?;
        for line in c.run(&mut perf, u64::MAX).map_err(|e| e.to_string())? {
            println!("{line}");
        }
        let r = perf.report()?;
        for p in &r.phases {
            println!(
                "  {:5} {:>12} bytes in {:.3} s (virtual): {:.1} MB/s, latency p50 {:.0} us p99 {:.0} us, errors {}",
                p.op, p.bytes, p.seconds, p.mb_per_s, p.latency_us.p50, p.latency_us.p99, p.errors
            );
        }
        println!("  proxy: {:?}", c.proxy_stats());
        return match (r.ok(), r.first_problem) {
            (true, _) => Ok(()),
            (false, p) => Err(format!("read back wrong: {}", p.unwrap_or_default())),
        };
    };
    tap.max_seconds = max_seconds;
    let (ip, prefix) = toemu_lab::serve::parse_cidr(&tap.ip)?;
    let (phy, wire) = tap.open()?;
    let nic = toemu_lab::serve::nic_for(ip, prefix, tap.gateway, tap.stack_seed);
    let seed = u64::from_le_bytes(
        toemu_lab::iscsi::random_bytes().map_err(|e| format!("/dev/urandom: {e}"))?,
    );
    // Real time is the machine's own speed: the cost model is for the virtual clock.
    let parts = cluster::build(
        &settings.clone().without_costs(),
        &cfg,
        digests,
        seed,
        Some(cluster::FrontPort { nic, phy }),
    )
    .map_err(|e| e.to_string())?;
    let hub = parts.servers.hub.clone();
    layout(&format!(
        "{ip}:{VOLUME_PORT} (emulated TOE host on {}, {})",
        tap.tap,
        wire.describe()
    ));
    let max = tap.max_seconds.map(std::time::Duration::from_secs_f64);
    let mut out = std::io::stdout();
    let hosts = cluster::run_realtime(parts, max, stop_flag(), |line| {
        use std::io::Write as _;
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
    .map_err(|e| e.to_string())?;
    if let Some(p) = &wire.pcap {
        p.flush().map_err(|e| format!("--pcap: {e}"))?;
    }
    let s = hub
        .lock()
        .map_err(|_| "hub lock poisoned".to_string())?
        .stats;
    println!(
        "toemu iscsi cluster: stopped; {} hosts; proxy {s:?}",
        hosts.len()
    );
    Ok(())
}

fn settings(cli: &Cli) -> Result<Settings, String> {
    let mut overrides = Vec::new();
    if let Some(w) = &cli.indicate_window {
        overrides.push(("indicate_window_bytes".to_string(), w.clone()));
    }
    for kv in &cli.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        overrides.push((k.trim().to_string(), v.trim().to_string()));
    }
    Settings::load(cli.config.as_deref(), std::env::vars(), &overrides).map_err(|e| e.to_string())
}

/// A flag set by SIGINT/SIGTERM so real-time runs end cleanly (final counters printed); a
/// second signal still kills the process.
fn stop_flag() -> &'static std::sync::atomic::AtomicBool {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, std::sync::atomic::Ordering::Relaxed) {
            std::process::exit(130);
        }
    });
    &STOP
}

/// Write `v` as pretty JSON to `path`.
fn write_json(path: &std::path::Path, v: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_on_tap(
    settings: &Settings,
    tap: &TapArgs,
    app: &mut dyn toemu_apps::App,
) -> Result<(), String> {
    let (ip, prefix) = toemu_lab::serve::parse_cidr(&tap.ip)?;
    let (phy, wire) = tap.open()?;
    let nic = toemu_lab::serve::nic_for(ip, prefix, tap.gateway, tap.stack_seed);
    let max = tap.max_seconds.map(std::time::Duration::from_secs_f64);
    eprintln!(
        "toemu: {} on {} at {}/{} (policy {}, W = {} bytes, {})",
        app.name(),
        tap.tap,
        ip,
        prefix,
        settings.policy,
        settings.indicate_window_bytes,
        wire.describe()
    );
    let r = toemu_lab::serve::run_app_realtime(settings, nic, phy, app, max, stop_flag())
        .map_err(|e| e.to_string());
    if let Some(p) = &wire.pcap {
        p.flush().map_err(|e| format!("--pcap: {e}"))?;
    }
    r
}

fn run(cli: Cli) -> Result<(), String> {
    let settings = settings(&cli)?;
    match cli.cmd {
        Cmd::Iscsi { cmd } => iscsi(cmd, &settings, cli.config.as_deref()),
        Cmd::Msg { cmd } => msg(cmd, &settings),
        Cmd::BulkBench {
            json,
            svg,
            bytes,
            connections,
            reserves,
            prime_bytes,
            modes,
            loss,
            queue_bdp,
        } => {
            use toemu_lab::bulk_bench as bb;
            let mut o = bb::BulkOptions {
                bytes: parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?,
                connections,
                reserves,
                prime_bytes: prime_bytes
                    .map(|p| parse_size(&p).map(|v| v as usize))
                    .transpose()
                    .map_err(|e| format!("--prime-bytes: {e}"))?,
                ..bb::BulkOptions::default()
            };
            if !modes.is_empty() {
                o.modes = modes;
            }
            if let Some(l) = loss {
                o.link.loss = l;
            }
            if let Some(q) = queue_bdp {
                o.link.queue_bytes = (q * o.link.bdp_bytes() as f64) as usize;
            }
            let report = bb::bulk_bench(&o, |r| {
                eprintln!(
                    "  {}: {:.1} MB/s over {} connections, {} bottleneck drops ({:.1} s wall)",
                    r.mode.name(),
                    r.goodput_bytes_per_s / 1e6,
                    r.connections,
                    r.bottleneck_drops,
                    r.wall_seconds
                )
            })
            .map_err(|e| e.to_string())?;
            print!("{}", bb::bulk_table(&report));
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
            if let Some(path) = svg {
                bb::bulk_chart(&report, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let bad = report.runs.iter().filter(|r| !r.integrity_ok).count();
            if bad > 0 {
                return Err(format!("{bad} run(s) failed their integrity check"));
            }
            Ok(())
        }
        Cmd::Serve {
            tap,
            app,
            port,
            dir,
            rate,
            rx,
        } => {
            let mode = rx.mode()?;
            let rate = rate
                .map(|r| parse_size(&r).map_err(|e| format!("--rate: {e}")))
                .transpose()?;
            let port = port.unwrap_or(match app {
                AppKind::Echo => 7,
                AppKind::Http => 80,
                AppKind::Sink => 9,
            });
            let mut app: Box<dyn toemu_apps::App> = match app {
                AppKind::Echo => Box::new(toemu_apps::echo::Echo::new(port, mode)),
                AppKind::Http => Box::new(toemu_apps::http::Http::new(port, mode, dir)),
                AppKind::Sink => Box::new(toemu_apps::sink::Sink::new(port, mode, rate)),
            };
            // The app listens through the host's driver: wrap it so the first poll listens.
            let mut app = Listening {
                port,
                inner: app.as_mut(),
                listening: false,
            };
            run_on_tap(&settings, &tap, &mut app)
        }
        Cmd::Send {
            tap,
            to,
            bytes,
            seed,
        } => {
            let bytes = parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?;
            let mut app = toemu_apps::sink::SendClient::new(to, bytes, seed);
            run_on_tap(&settings, &tap, &mut app)?;
            match app.error {
                Some(e) => Err(e),
                None if toemu_apps::App::done(&app) => Ok(()),
                None => Err("send did not finish in time".into()),
            }
        }
        Cmd::Get { tap, url } => {
            let (to, path) = toemu_apps::http::parse_url(&url)?;
            let mut app = toemu_apps::http::Get::new(to, path);
            run_on_tap(&settings, &tap, &mut app)?;
            match app.error {
                Some(e) => Err(e),
                None if toemu_apps::App::done(&app) => Ok(()),
                None => Err("get did not finish in time".into()),
            }
        }
        Cmd::Bench {
            quick,
            no_scale,
            only,
            scale,
            no_scale_baselines,
            check,
            json,
        } => {
            let check = match check.as_str() {
                "crc32c" => toemu_lab::datagen::Check::Crc32c,
                "sha256" => toemu_lab::datagen::Check::Sha256,
                other => return Err(format!("--check: {other:?} is not crc32c or sha256")),
            };
            let mut o = if quick {
                toemu_lab::bench::BenchOptions::quick(settings)
            } else {
                toemu_lab::bench::BenchOptions::full(settings)
            };
            if !scale.is_empty() {
                o.scale = scale;
            }
            o.scale_baselines = !no_scale_baselines;
            if no_scale {
                o.scale.clear();
            }
            if !only.is_empty() {
                for s in &only {
                    if !["bulk", "rr", "scale"].contains(&s.as_str()) {
                        return Err(format!("--only: {s:?} is not bulk, rr or scale"));
                    }
                }
                o.bulk = only.iter().any(|s| s == "bulk");
                o.rr = only.iter().any(|s| s == "rr");
                if !only.iter().any(|s| s == "scale") {
                    o.scale.clear();
                }
            }
            o.check = check;
            o.heap_live = Some(heap_live);
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(200));
            let t0 = std::time::Instant::now();
            let report = toemu_lab::bench::run_bench(&o, |line| {
                pb.println(line);
                pb.set_message(format!("{:.0} s", t0.elapsed().as_secs_f64()));
            })
            .map_err(|e| e.to_string())?;
            pb.finish_and_clear();
            print!("{}", toemu_lab::bench::bench_table(&report));
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Sweep {
            w,
            bytes,
            rr_iters,
            modes,
            out,
            rate_mbit,
            compare,
            report,
        } => {
            if rate_mbit == 0 {
                return Err("--rate-mbit: the modeled wire needs a rate above 0".into());
            }
            let compare = compare
                .map(|spec| -> Result<_, String> {
                    let mut s = settings.clone();
                    for kv in spec.split(',').filter(|kv| !kv.trim().is_empty()) {
                        let (k, v) = kv
                            .split_once('=')
                            .ok_or_else(|| format!("--compare: {kv:?} is not KEY=VALUE"))?;
                        s.apply_override(k.trim(), v.trim())
                            .map_err(|e| format!("--compare: {e}"))?;
                    }
                    s.validate().map_err(|e| format!("--compare: {e}"))?;
                    Ok((spec, s))
                })
                .transpose()?;
            let mut o = toemu_lab::sweep::SweepOptions {
                w_values: toemu_lab::sweep::parse_w_range(&w).map_err(|e| format!("--w: {e}"))?,
                bytes: parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?,
                rr_iters,
                settings,
                wire_rate_mbit: rate_mbit,
                compare,
                ..toemu_lab::sweep::SweepOptions::default()
            };
            if !modes.is_empty() {
                o.modes = modes
                    .iter()
                    .map(|m| m.parse::<Mode>())
                    .collect::<Result<Vec<_>, _>>()?;
            }
            let points = toemu_lab::sweep::run_sweep(&o, |l| eprintln!("  {l}"))
                .map_err(|e| e.to_string())?;
            print!("{}", toemu_lab::sweep::sweep_table(&points));
            let mut files =
                toemu_lab::sweep::write_sweep(&out, &o, &points).map_err(|e| e.to_string())?;
            if report {
                let command = std::env::args().collect::<Vec<_>>().join(" ");
                files.push(
                    toemu_lab::report::write_sweep_report(&out, &o, &points, &command)
                        .map_err(|e| format!("--report: {e}"))?,
                );
            }
            for f in files {
                eprintln!("wrote {}", f.display());
            }
            Ok(())
        }
        Cmd::Timeline { bytes, seed, out } => {
            let bytes = parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?;
            let n = toemu_lab::plot::timeline_demo(&settings, bytes, seed, &out)
                .map_err(|e| e.to_string())?;
            eprintln!("wrote {} ({n} samples of P and I)", out.display());
            Ok(())
        }
        Cmd::BareSink { tap, port } => {
            let (ip, prefix) = toemu_lab::serve::parse_cidr(&tap.ip)?;
            let (phy, wire) = tap.open()?;
            let nic = toemu_lab::serve::nic_for(ip, prefix, tap.gateway, tap.stack_seed);
            let max = tap.max_seconds.map(std::time::Duration::from_secs_f64);
            eprintln!(
                "toemu: bare-smoltcp sink on {} at {ip}/{prefix} port {port} ({})",
                tap.tap,
                wire.describe()
            );
            let r =
                toemu_lab::bare_tap::run_bare_sink(&settings, &nic, phy, port, max, stop_flag())
                    .map_err(|e| e.to_string());
            if let Some(p) = &wire.pcap {
                p.flush().map_err(|e| format!("--pcap: {e}"))?;
            }
            r
        }
        Cmd::Gen { bytes, seed } => {
            use std::io::Write;
            let bytes = parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?;
            let mut g = toemu_lab::datagen::DataGen::new(seed);
            let mut buf = vec![0u8; 1 << 20];
            let mut out = std::io::stdout().lock();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                g.fill(&mut buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                left -= n as u64;
            }
            Ok(())
        }
        Cmd::Demo {
            bytes,
            rr_iters,
            modes,
            seed,
            json,
            named_buf,
            named_bufs,
            repeat,
            trace,
            wire,
        } => {
            let mut wire = wire_args::wire_options(&wire)?;
            // Modeled figures need a wire rate: without --rate-mbit, the default machine's.
            if wire.impair.rate_bits_per_s.is_none() {
                wire.impair.rate_bits_per_s =
                    Some(toe_host::config::DEFAULT_WIRE_RATE_MBIT * 1_000_000);
            }
            let trace_writer = trace
                .as_ref()
                .map(|p| {
                    toe_host::trace::file_writer(p)
                        .map_err(|e| format!("--trace {}: {e}", p.display()))
                })
                .transpose()?;
            let named_buf_bytes =
                parse_size(&named_buf).map_err(|e| format!("--named-buf: {e}"))? as usize;
            if named_buf_bytes == 0 || named_bufs == 0 || repeat == 0 {
                return Err("--named-buf, --named-bufs and --repeat must be at least 1".into());
            }
            let bytes = parse_size(&bytes).map_err(|e| format!("--bytes: {e}"))?;
            if bytes == 0 {
                return Err("--bytes: must be at least 1".into());
            }
            let modes = if modes.is_empty() {
                Mode::ALL.to_vec()
            } else {
                modes
                    .iter()
                    .map(|m| m.parse::<Mode>())
                    .collect::<Result<Vec<_>, _>>()?
            };
            let opts = DemoOptions {
                bytes,
                rr_iters,
                settings: settings.clone(),
                seed,
                modes,
                named_buf_bytes,
                named_bufs,
                repeat,
                wire: wire.clone(),
                trace: trace_writer.clone(),
                ..DemoOptions::default()
            };
            eprintln!(
                "toemu demo: {} bytes per transfer, W = {} bytes, MTU {}, {} request/response exchanges, wire: {}",
                bytes,
                settings.indicate_window_bytes,
                settings.mtu,
                rr_iters,
                wire.describe()
            );
            let runs = run_demo(&opts, |line| eprintln!("  {line}")).map_err(|e| e.to_string())?;
            print!("{}", table(&runs));
            if let Some(w) = &trace_writer {
                w.lock().flush().map_err(|e| format!("--trace: {e}"))?;
            }
            if let Some(p) = &wire.pcap {
                p.flush().map_err(|e| format!("--pcap: {e}"))?;
            }
            let ok = runs.iter().all(|r| r.integrity_ok);
            if let Some(path) = json {
                let report = DemoReport {
                    runs,
                    setup: serde_json::json!({
                        "indicate_window_bytes": settings.indicate_window_bytes,
                        "mtu": settings.mtu,
                        "socket_buf_bytes": settings.socket_buf_bytes,
                        "anon_buf_bytes": settings.anon_buf_bytes,
                        "rr_iters": rr_iters,
                        "repeat": repeat,
                        "named_buf_bytes": named_buf_bytes,
                        "named_bufs": named_bufs,
                        "seed": seed,
                        "clock": "virtual (single thread): modeled_* figures are virtual time under the cost model; seconds, throughput_bytes_per_s and rr_latency_us are the emulator's wall clock",
                        "cost_model": settings.cost_model_json(),
                        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                        "wire": wire.describe(),
                    }),
                };
                write_json(&path, &report)?;
            }
            if !ok {
                return Err("integrity check FAILED".into());
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    env_logger::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toemu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the host listen on the app's port before the app's first poll.
struct Listening<'a> {
    port: u16,
    inner: &'a mut dyn toemu_apps::App,
    listening: bool,
}

impl toemu_apps::App for Listening<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn poll(
        &mut self,
        d: &mut toe_driver::Driver,
        now: toe_bus::time::Instant,
    ) -> std::io::Result<bool> {
        if !self.listening {
            d.listen(self.port, 64, None)
                .map_err(|e| std::io::Error::other(format!("listen on {}: {e}", self.port)))?;
            self.listening = true;
        }
        self.inner.poll(d, now)
    }
    fn take_log(&mut self) -> Vec<String> {
        self.inner.take_log()
    }
    fn done(&self) -> bool {
        self.inner.done()
    }
    fn stop(&mut self) -> bool {
        self.inner.stop()
    }
}

/// Counts heap allocations so that `toemu bench` can report memory per connection.
#[global_allocator]
static ALLOC: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Heap bytes currently allocated.
fn heap_live() -> i64 {
    let s = ALLOC.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}
