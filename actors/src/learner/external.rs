//! A learner that is a separate process (a Python script using `flare_client`, or any program
//! that speaks the Client API, see [`flare_protocols::client_api`]): local training code in any
//! language takes part in any workflow.
//!
//! The process is started lazily, on the first task, and serves task after task over one Unix
//! domain socket. Models cross as safetensors files in the member's work directory:
//! `<work_dir>/round-<r>/input.safetensors` in, `output.safetensors` out (other tasks than
//! `train` prefix the names with the task, e.g. `validate-input.safetensors`).
//!
//! The process is watched: if it exits, does not answer within the task timeout (it is then
//! killed) or sends anything that is not a valid message, that task fails with a clear error
//! ([`ExternalError`]) and the next task starts a fresh process. The node is never affected.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_protocols::client_api::{self, CLIENT_API_VERSION, FromLearner, MetaValue, ResultParams, ToLearner};
use flare_protocols::ctl::Value;
use flare_protocols::model::Model;

use crate::learner::{Learner, TaskContext, TaskReply, TrainOutput};
use crate::lock;

/// Lines of the process's stderr kept for error messages.
const TAIL_LINES: usize = 12;
/// Characters of stderr tail an error message carries at most.
const TAIL_CHARS: usize = 2000;
/// How often a blocked read wakes up to check on the process.
const POLL: Duration = Duration::from_millis(50);
/// Longest Unix socket path (`sun_path` is 108 bytes on Linux, 104 on macOS).
const MAX_SOCKET_PATH: usize = 100;

/// How to start and supervise an external learner process.
#[derive(Clone, Debug)]
pub struct ExternalConfig {
    /// Program and arguments, e.g. `["python3", "train.py"]`.
    pub command: Vec<String>,
    /// This member's work directory (one per member and job): the socket and the model
    /// files live here.
    pub work_dir: PathBuf,
    /// Directory the process runs in; `None`: the node's own.
    pub current_dir: Option<PathBuf>,
    /// Extra environment variables for the process.
    pub env: BTreeMap<String, String>,
    /// How long one task (and, separately, the process's start-up until `hello`) may take
    /// before the process is killed.
    pub task_timeout: Duration,
    /// How long the process has to exit after `stop` before it is killed.
    pub stop_grace: Duration,
    /// This member's name (the process's "site name").
    pub member: String,
}

impl ExternalConfig {
    /// A configuration with a one-hour task timeout and a 5 s stop grace.
    pub fn new(command: Vec<String>, work_dir: impl Into<PathBuf>, member: impl Into<String>) -> Self {
        Self {
            command,
            work_dir: work_dir.into(),
            current_dir: None,
            env: BTreeMap::new(),
            task_timeout: Duration::from_secs(3600),
            stop_grace: Duration::from_secs(5),
            member: member.into(),
        }
    }
}

/// Why a task run by an external learner process failed.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// The configuration cannot work (empty command, socket path too long).
    #[error("external learner configuration: {0}")]
    Config(String),
    /// The process could not be started.
    #[error("cannot start learner process {command:?}: {reason}")]
    Spawn {
        /// The command line.
        command: Vec<String>,
        /// Why.
        reason: String,
    },
    /// The process exited (crashed, or returned) while the executor waited for it.
    #[error("learner process exited with {status}; stderr tail: {stderr}")]
    Exited {
        /// Exit code or signal, in words.
        status: String,
        /// The exit code, when it exited by itself.
        code: Option<i32>,
        /// Its last lines of stderr.
        stderr: String,
    },
    /// The process did not answer in time; it was killed.
    #[error("learner process did not answer within {timeout:?} ({waiting_for}); it was killed")]
    Timeout {
        /// The task timeout.
        timeout: Duration,
        /// What the executor was waiting for.
        waiting_for: String,
    },
    /// The process sent bytes that are not a valid Client API message; it was killed.
    #[error("malformed message from the learner process: {0}")]
    Malformed(String),
    /// The process closed its socket but did not exit; it was killed.
    #[error("learner process closed its connection; stderr tail: {0}")]
    Closed(String),
    /// The learner reported that the task failed.
    #[error("learner process reported an error: {0}")]
    Learner(String),
    /// The output model is missing, unreadable or does not fit the input.
    #[error("output model: {0}")]
    Output(String),
    /// A local file or socket operation failed.
    #[error("{0}")]
    Io(String),
}

