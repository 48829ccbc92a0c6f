//! The Controller actor: a job ended from outside, or by a workflow that panics, ends on
//! every client with the reason, and its workflow stops; a member cut off from the network
//! stops waiting for its job.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flare_actors::job::{AddOne, ControllerError, Ending, FedAvgConfig, Learner, TaskContext, TrainOutput, fedavg};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};
use tokio::sync::mpsc;

use crate::util::{Federation, within};

/// Add-one that says when it trains.
struct Signalling {
    inner: AddOne,
    trained: mpsc::UnboundedSender<()>,
}

impl Learner for Signalling {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let _ = self.trained.send(());
        self.inner.train(global, ctx)
    }

    fn validate(
        &mut self,
        model: &Model,
        ctx: &TaskContext,
    ) -> Result<std::collections::BTreeMap<String, f64>, String> {
        self.inner.validate(model, ctx)
    }
}

/// Sets its flag when dropped: shows that a cancelled workflow's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A server and `site-1`, which has joined `job` with add-one.
async fn one_client(job: &str) -> Federation {
    let f = Federation::start(job, "server", ["site-1".to_owned()]).await;
    f.join_all(|_| Box::new(AddOne { num_samples: 1 })).await;
    f
}

fn model() -> Model {
    Model::from_tensors([("w", Tensor::from_f32(vec![1000], &[0.5; 1000]).expect("tensor"))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_aborted_mid_job_drops_its_workflow_and_tells_every_client_why() {
    within(60, async {
        let f = Federation::start("aborted", "server", ["site-1".to_owned(), "site-2".to_owned()]).await;
        let (tx, mut trained) = mpsc::unbounded_channel();
        f.join_all(|_| {
            Box::new(Signalling {
                inner: AddOne { num_samples: 1 },
                trained: tx.clone(),
            })
        })
        .await;
        // More rounds than the test will ever wait for.
        let cfg = FedAvgConfig {
            rounds: 1_000_000,
            min_clients: 2,
            round_timeout: Duration::from_secs(30),
            clients: f.clients(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: None,
            share_upload: false,
        };
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let mut ctl = f.hosts[0]
            .start_controller(f.comm(DEFAULT_CHUNK_SIZE), f.clients(), move |comm| async move {
                let _flag = flag;
                fedavg::run(&comm, &cfg, model()).await
            })
            .await
            .expect("controller");
        // The job is under way: a client trained.
        trained.recv().await.expect("a client trains");
        ctl.abort("stopped by the test");
        match ctl.outcome().await {
            Err(ControllerError::Aborted(why)) => assert_eq!(why, "stopped by the test"),
            Err(e) => panic!("aborted job gave {e}"),
            Ok(_) => panic!("an aborted job gave an outcome"),
        }
        assert!(dropped.load(Ordering::SeqCst), "the workflow was dropped");
        for host in &f.hosts[1..] {
            let end = host.job_ended(&f.job).await;
            assert_eq!(end, Some(Ending::failed("stopped by the test")));
        }
        // A second abort, after the end, changes nothing.
        ctl.abort("again");
        assert_eq!(ctl.outcome().await.err(), Some(ControllerError::Stopped));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_that_panics_fails_its_controller_and_its_clients_are_told() {
    within(60, async {
        let f = one_client("panics").await;
        let mut ctl = f.hosts[0]
            .start_controller(f.comm(DEFAULT_CHUNK_SIZE), f.clients(), |comm| async move {
                if !comm.peers().is_empty() {
                    panic!("the test's workflow broke");
                }
            })
            .await
            .expect("controller");
        match ctl.outcome().await {
            Err(ControllerError::Panicked(why)) => assert_eq!(why, "the test's workflow broke"),
            other => panic!("a panicking workflow gave {other:?}"),
        }
        let end = f.hosts[1].job_ended(&f.job).await.expect("the job ends for site-1");
        assert_eq!(end, Ending::failed("the controller failed: the test's workflow broke"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_network_stops_stops_waiting_for_its_job() {
    within(60, async {
        let f = one_client("no-network").await;
        // No controller could reach site-1 again: `flare-node run` must not wait forever.
        f.hosts[1].node().net().shutdown();
        let end = f.hosts[1].job_ended(&f.job).await;
        assert_eq!(end, Some(Ending::failed("this node's network stopped")));
    })
    .await;
}
