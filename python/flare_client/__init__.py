"""flare_client: the Client API for flare-node external learners.

A script that a flare-node executor starts (a topology names it as a learner command, e.g.
``command = ["python3", "train.py"]``) receives the global model, trains, and sends its result.
It is NVIDIA FLARE's Client API: a script written for ``nvflare.client`` runs with its import
changed::

    import flare_client as flare          # was: import nvflare.client as flare

    flare.init(model=net)                 # net answers the job's init_model task, if asked
    while flare.is_running():
        input_model = flare.receive()
        net.load_state_dict(input_model.params)          # torch tensors when the script uses torch
        steps = train(net)                               # train here
        flare.send(flare.FLModel(params=net.cpu().state_dict(), metrics={"loss": 0.1},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))

``model.params`` holds the tensors of the script's framework: ``torch.Tensor`` (CPU, the
model file's dtype) when the script has imported torch before the first ``receive``, else numpy
arrays when numpy is importable, else :class:`Tensor` objects (``shape``, ``dtype``,
``values``: a flat ``array.array``; they support ``+ - * /``). ``flare.init(framework=...)``
chooses explicitly: ``"pytorch"``, ``"numpy"`` or ``"raw"``. ``flare.send`` accepts torch
tensors, numpy arrays and :class:`Tensor` objects, whatever the framework.

The aggregation weight is ``meta["NUM_STEPS_CURRENT_ROUND"]`` (as NVIDIA FLARE's FedAvg
weighs) or ``meta["num_samples"]`` (preferred when both are given), 1 if absent.
``params_type=ParamsType.DIFF`` sends the difference from the received model; the executor adds
it to the model it sent (it keeps its own copy, so editing the received params in place does
not matter), and the workflow aggregates whole models.

A job whose topology says ``[model] from = "MEMBER"`` takes its initial parameters from that
member's script: before round 0 the executor sends it an ``init_model`` task, which
:func:`receive` answers itself with the state_dict of the model given to ``init(model=...)`` or
:func:`set_initial_model` (an error, saying so, when none was given), then it returns the next
task: the script's loop never sees ``init_model``. ``import flare_client.lightning as flare``
adds ``patch(trainer)`` for PyTorch Lightning.

Install with ``pip install ./python`` (building needs setuptools and wheel, fetched by pip
unless ``--no-build-isolation`` finds them installed), or put ``python/`` on ``PYTHONPATH``.
No dependencies; ``pip install ./python[numpy]`` brings numpy and the ``safetensors`` package,
which then reads and writes the model files, and ``pip install ./python[torch]`` adds torch.

The wire protocol (CBOR messages over the Unix socket named by ``FLARE_CLIENT_SOCKET``, models
as safetensors files) is specified in flare-node's ``protocols/src/client_api.rs``.
"""

import enum
import os
import socket
import struct
import sys

from . import cbor
from .tensors import (FRAMEWORKS, HAS_NUMPY, Tensor, detect_framework, load as load_safetensors,
                      save as save_safetensors)

__all__ = [
    "FLModel", "FLMetaKey", "ParamsType", "Tensor", "HAS_NUMPY", "FRAMEWORKS", "init", "receive", "send",
    "send_error", "is_running", "system_info", "get_site_name", "get_job_id", "get_task_name", "get_framework",
    "is_train", "is_evaluate", "is_submit_model", "load_safetensors", "save_safetensors", "set_initial_model",
]

CLIENT_API_VERSION = 1
MAX_MESSAGE = 1 << 20
TASK_INIT_MODEL = "init_model"
"""The task asking for the job's initial parameters, answered by :func:`receive` itself."""


