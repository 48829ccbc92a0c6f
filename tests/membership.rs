//! Only members may talk to a node: a stranger can neither send control messages nor fetch.

use flare_actors::blob::{FetchError, FetchOptions};
use flare_actors::{BlobStore, Member, Members, Node, NodeConfig};
use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request};
use libp2p::identity::Keypair;

use crate::util::{bytes, loopback, memory_stores, start_nodes, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stranger_can_neither_send_control_messages_nor_fetch_blobs() {
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (a, member) = (&nodes[0], &nodes[1]);
        let m = a.store().import_bytes(&bytes(3 << 20, 3), 1 << 20).expect("import");

        // The stranger lists `a` (so it will dial it), but `a` does not list the stranger.
        let stranger = Node::start(NodeConfig {
            keypair: Keypair::generate_ed25519(),
            members: Members::from_members([a.as_member("a")]).into(),
            listen: vec![loopback()],
            store: BlobStore::memory(),
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        })
        .await
        .expect("start");
        let hb = CtlRequest {
            job: JobId("j".into()),
            body: Request::Heartbeat,
        };
        let r = stranger.net().request(a.peer_id(), hb.clone()).await;
        assert!(r.is_err(), "stranger's control message got through: {r:?}");
        let f = stranger
            .fetch(
                m.blob_ref(),
                &[a.peer_id()],
                &FetchOptions {
                    attempts: 2,
                    ..FetchOptions::default()
                },
            )
            .await;
        assert!(
            matches!(f, Err(FetchError::Incomplete { .. })),
            "stranger fetched: {f:?}"
        );
        assert!(!stranger.store().is_complete(&m.id()));
        assert!(a.serve_stats().chunks.load(std::sync::atomic::Ordering::Relaxed) == 0);

        // A member is still served.
        let r = member.net().request(a.peer_id(), hb).await.expect("member answered");
        assert!(
            matches!(r, CtlResponse::Rejected { .. }),
            "no job here, but answered: {r:?}"
        );
        member
            .fetch(m.blob_ref(), &[a.peer_id()], &FetchOptions::default())
            .await
            .expect("member fetches");

        // Admitting the stranger later opens the door.
        a.net()
            .add_member(Member {
                name: "late".into(),
                peer_id: stranger.peer_id(),
                addrs: stranger.listen_addrs().to_vec(),
            })
            .expect("add");
        stranger
            .fetch(m.blob_ref(), &[a.peer_id()], &FetchOptions::default())
            .await
            .expect("admitted member fetches");
    })
    .await;
}
