//! `toemu iscsi cluster-bench`: 128 KiB QD32 writes and reads through a cluster's primary
//! (proxy I/O, seed 001) against the same load sent directly to one member, on the
//! virtual clock, in the same run, alternating.
//!
//! Each run is a fresh three-member cluster ([`Cluster`], the NIC's iSCSI engine on every
//! connection): our initiator writes `bytes` of seeded data (the write figure), then reads
//! them back and compares each block (the read figure and the integrity check). `direct`
//! goes to member 1's own LUN on its front NIC; `proxy` to the volume on the primary,
//! striped over all three members (a third of its blocks are the primary's own).
//!
//! Copies are the serving machine's: its host memory's count (driver copies, copies into
//! and out of host memory; [`toe_bus::CopySnapshot`]) plus the copies its iSCSI layers
//! make in application memory (the front target's transports; for the proxy also its back
//! sessions' transports and [`toe_iscsi::proxy::Primary::copy_bytes`]), per data byte that
//! crossed it. The copy into a disk's own store is not counted on either side.

use std::io;

use toe_bus::CopySnapshot;
use toe_host::config::Settings;

use crate::cluster::{front_addr, member_iqn, Cluster, ClusterConfig, VOLUME_IQN, VOLUME_PORT};
use crate::iscsi::IscsiUrl;
use crate::iscsi_host::PerfApp;
use crate::iscsi_perf::PerfOptions;
use crate::stats::Latency;

/// What `cluster-bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes written and read back per run (a multiple of 128 KiB).
    pub bytes: u64,
    /// Rounds; each runs `direct` and `proxy` (the order alternates).
    pub rounds: usize,
    /// Header and data digests (CRC32C) on every connection.
    pub digests: bool,
    /// Seed of the data and of the stacks.
    pub seed: u64,
    /// The volume's stripe, 512-byte blocks (2048: 1 MiB, so that each 128 KiB I/O is one
    /// piece on one member; less cuts I/Os into pieces on several).
    pub stripe_blocks: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            bytes: 64 << 20,
            rounds: 2,
            digests: false,
            seed: 7,
            stripe_blocks: 2048,
        }
    }
}

/// Bytes per I/O.
pub const IO_BYTES: u32 = 128 << 10;
/// Queue depth.
pub const DEPTH: usize = 32;
/// Members of the benchmark's cluster.
pub const MEMBERS: usize = 3;

/// One measured phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRun {
    /// `direct` (member 1's own LUN) or `proxy` (the volume through the primary).
    pub mode: &'static str,
    /// `read` or `write`.
    pub op: &'static str,
    /// Which round.
    pub round: usize,
    /// Data bytes moved.
    pub bytes: u64,
    /// Data bytes per second of virtual time.
    pub throughput_bytes_per_s: f64,
    /// Command latency in virtual time, µs.
    pub latency_us: Latency,
    /// Host copies per data byte on the machine that served it (the primary for
    /// `proxy`, the member for `direct`); see the module documentation.
    pub host_copies_per_proxied_byte: f64,
    /// Every command GOOD and every block read back as written.
    pub integrity_ok: bool,
}

/// What `cluster-bench` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Members of the cluster.
    pub members: usize,
    /// Bytes per I/O.
    pub io_bytes: u32,
    /// Queue depth.
    pub depth: usize,
    /// Digests on.
    pub digests: bool,
    /// The runs, in the order they ran.
    pub runs: Vec<BenchRun>,
}

impl BenchReport {
    /// Mean proxy throughput over mean direct throughput for `op`.
    pub fn ratio(&self, op: &str) -> f64 {
        let mean = |mode: &str| {
            let v: Vec<f64> = self
                .runs
                .iter()
                .filter(|r| r.mode == mode && r.op == op)
                .map(|r| r.throughput_bytes_per_s)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        mean("proxy") / mean("direct").max(1e-9)
    }

    /// Whether every run kept its data intact.
    pub fn integrity_ok(&self) -> bool {
        self.runs.iter().all(|r| r.integrity_ok)
    }

    /// The table `toemu iscsi cluster-bench` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<7} {:<6} {:>5} {:>10} {:>9} {:>9} {:>7} {:>9}\n",
            "mode", "op", "round", "MB/s", "p50 us", "p99 us", "copies", "integrity"
        );
        for r in &self.runs {
            s += &format!(
                "{:<7} {:<6} {:>5} {:>10.0} {:>9} {:>9} {:>7.2} {:>9}\n",
                r.mode,
                r.op,
                r.round,
                r.throughput_bytes_per_s / 1e6,
                r.latency_us.p50,
                r.latency_us.p99,
                r.host_copies_per_proxied_byte,
                if r.integrity_ok { "ok" } else { "FAILED" }
            );
        }
        s += &format!(
            "proxy / direct: read {:.2}x, write {:.2}x (goal >= 0.8x)\n",
            self.ratio("read"),
            self.ratio("write")
        );
        s
    }
}