/// The last lines a process wrote to stderr, shared with the thread that reads them.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut t = lock(&self.0);
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }

    fn text(&self) -> String {
        let t = lock(&self.0);
        if t.is_empty() {
            return "(empty)".into();
        }
        let s = t.iter().map(String::as_str).collect::<Vec<_>>().join(" | ");
        match s.char_indices().rev().nth(TAIL_CHARS) {
            Some((i, _)) => format!("...{}", &s[i..]),
            None => s,
        }
    }
}

/// Forwards a process's output to the log line by line; keeps stderr's tail.
fn log_lines(
    reader: impl Read + Send + 'static,
    member: String,
    stream: &'static str,
    tail: Option<Tail>,
) -> mpsc::Receiver<()> {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            tracing::info!(target: "flare::learner", member = %member, stream, "{line}");
            if let Some(t) = &tail {
                t.push(line);
            }
        }
        let _ = done.send(());
    });
    finished
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

/// A running learner process and its connection.
struct Process {
    child: Child,
    stream: UnixStream,
    stderr: Tail,
    stderr_done: mpsc::Receiver<()>,
    timeout: Duration,
}

impl Process {
    /// The error for a process that has exited, once its stderr has been read to the end.
    fn exited(&self, status: ExitStatus) -> ExternalError {
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(1));
        ExternalError::Exited {
            status: describe(status),
            code: status.code(),
            stderr: self.stderr.text(),
        }
    }

    /// The socket reached its end: the process exited or, if it is still alive after a
    /// moment, it hung up on us.
    fn ended(&mut self) -> ExternalError {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return self.exited(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ExternalError::Closed(self.stderr.text())
    }

    /// Fills `buf` from the socket by `deadline`, checking on the process while it waits.
    fn fill(&mut self, buf: &mut [u8], deadline: Instant, waiting_for: &str) -> Result<(), ExternalError> {
        let mut at = 0;
        while at < buf.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(ExternalError::Timeout {
                    timeout: self.timeout,
                    waiting_for: waiting_for.to_owned(),
                });
            }
            self.stream
                .set_read_timeout(Some((deadline - now).min(POLL)))
                .map_err(|e| ExternalError::Io(format!("socket: {e}")))?;
            match self.stream.read(&mut buf[at..]) {
                Ok(0) => return Err(self.ended()),
                Ok(n) => at += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(self.exited(status));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(self.ended()),
            }
        }
        Ok(())
    }

    /// Reads one message by `deadline`.
    fn receive(&mut self, deadline: Instant, waiting_for: &str) -> Result<FromLearner, ExternalError> {
        let mut prefix = [0u8; 4];
        self.fill(&mut prefix, deadline, waiting_for)?;
        let len = client_api::body_len(prefix).map_err(|e| ExternalError::Malformed(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.fill(&mut body, deadline, waiting_for)?;
        client_api::decode(&body).map_err(|e| ExternalError::Malformed(e.to_string()))
    }

    /// Sends one message; a process that cannot take it has gone away.
    fn send(&mut self, msg: &ToLearner) -> Result<(), ExternalError> {
        let frame = client_api::encode(msg).map_err(|e| ExternalError::Io(format!("encoding a task: {e}")))?;
        let _ = self.stream.set_write_timeout(Some(self.timeout));
        match self.stream.write_all(&frame) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                Err(ExternalError::Timeout {
                    timeout: self.timeout,
                    waiting_for: "taking a task".into(),
                })
            }
            Err(_) => Err(self.ended()),
        }
    }

    /// Kills the process (if still running) and reaps it.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to exit, waits up to `grace`, then kills it.
    fn stop(mut self, grace: Duration, member: &str) {
        let stop = ToLearner::Task {
            task: client_api::TASK_STOP.into(),
            round: 0,
            total_rounds: 0,
            job: String::new(),
            member: member.to_owned(),
            input_path: None,
            output_path: String::new(),
            meta: BTreeMap::new(),
        };
        if let Ok(frame) = client_api::encode(&stop) {
            let _ = self.stream.set_write_timeout(Some(grace));
            let _ = self.stream.write_all(&frame);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(member, "learner process did not stop in time; killing it");
        self.kill();
    }
}

