//! A source that cuts the connection or lies: the receiver resumes, reports, and completes.

use std::sync::atomic::Ordering;

use flare_actors::blob::{FaultPlan, FetchError, FetchOptions, SourceError};

use crate::util::{bytes, memory_stores, start_nodes, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_resumes_and_resends_at_most_the_window() {
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        let data = bytes(40 << 16, 11); // 40 chunks of 64 KiB
        let m = src.store().import_bytes(&data, 64 << 10).expect("import");
        let window = 4;
        src.faults().arm(FaultPlan {
            cut_after: Some(13),
            ..FaultPlan::default()
        });
        let opts = FetchOptions {
            window,
            ..FetchOptions::default()
        };
        let report = dst
            .fetch(m.blob_ref(), &[src.peer_id()], &opts)
            .await
            .expect("fetch resumes");
        let served = src.serve_stats().chunks.load(Ordering::Relaxed);
        let resent = served - m.chunk_count();
        assert!(
            report
                .source_errors
                .iter()
                .any(|e| matches!(e, SourceError::PeerGone { .. })),
            "the cut was seen: {report:?}"
        );
        assert!(
            resent <= u64::from(window),
            "{resent} chunks sent twice, window is {window}"
        );
        assert!(dst.store().read_all(&m.id()).expect("read") == data);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_is_reported_and_fetched_from_an_honest_source() {
    within(60, async {
        let nodes = start_nodes(memory_stores(3)).await;
        let (liar, honest, dst) = (&nodes[0], &nodes[1], &nodes[2]);
        let data = bytes(24 << 16, 12);
        let m = liar.store().import_bytes(&data, 64 << 10).expect("import");
        honest.store().import_bytes(&data, 64 << 10).expect("import");
        // The first source always gets the first unit, so the liar is asked for chunk 0.
        liar.faults().arm(FaultPlan {
            corrupt_chunk: Some(0),
            ..FaultPlan::default()
        });
        let report = dst
            .fetch(
                m.blob_ref(),
                &[liar.peer_id(), honest.peer_id()],
                &FetchOptions::default(),
            )
            .await
            .expect("completes from the honest source");
        assert!(
            report.source_errors.contains(&SourceError::HashMismatch {
                chunk: 0,
                peer: liar.peer_id()
            }),
            "{report:?}"
        );
        assert!(report.per_source.get(&honest.peer_id()).is_some_and(|&n| n > 0));
        assert!(dst.store().read_all(&m.id()).expect("read") == data);
        assert!(dst.store().verify(&m.id()).expect("verify").is_empty());

        // The liar is not trusted for this blob again: alone, it is not even asked.
        let e = dst
            .fetch(m.blob_ref(), &[liar.peer_id()], &FetchOptions::default())
            .await
            .map(|r| r.fetched);
        assert!(matches!(e, Ok(0)), "already complete, nothing fetched: {e:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_liar_leaves_only_verified_chunks_and_a_typed_error() {
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (liar, dst) = (&nodes[0], &nodes[1]);
        let data = bytes(8 << 16, 13);
        let m = liar.store().import_bytes(&data, 64 << 10).expect("import");
        liar.faults().arm(FaultPlan {
            corrupt_chunk: Some(5),
            ..FaultPlan::default()
        });
        let e = dst
            .fetch(m.blob_ref(), &[liar.peer_id()], &FetchOptions::default())
            .await
            .expect_err("cannot complete");
        match &e {
            FetchError::Incomplete { missing, errors, .. } => {
                assert!(*missing >= 1);
                assert!(
                    errors.contains(&SourceError::HashMismatch {
                        chunk: 5,
                        peer: liar.peer_id()
                    }),
                    "{e}"
                );
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(!dst.store().has_chunk(&m.id(), 5));
        assert!(
            dst.store().verify(&m.id()).expect("verify").is_empty(),
            "no stored chunk is wrong"
        );
        // Asked again, the liar is skipped: no usable source.
        let e = dst
            .fetch(m.blob_ref(), &[liar.peer_id()], &FetchOptions::default())
            .await
            .expect_err("distrusted");
        assert!(matches!(e, FetchError::NoSources(_)), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_fetch_hands_every_chunk_over_once_and_stores_none() {
    within(60, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let (src, dst) = (&nodes[0], &nodes[1]);
        let data = bytes(40 << 16, 13);
        let m = src.store().import_bytes(&data, 64 << 10).expect("import");
        // The connection is cut midway: the chunks sent again must not be handed over twice.
        src.faults().arm(FaultPlan {
            cut_after: Some(13),
            ..FaultPlan::default()
        });
        let got = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<Vec<u8>>; 40]));
        let sink = got.clone();
        let opts = FetchOptions {
            window: 4,
            keep: false,
            on_chunk: Some(std::sync::Arc::new(move |i: u64, b: &[u8]| {
                let mut g = sink.lock().expect("lock");
                assert!(
                    g[i as usize].replace(b.to_vec()).is_none(),
                    "chunk {i} handed over twice"
                );
            })),
            ..FetchOptions::default()
        };
        let report = dst.fetch(m.blob_ref(), &[src.peer_id()], &opts).await.expect("fetch");
        assert_eq!(report.fetched, 40);
        let got: Vec<u8> = got.lock().expect("lock").iter().flatten().flatten().copied().collect();
        assert!(got == data, "every chunk, verified, in place");
        assert!(dst.store().manifest(&m.id()).is_none(), "nothing stored");
    })
    .await;
}
