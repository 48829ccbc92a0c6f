//! The harness: start nodes that know each other (in this process, or one `flare-node run`
//! process per member), bound every wait.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flare_actors::job::{Communicator, JobHost, Learner};
use flare_actors::{BlobStore, Member, MemberTable, Members, Node, NodeConfig};
use flare_protocols::ctl::JobId;
use libp2p::PeerId;
use libp2p::identity::Keypair;

use crate::cli::{Running, cli, peer_id_in, summary, text, topology_file};

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
    start_limited(keys, stores, |_| flare_actors::blob::serve::MAX_SERVING).await
}

/// Like [`start_with_keys`], node `i` serving at most `streams(i)` blob streams at once.
pub async fn start_limited(keys: Vec<Keypair>, stores: Vec<BlobStore>, streams: impl Fn(usize) -> usize) -> Vec<Node> {
    start_configured(keys, stores, |i, cfg| cfg.max_blob_streams = streams(i)).await
}

/// Like [`start_nodes`], node `i` uploading at most `cap(i)` bytes a second.
pub async fn start_capped(stores: Vec<BlobStore>, cap: impl Fn(usize) -> Option<u64>) -> Vec<Node> {
    let keys = stores.iter().map(|_| Keypair::generate_ed25519()).collect();
    start_configured(keys, stores, |i, cfg| cfg.max_upload = cap(i)).await
}

/// Starts one node per key and store on loopback, each configured by `configure(i, ..)`, all
/// knowing each other's addresses.
async fn start_configured(
    keys: Vec<Keypair>,
    stores: Vec<BlobStore>,
    configure: impl Fn(usize, &mut NodeConfig),
) -> Vec<Node> {
    // One table for every node, as in `sim`.
    let table = MemberTable::new(Members::from_members(keys.iter().enumerate().map(|(i, k)| Member {
        name: format!("n{i}"),
        peer_id: k.public().to_peer_id(),
        addrs: vec![],
    })));
    let mut nodes = Vec::new();
    for (i, (key, store)) in keys.into_iter().zip(stores).enumerate() {
        let mut cfg = NodeConfig {
            keypair: key,
            members: table.clone(),
            listen: vec![loopback()],
            store,
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        };
        configure(i, &mut cfg);
        let node = Node::start(cfg).await.expect("node starts");
        nodes.push(node);
    }
    let addressed: Vec<Member> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| n.as_member(&format!("n{i}")))
        .collect();
    for m in addressed {
        table.insert(m);
    }
    nodes
}

/// A job's members in this process: one node each on loopback, each with a job host. Member 0
/// hosts the workflow (the controller); the others (the clients) join the job as executors
/// with the learners a test gives them. The workflow tests all start this way, so the wiring
/// is written once and a test states only names and learners.
pub struct Federation {
    /// One host per member, in member order.
    pub hosts: Vec<JobHost>,
    /// The members, the controller first.
    pub members: Vec<Member>,
    /// The job the clients join.
    pub job: JobId,
}

impl Federation {
    /// Starts a node and a host for `controller` and each of `clients`, every node admitting
    /// every other; no one has joined `job` yet.
    pub async fn start(job: &str, controller: &str, clients: impl IntoIterator<Item = String>) -> Self {
        let names: Vec<String> = std::iter::once(controller.to_owned()).chain(clients).collect();
        let stores = memory_stores(names.len());
        Self::start_with(job, names, stores).await
    }

    /// Like [`Self::start`], with member `i` on `stores[i]` (the controller first).
    pub async fn start_with(job: &str, names: Vec<String>, stores: Vec<BlobStore>) -> Self {
        Self::start_limited(job, names, stores, flare_actors::blob::serve::MAX_SERVING).await
    }

    /// Like [`Self::start_with`], the controller serving at most `streams` blob streams at
    /// once (the clients the default).
    pub async fn start_limited(job: &str, names: Vec<String>, stores: Vec<BlobStore>, streams: usize) -> Self {
        let keys = stores.iter().map(|_| Keypair::generate_ed25519()).collect();
        let nodes: Vec<Arc<Node>> = start_limited(keys, stores, |i| {
            if i == 0 {
                streams
            } else {
                flare_actors::blob::serve::MAX_SERVING
            }
        })
        .await
        .into_iter()
        .map(Arc::new)
        .collect();
        Self {
            members: nodes.iter().zip(&names).map(|(n, name)| n.as_member(name)).collect(),
            hosts: nodes.iter().map(|n| JobHost::start(n.clone()).expect("host")).collect(),
            job: JobId(job.into()),
        }
    }

