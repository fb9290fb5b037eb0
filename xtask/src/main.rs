//! `cargo xtask`: project automation for toemu, with nothing but the standard library.
//!
//! - `cargo xtask ci`: every gate CI runs, in order, stopping at the first failure: rustfmt
//!   check, clippy with warnings denied, rustdoc with warnings denied, the tests.
//! - `cargo xtask test`: only the test step (`cargo test --workspace --profile checked`).
//! - `cargo xtask tap-test [basic|hostile]`: (root) real Linux programs against an emulated
//!   host on TAP, and the hostile-peer suite.
//! - `cargo xtask soak`: the impaired-wire integrity matrix (`tests/impair.rs`) at 1 GiB per
//!   cell.
//! - `cargo xtask fuzz`: the iSCSI PDU decoder, text-key parser, login machine, target and
//!   initiator connections and the SCSI disk, and toe-msg's frame decoder, on a million
//!   arbitrary inputs each.
//!
//! Tests run in the `checked` profile (release with overflow checks and debug assertions)
//! because the integration tests move hundreds of MiB. Before the tests, the system tools they
//! need (`TEST_TOOLS`) are installed with apt-get if missing (root), or the task fails and
//! names the command to run.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod iscsi_bench;
mod tap_test;

/// One gate: a cargo invocation with optional extra environment.
struct Step {
    /// Short name for progress and failure messages.
    name: &'static str,
    /// Arguments after `cargo`.
    args: &'static [&'static str],
    /// Extra environment variables.
    env: &'static [(&'static str, &'static str)],
}

/// `cargo fmt --all -- --check`.
const FMT: Step = Step {
    name: "fmt",
    args: &["fmt", "--all", "--", "--check"],
    env: &[],
};

/// `cargo clippy --workspace --all-targets -- -D warnings`.
const CLIPPY: Step = Step {
    name: "clippy",
    args: &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    env: &[],
};

/// `cargo doc --workspace --no-deps` with rustdoc warnings denied.
const DOC: Step = Step {
    name: "doc",
    args: &["doc", "--workspace", "--no-deps"],
    env: &[("RUSTDOCFLAGS", "-D warnings")],
};

/// `cargo test --workspace --profile checked`.
const TEST: Step = Step {
    name: "test",
    args: &["test", "--workspace", "--profile", "checked"],
    env: &[],
};

/// System tools the tests run, as (command, Debian package). `tests/impair.rs` and
/// `tests/iscsi_wire.rs` read pcap captures with tshark; `tests/iscsi_libiscsi.rs` runs
/// libiscsi's tools against the iSCSI target.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("tshark", "tshark"),
    ("iscsi-ls", "libiscsi-bin"),
    ("tgtd", "tgt"),
];

/// `cargo xtask soak`: the integrity matrix over the impaired wire at 1 GiB per cell, with the
/// per-cell progress lines.
const SOAK: Step = Step {
    name: "soak",
    args: &[
        "test",
        "--profile",
        "checked",
        "-p",
        "toemu-tests",
        "--test",
        "impair",
        "--",
        "--include-ignored",
        "--nocapture",
    ],
    env: &[("TOEMU_SOAK_BYTES", "1GiB")],
};

/// `cargo xtask fuzz`: the iSCSI PDU decoder, text-key parser and negotiation, login
/// machine, target and initiator connections and the SCSI disk (command sequences from
/// three nexuses) fed a million arbitrary inputs each (the tests run 256): every
/// `arbitrary_*` proptest of toe-iscsi.
const FUZZ: Step = Step {
    name: "fuzz",
    args: &[
        "test",
        "--profile",
        "checked",
        "-p",
        "toe-iscsi",
        "arbitrary_",
    ],
    env: &[("PROPTEST_CASES", "1000000")],
};

/// `cargo xtask fuzz`, second part: toe-msg's frame decoder on a million arbitrary inputs.
const FUZZ_MSG: Step = Step {
    name: "fuzz-msg",
    args: &[
        "test",
        "--profile",
        "checked",
        "-p",
        "toe-msg",
        "arbitrary_",
    ],
    env: &[("PROPTEST_CASES", "1000000")],
};

