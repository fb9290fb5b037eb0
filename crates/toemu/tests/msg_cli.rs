//! `toemu msg` between two processes on loopback over std TCP: `certs`, `serve --tls` and
//! `send --tls`; the server's per-session SHA-256 matches the sender's, the files it wrote
//! hold the data, and a wrong principal or a certificate of another CA is refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOEMU: &str = env!("CARGO_BIN_EXE_toemu");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("toemu-msg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn toemu(args: &[&str]) -> (bool, String) {
    let o = Command::new(TOEMU).args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn tls_args(dir: &Path, who: &str) -> Vec<String> {
    vec![
        "--tls".into(),
        "--cert".into(),
        dir.join(format!("{who}.pem")).display().to_string(),
        "--key".into(),
        dir.join(format!("{who}.key")).display().to_string(),
        "--ca".into(),
        dir.join("ca.pem").display().to_string(),
    ]
}

/// `toemu msg serve` on an ephemeral loopback port; stopped by PID on drop.
struct Server {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[String]) -> Server {
        let mut child = Command::new(TOEMU)
            .args(["msg", "serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10)).unwrap();
        let addr = first
            .split_once("listening on ")
            .and_then(|(_, r)| r.split(',').next())
            .unwrap_or_else(|| panic!("{first}"))
            .to_string();
        Server { child, addr, lines }
    }

    /// Lines until `n` of them contain `what` (10 s at most).
    fn wait_for(&self, what: &str, n: usize) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.iter().filter(|l: &&String| l.contains(what)).count() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("no {n} lines with {what:?}: {seen:?}"),
            }
        }
        seen
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        toemu_tests::stop_by_pid(&mut self.child, Duration::from_secs(5));
    }
}

fn sha256_lines(text: &str, marker: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split("sha256 ").nth(1).map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn two_processes_move_data_over_tls_and_refuse_the_wrong_peers() {
    let d = scratch("tls");
    let certs = d.join("certs");
    let (ok, out) = toemu(&[
        "msg",
        "certs",
        "--dir",
        certs.to_str().unwrap(),
        "--names",
        "store,backup",
    ]);
    assert!(ok, "{out}");
    let files = d.join("files");
    let mut sargs = tls_args(&certs, "store");
    sargs.extend(["--dir".into(), files.display().to_string()]);
    let server = Server::start(&sargs);
    let mut args: Vec<String> = [
        "msg",
        "send",
        "--to",
        &server.addr,
        "--bytes",
        "8MiB",
        "--connections",
        "4",
        "--sessions",
        "2",
        "--message",
        "300KiB",
        "--principal",
        "store",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(tls_args(&certs, "backup"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, sent) = toemu(&a);
    assert!(ok, "{sent}");
    assert!(
        sent.contains("TLS 1.3") && sent.contains("0 failed"),
        "{sent}"
    );
    let got = server.wait_for("closed:", 2).join("\n");
    assert_eq!(
        sha256_lines(&got, "closed:"),
        sha256_lines(&sent, "session"),
        "the server's hashes are the sender's:\n{got}\n{sent}"
    );
    // The files, session by session, hold the pattern dealt round robin.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2);
    // `--bytes` sends a pattern: message m holds the generator seeded 1 + m.
    let total = 8usize << 20;
    let chunks: Vec<Vec<u8>> = (0..total.div_ceil(300 << 10))
        .map(|m| {
            let mut v = vec![0u8; (300usize << 10).min(total - m * (300 << 10))];
            toemu_lab::datagen::DataGen::new(1 + m as u64).fill(&mut v);
            v
        })
        .collect();
    for (k, dir) in dirs.iter().enumerate() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let want: Vec<u8> = chunks
            .iter()
            .skip(k)
            .step_by(2)
            .flat_map(|c| c.iter().copied())
            .collect();
        let have: Vec<u8> = names
            .iter()
            .flat_map(|n| std::fs::read(n).unwrap())
            .collect();
        assert!(
            have == want,
            "session {k}: {} bytes, want {}",
            have.len(),
            want.len()
        );
    }
    // The wrong principal: the server's certificate is not valid for it.
    let mut wrong = a.clone();
    let at = wrong.iter().position(|s| *s == "store").unwrap();
    wrong[at] = "vault";
    let (ok, out) = toemu(&wrong);
    assert!(!ok && out.contains("not valid for name"), "{out}");
    // A client certificate from another CA (the client trusts the server's CA).
    let other = d.join("other");
    assert!(
        toemu(&[
            "msg",
            "certs",
            "--dir",
            other.to_str().unwrap(),
            "--names",
            "backup"
        ])
        .0
    );
    let mut stranger = args.clone();
    let cert_at = stranger.iter().position(|s| s == "--cert").unwrap();
    stranger[cert_at + 1] = other.join("backup.pem").display().to_string();
    stranger[cert_at + 3] = other.join("backup.key").display().to_string();
    let s: Vec<&str> = stranger.iter().map(String::as_str).collect();
    let (ok, out) = toemu(&s);
    assert!(!ok, "{out}");
    // Plaintext only when asked, and said so.
    let plain = Server::start(&[]);
    let (ok, out) = toemu(&["msg", "send", "--to", &plain.addr, "--bytes", "1MiB"]);
    assert!(ok && out.contains("PLAINTEXT"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bulk_bench_writes_its_json_and_chart() {
    let d = std::env::temp_dir().join(format!("toemu-bulk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let (json, svg) = (d.join("bulk.json"), d.join("bulk.svg"));
    let (ok, out) = toemu(&[
        "bulk-bench",
        "--bytes",
        "4MiB",
        "--modes",
        "one-stream,bulk,bulk-unpaced",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("paced against unpaced"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["link"]["bytes_per_s"], 125e6, "{v}");
    assert_eq!(v["link"]["rtt_ms"], 50.0, "{v}");
    assert_eq!(v["link"]["loss"], 1e-4, "{v}");
    let runs = v["runs"].as_array().unwrap();
    let modes: Vec<(&str, u64)> = runs
        .iter()
        .map(|r| {
            (
                r["mode"].as_str().unwrap(),
                r["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [("one-stream", 1), ("bulk", 40), ("bulk-unpaced", 40)]
    );
    // The bulk modes: 32 active connections and 8 reserves, all primed before data.
    for r in &runs[1..] {
        let p = &r["planner"];
        assert_eq!(p["primed"], 40, "{r}");
        assert!(p["subtransfers"].as_u64().unwrap() >= 1, "{r}");
        assert!(p["data_from_us"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(runs[0]["planner"].is_null(), "one stream has no planner");
    for r in runs {
        assert_eq!(r["integrity_ok"], true, "{r}");
        assert!(r["goodput_bytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bottleneck_drops"].is_u64(), "{r}");
        assert!(
            !r["goodput_over_time"].as_array().unwrap().is_empty(),
            "{r}"
        );
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.contains("<svg") && chart.contains("bulk-unpaced"),
        "{chart:.200}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}
