//! The source side of `/flare/blob/1`: one task per inbound stream, reading chunks from the
//! store one ahead of the network and never sending beyond the receiver's credits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flare_protocols::BlobRef;
use flare_protocols::blob::{
    BlobHeader, BlobRequest, MAX_WINDOW, read_bulk_answer, read_credit, read_request, write_absent, write_chunk,
    write_header,
};
use flare_protocols::frame::{FrameError, write_frame};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};

use super::bulk::{BULK_MIN_BYTES, BulkListener, BulkWriter};
use super::faults::ServeFaults;
use super::recent::RecentChunks;
use crate::network::NetworkHandle;
use crate::store::{BlobStore, ChunkBytes, StoreError};

/// How long a source waits for a request or a credit before giving up on a stream.
pub const SERVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a relaying source waits to begin a blob a peer asks it for (its manifest): a
/// peer that takes part in a shared pull begins it within moments of its task, so one that
/// has not by then is not pulling (it refused the task, or is stuck) and the asker had better
/// take that share from the origin. Chunks of a begun blob are waited for longer
/// (the request's `wait_ms`).
pub const RELAY_BEGIN_WAIT: Duration = Duration::from_secs(2);

/// Chunks a source reads ahead of what it sends, per stream.
pub const READ_AHEAD: u64 = 4;

/// Chunks read ahead beyond the next one due, by all of a node's streams together: every
/// stream always reads the chunk it sends next, and reads further ahead only while this
/// budget lasts, so a node serving many peers at once (a controller at the start of a round)
/// does not hold `READ_AHEAD` chunks per peer.
pub const READ_AHEAD_BUDGET: usize = 8;

/// What this node has served, for logs, benchmarks and tests.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Data chunks sent.
    pub chunks: AtomicU64,
    /// Data bytes sent.
    pub bytes: AtomicU64,
    /// Streams that ended in an error (bad request, peer gone, ...).
    pub failed_streams: AtomicU64,
    /// Streams answered `Busy` (at the stream limit), each asked again later.
    pub busy_streams: AtomicU64,
    /// Streams whose chunks went over a bulk connection.
    pub bulk_streams: AtomicU64,
    /// Data chunks sent of outputs still being produced ([`super::pending`]).
    pub pending_chunks: AtomicU64,
    /// Chunks of outputs still being produced that this node's own pulls took, with no
    /// stream ([`super::pending::pull_here`]: a swarm aggregator's own result).
    pub pending_chunks_here: AtomicU64,
}

/// Everything a serving task needs.
#[derive(Clone)]
pub(crate) struct Server {
    pub store: BlobStore,
    pub stats: Arc<ServeStats>,
    pub faults: Arc<ServeFaults>,
    pub net: NetworkHandle,
    /// Shares [`READ_AHEAD_BUDGET`] between the streams being served.
    pub ahead: Arc<tokio::sync::Semaphore>,
    /// The node's upload cap, if it has one.
    pub pace: Option<Arc<super::UploadPace>>,
    /// Chunks read lately, while several streams serve one blob.
    pub recent: Arc<RecentChunks>,
    /// Where receivers that ask for it take a stream's chunks over a connection of their own
    /// (`None`: this node serves every stream over libp2p).
    pub bulk: Option<Arc<BulkListener>>,
    /// Outputs served while they are produced.
    pub pending: Arc<super::PendingOutputs>,
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("timed out waiting for the receiver")]
    Idle,
    #[error("store task failed: {0}")]
    Join(String),
}

/// Most blob streams a node serves at once unless its [`crate::NodeConfig`] says otherwise;
/// more are answered `Busy` until some end (so memory stays bounded however many ask).
pub const MAX_SERVING: usize = 256;

/// Streams being answered `Busy` at once; beyond that a stream is dropped (its receiver
/// opens it again, see the fetch's receiver).
const MAX_ANSWERING_BUSY: usize = 4096;

/// What a busy source suggests its receivers wait before asking again.
const BUSY_RETRY_AFTER_MS: u32 = 50;

/// How long a busy answer waits for the request it answers.
const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts blob streams until the control is dropped, serving `limit` at once and answering
/// the others `Busy`.
pub(crate) async fn accept_loop(server: Server, mut incoming: libp2p_stream::IncomingStreams, limit: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let answering = Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING_BUSY));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            server.stats.busy_streams.fetch_add(1, Ordering::Relaxed);
            crate::busy::BUSY_STREAMS.event();
            if let Ok(permit) = answering.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    if let Err(e) = answer_busy(stream).await {
                        tracing::debug!(%peer, error = %e, "busy answer not delivered");
                    }
                    drop(permit);
                });
            }
            continue;
        };
        let s = server.clone();
        tokio::spawn(async move {
            if let Err(e) = s.serve(peer, stream).await {
                s.stats.failed_streams.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %e, "blob stream failed");
            }
            drop(slot);
        });
    }
}

