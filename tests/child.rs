//! A receiver in its own OS process, killed mid-transfer and started again on the same data
//! dir: it finishes the blob without fetching again the chunks it had.
//!
//! The child is this test binary run again with `--ignored --exact child::fetch_in_child`
//! and its orders in environment variables; it reports on stdout in lines starting `FLARE `.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use flare_actors::blob::{FaultPlan, FetchOptions};
use flare_actors::{BlobStore, Member, Members, Node, NodeConfig};
use flare_protocols::{BlobId, BlobRef};
use libp2p::identity::Keypair;

use crate::util::{bytes, loopback, start_with_keys, within};

const ENV: &str = "FLARE_TEST_CHILD";

/// The child's side: fetch the blob named in the environment, reporting progress.
#[test]
#[ignore = "run by receiver_killed_mid_transfer_resumes_on_restart as a child process"]
fn fetch_in_child() {
    let Ok(orders) = std::env::var(ENV) else {
        return;
    };
    let f: Vec<&str> = orders.split(' ').collect();
    let [key, dir, src_peer, src_addr, id, len, cs] = f[..] else {
        panic!("bad orders: {orders}");
    };
    let key = Keypair::from_protobuf_encoding(&hex::decode(key).expect("hex")).expect("key");
    let blob = BlobRef {
        id: BlobId::from_hex(id).expect("id"),
        len: len.parse().expect("len"),
        chunk_size: cs.parse().expect("cs"),
    };
    let src = Member {
        name: "src".into(),
        peer_id: src_peer.parse().expect("peer"),
        addrs: vec![src_addr.parse().expect("addr")],
    };
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let store = BlobStore::open(std::path::Path::new(dir)).expect("store");
        let present = store.presence(&blob.id).map_or(0, |p| p.present);
        println!("FLARE present {present}");
        let node = Node::start(NodeConfig {
            keypair: key,
            members: Members::from_members([src.clone()]).into(),
            listen: vec![loopback()],
            store,
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        })
        .await
        .expect("start");
        let opts = FetchOptions {
            window: 4,
            progress: Some(std::sync::Arc::new(|p: flare_actors::blob::Progress| {
                println!("FLARE progress {}", p.present);
            })),
            ..FetchOptions::default()
        };
        let report = node.fetch(blob, &[src.peer_id], &opts).await.expect("fetch");
        println!("FLARE done {}", report.fetched);
    });
}

fn spawn_child(orders: &str) -> (Child, mpsc::Receiver<String>) {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child::fetch_in_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, orders)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // libtest may print "test NAME ... " on the same line first.
            if let Some(at) = line.find("FLARE ") {
                let _ = tx.send(line[at + 6..].to_owned());
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for a line from the child that satisfies `pred`.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("child never said {what}: {e}"),
        }
    }
    panic!("child never said {what}");
}

fn number(line: &str) -> u64 {
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_transfer_resumes_on_restart() {
    within(120, async {
        let child_key = Keypair::generate_ed25519();
        let src_key = Keypair::generate_ed25519();
        let child_member = Member {
            name: "child".into(),
            peer_id: child_key.public().to_peer_id(),
            addrs: vec![],
        };
        let nodes = start_with_keys(vec![src_key], vec![BlobStore::memory()]).await;
        let src = &nodes[0];
        src.net().add_member(child_member).expect("admit child");
        let data = bytes(48 << 16, 31); // 48 chunks of 64 KiB
        let m = src.store().import_bytes(&data, 64 << 10).expect("import");
        let stall_at = 20;
        src.faults().arm(FaultPlan {
            stall_after: Some(stall_at),
            ..FaultPlan::default()
        });

        let dir = tempfile::tempdir().expect("tmp");
        let orders = format!(
            "{} {} {} {} {} {} {}",
            hex::encode(child_key.to_protobuf_encoding().expect("key")),
            dir.path().display(),
            src.peer_id(),
            src.listen_addrs()[0],
            m.id().to_hex(),
            m.len,
            m.chunk_size
        );

        // First run: stalls after `stall_at` chunks; kill it once they are stored.
        let (mut child, rx) = spawn_child(&orders);
        assert_eq!(number(&wait_line(&rx, "present", |l| l.starts_with("present"))), 0);
        wait_line(&rx, "its progress", |l| {
            l.starts_with("progress") && number(l) >= stall_at
        });
        child.kill().expect("kill");
        let _ = child.wait();

        // Second run on the same data dir, with an honest source. Chunks the source was still
        // sending to the killed child count to the first run: wait until its count settles.
        src.faults().arm(FaultPlan::default());
        let mut served_before = src.serve_stats().chunks.load(Ordering::Relaxed);
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = src.serve_stats().chunks.load(Ordering::Relaxed);
            if now == served_before {
                break;
            }
            served_before = now;
        }
        let (mut child, rx) = spawn_child(&orders);
        let had = number(&wait_line(&rx, "present", |l| l.starts_with("present")));
        assert!(
            had >= stall_at,
            "restart found {had} chunks, expected at least {stall_at}"
        );
        let fetched = number(&wait_line(&rx, "done", |l| l.starts_with("done")));
        let status = child.wait().expect("wait");
        assert!(status.success(), "child failed: {status}");
        let served_after = src.serve_stats().chunks.load(Ordering::Relaxed) - served_before;
        assert_eq!(fetched, m.chunk_count() - had, "only missing chunks were fetched");
        assert_eq!(
            served_after,
            m.chunk_count() - had,
            "the source sent only what was missing"
        );

        let store = BlobStore::open(dir.path()).expect("reopen");
        assert!(store.read_all(&m.id()).expect("read") == data);
    })
    .await;
}
