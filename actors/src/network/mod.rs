//! The network actor: the only owner of the libp2p `Swarm`.
//!
//! A ractor actor driven by a cheap, cloneable [`NetworkHandle`]; inbound control requests
//! come out of a channel as [`InboundCtl`]. The swarm must be polled whenever it has work, not
//! only when a command arrives: the actor polls it with a waker that puts a `Turn` message in
//! its own mailbox. Commands wait in a queue of their own, and each turn takes every waiting
//! command before the next swarm event, so a command sent before a peer's message arrives
//! takes effect before that message is handled (e.g. a control subscription, or admitting a
//! member, made just before that member is asked to send to this node). Bulk bytes never pass
//! through here: blob streams are opened and accepted with the `libp2p_stream::Control` the
//! network hands out, and run on their own tasks.

pub mod coalesce;
pub mod gate;
pub mod muxer;
pub mod secure;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use flare_protocols::ctl::{CTL_PROTOCOL, CtlCodec, CtlRequest, CtlResponse, JobId};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, SwarmBuilder, Transport, identify, identity::Keypair, ping, tcp};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

use crate::membership::{Member, MemberTable};
use gate::MemberGate;
pub use secure::Security;

/// Bytes read from a connection's socket at a time.
const READ_BUFFER: usize = 256 << 10;

/// How long a control request may wait for its response.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's protocols, gate first so that a stranger is refused before any other protocol
/// sees the connection.
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub(crate) struct Behaviour {
    gate: MemberGate,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    ctl: request_response::Behaviour<CtlCodec>,
    stream: libp2p_stream::Behaviour,
}

/// Why the network could not start or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The transport could not be built.
    #[error("transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The network actor has stopped.
    #[error("the network actor has stopped")]
    Stopped,
}

/// Why a control request got no response.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The peer could not be reached (including: it refused us, or we refuse it).
    #[error("cannot reach {peer}: {reason}")]
    Dial {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// No response within [`CTL_TIMEOUT`].
    #[error("request to {0} timed out")]
    Timeout(PeerId),
    /// The connection closed before the response.
    #[error("connection to {0} closed before the response")]
    ConnectionClosed(PeerId),
    /// The peer does not speak `/flare/ctl/1`.
    #[error("{0} does not speak /flare/ctl/1")]
    Unsupported(PeerId),
    /// The exchange failed on the wire (e.g. a malformed or oversize frame).
    #[error("control exchange with {peer} failed: {reason}")]
    Io {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The network actor has stopped.
    #[error("the network actor has stopped")]
    Stopped,
}

/// Why [`NetworkHandle::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The dial failed or was refused (by the peer's gate or ours).
    #[error("cannot connect to {peer}: {reason}")]
    Failed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The network actor has stopped.
    #[error("the network actor has stopped")]
    Stopped,
}

/// A control request from a peer, waiting for its answer.
#[derive(Debug)]
pub struct InboundCtl {
    /// Who sent it (always a member: strangers are refused at the gate).
    pub peer: PeerId,
    /// The request.
    pub request: CtlRequest,
    /// Where the answer goes; dropping it answers `Rejected`.
    pub reply: oneshot::Sender<CtlResponse>,
}

enum Command {
    Request {
        peer: PeerId,
        request: CtlRequest,
        reply: oneshot::Sender<Result<CtlResponse, CtlError>>,
    },
    AddMember(Member),
    Subscribe(mpsc::Sender<InboundCtl>),
    Dial(PeerId),
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
    Disconnect(PeerId),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Shutdown,
}

/// What the network actor receives.
enum NetMsg {
    /// Commands are waiting, or the swarm (or a response being prepared) has work: take the
    /// commands, then poll.
    Turn,
}

/// A cheap, cloneable handle to the network actor.
#[derive(Clone, Debug)]
pub struct NetworkHandle {
    commands: mpsc::UnboundedSender<Command>,
    actor: ActorRef<NetMsg>,
    peer_id: PeerId,
    ctl_sent: Arc<AtomicU64>,
    peer_ips: PeerIps,
}

/// The address each connected peer's latest connection comes from.
type PeerIps = Arc<std::sync::Mutex<HashMap<PeerId, std::net::IpAddr>>>;