/// A [`Learner`] that runs the member's training code as a separate process (see the
/// module doc), so a topology can name a script instead of a built-in learner.
pub struct ExternalLearner {
    cfg: ExternalConfig,
    process: Option<Process>,
    last: Option<Model>,
}

/// What one task's exchange with the process produced.
struct Reply {
    model: Option<Model>,
    metrics: BTreeMap<String, f64>,
    num_samples: u64,
    meta: BTreeMap<String, Value>,
}

impl ExternalLearner {
    /// A learner that will start `cfg.command` on its first task.
    pub fn new(cfg: ExternalConfig) -> Result<Self, ExternalError> {
        if cfg.command.is_empty() {
            return Err(ExternalError::Config("the command is empty".into()));
        }
        Ok(Self {
            cfg,
            process: None,
            last: None,
        })
    }

    /// The process's id while one runs (for supervision and tests).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// Asks a running process to exit (waiting up to the stop grace, then killing it).
    pub fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            p.stop(self.cfg.stop_grace, &self.cfg.member);
        }
    }

    fn work_dir(&self) -> Result<PathBuf, ExternalError> {
        std::fs::create_dir_all(&self.cfg.work_dir)
            .and_then(|_| std::path::absolute(&self.cfg.work_dir))
            .map_err(|e| ExternalError::Io(format!("work directory {}: {e}", self.cfg.work_dir.display())))
    }

    /// Starts the process and waits for its `hello`.
    fn start(&self, ctx: &TaskContext) -> Result<Process, ExternalError> {
        let dir = self.work_dir()?;
        let socket = dir.join("flare.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ExternalError::Config(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter work directory",
                socket.display()
            )));
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|e| ExternalError::Io(format!("listening on {}: {e}", socket.display())))?;
        let (program, args) = self
            .cfg
            .command
            .split_first()
            .ok_or_else(|| ExternalError::Config("the command is empty".into()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env(client_api::ENV_SOCKET, &socket)
            .env(client_api::ENV_JOB, &ctx.job.0)
            .env(client_api::ENV_MEMBER, &self.cfg.member)
            .env(client_api::ENV_WORK_DIR, &dir)
            .env(client_api::ENV_VERSION, CLIENT_API_VERSION.to_string())
            .envs(&self.cfg.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = &self.cfg.current_dir {
            cmd.current_dir(d);
        }
        let spawned = cmd.spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(ExternalError::Spawn {
                    command: self.cfg.command.clone(),
                    reason: e.to_string(),
                });
            }
        };
        tracing::info!(job = %ctx.job, round = ctx.round, member = %self.cfg.member, pid = child.id(),
            command = ?self.cfg.command, "learner process started");
        let stderr = Tail::default();
        if let Some(out) = child.stdout.take() {
            log_lines(out, self.cfg.member.clone(), "stdout", None);
        }
        let stderr_done = match child.stderr.take() {
            Some(err) => log_lines(err, self.cfg.member.clone(), "stderr", Some(stderr.clone())),
            None => mpsc::channel().1,
        };
        let timeout = self.cfg.task_timeout;
        let deadline = Instant::now() + timeout;
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(ExternalError::Io(format!("accepting on {}: {e}", socket.display()))),
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = stderr_done.recv_timeout(Duration::from_secs(1));
                break Err(ExternalError::Exited {
                    status: describe(status),
                    code: status.code(),
                    stderr: stderr.text(),
                });
            }
            if Instant::now() >= deadline {
                break Err(ExternalError::Timeout {
                    timeout,
                    waiting_for: "connecting to the executor".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // One connection per process: nobody else may connect.
        drop(listener);
        let _ = std::fs::remove_file(&socket);
        let stream = match accepted.and_then(|s| {
            s.set_nonblocking(false)
                .map(|_| s)
                .map_err(|e| ExternalError::Io(format!("socket: {e}")))
        }) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut p = Process {
            child,
            stream,
            stderr,
            stderr_done,
            timeout,
        };
        match p.receive(deadline, "waiting for hello") {
            Ok(FromLearner::Hello { version }) if version == CLIENT_API_VERSION => Ok(p),
            Ok(FromLearner::Hello { version }) => {
                p.kill();
                Err(ExternalError::Malformed(format!(
                    "it speaks Client API version {version}, this executor speaks {CLIENT_API_VERSION}"
                )))
            }
            Ok(other) => {
                p.kill();
                Err(ExternalError::Malformed(format!("expected hello, got {other:?}")))
            }
            Err(e) => {
                p.kill();
                Err(e)
            }
        }
    }

    /// Runs one task in the process: writes the input model, sends the task, waits for the
    /// answer and reads the output model. Any failure of the process ends it.
    fn exchange(&mut self, input: Option<&Model>, ctx: &TaskContext) -> Result<Reply, ExternalError> {
        let round_dir = self.work_dir()?.join(format!("round-{}", ctx.round));
        std::fs::create_dir_all(&round_dir).map_err(|e| ExternalError::Io(format!("{}: {e}", round_dir.display())))?;
        let prefix = match ctx.task.name() {
            "train" => String::new(),
            t => format!(
                "{}-",
                t.chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' })
                    .collect::<String>()
            ),
        };
        let input_path = round_dir.join(format!("{prefix}input.safetensors"));
        let output_path = round_dir.join(format!("{prefix}output.safetensors"));
        let _ = std::fs::remove_file(&output_path);
        if let Some(m) = input {
            m.save(&input_path).map_err(|e| ExternalError::Io(e.to_string()))?;
        }
        // A process that ended between tasks (e.g. a script that serves one task and
        // returns) is replaced without failing the task.
        if let Some(mut p) = self.process.take() {
            match p.child.try_wait() {
                Ok(None) => self.process = Some(p),
                status => {
                    tracing::info!(job = %ctx.job, round = ctx.round, member = %self.cfg.member, ?status,
                        "learner process ended between tasks; starting a new one");
                    p.kill();
                }
            }
        }
        let (mut process, reused) = match self.process.take() {
            Some(p) => (p, true),
            None => (self.start(ctx)?, false),
        };
        let total_rounds = match ctx.props.get("total_rounds") {
            Some(Value::Int(n)) => u32::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        let task = ToLearner::Task {
            task: ctx.task.name().to_owned(),
            round: ctx.round,
            total_rounds,
            job: ctx.job.0.clone(),
            member: self.cfg.member.clone(),
            input_path: input.map(|_| input_path.to_string_lossy().into_owned()),
            output_path: output_path.to_string_lossy().into_owned(),
            meta: ctx
                .props
                .iter()
                .map(|(k, v)| (k.clone(), MetaValue::from(v.clone())))
                .collect(),
        };
        let deadline = Instant::now() + self.cfg.task_timeout;
        let waiting_for = format!("the answer to task {:?} of round {}", ctx.task.name(), ctx.round);
        let mut answer = process
            .send(&task)
            .and_then(|_| process.receive(deadline, &waiting_for));
        // A kept process that exits cleanly instead of answering was done (it returned after
        // its last task just as this one was sent): a fresh process gets the task once more.
        if reused && matches!(&answer, Err(ExternalError::Exited { code: Some(0), .. })) {
            process.kill();
            process = self.start(ctx)?;
            let deadline = Instant::now() + self.cfg.task_timeout;
            answer = process
                .send(&task)
                .and_then(|_| process.receive(deadline, &waiting_for));
        }
        match answer {
            Err(e) => {
                process.kill();
                Err(e)
            }
            Ok(FromLearner::Error { message }) => {
                self.process = Some(process);
                Err(ExternalError::Learner(message))
            }
            Ok(FromLearner::Hello { .. }) => {
                process.kill();
                Err(ExternalError::Malformed("a second hello during a task".into()))
            }
            Ok(FromLearner::Result {
                output_path: out,
                params_type,
                metrics,
                num_samples,
                meta,
            }) => {
                self.process = Some(process);
                let model = match out {
                    Some(p) => {
                        let p = PathBuf::from(p);
                        let m = Model::load(&p).map_err(|e| ExternalError::Output(e.to_string()))?;
                        let _ = std::fs::remove_file(&p);
                        Some(match (params_type, input) {
                            (ResultParams::Full, _) => m,
                            (ResultParams::Diff, Some(base)) => {
                                base.add_diff(&m).map_err(|e| ExternalError::Output(e.to_string()))?
                            }
                            (ResultParams::Diff, None) => {
                                return Err(ExternalError::Output("a DIFF result for a task without input".into()));
                            }
                        })
                    }
                    None => None,
                };
                let _ = std::fs::remove_file(&input_path);
                Ok(Reply {
                    model,
                    metrics,
                    num_samples: num_samples.unwrap_or(1),
                    meta: meta.into_iter().map(|(k, v)| (k, Value::from(v))).collect(),
                })
            }
        }
    }

    fn run(&mut self, input: Option<&Model>, ctx: &TaskContext) -> Result<Reply, String> {
        self.exchange(input, ctx).map_err(|e| {
            tracing::warn!(job = %ctx.job, round = ctx.round, member = %self.cfg.member, task = %ctx.task,
                error = %e, "external learner task failed");
            e.to_string()
        })
    }
}

/// Whether `out` has exactly the tensors (names, dtypes, shapes) of `input`.
fn same_architecture(input: &Model, out: &Model) -> Result<(), String> {
    for (name, t) in input.iter() {
        let o = out
            .get(name)
            .ok_or_else(|| format!("tensor {name:?} of the input is missing"))?;
        if o.dtype() != t.dtype() || o.shape() != t.shape() {
            return Err(format!(
                "tensor {name:?} is {:?} {:?}, the input's is {:?} {:?}",
                o.dtype(),
                o.shape(),
                t.dtype(),
                t.shape()
            ));
        }
    }
    if let Some((name, _)) = out.iter().find(|(n, _)| input.get(n).is_none()) {
        return Err(format!("tensor {name:?} is not in the input"));
    }
    Ok(())
}

impl Learner for ExternalLearner {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let reply = self.run(Some(&global), ctx)?;
        let model = reply
            .model
            .ok_or("output model: the learner process sent no model for a train task")?;
        same_architecture(&global, &model).map_err(|e| format!("output model does not fit the input: {e}"))?;
        self.last = Some(model.clone());
        Ok(TrainOutput {
            model,
            num_samples: reply.num_samples,
            metrics: reply.metrics,
        })
    }

    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        Ok(self.run(Some(model), ctx)?.metrics)
    }

    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        let reply = self.run(input.as_ref(), ctx)?;
        Ok(TaskReply {
            model: reply.model,
            num_samples: reply.num_samples,
            metrics: reply.metrics,
            values: reply.meta,
        })
    }

    fn local_model(&self) -> Option<Model> {
        self.last.clone()
    }
}

