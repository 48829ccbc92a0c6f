//! What a site checks before it takes part in a job: the signature, the job file, the
//! consortium's members, then the site's own policy; and whether the members that took a job
//! are enough for its workflow to run (its controller and `min_clients` of its clients; every
//! party of a split job). Each refusal names its site.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use flare_actors::Members;
use flare_protocols::job::SignedJob;

use super::policy::{Ask, Policy};
use crate::topology::{LearnerSpec, Topology, Workflow};

/// The learner a job names, as site policies list learners.
pub fn learner_name(t: &Topology) -> Result<String, String> {
    if let Some(name) = &t.registered_learner {
        return Ok(name.clone());
    }
    if !t.external.is_empty() {
        return Err(
            "the job gives members commands to run: a submitted job names a learner registered at each site, never a command"
                .into(),
        );
    }
    Ok(String::from(match &t.learner {
        LearnerSpec::AddOne { .. } => "add-one",
        LearnerSpec::Split => "split",
        LearnerSpec::Mlp { .. } => "mlp",
        LearnerSpec::Tch { arch, .. } => match arch {
            flare_actors::learner::torch::TchArch::Mlp { .. } => "tch-mlp",
            _ => "tch-cnn",
        },
    }))
}

/// Checks `signed`, submitted through `from`, against this site: the signature, the job
/// file (as `flare-node submit` checked it before sending), that every member it names is in
/// the consortium and this site is one of them, and this site's policy.
/// `running` is how many jobs the site has taken and not finished.
pub fn admit(policy: &Policy, members: &Members, signed: &SignedJob, running: usize) -> Result<Topology, String> {
    let site = &policy.name;
    let submitter = signed
        .verify()
        .map_err(|e| format!("{site}: refused a job whose signature does not hold: {e}"))?;
    let text = std::str::from_utf8(&signed.spec).map_err(|_| format!("{site}: the job spec is not UTF-8 text"))?;
    let topo = Topology::parse(Path::new(&format!("job {}", signed.id())), text).map_err(|e| format!("{site}: {e}"))?;
    for (name, _) in &topo.members {
        if members.by_name(name).is_none() {
            return Err(format!(
                "{site}: the job names member {name:?}, who is not in this consortium"
            ));
        }
    }
    if !topo.members.iter().any(|(n, _)| n == site) {
        return Err(format!("{site}: this site is not a member of the job"));
    }
    let learner = learner_name(&topo).map_err(|e| format!("{site}: {e}"))?;
    policy
        .admit(&Ask {
            submitter,
            workflow: topo.workflow.name(),
            learner: &learner,
            dataset: topo.data.dataset.as_deref(),
            model_bytes: model_bytes(&topo),
            // The kept checkpoints, the global and best links' targets, a round's model and
            // result in the store.
            models_on_disk: topo.checkpoints.keep as u64 + 3,
            running,
        })
        .map_err(|r| r.to_string())?;
    Ok(topo)
}

/// The size of the job's model where the job file fixes it (the add-one model's tensors of
/// `f32`); `None` for learners whose networks are small and fixed by their code, and for a
/// model a member's script gives (`[model] from`).
fn model_bytes(topo: &Topology) -> Option<u64> {
    match topo.learner {
        // `[model] from`: the member's script decides, when the job runs.
        LearnerSpec::AddOne { .. } if topo.model.from.is_some() => None,
        LearnerSpec::AddOne { .. } => Some(
            (topo.model.tensors as u64)
                .saturating_mul(topo.model.elements as u64)
                .saturating_mul(4),
        ),
        _ => None,
    }
}