impl NetworkHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The IP address `peer`'s latest connection comes from (its listen address when this
    /// node dialed it), while connected: where a blob stream's bulk connection goes
    /// ([`flare_protocols::bulk`]).
    pub fn peer_ip(&self, peer: &PeerId) -> Option<std::net::IpAddr> {
        crate::lock(&self.peer_ips).get(peer).copied()
    }

    /// Control-protocol bytes this node has written (requests and responses), for traffic
    /// reports.
    pub fn ctl_bytes_sent(&self) -> u64 {
        self.ctl_sent.load(Ordering::Relaxed)
    }

    fn send(&self, c: Command) -> Result<(), NetworkError> {
        self.commands.send(c).map_err(|_| NetworkError::Stopped)?;
        self.actor.cast(NetMsg::Turn).map_err(|_| NetworkError::Stopped)
    }

    /// Sends a control request and waits for the response (dialing the member if needed).
    /// A request to this node itself is handed to its own subscriber without touching the
    /// network, so a controller can also be one of its job's executors.
    ///
    /// A peer that answers `Busy` (its queues are full) is asked again after a growing pause
    /// until [`crate::busy::BUSY_PATIENCE`] is spent; then its last `Busy` is returned.
    pub async fn request(&self, peer: PeerId, request: CtlRequest) -> Result<CtlResponse, CtlError> {
        let mut busy = crate::busy::Backoff::new(crate::busy::BUSY_PATIENCE, &crate::busy::BUSY_REQUESTS);
        loop {
            let (reply, rx) = oneshot::channel();
            self.send(Command::Request {
                peer,
                request: request.clone(),
                reply,
            })
            .map_err(|_| CtlError::Stopped)?;
            match rx.await.map_err(|_| CtlError::Stopped)?? {
                CtlResponse::Busy { retry_after_ms } => {
                    if !busy.wait(Duration::from_millis(u64::from(retry_after_ms))).await {
                        return Ok(CtlResponse::Busy { retry_after_ms });
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Routes inbound control requests to the returned receiver (replacing any earlier one).
    /// While nobody subscribes, or after the receiver is dropped, the node answers every
    /// request `Rejected`: it has joined no job.
    pub fn subscribe_ctl(&self) -> Result<mpsc::Receiver<InboundCtl>, NetworkError> {
        let (tx, rx) = mpsc::channel(256);
        self.send(Command::Subscribe(tx))?;
        Ok(rx)
    }

    /// Admits a member (or updates its addresses).
    pub fn add_member(&self, m: Member) -> Result<(), NetworkError> {
        self.send(Command::AddMember(m))
    }

    /// Dials a member at its listed addresses; the outcome is logged.
    pub fn dial(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.send(Command::Dial(peer))
    }

    /// Connects to a member (dialing its listed addresses unless already connected) and
    /// returns once the connection is up, or with the reason it could not be made.
    pub async fn connect(&self, peer: PeerId) -> Result<(), ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect(peer, tx))
            .map_err(|_| ConnectError::Stopped)?;
        rx.await
            .map_err(|_| ConnectError::Stopped)?
            .map_err(|reason| ConnectError::Failed { peer, reason })
    }

    /// Closes every connection to `peer`.
    pub fn disconnect(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.send(Command::Disconnect(peer))
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ConnectedPeers(tx))?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ListenAddrs(tx))?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Stops the network actor; every connection closes.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }
}

/// A started network: the handle, the stream control for blob transfers, and the actor's task.
pub struct Network {
    /// Commands to the actor.
    pub handle: NetworkHandle,
    /// Opens and accepts raw streams (blob transfers).
    pub control: libp2p_stream::Control,
    /// Listen addresses, known before this returns.
    pub listen_addrs: Vec<Multiaddr>,
    /// The actor's task: it ends when the actor stops.
    pub task: tokio::task::JoinHandle<()>,
}

