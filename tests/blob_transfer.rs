//! Blobs arrive whole and byte-identical, from one source or several.

use flare_actors::BlobStore;
use flare_actors::blob::FetchOptions;

use crate::util::{bytes, memory_stores, start_capped, start_nodes, within};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_of_edge_sizes_arrive_byte_identical() {
    within(120, async {
        let dir = tempfile::tempdir().expect("tmp");
        let receiver_store = BlobStore::open(dir.path()).expect("disk store");
        let nodes = start_nodes(vec![BlobStore::memory(), receiver_store.clone()]).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        for (i, len) in [0, 1, MIB - 1, MIB, MIB + 1, 64 * MIB + 3].into_iter().enumerate() {
            let data = bytes(len, i as u64 + 1);
            let m = src.store().import_bytes(&data, 1 << 20).expect("import");
            let report = dst
                .fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
            assert_eq!(report.fetched, m.chunk_count(), "{len} bytes");
            assert!(dst.store().is_complete(&m.id()));
            assert!(
                dst.store().read_all(&m.id()).expect("read") == data,
                "{len} bytes differ"
            );
        }
        // The disk store reopens with the same blobs.
        let reopened = BlobStore::open(dir.path()).expect("reopen");
        let m = flare_protocols::Manifest::of_bytes(&bytes(MIB + 1, 5), 1 << 20).expect("m");
        assert!(reopened.read_all(&m.id()).expect("read") == bytes(MIB + 1, 5));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sources_share_one_fetch() {
    within(60, async {
        let nodes = start_nodes(memory_stores(4)).await;
        let data = bytes(6 * MIB + 5, 7);
        let mut blob = None;
        for n in &nodes[..3] {
            blob = Some(n.store().import_bytes(&data, 256 << 10).expect("import").blob_ref());
        }
        let blob = blob.expect("blob");
        let sources: Vec<_> = nodes[..3].iter().map(|n| n.peer_id()).collect();
        let report = nodes[3]
            .fetch(blob, &sources, &FetchOptions::default())
            .await
            .expect("fetch");
        assert_eq!(
            report.per_source.len(),
            3,
            "every source served some chunks: {report:?}"
        );
        assert_eq!(report.per_source.values().sum::<u64>(), blob.chunk_count().expect("n"));
        assert!(nodes[3].store().read_all(&blob.id).expect("read") == data);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_blob_is_not_found_on_every_source() {
    within(30, async {
        let nodes = start_nodes(memory_stores(3)).await;
        let m = flare_protocols::Manifest::of_bytes(b"nobody has this", 4).expect("m");
        let e = nodes[2]
            .fetch(
                m.blob_ref(),
                &[nodes[0].peer_id(), nodes[1].peer_id()],
                &FetchOptions::default(),
            )
            .await
            .expect_err("not found");
        assert!(
            matches!(&e, flare_actors::blob::FetchError::NotFound { tried, .. } if tried.len() == 2),
            "{e}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_refs_beyond_the_limits_are_refused_before_any_transfer() {
    use flare_actors::blob::FetchError;
    within(30, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let m = nodes[0]
            .store()
            .import_bytes(&bytes(3 * MIB, 9), 1 << 20)
            .expect("import");
        let src = [nodes[0].peer_id()];
        let huge = flare_protocols::BlobRef {
            len: u64::MAX,
            ..m.blob_ref()
        };
        let e = nodes[1]
            .fetch(huge, &src, &FetchOptions::default())
            .await
            .expect_err("huge");
        assert!(matches!(e, FetchError::TooLarge(_)), "{e}");
        let opts = FetchOptions {
            max_len: MIB as u64,
            ..FetchOptions::default()
        };
        let e = nodes[1].fetch(m.blob_ref(), &src, &opts).await.expect_err("over limit");
        assert!(matches!(e, FetchError::OverLimit { .. }), "{e}");
        assert_eq!(
            nodes[0].serve_stats().chunks.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert!(nodes[1].store().presence(&m.id()).is_none(), "nothing was stored");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chunk_goes_to_on_chunk_once_held_or_fetched() {
    use std::sync::{Arc, Mutex};
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        let data = bytes(20 << 16, 17);
        let m = src.store().import_bytes(&data, 64 << 10).expect("import");
        // The receiver holds a few chunks already (a resumed transfer).
        dst.store().begin(m.clone()).expect("begin");
        for i in [0u64, 7, 19] {
            let r = i as usize * (64 << 10)..(i as usize + 1) * (64 << 10);
            dst.store().put_chunk(&m.id(), i, &data[r]).expect("put");
        }
        let blob = m.blob_ref();
        let fetch_all = |sources: Vec<_>| {
            let want = data.clone();
            let got = Arc::new(Mutex::new(vec![None::<Vec<u8>>; 20]));
            let sink = got.clone();
            let opts = FetchOptions {
                on_chunk: Some(Arc::new(move |i: u64, b: &[u8]| {
                    let mut g = sink.lock().expect("lock");
                    assert!(
                        g[i as usize].replace(b.to_vec()).is_none(),
                        "chunk {i} handed over twice"
                    );
                })),
                ..FetchOptions::default()
            };
            async move {
                let report = dst.fetch(blob, &sources, &opts).await.expect("fetch");
                let got: Vec<u8> = got.lock().expect("lock").iter().flatten().flatten().copied().collect();
                assert!(got == want, "every chunk, in place");
                report
            }
        };
        let report = fetch_all(vec![src.peer_id()]).await;
        assert_eq!((report.already_present, report.fetched), (3, 17));
        // Held whole: every chunk comes from the store, with no source at all.
        let served = nodes[0].serve_stats().chunks.load(std::sync::atomic::Ordering::Relaxed);
        let report = fetch_all(Vec::new()).await;
        assert_eq!((report.already_present, report.fetched), (20, 0));
        assert_eq!(
            nodes[0].serve_stats().chunks.load(std::sync::atomic::Ordering::Relaxed),
            served,
            "nothing more was sent"
        );
    })
    .await;
}

/// A fetch without a consumer files a few chunks of a stream at once; one with a consumer
/// (`on_chunk`) hands them over in order: a consumer that is slow on some chunks (here every
/// eighth) still sees 0, 1, 2, ... from a single source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sources_chunks_are_handed_over_in_order() {
    use std::sync::{Arc, Mutex};
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let data = bytes(48 << 12, 5);
        let m = nodes[0].store().import_bytes(&data, 4 << 10).expect("import");
        let order = Arc::new(Mutex::new(Vec::new()));
        let sink = order.clone();
        let opts = FetchOptions {
            on_chunk: Some(Arc::new(move |i: u64, _: &[u8]| {
                if i.is_multiple_of(8) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                sink.lock().expect("lock").push(i);
            })),
            ..FetchOptions::default()
        };
        nodes[1]
            .fetch(m.blob_ref(), &[nodes[0].peer_id()], &opts)
            .await
            .expect("fetch");
        let order = order.lock().expect("lock").clone();
        assert_eq!(order, (0..48).collect::<Vec<u64>>());
    })
    .await;
}

/// A node's upload cap holds for all its receivers together: two peers pulling 3 MiB each at
/// once from a node capped at 8 MiB/s take at least the 6 MiB's time at that rate (less the
/// one burst an idle node may send). Only the lower bound is checked: a busy machine can
/// only make it slower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cap_holds_for_all_receivers_together() {
    within(60, async {
        let cap = 8 * MIB as u64;
        let nodes = start_capped(memory_stores(3), |i| (i == 0).then_some(cap)).await;
        let data = bytes(3 * MIB, 11);
        let blob = nodes[0]
            .store()
            .import_bytes(&data, 1 << 20)
            .expect("import")
            .blob_ref();
        let started = std::time::Instant::now();
        let (src, opts) = ([nodes[0].peer_id()], FetchOptions::default());
        let (a, b) = tokio::join!(nodes[1].fetch(blob, &src, &opts), nodes[2].fetch(blob, &src, &opts));
        a.expect("first receiver");
        b.expect("second receiver");
        let secs = started.elapsed().as_secs_f64();
        let least = 6.0 * MIB as f64 / cap as f64 - flare_actors::blob::pace::BURST.as_secs_f64() - 1.0 / 8.0;
        assert!(secs >= least, "6 MiB in {secs:.3} s through a cap of 8 MiB/s");
        for n in &nodes[1..] {
            assert!(n.store().read_all(&blob.id).expect("read") == data);
        }
    })
    .await;
}

/// A node that names itself as a blob's only source (a member pulling the model its own
/// controller published) waits for what its store is still receiving through another fetch,
/// rather than dialling itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_its_own_source_waits_for_its_store_to_fill() {
    within(60, async {
        // The slow source keeps the other fetch under way (about 4 s, longer than a fetch's
        // retries of a source it cannot reach) while this one starts.
        let nodes = start_capped(memory_stores(2), |i| (i == 0).then_some(MIB as u64)).await;
        let data = bytes(4 * MIB, 13);
        let blob = nodes[0]
            .store()
            .import_bytes(&data, 1 << 20)
            .expect("import")
            .blob_ref();
        let opts = FetchOptions::default();
        let (from_a, from_self) = ([nodes[0].peer_id()], [nodes[1].peer_id()]);
        let pull = nodes[1].fetch(blob, &from_a, &opts);
        let own = async {
            // Once the other fetch has begun the blob.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
            assert!(nodes[1].store().wait_for_manifest(&blob.id, deadline).await.is_some());
            assert!(!nodes[1].store().is_complete(&blob.id), "still arriving");
            nodes[1].fetch(blob, &from_self, &opts).await
        };
        let (a, b) = tokio::join!(pull, own);
        a.expect("the pull from the source");
        let report = b.expect("the fetch from itself");
        assert_eq!(report.fetched, 0, "nothing came over the network for it");
        assert!(nodes[1].store().read_all(&blob.id).expect("read") == data);
    })
    .await;
}

fn bulk_streams(n: &flare_actors::Node) -> u64 {
    n.serve_stats().bulk_streams.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_ranges_go_over_the_bulk_channel_and_small_ones_over_the_stream() {
    within(60, async {
        let dir = tempfile::tempdir().expect("tmp");
        let nodes = start_nodes(vec![BlobStore::memory(), BlobStore::open(dir.path()).expect("disk")]).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        let large = bytes(16 * MIB + 3, 21);
        let small = bytes(2 * MIB, 22);
        let mut bulk = 0;
        for (data, more) in [(&large, true), (&small, false)] {
            let m = src.store().import_bytes(data, 1 << 20).expect("import");
            dst.fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
                .await
                .expect("fetch");
            assert!(dst.store().read_all(&m.id()).expect("read") == *data);
            // The fetch may cut a blob into several ranges: each of 4 MiB or more goes over
            // a bulk connection of its own.
            assert_eq!(bulk_streams(src) > bulk, more, "{} bytes", data.len());
            bulk = bulk_streams(src);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_cannot_reach_the_bulk_port_gets_the_chunks_over_the_stream() {
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        src.faults().arm(flare_actors::blob::FaultPlan {
            bulk_unreachable: true,
            ..Default::default()
        });
        let data = bytes(16 * MIB, 23);
        let m = src.store().import_bytes(&data, 1 << 20).expect("import");
        let report = dst
            .fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
            .await
            .expect("fetch over the stream");
        assert_eq!(report.fetched, 16);
        assert!(dst.store().read_all(&m.id()).expect("read") == data);
        assert_eq!(bulk_streams(src), 0, "no bulk connection was made");
        // The receiver does not try that port again for a while: the next fetch goes over
        // the stream at once, even with the port open again.
        src.faults().arm(flare_actors::blob::FaultPlan::default());
        let again = bytes(16 * MIB, 25);
        let m = src.store().import_bytes(&again, 1 << 20).expect("import");
        dst.fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
            .await
            .expect("fetch");
        assert!(dst.store().read_all(&m.id()).expect("read") == again);
        assert_eq!(bulk_streams(src), 0, "not asked for a bulk connection again");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_connection_with_an_unknown_token_is_closed_and_the_source_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        let port = src.bulk_port().expect("a bulk listener");
        // A stranger that guesses a token gets the connection closed, unread.
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        tcp.write_all(&[0x5a; 16]).await.expect("token");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("closed within the timeout");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "got {n:?} from a connection with a wrong token"
        );
        // The source goes on serving over its bulk channel.
        let data = bytes(16 * MIB, 24);
        let m = src.store().import_bytes(&data, 1 << 20).expect("import");
        dst.fetch(m.blob_ref(), &[src.peer_id()], &FetchOptions::default())
            .await
            .expect("fetch");
        assert!(dst.store().read_all(&m.id()).expect("read") == data);
        assert!(bulk_streams(src) > 0);
    })
    .await;
}
