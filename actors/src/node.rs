//! A running peer: the network actor, the blob server and the fetcher, wired together.
//!
//! This is what `flare-node run` starts and what multi-node tests start several of. It owns
//! its tasks: dropping or shutting down a [`Node`] stops them all.

use std::sync::Arc;

use flare_protocols::BlobRef;
use flare_protocols::blob::BLOB_PROTOCOL;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::blob::bulk::BulkListener;
use crate::blob::fetch::Fetcher;
use crate::blob::serve::{Server, accept_loop};
use crate::blob::{FetchError, FetchOptions, FetchReport, PendingOutputs, ServeFaults, ServeStats};
use crate::membership::{Member, MemberTable};
use crate::network::{self, InboundCtl, NetworkError, NetworkHandle};
use crate::store::BlobStore;

/// What a node needs to start.
pub struct NodeConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Who may connect.
    pub members: MemberTable,
    /// Where to listen (e.g. `/ip4/127.0.0.1/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Where blobs live.
    pub store: BlobStore,
    /// Most blob streams served at once (see [`crate::blob::serve::MAX_SERVING`]); further pulls are answered
    /// `Busy` and come back later, so the memory serving takes stays bounded.
    pub max_blob_streams: usize,
    /// Bytes a second this node sends at most as blob chunks, to all peers together
    /// (`--max-upload`); `None`: as fast as the network goes.
    pub max_upload: Option<u64>,
    /// Whether blob streams of a few MiB and more may carry their chunks over a TCP
    /// connection of their own (`flare_protocols::bulk`), served and fetched: fewer copies
    /// per byte than a libp2p stream. Off, or where the connection cannot be made (a
    /// firewall, NAT), chunks go over the libp2p stream.
    pub bulk_channel: bool,
}

/// Bytes a node has sent, from its own protocol handlers (payload, not transport overhead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Control messages written (requests and responses).
    pub ctl_bytes: u64,
    /// Blob chunk bytes served.
    pub blob_bytes: u64,
}

impl Traffic {
    /// Everything sent.
    pub fn total(&self) -> u64 {
        self.ctl_bytes + self.blob_bytes
    }

    /// What was sent since `earlier`.
    pub fn since(&self, earlier: Traffic) -> Traffic {
        Traffic {
            ctl_bytes: self.ctl_bytes.saturating_sub(earlier.ctl_bytes),
            blob_bytes: self.blob_bytes.saturating_sub(earlier.blob_bytes),
        }
    }
}

/// A running peer.
pub struct Node {
    net: NetworkHandle,
    store: BlobStore,
    fetcher: Fetcher,
    control: libp2p_stream::Control,
    listen_addrs: Vec<Multiaddr>,
    stats: Arc<ServeStats>,
    faults: Arc<ServeFaults>,
    /// Set once the network actor has stopped, for whatever reason.
    stopped: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
    bulk_port: Option<u16>,
    pending: Arc<PendingOutputs>,
}

impl Node {
    /// Starts the network and the blob server; returns once listening. Connections offer
    /// the default [`network::Security`] (TLS, then Noise).
    pub async fn start(cfg: NodeConfig) -> Result<Self, NetworkError> {
        Self::start_with_security(cfg, network::Security::default()).await
    }

    /// [`Node::start`] offering `security` on its connections: a node restricted to one
    /// protocol (to measure it, or to stand for a peer that speaks only that one).
    pub async fn start_with_security(cfg: NodeConfig, security: network::Security) -> Result<Self, NetworkError> {
        let net = network::start(cfg.keypair, cfg.members, &cfg.listen, security).await?;
        let mut control = net.control.clone();
        let incoming = control
            .accept(BLOB_PROTOCOL)
            .map_err(|e| NetworkError::Transport(e.to_string()))?;
        let mut tasks = Vec::new();
        let bulk = match cfg.bulk_channel {
            true => bulk_listener(&net.listen_addrs, &mut tasks).await,
            false => None,
        };
        let bulk_port = bulk.as_ref().map(|l| l.port());
        let stats = Arc::new(ServeStats::default());
        let faults = Arc::new(ServeFaults::default());
        let pending = Arc::new(PendingOutputs::default());
        let server = Server {
            store: cfg.store.clone(),
            stats: stats.clone(),
            faults: faults.clone(),
            net: net.handle.clone(),
            ahead: Arc::new(tokio::sync::Semaphore::new(crate::blob::serve::READ_AHEAD_BUDGET)),
            recent: Arc::default(),
            pace: cfg.max_upload.map(|r| Arc::new(crate::blob::UploadPace::new(r))),
            bulk,
            pending: pending.clone(),
        };
        let (stop_tx, stopped) = watch::channel(false);
        let net_task = net.task;
        let watcher = tokio::spawn(async move {
            let _ = net_task.await;
            stop_tx.send_replace(true);
        });
        // The watcher first: `shutdown` waits for it.
        tasks.insert(0, watcher);
        tasks.push(tokio::spawn(accept_loop(server, incoming, cfg.max_blob_streams)));
        Ok(Self {
            fetcher: Fetcher::new(net.control.clone(), net.handle.clone(), cfg.store.clone())
                .with_bulk_channel(cfg.bulk_channel),
            net: net.handle,
            store: cfg.store,
            control: net.control,
            listen_addrs: net.listen_addrs,
            stats,
            faults,
            stopped,
            tasks,
            bulk_port,
            pending,
        })
    }