/// Builds the swarm (TCP, then TLS 1.3 or Noise as `security` offers (see [`secure`]), then
/// Yamux with frames sized to the security protocol's, see [`muxer`]), starts listening and
/// waits until every listen address is bound.
pub async fn start(
    keypair: Keypair,
    members: MemberTable,
    listen: &[Multiaddr],
    security: Security,
) -> Result<Network, NetworkError> {
    let peer_id = keypair.public().to_peer_id();
    let ctl_sent = Arc::new(AtomicU64::new(0));
    let codec = CtlCodec { sent: ctl_sent.clone() };
    let secure = secure::Secure::new(&keypair, security).map_err(|e| NetworkError::Transport(e.to_string()))?;
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    // Noise and rustls read their frames and records a few KiB at a time (Noise's
                    // codec asks for 8 KiB): a large read buffer underneath turns ~32 reads
                    // (syscalls) into one (see docs/benchmarks.md).
                    .map(|stream, _| futures::io::BufReader::with_capacity(READ_BUFFER, stream))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(secure)
                    .multiplex(muxer::Yamux::default()),
            )
        })
        .map_err(|e| NetworkError::Transport(e.to_string()))?
        .with_behaviour(|key| Behaviour {
            gate: MemberGate::new(members),
            identify: identify::Behaviour::new(identify::Config::new("/flare/1.0.0".into(), key.public())),
            ping: ping::Behaviour::default(),
            ctl: request_response::Behaviour::with_codec(
                codec,
                [(CTL_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(CTL_TIMEOUT),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| NetworkError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    for addr in listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetworkError::Listen {
            addr: addr.clone(),
            reason: error_chain(&e),
        })?;
    }
    let mut listen_addrs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listen_addrs.len() < listen.len() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NetworkError::Listen {
                addr: listen[listen_addrs.len()].clone(),
                reason: "no listen address within 10 s".into(),
            })?;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                listen_addrs.push(address);
            }
            SwarmEvent::ListenerError { error, .. } | SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                return Err(NetworkError::Listen {
                    addr: listen[listen_addrs.len()].clone(),
                    reason: error_chain(&error),
                });
            }
            _ => {}
        }
    }
    let control = swarm.behaviour().stream.new_control();
    let (commands, queue) = mpsc::unbounded_channel();
    let owner = SwarmOwner {
        swarm,
        commands: queue,
        inbound: None,
        pending: HashMap::new(),
        connecting: HashMap::new(),
        replies: FuturesUnordered::new(),
        peer_ips: PeerIps::default(),
    };
    let peer_ips = owner.peer_ips.clone();
    let (actor, task) = Actor::spawn(None, NetworkActor, owner)
        .await
        .map_err(|e| NetworkError::Transport(format!("starting the network actor: {e}")))?;
    Ok(Network {
        handle: NetworkHandle {
            commands,
            actor,
            peer_id,
            ctl_sent,
            peer_ips,
        },
        control,
        listen_addrs,
        task,
    })
}

/// Swarm events handled in one turn before the actor asks for another, so that a busy swarm
/// does not keep other tasks off the thread (commands are taken before every event anyway).
const POLL_BATCH: usize = 64;

/// The network actor (see the module doc).
struct NetworkActor;

/// What the network actor holds: the swarm and its bookkeeping, and the waker it polls with.
struct NetworkState {
    owner: SwarmOwner,
    wake: Arc<SelfPoll>,
    waker: Waker,
}

/// The actor's waker: asks for one `Turn`, however many wake-ups come before it.
struct SelfPoll {
    actor: ActorRef<NetMsg>,
    queued: AtomicBool,
}

impl Wake for SelfPoll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            // Fails only once the actor has stopped, when there is nothing left to poll.
            let _ = self.actor.cast(NetMsg::Turn);
        }
    }
}

impl Actor for NetworkActor {
    type Msg = NetMsg;
    type State = NetworkState;
    type Arguments = SwarmOwner;

    async fn pre_start(&self, myself: ActorRef<NetMsg>, owner: SwarmOwner) -> Result<NetworkState, ActorProcessingErr> {
        let wake = Arc::new(SelfPoll {
            actor: myself,
            queued: AtomicBool::new(false),
        });
        let waker = Waker::from(wake.clone());
        // The first turn registers the waker with the swarm.
        waker.wake_by_ref();
        Ok(NetworkState { owner, wake, waker })
    }

    async fn handle(
        &self,
        myself: ActorRef<NetMsg>,
        msg: NetMsg,
        state: &mut NetworkState,
    ) -> Result<(), ActorProcessingErr> {
        let NetMsg::Turn = msg;
        state.wake.queued.store(false, Ordering::Release);
        if state.turn().is_break() {
            myself.stop(None);
        }
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<NetMsg>, state: &mut NetworkState) -> Result<(), ActorProcessingErr> {
        for (_, (peer, reply)) in state.owner.pending.drain() {
            let _ = reply.send(Err(CtlError::ConnectionClosed(peer)));
        }
        tracing::debug!("network actor stopped");
        Ok(())
    }
}

