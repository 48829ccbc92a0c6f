//! The receiver of one `/flare/blob/1` stream: the state machine `flare_protocols::blob`
//! describes, for one source and one request.
//!
//! ```text
//! Start    open a stream and send the request        (ReceiveError::Source(PeerGone) if it cannot)
//! Header   read the source's answer                  NotFound | Refused end here; Busy:
//!          ask again after a back-off, until the fetch's busy patience is spent
//! Hashes   only when asked: the list must hash to the requested id, else IdMismatch
//!          (SourceError::BadManifest)
//! Chunks   each frame must carry the next expected index and exactly that chunk's length,
//!          checked before reading the bytes; the bytes must hash to the list's entry, else
//!          HashMismatch. One credit per chunk once it is verified and stored.
//! Done     every chunk of the range is stored; our write half is closed
//! ```
//! Lengths are never trusted from the source: they come from the manifest, which the id
//! commits to. Which sources to ask for which ranges, retries and distrust are the
//! scheduler's ([`super`]); this file only runs one stream to its end and says why it
//! stopped, if it stopped early ([`ReceiveError`]).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use flare_protocols::blob::{
    BLOB_PROTOCOL, BlobHeader, BlobRequest, ChunkFrame, MAX_WINDOW, read_chunk_header, read_header, write_bulk_answer,
    write_credit, write_request,
};
use flare_protocols::blob_id::hashes_from_bytes;
use flare_protocols::bulk::{BULK_CONNECTED, BULK_DECLINED, BulkOffer};
use flare_protocols::frame::{FrameError, read_frame};
use flare_protocols::{BlobRef, Manifest};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use tokio::sync::mpsc;

use super::{FetchOptions, SourceError, Target};
use crate::blob::bulk::{BULK_MIN_BYTES, BulkReader};
use crate::network::NetworkHandle;
use crate::store::{DIRECT_ALIGN, StoreError, aligned_buffer};

/// Chunks of one stream being verified and filed at once when nothing consumes them: the
/// disk write of one overlaps the hashing of the next (measured: 2 beat 1 and 4, see
/// docs/benchmarks.md). A fetch with a consumer (`on_chunk`: a fold, a learner on the
/// arriving model) files one at a time, in order: its pulls already run beside others, and
/// more threads per pull only contended for the cores there.
const PERSIST_DEPTH: usize = 2;

/// Why a receiver stopped before `Done`.
pub(super) enum ReceiveError {
    /// The source's fault or absence: `NotFound` or `Refused` at `Header`, `BadManifest`
    /// (the protocol's IdMismatch) at `Hashes`, `HashMismatch` or `Protocol` at `Chunks`,
    /// `PeerGone` anywhere.
    Source(SourceError),
    /// At `Chunks`, an absent frame: the source holds the blob only in part and lacks this
    /// chunk. Not a fault, but nothing more of the range will come from it.
    Absent,
    /// The local store failed; no source is to blame.
    Store(StoreError),
}

impl From<SourceError> for ReceiveError {
    fn from(e: SourceError) -> Self {
        ReceiveError::Source(e)
    }
}

/// Why a stream gave no header to go on with, without any fault of the source.
enum NoHeader {
    /// The stream ended before its header: the source dropped it (or the connection went).
    Dropped(String),
    /// The source is at its stream limit: ask again after the hint.
    Busy(Duration),
}

/// One source as a receiver talks to it: where streams go, and how long a silence may last.
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    /// The source.
    pub(super) peer: PeerId,
    pub(super) control: &'a libp2p_stream::Control,
    pub(super) net: &'a NetworkHandle,
    /// A source that sends nothing for this long is treated as gone.
    pub(super) stall_timeout: Duration,
    /// How long to keep asking a source that answers `Busy`.
    pub(super) busy_patience: Duration,
    /// How long the source may wait for what it is still receiving itself (see
    /// [`BlobRequest::wait_ms`]).
    pub(super) wait_ms: u32,
    /// Whether to ask for a bulk connection for large ranges.
    pub(super) bulk: bool,
    /// Sources whose bulk port could not be reached lately (the fetcher's).
    pub(super) unreachable: &'a std::sync::Mutex<std::collections::HashMap<PeerId, tokio::time::Instant>>,
}

/// Where a stream's chunk frames come from: the libp2p stream, or its bulk connection.
enum ChunksIn<R> {
    Stream(R),
    Bulk(BulkReader),
}

impl<R: futures::AsyncRead + Unpin> ChunksIn<R> {
    /// The next frame's head.
    async fn frame(&mut self) -> Result<ChunkFrame, FrameError> {
        match self {
            ChunksIn::Stream(rd) => read_chunk_header(rd).await,
            ChunksIn::Bulk(b) => b.frame().await,
        }
    }

