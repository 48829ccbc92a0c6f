//! Peers that pull the same blob at once share the upload (issue 19): each pulls its share
//! from the source and the rest from the others, which relay what they receive, so the source
//! sends the blob about once whatever their number; a peer that sends bad chunks of its
//! share is caught, distrusted, and its share comes from the source.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_actors::blob::{FaultPlan, FetchError, FetchOptions, FetchReport};
use flare_actors::job::{AddOne, Learner, fedavg};
use flare_actors::{BlobStore, Node};
use flare_protocols::BlobRef;
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};
use libp2p::PeerId;

use crate::util::{Federation, bytes, memory_stores, start_capped, within};

const KIB: usize = 1 << 10;

/// Node 0 is the source of `data` (in 256 KiB chunks) and every other node an owner of a
/// share; the nodes `pullers` pull it at once, sharing the upload. The blob, and each
/// puller's outcome.
async fn pull_shared(
    nodes: &[Node],
    data: &[u8],
    pullers: Range<usize>,
) -> (BlobRef, Vec<Result<FetchReport, FetchError>>) {
    let (blob, origin, owners) = publish(nodes, data);
    let opts = FetchOptions::default();
    let reports = futures::future::join_all(
        nodes[pullers]
            .iter()
            .map(|n| n.fetch_shared(blob, &origin, &owners, &opts)),
    )
    .await;
    (blob, reports)
}

/// `data` stored on `nodes[0]`, the source; the source as the pulls' origin, and every other
/// node as an owner.
fn publish(nodes: &[Node], data: &[u8]) -> (BlobRef, [PeerId; 1], Vec<PeerId>) {
    let blob = nodes[0]
        .store()
        .import_bytes(data, 256 << 10)
        .expect("import")
        .blob_ref();
    let owners = nodes[1..].iter().map(|n| n.peer_id()).collect();
    (blob, [nodes[0].peer_id()], owners)
}

/// Per puller: each chunk handed to its consumer, and how many chunks its store held then.
type Seen = Arc<Mutex<Vec<(u64, Vec<u8>, u64)>>>;

