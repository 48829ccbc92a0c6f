//! The Client API protocol: how an executor talks to a learner running as a separate process
//! (a Python script, or any program), so that local training code in any language can take
//! part in a federated job.
//!
//! # Transport
//! The executor listens on a Unix domain socket in the member's work directory and starts the
//! learner process with these environment variables:
//!
//! ```text
//! FLARE_CLIENT_SOCKET   path of the socket to connect to
//! FLARE_JOB             the job id
//! FLARE_MEMBER          this member's name (the "site name")
//! FLARE_WORK_DIR        the member's work directory
//! FLARE_CLIENT_API      the protocol version the executor speaks (CLIENT_API_VERSION)
//! ```
//!
//! The process connects once and keeps the connection for its whole life; it may serve any
//! number of tasks.
//!
//! # Framing
//! ```text
//! message = length:u32be  cbor        (length <= MAX_CLIENT_MESSAGE = 1 MiB)
//! cbor    = one CBOR map (definite or indefinite length) with a text key "type"
//! ```
//! The cap is checked before allocating. Models never travel on the socket: they are
//! safetensors files in the work directory, named by path.
//!
//! # Messages
//! Keys are text; absent optional keys mean "none"; unknown keys are ignored.
//!
//! ```text
//! learner  -> executor  {"type": "hello",  "version": 1}
//! executor -> learner   {"type": "task",   "task": "train" | "validate" | "stop" | <other>,
//!                        "round": u32, "total_rounds": u32, "job": text, "member": text,
//!                        "input_path": text | null, "output_path": text, "meta": {text: scalar}}
//! learner  -> executor  {"type": "result", "output_path": text | null,
//!                        "params_type": "FULL" | "DIFF" (default FULL),
//!                        "metrics": {text: number}, "num_samples": uint | null,
//!                        "meta": {text: scalar}}
//! learner  -> executor  {"type": "error",  "message": text}
//! ```
//! `scalar` is a CBOR bool, integer, float, text or byte string.
//!
//! # Conversation
//! 1. The learner connects and sends `hello`.
//! 2. For each task the executor sends `task`. The input model (if any) is at `input_path`;
//!    the learner answers with exactly one `result` (its output model, if any, written as a
//!    safetensors file, preferably at `output_path`) or `error` (the task fails with that
//!    message).
//! 3. A `task` named `stop` asks the learner to exit; it sends nothing back.
//!
//! The executor fails a task when the process exits, does not answer within the task timeout
//! (it is then killed), or sends anything that is not a valid message; the next task starts a
//! fresh process.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::ctl::Value;

/// Protocol version sent in `hello`; a learner speaking another version is refused.
pub const CLIENT_API_VERSION: u32 = 1;
/// Largest message either side may send (models travel as files, so messages stay small).
pub const MAX_CLIENT_MESSAGE: u32 = 1 << 20;
/// Environment variable naming the socket the learner connects to.
pub const ENV_SOCKET: &str = "FLARE_CLIENT_SOCKET";
/// Environment variable naming the job.
pub const ENV_JOB: &str = "FLARE_JOB";
/// Environment variable naming the member (site).
pub const ENV_MEMBER: &str = "FLARE_MEMBER";
/// Environment variable naming the member's work directory.
pub const ENV_WORK_DIR: &str = "FLARE_WORK_DIR";
/// Environment variable carrying [`CLIENT_API_VERSION`].
pub const ENV_VERSION: &str = "FLARE_CLIENT_API";
/// The task name that asks the learner process to exit.
pub const TASK_STOP: &str = "stop";

/// A scalar in a message's `meta` map: plain CBOR (no enum tagging), so that any language's
/// CBOR library writes it naturally.
#[derive(Clone, PartialEq, Debug)]
pub enum MetaValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
}

impl Serialize for MetaValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MetaValue::Bool(b) => s.serialize_bool(*b),
            MetaValue::Int(i) => s.serialize_i64(*i),
            MetaValue::Float(f) => s.serialize_f64(*f),
            MetaValue::Str(t) => s.serialize_str(t),
            MetaValue::Bytes(b) => s.serialize_bytes(b),
        }
    }
}