    /// That frame's bytes, into `slot`.
    async fn body(&mut self, slot: &mut [u8]) -> Result<(), FrameError> {
        match self {
            ChunksIn::Stream(rd) => Ok(rd.read_exact(slot).await?),
            ChunksIn::Bulk(b) => b.body(slot).await,
        }
    }
}

impl Source<'_> {
    fn map_frame(&self, e: FrameError) -> SourceError {
        match e {
            FrameError::Io(io) => SourceError::PeerGone {
                peer: self.peer,
                reason: io.to_string(),
            },
            other => SourceError::Protocol {
                peer: self.peer,
                reason: other.to_string(),
            },
        }
    }

    async fn timed<T>(&self, f: impl Future<Output = Result<T, FrameError>>) -> Result<T, SourceError> {
        match tokio::time::timeout(self.stall_timeout, f).await {
            Ok(r) => r.map_err(|e| self.map_frame(e)),
            Err(_) => Err(SourceError::PeerGone {
                peer: self.peer,
                reason: format!("stalled for {:?}", self.stall_timeout),
            }),
        }
    }

    /// `Start` and `Header`: opens a stream, sends the request and reads the header.
    ///
    /// A source drops an inbound stream it cannot take at once (libp2p-stream hands inbound
    /// streams over a channel of one slot, so a burst of receivers, say every client at the
    /// start of a round, can overflow it). A stream lost that way, before any header, is
    /// opened again after a short random pause while the connection is up, until the stall
    /// timeout; it does not count as a failure of the source.
    async fn open(&self, req: &BlobRequest) -> Result<(Stream, Option<BulkOffer>), SourceError> {
        let peer = self.peer;
        let deadline = tokio::time::Instant::now() + self.stall_timeout;
        let mut busy = crate::busy::Backoff::new(self.busy_patience, &crate::busy::BUSY_PULLS);
        loop {
            match self.try_open(req).await {
                Err(NoHeader::Dropped(reason)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%peer, %reason, "blob stream dropped before its header; opening another");
                    let pause = rand::random_range(2..20);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(NoHeader::Dropped(reason)) => return Err(SourceError::PeerGone { peer, reason }),
                // A busy source is alive: wait for it (one line per period for the whole
                // process says how many pulls wait), as long as the patience lasts.
                Err(NoHeader::Busy(hint)) => {
                    if !busy.wait(hint).await {
                        return Err(SourceError::Busy {
                            peer,
                            tries: busy.tries() + 1,
                        });
                    }
                }
                Ok(r) => return r,
            }
        }
    }

    async fn try_open(&self, req: &BlobRequest) -> Result<Result<(Stream, Option<BulkOffer>), SourceError>, NoHeader> {
        let peer = self.peer;
        let stall = self.stall_timeout;
        let gone = |reason: String| Ok(Err(SourceError::PeerGone { peer, reason }));
        // Start.
        // libp2p-stream 0.5.0-alpha can lose a stream request made while a connection is being
        // set up (its dial queue holds one request, and a handler created just before the
        // connection is registered misses the pending stream), so connect through the event
        // loop first: once it reports the connection, the stream rides it.
        match tokio::time::timeout(stall, self.net.connect(peer)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return gone(e.to_string()),
            Err(_) => return gone("no connection within the stall timeout".into()),
        }
        let mut control = self.control.clone();
        let mut stream = match tokio::time::timeout(stall, control.open_stream(peer, BLOB_PROTOCOL)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return gone(e.to_string()),
            Err(_) => return gone("no stream within the stall timeout".into()),
        };
        // Header.
        let header = async {
            write_request(&mut stream, req).await?;
            read_header(&mut stream).await
        };
        match tokio::time::timeout(stall, header).await {
            Ok(Ok(BlobHeader::Found)) => Ok(Ok((stream, None))),
            Ok(Ok(BlobHeader::FoundBulk(offer))) if req.bulk => Ok(Ok((stream, Some(offer)))),
            Ok(Ok(BlobHeader::FoundBulk(_))) => Ok(Err(SourceError::Protocol {
                peer,
                reason: "offered a bulk connection to a request without one".into(),
            })),
            Ok(Ok(BlobHeader::NotFound)) => Ok(Err(SourceError::NotFound { peer })),
            Ok(Ok(BlobHeader::Refused { reason })) => Ok(Err(SourceError::Refused { peer, reason })),
            Ok(Ok(BlobHeader::Busy { retry_after_ms })) => {
                Err(NoHeader::Busy(Duration::from_millis(u64::from(retry_after_ms))))
            }
            Ok(Err(FrameError::Io(e))) => Err(NoHeader::Dropped(e.to_string())),
            Ok(Err(e)) => Ok(Err(self.map_frame(e))),
            Err(_) => gone(format!("no answer within {stall:?}")),
        }
    }

    /// `Start` → `Header` → `Hashes` → `Done`, asking for no chunk: the blob's manifest, which
    /// must hash to `blob`'s id. `n` is the blob's chunk count.
    pub(super) async fn hashes(self, blob: BlobRef, n: u64) -> Result<Manifest, SourceError> {
        let peer = self.peer;
        let req = BlobRequest {
            blob,
            first: 0,
            end: 0,
            window: 1,
            want_hashes: true,
            wait_ms: self.wait_ms,
            bulk: false,
            pending: false,
        };
        let (mut stream, _) = self.open(&req).await?;
        // The count is known from the id's shape, so the cap is exact.
        let cap = u32::try_from(n * 32).map_err(|_| SourceError::Refused {
            peer,
            reason: "hash list too large".into(),
        })?;
        let bytes = self.timed(read_frame(&mut stream, cap)).await?;
        let _ = stream.close().await;
        let hashes = hashes_from_bytes(&bytes).ok_or(SourceError::BadManifest { peer })?;
        Manifest::verified(&blob, hashes).map_err(|_| SourceError::BadManifest { peer })
    }

    /// `Start` → `Header` → `Chunks` → `Done` for one contiguous range: a reader that checks
    /// frames and a persister that verifies and files them into `target` (then hands each to
    /// `on_chunk`, once per fetch) and grants a credit for each, joined by a channel of
    /// `window` chunks.
    /// `on_new` is called for each chunk that was not filed before.
    pub(super) async fn chunks(
        &self,
        target: &Arc<Target>,
        range: Range<u64>,
        opts: &FetchOptions,
        on_new: impl Fn(),
    ) -> Result<(), ReceiveError> {
        let peer = self.peer;
        let manifest = &target.manifest;
        let (on_chunk, before_credit) = (opts.on_chunk.as_ref(), opts.before_credit.as_ref());
        let window = opts.window.clamp(1, MAX_WINDOW);
        let req = BlobRequest {
            blob: target.request_ref(),
            first: range.start,
            end: range.end,
            window,
            want_hashes: false,
            wait_ms: self.wait_ms,
            pending: target.is_pending(),
            bulk: self.bulk
                && (range.end - range.start).saturating_mul(u64::from(manifest.chunk_size)) >= BULK_MIN_BYTES
                && !self.bulk_unreachable(),
        };
        let (stream, offer) = self.open(&req).await?;
        let (rd, mut wr) = stream.split();
        let mut input = match offer {
            Some(offer) => self.take_bulk(&offer, rd, &mut wr).await?,
            None => ChunksIn::Stream(rd),
        };
        // Chunks travel reader -> persister in block-aligned buffers (so a disk store can
        // write them with O_DIRECT), and the buffers come back for reuse by this stream and
        // the fetch's next ones: a fetch touches about `window + 1` buffers per source however
        // long it is.
        let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>, usize)>(window as usize);

        let reader = async move {
            for index in range {
                let frame = self.timed(input.frame()).await?;
                let len = match frame {
                    _ if frame.index() != index => {
                        return Err(ReceiveError::Source(SourceError::Protocol {
                            peer,
                            reason: format!("sent chunk {} where {index} was due", frame.index()),
                        }));
                    }
                    ChunkFrame::Absent { .. } => return Err(ReceiveError::Absent),
                    ChunkFrame::Data { len, .. } => len as usize,
                };
                if len != manifest.chunk_len(index) {
                    return Err(ReceiveError::Source(SourceError::Protocol {
                        peer,
                        reason: format!(
                            "chunk {index} announced with {len} bytes, not {}",
                            manifest.chunk_len(index)
                        ),
                    }));
                }
                let mut buf = match target.spare_buffer() {
                    Some(b) if b.len() >= len + DIRECT_ALIGN => b,
                    _ => aligned_buffer(manifest.chunk_size as usize).0,
                };
                let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
                let slot = &mut buf[off..off + len];
                self.timed(input.body(slot)).await?;
                if tx.send((index, buf, len)).await.is_err() {
                    break; // the persister stopped; its error is the one that counts
                }
            }
            Ok(())
        };
        // Chunks are verified and filed on blocking threads, up to `depth` at a time; a
        // credit goes back for each as it lands, in order.
        let depth = if on_chunk.is_some() { 1 } else { PERSIST_DEPTH };
        let persist = |index: u64, buf: Vec<u8>, len: usize| {
            let target = target.clone();
            let on_chunk = on_chunk.cloned();
            tokio::task::spawn_blocking(move || {
                let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
                let bytes = &buf[off..off + len];
                let new = target.put(index, bytes)?;
                // Handed over once, even when the store had it already (from another
                // fetch of the same blob, say): it is verified either way.
                if let Some(f) = on_chunk
                    && target.hand_over(index)
                {
                    f(index, bytes);
                }
                Ok::<_, StoreError>((new, buf))
            })
        };
        let persister = async {
            let mut busy = VecDeque::new();
            let mut open = true;
            let outcome = loop {
                tokio::select! {
                    biased;
                    r = async {
                        match busy.front_mut() {
                            Some(h) => h.await,
                            None => std::future::pending().await,
                        }
                    }, if !busy.is_empty() => {
                        busy.pop_front();
                        match landed(r, peer) {
                            Ok((new, buf)) => {
                                target.give_back(buf);
                                if new {
                                    on_new();
                                }
                            }
                            Err(e) => break Err(e),
                        }
                        if let Some(gate) = before_credit {
                            gate().await;
                        }
                        // The source may have closed after its last chunk: a lost credit is harmless.
                        let _ = write_credit(&mut wr, 1).await;
                    }
                    m = rx.recv(), if open && busy.len() < depth => match m {
                        Some((index, buf, len)) => busy.push_back(persist(index, buf, len)),
                        None => open = false,
                    },
                    else => break Ok(()),
                }
            };
            // Chunks still being filed finish before the fetch says how it ended: none is
            // handed over after.
            for h in busy {
                let _ = h.await;
            }
            let _ = wr.close().await;
            outcome
        };
        tokio::pin!(reader, persister);
        let mut read_result = None;
        loop {
            tokio::select! {
                r = &mut reader, if read_result.is_none() => read_result = Some(r),
                p = &mut persister => {
                    return match (p, read_result) {
                        (Err(e), _) | (Ok(()), Some(Err(e))) => Err(e),
                        (Ok(()), _) => Ok(()),
                    };
                }
            }
        }
    }
}