/// A loopback port nobody listens on (for [`super::FaultPlan::bulk_unreachable`]): one just
/// let go.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(1, |a| a.port())
}

/// Reads the request (so the receiver's write completes) and answers `Busy`.
async fn answer_busy(mut stream: Stream) -> Result<(), FrameError> {
    let answer = async {
        read_request(&mut stream).await?;
        write_header(
            &mut stream,
            &BlobHeader::Busy {
                retry_after_ms: BUSY_RETRY_AFTER_MS,
            },
        )
        .await?;
        stream.close().await.map_err(FrameError::from)
    };
    tokio::time::timeout(BUSY_ANSWER_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())))
}

async fn idle<T, E: Into<ServeError>>(f: impl Future<Output = Result<T, E>>) -> Result<T, ServeError> {
    tokio::time::timeout(SERVE_IDLE_TIMEOUT, f)
        .await
        .map_err(|_| ServeError::Idle)?
        .map_err(Into::into)
}

/// Waits, when the receiver has granted no credit left, for it to grant more.
async fn wait_for_credit(stream: &mut Stream, credits: &mut u64) -> Result<(), ServeError> {
    while *credits == 0 {
        *credits = credits.saturating_add(u64::from(idle(read_credit(stream)).await?));
    }
    Ok(())
}

/// Tells the receiver this node does not hold chunk `index`, where the range's chunks go.
async fn send_absent(bulk: &mut Option<BulkWriter>, stream: &mut Stream, index: u64) -> Result<(), ServeError> {
    match bulk {
        Some(w) => w.absent(index).await?,
        None => write_absent(stream, index).await?,
    }
    Ok(())
}

/// Ends a range served to its last chunk: its bulk connection, if any, then the stream.
async fn end_range(bulk: Option<BulkWriter>, mut stream: Stream) -> Result<(), ServeError> {
    if let Some(w) = bulk {
        w.close().await?;
    }
    stream.close().await.map_err(FrameError::from)?;
    Ok(())
}

/// A chunk the server has read ahead.
enum Ahead {
    /// In hand (a view of bytes in memory), or known absent.
    Ready(Option<ChunkBytes>),
    /// Being read from disk.
    Reading(tokio::task::JoinHandle<Result<Option<ChunkBytes>, StoreError>>),
}

impl Ahead {
    /// The chunk, once read; `None` when the store does not hold it.
    async fn chunk(self) -> Result<Option<ChunkBytes>, ServeError> {
        match self {
            Ahead::Ready(c) => Ok(c),
            Ahead::Reading(h) => Ok(h.await.map_err(|e| ServeError::Join(e.to_string()))??),
        }
    }
}