/// [`pull_shared`] by every peer but the source, each with a consumer of the chunks (a
/// learner that trains the model as it arrives).
async fn pull_shared_consumed(
    nodes: &[Node],
    data: &[u8],
) -> (BlobRef, Vec<Result<FetchReport, FetchError>>, Vec<Seen>) {
    let (blob, origin, owners) = publish(nodes, data);
    let owners = &owners;
    let seen: Vec<Seen> = nodes[1..].iter().map(|_| Arc::default()).collect();
    let pulls = nodes[1..].iter().zip(&seen).map(|(n, seen)| {
        let (store, seen) = (n.store().clone(), seen.clone());
        let opts = FetchOptions {
            on_chunk: Some(Arc::new(move |i: u64, b: &[u8]| {
                let held = store.presence(&blob.id).map_or(0, |p| p.present);
                seen.lock().expect("lock").push((i, b.to_vec(), held));
            })),
            ..FetchOptions::default()
        };
        async move { n.fetch_shared(blob, &origin, owners, &opts).await }
    });
    (blob, futures::future::join_all(pulls).await, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_pulling_one_blob_share_the_upload_and_the_source_sends_it_about_once() {
    within(60, async {
        // A capped source (as a site's uplink is), four peers.
        let nodes = start_capped(memory_stores(5), |i| (i == 0).then_some(64 << 20)).await;
        let data = bytes(8 * 1024 * KIB + 5, 3);
        let (blob, reports) = pull_shared(&nodes, &data, 1..5).await;
        let origin = nodes[0].peer_id();
        for (n, r) in nodes[1..].iter().zip(reports) {
            let r = r.expect("shared fetch");
            assert!(n.store().read_all(&blob.id).expect("read") == data);
            // Every peer got chunks from the others, not only from the source.
            let from_peers: u64 = r.per_source.iter().filter(|(p, _)| **p != origin).map(|(_, c)| c).sum();
            assert!(from_peers > 0, "{r:?}");
        }
        let sent = nodes[0].traffic().blob_bytes;
        assert!(
            sent as f64 <= 1.25 * data.len() as f64,
            "the source sent {sent} bytes of a {}-byte blob to four peers",
            data.len()
        );
    })
    .await;
}

/// A source and three owners, and a 4 MiB blob for them: peer 1 owns the first share (16
/// chunks dealt one by one round the three owners: 0, 3, 6, ...) and flips a byte of chunk 3
/// whenever it serves it.
async fn three_owners_and_a_liar() -> (Vec<Node>, Vec<u8>) {
    let nodes = start_capped(memory_stores(4), |_| None).await;
    nodes[1].faults().arm(FaultPlan {
        corrupt_chunk: Some(3),
        ..FaultPlan::default()
    });
    (nodes, bytes(4 * 1024 * KIB, 9))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_relays_bad_chunks_is_distrusted_and_its_share_comes_from_the_source() {
    within(60, async {
        let (nodes, data) = three_owners_and_a_liar().await;
        let (blob, reports) = pull_shared(&nodes, &data, 1..4).await;
        for (i, (n, r)) in nodes[1..].iter().zip(reports).enumerate() {
            r.unwrap_or_else(|e| panic!("peer {}: {e}", i + 1));
            assert!(n.store().read_all(&blob.id).expect("read") == data, "peer {}", i + 1);
        }
        for n in &nodes[2..] {
            assert!(n.distrusts(&blob.id, &nodes[1].peer_id()), "the liar is distrusted");
            assert!(!n.distrusts(&blob.id, &nodes[0].peer_id()));
        }
    })
    .await;
}

/// The same with a consumer on every puller: the other owners' chunks then go to it alone,
/// so a bad one is caught before it, and the consumer gets the right one from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liars_bad_chunk_never_reaches_a_consumer_which_gets_the_right_one_from_the_source() {
    within(60, async {
        let (nodes, data) = three_owners_and_a_liar().await;
        let (blob, reports, seen) = pull_shared_consumed(&nodes, &data).await;
        for (i, r) in reports.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("peer {}: {e}", i + 1));
        }
        let n = blob.chunk_count().expect("chunks");
        for (p, seen) in seen.iter().enumerate() {
            let seen = seen.lock().expect("lock");
            assert!(
                seen.iter().map(|(i, _, _)| *i).eq(0..n),
                "peer {}: every chunk once, in order",
                p + 1
            );
            let got: Vec<u8> = seen.iter().flat_map(|(_, b, _)| b.iter().copied()).collect();
            assert!(got == data, "peer {}: the right bytes", p + 1);
        }
        for n in &nodes[2..] {
            assert!(n.distrusts(&blob.id, &nodes[1].peer_id()), "the liar is distrusted");
        }
    })
    .await;
}

/// A consumer of the chunks (a learner that trains the model as it arrives) gets every chunk
/// once, in order, while the shares still come in: the chunks are dealt round the owners a
/// few at a time, so they land about in order. (Before, it got them from the store once the
/// whole blob was in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pull_hands_its_chunks_over_in_order_while_they_come() {
    within(60, async {
        // A source capped at 4 MiB/s: the 8 MiB blob takes two seconds at least.
        let nodes = start_capped(memory_stores(4), |i| (i == 0).then_some(4 << 20)).await;
        let data = bytes(8 * 1024 * KIB, 13);
        let (blob, reports, seen) = pull_shared_consumed(&nodes, &data).await;
        for r in reports {
            r.expect("shared fetch");
        }
        let n = blob.chunk_count().expect("chunks");
        for (p, seen) in seen.iter().enumerate() {
            let seen = seen.lock().expect("lock");
            let got: Vec<u8> = seen.iter().flat_map(|(_, b, _)| b.iter().copied()).collect();
            assert!(got == data, "peer {}: the bytes handed over", p + 1);
            assert!(seen.iter().map(|(i, _, _)| *i).eq(0..n), "peer {}: order", p + 1);
            let (_, _, held) = seen[0];
            assert!(
                held < n,
                "peer {}: chunk 0 handed over only once all {n} were in",
                p + 1
            );
        }
        // The other owners' shares went to the consumer, not into the store: each puller
        // stored its own share (for the others) and little else.
        for (p, node) in nodes[1..].iter().enumerate() {
            let held = node.store().presence(&blob.id).map_or(0, |p| p.present);
            assert!(held >= n / 3 && held < n, "peer {}: {held} of {n} chunks stored", p + 1);
        }
    })
    .await;
}

