"""Tests of flare_client's Client API against a fake executor (a Unix socket speaking the
protocol of flare-node's ``protocols/src/client_api.rs``): the framework of received params
(torch, numpy, raw), ``load_state_dict`` / ``state_dict`` round trips, DIFF results, the
aggregation weight, rounds and names, and NVIDIA FLARE's ``while is_running(): receive()`` loop;
then a PyTorch script (``python/examples/digits_torch.py``) run end to end as a process.

Run with ``python3 -m unittest discover -s python/tests``; the numpy and torch cases are skipped
where those are not importable.
"""

import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REPO_DIR = os.path.normpath(os.path.join(PYTHON_DIR, ".."))
sys.path.insert(0, PYTHON_DIR)

import flare_client as flare  # noqa: E402
from flare_client import cbor, tensors  # noqa: E402

np = tensors._np
try:
    import torch
except ImportError:
    torch = None


class FakeExecutor:
    """The executor's end of the socket, in the test's thread (messages are small enough for
    the socket buffers). ``client()`` makes a flare_client ``_Client`` connected to it."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "client.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.conn = None
        self.n = 0
        self.clients = []

    def env(self):
        return {"FLARE_CLIENT_SOCKET": self.path, "FLARE_JOB": "job-7", "FLARE_MEMBER": "site-2",
                "FLARE_WORK_DIR": self.dir.name}

    def client(self, framework=None):
        with mock.patch.dict(os.environ, self.env()):
            c = flare._Client(framework)
        self.clients.append(c)
        self.accept()
        return c

    def accept(self):
        self.server.settimeout(60)
        self.conn, _ = self.server.accept()
        self.conn.settimeout(60)
        assert self.read() == {"type": "hello", "version": 1}

    def file(self, name):
        return os.path.join(self.dir.name, name)

    def task(self, params=None, task="train", round=0, total_rounds=3, meta=None):
        """Sends a task, its input written from ``params`` (any tensors) when given."""
        self.n += 1
        inp = None
        if params is not None:
            inp = self.file("input-%d.safetensors" % self.n)
            tensors.save(params, inp)
        msg = {"type": "task", "task": task, "round": round, "total_rounds": total_rounds, "job": "job-7",
               "member": "site-2", "input_path": inp, "output_path": self.file("output-%d.safetensors" % self.n),
               "meta": meta or {}}
        body = cbor.dumps(msg)
        self.conn.sendall(struct.pack(">I", len(body)) + body)

    def stop(self):
        body = cbor.dumps({"type": "task", "task": "stop", "round": 0, "total_rounds": 0, "job": "job-7",
                           "member": "site-2", "input_path": None, "output_path": "", "meta": {}})
        self.conn.sendall(struct.pack(">I", len(body)) + body)

    def read(self):
        head = self._exact(4)
        return cbor.loads(self._exact(struct.unpack(">I", head)[0]))

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.conn.recv(n - len(buf))
            if not chunk:
                raise EOFError("the learner closed the socket")
            buf += chunk
        return buf

    def close(self):
        for c in self.clients:
            c.sock.close()
        if self.conn is not None:
            self.conn.close()
        self.server.close()
        self.dir.cleanup()


def write_digits_csv(path, rows, seed=1, header=False):
    """Synthetic digits: 64 features in [0, 1], the label's tenth of them bright."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        if header:
            f.write(",".join(["f%d" % j for j in range(64)] + ["label"]) + "\n")
        for i in range(rows):
            label = i % 10
            feats = [1.0 if j % 10 == label else rng.random() * 0.2 for j in range(64)]
            f.write(",".join("%.3f" % v for v in feats) + ",%d\n" % label)


