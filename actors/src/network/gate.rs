//! Connection gating by member table: the first line of defence.
//!
//! A peer that is not a member never gets a connection handler, so it can neither send a
//! control message nor open a blob stream; the refusal is logged. The gate is also where the
//! swarm learns members' addresses when any protocol asks to reach a member by peer id.

use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::membership::{Member, MemberTable};

/// Why a connection was denied.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not a member of this consortium")]
pub struct NotAMember(pub PeerId);

/// The gating behaviour; holds the member table.
pub struct MemberGate {
    members: MemberTable,
}

impl MemberGate {
    /// A gate that admits exactly the members of `members` (as it is at each connection).
    pub fn new(members: MemberTable) -> Self {
        Self { members }
    }

    /// Admits one more member, or updates its addresses.
    pub fn insert(&mut self, m: Member) {
        self.members.insert(m);
    }

    /// The current table.
    pub fn members(&self) -> &MemberTable {
        &self.members
    }

    fn check(&self, peer: PeerId, addr: &Multiaddr, direction: &str) -> Result<(), ConnectionDenied> {
        if self.members.contains(&peer) {
            Ok(())
        } else {
            tracing::warn!(%peer, %addr, direction, "refused connection: not a member");
            Err(ConnectionDenied::new(NotAMember(peer)))
        }
    }
}

impl NetworkBehaviour for MemberGate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        maybe_peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let Some(peer) = maybe_peer else {
            return Ok(vec![]);
        };
        match self.members.get(&peer) {
            Some(m) => Ok(m.addrs),
            None => {
                tracing::warn!(%peer, "refused to dial: not a member");
                Err(ConnectionDenied::new(NotAMember(peer)))
            }
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, remote_addr, "inbound")?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, addr, "outbound")?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
