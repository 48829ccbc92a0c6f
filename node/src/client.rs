//! The Rust Client API with the node started for you: [`init`] makes this process a member of
//! a topology's job, with the training code behind its executor.
//!
//! ```no_run
//! # fn train(m: &flare_node::client::FLModel) -> flare_node::client::FLModel { m.clone() }
//! let flare = flare_node::client::init()?;
//! while let Some(input) = flare.receive()? {
//!     let output = train(&input); // the existing training code
//!     flare.send(output)?;
//! }
//! # Ok::<(), flare_node::client::ClientError>(())
//! ```
//!
//! `init` reads the arguments of `flare-node run` from the command line (`--topology FILE
//! --name MEMBER --key KEY --data-dir DIR`, optionally `--listen ADDR` and
//! `--task-timeout-secs N`), ignoring any others so the program keeps its own; each may
//! come from the environment instead (`FLARE_TOPOLOGY`, `FLARE_NAME`, `FLARE_KEY`,
//! `FLARE_DATA_DIR`). The node runs on a background thread until the job ends.

use std::ffi::OsString;
use std::time::Duration;

use clap::Parser;
#[cfg(feature = "torch")]
pub use flare_actors::client::torch;
pub use flare_actors::client::{
    Client, ClientError, ClientLearner, DEFAULT_TASK_TIMEOUT, FLModel, JobEnd, SystemInfo, client_pair,
};
use flare_protocols::ctl::JobId;

use crate::run::RunArgs;

/// `flare-node run`'s arguments, parsed the way the CLI parses them.
#[derive(Parser)]
struct InitArgs {
    #[command(flatten)]
    run: RunArgs,
}

/// Flags `init` takes (with a value each), and the environment variable each falls back to.
const FLAGS: [(&str, Option<&str>); 6] = [
    ("--topology", Some("FLARE_TOPOLOGY")),
    ("--name", Some("FLARE_NAME")),
    ("--key", Some("FLARE_KEY")),
    ("--data-dir", Some("FLARE_DATA_DIR")),
    ("--listen", None),
    ("--task-timeout-secs", None),
];

/// Starts this process's node as the member named on the command line (see the module doc)
/// and returns the training code's [`Client`].
pub fn init() -> Result<Client, ClientError> {
    init_from(std::env::args_os().skip(1))
}

/// [`init`] with these arguments (without the program name) instead of the command line.
pub fn init_from(args: impl IntoIterator<Item = OsString>) -> Result<Client, ClientError> {
    let picked = pick_flags(args)?;
    let value = |flag: &str| picked.iter().find(|(f, _)| f == flag).map(|(_, v)| v.clone());
    let timeout = match value("--task-timeout-secs") {
        None => DEFAULT_TASK_TIMEOUT,
        Some(v) => v
            .to_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| ClientError::Config(format!("--task-timeout-secs {v:?} is not a number of seconds > 0")))?,
    };
    let topology = value("--topology").ok_or_else(|| ClientError::Config("give --topology FILE".into()))?;
    let name = value("--name")
        .and_then(|n| n.into_string().ok())
        .ok_or_else(|| ClientError::Config("give --name MEMBER".into()))?;
    let topo = crate::topology::Topology::load(std::path::Path::new(&topology))
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let argv = std::iter::once(OsString::from("init")).chain(
        picked
            .into_iter()
            .filter(|(f, _)| f != "--task-timeout-secs")
            .flat_map(|(f, v)| [OsString::from(f), v]),
    );
    let args = InitArgs::try_parse_from(argv)
        .map_err(|e| ClientError::Config(e.to_string()))?
        .run;
    crate::init_tracing(crate::DEFAULT_LOG_FILTER);
    let (client, learner) = client_pair(JobId(topo.job.clone()), &name, timeout);
    let end = learner.job_end();
    std::thread::Builder::new()
        .name("flare-node".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(crate::run::run_with(args, Some(Box::new(learner)))));
            if let Err(e) = &result {
                tracing::error!(error = %format!("{e:#}"), "the federated node stopped");
            }
            end.finish(result.err().map(|e| format!("{e:#}")));
        })
        .map_err(|e| ClientError::Node(format!("starting the node's thread: {e}")))?;
    Ok(client)
}

/// The flags `init` takes, from `args` (`--flag value` or `--flag=value`) or else from their
/// environment variables; anything else is left to the program.
fn pick_flags(args: impl IntoIterator<Item = OsString>) -> Result<Vec<(String, OsString)>, ClientError> {
    let mut picked = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(s) = arg.to_str() else { continue };
        for (flag, _) in FLAGS {
            if s == flag {
                let v = args
                    .next()
                    .ok_or_else(|| ClientError::Config(format!("{flag} needs a value")))?;
                picked.push((flag.to_owned(), v));
            } else if let Some(v) = s.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                picked.push((flag.to_owned(), v.into()));
            }
        }
    }
    for (flag, env) in FLAGS {
        if let (Some(env), false) = (env, picked.iter().any(|(f, _)| f == flag))
            && let Some(v) = std::env::var_os(env)
        {
            picked.push((flag.to_owned(), v));
        }
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_takes_its_flags_and_leaves_the_programs_own() {
        let args = [
            "--epochs",
            "3",
            "--topology",
            "t.toml",
            "--cnn",
            "--name=site-1",
            "--key",
            "k",
        ];
        let picked = pick_flags(args.map(OsString::from)).expect("flags");
        let flags: Vec<(&str, &str)> = picked
            .iter()
            .filter(|(f, _)| matches!(f.as_str(), "--topology" | "--name" | "--key"))
            .map(|(f, v)| (f.as_str(), v.to_str().expect("utf8")))
            .collect();
        assert_eq!(flags, [("--topology", "t.toml"), ("--name", "site-1"), ("--key", "k")]);
        assert!(pick_flags(["--key"].map(OsString::from)).is_err());
        assert!(matches!(
            init_from(["--name", "x"].map(OsString::from)),
            Err(ClientError::Config(_))
        ));
    }
}