class ParamsType(str, enum.Enum):
    """Whether ``FLModel.params`` holds whole parameters or a difference from the received ones."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLMetaKey:
    """Keys of ``FLModel.meta``, as NVIDIA FLARE names them."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    """In a sent model: the aggregation weight (steps or samples behind the result)."""
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"


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
    def __init__(self, framework=None):
        self.framework = framework  # None: detected at each receive
        path = os.environ.get("FLARE_CLIENT_SOCKET")
        if not path:
            raise RuntimeError("FLARE_CLIENT_SOCKET is not set: this script must be started by a flare-node executor")
        self.job = os.environ.get("FLARE_JOB", "")
        self.member = os.environ.get("FLARE_MEMBER", "")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.running = True
        self.task = None       # the task receive() returned, until it is answered
        self.pending = None    # a task is_running() read ahead, for the next receive()
        self.initial_model = None  # what answers init_model: see set_initial_model()
        self.loop_checks = 0   # how many times is_running() was called (flare_client.lightning reads it)
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

    def _next_task(self):
        """Reads the next task; None (and no longer running) when the job is over."""
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
            return None
        return msg

    def is_running(self):
        # As in NVIDIA FLARE, is_running() waits for the next task when none is at hand, so
        # that `while is_running(): model = receive()` never gets None from receive(). An
        # init_model task read ahead here is left for receive() to answer: a Lightning script
        # registers its module only when the Trainer first calls back.
        self.loop_checks += 1
        if self.running and self.task is None and self.pending is None:
            self.pending = self._next_task()
        return self.running

    def receive(self):
        while True:
            if not self.running:
                self.task = None
                return None
            msg, self.pending = self.pending, None
            if msg is None:
                msg = self._next_task()
            if msg is not None and msg.get("task") == TASK_INIT_MODEL:
                self._answer_init_model(msg)  # never the script's business: answer, read on
                continue
            break
        self.task = msg
        if msg is None:
            return None
        framework = self.framework or detect_framework()
        params = load_safetensors(msg["input_path"], framework) if msg.get("input_path") else None
        total = msg.get("total_rounds") or None  # 0: the workflow does not say
        meta = {FLMetaKey.JOB_ID: msg.get("job", self.job), FLMetaKey.SITE_NAME: msg.get("member", self.member),
                FLMetaKey.CURRENT_ROUND: msg.get("round", 0)}
        if total is not None:
            meta[FLMetaKey.TOTAL_ROUNDS] = total
        meta.update(msg.get("meta") or {})
        return FLModel(params=params, params_type=ParamsType.FULL, current_round=msg.get("round", 0),
                       total_rounds=total, meta=meta)

    def send(self, model):
        task = self.task
        if task is None:
            raise RuntimeError("send() without a task: call receive() first")
        params_type = ParamsType(model.params_type or ParamsType.FULL)
        out_path = None
        if model.params:
            if params_type == ParamsType.DIFF and not task.get("input_path"):
                raise ValueError("params_type DIFF needs a received model to be a difference from; "
                                 "this task (%r) had none" % task.get("task"))
            out_path = task["output_path"]
            save_safetensors(model.params, out_path)
        meta = model.meta or {}
        num_samples = meta.get("num_samples", meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND, 1))
        try:
            num_samples = max(int(num_samples), 0)
        except (TypeError, ValueError):
            raise ValueError("meta num_samples / NUM_STEPS_CURRENT_ROUND must be a number, not %r"
                             % (num_samples,)) from None
        self._send_msg({
            "type": "result",
            "output_path": out_path,
            "params_type": params_type.value,
            "metrics": {str(k): float(v) for k, v in (model.metrics or {}).items()},
            "num_samples": num_samples,
            "meta": {str(k): v for k, v in meta.items() if _scalar(v)},
        })
        self.task = None

    def send_error(self, message):
        if self.task is None:
            raise RuntimeError("send_error() without a task: call receive() first")
        self._send_msg({"type": "error", "message": str(message)})
        self.task = None

    def _answer_init_model(self, msg):
        """Answers an init_model task from the registered model: its params written to the
        task's output path as FULL params, or an error saying what the script must do."""
        try:
            if self.initial_model is None:
                raise _NoInitialModel(
                    "this job takes its initial model from this site ([model] from = \"%s\"), but the script "
                    "registered none: call flare.init(model=net) (or flare.set_initial_model(net)) before the "
                    "first flare.receive()" % msg.get("member", self.member))
            params = _initial_params(self.initial_model)
            out_path = msg["output_path"]
            save_safetensors(params, out_path)
        except Exception as e:  # the controller fails the job with this text
            text = str(e) if isinstance(e, _NoInitialModel) else "init_model: %s: %s" % (type(e).__name__, e)
            print("flare_client: %s" % text, file=sys.stderr)
            self._send_msg({"type": "error", "message": text})
            return
        self._send_msg({"type": "result", "output_path": out_path, "params_type": ParamsType.FULL.value,
                        "metrics": {}, "num_samples": 0, "meta": {}})


