//! `flare-node run`: one long-lived peer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flare_actors::{BlobStore, Members, Node, NodeConfig};
use libp2p::Multiaddr;

/// Arguments of `flare-node run`.
#[derive(Args)]
pub struct RunArgs {
    /// Identity key written by `flare-node keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Member table (TOML, `[[member]]` entries); only these peers may connect.
    #[arg(long)]
    members: PathBuf,
    /// Address to listen on (repeatable).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Vec<Multiaddr>,
    /// Where blobs and state live.
    #[arg(long)]
    data_dir: PathBuf,
}

/// How often a running peer re-dials members it has no connection to.
const REDIAL_EVERY: Duration = Duration::from_secs(10);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let keypair = crate::keys::load_key(&args.key)?;
    let members = Members::load(&args.members)?;
    let me = keypair.public().to_peer_id();
    if !members.contains(&me) {
        tracing::warn!(peer = %me, "this node is not in its own member list");
    }
    let store = BlobStore::open(&args.data_dir).with_context(|| format!("opening {}", args.data_dir.display()))?;
    let others: Vec<_> = members.iter().filter(|m| m.peer_id != me).cloned().collect();
    let node = Node::start(NodeConfig {
        keypair,
        members,
        listen: args.listen,
        store,
    })
    .await?;
    tracing::info!(peer = %me, addrs = ?node.listen_addrs(), "flare-node running; Ctrl-C to stop");
    let mut redial = tokio::time::interval(REDIAL_EVERY);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = redial.tick() => {
                let connected = node.net().connected_peers().await.unwrap_or_default();
                for m in others.iter().filter(|m| !m.addrs.is_empty() && !connected.contains(&m.peer_id)) {
                    tracing::debug!(member = %m.name, peer = %m.peer_id, "dialing member");
                    let _ = node.net().dial(m.peer_id);
                }
            }
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}
