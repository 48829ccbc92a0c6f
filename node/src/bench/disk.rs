//! The disk's own rate for what a blob transfer between two stores on one machine asks of
//! it (`baseline_disk_mib_per_s` of `bench blob`): one file read past the page cache while
//! another is written past it, 1 MiB at a time, with the store's own reads and writes.
//!
//! A sender serving from its disk store reads every chunk with `O_DIRECT`, and the receiver
//! writes every chunk with `O_DIRECT`: when both stores share one disk, as in the benchmark,
//! the transfer can go no faster than that disk copies a file, whatever the network does.

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use flare_actors::BlobStore;
use flare_actors::store::{DIRECT_ALIGN, Scratch, aligned_buffer};

/// Pieces in flight between the reading and the writing thread (as the blob receiver
/// files a few chunks at once).
const DEPTH: usize = 4;

/// Seconds to copy `size` bytes from one scratch file to another in `dir` in `piece`-sized
/// reads and writes on two threads, past the page cache where the file system allows it.
/// The source is written first, untimed.
pub fn copy_secs(dir: &Path, size: u64, piece: u32) -> anyhow::Result<f64> {
    let store = BlobStore::open(dir).with_context(|| format!("opening a store in {}", dir.display()))?;
    let (src, dst) = (store.scratch(size)?, store.scratch(size)?);
    let piece = piece as usize;
    let pieces = size.div_ceil(piece as u64);
    let (mut buf, at) = aligned_buffer(piece);
    for i in 0..pieces {
        let (off, n) = span(i, piece, size);
        buf[at..at + n].fill(i as u8);
        src.write_fresh_at(&buf[at..at + n], off)?;
    }
    let start = Instant::now();
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(DEPTH);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH + 1);
    for _ in 0..=DEPTH {
        empty_tx.send(aligned_buffer(piece).0).context("buffer pool")?;
    }
    std::thread::scope(|s| -> anyhow::Result<()> {
        let reader = s.spawn(|| read_all(&src, size, piece, empty_rx, full_tx));
        // The writer owns its ends of both channels: if it stops early, the reader's next
        // send or receive fails instead of waiting for ever.
        let wrote = write_all(&dst, size, piece, full_rx, empty_tx);
        let read = reader.join().map_err(|_| anyhow!("the reading thread panicked"))?;
        wrote.and(read)
    })?;
    Ok(start.elapsed().as_secs_f64())
}

fn span(i: u64, piece: usize, size: u64) -> (u64, usize) {
    let off = i * piece as u64;
    (off, (size - off).min(piece as u64) as usize)
}

fn read_all(
    src: &Scratch,
    size: u64,
    piece: usize,
    empty: mpsc::Receiver<Vec<u8>>,
    full: mpsc::SyncSender<(u64, Vec<u8>)>,
) -> anyhow::Result<()> {
    for i in 0..size.div_ceil(piece as u64) {
        let mut buf = empty.recv().context("the writing thread stopped")?;
        let (off, n) = span(i, piece, size);
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        src.read_once_at(&mut buf[at..at + n], off)?;
        full.send((i, buf)).context("the writing thread stopped")?;
    }
    Ok(())
}

fn write_all(
    dst: &Scratch,
    size: u64,
    piece: usize,
    full: mpsc::Receiver<(u64, Vec<u8>)>,
    empty: mpsc::SyncSender<Vec<u8>>,
) -> anyhow::Result<()> {
    for _ in 0..size.div_ceil(piece as u64) {
        let (i, buf) = full.recv().context("the reading thread stopped")?;
        let (off, n) = span(i, piece, size);
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        dst.write_fresh_at(&buf[at..at + n], off)?;
        // The reader may have finished and dropped its end: nothing more to hand it.
        let _ = empty.send(buf);
    }
    Ok(())
}