def run_digits_script(test, ex, script, env, rounds=2, steps=4, metrics=("accuracy", "train_loss")):
    """Runs ``python/examples/SCRIPT`` as the executor does (from the repository's root, with
    ``PYTHONPATH=python``) against ``ex``: init_model, ``rounds`` training rounds from the model
    it gave, a validate task and stop, checking each answer; then ``SCRIPT --evaluate`` on the
    last model and the training CSV. Returns the models (initial, then each round's) and the
    accuracy the evaluation printed."""
    env = dict(os.environ, **ex.env(), PYTHONPATH="python", OMP_NUM_THREADS="1", **env)
    path = os.path.join("python", "examples", script)
    proc = subprocess.Popen([sys.executable, path], cwd=REPO_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ex.accept()
        ex.task(None, task="init_model", round=0, total_rounds=rounds)
        msg = ex.read()
        test.assertEqual((msg["type"], msg["params_type"], msg["num_samples"]), ("result", "FULL", 0), msg)
        models = [tensors.load(msg["output_path"], "pytorch")]
        test.assertEqual({k: tuple(v.shape) for k, v in models[0].items()},
                         {"conv.weight": (8, 1, 3, 3), "conv.bias": (8,), "fc.weight": (10, 128), "fc.bias": (10,)})
        for rnd in range(rounds):
            ex.task(models[-1], round=rnd, total_rounds=rounds)
            msg = ex.read()
            test.assertEqual((msg["type"], msg["params_type"], msg["num_samples"]), ("result", "FULL", steps), msg)
            test.assertEqual(msg["meta"].get("NUM_STEPS_CURRENT_ROUND"), steps)
            for k in metrics:
                test.assertIn(k, msg["metrics"])
            out = tensors.load(msg["output_path"], "pytorch")
            test.assertEqual({k: (v.dtype, v.shape) for k, v in out.items()},
                             {k: (v.dtype, v.shape) for k, v in models[0].items()})
            test.assertFalse(torch.equal(out["fc.weight"], models[-1]["fc.weight"]))
            models.append(out)
        ex.task(models[-1], task="validate", round=rounds, total_rounds=rounds)
        msg = ex.read()
        test.assertEqual((msg["type"], msg["output_path"]), ("result", None), msg)
        for k in metrics:
            if k != "train_loss":
                test.assertIn(k, msg["metrics"])
        ex.stop()
        _, err = proc.communicate(timeout=120)
        test.assertEqual(proc.returncode, 0, err.decode(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    final = ex.file("final.safetensors")
    tensors.save(models[-1], final)
    done = subprocess.run([sys.executable, path, "--evaluate", final, env["DIGITS_CSV"]], cwd=REPO_DIR, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    test.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
    accuracy = json.loads(done.stdout.decode().strip().splitlines()[-1])["accuracy"]
    return models, accuracy


class Base(unittest.TestCase):
    def setUp(self):
        self.ex = FakeExecutor()
        self.addCleanup(self.ex.close)


class Detection(unittest.TestCase):
    def test_torch_imported_by_the_script_means_pytorch(self):
        with mock.patch.dict(sys.modules, {"torch": object()}):
            self.assertEqual(tensors.detect_framework(), "pytorch")

    def test_without_torch_numpy_when_importable_else_raw(self):
        with mock.patch.dict(sys.modules):
            sys.modules.pop("torch", None)
            self.assertEqual(tensors.detect_framework(), "numpy" if np is not None else "raw")
            with mock.patch.object(tensors, "_np", None):
                self.assertEqual(tensors.detect_framework(), "raw")

    def test_an_unknown_framework_is_refused(self):
        with self.assertRaises(ValueError):
            flare.init(framework="jax")
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(ValueError):
                tensors.load(os.path.join(d, "x"), "jax")


class Raw(Base):
    def test_raw_gives_tensor_objects_whatever_is_importable(self):
        c = self.ex.client("raw")
        self.ex.task({"w": tensors.Tensor([2], "F32", [1.0, 2.0])})
        m = c.receive()
        self.assertIsInstance(m.params["w"], tensors.Tensor)
        self.assertEqual(m.params["w"].values.tolist(), [1.0, 2.0])
        c.send(flare.FLModel(params={"w": m.params["w"] + 1.0}, meta={"num_samples": 7}))
        msg = self.ex.read()
        self.assertEqual((msg["type"], msg["params_type"], msg["num_samples"]), ("result", "FULL", 7))
        got = tensors.load(msg["output_path"], "raw")
        self.assertEqual(got["w"].values.tolist(), [2.0, 3.0])

    def test_nvflare_loop_never_receives_none_and_rounds_and_names_are_told(self):
        c = self.ex.client("raw")
        self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])}, round=0, total_rounds=2)
        seen = []
        while c.is_running():
            m = c.receive()  # NVIDIA FLARE scripts do not check for None
            seen.append((m.current_round, m.total_rounds, m.meta["job_id"], m.meta["site_name"],
                         m.meta[flare.FLMetaKey.CURRENT_ROUND]))
            c.send(flare.FLModel(params=m.params, meta={"NUM_STEPS_CURRENT_ROUND": 5}))
            self.assertEqual(self.ex.read()["num_samples"], 5)
            if m.current_round == 0:
                self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])}, round=1, total_rounds=0)
            else:
                self.ex.stop()
        self.assertEqual(seen, [(0, 2, "job-7", "site-2", 0), (1, None, "job-7", "site-2", 1)])
        self.assertIsNone(c.receive())
        self.assertEqual((c.job, c.member), ("job-7", "site-2"))

    def test_aggregation_weight(self):
        c = self.ex.client("raw")
        cases = [({}, 1), ({"NUM_STEPS_CURRENT_ROUND": 12}, 12), ({"num_samples": 3, "NUM_STEPS_CURRENT_ROUND": 12}, 3),
                 ({"NUM_STEPS_CURRENT_ROUND": 4.0}, 4)]
        for meta, weight in cases:
            self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])})
            m = c.receive()
            c.send(flare.FLModel(params=m.params, meta=meta))
            self.assertEqual(self.ex.read()["num_samples"], weight, meta)
        self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])})
        m = c.receive()
        with self.assertRaises(ValueError):
            c.send(flare.FLModel(params=m.params, meta={"NUM_STEPS_CURRENT_ROUND": "many"}))

    def test_diff_goes_to_the_executor_as_diff_and_needs_an_input(self):
        # The executor adds a DIFF result to the model it sent (actors/src/learner/external.rs),
        # so the workflow aggregates whole models; the learner sends the difference as it is.
        c = self.ex.client("raw")
        self.ex.task({"w": tensors.Tensor([2], "F32", [1.0, 2.0])})
        m = c.receive()
        c.send(flare.FLModel(params_type=flare.ParamsType.DIFF, params={"w": tensors.Tensor([2], "F32", [0.5, -1.0])}))
        msg = self.ex.read()
        self.assertEqual(msg["params_type"], "DIFF")
        self.assertEqual(tensors.load(msg["output_path"], "raw")["w"].values.tolist(), [0.5, -1.0])
        self.ex.task(None, task="submit_model")
        c.receive()
        with self.assertRaises(ValueError):
            c.send(flare.FLModel(params_type="DIFF", params={"w": tensors.Tensor([1], "F32", [1.0])}))

    def test_validate_task(self):
        c = self.ex.client("raw")
        self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])}, task="validate")
        m = c.receive()
        self.assertEqual(c.task["task"], "validate")
        c.send(flare.FLModel(metrics={"accuracy": 0.5}))
        msg = self.ex.read()
        self.assertEqual((msg["output_path"], msg["metrics"]), (None, {"accuracy": 0.5}))
        self.assertIsNotNone(m.params)