impl<'de> Deserialize<'de> for MetaValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MetaValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a bool, integer, float, text or byte string")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<MetaValue, E> {
                Ok(MetaValue::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MetaValue, E> {
                Ok(MetaValue::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MetaValue, E> {
                i64::try_from(v)
                    .map(MetaValue::Int)
                    .map_err(|_| E::custom(format!("integer {v} is out of range")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<MetaValue, E> {
                Ok(MetaValue::Float(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MetaValue, E> {
                Ok(MetaValue::Str(v.to_owned()))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<MetaValue, E> {
                Ok(MetaValue::Bytes(v.to_vec()))
            }
        }
        d.deserialize_any(V)
    }
}

impl From<Value> for MetaValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Bool(b) => MetaValue::Bool(b),
            Value::Int(i) => MetaValue::Int(i),
            Value::Float(f) => MetaValue::Float(f),
            Value::Str(s) => MetaValue::Str(s),
            Value::Bytes(b) => MetaValue::Bytes(b),
        }
    }
}

impl From<MetaValue> for Value {
    fn from(v: MetaValue) -> Self {
        match v {
            MetaValue::Bool(b) => Value::Bool(b),
            MetaValue::Int(i) => Value::Int(i),
            MetaValue::Float(f) => Value::Float(f),
            MetaValue::Str(s) => Value::Str(s),
            MetaValue::Bytes(b) => Value::Bytes(b),
        }
    }
}

/// Whether a result's model is whole parameters or a difference from the task's input.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub enum ResultParams {
    /// Whole parameters.
    #[default]
    #[serde(rename = "FULL")]
    Full,
    /// The difference from the input model (added to it by the executor).
    #[serde(rename = "DIFF")]
    Diff,
}

/// What the executor sends to the learner process.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToLearner {
    /// Run a task (or, named [`TASK_STOP`], exit).
    Task {
        /// `train`, `validate`, `stop`, or a workflow-specific name.
        task: String,
        /// Workflow round, from 0.
        round: u32,
        /// Rounds in the job (0 when the workflow does not say).
        total_rounds: u32,
        /// The job.
        job: String,
        /// This member's name.
        member: String,
        /// The input model's safetensors file, if the task has one.
        #[serde(default)]
        input_path: Option<String>,
        /// Where the learner should write its output model.
        output_path: String,
        /// The task's properties.
        #[serde(default)]
        meta: BTreeMap<String, MetaValue>,
    },
}

/// What the learner process sends to the executor.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromLearner {
    /// First message after connecting.
    Hello {
        /// The protocol version the learner speaks.
        version: u32,
    },
    /// A finished task.
    Result {
        /// The output model's safetensors file (required for `train`).
        #[serde(default)]
        output_path: Option<String>,
        /// Whether the output is whole parameters or a difference.
        #[serde(default)]
        params_type: ResultParams,
        /// Named metrics (loss, accuracy, ...).
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
        /// Samples behind the output (the aggregation weight); none means 1.
        #[serde(default)]
        num_samples: Option<u64>,
        /// Anything else the learner reports.
        #[serde(default)]
        meta: BTreeMap<String, MetaValue>,
    },
    /// The task failed in the learner; the message says why.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Why a Client API message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClientApiError {
    /// The announced or encoded length exceeds [`MAX_CLIENT_MESSAGE`].
    #[error("message of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// The length.
        len: u64,
        /// The cap.
        max: u32,
    },
    /// The bytes are not a valid message.
    #[error("not a valid message: {0}")]
    Malformed(String),
    /// The stream ended or failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included); refuses one over the cap.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ClientApiError> {
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(msg, &mut buf).map_err(|e| ClientApiError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_CLIENT_MESSAGE as usize {
        return Err(ClientApiError::TooLarge {
            len: len as u64,
            max: MAX_CLIENT_MESSAGE,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// The body length a frame's 4-byte prefix announces, checked against the cap.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ClientApiError> {
    let len = u32::from_be_bytes(prefix);
    if len > MAX_CLIENT_MESSAGE {
        return Err(ClientApiError::TooLarge {
            len: len.into(),
            max: MAX_CLIENT_MESSAGE,
        });
    }
    Ok(len as usize)
}

/// Decodes one frame's body; trailing bytes after the CBOR item are an error.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientApiError> {
    let mut rest = body;
    let v = ciborium::from_reader(&mut rest).map_err(|e| ClientApiError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ClientApiError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(v)
}

/// Reads one whole frame from a blocking reader (no timeout: for learners and tests; the
/// executor reads with its own deadline).
pub fn read<T: serde::de::DeserializeOwned, R: Read>(r: &mut R) -> Result<T, ClientApiError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let mut body = vec![0u8; body_len(prefix)?];
    r.read_exact(&mut body)?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> impl Strategy<Value = BTreeMap<String, MetaValue>> {
        let v = prop_oneof![
            any::<bool>().prop_map(MetaValue::Bool),
            any::<i64>().prop_map(MetaValue::Int),
            (-1e9f64..1e9).prop_map(MetaValue::Float),
            ".{0,12}".prop_map(MetaValue::Str),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(MetaValue::Bytes),
        ];
        proptest::collection::btree_map(".{0,6}", v, 0..4)
    }

    fn to_learner() -> impl Strategy<Value = ToLearner> {
        (
            ".{0,8}",
            any::<u32>(),
            any::<u32>(),
            ".{0,8}",
            ".{0,8}",
            proptest::option::of(".{0,20}"),
            ".{0,20}",
            meta(),
        )
            .prop_map(
                |(task, round, total_rounds, job, member, input_path, output_path, meta)| ToLearner::Task {
                    task,
                    round,
                    total_rounds,
                    job,
                    member,
                    input_path,
                    output_path,
                    meta,
                },
            )
    }

    fn from_learner() -> impl Strategy<Value = FromLearner> {
        prop_oneof![
            any::<u32>().prop_map(|version| FromLearner::Hello { version }),
            (
                proptest::option::of(".{0,20}"),
                any::<bool>(),
                proptest::collection::btree_map(".{0,6}", -1e6f64..1e6, 0..4),
                proptest::option::of(any::<u64>()),
                meta()
            )
                .prop_map(|(output_path, diff, metrics, num_samples, meta)| FromLearner::Result {
                    output_path,
                    params_type: if diff { ResultParams::Diff } else { ResultParams::Full },
                    metrics,
                    num_samples,
                    meta,
                }),
            ".{0,30}".prop_map(|message| FromLearner::Error { message }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(a in to_learner(), b in from_learner()) {
            let fa = encode(&a).expect("encode");
            prop_assert_eq!(read::<ToLearner, _>(&mut fa.as_slice()).expect("read"), a);
            let fb = encode(&b).expect("encode");
            prop_assert_eq!(read::<FromLearner, _>(&mut fb.as_slice()).expect("read"), b);
        }

        #[test]
        fn truncated_messages_are_errors(b in from_learner(), cut in 0usize..1000) {
            let f = encode(&b).expect("encode");
            let cut = cut % f.len();
            prop_assert!(read::<FromLearner, _>(&mut &f[..cut]).is_err());
        }

        #[test]
        fn garbage_is_a_typed_error(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Random bytes are (almost always) refused, and never panic.
            let _ = decode::<FromLearner>(&body);
            let mut framed = (body.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&body);
            let _ = read::<FromLearner, _>(&mut framed.as_slice());
        }
    }

    #[test]
    fn oversize_frames_are_refused_before_allocating() {
        let mut big = (MAX_CLIENT_MESSAGE + 1).to_be_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        let e = read::<FromLearner, _>(&mut big.as_slice()).expect_err("big");
        assert!(matches!(e, ClientApiError::TooLarge { .. }), "{e}");
        let huge = FromLearner::Error {
            message: "x".repeat(MAX_CLIENT_MESSAGE as usize),
        };
        assert!(matches!(encode(&huge), Err(ClientApiError::TooLarge { .. })));
    }

    #[test]
    fn plain_cbor_from_other_languages_decodes() {
        // {"type": "result", "metrics": {"acc": 1}, "num_samples": 5, "extra": null}
        // written by hand: integer metric, unknown key, absent optional keys.
        let mut body = vec![0xa4];
        for (k, v) in [
            (&b"type"[..], &b"\x66result"[..]),
            (b"metrics", b"\xa1\x63acc\x01"),
            (b"num_samples", b"\x05"),
            (b"extra", b"\xf6"),
        ] {
            body.push(0x60 + k.len() as u8);
            body.extend_from_slice(k);
            body.extend_from_slice(v);
        }
        let m: FromLearner = decode(&body).expect("decode");
        assert_eq!(
            m,
            FromLearner::Result {
                output_path: None,
                params_type: ResultParams::Full,
                metrics: BTreeMap::from([("acc".to_owned(), 1.0)]),
                num_samples: Some(5),
                meta: BTreeMap::new(),
            }
        );
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<FromLearner>(&trailing),
            Err(ClientApiError::Malformed(_))
        ));
        assert!(matches!(
            decode::<FromLearner>(b"\xa1\x64type\x64nope"),
            Err(ClientApiError::Malformed(_))
        ));
    }
}