/// The gates of `cargo xtask ci`, in order.
const CI: &[&Step] = &[&FMT, &CLIPPY, &DOC, &TEST];

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci     run every CI gate in order, stopping at the first failure:
           cargo fmt --all -- --check
           cargo clippy --workspace --all-targets -- -D warnings
           RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps
           cargo test --workspace --profile checked
  test   run only the tests: cargo test --workspace --profile checked
         (release with overflow checks and debug assertions)
         ci and test first install what the tests run if missing: tshark,
         libiscsi-bin, tgt (apt-get as root; otherwise they fail and name the command)
  tap-test [basic | hostile [burst|psh-flood|syn-flood|vanishing-peer|slowloris]...]
         (root) the emulated host on a TAP device in a fresh network namespace, driven by
         curl, socat, nc, ping and python3 -m http.server (basic), then the hostile-peer
         suite: connection bursts, a 1-byte PSH flood, spoofed SYNs, a peer that vanishes,
         slowloris, each with the host's memory bounded (hostile, or the scenarios named);
         default both; the namespaces are always deleted
  bench [--quick] [--no-scale] [--json PATH]
         toemu bench: every receive mode against bare smoltcp and kernel loopback TCP
  iscsi-bench [SECONDS] [ROUNDS]
         (root) iscsi-perf and toemu iscsi perf against toemu's target and tgt on 127.0.0.1,
         alternating runs of SECONDS (default 5, 3 rounds): 4 KiB and 128 KiB QD32 reads,
         4 KiB with header digests; medians and ratios, target/iscsi-bench.json
  iscsi-tap-bench [SECONDS] [ROUNDS]
         (root) iscsi-perf 128 KiB QD32 reads from toemu's target on a TAP host, with the NIC's
         iSCSI engine and with software, beside curl from the http app on the same TAP (the
         ceiling), alternating (default 5 s, 3 rounds); medians, target/iscsi-tap-bench.json
  tap-bench [BYTES] [ROUNDS]
         (root) socat into the TOE sink and into a bare-smoltcp sink on the same TAP,
         alternating rounds (default 1 GiB, 3 rounds); medians and ratios, target/tap-bench.json
  msg-tap-bench [BYTES] [ROUNDS]
         (root) issue 12's TAP comparison on one impaired wire (25 ms each way, 1 Gbit/s,
         0.01% loss): one Linux BBR stream (socat) into the emulated host's sink, and toemu's
         bulk transfer from an emulated host to msg serve on Linux (24 connections; 16 and 40
         with 4 and 8 reserves), alternating rounds (default 1 GiB, 3 rounds); medians, ratios to BBR,
         target/msg-tap-bench.json
  soak   TOEMU_SOAK_BYTES=1GiB cargo test --profile checked -p toemu-tests --test impair
           -- --include-ignored --nocapture
         the impaired-wire integrity matrix at 1 GiB per transfer (24 cells x 4 modes)
  fuzz   PROPTEST_CASES=1000000 cargo test --profile checked -p toe-iscsi arbitrary_
         (and -p toe-msg): toe-iscsi's decoder, text keys, login and connections, and
         toe-msg's frame decoder, on a million arbitrary inputs each
  help   print this message";

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo that runs us (`$CARGO`), or `cargo` from `PATH`.
fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs `step` in the workspace root; `Err` carries a message naming the failed step.
fn run(step: &Step, root: &Path) -> Result<(), String> {
    let shown: Vec<String> = step
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .chain(std::iter::once("cargo".to_string()))
        .chain(step.args.iter().map(|a| a.to_string()))
        .collect();
    let shown = shown.join(" ");
    eprintln!("xtask: [{}] {shown}", step.name);
    let started = Instant::now();
    let status = Command::new(cargo())
        .args(step.args)
        .envs(step.env.iter().copied())
        .current_dir(root)
        .status()
        .map_err(|e| format!("step `{}` could not start ({shown}): {e}", step.name))?;
    if status.success() {
        eprintln!(
            "xtask: [{}] ok ({:.1} s)",
            step.name,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        let how = status.code().map_or_else(
            || "was killed by a signal".to_string(),
            |c| format!("exited with status {c}"),
        );
        Err(format!("step `{}` FAILED: `{shown}` {how}", step.name))
    }
}

/// Whether `bin` is on `PATH` (`command -v`).
fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether we run as root (`id -u` prints 0).
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs the Debian packages of the `tools` (command, package) that are not on `PATH`:
/// as root `apt-get update` once, then `apt-get install -y` (non-interactive, so tshark's
/// question about non-root capture does not block); otherwise an error naming the one command
/// to run. `who` prefixes progress and error messages.
pub(crate) fn ensure_tools(who: &str, tools: &[(&str, &str)]) -> Result<(), String> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs = missing.join(" ");
    if !is_root() {
        return Err(format!(
            "{who}: missing system packages the tests need; install them with: \
             sudo apt-get install -y {pkgs}"
        ));
    }
    eprintln!("xtask: {who}: installing {pkgs} (apt-get)");
    let apt = |args: &[&str]| -> Result<(), String> {
        let shown = format!("apt-get {}", args.join(" "));
        let s = Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .status()
            .map_err(|e| format!("{who}: `{shown}` could not start: {e}"))?;
        if s.success() {
            Ok(())
        } else {
            Err(format!("{who}: `{shown}` failed ({s})"))
        }
    };
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq"][..], &missing].concat())?;
    let still: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(bin, _)| *bin)
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{who}: installed {pkgs} but still missing: {}",
            still.join(" ")
        ))
    }
}

