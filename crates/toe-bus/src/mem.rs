//! Host memory and the DMA engine.
//!
//! [`HostMemory`] is one region mapped with memmap2 (anonymous, or a file under `/dev/shm` so
//! another process can map it). Buffers inside it are [`HostBuf`] tokens: an `(offset, len)`
//! range, the "DMA address" that crosses the bus. A `HostBuf` cannot be cloned or forged, and
//! the allocator never hands out overlapping ranges, so holding a `HostBuf` means owning those
//! bytes: reading needs `&HostBuf`, writing needs `&mut HostBuf`. Ownership moves between the
//! driver and the NIC with the commands and events that carry the token.
//!
//! Every byte that moves is counted in [`CopyStats`]: the DMA engine's writes into host memory
//! (NIC -> host) and reads out of it (host -> NIC), the driver's copies between host buffers,
//! and copies to and from callers' slices. "Host copies per received byte" is computed from
//! these counters, never estimated.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

/// Alignment of every buffer handed out by [`HostMemory::alloc`], in bytes.
pub const BUF_ALIGN: usize = 64;

static NEXT_REGION_ID: AtomicU32 = AtomicU32::new(1);

/// Errors of the host memory allocator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// No free range of the requested size is left.
    #[error(
        "host memory exhausted: {requested} bytes requested, {free} free in {size}-byte region"
    )]
    Exhausted {
        /// Requested length in bytes.
        requested: usize,
        /// Free bytes in the region (possibly fragmented).
        free: usize,
        /// Region size in bytes.
        size: usize,
    },
    /// A zero-length buffer was requested.
    #[error("zero-length host buffer requested")]
    ZeroLength,
    /// The region could not be mapped.
    #[error("cannot map host memory: {0}")]
    Map(String),
}

/// A buffer in host memory: `len` bytes at `offset` of one [`HostMemory`] region.
///
/// Invariant: the range is inside its region and disjoint from every other live `HostBuf` of
/// that region. The type is deliberately neither `Clone` nor constructible outside this crate.
/// Dropping a `HostBuf` without [`HostMemory::free`] leaks its range (it is never reused).
#[derive(Debug, PartialEq, Eq)]
pub struct HostBuf {
    region: u32,
    offset: usize,
    len: usize,
}

impl HostBuf {
    /// Byte offset of the buffer in its region (the bus address).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: zero-length buffers are never allocated.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Byte and operation counters of everything that moves payload through host memory.
/// All counters only grow; read them with [`CopyStats::snapshot`].
#[derive(Debug, Default)]
pub struct CopyStats {
    dma_write_bytes: AtomicU64,
    dma_write_ops: AtomicU64,
    dma_read_bytes: AtomicU64,
    dma_read_ops: AtomicU64,
    host_copy_bytes: AtomicU64,
    host_copy_ops: AtomicU64,
    copy_out_bytes: AtomicU64,
    copy_in_bytes: AtomicU64,
}

/// A point-in-time copy of [`CopyStats`]. All fields are byte or operation counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopySnapshot {
    /// Bytes the DMA engine wrote into host memory (NIC -> host, received payload).
    pub dma_write_bytes: u64,
    /// DMA write transactions.
    pub dma_write_ops: u64,
    /// Bytes the DMA engine read from host memory (host -> NIC, transmitted payload).
    pub dma_read_bytes: u64,
    /// DMA read transactions.
    pub dma_read_ops: u64,
    /// Bytes the driver copied between host buffers (anonymous -> named, or into its own
    /// socket buffer in `unbounded-copy` mode).
    pub host_copy_bytes: u64,
    /// Driver copy operations.
    pub host_copy_ops: u64,
    /// Bytes copied from host memory out to a caller's slice (`std::io::Read`).
    pub copy_out_bytes: u64,
    /// Bytes copied from a caller's slice into host memory (`std::io::Write`).
    pub copy_in_bytes: u64,
}

impl CopySnapshot {
    /// Receive-side host copies per received byte: (DMA writes + driver copies + copies out)
    /// divided by `received_bytes`. Returns 0 when nothing was received.
    pub fn rx_copies_per_byte(&self, received_bytes: u64) -> f64 {
        if received_bytes == 0 {
            return 0.0;
        }
        (self.dma_write_bytes + self.host_copy_bytes + self.copy_out_bytes) as f64
            / received_bytes as f64
    }