    /// Member `i` joins the job as an executor running `learner`, taking tasks from member 0.
    pub async fn join(&self, i: usize, learner: Box<dyn Learner>) {
        self.hosts[i]
            .join_as_executor(
                self.job.clone(),
                Some(self.members[0].peer_id),
                &self.members[i].name,
                learner,
            )
            .await
            .expect("executor");
    }

    /// Every client joins, member `i` running `learner(i)`.
    pub async fn join_all(&self, learner: impl Fn(usize) -> Box<dyn Learner>) {
        for i in 1..self.members.len() {
            self.join(i, learner(i)).await;
        }
    }

    /// The clients' peer ids, as a workflow's configuration lists them.
    pub fn clients(&self) -> Vec<PeerId> {
        self.members[1..].iter().map(|m| m.peer_id).collect()
    }

    /// The controller's side of the job, publishing models in chunks of `chunk_size`.
    pub fn comm(&self, chunk_size: u32) -> Communicator {
        Communicator::new(
            &self.hosts[0],
            self.job.clone(),
            self.members.clone(),
            chunk_size,
            [0; 32],
        )
    }
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

/// A job whose members run one `flare-node run` process each, in `dir`, every member listed
/// with its loopback address so any member can reach any other directly.
pub struct Cluster {
    dir: PathBuf,
    topology: PathBuf,
    names: Vec<String>,
}

/// A loopback port free right now (the OS picks it; the member binds it moments later).
pub fn free_port() -> u16 {
    // Never the same port twice in this process: two libp2p listeners can share a port (port
    // reuse), so a port handed out again would make two sites answer at one address.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

impl Cluster {
    /// Keys for `names`, and `job` written as a topology listing every member's peer id and
    /// address.
    pub fn new(dir: &Path, job: &str, names: &[&str]) -> Self {
        let mut toml = job.to_owned();
        for n in names {
            let key = dir.join(format!("{n}.key"));
            let id = peer_id_in(&cli(&["keygen", "--out", key.to_str().expect("utf8")]));
            toml.push_str(&format!(
                "[[member]]\nname = \"{n}\"\npeer_id = \"{id}\"\naddrs = [\"/ip4/127.0.0.1/tcp/{}\"]\n\n",
                free_port()
            ));
        }
        let topology = dir.join("topology.toml");
        std::fs::write(&topology, toml).expect("write topology");
        Self {
            dir: dir.to_owned(),
            topology,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf8").to_owned()
    }

    /// Starts member `name`'s process.
    pub fn start(&self, name: &str) -> Running {
        Running::start(&[
            "run",
            "--topology",
            self.topology.to_str().expect("utf8"),
            "--name",
            name,
            "--key",
            &self.path(&format!("{name}.key")),
            "--data-dir",
            &self.path(&format!("{name}-data")),
        ])
    }

    /// Starts every member.
    pub fn start_all(&self) -> Vec<Running> {
        self.names.iter().map(|n| self.start(n)).collect()
    }

    /// The final model member `name` wrote.
    pub fn model(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("{name}-data/global.safetensors")))
            .unwrap_or_else(|e| panic!("{name}'s model: {e}"))
    }

    /// The summary member `name` wrote.
    pub fn results(&self, name: &str) -> serde_json::Value {
        let bytes = std::fs::read(self.dir.join(format!("{name}-data/results.json")))
            .unwrap_or_else(|e| panic!("{name}'s results: {e}"));
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("json")["summary"].clone()
    }

    /// `sim` of the same topology; returns its summary and final model.
    pub fn sim(&self) -> (serde_json::Value, Vec<u8>) {
        let out = self.path("sim-out");
        let run = cli(&["sim", self.topology.to_str().expect("utf8"), "--json", "--out", &out]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        let model = std::fs::read(self.dir.join("sim-out/global.safetensors")).expect("sim's model");
        (summary(&run), model)
    }
}

/// Waits (bounded) for every member to exit successfully; returns their logs, in order.
pub fn wait_all(members: Vec<Running>) -> Vec<String> {
    members
        .into_iter()
        .map(|m| {
            let (ok, log) = m.finish(120);
            assert!(ok, "a member failed:\n{log}");
            log
        })
        .collect()
}

/// The job part of a shipped topology: its tables before the first `[[member]]` (a
/// [`Cluster`] lists the members with keys and ports).
pub fn job_of(file: &str) -> String {
    let text = std::fs::read_to_string(topology_file(file)).expect("topology");
    text.split("[[member]]").next().expect("job part").to_owned()
}

/// The bytes a `flare-node run` process sent over the whole job, from the `bytes_sent` field
/// of its last log line ("shutting down"): its own protocol handlers' count of every control
/// message and blob chunk it wrote.
pub fn bytes_sent(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("shutting down"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bytes_sent=")))
        .next_back()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes_sent in the shutdown line of:\n{log}"))
}