    /// Resolves once the node's network actor has stopped (shut down, or failed): from then
    /// on no peer can reach this node, so whoever waits on a peer should stop waiting.
    pub async fn network_stopped(&self) {
        let mut rx = self.stopped.clone();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// What this node has sent so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            ctl_bytes: self.net.ctl_bytes_sent(),
            blob_bytes: self.stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.net.peer_id()
    }

    /// The addresses bound at start.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// This node as a member-table entry named `name`.
    pub fn as_member(&self, name: &str) -> Member {
        Member {
            name: name.to_owned(),
            peer_id: self.peer_id(),
            addrs: self.listen_addrs.clone(),
        }
    }

    /// The network handle (control requests, membership, connections).
    pub fn net(&self) -> &NetworkHandle {
        &self.net
    }

    /// The blob store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Raw stream control, for protocols beyond ctl and blob (benchmarks, tests).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Inbound control requests from now on; see [`NetworkHandle::subscribe_ctl`].
    pub fn subscribe_ctl(&self) -> Result<mpsc::Receiver<InboundCtl>, NetworkError> {
        self.net.subscribe_ctl()
    }

    /// The outputs this node serves while they are produced (see
    /// [`crate::blob::pending`]).
    pub fn pending_outputs(&self) -> &Arc<PendingOutputs> {
        &self.pending
    }

    /// What the blob server has sent.
    pub fn serve_stats(&self) -> &ServeStats {
        &self.stats
    }

    /// The TCP port of this node's bulk channel, if it has one (`NodeConfig::bulk_channel`).
    pub fn bulk_port(&self) -> Option<u16> {
        self.bulk_port
    }

    /// Fault injection for the blob server (tests).
    pub fn faults(&self) -> &ServeFaults {
        &self.faults
    }

    /// Pulls a blob from `sources` into the store; see [`Fetcher::fetch`].
    pub async fn fetch(
        &self,
        blob: BlobRef,
        sources: &[PeerId],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        self.fetcher.fetch(blob, sources, opts).await
    }

    /// Pulls an output from `source` while it is produced (see [`Fetcher::fetch_pending`]).
    pub async fn fetch_pending(
        &self,
        blob: BlobRef,
        source: PeerId,
        opts: &FetchOptions,
    ) -> Result<flare_protocols::Manifest, FetchError> {
        if source != self.peer_id() {
            return self.fetcher.fetch_pending(blob, source, opts).await;
        }
        // One this node produces: taken from its learner as it comes, no stream.
        match self.pending.get(&blob.id) {
            Some(output) if output.blob() == blob => {
                let sent = &self.stats.pending_chunks_here;
                crate::blob::pending::pull_here(output, opts, source, sent, &self.faults).await
            }
            _ => Err(FetchError::Incomplete {
                blob: blob.id,
                missing: blob.chunk_count().unwrap_or(0),
                errors: vec![crate::blob::SourceError::NotFound { peer: source }],
            }),
        }
    }

    /// Whether this node distrusts `peer` for `blob` (it served data that failed its hash).
    pub fn distrusts(&self, blob: &flare_protocols::BlobId, peer: &PeerId) -> bool {
        self.fetcher.is_distrusted(blob, peer)
    }

    /// Pulls a blob from `origin` and from peers pulling it at once; see
    /// [`Fetcher::fetch_shared`].
    pub async fn fetch_shared(
        &self,
        blob: BlobRef,
        origin: &[PeerId],
        owners: &[PeerId],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        self.fetcher.fetch_shared(blob, origin, owners, opts).await
    }

    /// Stops the node's tasks and closes its connections.
    pub async fn shutdown(mut self) {
        self.net.shutdown();
        if let Some(t) = self.tasks.first_mut() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }
}

/// The bulk channel's listener, on the address of the node's first IP listen address; `None`
/// (streams then carry every chunk) when there is none or it cannot be bound.
async fn bulk_listener(listen: &[Multiaddr], tasks: &mut Vec<JoinHandle<()>>) -> Option<Arc<BulkListener>> {
    let ip = listen.iter().find_map(network::multiaddr_ip)?;
    match BulkListener::bind(ip).await {
        Ok((l, task)) => {
            tasks.push(task);
            Some(Arc::new(l))
        }
        Err(e) => {
            tracing::warn!(%ip, error = %e, "no bulk channel: blob chunks go over libp2p streams only");
            None
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.net.shutdown();
        for t in &self.tasks {
            t.abort();
        }
    }
}