impl NetworkState {
    /// Takes the waiting commands, then handles what the swarm and the responses being
    /// prepared have ready, commands first again before each swarm event, until nothing is
    /// left (the wakers are then set) or a batch is done (then it asks for another turn, so
    /// that other tasks get the thread). Breaks on [`Command::Shutdown`], or once every handle
    /// is gone.
    fn turn(&mut self) -> ControlFlow<()> {
        let mut cx = Context::from_waker(&self.waker);
        let owner = &mut self.owner;
        for _ in 0..POLL_BATCH {
            loop {
                match owner.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(mpsc::error::TryRecvError::Disconnected) => {
                        return ControlFlow::Break(());
                    }
                    Ok(c) => owner.on_command(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            let mut busy = false;
            if let Poll::Ready(Some((channel, response))) = owner.replies.poll_next_unpin(&mut cx) {
                if owner
                    .swarm
                    .behaviour_mut()
                    .ctl
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("control response dropped: the requester is gone");
                }
                busy = true;
            }
            if let Poll::Ready(Some(ev)) = owner.swarm.poll_next_unpin(&mut cx) {
                owner.on_swarm_event(ev);
                busy = true;
            }
            if !busy {
                return ControlFlow::Continue(());
            }
        }
        self.waker.wake_by_ref();
        ControlFlow::Continue(())
    }
}

type PendingReply = futures::future::BoxFuture<'static, (ResponseChannel<CtlResponse>, CtlResponse)>;

/// The swarm and what the network actor keeps about it.
struct SwarmOwner {
    swarm: Swarm<Behaviour>,
    commands: mpsc::UnboundedReceiver<Command>,
    inbound: Option<mpsc::Sender<InboundCtl>>,
    pending: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<CtlResponse, CtlError>>)>,
    /// Callers of [`NetworkHandle::connect`] waiting for a dial's outcome.
    connecting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    replies: FuturesUnordered<PendingReply>,
    peer_ips: PeerIps,
}

impl SwarmOwner {
    fn on_command(&mut self, c: Command) {
        match c {
            Command::Request { peer, request, reply } if peer == *self.swarm.local_peer_id() => {
                self.request_self(request, reply);
            }
            Command::Request { peer, request, reply } => {
                let id = self.swarm.behaviour_mut().ctl.send_request(&peer, request);
                self.pending.insert(id, (peer, reply));
            }
            Command::AddMember(m) => self.swarm.behaviour_mut().gate.insert(m),
            Command::Subscribe(tx) => self.inbound = Some(tx),
            Command::Connect(peer, reply) => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                match self.swarm.dial(peer) {
                    // Already dialing: wait for that dial's outcome.
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                        self.connecting.entry(peer).or_default().push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::Dial(peer) => {
                if let Err(e) = self.swarm.dial(peer) {
                    tracing::debug!(%peer, error = %e, "dial failed");
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::ConnectedPeers(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.swarm.listeners().cloned().collect());
            }
            // Taken by the turn itself, which stops the actor.
            Command::Shutdown => {}
        }
    }

    /// Hands a request addressed to this node to its own subscriber, as if it had come in.
    fn request_self(&mut self, request: CtlRequest, reply: oneshot::Sender<Result<CtlResponse, CtlError>>) {
        let peer = *self.swarm.local_peer_id();
        let job = request.job.clone();
        let (tx, rx) = oneshot::channel();
        let sent = match &self.inbound {
            Some(inbound) => inbound.try_send(InboundCtl {
                peer,
                request,
                reply: tx,
            }),
            None => Err(mpsc::error::TrySendError::Closed(InboundCtl {
                peer,
                request,
                reply: tx,
            })),
        };
        match sent {
            Ok(()) => {
                tokio::spawn(async move {
                    let _ = reply.send(Ok(rx.await.unwrap_or_else(|_| not_joined(&job))));
                });
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = reply.send(Ok(busy()));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let _ = reply.send(Ok(not_joined(&job)));
            }
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Ctl(ev)) => self.on_ctl_event(ev),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                for waiter in self.connecting.remove(&peer_id).unwrap_or_default() {
                    let _ = waiter.send(Ok(()));
                }
                self.log_connection(&peer_id, "connected");
                if let Some(ip) = multiaddr_ip(endpoint.get_remote_address()) {
                    crate::lock(&self.peer_ips).insert(peer_id, ip);
                }
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                crate::lock(&self.peer_ips).remove(&peer_id);
                self.log_connection(&peer_id, "disconnected");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(peer) = peer_id {
                    for waiter in self.connecting.remove(&peer).unwrap_or_default() {
                        let _ = waiter.send(Err(error.to_string()));
                    }
                }
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr, error, ..
            } => {
                tracing::debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "listening"),
            _ => {}
        }
    }