impl Source<'_> {
    /// Whether this source's bulk port could not be reached within the last
    /// [`crate::blob::bulk::BULK_RETRY_AFTER`].
    fn bulk_unreachable(&self) -> bool {
        let mut u = crate::lock(self.unreachable);
        match u.get(&self.peer) {
            Some(at) if at.elapsed() < crate::blob::bulk::BULK_RETRY_AFTER => true,
            Some(_) => {
                u.remove(&self.peer);
                false
            }
            None => false,
        }
    }

    /// Connects to the source's bulk channel as `offer` says and tells the source whether
    /// that worked; chunks come over the connection if it did, else over the stream.
    async fn take_bulk<R, W>(&self, offer: &BulkOffer, rd: R, wr: &mut W) -> Result<ChunksIn<R>, SourceError>
    where
        W: futures::AsyncWrite + Unpin,
    {
        let peer = self.peer;
        let connected = match self.net.peer_ip(&peer) {
            Some(ip) => BulkReader::connect(ip, offer).await.map_err(
                |e| tracing::debug!(%peer, %ip, error = %e, "no bulk connection; chunks come over the stream"),
            ),
            None => Err(()),
        };
        if connected.is_err() {
            tracing::info!(%peer, "the peer's bulk channel cannot be reached: its chunks come over libp2p streams for a while");
            crate::lock(self.unreachable).insert(peer, tokio::time::Instant::now());
        }
        let answer = if connected.is_ok() {
            BULK_CONNECTED
        } else {
            BULK_DECLINED
        };
        self.timed(write_bulk_answer(wr, answer)).await?;
        Ok(match connected {
            Ok(b) => ChunksIn::Bulk(b),
            Err(()) => ChunksIn::Stream(rd),
        })
    }
}

/// What one filing task came back with: the buffer to reuse and whether the chunk was new, or
/// why the stream stops.
fn landed(
    r: Result<Result<(bool, Vec<u8>), StoreError>, tokio::task::JoinError>,
    peer: PeerId,
) -> Result<(bool, Vec<u8>), ReceiveError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(StoreError::HashMismatch { index, .. })) => {
            Err(ReceiveError::Source(SourceError::HashMismatch { chunk: index, peer }))
        }
        Ok(Err(e)) => Err(ReceiveError::Store(e)),
        Err(e) => Err(ReceiveError::Store(super::store_task_failed(e))),
    }
}
