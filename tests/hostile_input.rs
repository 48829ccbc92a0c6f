//! Random bytes, truncated and oversize frames on both protocols: the node answers with typed
//! refusals or drops the stream, never panics, and keeps serving honest peers.

use flare_actors::blob::FetchOptions;
use flare_protocols::blob::{BLOB_PROTOCOL, BlobHeader, BlobRequest, read_header, write_request};
use flare_protocols::ctl::{CTL_PROTOCOL, CtlRequest, CtlResponse, JobId, Request};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{bytes, memory_stores, start_nodes, within};

/// Sends `payload` on a fresh stream and reads whatever comes back (bounded).
async fn throw(control: &mut libp2p_stream::Control, peer: PeerId, proto: StreamProtocol, payload: &[u8]) -> Vec<u8> {
    let Ok(mut s) = control.open_stream(peer, proto).await else {
        return Vec::new();
    };
    let _ = s.write_all(payload).await;
    let _ = s.close().await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        (&mut s).take(1 << 16).read_to_end(&mut back),
    )
    .await;
    back
}

fn random_payloads(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(0..600);
            let mut body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            match i % 4 {
                // A correct length prefix, so the body reaches the CBOR decoder.
                0 => {
                    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
                    framed.extend_from_slice(&body);
                    framed
                }
                // A correct prefix and version, random CBOR after.
                1 => {
                    let mut framed = ((body.len() + 2) as u32).to_be_bytes().to_vec();
                    framed.extend_from_slice(&[0, 1]);
                    framed.append(&mut body);
                    framed
                }
                // An oversize announcement.
                2 => {
                    let mut framed = u32::MAX.to_be_bytes().to_vec();
                    framed.append(&mut body);
                    framed
                }
                _ => body,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_both_protocols_leaves_the_node_serving_honest_peers() {
    within(120, async {
        let nodes = start_nodes(memory_stores(3)).await;
        let (victim, attacker, honest) = (&nodes[0], &nodes[1], &nodes[2]);
        let m = victim
            .store()
            .import_bytes(&bytes(2 << 20, 21), 256 << 10)
            .expect("import");
        let mut control = attacker.stream_control();

        for (i, p) in random_payloads(0x5eed, 48).iter().enumerate() {
            let proto = if i % 2 == 0 { CTL_PROTOCOL } else { BLOB_PROTOCOL };
            throw(&mut control, victim.peer_id(), proto, p).await;
        }

        // A well-formed request truncated mid-frame.
        let req = BlobRequest {
            blob: m.blob_ref(),
            first: 0,
            end: 1,
            window: 4,
            want_hashes: false,
            wait_ms: 0,
            bulk: false,
            pending: false,
        };
        let mut framed = Vec::new();
        write_request(&mut framed, &req).await.expect("encode");
        throw(
            &mut control,
            victim.peer_id(),
            BLOB_PROTOCOL,
            &framed[..framed.len() - 3],
        )
        .await;

        // Well-framed but invalid requests get a typed refusal.
        for bad in [
            BlobRequest {
                first: 5,
                end: 1,
                ..req.clone()
            },
            BlobRequest {
                end: 1 << 40,
                ..req.clone()
            },
            BlobRequest {
                blob: flare_protocols::BlobRef {
                    len: m.len + 1,
                    ..m.blob_ref()
                },
                ..req.clone()
            },
            BlobRequest {
                blob: flare_protocols::BlobRef {
                    chunk_size: 0,
                    ..m.blob_ref()
                },
                ..req.clone()
            },
            // An output still being produced has no hash list to send.
            BlobRequest {
                want_hashes: true,
                pending: true,
                ..req.clone()
            },
        ] {
            let mut framed = Vec::new();
            write_request(&mut framed, &bad).await.expect("encode");
            let back = throw(&mut control, victim.peer_id(), BLOB_PROTOCOL, &framed).await;
            let header = read_header(&mut back.as_slice()).await.expect("a header comes back");
            assert!(matches!(header, BlobHeader::Refused { .. }), "{bad:?} -> {header:?}");
        }

        // The victim still serves: a control request and a whole blob, to two members.
        let hb = CtlRequest {
            job: JobId("j".into()),
            body: Request::Heartbeat,
        };
        for peer in [attacker, honest] {
            let r = peer
                .net()
                .request(victim.peer_id(), hb.clone())
                .await
                .expect("answered");
            assert!(matches!(r, CtlResponse::Rejected { .. }));
        }
        let report = honest
            .fetch(m.blob_ref(), &[victim.peer_id()], &FetchOptions::default())
            .await
            .expect("honest fetch");
        assert_eq!(report.fetched, m.chunk_count());
        assert!(
            victim
                .serve_stats()
                .failed_streams
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    })
    .await;
}