/// The benchmark's cluster: three members whose LUNs each hold `bytes` (so direct access
/// to one member and the volume both have room), the volume striped over them.
fn config(bytes: u64, stripe_blocks: u64) -> ClusterConfig {
    ClusterConfig {
        members: MEMBERS,
        block_bytes: 512,
        member_blocks: bytes.div_ceil(1 << 20).max(8) * 2048,
        stripe_blocks,
        extents: None,
        member_timeout_ms: 2000,
    }
}

/// Run the benchmark.
pub fn run(settings: &Settings, o: &BenchOptions) -> io::Result<BenchReport> {
    if o.bytes == 0 || o.bytes % u64::from(IO_BYTES) != 0 {
        return Err(io::Error::other(format!(
            "{} bytes: a positive multiple of {IO_BYTES}",
            o.bytes
        )));
    }
    let mut runs = Vec::new();
    for round in 0..o.rounds.max(1) {
        let order = if round % 2 == 0 {
            ["direct", "proxy"]
        } else {
            ["proxy", "direct"]
        };
        for mode in order {
            runs.extend(one(settings, o, mode, round)?);
        }
    }
    Ok(BenchReport {
        members: MEMBERS,
        io_bytes: IO_BYTES,
        depth: DEPTH,
        digests: o.digests,
        runs,
    })
}

/// One mode of one round: the write run, then the read-back.
fn one(
    settings: &Settings,
    o: &BenchOptions,
    mode: &'static str,
    round: usize,
) -> io::Result<[BenchRun; 2]> {
    let mut c = Cluster::new(
        settings,
        &config(o.bytes, o.stripe_blocks),
        o.digests,
        o.seed,
    )?;
    if !c.wait_ready(10_000_000)? {
        return Err(io::Error::other(
            "the primary's back sessions did not come up",
        ));
    }
    let q = if o.digests {
        "?header_digest=crc32c&data_digest=crc32c"
    } else {
        ""
    };
    let (url, server) = match mode {
        "direct" => (
            format!("iscsi://{}:3260/{}/0{q}", front_addr(1), member_iqn(1)),
            c.front_host(1),
        ),
        _ => (
            format!("iscsi://{}:{VOLUME_PORT}/{VOLUME_IQN}/0{q}", front_addr(0)),
            c.front_host(0),
        ),
    };
    let url: IscsiUrl = url.parse().map_err(io::Error::other)?;
    let mem = c.sim.with_host(server, |h| h.mem.clone());
    // The serving target's transports, and the proxy's own copies.
    let app_copies = |c: &Cluster| {
        let target = |i: usize| c.servers.copies[i].load(std::sync::atomic::Ordering::Relaxed);
        if mode == "proxy" {
            target(MEMBERS) + c.servers.hub.lock().expect("hub lock").stats.copy_bytes
        } else {
            target(1)
        }
    };
    let phase = |c: &mut Cluster, write: bool| -> io::Result<(BenchRun, bool)> {
        let (m0, a0) = (mem.stats().snapshot(), app_copies(c));
        let po = PerfOptions {
            io_bytes: IO_BYTES,
            depth: DEPTH,
            bytes: Some(o.bytes),
            write,
            check_only: !write,
            seed: o.seed,
            ..PerfOptions::default()
        };
        let mut random = [0u8; 23];
        random[..8].copy_from_slice(&(o.seed ^ round as u64).to_le_bytes());
        let mut perf = PerfApp::new(&url, po, random).map_err(io::Error::other)?;
        c.run(&mut perf, u64::MAX)?;
        let r = perf.report().map_err(io::Error::other)?;
        let p = r
            .phases
            .first()
            .ok_or_else(|| io::Error::other("no phase measured"))?;
        let m = mem.stats().snapshot().since(&m0);
        let copies = host_copies(&m) + app_copies(c) - a0;
        let data = p.bytes.max(1) as f64;
        Ok((
            BenchRun {
                mode,
                op: p.op,
                round,
                bytes: p.bytes,
                throughput_bytes_per_s: p.bytes as f64 / p.seconds.max(1e-9),
                latency_us: p.latency_us,
                host_copies_per_proxied_byte: copies as f64 / data,
                integrity_ok: r.ok(),
            },
            r.ok(),
        ))
    };
    let (mut w, _) = phase(&mut c, true)?;
    let (rd, read_ok) = phase(&mut c, false)?;
    // What was written is intact only if it read back so.
    w.integrity_ok &= read_ok;
    Ok([w, rd])
}

/// Host copies in a host memory's count: driver copies and copies into and out of it.
fn host_copies(m: &CopySnapshot) -> u64 {
    m.host_copy_bytes + m.copy_out_bytes + m.copy_in_bytes
}
