//! The Rust Client API in a real job: a training loop that drives itself (receive, send)
//! beside an ordinary learner, and the job's end reaching it.

use std::time::Duration;

use flare_actors::client::{Client, FLModel};
use flare_actors::job::{AddOne, Ending, FedAvgConfig, fedavg};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};

use crate::util::{Federation, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_api_loop_beside_a_builtin_learner_gives_the_exact_add_one_result() {
    within(120, async {
        let f = Federation::start("client-api", "site-0", (1..3).map(|i| format!("site-{i}"))).await;
        f.join(1, Box::new(AddOne { num_samples: 10 })).await;
        let client = Client::attach(
            &f.hosts[2],
            f.job.clone(),
            Some(f.members[0].peer_id),
            "site-2",
            Duration::from_secs(60),
        )
        .await
        .expect("attach");
        // The user's training loop, on its own thread, as in a plain training program.
        let trainer = std::thread::spawn(move || {
            let mut rounds = Vec::new();
            while let Some(input) = client.receive().expect("receive") {
                let info = client.system_info();
                rounds.push((info.round, info.total_rounds, client.is_train()));
                let mut params = input.params.clone();
                params.map_f32(|v| v + 1.0);
                client
                    .send(
                        FLModel::new(params)
                            .with_samples(30)
                            .with_metrics([("loss".to_owned(), 0.5)]),
                    )
                    .expect("send");
            }
            assert!(!client.is_running());
            (rounds, client.system_info())
        });

        let initial = Model::from_tensors([
            (
                "layer.weight",
                Tensor::from_f32(vec![2, 3], &[0.25, -1.5, 3.0, 7.75, -0.125, 2.0]).expect("t"),
            ),
            ("layer.bias", Tensor::from_f32(vec![2], &[-3.5, 100.0]).expect("t")),
        ]);
        let clients = f.clients();
        let cfg = FedAvgConfig {
            rounds: 4,
            min_clients: 2,
            round_timeout: Duration::from_secs(60),
            clients: clients.clone(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: None,
            share_upload: false,
        };
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        for r in &out.rounds {
            assert_eq!(r.contributors, ["site-1", "site-2"], "round {}", r.round);
        }
        let mut expected = initial;
        for _ in 0..4 {
            expected.map_f32(|v| v + 1.0);
        }
        assert!(out.model == expected, "every weight equals initial + 4, exactly");
        comm.end_job(&clients, &Ending::finished("job finished")).await;
        let (rounds, info) = tokio::task::spawn_blocking(move || trainer.join().expect("trainer"))
            .await
            .expect("join");
        assert_eq!(rounds, [(0, 4, true), (1, 4, true), (2, 4, true), (3, 4, true)]);
        assert_eq!((info.member.as_str(), info.job.0.as_str()), ("site-2", "client-api"));
    })
    .await;
}
