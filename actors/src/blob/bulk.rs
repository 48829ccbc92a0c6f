//! The sockets of the blob protocol's bulk channel (wire format, keys and trust:
//! [`flare_protocols::bulk`]): a node's listener, which hands each connection to the serving
//! stream whose token it presents, and the two ends of a connection, which seal and open
//! chunk frames in the buffers the store reads into and writes from.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_protocols::blob::ChunkFrame;
use flare_protocols::bulk::{BULK_HEAD_LEN, BulkOffer, BulkOpener, BulkSealer, TOKEN_LEN};
use flare_protocols::frame::FrameError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::lock;

/// How long a connection may take to present its token, and a receiver to connect.
pub const BULK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a receiver that could not reach a source's bulk port takes that source's chunks
/// over libp2p streams before it tries the port again.
pub const BULK_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Ranges shorter than this go over the libp2p stream: a connection of their own would cost
/// more than the copies it saves.
pub const BULK_MIN_BYTES: u64 = 4 << 20;

/// Connections waiting to present their token at once; more are closed at once. The port is
/// open to anyone (the token, not the peer's address, says who it is), so this bounds what a
/// flood of connections that never send one can hold.
const MAX_HANDSHAKES: usize = 256;

type Waiting = Mutex<HashMap<[u8; TOKEN_LEN], oneshot::Sender<TcpStream>>>;

/// A node's listener for bulk connections; its accept task is one of the node's (stopped with
/// it).
pub(crate) struct BulkListener {
    port: u16,
    waiting: Arc<Waiting>,
}

/// An offer made, waiting for the receiver's connection; the token stops being valid when
/// this is dropped.
pub(crate) struct Offered {
    token: [u8; TOKEN_LEN],
    waiting: Arc<Waiting>,
    rx: Option<oneshot::Receiver<TcpStream>>,
}

impl BulkListener {
    /// Listens on `ip` (an ephemeral port) and accepts connections until the returned task
    /// is aborted.
    pub(crate) async fn bind(ip: IpAddr) -> std::io::Result<(Self, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let port = listener.local_addr()?.port();
        let waiting: Arc<Waiting> = Arc::default();
        let w = waiting.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, from)) = listener.accept().await else {
                    // Out of descriptors, say: let the others finish, then go on.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%from, "bulk connection refused: too many waiting for their token");
                    continue;
                };
                let w = w.clone();
                tokio::spawn(async move {
                    if let Err(why) = hand_over(tcp, &w).await {
                        tracing::debug!(%from, %why, "bulk connection refused");
                    }
                    drop(permit);
                });
            }
        });
        Ok((Self { port, waiting }, task))
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// A fresh offer, and the wait for its connection.
    pub(crate) fn offer(&self) -> Result<(BulkOffer, Offered), FrameError> {
        let offer = BulkOffer::new(self.port)?;
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(offer.token, tx);
        let offered = Offered {
            token: offer.token,
            waiting: self.waiting.clone(),
            rx: Some(rx),
        };
        Ok((offer, offered))
    }
}

/// Reads a connection's token and gives the connection to the stream that offered it.
async fn hand_over(mut tcp: TcpStream, waiting: &Waiting) -> Result<(), String> {
    let mut token = [0u8; TOKEN_LEN];
    tokio::time::timeout(BULK_CONNECT_TIMEOUT, tcp.read_exact(&mut token))
        .await
        .map_err(|_| "no token in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let tx = lock(waiting).remove(&token).ok_or("unknown token")?;
    tx.send(tcp).map_err(|_| "the stream stopped waiting".to_owned())
}

impl Offered {
    /// The receiver's connection, once it has presented the token.
    pub(crate) async fn connection(mut self) -> Result<TcpStream, FrameError> {
        let rx = self
            .rx
            .take()
            .ok_or_else(|| FrameError::Malformed("bulk offer taken twice".into()))?;
        match tokio::time::timeout(BULK_CONNECT_TIMEOUT, rx).await {
            Ok(Ok(tcp)) => Ok(tcp),
            _ => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the receiver said it connected, but no connection presented the token",
            ))),
        }
    }
}

impl Drop for Offered {
    fn drop(&mut self) {
        lock(&self.waiting).remove(&self.token);
    }
}

/// The source's end of a bulk connection.
pub(crate) struct BulkWriter {
    tcp: TcpStream,
    sealer: BulkSealer,
    /// Where a chunk that others hold too is copied to be sealed: one buffer for the
    /// connection's life.
    copy: Vec<u8>,
}

impl BulkWriter {
    pub(crate) fn new(tcp: TcpStream, offer: &BulkOffer) -> Self {
        let _ = tcp.set_nodelay(true);
        Self {
            tcp,
            sealer: BulkSealer::new(offer),
            copy: Vec::new(),
        }
    }

    /// Sends chunk `index`, encrypting `bytes` in place.
    pub(crate) async fn data(&mut self, index: u64, bytes: &mut [u8]) -> Result<(), FrameError> {
        let head = self.sealer.seal_data(index, bytes)?;
        self.tcp.write_all(&head).await?;
        self.tcp.write_all(bytes).await?;
        Ok(())
    }

    /// Sends chunk `index` from bytes others hold too (encrypted in a copy).
    pub(crate) async fn shared(&mut self, index: u64, bytes: &[u8]) -> Result<(), FrameError> {
        let mut copy = std::mem::take(&mut self.copy);
        copy.clear();
        copy.extend_from_slice(bytes);
        let sent = self.data(index, &mut copy).await;
        self.copy = copy;
        sent
    }

    /// Says chunk `index` is absent.
    pub(crate) async fn absent(&mut self, index: u64) -> Result<(), FrameError> {
        let head = self.sealer.seal_absent(index)?;
        self.tcp.write_all(&head).await?;
        Ok(())
    }

    /// Ends the connection once everything is sent.
    pub(crate) async fn close(mut self) -> Result<(), FrameError> {
        self.tcp.shutdown().await?;
        Ok(())
    }
}

/// The receiver's end of a bulk connection.
pub(crate) struct BulkReader {
    tcp: TcpStream,
    opener: BulkOpener,
    head: [u8; BULK_HEAD_LEN],
}

impl BulkReader {
    /// Connects to the source at `ip` as `offer` says and presents the token.
    pub(crate) async fn connect(ip: IpAddr, offer: &BulkOffer) -> std::io::Result<Self> {
        let connect = async {
            let mut tcp = TcpStream::connect(SocketAddr::new(ip, offer.port)).await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(&offer.token).await?;
            Ok::<_, std::io::Error>(tcp)
        };
        let tcp = tokio::time::timeout(BULK_CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "bulk connection timed out"))??;
        Ok(Self {
            tcp,
            opener: BulkOpener::new(offer),
            head: [0; BULK_HEAD_LEN],
        })
    }

    /// The next frame's head (not yet authenticated: check it, then read its [`Self::body`]).
    pub(crate) async fn frame(&mut self) -> Result<ChunkFrame, FrameError> {
        self.tcp.read_exact(&mut self.head).await?;
        let frame = BulkOpener::frame(&self.head)?;
        if let ChunkFrame::Absent { .. } = frame {
            self.opener.open(&self.head, &mut [])?;
        }
        Ok(frame)
    }

    /// Reads the body of the frame just read into `slot` (its length) and decrypts it there,
    /// once authenticated.
    pub(crate) async fn body(&mut self, slot: &mut [u8]) -> Result<(), FrameError> {
        self.tcp.read_exact(slot).await?;
        self.opener.open(&self.head, slot)
    }
}
