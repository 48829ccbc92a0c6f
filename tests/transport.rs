//! The connection's security: nodes of the default (TLS, then Noise) move blobs, a node that
//! speaks only Noise (as earlier builds did) still talks to them, and a restriction is real.

use flare_actors::blob::FetchOptions;
use flare_actors::network::Security;
use flare_actors::{BlobStore, Member, MemberTable, Members, Node, NodeConfig};
use libp2p::identity::Keypair;

use crate::util::{bytes, loopback, within};

const MIB: usize = 1 << 20;

/// One node per security on loopback, each admitting the others and knowing their addresses.
async fn start(securities: &[Security]) -> Vec<Node> {
    let keys: Vec<Keypair> = securities.iter().map(|_| Keypair::generate_ed25519()).collect();
    let table = MemberTable::new(Members::from_members(keys.iter().enumerate().map(|(i, k)| Member {
        name: format!("n{i}"),
        peer_id: k.public().to_peer_id(),
        addrs: vec![],
    })));
    let mut nodes = Vec::new();
    for (key, &security) in keys.into_iter().zip(securities) {
        let cfg = NodeConfig {
            keypair: key,
            members: table.clone(),
            listen: vec![loopback()],
            store: BlobStore::memory(),
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        };
        nodes.push(Node::start_with_security(cfg, security).await.expect("node starts"));
    }
    for (i, n) in nodes.iter().enumerate() {
        table.insert(n.as_member(&format!("n{i}")));
    }
    nodes
}

/// `dst` pulls a fresh blob of `len` bytes from `src` and holds it byte for byte.
async fn moves_a_blob(src: &Node, dst: &Node, len: usize, seed: u64) {
    let data = bytes(len, seed);
    let m = src.store().import_bytes(&data, 1 << 20).expect("import");
    let report = dst
        .fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
    assert_eq!(report.fetched, m.chunk_count());
    assert!(
        dst.store().read_all(&m.id()).expect("read") == data,
        "{len} bytes differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_the_default_security_move_a_blob() {
    within(60, async {
        assert_eq!(Security::default(), Security::TlsOrNoise);
        let nodes = start(&[Security::default(), Security::default()]).await;
        moves_a_blob(&nodes[0], &nodes[1], 8 * MIB + 7, 1).await;
        moves_a_blob(&nodes[1], &nodes[0], MIB + 1, 2).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_node_speaks_tls_to_a_tls_node_and_noise_to_a_noise_node() {
    within(60, async {
        // n0 has the default; n1 speaks only TLS, n2 only Noise (an earlier build).
        let nodes = start(&[Security::default(), Security::Tls, Security::Noise]).await;
        // Each pair both ways: the dialler's first choice that the listener speaks is agreed.
        moves_a_blob(&nodes[0], &nodes[1], 3 * MIB + 1, 3).await;
        moves_a_blob(&nodes[1], &nodes[0], MIB, 4).await;
        moves_a_blob(&nodes[0], &nodes[2], 3 * MIB + 1, 5).await;
        moves_a_blob(&nodes[2], &nodes[0], MIB, 6).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_node_and_a_noise_only_node_cannot_connect() {
    within(60, async {
        // What makes the test above mean something: the restriction holds, so the
        // default node really spoke TLS to one and Noise to the other.
        let nodes = start(&[Security::Tls, Security::Noise]).await;
        let e = nodes[0]
            .net()
            .connect(nodes[1].peer_id())
            .await
            .expect_err("no common security protocol");
        assert!(matches!(e, flare_actors::network::ConnectError::Failed { .. }), "{e}");
        let e = nodes[1]
            .net()
            .connect(nodes[0].peer_id())
            .await
            .expect_err("nor the other way");
        assert!(matches!(e, flare_actors::network::ConnectError::Failed { .. }), "{e}");
    })
    .await;
}
