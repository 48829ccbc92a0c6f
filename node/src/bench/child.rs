//! The parent's side of a benchmark process, and the lines parent and child exchange.
//!
//! A child is `flare-node bench-peer <role> ...` (see [`super::peer`]). It writes one JSON
//! [`Event`] per line on stdout and logs on stderr, which the parent forwards with a
//! `[name]` prefix. The parent writes `stop` on the child's stdin when the phase is over;
//! the child answers [`Event::Final`] with its peak memory and exits. A child whose stdin
//! closes before `stop` (the parent died) gives up at once, and the parent kills its children
//! when it drops them, so no process outlives the benchmark.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::util::Cpu;

/// The line the parent writes to end a child.
pub const STOP: &str = "stop";

/// A blob as children pass it around: the three fields of a `BlobRef`, the id in hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobSpec {
    /// Blob id, 64 hex digits.
    pub id: String,
    /// Length in bytes.
    pub len: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
}

/// One line a child writes on stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Listening (and, for a blob source, holding the blob).
    Ready {
        /// Where peers reach it (a socket address for TCP, multiaddrs for libp2p).
        addrs: Vec<String>,
        /// The blob it serves, for a blob source.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blob: Option<BlobSpec>,
        /// Seconds spent generating and importing the blob (not part of any measurement).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        import_secs: Option<f64>,
    },
    /// A sender wrote all its bytes.
    Sent {
        /// Bytes written.
        bytes: u64,
    },
    /// A receiver has everything: the measurement.
    Received {
        /// Bytes received.
        bytes: u64,
        /// Measured seconds.
        secs: f64,
        /// For a blob: whether the stored blob re-hashes to the id asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verified: Option<bool>,
        /// For a blob: seconds the re-hash took (not part of `secs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verify_secs: Option<f64>,
        /// For a blob: source errors the fetch worked around.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_errors: Option<u64>,
        /// The receiver's CPU time over the measured interval.
        cpu: Cpu,
    },
    /// The answer to `stop`.
    Final {
        /// Peak resident set size over the child's whole life (`VmHWM`), bytes.
        peak_rss_bytes: u64,
        /// CPU time used since `Ready` (for a sender: the sending or serving).
        cpu_since_ready: Cpu,
    },
}

/// A running child process.
pub struct ChildProc {
    name: &'static str,
    child: tokio::process::Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<()>,
}

impl ChildProc {
    /// Starts `flare-node bench-peer <args>` (this very executable), killed when dropped.
    pub fn spawn(name: &'static str, args: Vec<String>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the flare-node executable")?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("bench-peer")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
            // A child's error comes back with its context chain; a backtrace is noise.
            cmd.env("RUST_LIB_BACKTRACE", "0");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} process ({})", exe.display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            // Ends at the child's exit (EOF) or on a read error.
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name}] {line}");
            }
        });
        Ok(Self {
            name,
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
            stderr,
        })
    }

    /// The next event, skipping lines that are not JSON objects. Fails if the child exits
    /// first or nothing comes before `deadline`.
    pub async fn event(&mut self, deadline: Instant) -> anyhow::Result<Event> {
        loop {
            let line = tokio::time::timeout_at(deadline, self.stdout.next_line())
                .await
                .map_err(|_| anyhow!("the {} reported nothing before the deadline", self.name))?
                .with_context(|| format!("reading the {} output", self.name))?;
            let Some(line) = line else {
                return Err(self.exit_error().await);
            };
            let line = line.trim();
            if !line.starts_with('{') {
                continue;
            }
            return serde_json::from_str(line).with_context(|| format!("bad line from the {}: {line}", self.name));
        }
    }

    async fn exit_error(&mut self) -> anyhow::Error {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => anyhow!("the {} exited ({status}) before reporting", self.name),
            Ok(Err(e)) => anyhow!("the {} closed its output; waiting for it failed: {e}", self.name),
            Err(_) => anyhow!("the {} closed its output but did not exit", self.name),
        }
    }

    /// Ends the child: sends `stop`, reads its peak memory and CPU time since `Ready`, and
    /// waits for a clean exit.
    pub async fn stop(mut self, deadline: Instant) -> anyhow::Result<(u64, Cpu)> {
        let mut stdin = self.stdin.take().context("child already stopped")?;
        let line = format!("{STOP}\n");
        tokio::time::timeout_at(deadline, stdin.write_all(line.as_bytes()))
            .await
            .map_err(|_| anyhow!("the {} does not read its input", self.name))?
            .with_context(|| format!("telling the {} to stop", self.name))?;
        drop(stdin);
        // A sender's `Sent` may still be unread when the receiver is done: skip it.
        let mut peak = None;
        for _ in 0..2 {
            match self.event(deadline).await? {
                Event::Final {
                    peak_rss_bytes,
                    cpu_since_ready,
                } => {
                    peak = Some((peak_rss_bytes, cpu_since_ready));
                    break;
                }
                Event::Sent { .. } => {}
                other => bail!("the {} answered stop with {other:?}", self.name),
            }
        }
        let peak = peak.with_context(|| format!("the {} did not report its memory", self.name))?;
        let status: ExitStatus = tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .map_err(|_| anyhow!("the {} did not exit after stopping", self.name))?
            .with_context(|| format!("waiting for the {}", self.name))?;
        if !status.success() {
            bail!("the {} exited with {status}", self.name);
        }
        // Its stderr is at EOF now; let the last lines through.
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.stderr).await;
        Ok(peak)
    }
}

/// Waits for the receiver's [`Event::Received`] while watching the sender, so that a sender
/// that fails ends the wait at once instead of at the deadline.
pub async fn wait_received(
    receiver: &mut ChildProc,
    sender: &mut ChildProc,
    deadline: Instant,
) -> anyhow::Result<Event> {
    // Each turn consumes one event; the sender sends at most one (`Sent`) before `stop`.
    for _ in 0..4 {
        tokio::select! {
            ev = receiver.event(deadline) => {
                return match ev? {
                    ev @ Event::Received { .. } => Ok(ev),
                    other => Err(anyhow!("the receiver sent {other:?} before its result")),
                };
            }
            ev = sender.event(deadline) => match ev.context("the sender failed")? {
                Event::Sent { .. } => {}
                other => bail!("the sender sent {other:?} unprompted"),
            },
        }
    }
    bail!("too many events from the sender")
}
