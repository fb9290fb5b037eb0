//! The message transport (toe-msg) on the emulated TOE: toemu's sender and storage server
//! apps on two emulated hosts over the in-memory wire, on the virtual clock; messages of
//! megabytes over emulated TCP, checked by SHA-256 on both ends, on a perfect wire and
//! under the impairment matrix.

use toe_host::config::Settings;
use toe_host::runtime::BoxPhy;
use toe_host::wire_opts::PcapTarget;
use toe_msg::Slo;
use toe_msg::{Config, PipeConfig};
use toe_nic::impair::{ImpairConfig, Impaired};
use toe_nic::pcap::Pcap;
use toemu_apps::App;
use toemu_lab::msg::{Blame, Payload, Security, SendOptions, SendReport, SessionResult};
use toemu_lab::msg_toe::{MsgSendApp, MsgServerApp};
use toemu_lab::serve::run_apps_sim;

/// Run `o` from host 0 to the server on host 1 over the wire `impair` (both directions;
/// `None`: perfect), with the server's pipe limits `server_cfg`. Returns the sender's
/// report and what the server received, after checking they agree.
fn run(
    o: SendOptions,
    server_cfg: PipeConfig,
    impair: Option<ImpairConfig>,
) -> (SendReport, Vec<SessionResult>) {
    let server = MsgServerApp::new(o.to.port(), Security::Plain, None, server_cfg);
    run_with(o, server, impair)
}

/// [`run`] against `server`, on the wire `impair` (both directions).
fn run_with(
    o: SendOptions,
    server: MsgServerApp,
    impair: Option<ImpairConfig>,
) -> (SendReport, Vec<SessionResult>) {
    let (pa, pb) = toe_nic::wire(4096);
    let (a, b): (BoxPhy, BoxPhy) = match impair {
        Some(i) => (
            Box::new(Impaired::new(pa, ImpairConfig { seed: 11, ..i }).unwrap()),
            Box::new(Impaired::new(pb, ImpairConfig { seed: 12, ..i }).unwrap()),
        ),
        None => (Box::new(pa), Box::new(pb)),
    };
    run_on(o, server, a, b)
}

/// [`run_with`] on the ports `a` (the sender's, host 0) and `b` (the server's, host 1).
fn run_on(
    o: SendOptions,
    mut server: MsgServerApp,
    a: BoxPhy,
    b: BoxPhy,
) -> (SendReport, Vec<SessionResult>) {
    let mut s = Settings::default();
    s.socket_buf_bytes = 4 << 20;
    s.congestion = toe_nic::Congestion::Cubic;
    let sim = toe_host::pair::hosts(&s, &s, 5, a, b).unwrap();
    let mut sender = MsgSendApp::new(o, Security::Plain, 0x5eed);
    let log = run_apps_sim(&sim, &mut sender, &mut server, 200_000_000).unwrap();
    let report = sender
        .report()
        .unwrap_or_else(|e| panic!("sender: {e}; log: {log:?}"));
    // A slow receiving application may still be taking what was acknowledged.
    for _ in 0..10_000_000 {
        if server.results().len() >= report.sessions.len() {
            break;
        }
        sim.step_or_idle_bounded(server.poll_at()).unwrap();
        server.poll(&mut sim.driver(1).lock(), sim.now()).unwrap();
    }
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        toemu_lab::msg::sessions_agree(&report, server.results()),
        "every session's messages, in order, intact: sent {:?}, received {:?}",
        report.sessions,
        server.results()
    );
    (report, server.results().to_vec())
}

fn opts(bytes: u64, connections: usize, sessions: usize) -> SendOptions {
    let mut o = SendOptions::new(
        "10.0.0.2:7000".parse().unwrap(),
        Payload::Pattern {
            len: bytes,
            seed: 9,
        },
    );
    o.connections = connections;
    o.sessions = sessions;
    o
}