impl Server {
    async fn serve(&self, peer: PeerId, mut stream: Stream) -> Result<(), ServeError> {
        let req = idle(read_request(&mut stream)).await?;
        if req.pending {
            return self.serve_pending(peer, stream, req).await;
        }
        let blob = req.blob;
        // Bounded here, not by the asker: a slot held waiting is a slot no one else gets.
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(super::fetch::RELAY_WAIT_MS)));
        if !wait.is_zero() && self.store.manifest(&blob.id).is_none() {
            // A peer pulling the same blob asks before this node has begun to: wait a little.
            self.store
                .wait_for_manifest(&blob.id, tokio::time::Instant::now() + wait.min(RELAY_BEGIN_WAIT))
                .await;
        }
        let manifest = match self.check(&req) {
            Ok(m) => m,
            Err(header) => {
                tracing::debug!(%peer, blob = %blob.id, ?header, "blob request not served");
                write_header(&mut stream, &header).await?;
                stream.close().await.map_err(FrameError::from)?;
                return Ok(());
            }
        };
        let hashes = req.want_hashes.then(|| manifest.hash_bytes());
        let mut bulk = self.found(&mut stream, &req, hashes).await?;
        tracing::debug!(%peer, blob = %blob.id, first = req.first, end = req.end, "serving blob range");

        let serving = self.recent.serving(blob.id, peer, req.first);
        let mut credits = u64::from(req.window.clamp(1, MAX_WINDOW));
        // Reads run ahead of the network by a few chunks, so a blob that is on disk rather
        // than in the page cache still streams at network speed.
        let mut ahead = std::collections::VecDeque::new();
        // Buffers of chunks already sent, read into again: a fresh one would be zeroed (and,
        // once glibc has handed the memory back, faulted in) for every chunk.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut next_read = req.first;
        for index in req.first..req.end {
            while next_read < req.end && next_read < index + READ_AHEAD {
                let permit = if next_read == index {
                    None
                } else {
                    match self.ahead.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    }
                };
                let held = self.store.chunk_in_memory(&blob.id, next_read);
                if held.is_none() {
                    // Read from disk in step with the other streams of this blob, if any: a
                    // read ahead too far ahead waits for the next turn, the chunk due waits.
                    if next_read != index && serving.too_far(next_read) {
                        break;
                    }
                    serving.step_to(next_read).await;
                }
                let next = match held {
                    Some(view) => Ahead::Ready(Some(view)),
                    None => self.read_ahead(blob, next_read, spare.pop(), serving.others_need(next_read)),
                };
                ahead.push_back((next, permit));
                next_read += 1;
            }
            // The permit, if any, is held until the chunk is sent.
            let (mut chunk, _permit) = match ahead.pop_front() {
                Some((a, permit)) => (a.chunk().await?, permit),
                None => (None, None),
            };
            if chunk.is_none()
                && !wait.is_zero()
                && self
                    .store
                    .wait_for_chunk(&blob.id, index, tokio::time::Instant::now() + wait)
                    .await
            {
                // Relaying: the chunk this node was still receiving has come (a view when the
                // blob is held in memory, as before `read_ahead` left that to its caller).
                chunk = match self.store.chunk_in_memory(&blob.id, index) {
                    Some(view) => Some(view),
                    None => self.read_ahead(blob, index, spare.pop(), false).chunk().await?,
                };
            }
            wait_for_credit(&mut stream, &mut credits).await?;
            self.stall_if_armed().await;
            match chunk {
                Some(mut bytes) => {
                    if self.faults.plan().corrupt_chunk == Some(index) {
                        let mut v = bytes.into_vec();
                        if let Some(b) = v.first_mut() {
                            *b ^= 0xff;
                        }
                        bytes = ChunkBytes::Owned(v);
                    }
                    let len = bytes.len();
                    if let Some(pace) = &self.pace {
                        pace.wait(len).await;
                    }
                    let buf = match (&mut bulk, bytes) {
                        // Sealed in place in the buffer it was read into, or in a copy when
                        // others hold it too.
                        (Some(w), ChunkBytes::Read { mut buf, start, len }) => {
                            w.data(index, &mut buf[start..start + len]).await?;
                            Some(buf)
                        }
                        (Some(w), ChunkBytes::Owned(mut buf)) => {
                            w.data(index, &mut buf).await?;
                            Some(buf)
                        }
                        (Some(w), bytes @ ChunkBytes::Held { .. }) => {
                            w.shared(index, &bytes).await?;
                            None
                        }
                        (None, bytes) => {
                            write_chunk(&mut stream, index, &bytes).await?;
                            bytes.into_buffer()
                        }
                    };
                    let served = self.stats.chunks.fetch_add(1, Ordering::Relaxed) + 1;
                    self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    if spare.len() < READ_AHEAD as usize
                        && let Some(buf) = buf
                    {
                        spare.push(buf);
                    }
                    if self.faults.take_cut(served) {
                        stream.flush().await.map_err(FrameError::from)?;
                        tracing::warn!(%peer, index, "fault injection: cutting the connection");
                        let _ = self.net.disconnect(peer);
                        return Ok(());
                    }
                }
                None => send_absent(&mut bulk, &mut stream, index).await?,
            }
            credits -= 1;
        }
        end_range(bulk, stream).await
    }

    /// Answers a request that will be served: `Found` (then the hash list, when given), or
    /// `FoundBulk` and the receiver's answer to it; the bulk connection when it took it.
    async fn found(
        &self,
        stream: &mut Stream,
        req: &BlobRequest,
        hashes: Option<Vec<u8>>,
    ) -> Result<Option<BulkWriter>, ServeError> {
        let bytes = (req.end - req.first).saturating_mul(u64::from(req.blob.chunk_size));
        let mut offer = match &self.bulk {
            Some(l) if req.bulk && bytes >= BULK_MIN_BYTES => Some(l.offer()?),
            _ => None,
        };
        if let Some((o, _)) = &mut offer
            && self.faults.plan().bulk_unreachable
        {
            o.port = closed_port();
        }
        let header = match &offer {
            Some((o, _)) => BlobHeader::FoundBulk(o.clone()),
            None => BlobHeader::Found,
        };
        write_header(stream, &header).await?;
        if let Some(h) = hashes {
            write_frame(stream, &h).await?;
        }
        stream.flush().await.map_err(FrameError::from)?;
        Ok(match offer {
            Some((o, offered)) if idle(read_bulk_answer(stream)).await? => {
                self.stats.bulk_streams.fetch_add(1, Ordering::Relaxed);
                Some(BulkWriter::new(offered.connection().await?, &o))
            }
            _ => None,
        })
    }

    /// Serves a range of an output still being produced ([`super::pending`]): each chunk
    /// once it is produced, sent from the producer's copy (sealed in place on a bulk
    /// connection), absent when it is not held (taken before, or the output was abandoned).
    async fn serve_pending(&self, peer: PeerId, mut stream: Stream, req: BlobRequest) -> Result<(), ServeError> {
        let blob = req.blob;
        let refused = |reason: &str| BlobHeader::Refused { reason: reason.into() };
        let output = self.pending.get(&blob.id);
        let n = blob.chunk_count().unwrap_or(0);
        let answer = match &output {
            _ if req.want_hashes => Some(refused("an output still being produced has no hash list")),
            None => Some(BlobHeader::NotFound),
            Some(o) if o.blob() != blob => Some(refused("length or chunk size does not match the output")),
            Some(_) if req.first > req.end || req.end > n => Some(refused("chunk range outside the output")),
            Some(_) => None,
        };
        let (Some(output), None) = (output, &answer) else {
            let header = answer.unwrap_or(BlobHeader::NotFound);
            tracing::debug!(%peer, blob = %blob.id, ?header, "pending output request not served");
            write_header(&mut stream, &header).await?;
            stream.close().await.map_err(FrameError::from)?;
            return Ok(());
        };
        let mut bulk = self.found(&mut stream, &req, None).await?;
        tracing::debug!(%peer, blob = %blob.id, first = req.first, end = req.end, "serving an output as it is produced");
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(super::pending::PENDING_WAIT_MS)));
        let mut credits = u64::from(req.window.clamp(1, MAX_WINDOW));
        for index in req.first..req.end {
            let chunk = output.take(index, tokio::time::Instant::now() + wait).await;
            wait_for_credit(&mut stream, &mut credits).await?;
            match chunk {
                Some(mut bytes) => {
                    if let Some(pace) = &self.pace {
                        pace.wait(bytes.len()).await;
                    }
                    match &mut bulk {
                        Some(w) => w.data(index, &mut bytes).await?,
                        None => write_chunk(&mut stream, index, &bytes).await?,
                    }
                    self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                    let sent = self.stats.pending_chunks.fetch_add(1, Ordering::Relaxed) + 1;
                    self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    output.recycle(bytes);
                    if self.faults.plan().drop_pending_after.is_some_and(|n| sent >= n) {
                        tracing::warn!(%peer, index, "fault injection: the output stops streaming");
                        output.abandon();
                    }
                }
                None => send_absent(&mut bulk, &mut stream, index).await?,
            }
            credits -= 1;
        }
        end_range(bulk, stream).await
    }

    /// Validates a request against the store; the error is the header to answer with.
    fn check(&self, req: &BlobRequest) -> Result<Arc<flare_protocols::Manifest>, BlobHeader> {
        let refused = |reason: String| BlobHeader::Refused { reason };
        let n = req.blob.chunk_count().map_err(|e| refused(e.to_string()))?;
        let m = self.store.manifest(&req.blob.id).ok_or(BlobHeader::NotFound)?;
        if m.len != req.blob.len || m.chunk_size != req.blob.chunk_size {
            return Err(refused("length or chunk size does not match the blob id".into()));
        }
        if req.first > req.end || req.end > n {
            return Err(refused(format!(
                "chunk range {}..{} outside 0..{n}",
                req.first, req.end
            )));
        }
        Ok(m)
    }

    /// Chunk `index`, not held in memory by the store, or a read of it under way. One read
    /// lately for another stream serving the same blob ([`RecentChunks`]) is a view, at once.
    /// Otherwise it is read on a blocking thread into `spare` or a buffer allocated here, on
    /// a runtime worker (see [`BlobStore::read_chunk_to_send`]), and kept for the other
    /// streams if there are any and one of them has yet to send it (`keep`).
    fn read_ahead(&self, blob: BlobRef, index: u64, spare: Option<Vec<u8>>, keep: bool) -> Ahead {
        let shared = self.recent.shared(&blob.id);
        if shared && let Some(view) = self.recent.get(&blob.id, index) {
            return Ahead::Ready(Some(view));
        }
        let (store, recent) = (self.store.clone(), self.recent.clone());
        let buf = spare
            .or_else(|| shared.then(|| recent.buffer()).flatten())
            .unwrap_or_else(|| vec![0u8; blob.chunk_size as usize + crate::store::DIRECT_ALIGN]);
        Ahead::Reading(tokio::task::spawn_blocking(move || {
            let chunk = store.read_chunk_to_send(&blob.id, index, buf)?;
            Ok(match chunk {
                Some(c @ ChunkBytes::Read { .. }) if shared && keep => Some(recent.keep(blob.id, index, c)),
                other => other,
            })
        }))
    }

    async fn stall_if_armed(&self) {
        // Bounded: a stalled source resumes by itself after a minute.
        for _ in 0..6000 {
            match self.faults.plan().stall_after {
                Some(n) if self.stats.chunks.load(Ordering::Relaxed) >= n => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => return,
            }
        }
    }
}