    /// One line per connection event, naming the member (its peer id at DEBUG). A `sim` of
    /// many members in one process leaves these out by default (see `flare-node`'s filter).
    fn log_connection(&self, peer: &PeerId, what: &str) {
        tracing::info!(member = %self.member_name(peer), "{what}");
        tracing::debug!(%peer, "{what}");
    }

    fn member_name(&self, peer: &PeerId) -> String {
        self.swarm
            .behaviour()
            .gate
            .members()
            .get(peer)
            .map_or_else(|| "?".into(), |m| m.name.clone())
    }

    fn on_ctl_event(&mut self, ev: request_response::Event<CtlRequest, CtlResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message: Message::Request { request, channel, .. },
                ..
            } => {
                tracing::debug!(%peer, job = %request.job, "control request");
                let (reply, rx) = oneshot::channel();
                let job = request.job.clone();
                let sent = match &self.inbound {
                    Some(tx) => tx.try_send(InboundCtl { peer, request, reply }),
                    None => Err(mpsc::error::TrySendError::Closed(InboundCtl { peer, request, reply })),
                };
                if let Err(e) = sent {
                    // Nobody listens (no job here) or the handler is saturated: refuse now.
                    let response = match e {
                        mpsc::error::TrySendError::Full(_) => busy(),
                        mpsc::error::TrySendError::Closed(_) => not_joined(&job),
                    };
                    let _ = self.swarm.behaviour_mut().ctl.send_response(channel, response);
                    return;
                }
                self.replies.push(Box::pin(async move {
                    let response = rx.await.unwrap_or_else(|_| not_joined(&job));
                    (channel, response)
                }));
            }
            Event::Message {
                message: Message::Response { request_id, response },
                ..
            } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "control request failed");
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(outbound_error(peer, error)));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::warn!(%peer, %error, "bad inbound control request");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// What a node whose control queue is full answers: the sender waits and asks again.
/// The IP address in `addr`, if it has one (`/ip4/...` or `/ip6/...`).
pub(crate) fn multiaddr_ip(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

pub(crate) fn busy() -> CtlResponse {
    crate::busy::BUSY_ANSWERS.event();
    CtlResponse::Busy {
        retry_after_ms: BUSY_RETRY_AFTER_MS,
    }
}

/// What a busy node suggests its askers wait before asking again.
const BUSY_RETRY_AFTER_MS: u32 = 20;

fn not_joined(job: &JobId) -> CtlResponse {
    CtlResponse::Rejected {
        reason: format!("this node has not joined job {job}"),
    }
}

fn outbound_error(peer: PeerId, e: OutboundFailure) -> CtlError {
    match e {
        OutboundFailure::DialFailure => CtlError::Dial {
            peer,
            reason: "dial failed or refused".into(),
        },
        OutboundFailure::Timeout => CtlError::Timeout(peer),
        OutboundFailure::ConnectionClosed => CtlError::ConnectionClosed(peer),
        OutboundFailure::UnsupportedProtocols => CtlError::Unsupported(peer),
        OutboundFailure::Io(e) => CtlError::Io {
            peer,
            reason: e.to_string(),
        },
    }
}

/// `e` and its sources, joined: a transport error's own message can be empty (libp2p's
/// `TransportError::Other` says nothing of the I/O error it wraps, "address in use").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let s = e.to_string();
        if !s.is_empty() && !parts.contains(&s) {
            parts.push(s);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_error_says_what_the_transport_error_wraps() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let e: libp2p::TransportError<std::io::Error> = libp2p::TransportError::Other(io);
        assert!(error_chain(&e).contains("address in use"), "{}", error_chain(&e));
    }
}