#[test]
fn megabyte_messages_cross_a_pipe_of_emulated_connections_whole_and_in_order() {
    // 48 messages of 1 to 8 MiB over 24 connections: the sender's 12 MiB output queue
    // rarely holds two of them (queue full, retried), and the server's 3 input slots
    // shut the window while several arrive at once (stall, then resume).
    let mut o = opts(200 << 20, 24, 6);
    o.message_bytes = 1 << 20;
    o.message_max_bytes = Some(8 << 20);
    o.pipe.session = Config {
        out_queue_bytes: 12 << 20,
        ..Config::default()
    };
    let server_cfg = PipeConfig {
        session: Config {
            in_queue_bytes: 16 << 20,
            in_slots: 3,
            ..Config::default()
        },
        ..PipeConfig::default()
    };
    let (r, got) = run(o, server_cfg, None);
    assert_eq!(r.bytes, 200 << 20);
    assert_eq!(r.failed, 0);
    assert_eq!(got.len(), 6);
    assert_eq!(got.iter().map(|s| s.bytes).sum::<u64>(), 200 << 20);
    assert!(r.messages >= 40, "{} messages", r.messages);
    assert!(r.queue_full > 0, "the output queue filled: {r:?}");
    assert!(
        r.stalls > 0 && r.resumes > 0,
        "window 0 and reopened: {r:?}"
    );
    eprintln!(
        "{} MiB in {:.3} s of virtual time: {:.0} MB/s; {} queue-full waits, {} stalls",
        r.bytes >> 20,
        r.seconds,
        r.bytes as f64 / r.seconds / 1e6,
        r.queue_full,
        r.stalls
    );
}

#[test]
fn the_impairment_matrix_loses_duplicates_and_corrupts_no_message() {
    // TCP hands the pipe each connection's stream in order whatever the wire does (a
    // corrupted frame fails its checksum and is retransmitted).
    let base = ImpairConfig {
        delay: toe_bus::time::Duration::from_millis(2),
        ..ImpairConfig::default()
    };
    let matrix = [
        ("loss 2%", ImpairConfig { loss: 0.02, ..base }),
        (
            "reorder 5%",
            ImpairConfig {
                reorder: 0.05,
                ..base
            },
        ),
        ("duplicate 5%", ImpairConfig { dup: 0.05, ..base }),
        (
            "corrupt 1%",
            ImpairConfig {
                corrupt: 0.01,
                ..base
            },
        ),
        (
            "all at once",
            ImpairConfig {
                loss: 0.01,
                reorder: 0.02,
                dup: 0.02,
                corrupt: 0.005,
                ..base
            },
        ),
    ];
    for (name, i) in matrix {
        let mut o = opts(12 << 20, 8, 4);
        o.message_bytes = 256 << 10;
        o.message_max_bytes = Some(1 << 20);
        let (r, got) = run(o, PipeConfig::default(), Some(i));
        assert_eq!(r.bytes, 12 << 20, "{name}");
        assert_eq!(r.failed, 0, "{name}");
        assert_eq!(got.iter().map(|s| s.bytes).sum::<u64>(), 12 << 20, "{name}");
        eprintln!("{name}: {} messages in {:.3} s", r.messages, r.seconds);
    }
}

#[test]
fn a_primed_transfer_with_reserves_runs_in_sub_transfers_and_survives_a_lossy_wire() {
    // 6 active connections and 2 reserves, all primed before data flows, on a wire
    // losing 2% of frames: connections stall in timeouts, their data frames go out
    // again on the others, stragglers are dropped and reserves brought in; every message
    // arrives once, intact, in order (checked by `run`).
    let mut o = opts(24 << 20, 8, 4);
    o.message_bytes = 256 << 10;
    o.message_max_bytes = Some(1 << 20);
    o.bulk = Some(toe_msg::BulkConfig {
        active: 6,
        prime_bytes: 64 << 10,
        subtransfer_bytes: 2 << 20,
        ..toe_msg::BulkConfig::default()
    });
    let lossy = ImpairConfig {
        delay: toe_bus::time::Duration::from_millis(5),
        loss: 0.02,
        ..ImpairConfig::default()
    };
    let (r, got) = run(o, PipeConfig::default(), Some(lossy));
    assert_eq!(got.iter().map(|s| s.bytes).sum::<u64>(), 24 << 20);
    let b = r.bulk.expect("the planner ran");
    assert_eq!(b.primed, 8, "every connection primed: {b:?}");
    assert_eq!(b.prime_bytes, 8 * (64 << 10), "{b:?}");
    assert!(b.data_from_us.is_some_and(|t| t > 0), "{b:?}");
    assert!(b.subtransfers >= 8, "24 MiB in 2 MiB sub-transfers: {b:?}");
    assert!(
        b.stragglers_dropped > 0 && b.reserves_promoted > 0,
        "2% loss makes stragglers: {b:?}"
    );
    assert!(r.resent_bytes > 0, "stalled frames went out again: {r:?}");
    eprintln!(
        "{b:?}; {} bytes resent; {:.1} MB/s",
        r.resent_bytes,
        r.bytes as f64 / r.seconds / 1e6
    );
}

