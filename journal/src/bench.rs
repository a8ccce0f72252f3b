//! The journal's micro-benchmark (`sluice journal bench`, run by `cargo xtask bench`): how many
//! events per second concurrent sessions can record, and how many bytes a recorded result row
//! costs on disk, with the agent's real write path (chain, checkpoints, sealing, WAL).

use std::path::Path;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::JournalError;
use crate::model::SessionStart;
use crate::writer::{Journal, JournalOptions};

/// What one run measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub writers: usize,
    pub events: u64,
    pub rows: u64,
    pub seconds: f64,
    /// Wire bytes recorded (the DataRow messages).
    pub wire_bytes: u64,
    /// The spool's size on disk after a flush and compaction.
    pub disk_bytes: u64,
}

impl BenchResult {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.seconds
    }
    pub fn wire_mb_per_second(&self) -> f64 {
        self.wire_bytes as f64 / self.seconds / 1e6
    }
    pub fn disk_bytes_per_row(&self) -> f64 {
        self.disk_bytes as f64 / self.rows.max(1) as f64
    }
    pub fn wire_bytes_per_row(&self) -> f64 {
        self.wire_bytes as f64 / self.rows.max(1) as f64
    }
}

/// A chunk of `rows` PostgreSQL DataRow messages shaped like a customers table (id, name,
/// email, created), varied so that compression sees realistic text.
fn chunk(first: u64, rows: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(rows as usize * 90);
    for id in first..first + rows {
        let name = format!(
            "customer {} {}",
            id.wrapping_mul(2_654_435_761) % 100_000,
            id
        );
        let email = format!("user{}@example{}.com", id.wrapping_mul(40_503), id % 97);
        let created = format!(
            "2026-{:02}-{:02} 12:{:02}:00+00",
            1 + id % 12,
            1 + id % 28,
            id % 60
        );
        let id = id.to_string();
        let cols = [
            id.as_bytes(),
            name.as_bytes(),
            email.as_bytes(),
            created.as_bytes(),
        ];
        let len = 4 + 2 + cols.iter().map(|c| 4 + c.len()).sum::<usize>();
        b.put_u8(b'D');
        b.put_u32(len as u32);
        b.put_u16(cols.len() as u16);
        for c in cols {
            b.put_u32(c.len() as u32);
            b.put_slice(c);
        }
    }
    b.freeze()
}

/// Records `events` server chunks of `rows_per_event` rows from each of `writers` concurrent
/// sessions into a new journal in `dir`, then measures its size on disk.
pub fn bench(
    dir: &Path,
    options: &JournalOptions,
    writers: usize,
    events: u64,
    rows_per_event: u64,
) -> Result<BenchResult, JournalError> {
    let journal = Journal::open_with(dir, options)?;
    let writers = writers.max(1);
    let start = Instant::now();
    let wire: Result<Vec<u64>, JournalError> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let journal = journal.clone();
                scope.spawn(move || -> Result<u64, JournalError> {
                    let rec = journal.start_session(SessionStart {
                        target: "bench".into(),
                        protocol: "postgres".into(),
                        orig_dst: "127.0.0.1:5432".into(),
                        client_addr: format!("127.0.0.1:{}", 40000 + w),
                        process: None,
                        params: vec![("user".into(), "bench".into())],
                        principal: None,
                    })?;
                    let mut bytes = 0;
                    for e in 0..events {
                        let data = chunk((w as u64 * events + e) * rows_per_event, rows_per_event);
                        bytes += data.len() as u64;
                        rec.server(data)?;
                    }
                    rec.end("bench done")?;
                    Ok(bytes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Ok(0)))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let wire_bytes = wire?.iter().sum();
    journal.compact()?;
    Ok(BenchResult {
        writers,
        events: writers as u64 * (events + 2),
        rows: writers as u64 * events * rows_per_event,
        seconds,
        wire_bytes,
        disk_bytes: journal.spool_bytes(),
    })
}