impl Drop for ExternalLearner {
    /// Stops the process on a thread of its own, so dropping never blocks an async runtime.
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            let (grace, member) = (self.cfg.stop_grace, self.cfg.member.clone());
            std::thread::spawn(move || p.stop(grace, &member));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::ctl::{JobId, TaskKind};
    use flare_protocols::model::Tensor;

    fn ctx(task: TaskKind, round: u32) -> TaskContext {
        TaskContext {
            job: JobId("unit".into()),
            member: "site-x".into(),
            task,
            round,
            props: BTreeMap::from([("total_rounds".to_owned(), Value::Int(3))]),
        }
    }

    fn model() -> Model {
        Model::from_tensors([
            (
                "w",
                Tensor::from_f32(vec![2, 3], &[0.5, -1.25, 2.0, 3.0, 4.0, -7.5]).expect("t"),
            ),
            ("b", Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).expect("t")),
        ])
    }

    fn python_ok() -> bool {
        let ok = Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: python3 is not available");
        }
        ok
    }

    fn learner(dir: &std::path::Path, command: &[&str]) -> ExternalLearner {
        let mut cfg = ExternalConfig::new(command.iter().map(|s| s.to_string()).collect(), dir.join("w"), "site-x");
        cfg.task_timeout = Duration::from_secs(20);
        cfg.stop_grace = Duration::from_secs(5);
        let pkg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
        cfg.env.insert("PYTHONPATH".into(), pkg.to_string_lossy().into_owned());
        ExternalLearner::new(cfg).expect("learner")
    }

    #[test]
    fn external_python_add_one_keeps_one_process_and_stops() {
        if !python_ok() {
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/examples/add_one.py");
        let mut l = learner(dir.path(), &["python3", script.to_str().expect("utf-8")]);
        let mut m = model();
        let out = l.train(m.clone(), &ctx(TaskKind::Train, 0)).expect("train");
        let pid = l.pid().expect("running");
        m.map_f32(|v| v + 1.0);
        assert!(out.model == m, "{:?}", out.model.f32("w"));
        assert_eq!(out.num_samples, 7);
        let out = l.train(out.model, &ctx(TaskKind::Train, 1)).expect("train again");
        m.map_f32(|v| v + 1.0);
        assert!(out.model == m);
        assert_eq!(l.pid(), Some(pid), "one process serves every task");
        assert_eq!(
            l.validate(&m, &ctx(TaskKind::Validate, 1)).expect("validate")["round"],
            1.0
        );
        assert!(l.local_model() == Some(m));
        l.stop();
        assert!(l.pid().is_none());
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process is gone"
        );
    }

    #[test]
    fn external_spawn_failure_and_early_exit_are_clear() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut l = learner(dir.path(), &["/nonexistent/learner-program"]);
        let e = l.train(model(), &ctx(TaskKind::Train, 0)).expect_err("no program");
        assert!(e.contains("cannot start learner process"), "{e}");
        let mut l = learner(dir.path(), &["sh", "-c", "echo first >&2; echo oops >&2; exit 3"]);
        let e = l.train(model(), &ctx(TaskKind::Train, 0)).expect_err("exits");
        assert!(e.contains("exited with status 3") && e.contains("first | oops"), "{e}");
        assert!(ExternalLearner::new(ExternalConfig::new(vec![], dir.path(), "x")).is_err());
    }

    #[test]
    fn external_oversize_and_wrong_architecture_are_refused() {
        if !python_ok() {
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let big = "import os, socket; s = socket.socket(socket.AF_UNIX); \
                   s.connect(os.environ['FLARE_CLIENT_SOCKET']); s.sendall(b'\\xff\\xff\\xff\\xff'); \
                   import time; time.sleep(30)";
        let mut l = learner(dir.path(), &["python3", "-c", big]);
        let e = l.train(model(), &ctx(TaskKind::Train, 0)).expect_err("oversize");
        assert!(e.contains("malformed message") && e.contains("exceeds the cap"), "{e}");
        assert!(l.pid().is_none());
        let shrink = "import flare_client as flare\n\
                      m = flare.receive()\n\
                      flare.send(flare.FLModel(params={'w': flare.Tensor([1], 'F32', [1.0])}))\n\
                      m = flare.receive()\n\
                      flare.send_error('no data here')\n\
                      flare.receive()\n";
        let mut l = learner(dir.path(), &["python3", "-c", shrink]);
        let e = l.train(model(), &ctx(TaskKind::Train, 0)).expect_err("wrong shape");
        assert!(e.contains("does not fit the input"), "{e}");
        let e = l.train(model(), &ctx(TaskKind::Train, 1)).expect_err("learner error");
        assert_eq!(e, "learner process reported an error: no data here");
        // A script that serves one task and returns: each task gets a new process.
        let once = "import flare_client as flare\n\
                    m = flare.receive()\n\
                    flare.send(flare.FLModel(params={k: v + 1.0 for k, v in m.params.items()}))\n";
        let mut l = learner(dir.path(), &["python3", "-c", once]);
        let mut m = model();
        for round in 0..3 {
            m = l
                .train(m, &ctx(TaskKind::Train, round))
                .expect("one task per process")
                .model;
        }
        let mut expected = model();
        (0..3).for_each(|_| expected.map_f32(|v| v + 1.0));
        assert!(m == expected);
    }
}