class InitModel(Base):
    """The ``init_model`` task (the job's ``[model] from = "MEMBER"``): ``receive()`` answers it
    from the registered model and returns the next task; the script's loop never sees it."""

    W = {"w": tensors.Tensor([2], "F32", [1.5, -2.0]), "b": tensors.Tensor([1], "F64", [0.25])}

    def init_task(self):
        self.ex.task(None, task="init_model", round=0, total_rounds=3)
        return self.ex.file("output-%d.safetensors" % self.ex.n)

    def assert_answered(self, out, expect):
        msg = self.ex.read()
        self.assertEqual((msg["type"], msg["params_type"], msg["num_samples"], msg["output_path"]),
                         ("result", "FULL", 0, out), msg)
        got = tensors.load(out, "raw")
        self.assertEqual({k: (t.dtype, t.values.tolist()) for k, t in got.items()},
                         {k: (t.dtype, t.values.tolist()) for k, t in expect.items()})

    def test_answered_from_a_dict_and_not_surfaced_to_the_loop(self):
        c = self.ex.client("raw")
        with mock.patch.object(flare, "_client", c):
            flare.init(framework="raw", model=self.W)
        out = self.init_task()
        self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])}, round=0, total_rounds=1)
        seen = []
        while c.is_running():
            m = c.receive()
            seen.append((c.task["task"], m.current_round))
            if len(seen) == 1:
                self.assert_answered(out, self.W)
            c.send(flare.FLModel(params=m.params))
            self.assertEqual(self.ex.read()["type"], "result")
            self.ex.stop()
        self.assertEqual(seen, [("train", 0)])

    def test_answered_from_a_callable_read_when_the_task_comes(self):
        c = self.ex.client("raw")
        box = {"w": tensors.Tensor([1], "F32", [1.0])}
        with mock.patch.object(flare, "_client", c):
            flare.set_initial_model(lambda: box)
        box = {"w": tensors.Tensor([1], "F32", [7.0])}  # the callable sees the newest value
        out = self.init_task()
        self.ex.task(None, task="validate")
        c.receive()
        self.assert_answered(out, box)
        self.assertEqual(c.task["task"], "validate")

    def test_none_registered_is_an_error_saying_what_to_do_then_the_next_task(self):
        c = self.ex.client("raw")
        self.init_task()
        self.ex.task({"w": tensors.Tensor([1], "F32", [0.0])})
        with mock.patch("sys.stderr"):
            m = c.receive()
        msg = self.ex.read()
        self.assertEqual(msg["type"], "error")
        self.assertEqual(msg["message"],
                         'this job takes its initial model from this site ([model] from = "site-2"), but the script '
                         'registered none: call flare.init(model=net) (or flare.set_initial_model(net)) before the '
                         'first flare.receive()')
        self.assertEqual((c.task["task"], m.params["w"].values.tolist()), ("train", [0.0]))

    def test_integer_tensors_are_refused_naming_them(self):
        c = self.ex.client("raw")
        c.initial_model = {"w": tensors.Tensor([1], "F32", [1.0]), "steps": tensors.Tensor([1], "I64", [3])}
        self.init_task()
        self.ex.task(None, task="validate")
        with mock.patch("sys.stderr"):
            c.receive()
        msg = self.ex.read()
        self.assertEqual(msg["type"], "error")
        self.assertIn("'steps' is I64: flare-node averages float32 and float64 tensors only", msg["message"])

    def test_is_running_reads_it_ahead_without_answering_it(self):
        c = self.ex.client("raw")
        out = self.init_task()
        self.assertTrue(c.is_running())
        self.assertIsNotNone(c.pending)
        self.ex.conn.settimeout(0.2)
        with self.assertRaises(socket.timeout):
            self.ex.conn.recv(1)  # nothing answered yet: the model may be registered later
        self.ex.conn.settimeout(60)
        with mock.patch.object(flare, "_client", c):
            flare.set_initial_model(self.W)  # as flare_client.lightning does in its first callback
        self.ex.task(None, task="submit_model")
        self.assertIsNotNone(c.receive())
        self.assert_answered(out, self.W)
        self.assertEqual(c.task["task"], "submit_model")

    def test_unfit_values_are_refused_when_registered(self):
        c = self.ex.client("raw")
        with mock.patch.object(flare, "_client", c):
            with self.assertRaises(TypeError):
                flare.init(model=42)
            with self.assertRaises(TypeError):
                flare.set_initial_model("net.safetensors")
        self.assertIsNone(c.initial_model)


