//! JSON-lines traces of bus traffic: one object per command or event, e.g.
//! `{"t_us":1200,"host":"b","dir":"evt","kind":"IndicateData","conn":"p1","len":16384,"offset":0,"psh":0}`.
//! On the virtual clock the output is byte-identical for the same seed and configuration.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::Mutex;
use toe_bus::trace::{TraceRecord, TraceSink};

/// A shared JSON-lines writer several hosts can trace into (cheap to clone).
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl std::fmt::Debug for SharedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedWriter")
    }
}

impl SharedWriter {
    /// Wrap a writer.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        SharedWriter(Arc::new(Mutex::new(w)))
    }
    /// Exclusive access to the writer.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, Box<dyn Write + Send>> {
        self.0.lock()
    }
}

/// Trace sink writing JSON lines for one host to a shared writer. Write errors are kept and
/// reported by [`JsonlTrace::error`] (tracing never disturbs the run).
pub struct JsonlTrace {
    host: String,
    out: SharedWriter,
    line: String,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl JsonlTrace {
    /// A sink for `host` writing to `out`.
    pub fn new(host: &str, out: SharedWriter) -> Self {
        JsonlTrace {
            host: host.to_string(),
            out,
            line: String::new(),
            error: Arc::new(Mutex::new(None)),
        }
    }

    /// The first write error, if any happened.
    pub fn error(&self) -> Arc<Mutex<Option<io::Error>>> {
        self.error.clone()
    }
}

impl TraceSink for JsonlTrace {
    fn record(&mut self, r: &TraceRecord<'_>) {
        self.line.clear();
        let _ = write!(
            self.line,
            "{{\"t_us\":{},\"host\":\"{}\",\"dir\":\"{}\",\"kind\":\"{}\"",
            r.t_us,
            self.host,
            r.dir.name(),
            r.kind
        );
        if let Some(c) = r.conn {
            let _ = write!(self.line, ",\"conn\":\"{c}\"");
        }
        if let Some(w) = r.why {
            // Listen and Connect carry the receive policy; returns and errors their reason.
            let key = if matches!(r.kind, "Listen" | "Connect") {
                "policy"
            } else {
                "why"
            };
            let _ = write!(self.line, ",\"{key}\":\"{w}\"");
        }
        for (k, v) in r.fields {
            let _ = write!(self.line, ",\"{k}\":{v}");
        }
        self.line.push_str("}\n");
        if let Err(e) = self.out.lock().write_all(self.line.as_bytes()) {
            let mut slot = self.error.lock();
            if slot.is_none() {
                *slot = Some(e);
            }
        }
    }
}

/// A writer to a file (buffered).
pub fn file_writer(path: &std::path::Path) -> io::Result<SharedWriter> {
    let f = std::fs::File::create(path)?;
    Ok(SharedWriter::new(Box::new(io::BufWriter::new(f))))
}

/// An in-memory writer and a handle to read what was written (tests, replays).
pub fn memory_writer() -> (SharedWriter, Arc<Mutex<Vec<u8>>>) {
    #[derive(Clone)]
    struct Mem(Arc<Mutex<Vec<u8>>>);
    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    (SharedWriter::new(Box::new(Mem(buf.clone()))), buf)
}