/// Runs `steps` in order, stopping at the first failure.
fn run_all(steps: &[&Step]) -> Result<(), String> {
    let root = workspace_root();
    let started = Instant::now();
    for step in steps {
        if std::ptr::eq(*step, &TEST) || std::ptr::eq(*step, &SOAK) {
            ensure_tools(step.name, TEST_TOOLS)?;
        }
        run(step, &root)?;
    }
    let names: Vec<&str> = steps.iter().map(|s| s.name).collect();
    eprintln!(
        "xtask: all steps passed ({}) in {:.1} s",
        names.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["ci"] => run_all(CI),
        ["test"] => run_all(&[&TEST]),
        ["soak"] => run_all(&[&SOAK]),
        ["fuzz"] => run_all(&[&FUZZ, &FUZZ_MSG]),
        ["tap-test"] => tap_test::run(&workspace_root(), tap_test::Suite::All, &[]),
        ["tap-test", "basic"] => tap_test::run(&workspace_root(), tap_test::Suite::Basic, &[]),
        ["tap-test", "hostile", only @ ..] => {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            tap_test::run(&workspace_root(), tap_test::Suite::Hostile, &only)
        }
        ["bench", rest @ ..] => {
            let root = workspace_root();
            let mut c = Command::new(cargo());
            c.current_dir(&root)
                .args(["run", "--release", "-p", "toemu", "--", "bench"])
                .args(rest);
            match c.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("toemu bench failed: {s}")),
                Err(e) => Err(format!("toemu bench: {e}")),
            }
        }
        ["iscsi-bench", rest @ ..] => {
            let seconds = rest.first().map_or(Ok(5u32), |s| {
                s.parse::<u32>()
                    .map_err(|_| format!("iscsi-bench: SECONDS must be a number, got {s:?}"))
            });
            let rounds = rest.get(1).map_or(Ok(3usize), |s| {
                s.parse::<usize>()
                    .map_err(|_| format!("iscsi-bench: ROUNDS must be a number, got {s:?}"))
            });
            match (seconds, rounds) {
                (Ok(s), Ok(r)) if r > 0 => iscsi_bench::bench(&workspace_root(), s, r),
                (Err(e), _) | (_, Err(e)) => Err(e),
                _ => Err("iscsi-bench: ROUNDS must be at least 1".into()),
            }
        }
        ["iscsi-tap-bench", rest @ ..] => {
            let num = |i: usize, default: usize, what: &str| {
                rest.get(i).map_or(Ok(default), |s| {
                    s.parse::<usize>()
                        .map_err(|_| format!("iscsi-tap-bench: {what} must be a number, got {s:?}"))
                })
            };
            match (num(0, 5, "SECONDS"), num(1, 3, "ROUNDS")) {
                (Ok(s), Ok(r)) => {
                    tap_test::iscsi_bench(&workspace_root(), s.max(1) as u32, r.max(1))
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        ["tap-bench", rest @ ..] => {
            let bytes = rest.first().map_or(Ok(1u64 << 30), |s| {
                s.parse::<u64>()
                    .map_err(|_| format!("tap-bench: BYTES must be a number, got {s:?}"))
            });
            let rounds = rest.get(1).map_or(Ok(3usize), |s| {
                s.parse::<usize>()
                    .map_err(|_| format!("tap-bench: ROUNDS must be a number, got {s:?}"))
            });
            match (bytes, rounds) {
                (Ok(b), Ok(r)) => tap_test::bench(&workspace_root(), b, r.max(1)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        ["msg-tap-bench", rest @ ..] => {
            let bytes = rest.first().map_or(Ok(1u64 << 30), |s| {
                s.parse::<u64>()
                    .map_err(|_| format!("msg-tap-bench: BYTES must be a number, got {s:?}"))
            });
            let rounds = rest.get(1).map_or(Ok(3usize), |s| {
                s.parse::<usize>()
                    .map_err(|_| format!("msg-tap-bench: ROUNDS must be a number, got {s:?}"))
            });
            match (bytes, rounds) {
                (Ok(b), Ok(r)) => tap_test::msg_bench::run(&workspace_root(), b, r.max(1)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        ["help"] | ["-h"] | ["--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [] => Err(format!("no task given\n\n{USAGE}")),
        other => Err(format!("unknown task `{}`\n\n{USAGE}", other.join(" "))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