    /// Field-wise difference `self - earlier`, for measuring one phase of a run.
    pub fn since(&self, earlier: &CopySnapshot) -> CopySnapshot {
        CopySnapshot {
            dma_write_bytes: self.dma_write_bytes - earlier.dma_write_bytes,
            dma_write_ops: self.dma_write_ops - earlier.dma_write_ops,
            dma_read_bytes: self.dma_read_bytes - earlier.dma_read_bytes,
            dma_read_ops: self.dma_read_ops - earlier.dma_read_ops,
            host_copy_bytes: self.host_copy_bytes - earlier.host_copy_bytes,
            host_copy_ops: self.host_copy_ops - earlier.host_copy_ops,
            copy_out_bytes: self.copy_out_bytes - earlier.copy_out_bytes,
            copy_in_bytes: self.copy_in_bytes - earlier.copy_in_bytes,
        }
    }
}

impl CopyStats {
    /// Read all counters.
    pub fn snapshot(&self) -> CopySnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CopySnapshot {
            dma_write_bytes: r(&self.dma_write_bytes),
            dma_write_ops: r(&self.dma_write_ops),
            dma_read_bytes: r(&self.dma_read_bytes),
            dma_read_ops: r(&self.dma_read_ops),
            host_copy_bytes: r(&self.host_copy_bytes),
            host_copy_ops: r(&self.host_copy_ops),
            copy_out_bytes: r(&self.copy_out_bytes),
            copy_in_bytes: r(&self.copy_in_bytes),
        }
    }
}

