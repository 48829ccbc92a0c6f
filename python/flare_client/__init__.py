"""flare_client: the Client API for flare-node external learners.

A script that a flare-node executor starts (a topology names it as a learner command, e.g.
``command = ["python3", "train.py"]``) receives the global model, trains, and sends its result::

    import flare_client as flare          # was: import nvflare.client as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()            # None once the job stops
        if model is None:
            break
        params = {k: v + 1.0 for k, v in model.params.items()}   # train here
        flare.send(flare.FLModel(params=params, metrics={"loss": 0.1},
                                 meta={"num_samples": 100}))

``model.params`` maps names to numpy arrays when numpy is importable, else to
:class:`Tensor` objects (``shape``, ``dtype``, ``values``: a flat ``array.array``; they support
``+ - * /``). ``flare.send`` accepts numpy arrays, :class:`Tensor` objects or torch tensors.
The aggregation weight is ``meta["num_samples"]`` (or ``meta["NUM_STEPS_CURRENT_ROUND"]``),
1 if absent. ``params_type=ParamsType.DIFF`` sends the difference from the received model.

Install with ``pip install ./python`` (building needs setuptools and wheel, fetched by pip
unless ``--no-build-isolation`` finds them installed), or put ``python/`` on ``PYTHONPATH``.
No dependencies; numpy is optional, and ``pip install ./python[numpy]`` brings numpy and the
``safetensors`` package, which then reads and writes the model files.

The wire protocol (CBOR messages over the Unix socket named by ``FLARE_CLIENT_SOCKET``, models
as safetensors files) is specified in flare-node's ``protocols/src/client_api.rs``.
"""

import enum
import os
import socket
import struct
import sys

from . import cbor
from .tensors import HAS_NUMPY, Tensor, load as load_safetensors, save as save_safetensors

__all__ = [
    "FLModel", "ParamsType", "Tensor", "HAS_NUMPY", "init", "receive", "send", "send_error", "is_running",
    "system_info", "get_site_name", "get_job_id", "get_task_name", "is_train", "is_evaluate",
    "is_submit_model", "load_safetensors", "save_safetensors",
]

CLIENT_API_VERSION = 1
MAX_MESSAGE = 1 << 20


class ParamsType(str, enum.Enum):
    """Whether ``FLModel.params`` holds whole parameters or a difference from the received ones."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLModel:
    """A model and what travels with it, as in NVIDIA FLARE's Client API."""

    def __init__(self, params_type=ParamsType.FULL, params=None, optimizer_params=None, metrics=None,
                 start_round=0, current_round=None, total_rounds=None, meta=None):
        self.params_type = ParamsType(params_type) if params_type is not None else ParamsType.FULL
        self.params = params
        self.optimizer_params = optimizer_params
        self.metrics = metrics
        self.start_round = start_round
        self.current_round = current_round
        self.total_rounds = total_rounds
        self.meta = {} if meta is None else meta

    def __repr__(self):
        n = len(self.params) if self.params else 0
        return "FLModel(params=<%d tensors>, params_type=%s, metrics=%r, current_round=%r, total_rounds=%r, meta=%r)" % (
            n, self.params_type.value, self.metrics, self.current_round, self.total_rounds, self.meta)


class _Client:
    def __init__(self):
        path = os.environ.get("FLARE_CLIENT_SOCKET")
        if not path:
            raise RuntimeError("FLARE_CLIENT_SOCKET is not set: this script must be started by a flare-node executor")
        self.job = os.environ.get("FLARE_JOB", "")
        self.member = os.environ.get("FLARE_MEMBER", "")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.running = True
        self.task = None
        self._send_msg({"type": "hello", "version": CLIENT_API_VERSION})

    def _send_msg(self, msg):
        body = cbor.dumps(msg)
        if len(body) > MAX_MESSAGE:
            raise ValueError("message of %d bytes exceeds the %d-byte cap" % (len(body), MAX_MESSAGE))
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def receive(self):
        if not self.running:
            return None
        head = self._read_exact(4)
        if head is None:
            self.running = False  # the executor went away: stop quietly
            return None
        (n,) = struct.unpack(">I", head)
        if n > MAX_MESSAGE:
            raise ValueError("executor sent a message of %d bytes" % n)
        body = self._read_exact(n)
        if body is None:
            self.running = False
            return None
        msg = cbor.loads(body)
        if not isinstance(msg, dict) or msg.get("type") != "task":
            raise ValueError("unexpected message from the executor: %r" % (msg,))
        if msg.get("task") == "stop":
            self.running = False
            self.task = None
            return None
        self.task = msg
        params = load_safetensors(msg["input_path"]) if msg.get("input_path") else None
        meta = dict(msg.get("meta") or {})
        return FLModel(params=params, params_type=ParamsType.FULL, current_round=msg.get("round", 0),
                       total_rounds=msg.get("total_rounds", 0), meta=meta)

    def send(self, model):
        task = self.task
        if task is None:
            raise RuntimeError("send() without a task: call receive() first")
        out_path = None
        if model.params:
            out_path = task["output_path"]
            save_safetensors(model.params, out_path)
        meta = model.meta or {}
        num_samples = meta.get("num_samples", meta.get("NUM_STEPS_CURRENT_ROUND", 1))
        self._send_msg({
            "type": "result",
            "output_path": out_path,
            "params_type": ParamsType(model.params_type or ParamsType.FULL).value,
            "metrics": {str(k): float(v) for k, v in (model.metrics or {}).items()},
            "num_samples": max(int(num_samples), 0),
            "meta": {str(k): v for k, v in meta.items() if _scalar(v)},
        })
        self.task = None

    def send_error(self, message):
        if self.task is None:
            raise RuntimeError("send_error() without a task: call receive() first")
        self._send_msg({"type": "error", "message": str(message)})
        self.task = None


def _scalar(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 63) <= v < (1 << 63)
    return isinstance(v, (bool, float, str, bytes))


_client = None


def _get():
    global _client
    if _client is None:
        _client = _Client()
    return _client


def init(rank=None, config_file=None, **kwargs):
    """Connects to the executor (done on first use if not called); arguments are accepted for
    NVIDIA FLARE compatibility and ignored."""
    _get()


def receive(timeout=None):
    """Waits for the next task and returns its model as an :class:`FLModel`; ``None`` when the
    job is over (the executor said stop or went away)."""
    return _get().receive()


def send(model, clear_cache=True):
    """Answers the current task with ``model`` (params written as a safetensors file)."""
    _get().send(model)


def send_error(message):
    """Fails the current task with ``message`` (the process keeps running)."""
    _get().send_error(message)


def is_running():
    """Whether the job goes on (False once :func:`receive` has returned ``None``)."""
    return _get().running


def system_info():
    """The job and this site: ``{"site_name", "job_id", "work_dir"}``."""
    c = _get()
    return {"site_name": c.member, "job_id": c.job, "work_dir": os.environ.get("FLARE_WORK_DIR", "")}


def get_site_name():
    """This member's name."""
    return _get().member


def get_job_id():
    """The job's id."""
    return _get().job


def get_task_name():
    """The current task's name (``train``, ``validate``, ...), or None between tasks."""
    t = _get().task
    return t.get("task") if t else None


def is_train():
    """Whether the current task is a training task."""
    return get_task_name() == "train"


def is_evaluate():
    """Whether the current task asks for metrics of the received model."""
    return get_task_name() == "validate"


def is_submit_model():
    """Whether the current task asks for this site's model."""
    return get_task_name() == "submit_model"
