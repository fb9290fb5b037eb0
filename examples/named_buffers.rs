//! Named buffers on the virtual clock: the receiver posts buffers larger than W, the NIC places
//! payload straight into them (one copy in total), and push mode returns a partly filled
//! buffer as soon as a PSH segment lands. Prints the counters that prove it.
//!
//! `cargo run --release -p toemu-examples --example named_buffers`

use toe_bus::ReturnReason;
use toe_host::config::Settings;
use toe_host::pair::connected_pair;

fn main() -> std::io::Result<()> {
    let settings = Settings::default();
    let (sim, client, server) = connected_pair(&settings, 1, 5001)?;
    let (tx, rx) = (sim.driver(0), sim.driver(1));

    // The receiver posts a 1 MiB push-mode named buffer (W is 256 KiB: the NIC holds it).
    let buf = rx.lock().alloc(1 << 20).map_err(std::io::Error::other)?;
    rx.lock()
        .post_named(sim.now(), server, buf, true)
        .map_err(|r| std::io::Error::other(r.error))?;

    // The sender writes 3000 bytes from a host buffer; smoltcp marks the last segment PSH.
    let mut out = tx.lock().alloc(3000).map_err(std::io::Error::other)?;
    tx.lock().memory().clone().slice_mut(&mut out).fill(b'x');
    tx.lock()
        .send(client, out, 3000)
        .map_err(|r| std::io::Error::other(r.error))?;

    let mut done = None;
    sim.run_until(100_000, || {
        done = rx.lock().take_completion(server).ok().flatten();
        done.is_some()
    })?;
    let c = done.expect("completion");
    assert_eq!(c.why, ReturnReason::Push);
    let stats = rx.lock().memory().stats().snapshot();
    println!(
        "named buffer back after {} (virtual): {:?}, {} bytes filled; DMA wrote {} bytes, driver copied {}",
        sim.now(),
        c.why,
        c.filled,
        stats.dma_write_bytes,
        stats.host_copy_bytes
    );
    Ok(())
}