/// A peer listed as an owner that never pulls the blob (it refused its task) holds the others
/// up only briefly: its share comes from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_peer_that_never_pulls_costs_its_share_from_the_source() {
    within(60, async {
        let nodes = start_capped(memory_stores(4), |_| None).await;
        let data = bytes(2 * 1024 * KIB + 7, 5);
        // Peer 3 is listed but pulls nothing.
        let (blob, reports) = pull_shared(&nodes, &data, 1..3).await;
        for (n, r) in nodes[1..3].iter().zip(reports) {
            let r = r.expect("shared fetch");
            assert!(n.store().read_all(&blob.id).expect("read") == data);
            assert!(!r.per_source.contains_key(&nodes[3].peer_id()), "{r:?}");
        }
        assert!(!nodes[3].store().is_complete(&blob.id));
    })
    .await;
}

/// FedAvg with `share_upload`: the add-one result stays exact, and the controller sends about
/// one model a round to four clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_clients_sharing_the_upload_stay_exact_and_the_controller_sends_one_model_a_round() {
    fedavg_sharing(false).await;
}

/// The same with every model on disk: each client's learner runs over the shared input
/// (which it also relays to the others) and streams its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_clients_on_disk_sharing_the_upload_stay_exact() {
    fedavg_sharing(true).await;
}

async fn fedavg_sharing(on_disk: bool) {
    within(120, async {
        let names: Vec<String> = std::iter::once("server".to_owned())
            .chain((1..=4).map(|i| format!("site-{i}")))
            .collect();
        let dirs: Vec<_> = names.iter().map(|_| tempfile::tempdir().expect("tmp")).collect();
        let stores: Vec<BlobStore> = match on_disk {
            true => dirs
                .iter()
                .map(|d| {
                    let s = BlobStore::open(d.path()).expect("store");
                    s.set_stream_above(0);
                    s
                })
                .collect(),
            false => memory_stores(names.len()),
        };
        let f = Federation::start_with("shared", names, stores).await;
        f.join_all(|_| -> Box<dyn Learner> { Box::new(AddOne { num_samples: 1 }) })
            .await;
        // 8 MiB: eight chunks, two a client.
        let values: Vec<f32> = (0..(2048 * 1024)).map(|i| (i % 97) as f32 * 0.5).collect();
        let initial = Model::from_tensors([
            (
                "a",
                Tensor::from_f32(vec![1024, 1024], &values[..1024 * 1024]).expect("a"),
            ),
            (
                "b",
                Tensor::from_f32(vec![1024, 1024], &values[1024 * 1024..]).expect("b"),
            ),
        ]);
        let model_bytes = initial.as_safetensors().len() as f64;
        let cfg = flare_actors::job::FedAvgConfig {
            rounds: 3,
            min_clients: 4,
            round_timeout: Duration::from_secs(60),
            clients: f.clients(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: None,
            share_upload: true,
        };
        let out = fedavg::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, initial.clone())
            .await
            .expect("job");
        let mut want = initial;
        for _ in 0..3 {
            want.map_f32(|v| v + 1.0);
        }
        assert!(out.model == want, "initial + 3, exactly");
        for r in &out.rounds {
            assert_eq!(r.contributors.len(), 4, "round {}", r.round);
        }
        let sent = f.hosts[0].node().traffic().blob_bytes as f64;
        assert!(
            sent <= 3.0 * 1.25 * model_bytes,
            "the controller sent {:.2} models in 3 rounds to 4 clients",
            sent / model_bytes
        );
    })
    .await;
}