/// How long a site waits for the other members' answers to an offer or a launch.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether the job can run with the members that took it: its controller (if it has one)
/// and at least `min_clients` of its clients; every party of a split job.
pub fn enough(topo: &Topology, took: &HashSet<String>) -> bool {
    if topo.controller.as_ref().is_some_and(|c| !took.contains(c)) {
        return false;
    }
    let clients = topo.clients.iter().filter(|c| took.contains(*c)).count();
    match topo.workflow {
        Workflow::Split(_) => clients == topo.clients.len(),
        _ => clients >= topo.min_clients.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_actors::Member;
    use libp2p::PeerId;
    use libp2p::identity::Keypair;

    fn site(alice: &PeerId) -> (Policy, Members) {
        let me = PeerId::random();
        let mut text = Policy::template("lab-a", &me, &[]);
        text.push_str(&format!("\n[[submitter]]\nname = \"alice\"\npeer_id = \"{alice}\"\n"));
        let policy = Policy::parse(Path::new("site.toml"), &text).expect("policy");
        let members = Members::from_members(["lab-a", "lab-b"].map(|n| Member {
            name: n.into(),
            peer_id: if n == "lab-a" { me } else { PeerId::random() },
            addrs: vec![],
        }));
        (policy, members)
    }

    const JOB: &str = "[job]\nname = \"j\"\nworkflow = \"swarm\"\n\n[swarm]\nrounds = 2\nmin_clients = 2\n\n\
         [learner]\nkind = \"add-one\"\n\n[[member]]\nname = \"lab-a\"\n[[member]]\nname = \"lab-b\"\n";

    #[test]
    fn a_good_job_is_admitted_and_a_tampered_one_is_not() {
        let alice = Keypair::generate_ed25519();
        let (policy, members) = site(&alice.public().to_peer_id());
        let signed = SignedJob::sign(JOB.as_bytes().to_vec(), &alice, 5).expect("sign");
        let topo = admit(&policy, &members, &signed, 0).expect("admitted");
        assert_eq!(topo.workflow.name(), "swarm");
        let mut tampered = signed;
        tampered.spec = JOB.replace("rounds = 2", "rounds = 200").into_bytes();
        let e = admit(&policy, &members, &tampered, 0).expect_err("tampered");
        assert!(
            e.starts_with("lab-a: refused a job whose signature does not hold"),
            "{e}"
        );
    }

    #[test]
    fn a_job_naming_a_dataset_is_taken_only_where_the_site_holds_it() {
        let alice = Keypair::generate_ed25519();
        let (mut policy, members) = site(&alice.public().to_peer_id());
        let job = JOB.replace("kind = \"add-one\"", "kind = \"mlp\"") + "\n[data]\ndataset = \"nope\"\n";
        let signed = SignedJob::sign(job.into_bytes(), &alice, 5).expect("sign");
        let e = admit(&policy, &members, &signed, 0).expect_err("no such dataset");
        assert_eq!(e, "lab-a: no dataset \"nope\" here");
        policy.datasets.insert(
            "nope".into(),
            super::super::policy::LocalDataset {
                path: "rows.csv".into(),
                test: None,
            },
        );
        let topo = admit(&policy, &members, &signed, 0).expect("admitted");
        assert_eq!(topo.data.dataset.as_deref(), Some("nope"));
    }

    #[test]
    fn jobs_the_site_is_not_in_or_that_name_commands_are_refused() {
        let alice = Keypair::generate_ed25519();
        let (policy, members) = site(&alice.public().to_peer_id());
        let sign = |t: String| SignedJob::sign(t.into_bytes(), &alice, 5).expect("sign");
        let elsewhere = JOB.replace("name = \"lab-a\"", "name = \"lab-c\"");
        let e = admit(&policy, &members, &sign(elsewhere), 0).expect_err("unknown member");
        assert!(
            e.contains("names member \"lab-c\", who is not in this consortium"),
            "{e}"
        );
        let e = admit(
            &policy,
            &members,
            &sign(JOB.replace("kind = \"add-one\"", "kind = \"mlp\"\n")),
            0,
        )
        .map(|_| ());
        assert_eq!(e, Ok(()), "the template allows every built-in learner");
        let bad = admit(&policy, &members, &sign("not toml [".into()), 0).expect_err("garbage");
        assert!(bad.starts_with("lab-a: job j"), "{bad}");
    }
}