fn bump(bytes: &AtomicU64, ops: Option<&AtomicU64>, n: usize) {
    bytes.fetch_add(n as u64, Ordering::Relaxed);
    if let Some(ops) = ops {
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// First-fit range allocator with coalescing; free ranges keyed by offset.
#[derive(Debug)]
struct RangeAlloc {
    free: BTreeMap<usize, usize>,
    free_bytes: usize,
    used_bytes: usize,
    high_water_bytes: usize,
}

impl RangeAlloc {
    fn new(size: usize) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        RangeAlloc {
            free,
            free_bytes: size,
            used_bytes: 0,
            high_water_bytes: 0,
        }
    }

    fn alloc(&mut self, len: usize) -> Option<usize> {
        let (&off, &flen) = self.free.iter().find(|(_, &flen)| flen >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        self.free_bytes -= len;
        self.used_bytes += len;
        self.high_water_bytes = self.high_water_bytes.max(self.used_bytes);
        Some(off)
    }

    fn free(&mut self, mut off: usize, mut len: usize) {
        self.free_bytes += len;
        self.used_bytes -= len;
        if let Some((&next_off, &next_len)) = self.free.range(off + len..).next() {
            if next_off == off + len {
                self.free.remove(&next_off);
                len += next_len;
            }
        }
        if let Some((&prev_off, &prev_len)) = self.free.range(..off).next_back() {
            if prev_off + prev_len == off {
                self.free.remove(&prev_off);
                off = prev_off;
                len += prev_len;
            }
        }
        self.free.insert(off, len);
    }
}

/// One mapped region of emulated host memory, shared (behind an `Arc`) by the driver, the
/// application and the NIC's DMA engine.
pub struct HostMemory {
    map: MmapRaw,
    id: u32,
    size: usize,
    alloc: Mutex<RangeAlloc>,
    stats: CopyStats,
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory")
            .field("id", &self.id)
            .field("size", &self.size)
            .finish()
    }
}

impl HostMemory {
    /// Map `size_bytes` of anonymous memory. Pages are touched lazily by the kernel, so a large
    /// region costs nothing until used.
    pub fn anonymous(size_bytes: usize) -> Result<Self, MemError> {
        let mm = MmapOptions::new()
            .len(size_bytes.max(1))
            .map_anon()
            .map_err(|e| MemError::Map(e.to_string()))?;
        Ok(Self::from_raw(MmapRaw::from(mm), size_bytes))
    }

    /// Map `size_bytes` of a shared file (for example under `/dev/shm`), created or truncated
    /// to that size, so that another process can map the same host memory.
    pub fn shared_file(path: &Path, size_bytes: usize) -> Result<Self, MemError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| MemError::Map(format!("{}: {e}", path.display())))?;
        file.set_len(size_bytes as u64)
            .map_err(|e| MemError::Map(format!("{}: {e}", path.display())))?;
        let raw = MmapOptions::new()
            .len(size_bytes)
            .map_raw(&file)
            .map_err(|e| MemError::Map(format!("{}: {e}", path.display())))?;
        Ok(Self::from_raw(raw, size_bytes))
    }

    fn from_raw(map: MmapRaw, size: usize) -> Self {
        HostMemory {
            map,
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            size,
            alloc: Mutex::new(RangeAlloc::new(size)),
            stats: CopyStats::default(),
        }
    }

    /// Region size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes currently allocated.
    pub fn used_bytes(&self) -> usize {
        self.alloc.lock().used_bytes
    }

    /// Most bytes ever allocated at once.
    pub fn high_water_bytes(&self) -> usize {
        self.alloc.lock().high_water_bytes
    }

    /// The copy counters of this region.
    pub fn stats(&self) -> &CopyStats {
        &self.stats
    }

    /// Allocate a buffer of `len` bytes (rounded up internally to [`BUF_ALIGN`]); the returned
    /// handle's `len()` is exactly `len`.
    pub fn alloc(&self, len: usize) -> Result<HostBuf, MemError> {
        if len == 0 {
            return Err(MemError::ZeroLength);
        }
        let rounded = len.div_ceil(BUF_ALIGN) * BUF_ALIGN;
        let mut a = self.alloc.lock();
        match a.alloc(rounded) {
            Some(offset) => Ok(HostBuf {
                region: self.id,
                offset,
                len,
            }),
            None => Err(MemError::Exhausted {
                requested: len,
                free: a.free_bytes,
                size: self.size,
            }),
        }
    }

    /// Return a buffer's range to the allocator.
    ///
    /// # Panics
    /// If `buf` belongs to another region (API misuse).
    pub fn free(&self, buf: HostBuf) {
        self.check(&buf);
        let rounded = buf.len.div_ceil(BUF_ALIGN) * BUF_ALIGN;
        self.alloc.lock().free(buf.offset, rounded);
    }

    fn check(&self, buf: &HostBuf) {
        assert_eq!(
            buf.region, self.id,
            "HostBuf from region {} used with region {}",
            buf.region, self.id
        );
        debug_assert!(buf.offset + buf.len <= self.size);
    }

    /// The bytes of `buf`, read in place (no copy, nothing counted).
    ///
    /// # Panics
    /// If `buf` belongs to another region.
    #[allow(unsafe_code)]
    pub fn slice<'a>(&'a self, buf: &'a HostBuf) -> &'a [u8] {
        self.check(buf);
        // SAFETY: `buf` is a live range of this region (checked above; ranges come only from
        // `alloc`, which never hands out overlapping ranges, and `HostBuf` is neither `Clone`
        // nor constructible elsewhere). The shared borrow of `buf` excludes a simultaneous
        // `slice_mut` of the same range for the returned lifetime, and the mapping lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(buf.offset), buf.len) }
    }

    /// The bytes of `buf`, writable in place (no copy, nothing counted). Used by applications
    /// to fill their own transmit buffers; received payload is written only by [`Dma`].
    ///
    /// # Panics
    /// If `buf` belongs to another region.
    #[allow(unsafe_code)]
    pub fn slice_mut<'a>(&'a self, buf: &'a mut HostBuf) -> &'a mut [u8] {
        self.check(buf);
        // SAFETY: as in `slice`; additionally the exclusive borrow of `buf` guarantees no other
        // reference to this range exists for the returned lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(buf.offset), buf.len) }
    }

    /// Driver copy between two host buffers (counted as a host copy): `len` bytes from
    /// `src[src_at..]` to `dst[dst_at..]`.
    ///
    /// # Panics
    /// If a range is out of bounds of its buffer (API misuse).
    pub fn copy(&self, src: &HostBuf, src_at: usize, dst: &mut HostBuf, dst_at: usize, len: usize) {
        let s = &self.slice(src)[src_at..src_at + len];
        let d = &mut self.slice_mut(dst)[dst_at..dst_at + len];
        d.copy_from_slice(s);
        bump(
            &self.stats.host_copy_bytes,
            Some(&self.stats.host_copy_ops),
            len,
        );
    }

    /// Count a driver copy that did not go through [`HostMemory::copy`] (for example from a
    /// host buffer into the driver's own heap buffer in `unbounded-copy` mode).
    pub fn count_host_copy(&self, len: usize) {
        bump(
            &self.stats.host_copy_bytes,
            Some(&self.stats.host_copy_ops),
            len,
        );
    }

    /// Count bytes copied out to a caller's slice.
    pub fn count_copy_out(&self, len: usize) {
        bump(&self.stats.copy_out_bytes, None, len);
    }

    /// Count bytes copied in from a caller's slice.
    pub fn count_copy_in(&self, len: usize) {
        bump(&self.stats.copy_in_bytes, None, len);
    }
}

