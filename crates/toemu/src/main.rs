//! The `toemu` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use toemu::config::{parse_size, Settings};
use toemu::demo::{run_demo, table, DemoOptions, DemoReport, Mode};

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Two emulated hosts on the in-memory wire: bulk transfer with a SHA-256 check and
    /// 64-byte request/response per receive mode, plus the bare-smoltcp baseline.
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
    },
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

fn run(cli: Cli) -> Result<(), String> {
    let settings = settings(&cli)?;
    match cli.cmd {
        Cmd::Demo {
            bytes,
            rr_iters,
            modes,
            seed,
            json,
            named_buf,
            named_bufs,
            repeat,
        } => {
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
                ..DemoOptions::default()
            };
            eprintln!(
                "toemu demo: {} bytes per transfer, W = {} bytes, MTU {}, {} request/response exchanges",
                bytes, settings.indicate_window_bytes, settings.mtu, rr_iters
            );
            let runs = run_demo(&opts, |line| eprintln!("  {line}")).map_err(|e| e.to_string())?;
            print!("{}", table(&runs));
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
                        "clock": "virtual (single thread); seconds and latencies are wall-clock",
                        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                    }),
                };
                let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
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