#[test]
fn the_latency_summary_tells_a_slow_receiving_application_from_a_slow_network() {
    // The same transfer twice: a receiving application that takes 10 MB/s on a fast
    // wire, then a fast application behind a 40 Mbit/s, 40 ms path.
    let o = || {
        let mut o = opts(24 << 20, 4, 2);
        o.message_bytes = 512 << 10;
        o
    };
    let slow_app =
        MsgServerApp::new(7000, Security::Plain, None, PipeConfig::default()).with_app_rate(10e6);
    let fast_wire = ImpairConfig {
        delay: toe_bus::time::Duration::from_micros(500),
        ..ImpairConfig::default()
    };
    let (r, _) = run_with(o(), slow_app, Some(fast_wire));
    let a = &r.latency;
    eprintln!("slow application: {}", a.describe());
    assert_eq!(a.blame, Blame::ReceiverApplication, "{a:?}");
    // Every message is in it: deliveries after the sender's FIN are reported before the
    // session closes.
    assert_eq!(a.messages, 48, "{a:?}");
    // 4 MiB of input queue per session drained at 10 MB/s: messages wait ~ 100s of ms.
    assert!(a.receiver_app_us.p50 > 100_000.0, "{a:?}");

    let fast_app = MsgServerApp::new(7000, Security::Plain, None, PipeConfig::default());
    let slow_wire = ImpairConfig {
        delay: toe_bus::time::Duration::from_millis(20),
        rate_bits_per_s: Some(40_000_000),
        queue_bytes: 256 << 10,
        ..ImpairConfig::default()
    };
    let (r, _) = run_with(o(), fast_app, Some(slow_wire));
    let n = &r.latency;
    eprintln!("slow network: {}", n.describe());
    assert_eq!(n.blame, Blame::Network, "{n:?}");
    assert!(n.receiver_app_us.p50 < 1000.0, "{n:?}");
    assert!(n.network_us.p50 > 100_000.0, "{n:?}");
}

#[test]
fn a_critical_transfer_is_marked_ef_on_every_packet_of_its_connections_in_tshark() {
    // Seed 003 #4: the objective becomes the DSCP of the sender's connections. smoltcp has
    // no per-socket TOS, so the emulated NIC rewrites the TOS byte of the flow's frames;
    // tshark checks the marks and the IPv4 header checksums it had to fix.
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("msg-critical.pcap");
    let target = PcapTarget::create(&path).unwrap();
    let mut o = opts(4 << 20, 4, 2);
    o.slo = Some(Slo::Critical);
    let (pa, pb) = toe_nic::wire(4096);
    let server = MsgServerApp::new(o.to.port(), Security::Plain, None, PipeConfig::default());
    let (r, _) = run_on(
        o,
        server,
        Box::new(Pcap::new(pa, target.sink().clone())),
        Box::new(pb),
    );
    assert_eq!(r.bytes, 4 << 20);
    target.flush().unwrap();
    let file = path.to_str().unwrap();
    let rows = toemu_tests::tshark(&[
        "-r",
        file,
        "-o",
        "ip.check_checksum:TRUE",
        "-Y",
        "tcp",
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "ip.dsfield.dscp",
        "-e",
        "ip.checksum.status",
        "-e",
        "tcp.flags.syn",
    ]);
    let (mut sender, mut server, mut syns) = (0, 0, 0);
    for row in rows.lines() {
        let f: Vec<&str> = row.split('\t').collect();
        assert_eq!(f.len(), 4, "{row:?}");
        match f[0] {
            "10.0.0.1" => {
                assert_eq!(f[1], "46", "every sender packet is EF: {row:?}");
                sender += 1;
                syns += usize::from(f[3] == "1" || f[3] == "True");
            }
            "10.0.0.2" => {
                // The server's NIC answers in the class its connections were asked in.
                assert_eq!(f[1], "46", "the server's packets reflect EF: {row:?}");
                server += 1;
                syns += usize::from(f[3] == "1" || f[3] == "True");
            }
            other => panic!("a packet from {other}: {row:?}"),
        }
        assert_eq!(f[2], "1", "IPv4 header checksum good: {row:?}");
    }
    // At least one full-MTU (9000-byte) frame per 9000 bytes sent, and the server's ACKs.
    assert!(
        sender >= (4 << 20) / 9000 && server > 0,
        "{sender} sender and {server} server packets"
    );
    assert_eq!(syns, 8, "each connection's SYN and SYN-ACK are marked too");
}