class _NoInitialModel(Exception):
    pass


def _check_initial_model(model):
    """``model`` if it can answer init_model (an object with ``state_dict()``, a dict of
    tensors, or a callable returning one), else a TypeError."""
    if model is None or callable(getattr(model, "state_dict", None)) or isinstance(model, dict) or callable(model):
        return model
    raise TypeError("the initial model must be an object with state_dict() (a torch nn.Module), a dict of "
                    "tensors, or a callable returning one, not a %s" % type(model).__name__)


_FLOAT_DTYPES = ("float32", "float64", "F32", "F64")


def _initial_params(model):
    """The registered initial model's params ``{name: tensor}``, all float32 or float64 (what
    flare-node averages; anything else is refused here, naming the tensor)."""
    if callable(getattr(model, "state_dict", None)):
        params = model.state_dict()
    elif isinstance(model, dict):
        params = model
    else:
        params = model()
        if callable(getattr(params, "state_dict", None)):
            params = params.state_dict()
    if not isinstance(params, dict) or not params:
        raise ValueError("the initial model gave %s, not a non-empty dict of tensors"
                         % ("an empty dict" if isinstance(params, dict) else "a %s" % type(params).__name__))
    for name, t in params.items():
        dtype = getattr(t, "dtype", None)
        dtype = str(getattr(dtype, "name", dtype)).replace("torch.", "")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError("initial param %r is %s: flare-node averages float32 and float64 tensors only "
                             "(leave integer buffers such as BatchNorm's num_batches_tracked out of the model)"
                             % (name, dtype))
    return params


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


def init(rank=None, config_file=None, framework=None, model=None, **kwargs):
    """Connects to the executor (done on first use if not called).

    ``model`` answers the job's ``init_model`` task (see :func:`set_initial_model`); ``None``
    leaves the model registered before, if any.

    ``framework`` says what ``FLModel.params`` holds on receive: ``"pytorch"`` (``torch.Tensor``),
    ``"numpy"`` (``numpy.ndarray``) or ``"raw"`` (:class:`Tensor`); ``None`` (the default)
    detects at each receive: pytorch when the script has imported torch, else numpy when it is
    importable, else raw. ``rank`` and ``config_file`` are accepted for NVIDIA FLARE
    compatibility and ignored."""
    if framework is not None:
        if framework not in FRAMEWORKS:
            raise ValueError("framework must be one of %s, not %r" % (", ".join(FRAMEWORKS), framework))
        if framework == "numpy" and not HAS_NUMPY:
            raise ImportError("framework 'numpy' needs numpy: pip install './python[numpy]'")
        if framework == "pytorch":
            from .tensors import _torch
            _torch()
    _check_initial_model(model)
    c = _get()
    c.framework = framework
    if model is not None:
        c.initial_model = model


def set_initial_model(model):
    """Registers what answers the job's ``init_model`` task, the controller's request for the
    job's initial parameters before round 0 when the job says ``[model] from = "THIS_MEMBER"``:
    an object with ``state_dict()`` (a torch ``nn.Module``, a ``LightningModule``), a dict of
    tensors (torch, numpy or :class:`Tensor`), or a zero-argument callable returning one. It is
    read when the task comes (in :func:`receive`, which answers it and returns the next task),
    so a module registered early sends the parameters it has then. Tensors must be float32 or
    float64. ``None`` unregisters."""
    _get().initial_model = _check_initial_model(model)


def receive(timeout=None):
    """Waits for the next task and returns its model as an :class:`FLModel`; ``None`` when the
    job is over (the executor said stop or went away). An ``init_model`` task is answered here
    from the model registered with :func:`init` or :func:`set_initial_model` (an error goes to
    the controller when there is none), and the next task is returned."""
    return _get().receive()


def send(model, clear_cache=True):
    """Answers the current task with ``model`` (params written as a safetensors file)."""
    _get().send(model)


def send_error(message):
    """Fails the current task with ``message`` (the process keeps running)."""
    _get().send_error(message)


def is_running():
    """Whether the job goes on. As in NVIDIA FLARE, it waits for the next task when none is at
    hand (the one :func:`receive` then returns), and is False once the job is over."""
    return _get().is_running()


def get_framework():
    """The framework of received params: the one given to :func:`init`, else what would be
    detected now."""
    return _get().framework or detect_framework()


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
