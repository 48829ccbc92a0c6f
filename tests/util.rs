//! The harness: start nodes that know each other, bound every wait.

use std::future::Future;
use std::time::Duration;

use flare_actors::{BlobStore, Member, Members, Node, NodeConfig};
use libp2p::identity::Keypair;

/// Fails the test instead of hanging when `f` takes longer than `secs`.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test step did not finish within {secs} s"),
    }
}

/// Starts one node per store on 127.0.0.1 with an ephemeral port; every node admits every
/// other and knows its address.
pub async fn start_nodes(stores: Vec<BlobStore>) -> Vec<Node> {
    let keys: Vec<Keypair> = stores.iter().map(|_| Keypair::generate_ed25519()).collect();
    start_with_keys(keys, stores).await
}

/// Like [`start_nodes`], with given keys.
pub async fn start_with_keys(keys: Vec<Keypair>, stores: Vec<BlobStore>) -> Vec<Node> {
    let members = Members::from_members(keys.iter().enumerate().map(|(i, k)| Member {
        name: format!("n{i}"),
        peer_id: k.public().to_peer_id(),
        addrs: vec![],
    }));
    let mut nodes = Vec::new();
    for (key, store) in keys.into_iter().zip(stores) {
        let node = Node::start(NodeConfig {
            keypair: key,
            members: members.clone(),
            listen: vec![loopback()],
            store,
        })
        .await
        .expect("node starts");
        nodes.push(node);
    }
    let table: Vec<Member> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| n.as_member(&format!("n{i}")))
        .collect();
    for n in &nodes {
        for m in &table {
            n.net().add_member(m.clone()).expect("add member");
        }
    }
    nodes
}

/// An ephemeral TCP port on loopback.
pub fn loopback() -> libp2p::Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Memory stores, one per node.
pub fn memory_stores(n: usize) -> Vec<BlobStore> {
    (0..n).map(|_| BlobStore::memory()).collect()
}