/// The NIC's DMA engine: the only writer of received payload into host memory. Every call is
/// one bus transaction and is counted.
#[derive(Debug, Clone)]
pub struct Dma {
    mem: std::sync::Arc<HostMemory>,
}

impl Dma {
    /// A DMA engine for `mem`.
    pub fn new(mem: std::sync::Arc<HostMemory>) -> Self {
        Dma { mem }
    }

    /// The memory this engine writes to.
    pub fn memory(&self) -> &std::sync::Arc<HostMemory> {
        &self.mem
    }

    /// Write `data` into `buf` at byte `at` (NIC -> host).
    ///
    /// # Panics
    /// If `at + data.len()` exceeds the buffer (the NIC's placement logic guarantees it).
    pub fn write(&self, buf: &mut HostBuf, at: usize, data: &[u8]) {
        self.mem.slice_mut(buf)[at..at + data.len()].copy_from_slice(data);
        bump(
            &self.mem.stats.dma_write_bytes,
            Some(&self.mem.stats.dma_write_ops),
            data.len(),
        );
    }

    /// Read `out.len()` bytes of `buf` starting at byte `at` (host -> NIC).
    ///
    /// # Panics
    /// If the range exceeds the buffer.
    pub fn read(&self, buf: &HostBuf, at: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.mem.slice(buf)[at..at + out.len()]);
        bump(
            &self.mem.stats.dma_read_bytes,
            Some(&self.mem.stats.dma_read_ops),
            out.len(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn alloc_free_coalesce_and_exhaust() {
        let mem = HostMemory::anonymous(4096).unwrap();
        let a = mem.alloc(1000).unwrap();
        let b = mem.alloc(1000).unwrap();
        let c = mem.alloc(1000).unwrap();
        assert!(matches!(
            mem.alloc(2000),
            Err(MemError::Exhausted {
                requested: 2000,
                ..
            })
        ));
        assert_eq!(mem.alloc(0), Err(MemError::ZeroLength));
        assert!(a.offset() + 1024 <= b.offset());
        mem.free(b);
        mem.free(a);
        // a and b coalesced: 2048 contiguous bytes at offset 0
        let big = mem.alloc(2048).unwrap();
        assert_eq!(big.offset(), 0);
        assert_eq!(mem.high_water_bytes(), 3072);
        mem.free(big);
        mem.free(c);
        assert_eq!(mem.used_bytes(), 0);
        assert_eq!(mem.alloc(4096).unwrap().len(), 4096);
    }

    #[test]
    fn dma_and_copies_are_counted() {
        let mem = Arc::new(HostMemory::anonymous(1 << 16).unwrap());
        let dma = Dma::new(mem.clone());
        let mut a = mem.alloc(100).unwrap();
        let mut b = mem.alloc(100).unwrap();
        dma.write(&mut a, 10, b"hello");
        mem.copy(&a, 10, &mut b, 0, 5);
        assert_eq!(&mem.slice(&b)[..5], b"hello");
        let mut out = [0u8; 5];
        dma.read(&b, 0, &mut out);
        assert_eq!(&out, b"hello");
        let s = mem.stats().snapshot();
        assert_eq!((s.dma_write_bytes, s.dma_write_ops), (5, 1));
        assert_eq!((s.host_copy_bytes, s.host_copy_ops), (5, 1));
        assert_eq!((s.dma_read_bytes, s.dma_read_ops), (5, 1));
        assert_eq!(s.rx_copies_per_byte(5), 2.0);
    }

    #[test]
    #[should_panic(expected = "used with region")]
    fn foreign_buffer_is_refused() {
        let m1 = HostMemory::anonymous(4096).unwrap();
        let m2 = HostMemory::anonymous(4096).unwrap();
        let b = m1.alloc(10).unwrap();
        let _ = m2.slice(&b);
    }

    #[test]
    fn shared_file_mapping() {
        let path = std::env::temp_dir().join(format!("toemu-shm-test-{}", std::process::id()));
        let mem = HostMemory::shared_file(&path, 8192).unwrap();
        let mut b = mem.alloc(16).unwrap();
        mem.slice_mut(&mut b).copy_from_slice(&[7u8; 16]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[b.offset()..b.offset() + 16], &[7u8; 16]);
        std::fs::remove_file(&path).unwrap();
    }
}
