//! Control messages reach members and come back answered.

use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request};

use crate::util::{memory_stores, start_nodes, within};

fn heartbeat(job: &str) -> CtlRequest {
    CtlRequest {
        job: JobId(job.into()),
        body: Request::Heartbeat,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_requests_are_answered_and_unknown_jobs_rejected() {
    within(30, async {
        let nodes = start_nodes(memory_stores(2)).await;
        let b_peer = nodes[1].peer_id();
        // No job on b yet: rejected, with the job named.
        let r = nodes[0]
            .net()
            .request(b_peer, heartbeat("job-1"))
            .await
            .expect("answered");
        assert!(
            matches!(&r, CtlResponse::Rejected { reason } if reason.contains("job-1")),
            "{r:?}"
        );

        // b joins job-1: it answers that job's messages and rejects others.
        let mut inbound = nodes[1].subscribe_ctl().expect("inbound");
        let handler = tokio::spawn(async move {
            while let Some(req) = inbound.recv().await {
                let resp = if req.request.job.0 == "job-1" {
                    CtlResponse::Ack
                } else {
                    CtlResponse::Rejected {
                        reason: format!("not in job {}", req.request.job),
                    }
                };
                let _ = req.reply.send(resp);
            }
        });
        let a = nodes[0].net().clone();
        assert_eq!(
            a.request(b_peer, heartbeat("job-1")).await.expect("ok"),
            CtlResponse::Ack
        );
        assert!(matches!(
            a.request(b_peer, heartbeat("job-2")).await.expect("ok"),
            CtlResponse::Rejected { .. }
        ));
        let big = CtlRequest {
            job: JobId("job-1".into()),
            body: Request::Abort {
                reason: "x".repeat(2 << 20),
                failed: false,
            },
        };
        assert!(a.request(b_peer, big).await.is_err(), "oversize requests are refused");
        assert_eq!(
            a.request(b_peer, heartbeat("job-1")).await.expect("ok"),
            CtlResponse::Ack
        );
        handler.abort();
    })
    .await;
}