@unittest.skipIf(np is None, "numpy is not importable")
class Numpy(Base):
    def test_numpy_gives_arrays_of_the_file_dtype(self):
        c = self.ex.client("numpy")
        self.ex.task({"w": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(2, dtype=np.float32)})
        m = c.receive()
        self.assertIsInstance(m.params["w"], np.ndarray)
        self.assertEqual((m.params["w"].dtype, m.params["b"].dtype), (np.float64, np.float32))
        m.params["w"] += 1  # writable, as a training script expects
        c.send(flare.FLModel(params=m.params))
        got = tensors.load(self.ex.read()["output_path"])
        self.assertTrue(np.array_equal(got["w"], np.arange(6, dtype=np.float64).reshape(2, 3) + 1))

    def test_default_without_torch_is_numpy(self):
        c = self.ex.client()
        self.ex.task({"w": np.ones(2, dtype=np.float32)})
        with mock.patch.dict(sys.modules):
            sys.modules.pop("torch", None)
            m = c.receive()
        self.assertIsInstance(m.params["w"], np.ndarray)


@unittest.skipIf(torch is None, "torch is not importable")
class Torch(Base):
    def net(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def test_detected_when_the_script_imported_torch(self):
        c = self.ex.client()
        self.ex.task(self.net().state_dict())
        m = c.receive()
        self.assertTrue(all(isinstance(t, torch.Tensor) for t in m.params.values()))

    def test_load_state_dict_then_state_dict_round_trips_exactly(self):
        sent = {k: v.clone() for k, v in self.net().state_dict().items()}
        c = self.ex.client("pytorch")
        self.ex.task(sent)
        m = c.receive()
        for k, t in m.params.items():
            self.assertIsInstance(t, torch.Tensor)
            self.assertEqual((t.dtype, t.device.type), (torch.float32, "cpu"))
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        net.load_state_dict(m.params)
        c.send(flare.FLModel(params=net.cpu().state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": 3}))
        msg = self.ex.read()
        got = tensors.load(msg["output_path"], "pytorch")
        self.assertEqual(sorted(got), sorted(sent))
        for k in sent:
            self.assertTrue(torch.equal(got[k], sent[k]), k)
        self.assertEqual(msg["num_samples"], 3)

    def test_trained_parameters_with_grad_and_views_are_sent(self):
        c = self.ex.client("pytorch")
        net = self.net()
        self.ex.task(net.state_dict())
        net.load_state_dict(c.receive().params)
        net(torch.ones(5, 3)).sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
        params = dict(net.named_parameters())  # requires_grad tensors
        params["0.weight"] = params["0.weight"].t().t()  # a view
        params["extra"] = torch.arange(6, dtype=torch.float64).reshape(2, 3)[:, 1]  # not contiguous
        c.send(flare.FLModel(params=params))
        got = tensors.load(self.ex.read()["output_path"], "pytorch")
        for k, p in net.named_parameters():
            self.assertTrue(torch.equal(got[k], p.detach()), k)
        self.assertTrue(torch.equal(got["extra"], torch.tensor([1.0, 4.0], dtype=torch.float64)))

    def test_dtypes_of_the_file_are_kept_and_bfloat16_is_refused(self):
        c = self.ex.client("pytorch")
        self.ex.task({"d": torch.tensor([1.5], dtype=torch.float64), "i": torch.tensor([3], dtype=torch.int64),
                      "m": torch.tensor([True, False])})
        m = c.receive()
        self.assertEqual({k: t.dtype for k, t in m.params.items()},
                         {"d": torch.float64, "i": torch.int64, "m": torch.bool})
        with self.assertRaisesRegex(ValueError, "bfloat16"):
            c.send(flare.FLModel(params={"d": torch.ones(1, dtype=torch.bfloat16)}))

    def test_without_numpy_torch_reads_and_writes_the_file_itself(self):
        params = {"a.half": torch.tensor([0.5, 2.0, -1.0], dtype=torch.float16),  # misaligns what follows
                  "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                  "c.double": torch.tensor([1.25], dtype=torch.float64), "d.empty": torch.zeros(0, 3)}
        with tempfile.TemporaryDirectory() as d, mock.patch.object(tensors, "_np", None), \
                mock.patch.object(tensors, "_st", None):
            path = os.path.join(d, "m")
            tensors.save(params, path)
            got = tensors.load(path, "pytorch")
            got["b.weight"] += 1  # writable
            tensors.save(got, path + "2")
            again = tensors.load(path + "2", "pytorch")
        for k, t in params.items():
            self.assertEqual((got[k].dtype, tuple(got[k].shape)), (t.dtype, tuple(t.shape)), k)
        self.assertTrue(torch.equal(again["b.weight"], params["b.weight"] + 1))
        self.assertTrue(torch.equal(again["a.half"], params["a.half"]))
        self.assertTrue(torch.equal(again["c.double"], params["c.double"]))

    def test_init_model_is_answered_from_a_module_detached_on_the_cpu(self):
        c = self.ex.client("pytorch")
        net = self.net()
        net(torch.ones(2, 3)).sum().backward()  # params with grads
        with mock.patch.object(flare, "_client", c):
            flare.init(model=net)
        self.ex.task(None, task="init_model")
        out = self.ex.file("output-%d.safetensors" % self.ex.n)
        self.ex.task(net.state_dict())
        m = c.receive()
        msg = self.ex.read()
        self.assertEqual((msg["type"], msg["params_type"], msg["num_samples"], msg["output_path"]),
                         ("result", "FULL", 0, out))
        got = tensors.load(out, "pytorch")
        self.assertEqual(sorted(got), sorted(net.state_dict()))
        for k, t in net.state_dict().items():
            self.assertTrue(torch.equal(got[k], t), k)
        self.assertEqual(c.task["task"], "train")
        self.assertEqual(sorted(m.params), sorted(got))

    def test_init_model_from_a_callable_returning_a_state_dict(self):
        c = self.ex.client("pytorch")
        net = self.net()
        c.initial_model = lambda: {k: v.double() for k, v in net.state_dict().items()}
        self.ex.task(None, task="init_model")
        out = self.ex.file("output-%d.safetensors" % self.ex.n)
        self.ex.task(None, task="validate")
        c.receive()
        self.assertEqual(self.ex.read()["type"], "result")
        self.assertEqual({t.dtype for t in tensors.load(out, "pytorch").values()}, {torch.float64})

    def test_numpy_and_raw_params_are_accepted_in_a_torch_script(self):
        c = self.ex.client("pytorch")
        self.ex.task({"w": torch.ones(2)})
        c.receive()
        params = {"w": tensors.Tensor([2], "F32", [1.0, 2.0])}
        if np is not None:
            params["n"] = np.ones(2, dtype=np.float32)
        c.send(flare.FLModel(params=params))
        got = tensors.load(self.ex.read()["output_path"], "pytorch")
        self.assertTrue(torch.equal(got["w"], torch.tensor([1.0, 2.0])))


@unittest.skipIf(torch is None, "torch is not importable")
class TorchScriptEndToEnd(Base):
    """``examples/digits_torch.py``, an NVIDIA FLARE-style script with only its import changed,
    as the executor runs it: a process with the socket in its environment, two training rounds,
    a validation, then stop."""

    def test_nvflare_style_torch_script_trains_and_reports(self):
        sys.path.insert(0, os.path.join(PYTHON_DIR, "examples"))
        try:
            import digits_torch
        finally:
            sys.path.pop(0)
        rng = random.Random(1)
        csv = self.ex.file("digits.csv")
        with open(csv, "w") as f:
            for i in range(60):
                label = i % 10
                feats = [1.0 if j % 10 == label else rng.random() * 0.2 for j in range(64)]
                f.write(",".join("%.3f" % v for v in feats) + ",%d\n" % label)
        torch.manual_seed(0)
        initial = {k: v.clone() for k, v in digits_torch.Net().state_dict().items()}
        env = dict(os.environ, **self.ex.env(), DIGITS_CSV=csv, PYTHONPATH=PYTHON_DIR, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, os.path.join(PYTHON_DIR, "examples", "digits_torch.py")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            self.ex.accept()
            model = initial
            for rnd in range(2):
                self.ex.task(model, round=rnd, total_rounds=2)
                msg = self.ex.read()
                self.assertEqual(msg["type"], "result", msg)
                self.assertEqual(msg["num_samples"], 2 * 2)  # 2 epochs of 48 rows in batches of 32
                self.assertIn("train_loss", msg["metrics"])
                out = tensors.load(msg["output_path"], "pytorch")
                self.assertEqual({k: (v.dtype, v.shape) for k, v in out.items()},
                                 {k: (v.dtype, v.shape) for k, v in initial.items()})
                self.assertFalse(torch.equal(out["fc.weight"], model["fc.weight"]))
                model = out
            self.ex.task(model, task="validate", round=2, total_rounds=2)
            msg = self.ex.read()
            self.assertEqual((msg["output_path"], sorted(msg["metrics"])), (None, ["accuracy"]))
            self.ex.stop()
            _, err = proc.communicate(timeout=120)
            self.assertEqual(proc.returncode, 0, err.decode(errors="replace"))
            self.assertIn(b"site site-2, round 1 of 2", err)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@unittest.skipIf(torch is None, "torch is not importable")
class DigitsCnnEndToEnd(Base):
    """``examples/digits_cnn.py`` (``digits_cnn_local.py`` federated) as the executor runs it."""

    def test_init_model_rounds_validate_and_evaluate(self):
        csv = self.ex.file("digits.csv")
        write_digits_csv(csv, 60, header=True)
        # 48 rows (the first fifth held out for the accuracy) in batches of 32: 2 steps, 2 epochs
        models, accuracy = run_digits_script(self, self.ex, "digits_cnn.py", {"DIGITS_CSV": csv, "DIGITS_LR": "0.5"},
                                             steps=4)
        torch.manual_seed(0)  # the script's seed: its Net() is the initial model
        sys.path.insert(0, os.path.join(PYTHON_DIR, "examples"))
        try:
            import digits_cnn
        finally:
            sys.path.pop(0)
        for k, v in digits_cnn.Net().state_dict().items():
            self.assertTrue(torch.equal(models[0][k], v), k)
        self.assertGreater(accuracy, 0.5)

    def test_the_local_script_trains_alone(self):
        csv, test_csv = self.ex.file("digits.csv"), self.ex.file("test.csv")
        write_digits_csv(csv, 40)
        write_digits_csv(test_csv, 20, seed=2)
        env = dict(os.environ, DIGITS_CSV=csv, DIGITS_TEST_CSV=test_csv, DIGITS_ROUNDS="2", DIGITS_LR="0.5",
                   OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, os.path.join("python", "examples", "digits_cnn_local.py")], cwd=REPO_DIR,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        out = json.loads(done.stdout.decode().strip().splitlines()[-1])
        self.assertEqual(out["rows"], 40)
        self.assertGreater(out["accuracy"], 0.5)


if __name__ == "__main__":
    unittest.main()
