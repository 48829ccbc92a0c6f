#!/usr/bin/env python3
"""Measures the Client API's hand-written formats against the well-kept libraries.

`python/flare_client` parses CBOR (`cbor.py`) and safetensors (`tensors.py`) itself so that
`pip install ./python` needs nothing else. This compares them, in one process and one run,
with `cbor2` and `safetensors` (numpy API), on what the Client API really moves:

- CBOR: a task message as the executor sends it (a few dozen fields, ~300 bytes), encoded and
  decoded; messages are capped at 1 MiB and models never travel in them.
- safetensors: a model file written and read back (numpy arrays), at 4 KiB (1,000 floats), 64 MiB
  and 256 MiB, with the peak of memory the read allocates (tracemalloc, which sees numpy's
  buffers) as a multiple of the model.

Usage (needs numpy, cbor2 and safetensors importable):
    python3 scripts/python-formats-bench.py [--big-mib 256]
Progress goes to stderr; the last line of stdout is one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import numpy as np  # noqa: E402

import cbor2  # noqa: E402
import safetensors.numpy as st_np  # noqa: E402
from flare_client import cbor, tensors  # noqa: E402


def best_of(n, f):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def task_message():
    return {
        "type": "task",
        "task": "train",
        "job": "fedavg-digits",
        "site": "hospital-3",
        "round": 7,
        "total_rounds": 20,
        "model": "/tmp/flare-work/hospital-3/input-7.safetensors",
        "output": "/tmp/flare-work/hospital-3/output-7.safetensors",
        "params_type": "FULL",
        "meta": {"NUM_STEPS_CURRENT_ROUND": 2, "lr": 0.05, "seed": 1234, "note": "x" * 40},
        "metrics": {"accuracy": 0.9443, "loss": 0.2548},
    }


def bench_cbor(iters):
    msg = task_message()
    enc_ours, enc_lib = cbor.dumps(msg), cbor2.dumps(msg)
    assert cbor.loads(enc_lib) == msg and cbor2.loads(enc_ours) == msg
    ours = best_of(5, lambda: [cbor.loads(cbor.dumps(msg)) for _ in range(iters)]) / iters
    lib = best_of(5, lambda: [cbor2.loads(cbor2.dumps(msg)) for _ in range(iters)]) / iters
    return {"message_bytes": len(enc_ours), "ours_us": ours * 1e6, "cbor2_us": lib * 1e6}


def model(total_bytes, keys):
    per = max(1, total_bytes // 4 // keys)
    rng = np.random.default_rng(0)
    return {"layer.%03d" % i: rng.standard_normal(per, dtype=np.float32) for i in range(keys)}


def peak_of(f):
    tracemalloc.start()
    f()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def bench_file(params, tmp, reps):
    nbytes = sum(a.nbytes for a in params.values())
    path = os.path.join(tmp, "m.safetensors")
    package, tensors._st = tensors._st, None  # flare_client's own pure-Python code
    try:
        save_ours = best_of(reps, lambda: tensors.save(params, path))
        load_ours = best_of(reps, lambda: tensors.load(path))
        peak_ours = peak_of(lambda: tensors.load(path))
        back = tensors.load(path)
    finally:
        tensors._st = package
    assert all(np.array_equal(back[k], params[k]) for k in params)
    save_lib = best_of(reps, lambda: st_np.save_file(params, path))
    load_lib = best_of(reps, lambda: st_np.load_file(path))
    peak_lib = peak_of(lambda: st_np.load_file(path))
    back = st_np.load_file(path)
    assert all(np.array_equal(back[k], params[k]) for k in params)
    return {
        "model_bytes": nbytes,
        "save_ours_s": save_ours,
        "save_safetensors_s": save_lib,
        "load_ours_s": load_ours,
        "load_safetensors_s": load_lib,
        "load_peak_ours_x_model": peak_ours / nbytes,
        "load_peak_safetensors_x_model": peak_lib / nbytes,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=256)
    args = ap.parse_args()
    out = {"cbor": None, "safetensors": []}
    print("cbor: encode+decode of a task message", file=sys.stderr)
    out["cbor"] = bench_cbor(2000)
    with tempfile.TemporaryDirectory() as tmp:
        for total, keys, reps in [(4000, 1, 50), (64 << 20, 16, 3), (args.big_mib << 20, 64, 3)]:
            print("safetensors: %d bytes in %d tensors" % (total, keys), file=sys.stderr)
            out["safetensors"].append(bench_file(model(total, keys), tmp, reps))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
